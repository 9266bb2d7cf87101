"""The group committer runs units without savepoints and still never keeps half of one: a unit that raises before
writing changes nothing and fails alone; one that raises after writing has its writes undone while the rest of
its group is committed."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.publisher import state
from services.publisher.committer import GROUP_BUDGET_S, GroupCommitter
from services.shared import wakeups
from services.shared.errors import StoreUnavailable


class Refused(Exception):
    pass


def _bump(topic: str) -> Callable[[sqlite3.Connection], int]:
    def unit(conn: sqlite3.Connection) -> int:
        return state.next_sequence(conn, "k", topic)

    return unit


def _bump_then_refuse(conn: sqlite3.Connection) -> None:
    state.next_sequence(conn, "k", "half")
    raise Refused("after a write")


def _refuse(conn: sqlite3.Connection) -> None:
    raise Refused("before any write")


async def test_a_unit_that_raises_after_writing_leaves_nothing_and_its_group_is_kept(tmp_path: Path) -> None:
    committer = GroupCommitter(state.connect(tmp_path / "s.sqlite3"))
    futures: list[asyncio.Future[Any]] = [
        committer.submit(_bump("a")), committer.submit(_bump_then_refuse), committer.submit(_bump("b"))
    ]  # fmt: skip
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] == 1
    assert isinstance(results[1], Refused)
    assert results[2] == 1
    counters = await committer.run(lambda conn: state.counters(conn, "k", ["a", "b", "half"]))
    assert counters == {"a": 1, "b": 1}, "the failed unit's write was undone, the others' committed once"
    assert committer.redone == 1, "the group ran again without the unit that failed"
    committer.close()


async def test_a_unit_that_raises_before_writing_fails_alone(tmp_path: Path) -> None:
    committer = GroupCommitter(state.connect(tmp_path / "s.sqlite3"))
    hold, held = threading.Event(), threading.Event()

    def blocker(conn: sqlite3.Connection) -> None:  # the committer's thread is busy: the next three queue up
        held.set()
        hold.wait(10)

    blocked = committer.submit(blocker)
    assert await asyncio.to_thread(held.wait, 10)
    futures: list[asyncio.Future[Any]] = [
        committer.submit(_bump("a")), committer.submit(_refuse), committer.submit(_bump("a"))
    ]  # fmt: skip
    hold.set()
    await blocked
    results = await asyncio.gather(*futures, return_exceptions=True)
    assert results[0] == 1
    assert isinstance(results[1], Refused)
    assert results[2] == 2
    assert committer.redone == 0
    assert committer.groups == 2, "the three were one group (after the blocker's)"
    committer.close()


async def test_staging_refuses_a_sequence_number_signed_twice(tmp_path: Path) -> None:
    committer = GroupCommitter(state.connect(tmp_path / "s.sqlite3"))
    row = state.OutboxRow("e1", "DE", "evidence.DE", b"c", "k", 1, b"envelope", None, None)
    await committer.run(lambda conn: state.stage(conn, [row]))
    again = state.OutboxRow("e2", "DE", "evidence.DE", b"c", "k", 1, b"other", None, None)
    with pytest.raises(sqlite3.IntegrityError):
        await committer.run(lambda conn: state.stage(conn, [again]))
    assert await committer.run(lambda conn: state.counter(conn, "k", "evidence.DE")) == 1
    assert [r.event_id for r in await committer.run(lambda conn: state.pending(conn))] == ["e1"]
    committer.close()


async def test_a_long_group_is_cut_and_the_event_loop_runs_between_its_parts(tmp_path: Path) -> None:
    committer = GroupCommitter(state.connect(tmp_path / "s.sqlite3"))
    turns: list[int] = []

    def slow(conn: sqlite3.Connection) -> int:
        time.sleep(GROUP_BUDGET_S / 3)  # CPU-bound work standing in for signing
        turns.append(ticks)
        return state.next_sequence(conn, "k", "a")

    ticks = 0
    futures = [committer.submit(slow) for _ in range(12)]
    done = asyncio.gather(*futures)
    while not done.done():  # the loop's other work: counts its turns
        ticks += 1
        await asyncio.sleep(0)
    assert await done == list(range(1, 13)), "every unit ran once, in order"
    assert committer.groups >= 3
    assert len(set(turns)) >= 3, "other work ran between the groups"
    committer.close()


async def test_the_event_loop_keeps_running_while_a_unit_signs(tmp_path: Path) -> None:
    """Units run on the committer's own thread: a long, CPU-bound unit (signing a batch) does not hold the loop."""
    committer = GroupCommitter(state.connect(tmp_path / "s.sqlite3"))
    ticks_during: list[int] = []
    ticks = 0
    done = threading.Event()

    def busy(conn: sqlite3.Connection) -> int:
        start = ticks
        deadline = time.monotonic() + 0.3
        while time.monotonic() < deadline:  # pure Python work, holding the GIL whenever it can
            sum(range(1000))
        ticks_during.append(ticks - start)
        done.set()
        return state.next_sequence(conn, "k", "a")

    future = committer.submit(busy)
    while not done.is_set():
        ticks += 1
        await asyncio.sleep(0.001)
    assert await future == 1
    assert ticks_during[0] > 0, "the loop ran timers while the unit was busy"
    committer.close()


async def test_many_waiting_callers_are_answered_a_slice_per_turn_and_none_is_lost_on_cancel() -> None:
    loop = asyncio.get_running_loop()
    futures = [loop.create_future() for _ in range(10 * wakeups.SLICE)]
    turns = 0
    answering = asyncio.ensure_future(wakeups.answer([(f, i) for i, f in enumerate(futures)]))
    while not answering.done():
        await asyncio.sleep(0)
        turns += 1
        assert sum(f.done() for f in futures) <= (turns + 1) * wakeups.SLICE, "at most a slice per turn"
    assert [f.result() for f in futures] == list(range(10 * wakeups.SLICE))

    futures = [loop.create_future() for _ in range(10 * wakeups.SLICE)]
    answering = asyncio.ensure_future(wakeups.answer([(f, ValueError(i)) for i, f in enumerate(futures)]))
    await asyncio.sleep(0)
    answering.cancel()
    with pytest.raises(asyncio.CancelledError):
        await answering
    assert all(isinstance(f.exception(), ValueError) for f in futures), "the rest were answered at the cancel"


class _HookedConnection(sqlite3.Connection):
    """A real SQLite connection that runs ``before_begin`` once, just before its next ``BEGIN IMMEDIATE``."""

    before_begin: Callable[[], object] | None = None

    def execute(self, sql: str, parameters: Any = (), /) -> sqlite3.Cursor:
        if sql == "BEGIN IMMEDIATE" and (hook := self.before_begin) is not None:
            self.before_begin = None
            hook()
        return super().execute(sql, parameters)


async def test_a_caller_whose_unit_was_put_back_gets_a_503_while_the_state_stays_locked(tmp_path: Path) -> None:
    """A caller's timeout that passed while its unit was in a group (behind a long unit) and the unit was then put
    back for the next group: if another writer holds the lock from then on, the caller still gets StoreUnavailable
    instead of waiting for as long as the lock is held."""
    path = tmp_path / "s.sqlite3"
    state.connect(path).close()
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=_HookedConnection)
    conn.execute("PRAGMA busy_timeout=0")
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    committer = GroupCommitter(conn, timeout=0.2)
    hold, held, go = threading.Event(), threading.Event(), threading.Event()

    def blocker(conn: sqlite3.Connection) -> None:
        held.set()
        hold.wait(10)

    def long_unit(c: sqlite3.Connection) -> None:  # runs first in the group its caller's unit was taken into
        go.wait(10)
        conn.before_begin = lambda: other.execute("BEGIN IMMEDIATE")  # the next group finds the lock taken

    blocked = committer.submit(blocker)
    assert await asyncio.to_thread(held.wait, 10)
    long = committer.submit(long_unit)
    caller = asyncio.create_task(committer.run(_bump("j")))
    await asyncio.sleep(0)  # the caller's unit is queued behind the long one: both go in the next group
    hold.set()
    await blocked
    done, _ = await asyncio.wait([caller], timeout=committer.timeout * 2)  # the caller's timeout has passed
    assert not done, "the long unit still runs"
    go.set()
    await long
    try:
        async with asyncio.timeout(10):
            with pytest.raises(StoreUnavailable):
                await caller
    finally:
        other.execute("ROLLBACK")
    assert await committer.run(lambda c: state.counter(c, "k", "j")) == 0, "the unit never ran"
    committer.close()
    other.close()


async def test_a_begin_that_fails_with_a_damaged_database_fails_its_group_and_the_committer_goes_on(
    tmp_path: Path,
) -> None:
    """SQLite can refuse BEGIN with an error that is not about a lock (SQLITE_CORRUPT / SQLITE_NOTADB: a file damaged
    or replaced under the running service): its callers get StoreUnavailable, never a wait without end, and the
    committer still serves the next group."""
    path = tmp_path / "s.sqlite3"
    state.connect(path).close()
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, factory=_HookedConnection)
    conn.execute("PRAGMA busy_timeout=0")
    committer = GroupCommitter(conn, timeout=0.5)

    def damaged() -> None:
        raise sqlite3.DatabaseError("database disk image is malformed")

    conn.before_begin = damaged
    async with asyncio.timeout(10):
        with pytest.raises(StoreUnavailable):
            await committer.run(_bump("a"))
        assert await committer.run(_bump("a")) == 1, "the next group is served"
    committer.close()
