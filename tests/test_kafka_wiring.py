"""Hub producers and consumers can't lose or duplicate records by default, and topics are created right."""

from __future__ import annotations

import struct
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from services.policy.topic import ensure_policy_topic
from services.shared.cluster import KafkaTarget
from services.shared.errors import ConfigurationError, KafkaUnavailable
from services.shared.kafka import (
    TopicSpec,
    ensure_topics,
    evidence_topic,
    hub_topics,
    make_consumer,
    make_producer,
)
from services.shared.settings import KafkaSettings

pytestmark = pytest.mark.kafka


@pytest.mark.parametrize(
    "options",
    [{"acks": 1}, {"acks": 0}, {"enable_idempotence": False}],
    ids=["acks=1", "acks=0", "no-idempotence"],
)
async def test_producer_factory_refuses_to_weaken_delivery(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="refusing to weaken"):
        make_producer("127.0.0.1:9", client_id="t", **options)


@pytest.mark.parametrize(
    "options",
    [{"enable_auto_commit": True}, {"isolation_level": "read_uncommitted"}],
    ids=["auto-commit", "read-uncommitted"],
)
async def test_consumer_factory_refuses_auto_commit_and_dirty_reads(options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="refusing to weaken"):
        make_consumer("127.0.0.1:9", "x", group_id="g", client_id="t", **options)


async def _create(bootstrap: str, name: str, config: dict[str, str]) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 1, 1, topic_configs=config)])
    finally:
        await admin.close()


async def test_factory_producer_is_idempotent_on_the_wire(kafka: KafkaTarget, topic_name: str) -> None:
    """The broker's own log shows a producer id on the hub's batches (-1 would mean no idempotence).

    Idempotent producers are acks=all by construction (aiokafka refuses any other acks with idempotence), so
    this also shows that no factory default fell back to aiokafka's acks=1. A single-node broker can't show
    acks=all directly: Kafka 4 caps the effective min.insync.replicas at the replication factor.
    """
    if kafka.log_dir is None:
        pytest.skip("reads the embedded broker's log segments")
    await _create(kafka.bootstrap, topic_name, {})
    hub = make_producer(kafka.bootstrap, client_id="test")
    await hub.start()
    try:
        await hub.send_and_wait(topic_name, b"x", key=b"k")
    finally:
        await hub.stop()
    segment = next((kafka.log_dir / f"{topic_name}-0").glob("*.log")).read_bytes()
    # Record batch v2 header: baseOffset i64, length i32, leaderEpoch i32, magic i8, crc u32, attributes i16,
    # lastOffsetDelta i32, baseTimestamp i64, maxTimestamp i64, producerId i64, producerEpoch i16, baseSequence i32
    magic = segment[16]
    producer_id, _epoch, base_sequence = struct.unpack_from(">qhi", segment, 43)
    assert magic == 2
    assert producer_id >= 0, "no producer id: the batch was not written by an idempotent producer"
    assert base_sequence == 0


async def test_ensure_topics_is_idempotent_and_keeps_evidence_forever(kafka: KafkaTarget) -> None:
    suffix = uuid.uuid4().hex[:4].upper()
    jurisdiction = f"DE-{suffix}"
    specs = [s for s in hub_topics([jurisdiction]) if s.name == evidence_topic(jurisdiction)]
    assert await ensure_topics(kafka.bootstrap, specs) == [f"evidence.DE-{suffix}"]
    assert await ensure_topics(kafka.bootstrap, specs) == []

    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:
        described = await admin.describe_topics([evidence_topic(jurisdiction)])
        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, evidence_topic(jurisdiction))])
    finally:
        await admin.close()
    assert len(described[0]["partitions"]) == 3
    entries = {e[0]: e[1] for e in configs[0].resources[0][4]}
    assert entries["retention.ms"] == "-1"
    assert entries["cleanup.policy"] == "delete"


async def test_invalid_topic_config_is_reported_as_unavailable_not_crash(kafka: KafkaTarget, topic_name: str) -> None:
    with pytest.raises(KafkaUnavailable, match=topic_name):
        await ensure_topics(kafka.bootstrap, [TopicSpec(topic_name, 1, {"cleanup.policy": "shred"})])


@pytest.mark.parametrize("code", ["de", "DEU", "", "D E", "../x"])
def test_jurisdiction_codes_are_validated(code: str) -> None:
    with pytest.raises(ConfigurationError, match="not a jurisdiction"):
        evidence_topic(code)


async def test_a_hub_topic_gets_the_configured_replication_factor_and_min_insync_replicas(
    kafka: KafkaTarget, topic_name: str
) -> None:
    """Issue 8: hub.policy was created at replication factor 1 by whichever service came first."""
    with pytest.raises(KafkaUnavailable, match="InvalidReplicationFactor"):  # one broker cannot hold two replicas
        await ensure_policy_topic(kafka.bootstrap, topic_name, kafka=KafkaSettings(replication_factor=2))
    report = await ensure_policy_topic(kafka.bootstrap, topic_name, kafka=KafkaSettings(min_insync_replicas=2))
    assert (report.created, report.weaker) == ([topic_name], [])
    configs = await _configs(kafka.bootstrap, topic_name)
    assert (configs["min.insync.replicas"], configs["unclean.leader.election.enable"]) == ("2", "false")
    assert (configs["retention.ms"], configs["message.timestamp.type"]) == ("-1", "LogAppendTime")


async def test_an_existing_topic_with_weaker_settings_is_reported_naming_topic_and_setting(
    kafka: KafkaTarget, topic_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    await _create(kafka.bootstrap, topic_name, {"retention.ms": str(7 * 86_400_000), "min.insync.replicas": "1"})
    report = await ensure_policy_topic(kafka.bootstrap, topic_name, kafka=KafkaSettings(min_insync_replicas=2))
    assert report.created == []
    assert {(w.setting, w.wanted, w.actual) for w in report.weaker} == {
        ("min.insync.replicas", "2", "1"), ("retention.ms", "-1", "604800000"),
        ("message.timestamp.type", "LogAppendTime", "CreateTime"),
    }  # fmt: skip
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"topic {topic_name}: min.insync.replicas is 1, the hub needs 2" in w for w in warnings), warnings
    stronger = await ensure_policy_topic(kafka.bootstrap, topic_name, kafka=KafkaSettings(min_insync_replicas=1))
    assert "min.insync.replicas" not in {w.setting for w in stronger.weaker}, "more than needed is not weaker"


async def _configs(bootstrap: str, topic: str) -> dict[str, str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        [response] = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, topic)])
    finally:
        await admin.close()
    return {entry[0]: entry[1] for entry in response.resources[0][4]}
