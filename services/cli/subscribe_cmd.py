"""``evhub subscribe --jurisdiction DE --out DIR``: follow an evidence feed as a prosecution office does.

Over mutual TLS with the office's certificate it reads the gateway's feed (Server-Sent Events, resumed with
``Last-Event-ID``; or long-poll pages with ``--transport poll``; ``--once`` reads pages until the gateway says
``caught_up`` and stops), and for every event:
- verifies it itself (``subscription.FeedVerifier``) with the publisher keys *the office* trusts: its own trust
  anchors (``--trust-anchor``) verify the key registry records the gateway serves (``GET /v1/keys``), which are
  kept in DIR so a later answer can never roll a key's history back;
- stores what verified (``subscribe_store``): the envelope as received, the payload decoded from it, the protected
  values received, each content file downloaded and checked against its signed SHA-256 and size (and the gateway's
  ``Repr-Digest``), resumed with a Range request after an interruption; the receipt of every release, refusal
  (``withheld``), redelivery and download; and the cursor — each released event committed with its files before
  the next one is read, so a ``kill -9`` at any moment resumes exactly there;
- reports anything that does not verify loudly (stderr, ``rejected/`` in DIR, the summary) and exits 3 ("untrusted
  data" in ``main``'s terms) when this run met any; the feed goes on past it.

Receipt proofs: :func:`fetch_proofs` and a :class:`ReceiptProver` are the hook for ``evhub audit prove``; proofs
go to ``DIR/proofs/<receipt>.tlog-proof``.

Does not own: verification rules (``subscription``), HTTP details (``gateway_client``), files (``subscribe_store``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Protocol, TypeVar

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, SpinnerColumn, TaskID, TextColumn, TransferSpeedColumn
from rich.table import Table

from services.cli.audit_client import HttpLogSource
from services.cli.client_settings import ClientSettings
from services.cli.gateway_client import GatewayClient, GatewayUnavailable, Page, parse_download_receipt, repr_digest
from services.cli.receipt_proofs import AuditProver, log_verifier
from services.cli.subscribe_store import Batch, SubscriptionStore, to_json_bytes, write_atomically
from services.cli.subscription import (
    REDELIVERY_WINDOW,
    Failure,
    FeedVerifier,
    Outcome,
    Released,
    Tally,
    Withheld,
    content_name_candidates,
    disclosures_document,
    event_document,
    missing_numbers,
    summary,
    version_dir,
)
from services.shared.avro import AvroCodec
from services.shared.durable_files import sync_dir
from services.shared.errors import (
    ConfigurationError,
    DecodeError,
    EvidenceHubError,
    Forbidden,
    InfrastructureError,
    NotFound,
    ValidationFailed,
)
from services.shared.kafka import evidence_topic
from services.shared.keys import PublicKey
from services.shared.principals import principal_from_der
from services.shared.registry import KeyRegistry
from services.shared.settings import read_public_keys
from services.shared.tls import client_context

log = logging.getLogger(__name__)
EXIT_UNTRUSTED: Final = 3
FEED_TYPES: Final = frozenset({"event", "withdrawal", "withheld", "checkpoint"})
POLL_WAIT_S: Final = 25.0
ONCE_WAIT_S: Final = 1.0
KEY_REFRESH_S: Final = 5.0
T = TypeVar("T")


def register(sub: Any) -> None:
    p = sub.add_parser("subscribe", help="follow a jurisdiction's evidence feed as an office: verify, download, keep")
    p.add_argument("--jurisdiction", required=True, help="the feed, e.g. DE")
    p.add_argument("--out", type=Path, required=True, help="the subscription's directory (created; resumed)")
    p.add_argument("--gateway", help="gateway URL (default $EVHUB_CLIENT_GATEWAY_URL or https://127.0.0.1:8444)")
    p.add_argument("--cert", type=Path, help="the office's client certificate (PEM, SAN urn:evhub:office:<ID>)")
    p.add_argument("--key", type=Path, help="its private key (PEM)")
    p.add_argument("--ca", type=Path, help="the CA that signed the gateway's certificate")
    p.add_argument("--trust-anchor", type=Path, action="append", default=[], metavar="PEM",
                   help="a publisher trust anchor (public key) this office trusts (repeatable; default "
                        "$EVHUB_CLIENT_TRUST_ANCHOR_FILES)")  # fmt: skip
    p.add_argument("--purpose", help="the declared purpose of the reads, e.g. prosecution")
    p.add_argument("--once", action="store_true", help="read (long-poll pages) until caught up, then stop")
    p.add_argument("--transport", choices=("sse", "poll"), default="sse", help="how to follow (default sse)")
    p.add_argument("--max", type=int, default=100, help="events per page (1-500, default 100)")
    p.add_argument("--give-up-after", type=float, metavar="S",
                   help="stop with exit 4 when the gateway has been unavailable this long (default: 120 with --once, "
                        "never when following)")  # fmt: skip
    p.add_argument("--log-key", metavar="VKEY",
                   help="the audit log's verifier key (name+id+key, or @FILE), given by its operator out of band: "
                        "with it, the inclusion proof of every receipt is fetched from the audit service once a "
                        "checkpoint covers it, verified, and kept in DIR/proofs")  # fmt: skip
    p.add_argument("--audit", metavar="URL", help="the audit service (default $EVHUB_CLIENT_AUDIT_URL or "
                   "https://127.0.0.1:8083); used with --log-key")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    p.set_defaults(handler=run_subscribe)


@dataclass(frozen=True)
class Options:
    jurisdiction: str
    out: Path
    gateway: str
    tls: Any  # ssl.SSLContext
    office: str
    anchors: list[PublicKey]
    purpose: str | None = None
    once: bool = False
    transport: str = "sse"
    max_events: int = 100
    give_up_after_s: float | None = None
    progress: bool = False
    #: While following, how often to ask the audit log for the proofs of receipts held (with a prover).
    proof_interval_s: float = 30.0


@dataclass(frozen=True)
class Result:
    summary: dict[str, Any]
    exit_code: int


class ReceiptProver(Protocol):
    """Turns a receipt into its ``c2sp.org/tlog-proof@v1`` inclusion proof, verified against the audit log's key —
    or None while no checkpoint covers the entry yet. (``evhub audit prove`` implements it.)"""

    async def prove(self, receipt: str) -> bytes | None: ...


async def fetch_proofs(store: SubscriptionStore, prover: ReceiptProver) -> int:
    """Fetch and keep (``DIR/proofs/<receipt>.tlog-proof``) the proofs of receipts that have none yet. Returns how
    many were stored; receipts not yet covered by a checkpoint are tried again next time."""
    stored = 0
    for receipt in store.receipts_without_proof():
        proof = await prover.prove(receipt)
        if proof is not None:
            store.save_proof(receipt, proof)
            stored += 1
    return stored


async def _prove_meanwhile(store: SubscriptionStore, prover: ReceiptProver, stop: asyncio.Event,
                           every_s: float) -> None:  # fmt: skip
    """While following: fetch proofs every ``every_s``. An unreachable audit service is tried again next time; a
    proof that does not verify ends the subscription (raised)."""
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)
        if stop.is_set():
            return
        try:
            await fetch_proofs(store, prover)
        except InfrastructureError as exc:
            log.warning("receipt proofs: %s (tried again in %.0f s)", exc.detail, every_s)


def office_of(cert: Path) -> str:
    """The office a client certificate names (its one ``urn:evhub:office:`` SAN URI).

    Raises:
        ConfigurationError: unreadable, or naming no office.
    """
    try:
        der = x509.load_pem_x509_certificate(cert.read_bytes()).public_bytes(Encoding.DER)
        principal = principal_from_der(der)
    except (OSError, ValueError, Forbidden) as exc:
        raise ConfigurationError(f"{cert}: not a certificate naming an office ({exc})") from exc
    if principal.kind != "office":
        raise ConfigurationError(f"{cert} names {principal.uri}, not an office")
    return principal.name


def _sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


class Subscriber:
    """One run of a subscription: reads, verifies, stores, commits."""

    def __init__(self, *, options: Options, client: GatewayClient, store: SubscriptionStore, codec: AvroCodec,
                 progress: Progress | None, err: Console) -> None:  # fmt: skip
        self.o, self.client, self.store, self.err = options, client, store, err
        self.topic = evidence_topic(options.jurisdiction)
        self.registry = KeyRegistry(codec, anchors=options.anchors)
        self._keys_seen: set[str] = set()
        for data in store.key_records():  # what this office accepted before: a newer answer cannot roll it back
            self.registry.apply(data)
            self._keys_seen.add(hashlib.sha256(data).hexdigest())
        self.verifier = FeedVerifier(codec=codec, keys=self.registry, topic=self.topic,
                                     tracker=store.tracker(window=REDELIVERY_WINDOW))  # fmt: skip
        self.batch, self.run = Batch(), Tally()
        self.caught_up: bool | None = None
        self.key_records_refused = 0
        self._keys_at = 0.0
        self._progress = progress
        self._feed_task: TaskID | None = progress.add_task("", total=None) if progress is not None else None
        self._unavailable_since: float | None = None

    # --- keys ------------------------------------------------------------------------------------------------------

    async def sync_keys(self) -> int:
        """Apply the key records the gateway serves that this office's anchors accept; keep them. Returns how many
        were new. A record the anchors refuse (or an older revision) is counted and ignored."""
        records = await self._retrying(self.client.key_records)
        self._keys_at = time.monotonic()
        new = []
        for data in records:
            digest = hashlib.sha256(data).hexdigest()
            if digest in self._keys_seen:
                continue
            self._keys_seen.add(digest)
            try:
                self.registry.apply(data)
            except EvidenceHubError as exc:
                self.key_records_refused += 1
                self.err.print(f"[yellow]a key record from the gateway was refused by this office's anchors: "
                               f"{exc.detail}")  # fmt: skip
                continue
            new.append((digest, data))
        self.store.add_key_records(new)
        return len(new)

    # --- events ----------------------------------------------------------------------------------------------------

    async def handle(self, events: list[Any], *, received_at: datetime) -> None:
        """Verify, store and count ``events`` (which arrived at ``received_at``), in order."""
        for raw in events:
            if isinstance(raw, dict) and raw.get("type") in ("event", "withdrawal"):
                await self.flush()  # a released event is committed alone, with its files (see the module docstring)
            outcome = self.verifier.check(raw, received_at=received_at)
            stale_keys = isinstance(outcome, Failure) and outcome.untrusted_key and time.monotonic() - self._keys_at > 1
            if stale_keys and await self.sync_keys():  # a key registered after this office last fetched the records
                outcome = self.verifier.check(raw, received_at=received_at)
            await self._apply(outcome)
            self._show()

    async def _apply(self, outcome: Outcome) -> None:
        batch = self.batch
        if isinstance(outcome, Released) and outcome.new:
            await self._store_released(outcome)
        elif isinstance(outcome, Released | Withheld):
            kind = "redelivery" if isinstance(outcome, Released) else "withheld"
            position = (outcome.topic, outcome.partition, outcome.offset) if isinstance(outcome, Released) else None
            row = self._receipt_row(outcome.receipt, kind, outcome.audit.model_dump(), outcome.received_at,
                                    position=position)  # fmt: skip
            batch.receipts.append(row)
        elif isinstance(outcome, Failure):
            self._refuse(outcome.reason, outcome.position, outcome.raw, outcome.cursor)
        batch.tally.record(outcome)
        if outcome.cursor is not None:
            batch.cursor = outcome.cursor

    def _receipt_row(self, receipt: str, kind: str, audit: dict[str, Any], at: datetime, *,
                     position: tuple[str, int, int] | None = None, item_id: str | None = None,
                     sha256: str | None = None) -> tuple[Any, ...]:  # fmt: skip
        topic, part, off = position or (None, None, None)
        return (receipt, kind, topic, part, off, item_id, sha256, audit["topic"], audit["partition"], audit["offset"],
                audit["index"], at.isoformat())  # fmt: skip

    def _refuse(self, reason: str, position: tuple[str, int, int] | None, raw: Any, cursor: str | None) -> None:
        at = datetime.now(UTC)
        body = json.dumps(raw, sort_keys=True, default=str).encode()
        path = self.store.root / "rejected" / f"{at:%Y%m%dT%H%M%S%f}-{hashlib.sha256(body).hexdigest()[:8]}.json"
        write_atomically(path, to_json_bytes({"reason": reason, "position": position, "at": at.isoformat(),
                                              "event": raw}))  # fmt: skip
        where = "/".join(map(str, position)) if position else "?"
        self.batch.failures.append((at.isoformat(), reason, cursor, where, str(path.relative_to(self.store.root))))
        self.err.print(f"[bold red]REFUSED[/] {self.o.jurisdiction} {where}: {reason} (kept in {path})")

    async def _store_released(self, r: Released) -> None:
        position = (r.topic, r.partition, r.offset)
        base = self.store.item_dir(r.item_id) / version_dir(r.kind, r.version)
        holder = self.store.path_holder(base)
        if holder is not None and holder != position:  # another signed event with this item and version
            base = base.with_name(f"{base.name}-p{r.partition}-o{r.offset}")
        write_atomically(base / "envelope.avro", r.envelope)
        write_atomically(base / f"{r.kind}.json", to_json_bytes(event_document(r)))
        if r.kind == "event":
            write_atomically(base / "disclosures.json", to_json_bytes(disclosures_document(r)))
            for row in await self._contents(r, base):
                self.batch.contents.append(row)
        v = r.verified
        self.batch.items.append((r.topic, r.partition, r.offset, r.kind, r.item_id, r.version, v.record["event_id"],
                                 v.key_id, v.sequence, str(base.relative_to(self.store.root)), r.receipt, int(r.late),
                                 r.received_at.isoformat()))  # fmt: skip
        self.batch.receipts.append(self._receipt_row(r.receipt, r.kind, r.audit.model_dump(), r.received_at,
                                                     position=position, item_id=r.item_id))  # fmt: skip

    async def _contents(self, r: Released, base: Path) -> list[tuple[Any, ...]]:
        rows, taken = [], set()
        for c in r.verified.record["content"]:
            sha256, size = str(c["sha256"]), int(c["size"])
            name = next(n for n in content_name_candidates(str(c["file_name"]), sha256) if n.casefold() not in taken)
            taken.add(name.casefold())
            final = base / "content" / name
            status = await self._download(r, sha256, size, final)
            rows.append((r.topic, r.partition, r.offset, sha256, str(final.relative_to(self.store.root)),
                         size if status == "verified" else None, status, None))  # fmt: skip
            if status == "verified":
                self.batch.tally.content(size=size)
            elif status == "refused":
                self.batch.tally.content(size=None)
        return rows

    async def _download(self, r: Released, sha256: str, size: int, final: Path) -> str:
        """Fetch one content file into ``final`` (resuming a partial ``.part``), checked against the signed digest
        and size. Returns ``verified``, ``refused`` (the gateway answered 403/404: e.g. the item was withdrawn) or
        ``failed`` (the bytes are not the signed ones: reported, nothing kept)."""
        position = (r.topic, r.partition, r.offset)
        if final.is_file() and final.stat().st_size == size and _sha256_of(final) == sha256:
            return "verified"  # stored before an interruption, not yet committed
        part = final.with_name(f".{final.name}.part")
        part.parent.mkdir(parents=True, exist_ok=True)
        restarts = 0
        while True:
            have = part.stat().st_size if part.exists() else 0
            if have > size or restarts > 3:
                part.unlink(missing_ok=True)
                have = 0
            try:
                response = await self.client.content(r.item_id, sha256, offset=have)
            except (NotFound, Forbidden) as exc:
                part.unlink(missing_ok=True)
                self.err.print(f"[yellow]{r.item_id}: content {sha256[:12]}… refused by the gateway ({exc.detail})")
                return "refused"
            except InfrastructureError as exc:
                await self._wait(exc)
                continue
            try:
                claimed = repr_digest(response.headers)
                if claimed is not None and claimed != sha256:
                    self._refuse(f"the gateway's Repr-Digest names other content than the signed {sha256}", position,
                                 {"item_id": r.item_id, "repr_digest": claimed}, None)  # fmt: skip
                    self.batch.tally.counts["failures"] += 1
                    return "failed"
                if response.status == 416 or (response.status == 206 and not response.headers.get(
                        "Content-Range", "").startswith(f"bytes {have}-")):  # fmt: skip
                    part.unlink(missing_ok=True)
                    restarts += 1
                    continue
                if response.status == 200:
                    have = 0
                receipt = parse_download_receipt(response.headers)
                if receipt is not None:
                    audit = dict(zip(("topic", "partition", "offset", "index"), receipt.audit, strict=True))
                    self.batch.receipts.append(self._receipt_row(receipt.receipt, "download", audit, datetime.now(UTC),
                                                                 position=position, item_id=r.item_id,
                                                                 sha256=sha256))  # fmt: skip
                complete = await self._write_part(response, part, have=have, size=size)
            except (aiohttp.ClientError, TimeoutError) as exc:
                await self._wait(GatewayUnavailable(f"{self.client.url}: download interrupted ({exc!r})"))
                continue
            finally:
                response.release()
            self._unavailable_since = None
            if not complete:
                continue  # the connection ended early: resume from what arrived
            if part.stat().st_size != size or _sha256_of(part) != sha256:
                part.unlink(missing_ok=True)
                self._refuse(f"content {sha256} does not match its signed SHA-256 and size", position,
                             {"item_id": r.item_id, "sha256": sha256}, None)  # fmt: skip
                self.batch.tally.counts["failures"] += 1
                return "failed"
            part.replace(final)
            sync_dir(final.parent)
            return "verified"

    async def _write_part(self, response: aiohttp.ClientResponse, part: Path, *, have: int, size: int) -> bool:
        """Append the body to ``part`` (fsynced); True once ``size`` bytes are there. More bytes than the signed size
        are never written."""
        task = self._progress.add_task(f"  {part.name[1:-5]}", total=size, completed=have) if self._progress else None
        try:
            with part.open("r+b" if have else "wb") as f:
                f.seek(have)
                f.truncate()
                async for chunk in response.content.iter_chunked(1 << 20):
                    chunk = chunk[: size - have]
                    f.write(chunk)
                    have += len(chunk)
                    if self._progress is not None and task is not None:
                        self._progress.update(task, completed=have)
                    if have >= size:
                        break
                f.flush()
                os.fsync(f.fileno())
        finally:
            if self._progress is not None and task is not None:
                self._progress.remove_task(task)
        return have >= size

    async def flush(self) -> None:
        """Commit what is pending — with the sequence state it implies — in one transaction."""
        if not self.batch:
            return
        self.store.commit(self.batch, sequences=self.verifier.tracker.take_dirty())
        self.run.merge(self.batch.tally)
        self.batch = Batch()

    def _show(self) -> None:
        if self._progress is None or self._feed_task is None:
            return
        c = self.run.counts + self.batch.tally.counts
        self._progress.update(self._feed_task, description=(
            f"{self.o.office} ← {self.o.jurisdiction}: {c['events']} events, {c['withdrawals']} withdrawals, "
            f"{c['withheld']} withheld, {c['content_files']} files"
            + (f", [red]{c['failures']} refused" if c["failures"] else "")))  # fmt: skip

    # --- reading the feed ------------------------------------------------------------------------------------------

    async def _wait(self, exc: InfrastructureError) -> None:
        """Back off after the gateway was unavailable; give up (re-raise) past ``give_up_after_s``."""
        now = time.monotonic()
        self._unavailable_since = self._unavailable_since or now
        limit = self.o.give_up_after_s
        if limit is not None and now - self._unavailable_since > limit:
            raise exc
        delay = exc.retry_after if isinstance(exc, GatewayUnavailable) and exc.retry_after is not None else 1.0
        self.err.print(f"[yellow]{exc.detail}; retrying in {delay:.0f}s")
        await asyncio.sleep(min(delay, 30.0))

    async def _retrying(self, call: Callable[[], Awaitable[T]]) -> T:
        while True:
            try:
                result = await call()
            except InfrastructureError as exc:
                await self._wait(exc)
                continue
            self._unavailable_since = None
            return result

    async def poll(self, stop: asyncio.Event) -> None:
        """Long-poll pages until stopped (or, with ``once``, until a page says ``caught_up``)."""
        wait_s = 0.0 if self.o.once else POLL_WAIT_S
        while not stop.is_set():
            cursor = self.store.cursor()

            def next_page(cursor: str | None = cursor, wait_s: float = wait_s) -> Awaitable[Page]:
                return self.client.page(cursor, limit=self.o.max_events, wait_s=wait_s)

            page = await self._retrying(next_page)
            await self.handle(page.events, received_at=page.received_at)
            self.batch.cursor = page.cursor  # the page may have moved past records that produced no event
            await self.flush()
            self.caught_up = page.caught_up
            if self.o.once:
                if page.caught_up:
                    return
                # the gateway is still verifying records: wait (a little) for them rather than asking at once
                wait_s = 0.0 if page.events else ONCE_WAIT_S

    async def stream(self, stop: asyncio.Event) -> None:
        """Follow the Server-Sent Events stream until stopped, reconnecting with ``Last-Event-ID``."""
        while not stop.is_set():
            try:
                async for messages, received_at in self.client.stream(self.store.cursor(), limit=self.o.max_events):
                    events: list[Any] = []
                    for m in messages:
                        if m.event in FEED_TYPES:
                            try:
                                events.append(json.loads(m.data))
                            except ValueError:
                                events.append({"type": m.event, "undecodable": m.data[:500]})
                    await self.handle(events, received_at=received_at)
                    await self.flush()
                    self._unavailable_since = None
            except (InfrastructureError, DecodeError) as exc:
                await self._wait(exc if isinstance(exc, InfrastructureError) else GatewayUnavailable(exc.detail))
                continue
            await asyncio.sleep(0.5)  # the gateway ended the stream: reconnect

    def result(self) -> Result:
        meta = {"jurisdiction": self.o.jurisdiction, "office": self.o.office, "gateway": self.client.url,
                "dir": str(self.store.root), "cursor_saved": self.store.cursor() is not None,
                "key_records_refused": self.key_records_refused}  # fmt: skip
        body = summary(meta=meta, total=self.store.total, run=self.run,
                       missing=missing_numbers(self.verifier.tracker, self.topic), caught_up=self.caught_up,
                       failures=self.store.failures())  # fmt: skip
        return Result(body, EXIT_UNTRUSTED if self.run.counts["failures"] else 0)


async def subscribe(options: Options, *, err: Console | None = None, prover: ReceiptProver | None = None) -> Result:
    """One run of ``evhub subscribe`` (the demo calls this too). Stops at the end of the feed with ``once``,
    else on SIGINT/SIGTERM; the state is committed either way.

    Raises:
        InvalidCursor, Forbidden, NotFound, ValidationFailed: the gateway refused the subscription (exit 2).
        InfrastructureError: the gateway stayed unavailable past ``give_up_after_s`` (exit 4).
        Conflict / ConfigurationError / StoreUnavailable: the directory is in use, another subscription's, broken.
    """
    err = err or Console(stderr=True, soft_wrap=True)
    topic = evidence_topic(options.jurisdiction)
    meta = {"jurisdiction": options.jurisdiction, "office": options.office, "topic": topic}
    store = SubscriptionStore(options.out, meta=meta)
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                        TransferSpeedColumn(), console=err, transient=True) if options.progress else None  # fmt: skip
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        async with GatewayClient(url=options.gateway, ssl_context=options.tls, jurisdiction=options.jurisdiction,
                                 purpose=options.purpose) as client:  # fmt: skip
            subscriber = Subscriber(options=options, client=client, store=store, codec=AvroCodec.load(),
                                    progress=progress, err=err)  # fmt: skip
            with progress if progress is not None else contextlib.nullcontext():
                await subscriber.sync_keys()
                polling = options.once or options.transport == "poll"
                follow = subscriber.poll(stop) if polling else subscriber.stream(stop)
                task = asyncio.ensure_future(follow)
                stopped = asyncio.ensure_future(stop.wait())
                proving = (asyncio.ensure_future(_prove_meanwhile(store, prover, stop, options.proof_interval_s))
                           if prover is not None and not polling else None)  # fmt: skip
                try:
                    await asyncio.wait([task, stopped, *([proving] if proving else [])],
                                       return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
                finally:
                    stopped.cancel()
                    for t in (task, proving):
                        if t is not None and not t.done():
                            t.cancel()  # safe at any point: files are atomic, rows commit together
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    if proving is not None and proving.cancelled():
                        with contextlib.suppress(asyncio.CancelledError):
                            await proving
                if proving is not None and proving.done() and not proving.cancelled():
                    proving.result()  # raises what a proof that did not verify raised
                await subscriber.flush()
            if prover is not None:
                await fetch_proofs(store, prover)
            result = subscriber.result()
            result.summary["proofs"] = store.proof_counts()
            return result
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        store.close()


async def run_subscribe(args: argparse.Namespace) -> int:
    overrides = {k: v for k, v in {"cert": args.cert, "key": args.key, "ca": args.ca,
                                   "gateway_url": args.gateway}.items() if v is not None}  # fmt: skip
    settings = ClientSettings(**overrides)
    files = settings.cert_files()
    if not 1 <= args.max <= 500:
        raise ValidationFailed("--max must be between 1 and 500")
    try:
        evidence_topic(args.jurisdiction)
    except ConfigurationError as exc:
        raise ValidationFailed(f"--jurisdiction: {exc.detail}") from exc
    anchors = read_public_keys(args.trust_anchor or settings.trust_anchor_files, what="trust anchor",
                               env="--trust-anchor or EVHUB_CLIENT_TRUST_ANCHOR_FILES")  # fmt: skip
    give_up = args.give_up_after if args.give_up_after is not None else (120.0 if args.once else None)
    out = Console()
    err = Console(stderr=True, soft_wrap=True)
    options = Options(jurisdiction=args.jurisdiction, out=args.out, gateway=settings.gateway_url,
                      tls=client_context(files), office=office_of(files.cert), anchors=anchors, purpose=args.purpose,
                      once=args.once, transport=args.transport, max_events=args.max, give_up_after_s=give_up,
                      progress=err.is_terminal and not args.json)  # fmt: skip
    if args.log_key is None:
        result = await subscribe(options, err=err)
    else:
        log_key = log_verifier(args.log_key)
        async with HttpLogSource(url=args.audit or settings.audit_url, ssl_context=options.tls) as source:
            result = await subscribe(options, err=err, prover=AuditProver(source=source, log_key=log_key))
    if args.json:
        print(json.dumps(result.summary, indent=2, ensure_ascii=False))
    else:
        print_summary(out, result.summary)
    return result.exit_code


def print_summary(console: Console, s: dict[str, Any]) -> None:
    run, total, seq = s["this_run"], s["total"], s["sequence"]
    table = Table("", "this run", "in total", title=f"{s['office']} ← {s['jurisdiction']} feed, kept in {s['dir']}")
    for key, label in (("events", "events (new versions)"), ("withdrawals", "withdrawals"),
                       ("withheld", "withheld (receipts of refusals)"), ("late", "released after an embargo"),
                       ("redelivered", "redelivered (same signed event again)"), ("content_files", "files verified"),
                       ("content_bytes", "bytes verified"), ("content_refused", "files refused by the gateway"),
                       ("failures", "[red]failed verification[/red]")):  # fmt: skip
        table.add_row(label, f"{run[key]:,}", f"{total[key]:,}")
    console.print(table)
    disclosed = ", ".join(f"{k} x{v}" for k, v in total["disclosed"].items()) or "none"
    withheld = ", ".join(f"{k} x{v}" for k, v in total["withheld_fields"].items()) or "none"
    console.print(f"protected values received: {disclosed}; withheld: {withheld}")
    console.print(f"sequence numbers missing below the highest received: {seq['missing']} "
                  f"(records withheld: {seq['withheld_records']}; unexplained: {seq['unexplained']})")  # fmt: skip
    if s["verified"]:
        console.print("[green]every signature, disclosure and content digest received in this run verified[/green]")
    else:
        console.print(f"[bold red]{run['failures']} record(s) failed verification[/bold red]: see {s['dir']}/rejected")
    if "proofs" in s and (s["proofs"]["kept"] or s["proofs"]["awaiting"]):
        console.print(f"receipt proofs kept in {s['dir']}/proofs: {s['proofs']['kept']:,} "
                      f"(awaiting a checkpoint: {s['proofs']['awaiting']:,})")  # fmt: skip
    if s["caught_up"]:
        console.print("caught up with the feed")
