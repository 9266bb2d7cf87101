"""The audit service's read side over HTTP: the log served statically, queries, proofs and receipts.

Routes (every one but the probes needs a client certificate naming a hub principal):
    GET /healthz                          200 while the log runs (size, counters, why integration is stopped)
    GET /readyz                           200 only if a checkpoint at most ``max_checkpoint_age_s`` old exists
    GET /v1/log/checkpoint[?size=]        the latest checkpoint (C2SP signed note), or the one signed at a size,
                                          with the witness cosignatures the log accepted for it
    POST /v1/log/cosignature              a checkpoint of this log carrying cosignatures by configured witnesses
    GET /v1/log/cosigned                  the newest sizes that carry cosignatures, with the witnesses' names
    GET /v1/log/tile/<L>/<N>[.p/<W>]      tiles (hashes only): any principal
    GET /v1/log/tile/entries/<N>[.p/<W>]  entry bundles: auditors only (entries name offices and items)
    GET /v1/log/entries?start=&end=&office=&item=&decision=&since=&until=&limit=
    GET /v1/log/entries/{entry_id}
    GET /v1/log/proof/inclusion?index=|entry_id=[&size=]
    GET /v1/log/proof/consistency?from=&to=
    GET /v1/log/receipt/{entry_id}[?size=]  a c2sp.org/tlog-proof@v1 (the entry's bytes in its ``extra`` line)

Cosignatures (c2sp.org/tlog-cosignature) come from witnesses that pull checkpoints (``evhub audit witness``): a
posted note must be a checkpoint this log signed at that size, byte for byte, and carry at least one cosignature
by a witness in ``WITNESS_KEYS`` that verifies; those are kept, other signatures ignored. Any authenticated
principal may post (the cosignature is the credential), as tlog-witness has no authentication beyond signatures.

Access: an auditor sees and proves everything; an office only its own entries (another office's entry is
"not found" by id and "forbidden" by index). Tiles and checkpoints reveal only hashes and are served to any
authenticated principal. Nothing beyond the latest committed checkpoint is ever served.

Does not own: the tree (``tiles``/``merkle``), storage (``tilestore``/``index``), integration (``integrator``).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final, TypeVar

from aiohttp import web

from services.audit import merkle, note
from services.audit.checkpoint import Checkpoint, TlogProof
from services.audit.index import EntryQuery, LogIndex
from services.audit.integrator import Integrator, LogView
from services.audit.log import IndexedEntry, micros
from services.audit.note import Verifier
from services.audit.settings import AuditSettings
from services.audit.tiles import (
    ENTRIES,
    TILE_HEIGHT,
    TILE_WIDTH,
    Tile,
    TileNodeReader,
    bundle_entries,
    parse_path,
    partial_of,
)
from services.audit.tilestore import TileStore
from services.shared.errors import (
    Conflict,
    DecodeError,
    Forbidden,
    InfrastructureError,
    InvalidProof,
    NotFound,
    PayloadTooLarge,
    StoreUnavailable,
    ValidationFailed,
)
from services.shared.principals import Principal, principal_from_der

INTEGRATOR = web.AppKey("audit_integrator", Integrator)
INDEX: web.AppKey[LogIndex] = web.AppKey("audit_index")
TILES: web.AppKey[TileStore] = web.AppKey("audit_tiles")
SETTINGS = web.AppKey("audit_settings", AuditSettings)
FAILURE = web.AppKey("audit_failure", list[str])
LOG_KEY: web.AppKey[Verifier] = web.AppKey("audit_log_key")
WITNESSES: web.AppKey[list[Verifier]] = web.AppKey("audit_witnesses")
CLOCK: web.AppKey[Any] = web.AppKey("audit_clock")

T = TypeVar("T")
EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
IMMUTABLE: Final = "public, max-age=31536000, immutable"
DECISIONS: Final = ("RELEASED", "REFUSED", "UNKNOWN")


def principal(request: web.Request) -> Principal:
    """Raises: Forbidden without a verified client certificate naming exactly one hub principal."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    der = ssl_object.getpeercert(binary_form=True) if isinstance(ssl_object, ssl.SSLObject) else None
    if not der:
        raise Forbidden("a client certificate naming a hub principal is required")
    return principal_from_der(der)


def _view(request: web.Request) -> LogView:
    failure = request.app[FAILURE]
    if failure:
        raise InfrastructureError(f"the audit log stopped: {failure[0]}")
    return request.app[INTEGRATOR].view


def _opt_int(request: web.Request, name: str, *, minimum: int = 0) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return None
    if not raw.isascii() or not raw.isdigit() or len(raw) > 19 or int(raw) < minimum:
        raise ValidationFailed(f"{name} must be an integer ≥ {minimum}, not {raw[:30]!r}")
    return int(raw)


def _int(request: web.Request, name: str, default: int, *, minimum: int = 0) -> int:
    value = _opt_int(request, name, minimum=minimum)
    return default if value is None else value


def _micros(request: web.Request, name: str) -> int | None:
    raw = request.query.get(name)
    if not raw:
        return None
    try:
        at = datetime.fromisoformat(raw)
    except ValueError as exc:
        raise ValidationFailed(f"{name} is not an ISO 8601 time: {raw[:40]!r}") from exc
    if at.tzinfo is None:
        raise ValidationFailed(f"{name} must carry a time zone, e.g. 2026-01-31T12:00:00Z")
    return micros(at)


def _size(request: web.Request, view: LogView, name: str = "size") -> int:
    size = _int(request, name, view.size)
    if size > view.size:
        raise NotFound(f"{name} {size} is beyond the latest checkpoint (size {view.size})")
    return size


async def healthz(request: web.Request) -> web.Response:
    view = _view(request)
    integrator = request.app[INTEGRATOR]
    return web.json_response({"status": "ok" if integrator.stalled is None else "stalled", "size": view.size,
                              "dead_letters": view.dead_letters, "duplicates": view.duplicates,
                              "stalled": integrator.stalled})  # fmt: skip


async def readyz(request: web.Request) -> web.Response:
    view = _view(request)
    integrator = request.app[INTEGRATOR]
    if integrator.stalled is not None:
        raise InfrastructureError(f"integration is stopped: {integrator.stalled}")
    age = request.app[CLOCK]() - view.signed_at
    limit = request.app[SETTINGS].max_checkpoint_age_s
    if age > limit:
        raise InfrastructureError(f"the latest checkpoint is {age:.1f}s old (limit {limit:g}s)")
    return web.json_response({"status": "ready", "size": view.size, "checkpoint_age_s": round(age, 3)})


async def checkpoint(request: web.Request) -> web.Response:
    principal(request)
    view = _view(request)
    size = _opt_int(request, "size")
    body = view.checkpoint
    if size is not None and size != view.size:
        found = await asyncio.to_thread(request.app[INDEX].checkpoint_at, _size(request, view))
        if found is None:
            raise NotFound(f"the log signed no checkpoint of size {size}")
        body = found
    return web.Response(body=body, content_type="text/plain", charset="utf-8",
                        headers={"Cache-Control": "no-cache"})  # fmt: skip


async def cosignature(request: web.Request) -> web.Response:
    """Accept witness cosignatures of a checkpoint this log signed (see the module docstring)."""
    principal(request)
    view = _view(request)
    if request.content_length is not None and request.content_length > note.MAX_NOTE_BYTES:
        raise PayloadTooLarge(f"a cosigned checkpoint is at most {note.MAX_NOTE_BYTES} bytes")
    body = await request.content.read(note.MAX_NOTE_BYTES + 1)
    if len(body) > note.MAX_NOTE_BYTES:
        raise PayloadTooLarge(f"a cosigned checkpoint is at most {note.MAX_NOTE_BYTES} bytes")
    log_key, witnesses = request.app[LOG_KEY], request.app[WITNESSES]
    parsed, verified = note.open_note(body, [log_key, *witnesses])
    cp = Checkpoint.parse(parsed.text)
    if cp.origin != log_key.name or not any(s.name == log_key.name and s.key_id == log_key.key_id for s in verified):
        raise Forbidden("not a checkpoint signed by this log")
    ids = {(w.name, w.key_id) for w in witnesses}
    cosigs = [s for s in verified if (s.name, s.key_id) in ids]
    if not cosigs:
        raise Forbidden("no cosignature by a witness this log is configured to accept")
    if cp.size > view.size:
        raise NotFound(f"size {cp.size} is beyond the latest checkpoint (size {view.size})")
    signed = await asyncio.to_thread(request.app[INDEX].checkpoint_at, cp.size)
    if signed is None:
        raise NotFound(f"the log signed no checkpoint of size {cp.size}")
    if note.parse(signed).text != parsed.text:
        raise Conflict(f"this log signed another checkpoint of size {cp.size}")
    updated = await asyncio.to_thread(request.app[INDEX].add_cosignatures, cp.size, cosigs)
    if updated is not None:
        await request.app[INTEGRATOR].attach_cosignatures(cp.size, updated)
    return web.json_response({"size": cp.size, "witnesses": sorted({s.name for s in cosigs})})


async def cosigned(request: web.Request) -> web.Response:
    principal(request)
    _view(request)
    rows = await asyncio.to_thread(request.app[INDEX].cosigned, 100)
    return web.json_response({"checkpoints": [{"size": size, "witnesses": names} for size, names in rows]})


def _covered(tile: Tile, size: int) -> bool:
    """Whether the latest checkpoint covers every hash (or entry) of ``tile``."""
    level = 0 if tile.level == ENTRIES else tile.level
    return tile.index * TILE_WIDTH + tile.width <= size >> (TILE_HEIGHT * level)


async def tile(request: web.Request) -> web.Response:
    who = principal(request)
    view = _view(request)
    try:
        wanted = parse_path("tile/" + request.match_info["path"])
    except DecodeError as exc:
        raise NotFound("no such tile") from exc
    if wanted.level == ENTRIES and who.kind != "auditor":
        raise Forbidden("entry bundles are for auditors: they name every office's reads")
    if not _covered(wanted, view.size):
        raise NotFound(f"{wanted.path} is not covered by the latest checkpoint")
    data = await _prove(read_tile, request.app[TILES], wanted)
    return web.Response(body=data, content_type="application/octet-stream", headers={"Cache-Control": IMMUTABLE})


def read_tile(tiles: TileStore, tile: Tile) -> bytes:
    """A tile or bundle; a partial one deleted since (its full tile was committed) is cut from the full one, so a
    reader holding an older checkpoint, or one racing an integration, still gets it.

    Raises:
        NotFound: neither exists.
    """
    try:
        return tiles.read(tile)
    except NotFound:
        if tile.width == TILE_WIDTH:
            raise
        return partial_of(tile, tiles.read(Tile(tile.level, tile.index)))


def _entry_bytes(tiles: TileStore, size: int, indexes: list[int]) -> dict[int, bytes]:
    bundles: dict[int, list[bytes]] = {}
    out = {}
    for i in indexes:
        n = i // TILE_WIDTH
        if n not in bundles:
            width = TILE_WIDTH if (n + 1) * TILE_WIDTH <= size else size % TILE_WIDTH
            bundle = Tile(ENTRIES, n, width)
            bundles[n] = bundle_entries(read_tile(tiles, bundle), bundle)
        out[i] = bundles[n][i % TILE_WIDTH]
    return out


def _entry_json(e: IndexedEntry, data: bytes) -> dict[str, Any]:
    return {"index": e.index, "entry_id": e.entry_id, "office": e.office, "item_id": e.item_id,
            "decision": e.decision, "at": (EPOCH + timedelta(microseconds=e.at_us)).isoformat(),
            "action": e.action, "jurisdiction": e.jurisdiction,
            "leaf_hash": base64.b64encode(merkle.leaf_hash(data)).decode(),
            "entry": base64.b64encode(data).decode()}  # fmt: skip


async def entries(request: web.Request) -> web.Response:
    who = principal(request)
    view = _view(request)
    settings = request.app[SETTINGS]
    office = request.query.get("office") or None
    if who.kind == "office":
        if office not in (None, who.name):
            raise Forbidden("an office sees only its own entries")
        office = who.name
    decision = request.query.get("decision") or None
    if decision is not None and decision not in DECISIONS:
        raise ValidationFailed(f"decision is one of {', '.join(DECISIONS)}")
    start = _int(request, "start", 0)
    end = _int(request, "end", view.size)
    limit = _int(request, "limit", settings.page_limit, minimum=1)
    query = EntryQuery(start=start, end=min(end, view.size), office=office, item_id=request.query.get("item") or None,
                       decision=decision, since_us=_micros(request, "since"), until_us=_micros(request, "until"),
                       limit=min(limit, settings.page_limit))  # fmt: skip
    rows = await asyncio.to_thread(request.app[INDEX].query, query)
    data = await asyncio.to_thread(_entry_bytes, request.app[TILES], view.size, [r.index for r in rows])
    following = rows[-1].index + 1 if len(rows) == query.limit else None
    return web.json_response({"size": view.size, "entries": [_entry_json(r, data[r.index]) for r in rows],
                              "next_start": following})  # fmt: skip


async def _own_entry(request: web.Request, who: Principal, view: LogView, entry_id: str) -> IndexedEntry:
    found = await asyncio.to_thread(request.app[INDEX].find, entry_id)
    if found is None or found.index >= view.size or (who.kind == "office" and found.office != who.name):
        raise NotFound(f"no entry {entry_id[:64]!r} in the log")
    return found


async def entry(request: web.Request) -> web.Response:
    who = principal(request)
    view = _view(request)
    found = await _own_entry(request, who, view, request.match_info["entry_id"])
    data = await asyncio.to_thread(_entry_bytes, request.app[TILES], view.size, [found.index])
    return web.json_response(_entry_json(found, data[found.index]))


async def inclusion(request: web.Request) -> web.Response:
    who = principal(request)
    view = _view(request)
    size = _size(request, view)
    entry_id = request.query.get("entry_id")
    if entry_id:
        index = (await _own_entry(request, who, view, entry_id)).index
    else:
        given = _opt_int(request, "index")
        if given is None:
            raise ValidationFailed("give index or entry_id")
        index = given
        if who.kind == "office":
            row = await asyncio.to_thread(request.app[INDEX].at, index)
            if row is None or row.office != who.name:
                raise Forbidden("an office proves only its own entries")
    if index >= size:
        raise NotFound(f"entry {index} is not in the tree of size {size}")
    reader = _reader(request, view)
    proof = await _prove(merkle.inclusion_proof, reader, index, size)
    leaf = await _prove(reader.node, 0, index)
    note = await asyncio.to_thread(request.app[INDEX].checkpoint_at, size)
    return web.json_response({"index": index, "size": size, "leaf_hash": base64.b64encode(leaf).decode(),
                              "proof": [base64.b64encode(h).decode() for h in proof],
                              "checkpoint": None if note is None else note.decode()})  # fmt: skip


async def consistency(request: web.Request) -> web.Response:
    principal(request)
    view = _view(request)
    first, second = _size(request, view, "from"), _size(request, view, "to")
    if first > second:
        raise ValidationFailed(f"from ({first}) must not exceed to ({second})")
    reader = _reader(request, view)
    proof = await _prove(merkle.consistency_proof, reader, first, second)
    return web.json_response({"from": first, "to": second, "proof": [base64.b64encode(h).decode() for h in proof]})


async def receipt(request: web.Request) -> web.Response:
    who = principal(request)
    view = _view(request)
    size = _size(request, view)
    found = await _own_entry(request, who, view, request.match_info["entry_id"])
    if found.index >= size:
        raise NotFound(f"entry {found.entry_id} is not in the tree of size {size}")
    note = view.checkpoint if size == view.size else await asyncio.to_thread(request.app[INDEX].checkpoint_at, size)
    if note is None:
        raise NotFound(f"the log signed no checkpoint of size {size}")
    reader = _reader(request, view)
    proof = await _prove(merkle.inclusion_proof, reader, found.index, size)
    data = await asyncio.to_thread(_entry_bytes, request.app[TILES], view.size, [found.index])
    body = TlogProof(found.index, tuple(proof), note, extra=data[found.index]).encode()
    return web.Response(body=body, content_type="text/plain", charset="utf-8")


def _reader(request: web.Request, view: LogView) -> TileNodeReader:
    tiles = request.app[TILES]
    return TileNodeReader(view.size, lambda t: read_tile(tiles, t))


async def _prove(fn: Callable[..., T], *args: Any) -> T:
    """Run a proof over stored tiles in a worker thread; a damaged tile is the store's failure, not the caller's."""
    try:
        return await asyncio.to_thread(fn, *args)
    except InvalidProof as exc:
        raise StoreUnavailable(f"the stored log is damaged: {exc.detail}", index=exc.index) from exc


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/log/checkpoint", checkpoint)
    app.router.add_post("/v1/log/cosignature", cosignature)
    app.router.add_get("/v1/log/cosigned", cosigned)
    app.router.add_get("/v1/log/tile/{path:.+}", tile)
    app.router.add_get("/v1/log/entries", entries)
    app.router.add_get("/v1/log/entries/{entry_id}", entry)
    app.router.add_get("/v1/log/proof/inclusion", inclusion)
    app.router.add_get("/v1/log/proof/consistency", consistency)
    app.router.add_get("/v1/log/receipt/{entry_id}", receipt)
