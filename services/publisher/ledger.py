"""What this signing key has signed on a topic, as Kafka records it: the pure core of the publisher's start-up check.

Kafka is the record of what a key has signed; the publisher's outbox is its own record of what it signed. A
:class:`TopicLedger` is fed the records read back from one evidence topic (``reconcile`` reads them, from the
offsets this state has already checked to the end) together with what the state holds for their sequence numbers,
and decides, per record:

- signed by another key, or not a well-formed envelope: not this key's business;
- an envelope of this key the state holds byte for byte: **known**. If the state never marked it delivered (a crash
  between Kafka's acknowledgement and the mark) it is marked now — so it is never sent again;
- claiming this key but its signature does not verify: **forged**, ignored (a forger cannot stop the publisher);
- a genuine envelope of this key whose sequence number the state never used: the state is **behind** Kafka — it was
  lost, emptied or restored from an old copy — and signing would reuse that number;
- a genuine envelope of this key whose sequence number the state used for *another* envelope: a **conflict** — the
  number was signed twice, or the state holds a signature that Kafka contradicts.

:meth:`TopicLedger.verdict` refuses a state that is behind or in conflict, in one line naming the topic and both
numbers. The order of records does not matter (the outbox relay may deliver an old number after newer ones, and a
topic has several partitions): every record after the checked offsets is looked at.

Pure: takes bytes and values; verifies signatures with the public key; no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from services.shared.avro import AvroCodec
from services.shared.envelope import ENVELOPE_SCHEMA, MAX_ENVELOPE_BYTES, pae
from services.shared.errors import DecodeError, InvalidSignature, PayloadTooLarge, StateRefused
from services.shared.keys import PublicKey

RECOVER_HINT = "run `evhub publisher recover` to rebuild it from Kafka, or sign with a new key (docs/operations.md)"


class Held(Protocol):
    """What the state signed with one sequence number (``state.Held`` is one)."""

    @property
    def event_id(self) -> str: ...
    @property
    def jurisdiction(self) -> str: ...
    @property
    def envelope(self) -> bytes: ...
    @property
    def partition(self) -> int | None: ...
    @property
    def offset(self) -> int | None: ...


@dataclass(frozen=True)
class Found:
    """A record of ``topic`` whose envelope names this key (not yet verified)."""

    partition: int
    offset: int
    sequence: int
    envelope: bytes
    payload_type: str
    payload: bytes
    signature: bytes
    record_key: bytes | None = None


def claimed(codec: AvroCodec, key_id: str, partition: int, offset: int, value: bytes | None,
            record_key: bytes | None = None) -> Found | None:  # fmt: skip
    """The record as an envelope signed (it says) by ``key_id``; None for other keys and undecodable bytes."""
    if not value:
        return None
    try:
        raw: dict[str, Any] = codec.decode(value, expect=ENVELOPE_SCHEMA, max_bytes=MAX_ENVELOPE_BYTES)
    except (DecodeError, PayloadTooLarge):
        return None
    for sig in raw["signatures"]:
        if sig["key_id"] == key_id:
            return Found(partition, offset, sig["sequence"], value, raw["payload_type"], raw["payload"], sig["sig"],
                         record_key)  # fmt: skip
    return None


def intact(codec: AvroCodec, key: PublicKey, topic: str, sequence: int, envelope: bytes) -> bool:
    """Whether ``envelope`` still carries this key's valid signature for (topic, sequence): a damaged state's
    envelope is never sent."""
    found = claimed(codec, key.key_id, 0, 0, envelope)
    if found is None or found.sequence != sequence:
        return False
    try:
        key.verify(found.signature, pae(found.payload_type, topic, key.key_id, sequence, found.payload))
    except InvalidSignature:
        return False
    return True


@dataclass
class TopicLedger:
    """One topic's reconciliation. ``counter`` is the state's last allocated sequence number for (key, topic)."""

    topic: str
    key: PublicKey
    counter: int
    records: int = 0
    known: int = 0
    forged: int = 0
    redeliveries: int = 0
    adopted: int = 0  # unknown envelopes handed to recovery (not kept in ``unknown``)
    highest: int = 0  # the highest sequence number of this key seen in Kafka (genuine)
    marks: list[tuple[Held, Found]] = field(default_factory=list)
    unknown: list[Found] = field(default_factory=list)
    conflicts: list[tuple[Found, Held]] = field(default_factory=list)
    _first: dict[tuple[str, str], tuple[int | None, int]] = field(default_factory=dict, repr=False)

    def observe(self, found: Found, held: Held | None) -> None:
        """One record of this key (``claimed``), and what the state signed with its sequence number, if anything."""
        if held is not None and held.envelope == found.envelope:
            self.known += 1
            self.highest = max(self.highest, found.sequence)
            name, here = (held.event_id, held.jurisdiction), (found.partition, found.offset)
            first = self._first.get(name) or (None if held.offset is None else (held.partition, held.offset))
            if first is None:  # acknowledged, never marked: mark it now
                self._first[name] = here
                self.marks.append((held, found))
            elif first != here:  # the same envelope at a second offset: a redelivery, not a second signature
                self.redeliveries += 1
            return
        if not self._genuine(found):
            self.forged += 1
            return
        self.highest = max(self.highest, found.sequence)
        if held is None:
            self.unknown.append(found)
        else:
            self.conflicts.append((found, held))

    def _genuine(self, found: Found) -> bool:
        message = pae(found.payload_type, self.topic, self.key.key_id, found.sequence, found.payload)
        try:
            self.key.verify(found.signature, message)
        except InvalidSignature:
            return False
        return True

    def verdict(self) -> None:
        """Raises: StateRefused if Kafka holds a signature of this key that this state does not account for."""
        if self.conflicts:
            found, held = min(self.conflicts, key=lambda c: c[0].sequence)
            raise StateRefused(
                f"{self.topic} holds sequence {found.sequence} of this key (partition {found.partition}, offset "
                f"{found.offset}) with another envelope than the one this state signed for event {held.event_id} "
                f"(its counter is {self.counter}): the state was restored from an old copy or another publisher "
                f"used the key; {RECOVER_HINT}"
            )
        if self.unknown:
            top = max(f.sequence for f in self.unknown)
            raise StateRefused(
                f"{self.topic} already holds sequence {top} signed by this key, which this state never signed "
                f"(its counter is {self.counter}): the state was lost, emptied or restored from an old copy; "
                f"{RECOVER_HINT}"
            )

    def may_sign(self, sequence: int) -> bool:
        """Whether signing ``sequence`` would stay above everything of this key that this ledger saw in Kafka."""
        return sequence > self.highest
