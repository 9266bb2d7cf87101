"""The Batcher answers every caller exactly once, with the outcome of the unit that took its request: a failure of
one unit is not given to requests another unit will serve, and cancelling a driver leaves nobody waiting."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from services.publisher import state
from services.publisher.committer import Batcher, GroupCommitter

WAIT_S = 10.0


class Crash(BaseException):
    """What a unit raising a BaseException looks like to the committer (its group is rolled back)."""


def _echo(conn: sqlite3.Connection, requests: list[str]) -> list[str | Exception]:
    state.next_sequence(conn, "k", "batches")
    return [f"done {r}" for r in requests]


async def _until(condition: threading.Event) -> None:
    assert await asyncio.to_thread(condition.wait, WAIT_S)


async def test_a_failed_unit_that_took_nothing_does_not_fail_requests_of_the_next_unit(tmp_path: Path) -> None:
    committer = GroupCommitter(state.connect(tmp_path / "s.sqlite3"))
    batcher: Batcher[str, str] = Batcher(committer, _echo)
    hold, held = threading.Event(), threading.Event()
    crash_may, crashing = threading.Event(), threading.Event()

    def blocker(conn: sqlite3.Connection) -> None:  # the committer is busy while the next units queue up
        held.set()
        hold.wait(WAIT_S)

    def crash(conn: sqlite3.Connection) -> None:  # runs after the batch unit, in its group
        crashing.set()
        crash_may.wait(WAIT_S)
        raise Crash

    hold_again = threading.Event()

    def blocker_again(conn: sqlite3.Connection) -> None:
        hold_again.wait(WAIT_S)

    blocked = committer.submit(blocker)
    await _until(held)
    gone = asyncio.create_task(batcher.submit("a"))
    await asyncio.sleep(0)  # its unit is queued behind the blocker
    await asyncio.sleep(0)
    (first_driver,) = batcher._drivers
    gone.cancel()  # its caller goes away: the unit will take nothing
    crashed = committer.submit(crash)
    hold.set()
    await blocked
    await _until(crashing)  # the batch unit has run (taking nothing); the group is still open
    blocked_again = committer.submit(blocker_again)  # the next group starts with this, before the next batch unit
    later = asyncio.create_task(batcher.submit("b"))  # a new request: a unit of its own is queued for it
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    crash_may.set()
    async with asyncio.timeout(WAIT_S):
        await asyncio.wait([first_driver])  # the failed unit's driver has answered its callers
    hold_again.set()
    await blocked_again
    async with asyncio.timeout(WAIT_S):
        assert await later == "done b", "the request is served by its own unit, not failed by a group it was not in"
    assert isinstance(crashed.exception(), Exception), "the crashing unit's own caller is told"
    committer.close()


async def test_a_cancelled_driver_leaves_no_caller_waiting_and_the_next_request_is_served(tmp_path: Path) -> None:
    committer = GroupCommitter(state.connect(tmp_path / "s.sqlite3"))
    batcher: Batcher[str, str] = Batcher(committer, _echo)
    hold, held = threading.Event(), threading.Event()

    def blocker(conn: sqlite3.Connection) -> None:
        held.set()
        hold.wait(WAIT_S)

    blocked = committer.submit(blocker)
    await _until(held)
    first = asyncio.create_task(batcher.submit("a"))
    await asyncio.sleep(0)  # the caller has queued its request and started a driver for it
    await asyncio.sleep(0)  # the driver has queued its unit behind the blocker
    (driver,) = batcher._drivers
    driver.cancel()  # e.g. the loop shutting down tasks
    await asyncio.wait([driver])
    hold.set()
    await blocked
    async with asyncio.timeout(WAIT_S):
        outcome = (await asyncio.gather(first, return_exceptions=True))[0]
    assert outcome == "done a" or isinstance(outcome, Exception), "the caller is answered, never left waiting"
    async with asyncio.timeout(WAIT_S):
        assert await batcher.submit("b") == "done b", "a later request is still served"
    committer.close()


async def test_a_driver_cancelled_before_it_ran_does_not_stall_every_later_request(tmp_path: Path) -> None:
    committer = GroupCommitter(state.connect(tmp_path / "s.sqlite3"))
    batcher: Batcher[str, str] = Batcher(committer, _echo)
    first = asyncio.create_task(batcher.submit("a"))
    await asyncio.sleep(0)  # the caller has queued its request and created a driver, which has not run yet
    (driver,) = batcher._drivers
    driver.cancel()
    await asyncio.wait([driver])
    async with asyncio.timeout(WAIT_S):
        outcome = (await asyncio.gather(first, return_exceptions=True))[0]
    assert outcome == "done a" or isinstance(outcome, Exception), "the caller is answered, never left waiting"
    async with asyncio.timeout(WAIT_S):
        assert await batcher.submit("b") == "done b", "a later request is still served"
    committer.close()
