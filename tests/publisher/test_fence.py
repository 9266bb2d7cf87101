"""Taking the key's fence when Kafka is not answering yet is retried, never fatal.

Right after a frozen broker comes back, aiokafka's metadata may name no broker yet, and its transaction-coordinator
look-up then fails an assertion ("Did we not perform bootstrap?") instead of raising a Kafka error. Seen once in
`tests/faults/test_broker_faults.py`: the courier took it for a defect and the publisher stopped.
"""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaProducer

from services.publisher.courier import take_fence
from services.shared.cluster import KafkaTarget
from services.shared.errors import KafkaUnavailable
from tests.publishing_stack import quick_outbox

pytestmark = pytest.mark.kafka


async def test_a_coordinator_lookup_before_metadata_names_a_broker_is_kafka_unavailable(
    kafka: KafkaTarget, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def start(self: AIOKafkaProducer) -> None:
        await self.client.bootstrap()
        raise AssertionError("Did we not perform bootstrap?")  # what aiokafka's coordinator_lookup asserts

    monkeypatch.setattr(AIOKafkaProducer, "start", start)
    with pytest.raises(KafkaUnavailable, match=r"fence on evidence\.FENCE"):
        await take_fence("0" * 64, "evidence.FENCE", quick_outbox(kafka.bootstrap))
