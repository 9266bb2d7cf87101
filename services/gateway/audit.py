"""Write-ahead audit: the gateway's producer of ``hub.audit`` records, and the rule that nothing is released unless
Kafka acknowledged the entries first.

Owns: batching the entries of one fetch or download into as few ``hub.audit`` records as fit
(``audit_records.split_batches``), producing them with acks=all + idempotence, waiting for every acknowledgement
within ``timeout_s``, and returning where each entry landed (topic, partition, offset, index in the batch) — a
location that exists only once the broker assigned it, so a response carrying it proves the entry was durable
before the response was written. Any failure or timeout raises :class:`AuditUnavailable` (503, Retry-After) and the
caller releases nothing. The producer is rebuilt after a failure, so the gateway recovers by itself when Kafka
or the topic is back.

An entry whose batch was sent but not acknowledged in time may still land later: the log can hold a decision
whose response was never sent (a release that did not happen), never a release without its entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from services.gateway.release import AuditLocation
from services.shared.audit_records import encode_batch, encode_entry, split_batches
from services.shared.avro import AvroCodec
from services.shared.errors import AuditUnavailable
from services.shared.kafka import make_producer

log = logging.getLogger(__name__)


class AuditWriter:
    def __init__(self, *, bootstrap: str, topic: str, gateway: str, codec: AvroCodec, timeout_s: float,
                 client_id: str) -> None:  # fmt: skip
        self._bootstrap, self.topic, self._gateway = bootstrap, topic, gateway
        self._codec, self._timeout_s, self._client_id = codec, timeout_s, client_id
        self._producer: AIOKafkaProducer | None = None
        self._retiring: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self.batches = 0
        self.entries = 0
        self.failures = 0

    def encode(self, entry: dict[str, Any]) -> bytes:
        return encode_entry(self._codec, entry)

    async def _ready(self) -> AIOKafkaProducer:
        async with self._lock:
            if self._producer is None:
                timeout_ms = int(self._timeout_s * 1000)
                producer = make_producer(self._bootstrap, client_id=self._client_id, linger_ms=1,
                                         max_batch_size=1 << 20, request_timeout_ms=timeout_ms)  # fmt: skip
                try:
                    await producer.start()
                except KafkaError as exc:
                    await producer.stop()
                    raise AuditUnavailable(f"hub.audit unreachable: {exc}") from exc
                except BaseException:  # cancelled (the write timed out) while starting: never leak the producer
                    await asyncio.shield(producer.stop())
                    raise
                self._producer = producer
            return self._producer

    async def start(self) -> None:
        """Start the producer now (at the gateway's start), so that the first office's read does not wait for it.
        A failure is not fatal: the next write tries again."""
        try:
            async with asyncio.timeout(self._timeout_s):
                await self._ready()
        except (AuditUnavailable, TimeoutError) as exc:
            log.warning("hub.audit producer not started yet (%r); the first write will try again", exc)

    def _retire(self, producer: AIOKafkaProducer) -> None:
        current = self._producer
        if current is not None and current is producer:
            self._producer = None
            task = asyncio.create_task(current.stop())
            self._retiring.add(task)
            task.add_done_callback(self._retiring.discard)

    async def write(self, entries: Sequence[bytes]) -> list[AuditLocation]:
        """Produce the encoded entries and wait until Kafka acknowledged every one of them.

        Raises:
            AuditUnavailable: not acknowledged within ``timeout_s`` (broker down, topic missing, …).
        """
        if not entries:
            return []
        groups = split_batches(entries)
        producer: AIOKafkaProducer | None = None
        try:
            async with asyncio.timeout(self._timeout_s):
                producer = await self._ready()
                futures = []
                for group in groups:
                    record = encode_batch(self._codec, batch_id=str(uuid.uuid4()), gateway=self._gateway,
                                          entries=group)  # fmt: skip
                    futures.append(await producer.send(self.topic, record))
                acks = await asyncio.gather(*futures)
        except (TimeoutError, KafkaError) as exc:
            self.failures += 1
            if producer is not None:
                self._retire(producer)  # rebuilt on the next write: recovers by itself when Kafka is back
            log.warning("audit write of %d entries failed: %r", len(entries), exc)
            raise AuditUnavailable("the audit log did not acknowledge in time; nothing was released") from exc
        self.batches += len(groups)
        self.entries += len(entries)
        out = []
        for group, meta in zip(groups, acks, strict=True):
            out += [AuditLocation(self.topic, meta.partition, meta.offset, i) for i in range(len(group))]
        return out

    async def close(self) -> None:
        if self._producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._producer.stop(), 10)
            self._producer = None
        for task in list(self._retiring):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 10)
