"""The policy service over HTTP against the real broker: decisions, history, problem+json, restarts."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from services.policy.pack import PolicyPack
from services.policy.service import create_app
from services.policy.settings import PolicySettings
from services.policy.topic import ensure_policy_topic, publish_version
from services.policy.version import PolicyVersion, SignedPolicyVersion, sign
from services.shared.cluster import KafkaTarget
from services.shared.errors import ConfigurationError
from services.shared.http import PROBLEM_JSON as PROBLEM
from services.shared.kafka import make_producer
from services.shared.keys import SigningKey
from services.shared.settings import KafkaSettings

pytestmark = pytest.mark.kafka

Client = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]
ITEM = {"item_id": "item-1", "jurisdictions": ["DE"], "case_ids": ["CASE-SY-001"], "classification": "SECRET",
        "protected_fields": ["WITNESS_IDENTIFYING"]}  # fmt: skip


async def ready(client: TestClient[web.Request, web.Application], versions: int, within: float = 20) -> Any:
    """Wait, with a deadline, until the service has replayed the topic and holds ``versions`` versions."""
    async with asyncio.timeout(within):
        while True:
            response = await client.get("/healthz")
            if response.status == 200:
                body = await response.json()
                if body["versions"] >= versions:
                    return body
            await asyncio.sleep(0.05)


@pytest.fixture
def signed_v1(pack: PolicyPack, admin_key: SigningKey) -> SignedPolicyVersion:
    """Effective from the current second: versions pushed to a real topic may not be back-dated."""
    return sign(pack.version(author="policy-board", effective_from=datetime.now(UTC).replace(microsecond=0)), admin_key)


def v2_of(pack: PolicyPack) -> PolicyVersion:
    """Effective tomorrow: after v1, and not before it is appended."""
    tomorrow = datetime.now(UTC) + timedelta(days=1)
    return pack.version(author="policy-board", effective_from=tomorrow).model_copy(
        update={"policy_text": pack.policy_text + '\n@id("extra")\nforbid(principal, action, resource) '
                'when { principal.jurisdiction == "XX" };\n'})  # fmt: skip


async def _produce(bootstrap: str, topic: str, *values: bytes) -> None:
    producer = make_producer(bootstrap, client_id="test")
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(topic, value)
    finally:
        await producer.stop()


def app_for(kafka: KafkaTarget, topic: str, key: SigningKey) -> web.Application:
    return create_app(PolicySettings(topic=topic), bootstrap=kafka.bootstrap, keys=[key.public])


async def test_decisions_and_history_over_http(
    aiohttp_client: Client, kafka: KafkaTarget, topic_name: str, admin_key: SigningKey,
    signed_v1: SignedPolicyVersion,
) -> None:  # fmt: skip
    await publish_version(kafka.bootstrap, signed_v1, topic=topic_name, kafka=KafkaSettings())
    client = await aiohttp_client(app_for(kafka, topic_name, admin_key))
    await ready(client, 1)

    at = (signed_v1.version.effective_from + timedelta(hours=1)).isoformat()
    response = await client.post("/v1/decisions", json={"office": "DE-GBA-WCU", "action": "ReadItem", "item": ITEM,
                                                        "at": at})  # fmt: skip
    assert response.status == 200
    decision = await response.json()
    assert decision["allowed"] is True
    assert decision["policy_version"] == signed_v1.content_hash
    assert decision["determining_policies"] == ["item-jurisdiction-and-assigned-case"]

    response = await client.post("/v1/decisions", json={"office": "SE-IPC", "action": "ReadFeed",
                                                        "feed": {"jurisdiction": "DE"}})  # fmt: skip
    assert (await response.json())["allowed"] is False

    versions = await (await client.get("/v1/versions")).json()
    assert [v["hash"] for v in versions["versions"]] == [signed_v1.content_hash]
    in_force = await (await client.get("/v1/versions/in-force", params={"at": "2024-01-01T00:00:00+00:00"})).json()
    assert in_force["version"] is None
    one = await (await client.get(f"/v1/versions/{signed_v1.content_hash[:12]}")).json()
    assert one["policy_text"] == signed_v1.version.policy_text


BAD_REQUESTS = {
    "not-json": ("/v1/decisions", b"{", 422),
    "no-resource": ("/v1/decisions", b'{"office":"DE-GBA-WCU","action":"ReadItem"}', 422),
    "naive-time": ("/v1/decisions", b'{"office":"o","action":"ReadFeed","feed":{"jurisdiction":"DE"},'
                                    b'"at":"2026-01-01T00:00:00"}', 422),
    "unknown-field": ("/v1/decisions", b'{"office":"o","action":"a","feed":{"jurisdiction":"DE"},"x":1}', 422),
    "corrupt-record": ("/v1/versions", b"garbage", 422),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_REQUESTS.values(), ids=BAD_REQUESTS.keys())
async def test_bad_input_is_problem_json(
    aiohttp_client: Client, kafka: KafkaTarget, topic_name: str, admin_key: SigningKey,
    case: tuple[str, bytes, int],
) -> None:  # fmt: skip
    path, body, status = case
    client = await aiohttp_client(app_for(kafka, topic_name, admin_key))
    await ready(client, 0)
    response = await client.post(path, data=body, headers={"content-type": "application/json"})
    assert response.status == status
    assert response.content_type == PROBLEM
    problem = await response.json()
    assert problem["status"] == status
    assert {"type", "title", "detail"} <= problem.keys()


async def test_unknown_version_is_404_problem(
    aiohttp_client: Client, kafka: KafkaTarget, topic_name: str, admin_key: SigningKey
) -> None:
    client = await aiohttp_client(app_for(kafka, topic_name, admin_key))
    await ready(client, 0)
    for path in ("/v1/versions/" + "0" * 64, "/no/such/route"):
        response = await client.get(path)
        assert (response.status, response.content_type) == (404, PROBLEM)


async def test_posted_versions_are_checked_before_publishing(
    aiohttp_client: Client, kafka: KafkaTarget, topic_name: str, admin_key: SigningKey,
    signed_v1: SignedPolicyVersion, pack: PolicyPack,
) -> None:  # fmt: skip
    client = await aiohttp_client(app_for(kafka, topic_name, admin_key))
    await ready(client, 0)
    backdated = signed_v1.version.model_copy(update={"effective_from": datetime.now(UTC) - timedelta(minutes=5)})
    response = await client.post("/v1/versions", data=sign(backdated, admin_key).to_record())
    assert (response.status, response.content_type) == (422, PROBLEM)
    assert "back-dated" in (await response.json())["detail"]
    assert (await client.post("/v1/versions", data=signed_v1.to_record())).status == 202
    await ready(client, 1)

    invalid = sign(v2_of(pack).model_copy(update={"policy_text": "permit(principal, action resource);"}), admin_key)
    response = await client.post("/v1/versions", data=invalid.to_record())
    assert (response.status, response.content_type) == (422, PROBLEM)
    assert "unexpected token" in str((await response.json())["diagnostics"])

    unsigned = SignedPolicyVersion(version=v2_of(pack))
    response = await client.post("/v1/versions", data=unsigned.to_record())
    problem = await response.json()
    assert (response.status, problem["title"]) == (422, "Untrusted")  # which key and why: only in the log
    assert "unsigned" not in problem["detail"]

    assert (await client.post("/v1/versions", data=sign(v2_of(pack), admin_key).to_record())).status == 202
    await ready(client, 2)
    assert (await (await client.get("/healthz")).json())["rejected"] == {}


async def test_versions_survive_a_restart_with_identical_hashes(
    aiohttp_client: Client, kafka: KafkaTarget, topic_name: str, admin_key: SigningKey,
    signed_v1: SignedPolicyVersion, pack: PolicyPack,
) -> None:  # fmt: skip
    v2 = sign(v2_of(pack), admin_key)
    await publish_version(kafka.bootstrap, signed_v1, topic=topic_name, kafka=KafkaSettings())
    await _produce(kafka.bootstrap, topic_name, b"\x00corrupt", SignedPolicyVersion(version=v2.version).to_record())
    await publish_version(kafka.bootstrap, v2, topic=topic_name, kafka=KafkaSettings())

    seen = []
    for _ in range(2):  # the second app is a fresh service: it knows only what the topic holds
        app = app_for(kafka, topic_name, admin_key)
        client = await aiohttp_client(app)
        health = await ready(client, 2)
        assert health["rejected"] == {"DecodeError": 1, "UntrustedKey": 1}
        seen.append([v["hash"] for v in (await (await client.get("/v1/versions")).json())["versions"]])
        await client.close()
    assert seen[0] == seen[1] == [signed_v1.content_hash, v2.content_hash]


async def test_refuses_to_start_without_keys_or_kafka(kafka: KafkaTarget, topic_name: str) -> None:
    await ensure_policy_topic(kafka.bootstrap, topic_name, kafka=KafkaSettings())
    with pytest.raises(ConfigurationError, match="policy-admin"):
        create_app(PolicySettings(topic=topic_name, admin_keys=[]), bootstrap=kafka.bootstrap)
    with pytest.raises(ConfigurationError, match="bootstrap"):
        create_app(PolicySettings(kafka={"bootstrap": None}), keys=[SigningKey.generate().public])


async def test_a_weaker_existing_policy_topic_is_reported_at_start_up(
    aiohttp_client: Client, kafka: KafkaTarget, topic_name: str, admin_key: SigningKey,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka.bootstrap)
    await admin.start()
    try:  # created by hand, the way an operator (or an older hub) might have
        await admin.create_topics([NewTopic(topic_name, 1, 1, topic_configs={"retention.ms": "86400000"})])
    finally:
        await admin.close()
    client = await aiohttp_client(app_for(kafka, topic_name, admin_key))
    await ready(client, 0)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any(f"topic {topic_name}: retention.ms is 86400000, the hub needs -1" in w for w in warnings), warnings
    assert any(f"topic {topic_name}: message.timestamp.type is CreateTime" in w for w in warnings), warnings
