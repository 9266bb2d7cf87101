"""The audit log's sequencing core: ``hub.audit`` records in, leaves, tiles and a signed checkpoint out.

Owns the rules of integration, so the tree is a deterministic function of the topic:
- records are taken in offset order from the committed offset on; one below it is a redelivery and is skipped;
- a record that is not an audit batch becomes a dead letter with its reason (the log goes on);
- every entry of a batch becomes the next leaf, its exact bytes, unless its ``entry_id`` is already in the log
  (``known``) or earlier in the same integration — a producer retry or a redelivery is appended once;
- one :class:`Integration` per call: the rows to index, the tiles and bundles to write, the next offset and the
  checkpoint for the new size, signed by :class:`CheckpointSigner`, which refuses to sign a checkpoint that is not
  consistent with every checkpoint it signed before (checked with a consistency proof over the tiles to be
  committed, not assumed).

Pure: no I/O, no clock (``known`` and ``read_tile`` are callables the shell provides). Does not own storing the
integration (``storage``) or reading Kafka (``integrator``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from services.audit import merkle
from services.audit.checkpoint import Checkpoint
from services.audit.note import NoteSigner
from services.audit.tiles import Tile, TiledTree, TileNodeReader, TileWrite
from services.shared import audit_records
from services.shared.avro import AvroCodec
from services.shared.errors import Conflict, DecodeError, InvalidProof, PayloadTooLarge


@dataclass(frozen=True)
class Record:
    """One ``hub.audit`` record as read from Kafka (the value may be missing on a malformed record)."""

    offset: int
    value: bytes | None


@dataclass(frozen=True)
class IndexedEntry:
    """What the query index keeps of one leaf (the leaf's bytes live in the entry bundles)."""

    index: int
    entry_id: str
    office: str
    item_id: str | None
    decision: str
    at_us: int
    action: str
    jurisdiction: str
    offset: int


@dataclass(frozen=True)
class DeadLetter:
    offset: int
    value: bytes
    reason: str


@dataclass(frozen=True)
class Integration:
    """Everything one durable write commits; ``tree`` is the edge to adopt once it is committed."""

    start: int
    checkpoint: Checkpoint
    signed: bytes
    next_offset: int
    entries: list[IndexedEntry]
    writes: list[TileWrite]
    dead_letters: list[DeadLetter]
    duplicates: int
    tree: TiledTree = field(repr=False)

    @property
    def size(self) -> int:
        return self.checkpoint.size


class CheckpointSigner:
    """Signs checkpoints with the log's key, never two inconsistent ones.

    It remembers the last checkpoint it signed (seeded from the last committed one at start). A smaller size, the
    same size with another root, or a larger tree whose consistency proof from the last one fails is refused with
    :class:`Conflict` — the service stops rather than fork its history.
    """

    def __init__(self, signer: NoteSigner, *, last: Checkpoint | None) -> None:
        self._signer = signer
        self._last = last

    @property
    def origin(self) -> str:
        return self._signer.name

    @property
    def last(self) -> Checkpoint | None:
        return self._last

    def sign(self, checkpoint: Checkpoint, reader: merkle.NodeReader) -> bytes:
        """Raises: Conflict if ``checkpoint`` is not consistent with the last one signed (``reader`` gives the
        new tree's hashes)."""
        last = self._last
        if last is not None:
            if checkpoint.size < last.size or (checkpoint.size == last.size and checkpoint.root != last.root):
                raise Conflict(f"refusing to sign size {checkpoint.size}: it does not extend size {last.size}")
            if 0 < last.size < checkpoint.size:
                try:
                    proof = merkle.consistency_proof(reader, last.size, checkpoint.size)
                    merkle.verify_consistency(last.size, checkpoint.size, last.root, checkpoint.root, proof)
                except InvalidProof as exc:
                    raise Conflict(f"refusing to sign size {checkpoint.size}: not consistent with size "
                                   f"{last.size} ({exc.detail})") from exc  # fmt: skip
        signed = checkpoint.sign(self._signer)
        self._last = checkpoint
        return signed


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def micros(value: Any) -> int:
    """Microseconds since the epoch, exactly (a float timestamp would round some of them)."""
    if isinstance(value, datetime):
        return (value.astimezone(UTC) - _EPOCH) // timedelta(microseconds=1)
    return int(value)


def index_fields(index: int, fields: Mapping[str, Any], offset: int) -> IndexedEntry:
    return IndexedEntry(index, fields["entry_id"], *_columns(fields), offset)


_Columns = tuple[str, str | None, str, int, str, str]


def _columns(fields: Mapping[str, Any]) -> _Columns:
    """What the index keeps of a decoded entry besides its id (office, item, decision, time, action, jurisdiction)."""
    item = fields.get("item")
    return (fields["office"], item["item_id"] if item else None, str(fields["decision"]), micros(fields["at"]),
            fields["action"], fields["jurisdiction"])  # fmt: skip


@dataclass(frozen=True)
class Decoded:
    """Records decoded and checked, before sequencing: each entry's offset, exact bytes, id and indexed columns
    (only those: the decoded records are dropped at once — keeping an integration's worth of nested dicts alive cost
    more in garbage collection than decoding them), the dead letters, and the offsets covered."""

    after: int  # records below this offset were skipped (already integrated)
    next_offset: int
    entries: list[tuple[int, bytes, str, _Columns]]
    dead: list[DeadLetter]


def decode(codec: AvroCodec, records: Sequence[Record], *, after: int) -> Decoded:
    """Decode ``records`` (in offset order), skipping those below offset ``after``: every entry of every batch is
    checked to be an ``AuditEntry``; a record that is not an audit batch becomes a dead letter with its reason.
    Needs no tree state, so the next fetch can be decoded while the previous integration commits."""
    next_offset = after
    dead: list[DeadLetter] = []
    entries: list[tuple[int, bytes, str, _Columns]] = []
    for record in records:
        if record.offset < next_offset:
            continue
        next_offset = record.offset + 1
        if record.value is None:
            dead.append(DeadLetter(record.offset, b"", "a record without a value"))
            continue
        try:
            _, _, decoded = audit_records.decode_batch_entries(codec, record.value)
        except (DecodeError, PayloadTooLarge) as exc:
            dead.append(DeadLetter(record.offset, record.value, exc.detail))
            continue
        entries += [(record.offset, raw, fields["entry_id"], _columns(fields)) for raw, fields in decoded]
    return Decoded(after, next_offset, entries, dead)


class Sequencer:
    """The log between integrations: the committed right edge, the next offset, and the checkpoint signer."""

    def __init__(self, *, codec: AvroCodec, signer: CheckpointSigner, tree: TiledTree, next_offset: int) -> None:
        self._codec = codec
        self._signer = signer
        self._tree = tree
        self._next_offset = next_offset

    @property
    def size(self) -> int:
        return self._tree.size

    @property
    def next_offset(self) -> int:
        return self._next_offset

    @property
    def root(self) -> bytes:
        return self._tree.root()

    def decode(self, records: Sequence[Record], *, after: int) -> Decoded:
        """:func:`decode` with this log's codec (``after``: the offset the previous, maybe uncommitted, fetch
        ended at)."""
        return decode(self._codec, records, after=after)

    def integrate(
        self, records: Sequence[Record], *, known: Callable[[list[str]], set[str]], read_tile: Callable[[Tile], bytes]
    ) -> Integration:
        """One integration of ``records`` (in offset order) on top of the committed tree; nothing is adopted.

        Raises:
            Conflict: the checkpoint for the new tree would not be consistent with the last one signed.
            InvalidProof: a stored tile needed for that check is missing or malformed.
        """
        return self.sequence(decode(self._codec, records, after=self._next_offset), known=known, read_tile=read_tile)

    def sequence(
        self, decoded: Decoded, *, known: Callable[[list[str]], set[str]], read_tile: Callable[[Tile], bytes]
    ) -> Integration:
        """The integration of records already decoded (:func:`decode`) on top of the committed tree.

        Raises:
            Conflict, InvalidProof: as :meth:`integrate`; Conflict also if ``decoded`` does not follow the
                committed offset (records skipped or taken twice).
        """
        if decoded.after != self._next_offset:
            raise Conflict(f"records decoded after offset {decoded.after} do not follow offset {self._next_offset}")
        start = self._tree.size
        seen = known(sorted({entry_id for _, _, entry_id, _ in decoded.entries}))
        leaves: list[bytes] = []
        rows: list[IndexedEntry] = []
        duplicates = 0
        for offset, raw, entry_id, columns in decoded.entries:
            if entry_id in seen:
                duplicates += 1
                continue
            seen.add(entry_id)
            rows.append(IndexedEntry(start + len(leaves), entry_id, *columns, offset))
            leaves.append(raw)
        tree = self._tree.copy()
        writes = tree.append(leaves)
        checkpoint = Checkpoint(self._signer.origin, tree.size, tree.root())
        pending = {w.tile: w.data for w in writes}
        reader = TileNodeReader(tree.size, lambda t: pending[t] if t in pending else read_tile(t))
        signed = self._signer.sign(checkpoint, reader)
        return Integration(start, checkpoint, signed, decoded.next_offset, rows, writes, list(decoded.dead), duplicates,
                           tree)  # fmt: skip

    def adopt(self, integration: Integration) -> None:
        """Make a committed integration the log's state.

        Raises:
            Conflict: it was not built on the current state (a bug in the shell).
        """
        if integration.start != self._tree.size:
            raise Conflict(f"integration from size {integration.start} does not follow size {self._tree.size}")
        self._tree = integration.tree
        self._next_offset = integration.next_offset
