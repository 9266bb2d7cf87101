"""Replaying and following the hub's keep-forever and compacted control topics (``hub.keys``, ``hub.policy``, …).

Owns: the one way a service reads such a topic — every partition assigned (no consumer group, nothing committed),
from the beginning to the end offsets seen at the start (:meth:`TopicFollower.replay`), then on, following new
records for as long as the service runs (:meth:`TopicFollower.run`); knowing when the replay has caught up; knowing
how old its view is (:meth:`TopicFollower.age`): the time since it last *knew* it held every record — a fetch
answered and nothing left to read. A cluster that stops answering makes the view age; a service refuses what it
must not do on an old view (:meth:`TopicFollower.check_fresh`). Kafka's errors are translated here, once.

Does not own: what a record means (the ``on_record`` callback: ``KeyRegistry.apply``, ``PolicyStore.ingest``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Final, TypeAlias

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError

from services.shared.errors import KafkaUnavailable, NotFound, StaleView
from services.shared.kafka import make_consumer, partitions_of

log = logging.getLogger(__name__)

Record: TypeAlias = ConsumerRecord[bytes, bytes]
OnRecord = Callable[[Record], object]
POLL_MS: Final = 500


class TopicFollower:
    """One topic, all its partitions, from the beginning. ``on_record`` sees every record once, in offset order
    per partition; an exception it raises stops the follower (and, through the service's done-callback, fails the
    service loudly) — callbacks skip and count bad records themselves."""

    def __init__(
        self, *, bootstrap: str, topic: str, client_id: str, on_record: OnRecord,
        clock: Callable[[], float] = time.time, poll_ms: int = POLL_MS,
    ) -> None:  # fmt: skip
        self.topic = topic
        self._bootstrap = bootstrap
        self._client_id = client_id
        self._on_record = on_record
        self._clock = clock
        self._poll_ms = poll_ms
        self.caught_up = asyncio.Event()
        self.applied = 0
        self._fresh_at: float | None = None

    async def _start(self) -> tuple[AIOKafkaConsumer, list[TopicPartition]]:
        try:
            numbers = await partitions_of(self._bootstrap, self.topic)
        except KafkaUnavailable as exc:
            if "does not exist" in exc.detail:
                raise NotFound(f"topic {self.topic} does not exist") from exc
            raise
        partitions = [TopicPartition(self.topic, p) for p in numbers]
        consumer = make_consumer(self._bootstrap, group_id=None, client_id=self._client_id)
        try:
            await consumer.start()
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
        except KafkaError as exc:
            await consumer.stop()
            raise KafkaUnavailable(f"could not read {self.topic}: {exc}") from exc
        except BaseException:
            await consumer.stop()
            raise
        return consumer, partitions

    async def _pass(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> bool:
        """One fetch applied. Returns True if every partition was at its end when the fetch was answered."""
        batches = await consumer.getmany(*partitions, timeout_ms=self._poll_ms)
        for tp in partitions:
            for record in batches.get(tp, ()):
                self._on_record(record)
                self.applied += 1
        current, oldest = True, None
        for tp in partitions:
            end = consumer.last_stable_offset(tp)
            end = consumer.highwater(tp) if end is None or end < 0 else end
            polled = consumer.last_poll_timestamp(tp)
            if end is None or polled is None or await consumer.position(tp) < end:
                current = False
                continue
            oldest = polled if oldest is None else min(oldest, polled)
        if current and oldest is not None:
            self._fresh_at = oldest / 1000
        return current

    async def replay(self, *, timeout_s: float = 30.0) -> None:
        """Apply every record up to the end offsets as of this call, then stop.

        Raises:
            NotFound: the topic does not exist. KafkaUnavailable: the cluster did not answer, or the topic could
                not be read to its end within ``timeout_s``.
        """
        consumer, partitions = await self._start()
        try:
            async with asyncio.timeout(timeout_s):
                await self._to_end(consumer, partitions)
        except TimeoutError as exc:
            raise KafkaUnavailable(f"could not read {self.topic} to its end in {timeout_s:.0f}s") from exc
        except KafkaError as exc:
            raise KafkaUnavailable(f"could not read {self.topic}: {exc}") from exc
        finally:
            await consumer.stop()

    async def _to_end(self, consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        started = self._clock()
        while True:
            pending = [tp for tp in partitions if await consumer.position(tp) < ends[tp]]
            if not pending:
                break
            batches = await consumer.getmany(*pending, timeout_ms=self._poll_ms)
            for tp in pending:
                for record in batches.get(tp, ()):
                    if record.offset < ends[tp]:
                        self._on_record(record)
                        self.applied += 1
                    else:  # read past the end seen at the start: the next pass (or run) takes it
                        consumer.seek(tp, record.offset)
                        break
        self._fresh_at = max(self._fresh_at or 0.0, started)
        self.caught_up.set()

    async def run(self) -> None:
        """Replay, set :attr:`caught_up`, then follow until cancelled. A cluster outage does not end it: the
        consumer reconnects by itself, and meanwhile :meth:`age` grows.

        Raises:
            NotFound: the topic does not exist at start. KafkaUnavailable: the cluster failed unrecoverably.
        """
        consumer, partitions = await self._start()
        try:
            await self._to_end(consumer, partitions)
            log.info("%s replayed: %d records", self.topic, self.applied)
            while True:
                await self._pass(consumer, partitions)
        except KafkaError as exc:
            raise KafkaUnavailable(f"lost {self.topic}: {exc}") from exc
        finally:
            await consumer.stop()

    def age(self) -> float | None:
        """Seconds since the follower last knew it held every record of the topic; None before the replay."""
        if self._fresh_at is None or not self.caught_up.is_set():
            return None
        return max(0.0, self._clock() - self._fresh_at)

    async def confirmed_after(self, moment: float, *, timeout_s: float) -> bool:
        """Wait (at most ``timeout_s``) until the follower has confirmed holding every record appended before
        ``moment`` (a ``clock`` reading). True if it has; False on timeout."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while self._fresh_at is None or self._fresh_at <= moment:
            if asyncio.get_running_loop().time() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def check_fresh(self, max_age_s: float) -> None:
        """Raises: StaleView before the replay has caught up, or when the view is older than ``max_age_s``."""
        age = self.age()
        if age is None:
            raise StaleView(f"{self.topic} is still being replayed")
        if age > max_age_s:
            raise StaleView(f"the view of {self.topic} is {age:.0f}s old (more than {max_age_s:.0f}s)")
