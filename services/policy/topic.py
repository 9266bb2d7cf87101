"""``hub.policy`` on Kafka: publishing a signed version, replaying every version, following new ones.

Owns: the record key (the content hash), reading the topic from its beginning (it is kept forever, so a restart
rebuilds the exact same history), knowing when the replay has caught up, and translating aiokafka errors.

Does not own: what a record means or whether it is trusted (``version``, ``engine.PolicyStore``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from services.policy.engine import PolicyStore
from services.policy.version import SignedPolicyVersion
from services.shared.errors import KafkaUnavailable, NotFound
from services.shared.kafka import (
    POLICY_TOPIC,
    TopicReport,
    TopicSpec,
    ensure_hub_topics,
    hub_topics,
    make_consumer,
    make_producer,
)
from services.shared.settings import KafkaSettings

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Record = tuple[str, bytes, datetime]  # ("hub.policy[0]@17", value, the record's timestamp)


def _timestamp(ms: int) -> datetime:
    """A Kafka record timestamp (milliseconds since the epoch) as an aware datetime."""
    return _EPOCH + timedelta(milliseconds=ms)


async def ensure_policy_topic(bootstrap: str, topic: str = POLICY_TOPIC, *, kafka: KafkaSettings) -> TopicReport:
    """Create the policy topic (retention forever, broker timestamps) with the configured replication factor and
    ``min.insync.replicas`` if it does not exist; report weaker settings if it does (``ensure_hub_topics``)."""
    [spec] = [s for s in hub_topics([]) if s.name == POLICY_TOPIC]
    return await ensure_hub_topics(bootstrap, [TopicSpec(topic, spec.partitions, spec.config)], kafka=kafka)


async def publish_version(
    bootstrap: str, signed: SignedPolicyVersion, *, topic: str = POLICY_TOPIC, kafka: KafkaSettings
) -> str:
    """Append one signed version (acks=all). Returns where it landed, e.g. ``hub.policy[0]@3``.

    Raises:
        KafkaUnavailable: the cluster did not accept the record.
    """
    await ensure_policy_topic(bootstrap, topic, kafka=kafka)
    producer = make_producer(bootstrap, client_id="evhub-policy-publisher")
    try:
        await producer.start()
        meta = await producer.send_and_wait(topic, signed.to_record(), key=signed.content_hash.encode("ascii"))
    except KafkaError as exc:
        raise KafkaUnavailable(f"could not publish to {topic}: {exc}") from exc
    finally:
        await producer.stop()
    return f"{topic}[{meta.partition}]@{meta.offset}"


async def _require_topic(bootstrap: str, topic: str) -> None:
    """Fail fast: a consumer subscribed to a missing topic would wait for it instead of saying so."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, client_id="evhub-policy-reader")
    try:
        await admin.start()
        exists = topic in set(await admin.list_topics())
    except KafkaError as exc:
        raise KafkaUnavailable(f"Kafka at {bootstrap} did not answer: {exc}") from exc
    finally:
        await admin.close()
    if not exists:
        raise NotFound(f"topic {topic} does not exist (no policy version was ever pushed there)")


async def start_reader(bootstrap: str, topic: str, *, client_id: str) -> AIOKafkaConsumer:
    """A started consumer assigned to every partition of ``topic``, positioned at the beginning, no group.

    Raises:
        NotFound: the topic does not exist. KafkaUnavailable: the cluster did not answer.
    """
    await _require_topic(bootstrap, topic)
    consumer = make_consumer(bootstrap, topic, group_id=None, client_id=client_id)
    try:
        await consumer.start()  # without a group, a subscription is assigned every partition at start
        await consumer.seek_to_beginning(*consumer.assignment())
    except KafkaError as exc:
        await consumer.stop()
        raise KafkaUnavailable(f"could not read {topic}: {exc}") from exc
    except BaseException:
        await consumer.stop()
        raise
    return consumer


async def _drain(consumer: AIOKafkaConsumer, on_record: Callable[[Record], object], *, follow: bool,
                 caught_up: asyncio.Event | None = None) -> None:  # fmt: skip
    partitions = list(consumer.assignment())
    ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
    pending = {tp for tp, end in ends.items() if end > 0}
    if not pending and caught_up is not None:
        caught_up.set()
    while follow or pending:
        batches = await consumer.getmany(timeout_ms=500)
        for tp, records in batches.items():
            for rec in records:
                on_record((f"{tp.topic}[{tp.partition}]@{rec.offset}", rec.value or b"", _timestamp(rec.timestamp)))
        for tp in list(pending):
            if await consumer.position(tp) >= ends[tp]:
                pending.discard(tp)
        if not pending and caught_up is not None and not caught_up.is_set():
            caught_up.set()


async def read_records(bootstrap: str, *, topic: str = POLICY_TOPIC) -> list[Record]:
    """Every record on the policy topic, in order, up to the end as of this call.

    Raises:
        NotFound: the topic does not exist. KafkaUnavailable: the cluster did not answer.
    """
    consumer = await start_reader(bootstrap, topic, client_id="evhub-policy-reader")
    records: list[Record] = []
    try:
        await _drain(consumer, records.append, follow=False)
    except KafkaError as exc:
        raise KafkaUnavailable(f"could not read {topic}: {exc}") from exc
    finally:
        await consumer.stop()
    return records


async def load_store(bootstrap: str, store: PolicyStore, *, topic: str = POLICY_TOPIC) -> PolicyStore:
    """Replay the whole topic into ``store`` (refused records are logged and counted by the store)."""
    for where, value, appended_at in await read_records(bootstrap, topic=topic):
        store.ingest(value, where=where, appended_at=appended_at)
    return store


async def follow(consumer: AIOKafkaConsumer, store: PolicyStore, caught_up: asyncio.Event) -> None:
    """Apply every record to ``store`` forever; set ``caught_up`` once the replay reaches the end offsets seen at
    start. Until then, callers must not decide (they would decide under an incomplete history).

    Raises:
        KafkaUnavailable: the cluster failed while following.
    """
    try:
        await _drain(consumer, lambda r: store.ingest(r[1], where=r[0], appended_at=r[2]), follow=True,
                     caught_up=caught_up)  # fmt: skip
    except KafkaError as exc:
        raise KafkaUnavailable(f"lost the policy topic: {exc}") from exc
