"""Delivering signed envelopes to Kafka: the couriers of every topic the publisher serves, and the delivery marks.

Owns the only path by which the publisher's envelopes reach Kafka: :class:`Outbox` holds one
:class:`courier.TopicCourier` per topic (the key's fence there, what the key signed there, transactional rounds),
answers callers within the delivery timeout, writes the delivery marks to the state (retried with backoff until
written — never dropped; one lost in a crash is found again in Kafka at start), reports readiness, and stops within
a bound.

So a record reaches Kafka at most once per envelope, except when the state itself was lost (then a re-sent
envelope is byte-identical: a redelivery, counted apart by readers). Callers wait at most the delivery timeout;
what is not acknowledged by then stays queued and is delivered by a later round.

Does not own: what is signed (``pipeline``), SQL (``state``), the reconcile's decisions (``ledger``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from services.publisher import state
from services.publisher.committer import GroupCommitter
from services.publisher.courier import RETRY, Key, OutboxSettings, TopicCourier
from services.shared.avro import AvroCodec
from services.shared.errors import EvidenceHubError, KafkaUnavailable, PublisherFenced, StateRefused, StoreUnavailable
from services.shared.keys import PublicKey

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    jurisdiction: str
    topic: str
    sequence: int
    partition: int | None
    offset: int | None
    error: str | None = None
    sent_now: bool = field(default=False, compare=False)  # acknowledged during this call (not earlier)

    @property
    def delivered(self) -> bool:
        return self.offset is not None


class Outbox:
    """The couriers of every topic the publisher serves, and the delivery marks they produce."""

    def __init__(self, *, key: PublicKey, codec: AvroCodec, committer: GroupCommitter, topics: Sequence[str],
                 settings: OutboxSettings) -> None:  # fmt: skip
        self.settings = settings
        self._committer = committer
        self.fatal: EvidenceHubError | None = None
        self.on_fatal: Callable[[EvidenceHubError], None] = lambda exc: None
        self._couriers = {
            t: TopicCourier(topic=t, key=key, codec=codec, committer=committer, settings=settings,
                            acked=self._acked, fatal=self._fatal)
            for t in topics
        }  # fmt: skip
        self._unwritten: dict[Key, tuple[str, int, int, str]] = {}  # key → (topic, partition, offset, at)
        self._marks_due = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._kafka_answers = True
        self._closing = asyncio.Event()
        self._closing_signal: asyncio.Future[None] | None = None  # made on the loop by the first waiting request
        self.marks_retried = 0

    async def start(self, *, timeout_s: float) -> None:
        """Acquire every topic's fence and establish it; retry while Kafka does not answer, for ``timeout_s``.

        Raises:
            StateRefused: the state contradicts Kafka on some topic (the detail names it and both numbers).
            KafkaUnavailable: Kafka did not answer, or a topic could not be read back, within ``timeout_s``.
        """
        deadline = time.monotonic() + timeout_s
        pending = list(self._couriers.values())
        attempt = 0
        while pending:
            results = await asyncio.gather(*(c.acquire() for c in pending), return_exceptions=True)
            for result in results:
                if isinstance(result, StateRefused):
                    raise result
                if isinstance(result, BaseException) and not isinstance(result, KafkaUnavailable | StoreUnavailable):
                    raise result
            failed = [(c, r) for c, r in zip(pending, results, strict=True) if isinstance(r, BaseException)]
            pending = [c for c, _ in failed]
            if pending:
                detail = failed[0][1].detail if isinstance(failed[0][1], EvidenceHubError) else repr(failed[0][1])
                if time.monotonic() + RETRY[min(attempt, len(RETRY) - 1)] > deadline:
                    raise KafkaUnavailable(f"Kafka did not answer in {timeout_s:.0f}s at start-up: {detail}")
                log.warning("start-up: %s; retrying", detail)
                await asyncio.sleep(RETRY[min(attempt, len(RETRY) - 1)])
                attempt += 1
        self._tasks = [asyncio.create_task(c.run(), name=f"courier-{t}") for t, c in self._couriers.items()]
        self._tasks.append(asyncio.create_task(self._write_marks(), name="delivery-marks"))
        for task in self._tasks:
            task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self.fatal is None:
            self._fatal(exc if isinstance(exc, EvidenceHubError) else PublisherFenced(f"delivery stopped: {exc!r}"))

    def _fatal(self, exc: EvidenceHubError) -> None:
        if self.fatal is None:
            self.fatal = exc
            log.critical("outbox stopped: %s", exc.detail)
            self.on_fatal(exc)

    def refuse_when(self, gate: Callable[[state.OutboxRow], str | None]) -> None:
        """``gate(row)`` says why an envelope must not be sent (checked when a round takes it), or None."""
        for courier in self._couriers.values():
            courier.gate = gate

    def may_sign(self, topic: str, sequence: int) -> None:
        """Raises: KafkaUnavailable (topic not established, or not served), StateRefused (see TopicCourier)."""
        courier = self._couriers.get(topic)
        if courier is None:
            raise KafkaUnavailable(f"this publisher does not deliver to {topic}")
        courier.may_sign(sequence)

    async def deliver(self, rows: Sequence[state.OutboxRow]) -> list[Delivery]:
        """Deliver ``rows`` (already-delivered ones are answered from their mark); wait at most the delivery
        timeout. What is not acknowledged by then is reported with an error and stays queued."""
        waiting: dict[int, asyncio.Future[tuple[int, int]]] = {}
        by_topic: dict[str, list[tuple[int, state.OutboxRow]]] = {}
        for i, row in enumerate(rows):
            if row.offset is None:
                by_topic.setdefault(row.topic, []).append((i, row))
        for topic, indexed in by_topic.items():
            courier = self._couriers.get(topic)
            if courier is None:
                continue
            for (i, _), future in zip(indexed, courier.deliver([r for _, r in indexed]), strict=True):
                waiting[i] = future
        fresh = {i for i, f in waiting.items() if not f.done()}
        if fresh:
            await self._wait_acknowledged({waiting[i] for i in fresh})
        out = []
        for i, row in enumerate(rows):
            pending = waiting.get(i)
            if row.offset is not None:
                out.append(Delivery(row.jurisdiction, row.topic, row.sequence, row.partition, row.offset))
            elif pending is None:
                out.append(Delivery(row.jurisdiction, row.topic, row.sequence, None, None, "not served here"))
            elif pending.done() and pending.exception() is None:
                partition, offset = pending.result()
                out.append(Delivery(row.jurisdiction, row.topic, row.sequence, partition, offset,
                                    sent_now=i in fresh))  # fmt: skip
            else:
                if pending.done():
                    why = type(pending.exception()).__name__
                elif self._closing.is_set():
                    why = "not acknowledged yet (the publisher is shutting down)"
                else:
                    why = f"not acknowledged within {self.settings.delivery_timeout_s:g}s"
                out.append(Delivery(row.jurisdiction, row.topic, row.sequence, None, None, why))
        return out

    async def _wait_acknowledged(self, futures: set[asyncio.Future[tuple[int, int]]]) -> None:
        """Until every future is done, the delivery timeout passes, or the service begins to shut down. Every
        request shares one shutdown future (a task per request waiting on the event cost ~5 % of a publication)."""
        loop = asyncio.get_running_loop()
        if self._closing_signal is None:
            self._closing_signal = loop.create_future()
            if self._closing.is_set():
                self._closing_signal.set_result(None)
        closing: asyncio.Future[Any] = self._closing_signal
        deadline = loop.time() + self.settings.delivery_timeout_s
        pending: set[asyncio.Future[Any]] = set(futures)
        while pending and not closing.done() and (left := deadline - loop.time()) > 0:
            _, pending = await asyncio.wait(pending | {closing}, timeout=left, return_when=asyncio.FIRST_COMPLETED)
            pending.discard(closing)

    def begin_shutdown(self) -> None:
        """Requests waiting for acknowledgements get their answer now (what is not acknowledged is reported as
        such); rounds in flight go on until :meth:`stop`."""
        self._closing.set()
        if self._closing_signal is not None and not self._closing_signal.done():
            self._closing_signal.set_result(None)

    # -- delivery marks ----------------------------------------------------------------------------------
    def _acked(self, row: state.OutboxRow, partition: int, offset: int) -> None:
        self._unwritten[(row.event_id, row.jurisdiction)] = (row.topic, partition, offset,
                                                              datetime.now(UTC).isoformat())  # fmt: skip
        self._marks_due.set()

    async def _write_marks(self) -> None:
        """Write delivery marks (and how far each partition is checked) until cancelled; a store error is retried
        with backoff, never fatal, and a mark leaves memory only once written."""
        attempt = 0
        while True:
            await self._marks_due.wait()
            self._marks_due.clear()
            while self._unwritten:
                snapshot = dict(self._unwritten)
                try:
                    await self._committer.run(_marks_unit(snapshot))
                except StoreUnavailable as exc:
                    self.marks_retried += 1
                    delay = RETRY[min(attempt, len(RETRY) - 1)]
                    attempt += 1
                    log.warning("delivery marks not written yet (%s); retrying in %.1fs", exc.detail, delay)
                    await asyncio.sleep(delay)
                    continue
                attempt = 0
                for key, value in snapshot.items():
                    if self._unwritten.get(key) == value:
                        del self._unwritten[key]
                for topic in {v[0] for v in snapshot.values()}:
                    self._couriers[topic].written([k for k, v in snapshot.items() if v[0] == topic])

    # -- health and shutdown -----------------------------------------------------------------------------
    async def check_kafka(self, within_s: float = 3.0) -> bool:
        couriers = list(self._couriers.values())
        self._kafka_answers = bool(couriers) and await couriers[0].probe(within_s)
        return self._kafka_answers

    def readiness(self) -> dict[str, Any]:
        """Why the publisher can or cannot accept publications right now."""
        problems = []
        if self.fatal is not None:
            problems.append(self.fatal.detail)
        if not self._kafka_answers:
            problems.append("Kafka does not answer")
        for topic, c in self._couriers.items():
            if not c.established:
                problems.append(f"{topic}: not established")
            elif c.stuck_for() > self.settings.delivery_timeout_s:
                problems.append(f"{topic}: a delivery has waited {c.stuck_for():.0f}s for Kafka")
        return {"ready": not problems, "problems": problems, "unwritten_marks": len(self._unwritten)}

    def stats(self) -> dict[str, int]:
        cs = self._couriers.values()
        return {
            "rounds": sum(c.rounds for c in cs),
            "failed_rounds": sum(c.failed_rounds for c in cs),
            "records_sent": sum(c.records_sent for c in cs),
            "bytes_sent": sum(c.bytes_sent for c in cs),
        }

    async def stop(self, grace_s: float) -> None:
        """Let rounds in progress finish for up to ``grace_s``, write the marks, stop every producer (bounded).
        Nothing is marked that Kafka did not acknowledge; what is unmarked is found by the next start's reconcile."""
        deadline = time.monotonic() + grace_s
        closing = min(1.0, grace_s / 2)  # kept for stopping the producers at the end

        def left(reserve: float = 0.0) -> float:
            return max(0.1, deadline - reserve - time.monotonic())

        busy = [asyncio.create_task(c.idle.wait()) for c in self._couriers.values() if not c.idle.is_set()]
        if busy:
            await asyncio.wait(busy, timeout=left(closing))
            for waiter in busy:
                waiter.cancel()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._unwritten:
            with contextlib.suppress(StoreUnavailable, TimeoutError):
                async with asyncio.timeout(left(closing)):
                    await self._committer.run(_marks_unit(dict(self._unwritten)))
        await asyncio.gather(*(c.close(left()) for c in self._couriers.values()))


def _marks_unit(marks: dict[Key, tuple[str, int, int, str]]) -> Callable[[sqlite3.Connection], None]:
    def unit(conn: sqlite3.Connection) -> None:
        state.mark_delivered(conn, [(p, o, at, event, j) for (event, j), (_, p, o, at) in marks.items()])
        checked: dict[str, dict[int, int]] = {}
        for topic, p, o, _ in marks.values():
            checked.setdefault(topic, {})[p] = max(checked.get(topic, {}).get(p, 0), o + 1)
        for topic, offsets in checked.items():
            state.advance_checked(conn, topic, offsets)

    return unit
