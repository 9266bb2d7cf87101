"""Receiver-side sequence tracking: replays refused, redeliveries recognised, gaps reported, memory bounded."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.shared.errors import DecodeError, ReplayDetected, TrustError
from services.shared.sequences import SequenceTracker

DE, FR = "evidence.DE", "evidence.FR"


def _env(n: int, variant: bytes = b"") -> bytes:
    return b"envelope-%d" % n + variant


def test_redelivery_of_the_same_envelope_is_not_a_replay() -> None:
    tracker = SequenceTracker()
    assert tracker.observe("k", DE, 1, _env(1)) is True
    assert tracker.observe("k", DE, 1, _env(1)) is False


def test_a_different_envelope_with_a_used_sequence_is_a_replay() -> None:
    tracker = SequenceTracker()
    tracker.observe("k", DE, 1, _env(1))
    with pytest.raises(ReplayDetected):
        tracker.observe("k", DE, 1, _env(1, b"other"))
    assert issubclass(ReplayDetected, TrustError)


def test_sequences_are_per_key_and_topic() -> None:
    tracker = SequenceTracker()
    assert tracker.observe("k", DE, 1, _env(1))
    assert tracker.observe("k", FR, 1, _env(2))
    assert tracker.observe("other", DE, 1, _env(3))


def test_gaps_are_reported_and_out_of_order_arrival_is_normal() -> None:
    tracker = SequenceTracker()
    for sequence in (5, 1, 2):  # partitions interleave: a lower number after a higher one is not an error
        tracker.observe("k", DE, sequence, _env(sequence))
    tracker.observe("k", FR, 1, _env(1))
    assert tracker.gaps() == {("k", DE): [(3, 4)]}
    tracker.observe("k", DE, 4, _env(4))
    tracker.observe("k", DE, 3, _env(3))
    assert tracker.gaps() == {}
    assert tracker.low_water("k", DE) == 5


def test_a_huge_sequence_number_costs_no_memory_in_gap_reports() -> None:
    tracker = SequenceTracker()
    tracker.observe("k", DE, 1, _env(1))
    tracker.observe("k", DE, 2**40, _env(2))
    assert tracker.gaps() == {("k", DE): [(2, 2**40 - 1)]}


def test_memory_does_not_grow_with_a_contiguous_history() -> None:
    """The old tracker kept one entry per number ever seen; this one keeps the mark plus the redelivery window."""
    tracker = SequenceTracker(window=64)
    for n in range(1, 20_001):
        tracker.observe("k", DE, n, _env(n))
    snapshot = tracker.snapshot()[("k", DE)]
    assert snapshot["low"] == 20_000
    assert snapshot["above"] == {}
    assert len(snapshot["recent"]) == 64
    assert sys.getsizeof(json.dumps(snapshot)) < 8_000


def test_a_recent_redelivery_below_the_mark_is_recognised_and_an_old_number_is_refused() -> None:
    tracker = SequenceTracker(window=8)
    for n in range(1, 101):
        tracker.observe("k", DE, n, _env(n))
    assert tracker.observe("k", DE, 95, _env(95)) is False  # within the window: the very same envelope
    with pytest.raises(ReplayDetected):
        tracker.observe("k", DE, 95, _env(95, b"forged"))
    with pytest.raises(ReplayDetected, match="at or below 100"):
        tracker.observe("k", DE, 3, _env(3))  # too old to tell: fail closed


def test_state_survives_a_snapshot_round_trip_through_json() -> None:
    tracker = SequenceTracker(window=4)
    for n in (1, 2, 3, 7, 9):
        tracker.observe("k", DE, n, _env(n))
    data = json.loads(json.dumps({f"{k}|{t}": v for (k, t), v in tracker.snapshot().items()}))
    restored = SequenceTracker.restore({tuple(s.split("|")): v for s, v in data.items()}, window=4)
    assert restored.gaps() == tracker.gaps() == {("k", DE): [(4, 6), (8, 8)]}
    assert restored.observe("k", DE, 9, _env(9)) is False
    with pytest.raises(ReplayDetected):
        restored.observe("k", DE, 2, _env(2, b"x"))
    assert restored.observe("k", DE, 4, _env(4)) is True


def test_only_changed_streams_are_handed_out_for_persistence() -> None:
    tracker = SequenceTracker()
    tracker.observe("k", DE, 1, _env(1))
    tracker.observe("k", FR, 1, _env(1))
    assert set(tracker.take_dirty()) == {("k", DE), ("k", FR)}
    assert tracker.take_dirty() == {}
    tracker.observe("k", FR, 2, _env(2))
    assert set(tracker.take_dirty()) == {("k", FR)}


@pytest.mark.parametrize(
    "data",
    [{"low": -1, "above": {}, "recent": []}, {"low": 5, "above": {"3": "00"}, "recent": []}, {"x": 1}],
    ids=["negative-mark", "above-below-mark", "not-a-snapshot"],
)
def test_a_corrupt_snapshot_is_refused(data: dict[str, object]) -> None:
    with pytest.raises(DecodeError):
        SequenceTracker.restore({("k", DE): data})


@given(st.permutations(list(range(1, 60))))
def test_any_arrival_order_ends_with_no_gaps_and_the_full_mark(order: list[int]) -> None:
    tracker = SequenceTracker(window=8)
    for n in order:
        assert tracker.observe("k", DE, n, _env(n))
    assert tracker.gaps() == {}
    assert tracker.low_water("k", DE) == 59
