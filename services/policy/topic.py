"""``hub.policy`` on Kafka: publishing a signed version, and replaying every version once (for the CLI).

Owns: the record key (the content hash), creating the topic, and a record's timestamp as the moment it was
appended. Reading goes through ``services.shared.follower.TopicFollower`` (from the beginning: the topic is kept
forever, so a restart rebuilds the exact same history); a running service follows it through ``state.PolicyState``.

Does not own: what a record means or whether it is trusted (``version``, ``engine.PolicyStore``).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from aiokafka import ConsumerRecord
from aiokafka.errors import KafkaError

from services.policy.engine import PolicyStore
from services.policy.version import SignedPolicyVersion
from services.shared.errors import KafkaUnavailable
from services.shared.follower import TopicFollower
from services.shared.kafka import POLICY_TOPIC, TopicReport, TopicSpec, ensure_hub_topics, hub_topics, make_producer
from services.shared.settings import KafkaSettings

log = logging.getLogger(__name__)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
Record = tuple[str, bytes, datetime]  # ("hub.policy[0]@17", value, the record's timestamp)


def appended_at(ms: int) -> datetime:
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


async def read_records(bootstrap: str, *, topic: str = POLICY_TOPIC) -> list[Record]:
    """Every record on the policy topic, in order, up to the end as of this call.

    Raises:
        NotFound: the topic does not exist. KafkaUnavailable: the cluster did not answer.
    """
    records: list[Record] = []

    def keep(record: ConsumerRecord[bytes, bytes]) -> None:
        where = f"{record.topic}[{record.partition}]@{record.offset}"
        records.append((where, record.value or b"", appended_at(record.timestamp)))

    await TopicFollower(bootstrap=bootstrap, topic=topic, client_id="evhub-policy-reader", on_record=keep).replay()
    return records


async def load_store(bootstrap: str, store: PolicyStore, *, topic: str = POLICY_TOPIC) -> PolicyStore:
    """Replay the whole topic into ``store`` (refused records are logged and counted by the store)."""
    for where, value, at in await read_records(bootstrap, topic=topic):
        store.ingest(value, where=where, appended_at=at)
    return store
