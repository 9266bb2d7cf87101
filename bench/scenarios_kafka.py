"""The baselines every run measures: raw Kafka clients on the same broker, no hub code in the path.

Owns: producing N records (awaited until every one is acknowledged) and consuming N pre-produced records from the
beginning of a topic, with aiokafka (what the hub uses) and with confluent-kafka/librdkafka (what a
performance-minded user would pick instead of the hub).

The aiokafka producers are the hub's own: made by ``services.shared.kafka.make_producer`` like every producer of
the hub (acks=all, idempotent, ``PRODUCER_TUNING``'s 256 KiB batches and no linger, no compression), so the ratio
compares like with like and moves with the hub's settings. ``aiokafka-produce`` writes without transactions (plain
Kafka, the stricter baseline); ``aiokafka-produce-txn`` writes the way the publisher's couriers do — one
transactional producer per topic, rounds of up to :data:`ROUND_RECORDS` records each committed before the next,
records spread over three topics as the hub's 1-3 jurisdictions per event spread them — so what transactions
alone cost is visible. Consumers: auto-commit off, read_committed. Records are :data:`RECORD_BYTES` random bytes
(the size of the hub's signed envelopes in ``bench/scenarios_hub.py``) keyed by one of 64 case ids over
3-partition topics, like ``evidence.<JURISDICTION>``. librdkafka is left at its defaults (batches up to 1 MB) —
what its user would get.

Does not own: hub scenarios (``bench/scenarios_hub.py``), timing and repeats (``bench.harness``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.structs import TopicPartition

from bench.harness import Context, scenario
from services.shared.kafka import make_producer

PARTITIONS: Final = 3
#: Bytes per record: the mean size of the hub's signed envelopes for the sample events of ``bench/scenarios_hub.py``
#: (1,080-1,090 B measured; ``tests/test_bench.py`` keeps the two within 5 %).
RECORD_BYTES: Final = 1_080
#: The publisher's delivery round (``services.publisher.courier.ROUND_RECORDS``).
ROUND_RECORDS: Final = 1_000
KEYS: Final = tuple(f"case-{i:06d}".encode() for i in range(64))
CONSUME_DEADLINE_S: Final = 120.0
#: Full-run sizes, chosen so that each call lasts about 1-6 s on 2 cores (aiokafka produces ~17k/s and consumes
#: ~190k/s, librdkafka ~150k/s and ~550k/s): long enough that a noisy second on a shared machine averages out.
#: Every call is primed first, so the rates compared are steady-state rates whatever N each side uses.
AIOKAFKA_PRODUCE_N: Final = 100_000
AIOKAFKA_CONSUME_N: Final = 300_000
CONFLUENT_PRODUCE_N: Final = 300_000
CONFLUENT_CONSUME_N: Final = 600_000
CONFLUENT_PRODUCER: Final = {"acks": "all", "enable.idempotence": True, "linger.ms": 5}


def _key(i: int) -> bytes:
    return KEYS[i % len(KEYS)]


def _confluent_config(bootstrap: str, **extra: Any) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "client.id": "bench-confluent", **extra}


def _confluent_produce(producer: Any, topic: str, payload: bytes, count: int, on_delivery: Any) -> int:
    """Queue ``count`` records, serving delivery reports when librdkafka's local queue is full; then flush.
    Returns the number of records still unsent after the flush deadline."""
    for i in range(count):
        while True:
            try:
                producer.produce(topic, payload, key=_key(i), on_delivery=on_delivery)
                break
            except BufferError:  # local queue full: serve delivery reports, then retry this record
                producer.poll(0.05)
        if i % 1_000 == 0:
            producer.poll(0)
    remaining: int = producer.flush(120)
    return remaining


async def _preproduce(ctx: Context) -> None:
    """Set-up for the consume scenarios: one topic holding ``events`` records, read from the start each time.
    Written with librdkafka only because it is faster; it is not timed."""
    from confluent_kafka import KafkaException, Producer

    topic = await ctx.topic(partitions=PARTITIONS)
    failures: list[Any] = []

    def on_delivery(err: Any, _msg: Any) -> None:
        if err is not None:
            failures.append(err)

    producer = Producer(_confluent_config(ctx.bootstrap, **CONFLUENT_PRODUCER, **{"queue.buffering.max.kbytes": 65536}))
    remaining = _confluent_produce(producer, topic, ctx.payload, ctx.events, on_delivery)
    if remaining or failures:
        raise KafkaException(f"pre-producing: {remaining} unsent, {len(failures)} failed ({failures[:3]})")
    ctx.state["topic"] = topic


@scenario(name="aiokafka-produce", unit="records/s", events=AIOKAFKA_PRODUCE_N, record_size=RECORD_BYTES, loop_lag=True)
async def aiokafka_produce(ctx: Context) -> int:
    """aiokafka: produce N records, acks=all, idempotent, all acknowledged."""
    return await _aiokafka_produce(ctx)


@scenario(name="aiokafka-produce-rf3", unit="records/s", baseline="aiokafka-produce", events=AIOKAFKA_PRODUCE_N,
          record_size=RECORD_BYTES, cluster=True, loop_lag=True)  # fmt: skip
async def aiokafka_produce_rf3(ctx: Context) -> int:
    """aiokafka on the three-broker cluster, RF 3, min.insync.replicas 2: raw Kafka's cost of replication."""
    return await _aiokafka_produce(ctx)


async def _aiokafka_produce(ctx: Context) -> int:
    topic = await ctx.topic(partitions=PARTITIONS)
    producer = make_producer(ctx.bootstrap, client_id="bench-aiokafka")
    await producer.start()
    try:
        # untimed: metadata, producer id, and a leader that serves every partition (a fresh topic's partitions
        # can answer NotLeaderForPartition for a moment, which would cost a retry inside the measurement)
        await asyncio.gather(*[await producer.send(topic, ctx.payload, partition=p) for p in range(PARTITIONS)])
        with ctx.timed():
            futures = [await producer.send(topic, ctx.payload, key=_key(i)) for i in range(ctx.events)]
            await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return ctx.events


def spread(n: int, names: Sequence[str]) -> list[str]:
    """Where the hub's bench sends event ``n``: to 1, 2 or 3 of ``names`` in turn (two on average), as real
    publications reach one to three jurisdictions."""
    return [names[(n + i) % len(names)] for i in range(n % 3 + 1)]


@scenario(name="aiokafka-produce-txn", unit="records/s", baseline="aiokafka-produce", events=AIOKAFKA_PRODUCE_N,
          record_size=RECORD_BYTES, loop_lag=True)  # fmt: skip
async def aiokafka_produce_txn(ctx: Context) -> int:
    """aiokafka as the publisher delivers: per topic a transactional producer, rounds of up to 1,000 records."""
    topics = [await ctx.topic(partitions=PARTITIONS) for _ in range(3)]
    keys: dict[str, list[bytes]] = {t: [] for t in topics}
    n = 0
    while sum(len(k) for k in keys.values()) < ctx.events:
        for topic in spread(n, topics):
            keys[topic].append(_key(n))
        n += 1
    producers = [
        make_producer(ctx.bootstrap, client_id=f"bench-txn-{t}", transactional_id=f"bench-txn-{t}") for t in topics
    ]  # fmt: skip
    for producer in producers:
        await producer.start()
    try:
        for producer, topic in zip(producers, topics, strict=True):  # untimed: as for aiokafka-produce
            async with producer.transaction():
                await asyncio.gather(*[await producer.send(topic, ctx.payload, partition=p) for p in range(PARTITIONS)])

        async def rounds(producer: AIOKafkaProducer, topic: str) -> None:
            for start in range(0, len(keys[topic]), ROUND_RECORDS):
                await producer.begin_transaction()
                for key in keys[topic][start : start + ROUND_RECORDS]:
                    await producer.send(topic, ctx.payload, key=key)
                await producer.commit_transaction()

        with ctx.timed():
            await asyncio.gather(*(rounds(p, t) for p, t in zip(producers, topics, strict=True)))
    finally:
        for producer in producers:
            await producer.stop()
    return sum(len(k) for k in keys.values())


@contextlib.asynccontextmanager
async def reader(bootstrap: str, topic: str, *, client_id: str = "bench-aiokafka") -> AsyncIterator[AIOKafkaConsumer]:
    """A raw aiokafka consumer at the start of every partition of ``topic``: read_committed, auto-commit off (the
    consume baseline, and every scenario measured against it, read through this)."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, group_id=None, client_id=client_id, enable_auto_commit=False,
        isolation_level="read_committed", auto_offset_reset="earliest",
    )  # fmt: skip
    await consumer.start()
    try:
        partitions = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        yield consumer
    finally:
        await consumer.stop()


@scenario(name="aiokafka-consume", unit="records/s", events=AIOKAFKA_CONSUME_N, record_size=RECORD_BYTES,
          setup=_preproduce)  # fmt: skip
async def aiokafka_consume(ctx: Context) -> int:
    """aiokafka: read N pre-produced records from the beginning, read_committed."""
    async with reader(ctx.bootstrap, ctx.state["topic"]) as consumer:
        seen = 0
        with ctx.timed():
            deadline = time.monotonic() + CONSUME_DEADLINE_S
            while seen < ctx.events:
                batches = await consumer.getmany(timeout_ms=1_000)
                seen += sum(len(records) for records in batches.values())
                if time.monotonic() > deadline:
                    raise TimeoutError(f"read {seen} of {ctx.events} records in {CONSUME_DEADLINE_S:.0f}s")
    return seen


@scenario(name="confluent-produce", unit="records/s", baseline="aiokafka-produce", events=CONFLUENT_PRODUCE_N,
          record_size=RECORD_BYTES)  # fmt: skip
async def confluent_produce(ctx: Context) -> int:
    """confluent-kafka (librdkafka): produce N records, acks=all, idempotent, all acknowledged."""
    from confluent_kafka import KafkaException, Producer

    topic = await ctx.topic(partitions=PARTITIONS)
    failures: list[Any] = []
    acked = 0

    def on_delivery(err: Any, _msg: Any) -> None:
        nonlocal acked
        if err is None:
            acked += 1
        else:
            failures.append(err)

    producer = Producer(_confluent_config(ctx.bootstrap, **CONFLUENT_PRODUCER))
    for p in range(PARTITIONS):  # untimed: as for aiokafka
        producer.produce(topic, ctx.payload, partition=p, on_delivery=on_delivery)
    producer.flush(30)
    with ctx.timed():
        remaining = _confluent_produce(producer, topic, ctx.payload, ctx.events, on_delivery)
    if remaining or failures or acked != ctx.events + PARTITIONS:
        raise KafkaException(f"{remaining} unsent, {len(failures)} failed ({failures[:3]}), {acked} acked")
    return ctx.events


@scenario(
    name="confluent-consume",
    unit="records/s",
    baseline="aiokafka-consume",
    events=CONFLUENT_CONSUME_N,
    record_size=RECORD_BYTES,
    setup=_preproduce,
)
async def confluent_consume(ctx: Context) -> int:
    """confluent-kafka (librdkafka): read N pre-produced records from the beginning, read_committed."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException
    from confluent_kafka import TopicPartition as CTopicPartition

    topic: str = ctx.state["topic"]
    consumer = Consumer(_confluent_config(
        ctx.bootstrap, **{"group.id": f"bench-{topic}", "enable.auto.commit": False,
                          "isolation.level": "read_committed", "auto.offset.reset": "earliest"},
    ))  # fmt: skip
    try:
        consumer.list_topics(topic, timeout=10)  # untimed: connection and metadata, as aiokafka's start()
        consumer.assign([CTopicPartition(topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)])
        seen = 0
        with ctx.timed():
            deadline = time.monotonic() + CONSUME_DEADLINE_S
            while seen < ctx.events:
                # consume() waits for num_messages or the timeout: never ask for more than remain
                for message in consumer.consume(num_messages=min(1_000, ctx.events - seen), timeout=1.0):
                    if message.error() is not None:
                        raise KafkaException(message.error())
                    seen += 1
                if time.monotonic() > deadline:
                    raise TimeoutError(f"read {seen} of {ctx.events} records in {CONSUME_DEADLINE_S:.0f}s")
    finally:
        consumer.close()
    return seen
