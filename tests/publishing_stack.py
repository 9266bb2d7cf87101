"""A real publisher stack for tests: real broker topics, real SQLite state, a real content directory, real keys."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from services.publisher import state
from services.publisher.committer import GroupCommitter
from services.publisher.courier import OutboxSettings
from services.publisher.outbox import Outbox
from services.publisher.pipeline import EvidencePublisher
from services.shared.avro import AvroCodec
from services.shared.cluster import KafkaTarget
from services.shared.content import LocalContentStore
from services.shared.errors import KafkaUnavailable
from services.shared.kafka import ensure_topics, evidence_topic, hub_topics, partitions_of
from services.shared.keys import SigningKey
from services.shared.registry import KeyRegistry, issue


def quick_outbox(bootstrap: str) -> OutboxSettings:
    """Delivery bounds for tests: short, so a test of an unacknowledged delivery does not wait long."""
    return OutboxSettings(bootstrap=bootstrap, delivery_timeout_s=5.0, request_timeout_ms=5_000,
                          transaction_timeout_s=30.0, establish_timeout_s=60.0)  # fmt: skip


@dataclass
class Stack:
    publisher: EvidencePublisher
    store: LocalContentStore
    registry: KeyRegistry
    anchor: SigningKey
    signer: SigningKey
    codec: AvroCodec
    jurisdictions: list[str]
    bootstrap: str
    outbox: Outbox

    def topic(self, jurisdiction: str) -> str:
        return evidence_topic(jurisdiction)


@pytest.fixture(scope="session")
def codec() -> AvroCodec:
    return AvroCodec.load()


def trusted_registry(codec: AvroCodec, anchor: SigningKey, signer: SigningKey) -> KeyRegistry:
    registry = KeyRegistry(codec, anchors=[anchor.public])
    registry.apply(issue(codec, anchor, public_key=signer.public, organisation="Syrian documentation group",
                         not_before=datetime.now(UTC) - timedelta(days=1)))  # fmt: skip
    return registry


@pytest.fixture
async def stack(kafka: KafkaTarget, tmp_path: Path, codec: AvroCodec) -> AsyncIterator[Stack]:
    """Publisher with unique jurisdictions (so each test owns its topics) and a registry trusting its key."""
    suffix = uuid.uuid4().hex[:6].upper()
    jurisdictions = [f"DE-{suffix}", f"FR-{suffix}", f"SE-{suffix}"]
    await ensure_topics(kafka.bootstrap, [s for s in hub_topics(jurisdictions) if s.name.startswith("evidence.")])
    anchor, signer = SigningKey.generate(), SigningKey.generate()
    registry = trusted_registry(codec, anchor, signer)
    committer = GroupCommitter(state.connect(tmp_path / "publisher.sqlite3"))
    outbox = Outbox(key=signer.public, codec=codec, committer=committer,
                    topics=[evidence_topic(j) for j in jurisdictions],
                    settings=quick_outbox(kafka.bootstrap))  # fmt: skip
    publisher = EvidencePublisher(
        codec=codec, signer=signer, outbox=outbox, committer=committer,
        organisation="Syrian documentation group", jurisdictions=jurisdictions, registry=registry,
    )  # fmt: skip
    try:
        await outbox.start(timeout_s=60)
        yield Stack(publisher, LocalContentStore(tmp_path / "content"), registry, anchor, signer, codec,
                    jurisdictions, kafka.bootstrap, outbox)  # fmt: skip
    finally:
        await outbox.stop(2.0)
        committer.close()


async def delete_topic(bootstrap: str, topic: str) -> None:
    """Delete a topic and wait until the cluster no longer knows it (deletion is asynchronous)."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics([topic])
    finally:
        await admin.close()
    async with asyncio.timeout(30):
        while True:
            try:
                await partitions_of(bootstrap, topic)
            except KafkaUnavailable:
                return
            await asyncio.sleep(0.2)
