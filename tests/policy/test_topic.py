"""``hub.policy`` on the real broker: the broker stamps each record, so a pusher cannot back-date a version by
forging its record's timestamp."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.policy.engine import PolicyStore
from services.policy.pack import PolicyPack
from services.policy.topic import ensure_policy_topic, load_store, read_records
from services.policy.version import sign, trusted_keys
from services.shared.cluster import KafkaTarget
from services.shared.kafka import make_producer
from services.shared.keys import SigningKey
from services.shared.settings import KafkaSettings

pytestmark = pytest.mark.kafka


async def test_a_forged_record_timestamp_does_not_back_date_a_version(
    kafka: KafkaTarget, topic_name: str, admin_key: SigningKey, pack: PolicyPack
) -> None:
    await ensure_policy_topic(kafka.bootstrap, topic_name, kafka=KafkaSettings())
    last_year = datetime.now(UTC) - timedelta(days=365)
    signed = sign(pack.version(author="board", effective_from=last_year), admin_key)
    producer = make_producer(kafka.bootstrap, client_id="forger")
    await producer.start()
    try:  # the client asks for a timestamp from last year, just after the version's effective_from
        forged_ms = int((last_year + timedelta(seconds=1)).timestamp() * 1000)
        await producer.send_and_wait(topic_name, signed.to_record(), timestamp_ms=forged_ms)
    finally:
        await producer.stop()
    [(_, _, stamped)] = await read_records(kafka.bootstrap, topic=topic_name)
    assert stamped > datetime.now(UTC) - timedelta(minutes=5), "LogAppendTime: the broker's clock, not the client's"
    store = await load_store(kafka.bootstrap, PolicyStore(trusted=trusted_keys([admin_key.public])), topic=topic_name)
    assert (store.history(), store.rejected) == ([], {"PolicyError": 1})
