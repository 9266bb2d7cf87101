"""Where ``evhub audit`` reads the log from: the audit service over mutual TLS, or a copy of its directory.

Owns the :class:`LogSource` port and its two adapters:
- :class:`HttpLogSource` — the ``/v1/log/`` API (checkpoint, tiles, entry bundles, queries, proofs, receipts,
  cosignatures) as the client certificate's principal. Every answer is untrusted: its size is bounded *while* it is
  read (a hash tile is read up to exactly its width x 32 bytes, a checkpoint up to the signed-note limit …), JSON is
  checked for shape before use, every wait has a timeout, and every failure is one :mod:`services.shared.errors`
  error naming the server and the path — never a traceback;
- :class:`DirectoryLogSource` — a copy of the served directory (``checkpoint``, ``tile/…``), e.g. handed to an
  auditor on a disk: full replays only; consistency proofs are computed from the copy's own tiles (a proof is
  checked, not trusted, so where it comes from does not matter).

Nothing here verifies anything: the caller opens checkpoints with its own keys and checks every hash.
"""

from __future__ import annotations

import base64
import binascii
import json
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import quote, urlencode

import aiohttp

from services.audit import merkle, note
from services.audit.checkpoint import MAX_PROOF_BYTES
from services.audit.tiles import MAX_ENTRY_BYTES, TILE_WIDTH, Tile, TileNodeReader, partial_of
from services.shared.errors import (
    Conflict,
    DecodeError,
    EvidenceHubError,
    Forbidden,
    InfrastructureError,
    InvalidProof,
    NotFound,
    ValidationFailed,
)

#: Entries asked for per query page; an entry is at most 64 KiB (≈ 87 KiB in base64), so a page is bounded too.
PAGE: Final = 250
MAX_PAGE_BYTES: Final = PAGE * (MAX_ENTRY_BYTES * 4 // 3 + 2048)
MAX_JSON_BYTES: Final = 256 * 1024
MAX_PROBLEM_BYTES: Final = 16 * 1024


class AuditServiceUnavailable(InfrastructureError):
    title = "Audit service unavailable"
    type_slug = "audit-unavailable"


@dataclass(frozen=True)
class EntryQuery:
    start: int = 0
    end: int | None = None
    office: str | None = None
    item: str | None = None
    decision: str | None = None
    since: str | None = None
    until: str | None = None

    @property
    def is_everything(self) -> bool:
        return self == EntryQuery(start=0, end=self.end) and self.end is None


@dataclass(frozen=True)
class EntryPage:
    entries: list[tuple[int, bytes]]
    next_start: int | None


class LogSource(Protocol):
    @property
    def where(self) -> str: ...

    async def checkpoint(self, size: int | None = None) -> bytes:
        """The latest checkpoint note (or the one the log signed at ``size``). Raises: NotFound."""

    async def tile(self, tile: Tile) -> bytes:
        """A hash tile or an entry bundle, as stored. Raises: NotFound."""

    async def consistency(self, old: int, new: int) -> list[bytes]:
        """A consistency proof from size ``old`` to ``new`` (unverified)."""

    async def entries(self, query: EntryQuery) -> EntryPage:
        """One page of entries matching ``query`` from ``query.start`` on, in index order."""

    async def cosigned(self) -> list[tuple[int, list[str]]]:
        """Recent sizes that carry cosignatures, newest first, with the witness names (hints only)."""


def _hashes(value: Any, what: str) -> list[bytes]:
    if not isinstance(value, list) or len(value) > 64:
        raise DecodeError(f"{what}: not a list of at most 64 hashes")
    try:
        out = [base64.b64decode(h, validate=True) for h in value]
    except (binascii.Error, TypeError, ValueError) as exc:
        raise DecodeError(f"{what}: a hash is not base64") from exc
    if any(len(h) != merkle.HASH_SIZE for h in out):
        raise DecodeError(f"{what}: a hash is not 32 bytes")
    return out


class HttpLogSource:
    """The audit API at ``url`` (``https://host:port``), as the principal of ``ssl_context``'s certificate.
    Use as an async context manager."""

    def __init__(self, *, url: str, ssl_context: ssl.SSLContext, timeout_s: float = 30.0, parallel: int = 8) -> None:
        self._url = url.rstrip("/")
        self._ssl = ssl_context
        self._timeout = aiohttp.ClientTimeout(total=None, connect=timeout_s, sock_connect=timeout_s,
                                              sock_read=timeout_s)  # fmt: skip
        self._parallel = parallel
        self._session: aiohttp.ClientSession | None = None

    @property
    def where(self) -> str:
        return self._url

    async def __aenter__(self) -> HttpLogSource:
        connector = aiohttp.TCPConnector(ssl=self._ssl, limit=self._parallel)
        self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(self, method: str, path: str, limit: int, *, body: bytes | None = None) -> bytes:
        """The answer's body, read up to ``limit`` bytes.

        Raises:
            DecodeError: the answer is larger than ``limit``. NotFound, Forbidden, ValidationFailed, Conflict: the
                service refused (its detail is kept). AuditServiceUnavailable: no answer, a time-out, or a 5xx.
        """
        if self._session is None:
            raise RuntimeError("use HttpLogSource as an async context manager")
        url = self._url + path
        try:
            async with self._session.request(method, url, data=body) as resp:
                if resp.status != 200:
                    raise _refusal(resp.status, path, await _read(resp, MAX_PROBLEM_BYTES, path, strict=False))
                return await _read(resp, limit, path)
        except aiohttp.ClientResponseError as exc:
            raise AuditServiceUnavailable(f"the audit service at {self._url} sent a malformed answer to {path}: "
                                          f"{exc.message}") from exc  # fmt: skip
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise AuditServiceUnavailable(f"the audit service at {self._url} did not answer {path}: "
                                          f"{type(exc).__name__}: {exc}") from exc  # fmt: skip

    async def _json(self, path: str, limit: int = MAX_JSON_BYTES) -> dict[str, Any]:
        data = await self._request("GET", path, limit)
        try:
            value = json.loads(data)
        except ValueError as exc:
            raise DecodeError(f"the audit service's answer to {path} is not JSON") from exc
        if not isinstance(value, dict):
            raise DecodeError(f"the audit service's answer to {path} is not a JSON object")
        return value

    async def checkpoint(self, size: int | None = None) -> bytes:
        path = "/v1/log/checkpoint" + ("" if size is None else f"?size={size}")
        return await self._request("GET", path, note.MAX_NOTE_BYTES)

    async def tile(self, tile: Tile) -> bytes:
        limit = tile.width * (2 + MAX_ENTRY_BYTES) if tile.is_bundle else tile.width * merkle.HASH_SIZE
        return await self._request("GET", "/v1/log/" + tile.path, limit)

    async def consistency(self, old: int, new: int) -> list[bytes]:
        path = f"/v1/log/proof/consistency?from={old}&to={new}"
        body = await self._json(path)
        return _hashes(body.get("proof"), f"the consistency proof from {self._url}")

    async def entries(self, query: EntryQuery) -> EntryPage:
        params: dict[str, Any] = {"start": query.start, "limit": PAGE}
        for name in ("end", "office", "item", "decision", "since", "until"):
            value = getattr(query, name)
            if value is not None:
                params[name] = value
        path = "/v1/log/entries?" + urlencode(params)
        body = await self._json(path, MAX_PAGE_BYTES)
        return _page(body, path)

    async def cosigned(self) -> list[tuple[int, list[str]]]:
        body = await self._json("/v1/log/cosigned")
        rows = body.get("checkpoints")
        out: list[tuple[int, list[str]]] = []
        if not isinstance(rows, list) or len(rows) > 1000:
            raise DecodeError("the audit service's list of cosigned checkpoints is malformed")
        for r in rows:
            size, names = (r.get("size"), r.get("witnesses")) if isinstance(r, dict) else (None, None)
            if not isinstance(size, int) or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise DecodeError("the audit service's list of cosigned checkpoints is malformed")
            out.append((size, names))
        return out

    async def receipt(self, entry_id: str, size: int | None = None) -> bytes:
        path = f"/v1/log/receipt/{quote(entry_id, safe='')}" + ("" if size is None else f"?size={size}")
        return await self._request("GET", path, MAX_PROOF_BYTES + MAX_ENTRY_BYTES * 2)

    async def post_cosignature(self, data: bytes) -> dict[str, Any]:
        answer = await self._request("POST", "/v1/log/cosignature", MAX_JSON_BYTES, body=data)
        try:
            value = json.loads(answer)
        except ValueError as exc:
            raise DecodeError("the audit service's answer to a cosignature is not JSON") from exc
        return value if isinstance(value, dict) else {}


def _page(body: Mapping[str, Any], path: str) -> EntryPage:
    rows, following = body.get("entries"), body.get("next_start")
    if not isinstance(rows, list) or len(rows) > PAGE or not (following is None or isinstance(following, int)):
        raise DecodeError(f"the audit service's answer to {path} is not a page of entries")
    out = []
    for r in rows:
        index, entry = (r.get("index"), r.get("entry")) if isinstance(r, dict) else (None, None)
        if not isinstance(index, int) or not isinstance(entry, str):
            raise DecodeError(f"the audit service's answer to {path} holds a malformed entry")
        try:
            out.append((index, base64.b64decode(entry, validate=True)))
        except (binascii.Error, ValueError) as exc:
            raise DecodeError(f"the audit service's answer to {path} holds an entry that is not base64") from exc
    return EntryPage(out, following)


async def _read(resp: aiohttp.ClientResponse, limit: int, path: str, *, strict: bool = True) -> bytes:
    """Read at most ``limit`` bytes (``strict``: refuse more; else keep the first ``limit``)."""
    if strict and resp.content_length is not None and resp.content_length > limit:
        raise DecodeError(f"the audit service's answer to {path} is {resp.content_length} bytes, over the "
                          f"{limit}-byte bound for it: refused")  # fmt: skip
    out = bytearray()
    async for chunk in resp.content.iter_chunked(64 * 1024):
        out += chunk
        if len(out) > limit:
            if not strict:
                return bytes(out[:limit])
            raise DecodeError(f"the audit service's answer to {path} is over the {limit}-byte bound for it: refused")
    return bytes(out)


def _refusal(status: int, path: str, body: bytes) -> EvidenceHubError:
    try:
        detail = str(json.loads(body).get("detail", ""))[:300]
    except (ValueError, AttributeError):
        detail = ""
    text = f"the audit service refused {path.split('?')[0]} ({status}){': ' + detail if detail else ''}"
    if status == 404:
        return NotFound(text)
    if status == 403:
        return Forbidden(text)
    if status == 409:
        return Conflict(text)
    if 400 <= status < 500:
        return ValidationFailed(text)
    return AuditServiceUnavailable(text)


class DirectoryLogSource:
    """A copy of the served directory: ``<root>/checkpoint`` and ``<root>/tile/…`` (full replays only)."""

    def __init__(self, root: Path) -> None:
        self._root = root

    @property
    def where(self) -> str:
        return str(self._root)

    def _read(self, relative: str, limit: int) -> bytes:
        path = self._root / relative
        try:
            with path.open("rb") as f:
                data = f.read(limit + 1)
        except FileNotFoundError as exc:
            raise NotFound(f"no {relative} in {self._root}") from exc
        except OSError as exc:
            raise ValidationFailed(f"cannot read {path}: {exc.strerror}") from exc
        if len(data) > limit:
            raise DecodeError(f"{path} is over the {limit}-byte bound for it: refused")
        return data

    async def checkpoint(self, size: int | None = None) -> bytes:
        data = self._read("checkpoint", note.MAX_NOTE_BYTES)
        if size is not None:
            raise NotFound(f"a copy of the log holds only its latest checkpoint, not the one of size {size}")
        return data

    def _tile(self, tile: Tile) -> bytes:
        limit = tile.width * (2 + MAX_ENTRY_BYTES) if tile.is_bundle else tile.width * merkle.HASH_SIZE
        try:
            return self._read(tile.path, limit)
        except NotFound:
            if tile.width == TILE_WIDTH:
                raise
            try:  # the log deletes a partial tile once its full tile exists (tlog-tiles allows it)
                full = self._read(Tile(tile.level, tile.index).path, TILE_WIDTH * (limit // tile.width))
                return partial_of(tile, full)
            except InvalidProof as exc:
                raise NotFound(f"no usable {tile.path} in {self._root}: {exc.detail}") from exc

    async def tile(self, tile: Tile) -> bytes:
        return self._tile(tile)

    async def consistency(self, old: int, new: int) -> list[bytes]:
        try:
            return merkle.consistency_proof(TileNodeReader(new, self._tile), old, new)
        except (InvalidProof, NotFound) as exc:
            raise InvalidProof(f"cannot compute a consistency proof from the copy's tiles: {exc}") from exc

    async def entries(self, query: EntryQuery) -> EntryPage:
        raise ValidationFailed("a copy of the log supports full replays only (no --start/--end/filters)")

    async def cosigned(self) -> list[tuple[int, list[str]]]:
        return []
