"""History is never rewritten: a version may not take effect before ``hub.policy`` accepted it, so the version that
decided a read is the one the as-of-time lookup names for that moment, for every decision ever taken."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.policy.engine import APPEND_RESOLUTION, MAX_CLOCK_SKEW, PolicyEngine, PolicyStore
from services.policy.model import FeedRef, Office
from services.policy.version import PolicyVersion, sign, trusted_keys
from services.shared.errors import ConfigurationError, PolicyError
from tests.shared.records import seed_key

KEY: Final = seed_key(8)
SCHEMA: Final = (Path(__file__).resolve().parents[2] / "policies" / "schema.cedarschema").read_text("utf-8")
T0: Final = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
FEED: Final = FeedRef(jurisdiction="DE")


def _version(n: int, effective_from: datetime) -> PolicyVersion:
    """A small valid version, distinct for each ``n`` (its author), so compiling it is cheap."""
    return PolicyVersion(
        policy_text='@id("feeds")\npermit(principal, action == Action::"ReadFeed", resource);',
        schema_text=SCHEMA, offices=(Office(office_id="DE-X", jurisdiction="DE"),), author=f"board {n}",
        effective_from=effective_from,
    )  # fmt: skip


def _store(skew: timedelta = MAX_CLOCK_SKEW) -> PolicyStore:
    return PolicyStore(trusted=trusted_keys([KEY.public]), max_clock_skew=skew)


BACKDATING = {
    # effective_from relative to the record's timestamp → refused?, in force from (relative to the timestamp)
    "a day back": (-timedelta(days=1), True, None),
    "31 s back": (-timedelta(seconds=31), True, None),
    "29 s back: within the allowance, in force once appended": (-timedelta(seconds=29), False, APPEND_RESOLUTION),
    "now": (timedelta(0), False, APPEND_RESOLUTION),
    "an hour ahead": (timedelta(hours=1), False, timedelta(hours=1)),
}  # fmt: skip


@pytest.mark.parametrize("case", BACKDATING.values(), ids=BACKDATING.keys())
def test_a_version_may_not_take_effect_before_it_was_appended(
    case: tuple[timedelta, bool, timedelta | None],
) -> None:
    offset, refused, starts = case
    store = _store()
    signed = sign(_version(1, T0 + offset), KEY)
    if refused:
        with pytest.raises(PolicyError, match=r"back-dated: .* appended at 2026-03-01T12:00:00\+00:00"):
            store.check_record(signed.to_record(), appended_at=T0)
        assert store.ingest(signed.to_record(), where="hub.policy[0]@0", appended_at=T0) is None
        assert (store.history(), store.rejected) == ([], {"PolicyError": 1})
        return
    assert starts is not None
    compiled = store.accept(signed, appended_at=T0)
    assert store.in_force_from(compiled.content_hash) == T0 + starts
    assert store.in_force(T0 + starts - timedelta(microseconds=1)) is None
    assert store.in_force(T0 + starts) is compiled


def test_the_allowance_is_configured() -> None:
    with pytest.raises(PolicyError, match=r"allowed clock skew 0 s"):
        _store(timedelta(0)).check(sign(_version(1, T0 - timedelta(seconds=1)), KEY), appended_at=T0)
    assert _store(timedelta(minutes=5)).check(sign(_version(1, T0 - timedelta(minutes=4)), KEY), appended_at=T0)
    with pytest.raises(ConfigurationError):
        _store(-timedelta(seconds=1))


def test_the_issue_reproduction_a_later_version_cannot_reach_back_over_decided_reads() -> None:
    """v1 in force; a read decided at T; a week later v2 says it took effect the day before T — refused."""
    store = _store()
    v1 = store.accept(sign(_version(1, T0), KEY), appended_at=T0 - timedelta(days=30))
    engine = PolicyEngine(store)
    read_at = T0 + timedelta(days=10)
    assert engine.decide("DE-X", "ReadFeed", FEED, read_at).policy_version == v1.content_hash
    backdated = sign(_version(2, read_at - timedelta(days=1)), KEY)
    assert store.ingest(backdated.to_record(), where="hub.policy[0]@1", appended_at=read_at + timedelta(days=7)) is None
    assert store.in_force(read_at) is v1


@dataclass(frozen=True)
class Push:
    offset_us: int  # effective_from relative to the moment of the push


@dataclass(frozen=True)
class Decide:
    pass


STEP = st.tuples(
    st.integers(min_value=0, max_value=90_000_000),  # microseconds that pass before the event
    st.one_of(st.builds(Push, st.integers(min_value=-45_000_000, max_value=60_000_000)), st.just(Decide())),
)


def _stamp(moment: datetime) -> datetime:
    """The Kafka timestamp of a record appended at ``moment``: whole milliseconds."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


@settings(max_examples=120)
@given(timeline=st.lists(STEP, min_size=1, max_size=14))
def test_every_decision_ever_taken_is_what_the_as_of_time_lookup_says(
    timeline: list[tuple[int, Push | Decide]],
) -> None:
    """Random pushes (some back-dated, some within the allowance, some ahead) and reads decided "now" by a store
    that follows the log; afterwards the lookup — and an auditor's fresh replay of the same records — names, for
    each read, the version that decided it."""
    store, now = _store(), T0
    engine = PolicyEngine(store)
    records: list[tuple[bytes, datetime]] = []
    decided: list[tuple[datetime, str | None]] = []
    for n, (elapsed, event) in enumerate(timeline):
        now += timedelta(microseconds=elapsed)
        if isinstance(event, Push):
            record = sign(_version(n, now + timedelta(microseconds=event.offset_us)), KEY).to_record()
            records.append((record, _stamp(now)))
            store.ingest(record, where=f"hub.policy[0]@{len(records) - 1}", appended_at=_stamp(now))
        else:
            decided.append((now, engine.decide("DE-X", "ReadFeed", FEED, now).policy_version))
    replayed = _store()
    for offset, (record, stamp) in enumerate(records):
        replayed.ingest(record, where=f"hub.policy[0]@{offset}", appended_at=stamp)
    assert [v.content_hash for v in replayed.history()] == [v.content_hash for v in store.history()]
    for at, version in decided:
        for lookup in (store, replayed):
            in_force = lookup.in_force(at)
            assert (None if in_force is None else in_force.content_hash) == version, at


def test_a_refused_version_leaves_no_trace_in_the_lookup() -> None:
    store = _store()
    v1 = store.accept(sign(_version(1, T0), KEY), appended_at=T0)
    appended = T0 + timedelta(minutes=10)
    for n, effective in enumerate([T0 - timedelta(hours=1), T0, appended - MAX_CLOCK_SKEW * 2], start=2):
        assert store.ingest(sign(_version(n, effective), KEY).to_record(), where="w", appended_at=appended) is None
    assert store.history() == [v1]
    assert store.in_force(appended) is v1
