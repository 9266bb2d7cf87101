"""Bytes in, the same bytes out, in order, through the real broker with the hub's own clients."""

from __future__ import annotations

import asyncio
import os

import pytest

from services.shared.cluster import KafkaTarget
from services.shared.kafka import TopicSpec, ensure_topics, make_consumer, make_producer

pytestmark = pytest.mark.kafka


async def test_produce_and_consume_back_bytes_and_order(kafka: KafkaTarget, topic_name: str) -> None:
    await ensure_topics(kafka.bootstrap, [TopicSpec(topic_name, 3)])
    sent = [(f"case-{i % 4}".encode(), os.urandom(64) + i.to_bytes(4, "big")) for i in range(200)]

    producer = make_producer(kafka.bootstrap, client_id="e2e")
    await producer.start()
    try:
        futures = [await producer.send(topic_name, value, key=key) for key, value in sent]
        await producer.flush()
        metadata = [f.result() for f in futures]
    finally:
        await producer.stop()

    consumer = make_consumer(kafka.bootstrap, topic_name, group_id=f"g-{topic_name}", client_id="e2e")
    await consumer.start()
    received: list[tuple[bytes | None, bytes | None]] = []
    try:
        async with asyncio.timeout(30):
            while len(received) < len(sent):
                batch = await consumer.getmany(timeout_ms=1000)
                for records in batch.values():
                    received.extend((r.key, r.value) for r in records)
        await consumer.commit()
    finally:
        await consumer.stop()

    assert sorted(received) == sorted(sent)
    for key in {k for k, _ in sent}:  # one case → one partition → the order it was sent in
        assert [v for k, v in received if k == key] == [v for k, v in sent if k == key]
        assert len({m.partition for (k, _), m in zip(sent, metadata, strict=True) if k == key}) == 1
