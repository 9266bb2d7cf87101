"""``evhub audit replay``'s driver: read the log from a :class:`LogSource`, verify it, re-decide every entry.

Owns the order of the checks and what each establishes (docs/security.md, "What a replay checks"):
1. the latest checkpoint is signed by the log key the auditor gave (never one from the server) → exit 3 if not;
2. with ``quorum``: a checkpoint cosigned by that many of the auditor's witnesses, consistent with the latest;
3. the log only grew from the checkpoint this auditor verified last (kept locally; the first run records it —
   trust on first use): a consistency proof, and in a full replay the entries themselves;
4. full replay: every entry bundle and tile, :class:`CopyCheck`; a range or a filter: the picked entries against
   the tiles, the tiles against the root (:class:`SubsetCheck`), and each answer against the question asked;
5. every entry decoded and re-decided (:func:`redecide`) under ``hub.policy`` as the auditor's keys accept it.
The latest checkpoint is recorded as "last verified" only when nothing in 3 and 4 failed.

Everything found is a :class:`Discrepancy` in the :class:`ReplayReport`; only an untrusted checkpoint or an
unusable source raises. Does not own printing or exports (``audit_cmd``), or what each check means (the cores).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any

from services.audit.checkpoint import Checkpoint, VerifiedCheckpoint, check_consistent, open_checkpoint
from services.audit.integrity import CopyCheck, SubsetCheck, bundles, tiles_for_entries, upper_tiles
from services.audit.note import Verifier
from services.audit.tiles import Tile, tiles_for_size
from services.cli.audit_client import EntryQuery, LogSource
from services.cli.audit_report import Discrepancy, ReplayReport
from services.cli.audit_state import CheckpointState
from services.cli.redecision import Replayed, redecide, undecodable
from services.policy.engine import PolicyEngine
from services.shared import audit_records
from services.shared.avro import AvroCodec
from services.shared.errors import DecodeError, InvalidProof, InvalidSignature, PayloadTooLarge

#: Bundles (with their level-0 tiles) fetched ahead of the one being checked.
WINDOW = 8


@dataclass(frozen=True)
class ReplayOptions:
    log: Verifier
    engine: PolicyEngine
    codec: AvroCodec
    state: CheckpointState | None
    witnesses: Sequence[Verifier] = ()
    quorum: int = 0
    query: EntryQuery = field(default_factory=EntryQuery)


Progress = Callable[[int, int], None]
RowSink = Callable[[Replayed], None]


def _decide(index: int, data: bytes, opts: ReplayOptions, cache: dict[tuple[Any, ...], Any]) -> Replayed:
    try:
        fields = audit_records.decode_entry(opts.codec, data)
    except (DecodeError, PayloadTooLarge) as exc:
        return undecodable(index, exc.detail)
    return redecide(index, fields, opts.engine, cache)


async def replay(source: LogSource, opts: ReplayOptions, *, progress: Progress | None = None,
                 rows: RowSink | None = None) -> ReplayReport:  # fmt: skip
    """Raises:
    InvalidSignature: the checkpoint is not signed by the given log key, or no quorum of witnesses cosigned one.
    Errors of ``source`` (unreachable, refused, malformed answers).
    """
    note = await source.checkpoint()
    latest = open_checkpoint(note, log=opts.log, witnesses=opts.witnesses)
    cp = latest.checkpoint
    report = ReplayReport(origin=cp.origin, size=cp.size, mode="full" if opts.query.is_everything else "subset")
    report.checks["signature"] = f"checkpoint of size {cp.size} signed by {opts.log.name}"
    if opts.quorum:
        await _witnessed(source, opts, latest, report)
    earlier = await _history(source, opts, cp, report)
    sink = rows or (lambda r: None)
    if report.mode == "full":
        await _full(source, opts, cp, earlier, report, progress, sink)
    else:
        await _subset(source, opts, cp, report, progress, sink)
    broken = {"entry-changed", "entry-deleted", "entry-inserted", "bundle-malformed", "tile-changed",
              "tile-malformed", "root-mismatch", "history-rewritten", "log-shrank", "fork"}  # fmt: skip
    if opts.state is not None:
        if broken & set(report.kinds):
            report.checks["recorded"] = "not recorded: the log failed verification"
        else:
            path = opts.state.save(cp.origin, note)
            report.checks["recorded"] = f"checkpoint of size {cp.size} recorded as last verified in {path}"
    return report


async def _witnessed(source: LogSource, opts: ReplayOptions, latest: VerifiedCheckpoint, report: ReplayReport) -> None:
    cp = latest.checkpoint
    trusted = {w.name for w in opts.witnesses}
    if len(latest.cosigned_by) >= opts.quorum:
        witnessed = latest
    else:
        sizes = [s for s, names in await source.cosigned() if s <= cp.size and len(trusted & set(names)) >= opts.quorum]
        if not sizes:
            raise InvalidSignature(f"no checkpoint of {cp.origin} carries cosignatures by {opts.quorum} of the "
                                   f"{len(trusted)} witness(es) you trust")  # fmt: skip
        witnessed = open_checkpoint(await source.checkpoint(max(sizes)), log=opts.log, witnesses=opts.witnesses,
                                    quorum=opts.quorum)  # fmt: skip
        try:
            w = witnessed.checkpoint
            check_consistent(w, cp, await source.consistency(w.size, cp.size) if 0 < w.size < cp.size else [])
        except InvalidProof as exc:
            report.discrepancy(Discrepancy(w.size, "fork", f"the checkpoint of size {w.size} the witnesses cosigned "
                                           f"is not a prefix of the latest one of size {cp.size}: the log forked "
                                           f"({exc.detail})"))  # fmt: skip
    by = ", ".join(f"{name} at {datetime.fromtimestamp(t).isoformat()}" for name, t in witnessed.cosigned_by.items())
    report.checks["witnesses"] = f"size {witnessed.checkpoint.size} cosigned by {by} (quorum {opts.quorum})"
    if witnessed.checkpoint.size < cp.size:
        report.checks["witnesses"] += f"; entries {witnessed.checkpoint.size} to {cp.size - 1} are not witnessed yet"


async def _history(source: LogSource, opts: ReplayOptions, cp: Checkpoint, report: ReplayReport) -> Checkpoint | None:
    if opts.state is None:
        report.checks["history"] = "not checked (no state directory)"
        return None
    found = opts.state.load(cp.origin, opts.log)
    if found is None:
        report.checks["history"] = (f"first run: the checkpoint of size {cp.size} is trusted on first use; later "
                                    "runs check that the log only grew from it")  # fmt: skip
        return None
    earlier = found[0]
    if earlier.size > cp.size:
        report.discrepancy(Discrepancy(cp.size, "log-shrank", f"the log shows size {cp.size}, smaller than the size "
                                       f"{earlier.size} you verified before: entries were removed or you are "
                                       "shown another history"))  # fmt: skip
        return None
    try:
        proof = await source.consistency(earlier.size, cp.size) if 0 < earlier.size < cp.size else []
        check_consistent(earlier, cp, proof)
        report.checks["history"] = f"consistent with the checkpoint of size {earlier.size} you verified before"
    except InvalidProof as exc:
        report.discrepancy(Discrepancy(earlier.size, "history-rewritten", f"the log of size {cp.size} is not an "
                                       f"extension of the one of size {earlier.size} you verified before: its "
                                       f"history was rewritten ({exc.detail})"))  # fmt: skip
    return earlier


async def _fetch_all(source: LogSource, tiles: Sequence[Tile]) -> dict[Tile, bytes]:
    out: dict[Tile, bytes] = {}
    for i in range(0, len(tiles), WINDOW):
        chunk = tiles[i : i + WINDOW]
        for tile, data in zip(chunk, await asyncio.gather(*(source.tile(t) for t in chunk)), strict=True):
            out[tile] = data
    return out


async def _full(source: LogSource, opts: ReplayOptions, cp: Checkpoint, earlier: Checkpoint | None,
                report: ReplayReport, progress: Progress | None, sink: RowSink) -> None:  # fmt: skip
    check = CopyCheck(cp, upper=await _fetch_all(source, upper_tiles(cp.size)), earlier=earlier)
    cache: dict[tuple[Any, ...], Any] = {}
    todo = bundles(cp.size)

    def fetch(b: Tile) -> Awaitable[tuple[bytes, bytes]]:
        return asyncio.gather(source.tile(b), source.tile(Tile(0, b.index, b.width)))

    pending: list[asyncio.Future[tuple[bytes, bytes]]] = []
    try:
        for i in range(len(todo)):
            while len(pending) < WINDOW and i + len(pending) < len(todo):
                pending.append(asyncio.ensure_future(fetch(todo[i + len(pending)])))
            data, tile = await pending.pop(0)
            base = check.position
            entries = check.add(data, tile)
            for j, entry in enumerate(entries or ()):
                replayed = _decide(base + j, entry, opts, cache)
                report.add(replayed)
                sink(replayed)
            if progress is not None:
                progress(check.position, cp.size)
    finally:
        for f in pending:
            f.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
    report.add_findings(check.finish(), check.dropped)
    report.checks["entries"] = f"all {cp.size} entries recomputed into the tree and compared with every stored tile"


def _matches(query: EntryQuery, r: Replayed) -> bool:
    if query.office is not None and r.office != query.office:
        return False
    if query.item is not None and r.item_id != query.item:
        return False
    if query.decision is not None and r.decision != query.decision:
        return False
    at = r.at
    if at is not None and query.since is not None and at < datetime.fromisoformat(query.since):
        return False
    return not (at is not None and query.until is not None and at >= datetime.fromisoformat(query.until))


async def _subset(source: LogSource, opts: ReplayOptions, cp: Checkpoint, report: ReplayReport,
                  progress: Progress | None, sink: RowSink) -> None:  # fmt: skip
    tiles = await _fetch_all(source, [*upper_tiles(cp.size), *(t for t in tiles_for_size(cp.size) if t.level == 0)])
    check = SubsetCheck(cp, tiles)
    cache: dict[tuple[Any, ...], Any] = {}
    root = check.root()
    if root is not None:
        report.add_findings([root])
    end = cp.size if opts.query.end is None else min(opts.query.end, cp.size)
    query = replace(opts.query, end=end)
    start, last = query.start, query.start - 1
    while start < end:
        page = await source.entries(replace(query, start=start))
        indexes = [i for i, _ in page.entries if 0 <= i < cp.size]
        tiles.update(await _fetch_all(source, [t for t in tiles_for_entries(indexes, cp.size) if t not in tiles]))
        for index, data in page.entries:
            if not last < index < end:
                report.discrepancy(Discrepancy(index, "answer-out-of-range", f"the audit service answered entries "
                                               f"{query.start} to {end - 1} with entry {index}, out of order or out of "
                                               "range"))  # fmt: skip
                continue
            last = index
            found = check.entry(index, data)
            if found is not None:
                report.add_findings([found])
            replayed = _decide(index, data, opts, cache)
            if replayed.office and not _matches(query, replayed):
                report.discrepancy(Discrepancy(index, "answer-does-not-match", f"the audit service answered the "
                                               f"filter with entry {index}, which does not match it",
                                               replayed.entry_id))  # fmt: skip
            report.add(replayed)
            sink(replayed)
        if progress is not None:
            progress(last + 1 - query.start, end - query.start)
        if page.next_start is None or page.next_start <= start:
            break
        start = page.next_start
    report.checks["entries"] = (
        f"{report.replayed} entries of {query.start} to {end - 1} checked against the tiles, "
        "the tiles against the signed root (a subset: entries left out cannot be seen)"
    )
