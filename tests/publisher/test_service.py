"""The publisher composed from its settings alone (as ``python -m services.publisher`` does), on the real broker."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from services.publisher.service import create_app
from services.publisher.settings import PublisherSettings
from services.shared.avro import AvroCodec
from services.shared.cluster import KafkaTarget
from services.shared.kafka import KEYS_TOPIC, ensure_topics, hub_topics, make_producer
from services.shared.keys import SigningKey
from services.shared.registry import issue
from services.shared.settings import KafkaSettings
from tests.publisher.samples import metadata, png

pytestmark = pytest.mark.kafka


async def _register(bootstrap: str, record: bytes, key_id: str) -> None:
    producer = make_producer(bootstrap, client_id="test-keys")
    await producer.start()
    try:
        await producer.send_and_wait(KEYS_TOPIC, record, key=key_id.encode())
    finally:
        await producer.stop()


async def test_a_key_revoked_on_hub_keys_stops_a_running_publisher_from_signing(
    kafka: KafkaTarget, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    codec = AvroCodec.load()
    anchor, signer = SigningKey.generate(), SigningKey.generate()
    (tmp_path / "anchor.pub.pem").write_bytes(anchor.public.to_pem())
    (tmp_path / "signer.key").write_bytes(signer.to_pem())
    jurisdiction = f"DE-{uuid.uuid4().hex[:6].upper()}"
    await ensure_topics(kafka.bootstrap, hub_topics([jurisdiction]))
    since = datetime.now(UTC) - timedelta(days=1)
    await _register(kafka.bootstrap, issue(codec, anchor, public_key=signer.public, organisation="group",
                                           not_before=since), signer.key_id)  # fmt: skip
    settings = PublisherSettings(
        kafka=KafkaSettings(bootstrap=kafka.bootstrap), signing_key_file=tmp_path / "signer.key",
        trust_anchor_files=[tmp_path / "anchor.pub.pem"], jurisdictions=[jurisdiction], data_dir=tmp_path / "data",
        unsafe_plaintext=True, relay_interval_s=0.2,
    )  # fmt: skip
    runner = web.AppRunner(create_app(settings))
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/evidence"

    async def publish(session: aiohttp.ClientSession, n: int) -> tuple[int, dict[str, object]]:
        form = aiohttp.FormData()
        meta = json.dumps(metadata(f"SDG-SVC-{n}", [jurisdiction]))
        form.add_field("metadata", meta, content_type="application/json")
        form.add_field("file", png(seed=n), filename="p.png")
        async with session.post(url, data=form) as r:
            return r.status, await r.json(content_type=None)

    try:
        async with aiohttp.ClientSession() as session:
            status, body = await publish(session, 0)
            assert status == 201, body
            await _register(kafka.bootstrap, issue(codec, anchor, public_key=signer.public, organisation="group",
                                                   not_before=since, revoked_at=datetime.now(UTC),
                                                   last_valid_sequence=1, revision=2), signer.key_id)  # fmt: skip
            async with asyncio.timeout(20):
                n = 1
                while status != 422:
                    await asyncio.sleep(0.2)
                    status, body = await publish(session, n)
                    n += 1
            assert body["title"] == "Untrusted"  # why (a revoked key) is logged, not told
            assert any("revoked" in r.getMessage() and str(body["incident"]) in r.getMessage() for r in caplog.records)
    finally:
        await runner.cleanup()
