"""Receiver-side sequence tracking: which signed sequence numbers of each (key, topic) a receiver has seen.

Every envelope signs a per-(key, topic) sequence number (``envelope``). A receiver refuses a number used by two
different envelopes (a replay, or a signer numbering from 1 again) and reports the numbers it has not seen below
the highest one it has (gaps: withheld, lost, or not yet read — records of one topic arrive interleaved across
partitions, so a lower number after a higher one is normal).

Owns: that bookkeeping in memory that does not grow with the history. Per (key, topic) it keeps a *low-water
mark* ``low`` (every number ``1..low`` was seen), the sparse set of numbers seen above it (only the ones beyond a
gap), and the fingerprints of the last ``window`` numbers folded into the low-water mark, so that an at-least-once
redelivery of a recent envelope is told apart from a replay. A number at or below the mark and older than the
window is refused as a replay: fail closed, since nothing remembers what it was. ``snapshot``/``restore`` turn the
state into JSON-able data for a receiver that persists it (the gateway keeps it in SQLite with its offsets).

Pure: no I/O, no clock. Does not own: verifying signatures (``envelope``), where the state is stored.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from services.shared.errors import DecodeError, ReplayDetected

DEFAULT_WINDOW: Final = 256
_FINGERPRINT_BYTES: Final = 16

Stream = tuple[str, str]  # (key id, topic)


def fingerprint(envelope: bytes) -> bytes:
    """What is remembered of an envelope: 128 bits of its SHA-256 (collisions would need 2**64 work)."""
    return hashlib.sha256(envelope).digest()[:_FINGERPRINT_BYTES]


@dataclass
class _Numbers:
    low: int = 0
    above: dict[int, bytes] = field(default_factory=dict)
    recent: OrderedDict[int, bytes] = field(default_factory=OrderedDict)


class SequenceTracker:
    """Replays refused, redeliveries recognised, gaps reported — in memory bounded by gaps plus ``window``."""

    def __init__(self, *, window: int = DEFAULT_WINDOW) -> None:
        if window < 1:
            raise ValueError("the redelivery window holds at least one number")
        self._window = window
        self._streams: dict[Stream, _Numbers] = {}
        self._dirty: set[Stream] = set()

    def observe(self, key_id: str, topic: str, sequence: int, envelope: bytes) -> bool:
        """Record a verified envelope (its bytes, or any fixed digest of them). Returns False for a redelivery of
        an envelope already seen with this number.

        Raises:
            ReplayDetected: the number was used by a different envelope, or is at or below the low-water mark and
                older than the redelivery window (what it was is no longer known: refused, fail closed).
        """
        if sequence < 1:
            raise ReplayDetected(f"sequence {sequence} is not a valid sequence number")
        stream = (key_id, topic)
        numbers = self._streams.setdefault(stream, _Numbers())
        mark = fingerprint(envelope)
        known = numbers.above.get(sequence) if sequence > numbers.low else numbers.recent.get(sequence)
        if known is not None:
            if known == mark:
                return False
            raise ReplayDetected(f"sequence {sequence} of key {key_id[:16]} on {topic} was already used")
        if sequence <= numbers.low:
            raise ReplayDetected(f"sequence {sequence} of key {key_id[:16]} on {topic} is at or below {numbers.low},"
                                 " all of which were already seen")  # fmt: skip
        numbers.above[sequence] = mark
        while (nxt := numbers.low + 1) in numbers.above:
            numbers.recent[nxt] = numbers.above.pop(nxt)
            numbers.low = nxt
            if len(numbers.recent) > self._window:
                numbers.recent.popitem(last=False)
        self._dirty.add(stream)
        return True

    def low_water(self, key_id: str, topic: str) -> int:
        """Every number from 1 to this one has been seen (0: not even 1)."""
        numbers = self._streams.get((key_id, topic))
        return 0 if numbers is None else numbers.low

    def gaps(self) -> dict[Stream, list[tuple[int, int]]]:
        """Missing sequence numbers below the highest seen, per (key, topic), as inclusive ranges ``(first, last)``.

        Costs the size of the sparse set, not of the history or of the numbers themselves."""
        out = {}
        for stream, numbers in self._streams.items():
            missing, expected = [], numbers.low + 1
            for number in sorted(numbers.above):
                if number > expected:
                    missing.append((expected, number - 1))
                expected = number + 1
            if missing:
                out[stream] = missing
        return out

    def streams(self) -> Iterator[Stream]:
        return iter(self._streams)

    def take_dirty(self) -> dict[Stream, dict[str, Any]]:
        """The snapshots of the streams changed since the last call (what a persisting receiver writes)."""
        out = {s: self._snapshot(self._streams[s]) for s in self._dirty}
        self._dirty.clear()
        return out

    def snapshot(self) -> dict[Stream, dict[str, Any]]:
        return {s: self._snapshot(n) for s, n in self._streams.items()}

    @staticmethod
    def _snapshot(numbers: _Numbers) -> dict[str, Any]:
        return {"low": numbers.low, "above": {str(k): v.hex() for k, v in numbers.above.items()},
                "recent": [[k, v.hex()] for k, v in numbers.recent.items()]}  # fmt: skip

    @classmethod
    def restore(cls, streams: Mapping[Stream, Mapping[str, Any]], *, window: int = DEFAULT_WINDOW) -> SequenceTracker:
        """A tracker from :meth:`snapshot` data (e.g. read back from a database).

        Raises:
            DecodeError: the data is not a snapshot.
        """
        tracker = cls(window=window)
        try:
            for stream, data in streams.items():
                numbers = _Numbers(low=int(data["low"]))
                numbers.above = {int(k): bytes.fromhex(v) for k, v in data["above"].items()}
                numbers.recent = OrderedDict((int(k), bytes.fromhex(v)) for k, v in data["recent"][-window:])
                if numbers.low < 0 or any(n <= numbers.low for n in numbers.above):
                    raise ValueError("numbers above the low-water mark must be above it")
                tracker._streams[(str(stream[0]), str(stream[1]))] = numbers
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise DecodeError(f"not a sequence tracker snapshot: {exc}") from exc
        return tracker
