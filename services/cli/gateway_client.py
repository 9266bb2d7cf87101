"""The gateway as an office sees it: feed pages, the event stream, key records and downloads over mutual TLS.

Owns the HTTP side of ``evhub subscribe``, written from ``docs/gateway-api.md``: every answer is untrusted — bodies
are read with a size bound *while* they arrive, problem+json is turned into one :mod:`services.shared.errors`
error (``InvalidCursor`` 400, ``Forbidden`` 403 with the refusal's receipt, ``NotFound`` 404, ``ValidationFailed``
422, ``InfrastructureError`` 503 with its ``Retry-After``), every wait has a timeout, and a connection failure is
an ``InfrastructureError`` naming the gateway. Nothing here verifies evidence (``subscription`` does).

Does not own: what to do with events (``subscribe_cmd``), files (``subscribe_store``).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import ssl
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote

import aiohttp

from services.cli.event_stream import EventStreamDecoder, Message
from services.shared.errors import (
    DecodeError,
    EvidenceHubError,
    Forbidden,
    InfrastructureError,
    InvalidCursor,
    NotFound,
    ValidationFailed,
)

MAX_PAGE_BYTES: Final = 256 << 20  # 500 events of at most ~1.4 MiB of base64 envelope each, and their copies
MAX_KEYS_BYTES: Final = 32 << 20
MAX_PROBLEM_BYTES: Final = 16 << 10
MAX_RETRY_AFTER_S: Final = 60.0
CHUNK: Final = 1 << 20
_REPR_DIGEST = re.compile(r"sha-256=:([A-Za-z0-9+/=]+):")
_RECEIPT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]{0,63}$")
_AUDIT = re.compile(r"^(?P<topic>[^;]{1,249});partition=(?P<p>\d{1,10});offset=(?P<o>\d{1,19});index=(?P<i>\d{1,7})$")


class GatewayUnavailable(InfrastructureError):
    title = "Gateway unavailable"
    type_slug = "gateway-unavailable"

    def __init__(self, detail: str, *, retry_after: float | None = None, **extensions: Any) -> None:
        super().__init__(detail, **extensions)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Page:
    events: list[Any]
    cursor: str
    caught_up: bool
    #: When the answer's headers arrived (before its body was read): the gateway had sent it by then.
    received_at: datetime


@dataclass(frozen=True)
class DownloadReceipt:
    receipt: str
    audit: tuple[str, int, int, int]  # topic, partition, offset, index


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, refused once it grows past ``limit`` bytes (not after it was all read).

    Raises:
        DecodeError: the body is larger than ``limit``.
    """
    out = bytearray()
    async for chunk in response.content.iter_chunked(CHUNK):
        out += chunk
        if len(out) > limit:
            raise DecodeError(f"an answer from the gateway larger than {limit} bytes")
    return bytes(out)


def _retry_after(response: aiohttp.ClientResponse) -> float | None:
    try:
        return min(MAX_RETRY_AFTER_S, max(0.0, float(response.headers.get("Retry-After", ""))))
    except ValueError:
        return None


async def problem(response: aiohttp.ClientResponse, where: str) -> EvidenceHubError:
    """The error an unsuccessful answer stands for, with the gateway's own words where it gave any."""
    try:
        body = json.loads(await read_bounded(response, MAX_PROBLEM_BYTES))
    except (ValueError, DecodeError, aiohttp.ClientError):
        body = {}
    body = body if isinstance(body, dict) else {}
    detail = str(body.get("detail") or body.get("title") or response.reason or "")[:500]
    said = f"{where}: {response.status} {detail}"
    status = response.status
    if status == 400:
        return InvalidCursor(f"{said} — the gateway no longer accepts this subscription's cursor (its key was "
                             "retired?); it is never restarted silently: start a new --out directory")  # fmt: skip
    if status == 403:
        receipt = body.get("receipt")
        return Forbidden(said + (f" (audited refusal: receipt {receipt})" if isinstance(receipt, str) else ""))
    if status == 404:
        return NotFound(said)
    if status == 422:
        return ValidationFailed(said)
    return GatewayUnavailable(said, retry_after=_retry_after(response))


def parse_download_receipt(headers: Mapping[str, str]) -> DownloadReceipt | None:
    """``Evidence-Receipt`` and ``Evidence-Audit`` of a download, if well-formed."""
    receipt, audit = headers.get("Evidence-Receipt", ""), _AUDIT.fullmatch(headers.get("Evidence-Audit", ""))
    if not _RECEIPT.fullmatch(receipt) or audit is None:
        return None
    return DownloadReceipt(receipt, (audit["topic"], int(audit["p"]), int(audit["o"]), int(audit["i"])))


def repr_digest(headers: Mapping[str, str]) -> str | None:
    """The SHA-256 (hex) a ``Repr-Digest: sha-256=:<base64>:`` header claims, if any."""
    found = _REPR_DIGEST.search(headers.get("Repr-Digest", ""))
    if found is None:
        return None
    try:
        raw = base64.b64decode(found[1], validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw.hex() if len(raw) == 32 else None


class GatewayClient:
    """One office's view of one gateway (``url`` = ``https://host:port``). Use as an async context manager."""

    def __init__(self, *, url: str, ssl_context: ssl.SSLContext, jurisdiction: str, purpose: str | None,
                 timeout_s: float = 30.0) -> None:  # fmt: skip
        self.url = url.rstrip("/")
        self._ssl, self._jurisdiction, self._purpose, self._timeout_s = ssl_context, jurisdiction, purpose, timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> GatewayClient:
        timeout = aiohttp.ClientTimeout(total=None, connect=self._timeout_s, sock_connect=self._timeout_s)
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=self._ssl, limit=4), timeout=timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use GatewayClient as an async context manager")
        return self._session

    def _params(self, **extra: str) -> dict[str, str]:
        return {**({"purpose": self._purpose} if self._purpose else {}), **extra}

    def _feed(self) -> str:
        return f"{self.url}/v1/feeds/{quote(self._jurisdiction, safe='')}"

    def _failed(self, exc: BaseException) -> GatewayUnavailable:
        return GatewayUnavailable(f"{self.url}: {type(exc).__name__}: {exc}".rstrip(": "))

    async def page(self, cursor: str | None, *, limit: int, wait_s: float) -> Page:
        """One long-poll page. Raises: see the module docstring; DecodeError for a page not shaped as documented."""
        params = self._params(max=str(limit), wait=f"{wait_s:g}", **({"cursor": cursor} if cursor else {}))
        timeout = aiohttp.ClientTimeout(sock_read=wait_s + self._timeout_s)
        try:
            async with self.session.get(self._feed(), params=params, timeout=timeout) as response:
                received_at = datetime.now(UTC)
                if response.status != 200:
                    raise await problem(response, "feed")
                body = json.loads(await read_bounded(response, MAX_PAGE_BYTES))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failed(exc) from exc
        except ValueError as exc:
            raise DecodeError("the feed page is not JSON") from exc
        if not (isinstance(body, dict) and isinstance(body.get("events"), list) and isinstance(body.get("cursor"), str)
                and isinstance(body.get("caught_up"), bool)):  # fmt: skip
            raise DecodeError("the feed page is not shaped as documented (events, cursor, caught_up)")
        return Page(body["events"], body["cursor"], body["caught_up"], received_at)

    async def stream(self, cursor: str | None, *, limit: int,
                     idle_s: float = 60.0) -> AsyncIterator[tuple[list[Message], datetime]]:  # fmt: skip
        """The feed as Server-Sent Events from ``cursor`` (``Last-Event-ID``): the messages of each chunk received,
        with the moment the chunk arrived.
        Ends when the gateway ends the stream; an ``error`` message is raised as :class:`GatewayUnavailable`.

        Raises: see the module docstring; GatewayUnavailable when nothing (not even a ping) arrives for ``idle_s``.
        """
        headers = {"Accept": "text/event-stream", **({"Last-Event-ID": cursor} if cursor else {})}
        timeout = aiohttp.ClientTimeout(sock_read=idle_s)
        decoder = EventStreamDecoder()
        try:
            async with self.session.get(self._feed(), params=self._params(max=str(limit)), headers=headers,
                                        timeout=timeout) as response:  # fmt: skip
                if response.status != 200:
                    raise await problem(response, "feed")
                if response.content_type != "text/event-stream":
                    raise DecodeError(f"the feed answered {response.content_type}, not text/event-stream")
                async for chunk in response.content.iter_any():
                    received_at = datetime.now(UTC)
                    messages = decoder.feed(chunk)
                    for m in messages:
                        if m.event == "error":
                            raise _stream_error(m.data, self.url)
                    if messages:
                        yield messages, received_at
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failed(exc) from exc

    async def key_records(self) -> list[bytes]:
        """The key registry records the gateway serves (``GET /v1/keys``), unverified.

        Raises: see the module docstring; DecodeError for an answer not shaped as documented.
        """
        try:
            async with self.session.get(f"{self.url}/v1/keys", timeout=aiohttp.ClientTimeout(sock_read=30)) as r:
                if r.status != 200:
                    raise await problem(r, "key records")
                body = json.loads(await read_bounded(r, MAX_KEYS_BYTES))
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failed(exc) from exc
        except ValueError as exc:
            raise DecodeError("the key records are not JSON") from exc
        records = body.get("records") if isinstance(body, dict) else None
        if not isinstance(records, list) or not all(isinstance(r, str) for r in records):
            raise DecodeError("the key records are not a list of base64 strings")
        try:
            return [base64.b64decode(r, validate=True) for r in records]
        except (binascii.Error, ValueError) as exc:
            raise DecodeError("a key record is not base64") from exc

    async def content(self, item_id: str, sha256: str, *, offset: int) -> aiohttp.ClientResponse:
        """Start a download (from ``offset`` with a Range request). The caller reads and releases the response.

        Raises: see the module docstring (404 and 403 included: the caller decides what a refusal means).
        """
        url = f"{self.url}/v1/items/{quote(item_id, safe='')}/content/{sha256}"
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            response = await self.session.get(url, params=self._params(jurisdiction=self._jurisdiction),
                                              headers=headers, timeout=aiohttp.ClientTimeout(sock_read=60))  # fmt: skip
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._failed(exc) from exc
        if response.status not in (200, 206, 416):
            try:
                raise await problem(response, f"content {sha256[:12]}…")
            finally:
                response.release()
        return response


def _stream_error(data: str, url: str) -> EvidenceHubError:
    try:
        body = json.loads(data)
    except ValueError:
        body = {}
    body = body if isinstance(body, dict) else {}
    retry = body.get("retry_after")
    detail = str(body.get("detail") or body.get("title") or "the gateway ended the stream")[:500]
    if body.get("status") == 403:
        return Forbidden(f"{url}: {detail}")
    return GatewayUnavailable(f"{url}: {detail}", retry_after=float(retry) if isinstance(retry, int | float) else None)
