"""The group committer: the publisher's one writer to its SQLite state, on a thread of its own.

Owns: running callers' units of work ``fn(conn) -> T`` many per transaction (one fsync serves a whole group), in
submission order, on a dedicated thread, and answering each caller on its own event loop. Does not own the schema or
the SQL (``state``) or what a unit decides (``pipeline``, ``decide``).

Why a thread: a unit signs and encodes envelopes and a commit waits for an fsync; on the event loop's thread both
held every other connection of the process (a group of 512 publications froze the loop for 0.3-0.5 s, and groups
cut to 10 ms still left ~180 ms stalls). On a thread of its own, the interpreter hands the loop the GIL at least every
switch interval (5 ms), and the fsync releases it altogether. What made a writer thread slow before — waiting up to
a switch interval for the GIL after *every* SQLite call, with ~10 calls per publication — is why units must make few
calls: the pipeline's publication unit serves a whole batch of requests with a handful of statements
(``pipeline.EvidencePublisher``).

Guarantees, each tested in ``tests/publisher/test_group_commit.py``:
- A unit that raises before changing a row changes nothing; only its caller gets the exception. One that raises
  after writing makes its group roll back and run again without it: never a half-write (no savepoints needed).
- If BEGIN or COMMIT fails, every caller of the group gets :class:`StoreUnavailable` and nothing of it is kept; the
  committer goes on with the next group (also after a unit raised a BaseException).
- A database locked by another process (an operator's shell, say) makes the group wait and retry with backoff
  (:data:`BUSY_BACKOFF`); a caller of :meth:`GroupCommitter.run` whose unit has not started after ``timeout`` gets
  StoreUnavailable and its unit never runs. Once a unit has started, its caller gets its outcome.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final, Generic, TypeVar

from services.shared import wakeups
from services.shared.errors import StoreUnavailable

T = TypeVar("T")
log = logging.getLogger(__name__)
MAX_GROUP: Final = 512
#: A group stops taking units once its units have run this long: one commit every so often bounds how long a
#: caller whose unit is done waits for the fsync that makes it durable.
GROUP_BUDGET_S: Final = 0.010
#: Back-off while another process holds the write lock.
BUSY_BACKOFF: Final = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0)
#: How long close() waits for what is still queued when another process holds the lock.
CLOSE_WAIT_S: Final = 5.0


@dataclass(eq=False)
class _Job(Generic[T]):
    fn: Callable[[sqlite3.Connection], T]
    future: asyncio.Future[T]
    loop: asyncio.AbstractEventLoop
    started: bool = False
    withdrawn: bool = False  # its caller gave up before it started: never run


@dataclass(eq=False)
class _Outcome:
    job: _Job[Any]
    value: Any = None
    error: BaseException | None = None


@dataclass
class _Counts:
    groups: int = 0
    busy_retries: int = 0
    redone: int = 0  # groups run again because a unit raised after writing
    units: int = 0
    seconds_in_groups: float = field(default=0.0)


class GroupCommitter:
    """Runs units of work ``fn(conn) -> T`` many per transaction on the committer's own thread (module docstring).

    Units run one at a time, in submission order, never concurrently with each other, so a unit sees every row the
    units before it wrote. Units must not touch asyncio objects: they run off the event loop.
    """

    def __init__(self, conn: sqlite3.Connection, *, timeout: float = 10.0) -> None:
        self._conn = conn
        self.timeout = timeout
        self._lock = threading.Condition()
        self._queue: collections.deque[_Job[Any]] = collections.deque()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._counts = _Counts()

    @property
    def groups(self) -> int:
        return self._counts.groups

    @property
    def busy_retries(self) -> int:
        return self._counts.busy_retries

    @property
    def redone(self) -> int:
        return self._counts.redone

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run ``fn`` in the next group; returns once that group is committed (durable).

        Raises:
            StoreUnavailable: the commit failed, the committer is closed, or ``fn`` had not started after the
            committer's ``timeout`` (the database stayed locked by another process); then ``fn`` never runs.
            Whatever ``fn`` raises.
        """
        job = self._enqueue(fn)
        while True:  # a unit taken into a group may be put back (over the budget, lock taken): look again
            try:
                async with asyncio.timeout(self.timeout):
                    return await asyncio.shield(job.future)
            except TimeoutError:
                with self._lock:
                    if not job.started:  # not started: it never will be
                        job.withdrawn = True
                        raise StoreUnavailable("publisher state is locked by another process; try again") from None

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue ``fn`` for the next group without waiting; its failure is logged (nobody awaits it).

        Raises:
            StoreUnavailable: the committer is closed.
        """
        job = self._enqueue(fn)
        job.future.add_done_callback(_log_failure)
        return job.future

    def _enqueue(self, fn: Callable[[sqlite3.Connection], T]) -> _Job[T]:
        loop = asyncio.get_running_loop()
        job = _Job(fn, loop.create_future(), loop)
        with self._lock:
            if self._closing:
                raise StoreUnavailable("publisher state is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name="publisher-state", daemon=True)
                self._thread.start()
            self._queue.append(job)
            self._lock.notify()
        return job

    # -- the committer's thread -------------------------------------------------------------------------------
    def _work(self) -> None:
        busy = 0
        deadline: float | None = None
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if not self._queue:
                    return
                if self._closing and deadline is None:
                    deadline = time.monotonic() + CLOSE_WAIT_S
                group = self._take()
            if not group:
                continue
            if self._commit_group(group):
                busy = 0
                continue
            # Locked by another process: put the group back (its callers may give up meanwhile) and wait.
            with self._lock:
                for job in reversed(group):
                    job.started = False
                    self._queue.appendleft(job)
                if deadline is not None and time.monotonic() > deadline:
                    left = [j for j in self._queue if not j.withdrawn]
                    self._queue.clear()
                    log.error("publisher state stayed locked by another process; %d units not written", len(left))
                    self._answer([_Outcome(j, error=StoreUnavailable("publisher state is closed")) for j in left])
                    return
                delay = BUSY_BACKOFF[min(busy, len(BUSY_BACKOFF) - 1)]
                busy += 1
                self._counts.busy_retries += 1
                if busy == 1 or busy % 20 == 0:
                    log.warning("publisher state is locked by another process; retrying in %.2fs", delay)
                self._lock.wait(delay)

    def _take(self) -> list[_Job[Any]]:
        """Up to MAX_GROUP queued jobs whose callers are still waiting, marked started (call with the lock held)."""
        group: list[_Job[Any]] = []
        while self._queue and len(group) < MAX_GROUP:
            job = self._queue.popleft()
            if job.withdrawn or job.future.cancelled():
                continue
            job.started = True
            group.append(job)
        return group

    def _commit_group(self, group: list[_Job[Any]]) -> bool:
        """Run and commit ``group``; False, having changed nothing, if another process holds the write lock. Units
        not run (over the time budget) go back to the front of the queue."""
        first = True
        while group:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:  # not only OperationalError: a damaged file raises DatabaseError
                if isinstance(exc, sqlite3.OperationalError) and _locked(exc):
                    if first:
                        return False
                    self._put_back(group)  # a run again found the lock taken: the next group's
                    return True
                self._abort(group, exc)
                return True
            first = False
            try:
                outcomes, failed = self._run_units(group)
                self._put_back(group[len(outcomes) :])  # over the time budget: they go in the next group
                group = group[: len(outcomes)]
                if failed is not None:  # wrote, then raised: roll everything back and run the others again
                    self._conn.execute("ROLLBACK")
                    self._answer([outcomes[failed]])
                    group = [job for i, job in enumerate(group) if i != failed]
                    self._counts.redone += 1
                    continue
                self._conn.execute("COMMIT")
                self._counts.groups += 1
            except BaseException as exc:  # SQLite failed, or a unit raised a BaseException mid-group
                self._abort(group, exc)
                if not isinstance(exc, sqlite3.Error):
                    log.error("a unit of work raised %r; its group was rolled back", exc)
                return True
            self._answer(outcomes)
            return True
        return True

    def _run_units(self, group: list[_Job[Any]]) -> tuple[list[_Outcome], int | None]:
        """Run units in the open transaction until they have taken ``GROUP_BUDGET_S``. Returns the outcomes of
        those run and the index of a unit that raised after changing rows (the last run), or None."""
        outcomes: list[_Outcome] = []
        began = time.perf_counter()
        for i, job in enumerate(group):
            before = self._conn.total_changes
            try:
                outcomes.append(_Outcome(job, value=job.fn(self._conn)))
            except Exception as exc:  # the unit failed, not the group: its caller gets the error
                outcomes.append(_Outcome(job, error=exc))
                if self._conn.total_changes != before:
                    return outcomes, i
            if time.perf_counter() - began > GROUP_BUDGET_S:
                break
        return outcomes, None

    def _put_back(self, jobs: list[_Job[Any]]) -> None:
        if not jobs:
            return
        with self._lock:
            for job in reversed(jobs):
                job.started = False
                self._queue.appendleft(job)

    def _abort(self, group: list[_Job[Any]], exc: BaseException) -> None:
        """Roll the group back and tell every caller; the committer goes on with the next group."""
        try:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
        except sqlite3.Error:
            log.exception("rollback failed")
        failure = StoreUnavailable(f"publisher state commit failed: {exc!r}")
        self._answer([_Outcome(job, error=failure) for job in group])

    @staticmethod
    def _answer(outcomes: list[_Outcome]) -> None:
        """Hand the outcomes to their callers' loops: one wake-up per loop, not one per caller."""
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for outcome in outcomes:
            by_loop.setdefault(outcome.job.loop, []).append(outcome)
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_settle, batch)

    def close(self) -> None:
        """Commit whatever is still queued (waiting up to a few seconds for a lock held elsewhere), then close."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()
        self._conn.close()


def _settle(outcomes: list[_Outcome]) -> None:
    """On the callers' loop: answer each caller still waiting."""
    for outcome in outcomes:
        future = outcome.job.future
        if future.done():  # the caller went away (cancelled); the work is committed all the same
            continue
        if outcome.error is not None:
            future.set_exception(outcome.error)
        else:
            future.set_result(outcome.value)


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("publisher state update failed: %r", future.exception())


def _locked(exc: sqlite3.OperationalError) -> bool:
    return "locked" in str(exc) or "busy" in str(exc)


P = TypeVar("P")
R = TypeVar("R")
#: How many requests one batch unit takes at most: bounds how long the units queued behind it (acknowledgement
#: marks, reads) wait.
MAX_BATCH: Final = 256


class Batcher(Generic[P, R]):
    """Many callers' requests served by one unit of work: ``process(conn, requests)`` returns one outcome per
    request (a value, or the exception for that request alone), so a unit's few statements serve a whole batch.

    The unit takes its requests when it *starts*, on the committer's thread: everything submitted while the
    previous batch was being signed and committed goes into the next one. A request whose caller has gone before
    its batch started is not processed. If the unit fails as a whole (its commit, or an exception after it wrote),
    every request of the batch gets that error.
    """

    def __init__(self, committer: GroupCommitter,
                 process: Callable[[sqlite3.Connection, list[P]], list[R | Exception]]) -> None:  # fmt: skip
        self._committer = committer
        self._process = process
        self._lock = threading.Lock()
        self._waiting: collections.deque[tuple[P, asyncio.Future[R]]] = collections.deque()
        self._queued = False  # a unit is queued that has not taken its requests yet
        self._drivers: set[asyncio.Task[None]] = set()
        self.batches = 0  # units that took at least one request

    async def submit(self, request: P) -> R:
        """Raises: whatever ``process`` gave for this request; StoreUnavailable (see GroupCommitter.run)."""
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting.append((request, future))
            start, self._queued = not self._queued, True
        if start:
            self._drive()
        return await future

    def _drive(self) -> None:
        claim: _Claim[P, R] = _Claim()
        task = asyncio.get_running_loop().create_task(self._unit(claim))
        self._drivers.add(task)
        task.add_done_callback(self._drivers.discard)
        task.add_done_callback(lambda t: self._gone(claim) if t.cancelled() else None)

    async def _unit(self, claim: _Claim[P, R]) -> None:
        loop = asyncio.get_running_loop()

        def unit(conn: sqlite3.Connection) -> list[R | Exception]:
            with self._lock:
                if claim.abandoned:
                    return []
                claim.started = True
                while self._waiting and len(claim.taken) < MAX_BATCH:
                    request, future = self._waiting.popleft()
                    if not future.done():
                        claim.taken.append((request, future))
                if self._waiting:  # more than one batch's worth: the rest go in the next unit, queued now
                    loop.call_soon_threadsafe(self._drive)
                else:
                    self._queued = False
                self.batches += bool(claim.taken)
            taken = claim.taken
            return self._process(conn, [request for request, _ in taken]) if taken else []

        try:
            outcomes = await self._committer.run(unit)
        except Exception as exc:
            self._fail(claim, exc)
            return
        taken = claim.taken
        await wakeups.answer([(future, outcome) for (_, future), outcome in zip(taken, outcomes, strict=True)])

    def _gone(self, claim: _Claim[P, R]) -> None:
        """A driver was cancelled (the loop shutting down, say): none of its callers, nor of those it was to take,
        is left waiting for an answer it will never give."""
        self._fail(claim, StoreUnavailable("the publisher stopped before answering; repeat the request with the "
                                           "same Idempotency-Key to learn its outcome"))  # fmt: skip

    def _fail(self, claim: _Claim[P, R], exc: Exception) -> None:
        with self._lock:  # the unit never started (the state stayed locked): nothing waiting will be taken by it
            if not claim.started:  # (one that started and took nothing leaves the waiting to the next unit)
                claim.abandoned = True  # if it runs after all (its driver was cancelled), it takes nothing
                claim.taken, self._waiting, self._queued = list(self._waiting), collections.deque(), False
        for _, future in claim.taken:
            if not future.done():
                future.set_exception(exc)


@dataclass(eq=False)
class _Claim(Generic[P, R]):
    """What one batch unit took, shared by its driver (the loop's thread) and the unit (the committer's thread)
    under ``Batcher._lock``."""

    taken: list[tuple[P, asyncio.Future[R]]] = field(default_factory=list)
    started: bool = False
    abandoned: bool = False  # its driver gave up before it started
