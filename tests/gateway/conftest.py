"""A real gateway for tests: the real broker, real mutual TLS 1.3, the publisher's real events, the sample policy.

Each test gets its own jurisdictions (``DE-<x>``…), its own ``hub.keys``/``hub.policy``/``hub.audit``/
``hub.deadletter`` topics and its own state, so tests on the shared broker never see each other's records. The
sample policy's offices are moved to the test's jurisdictions (the rules only compare jurisdictions).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from services.gateway.service import create_app, gateway_topics
from services.gateway.settings import GatewaySettings
from services.policy.model import Office
from services.policy.pack import SAMPLE_PACK, load_pack
from services.policy.version import sign
from services.publisher.core import parse_metadata
from services.publisher.pipeline import ContentInfo, PublishResult
from services.shared.audit_records import decode_batch, decode_entry
from services.shared.content import LocalContentStore
from services.shared.kafka import ensure_hub_topics, make_producer, read_to_end
from services.shared.keys import SigningKey
from services.shared.media import sniff
from services.shared.principals import principal_uri
from services.shared.registry import issue
from services.shared.settings import KafkaSettings
from services.shared.tls import CertFiles, client_context, issue_leaf, server_context
from tests.publisher.samples import metadata, png
from tests.publishing_stack import Stack

OFFICES = {"DE": "DE-GBA-WCU", "FR": "FR-PNAT", "SE": "SE-IPC"}
#: A second office of the DE jurisdiction (added to the sample pack's offices): two offices on one feed.
SECOND_DE = "DE-BKA"
CASE = "CASE-SY-001"


class CountingStore(LocalContentStore):
    """The real content store, counting how often it is touched (to show a refusal never reaches it)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.touched = 0

    async def size(self, sha256: str) -> int:
        self.touched += 1
        return await super().size(sha256)

    async def read(self, sha256: str, *, offset: int = 0) -> AsyncIterator[bytes]:
        self.touched += 1
        async for chunk in super().read(sha256, offset=offset):
            yield chunk


@dataclass
class Hub:
    stack: Stack
    url: str
    pki: Path
    settings: GatewaySettings
    admin: SigningKey
    codes: dict[str, str]  # "DE" → "DE-1A2B3C"
    certs: dict[str, CertFiles]
    content: CountingStore
    runner: web.AppRunner | None = None

    def session(self, who: str = "DE-GBA-WCU", **kw: Any) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=client_context(self.certs[who]), **kw))

    def feed_url(self, country: str = "DE") -> str:
        return f"{self.url}/v1/feeds/{self.codes[country]}"

    async def publish(self, item_id: str, countries: tuple[str, ...] = ("DE", "FR", "SE"), *, seed: int = 0,
                      **overrides: Any) -> PublishResult:  # fmt: skip
        defaults = {"case_ids": [CASE], "sharing": {"allowed_jurisdictions": [], "purposes": []}}
        meta = metadata(item_id, [self.codes[c] for c in countries], **{**defaults, **overrides})
        data = png(seed=seed or abs(hash(item_id)) % 10_000)

        async def chunks() -> AsyncIterator[bytes]:
            yield data

        stored = await self.stack.store.put(chunks(), max_size=1 << 20)
        content = ContentInfo(sha256=stored.sha256, size=stored.size, media_type=sniff(stored.head),
                              file_name=f"{item_id}.png")  # fmt: skip
        result = await self.stack.publisher.publish(parse_metadata(meta), content)
        assert result.complete
        return result

    async def produce(self, topic: str, value: bytes, *, key: bytes | None = None) -> None:
        producer = make_producer(self.stack.bootstrap, client_id="test-inject")
        await producer.start()
        try:
            await producer.send_and_wait(topic, value, key=key)
        finally:
            await producer.stop()

    async def start(self, **overrides: Any) -> None:
        settings = self.settings.model_copy(update=overrides)
        app = create_app(settings, bootstrap=self.stack.bootstrap, anchors=[self.stack.anchor.public],
                         admin_keys=[self.admin.public], content=self.content)  # fmt: skip
        self.runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=5)
        await self.runner.setup()
        ctx = server_context(self.certs["gateway"], minimum_version=ssl.TLSVersion.TLSv1_3)
        port = int(self.url.rsplit(":", 1)[1]) if self.url else 0
        await web.TCPSite(self.runner, "127.0.0.1", port, ssl_context=ctx).start()
        self.url = f"https://127.0.0.1:{self.runner.addresses[0][1]}"
        await self.healthy()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def healthy(self, within: float = 60) -> dict[str, Any]:
        async with self.session("DE-GBA-WCU") as s, asyncio.timeout(within):
            while True:
                async with s.get(f"{self.url}/healthz") as r:
                    body: dict[str, Any] = await r.json()
                    if r.status == 200:
                        return body
                await asyncio.sleep(0.1)

    async def page(self, country: str = "DE", *, who: str | None = None, cursor: str | None = None,
                   max_events: int = 100, wait: float = 0) -> tuple[int, dict[str, Any]]:  # fmt: skip
        params = {"max": str(max_events), "wait": str(wait)} | ({"cursor": cursor} if cursor else {})
        async with self.session(who or OFFICES[country]) as s, s.get(self.feed_url(country), params=params) as r:
            return r.status, await r.json(content_type=None)

    async def drain(self, country: str = "DE", *, who: str | None = None, cursor: str | None = None,
                    until: Callable[[list[dict[str, Any]]], bool] | None = None,
                    within: float = 60) -> tuple[list[dict[str, Any]], str]:  # fmt: skip
        """Every event of the feed from ``cursor`` until caught up (and ``until(events)`` holds)."""
        events: list[dict[str, Any]] = []
        async with asyncio.timeout(within):
            while True:
                status, body = await self.page(country, who=who, cursor=cursor, wait=0.5)
                assert status == 200, body
                events += body["events"]
                cursor = body["cursor"]
                if body["caught_up"] and (until is None or until(events)):
                    return events, cursor


def pki_for(directory: Path) -> dict[str, CertFiles]:
    certs = {"gateway": issue_leaf(directory, "gateway")}
    for office in (*OFFICES.values(), SECOND_DE):
        certs[office] = issue_leaf(directory, office, uris=(principal_uri("office", office),))
    certs["auditor"] = issue_leaf(directory, "auditor", uris=(principal_uri("auditor", "court-1"),))
    certs["nobody"] = issue_leaf(directory, "nobody")
    certs["UNKNOWN-OFFICE"] = issue_leaf(directory, "unknown", uris=(principal_uri("office", "XX-UNKNOWN"),))
    return certs


@pytest.fixture
async def hub(stack: Stack, tmp_path: Path) -> AsyncIterator[Hub]:
    suffix = uuid.uuid4().hex[:8]
    codes = dict(zip(("DE", "FR", "SE"), stack.jurisdictions, strict=True))
    admin = SigningKey.generate()
    settings = GatewaySettings(
        kafka=KafkaSettings(bootstrap=stack.bootstrap), jurisdictions=stack.jurisdictions,
        data_dir=tmp_path / "gateway", content_dir=tmp_path / "content", instance="gw-test",
        keys_topic=f"hub.keys.{suffix}", policy_topic=f"hub.policy.{suffix}", audit_topic=f"hub.audit.{suffix}",
        deadletter_topic=f"hub.deadletter.{suffix}",
        cursor_keys={"k1": base64.urlsafe_b64encode(os.urandom(32)).decode()}, cursor_key_id="k1",
        audit_timeout_s=5, max_view_age_s=30, tail_records=64,
    )  # fmt: skip
    content = CountingStore(stack.store.path_of("0" * 64).parents[2])  # the publisher's store, counted
    hub = Hub(stack=stack, url="", pki=tmp_path / "pki", settings=settings, admin=admin, codes=codes,
              certs=pki_for(tmp_path / "pki"), content=content)  # fmt: skip
    await ensure_hub_topics(stack.bootstrap, gateway_topics(settings), kafka=settings.kafka)
    await hub.produce(settings.keys_topic, issue(stack.codec, stack.anchor, public_key=stack.signer.public,
                                                 organisation="Syrian documentation group",
                                                 not_before=datetime.now(UTC) - timedelta(days=1)),
                      key=stack.signer.key_id.encode())  # fmt: skip
    pack = load_pack(SAMPLE_PACK)
    offices = tuple(o.model_copy(update={"jurisdiction": codes[o.jurisdiction]}) for o in pack.offices)
    offices += (Office(office_id=SECOND_DE, jurisdiction=codes["DE"], clearances=("SECRET",), assigned_cases=(CASE,),
                       purposes=("prosecution",)),)  # fmt: skip
    # in force from now (whole seconds): hub.policy refuses versions back-dated before their record was appended
    version = pack.version(author="test", effective_from=datetime.now(UTC).replace(microsecond=0))
    signed = sign(version.model_copy(update={"offices": offices}), admin)
    await hub.produce(settings.policy_topic, signed.to_record(), key=signed.content_hash.encode())
    await hub.start()
    try:
        yield hub
    finally:
        await hub.stop()


@dataclass(frozen=True)
class Audited:
    offset: int
    index: int
    timestamp_ms: int
    entry: dict[str, Any]


async def audit_log(hub: Hub) -> dict[str, Audited]:
    """Every entry on the test's audit topic, by entry id (the receipt), with where it is."""
    out = {}
    for record in await read_to_end(hub.stack.bootstrap, hub.settings.audit_topic):
        _, _, entries = decode_batch(hub.stack.codec, record.value)
        for index, data in enumerate(entries):
            entry = decode_entry(hub.stack.codec, data)
            out[entry["entry_id"]] = Audited(record.offset, index, record.timestamp, entry)
    return out


def gateway_env(hub: Hub, tmp_path: Path, port: int, *, content_dir: Path, **extra: str) -> dict[str, str]:
    """The environment of ``python -m services.gateway`` on the hub's state, topics and certificate."""
    anchor, admin = tmp_path / "anchor.pub.pem", tmp_path / "admin.pub.pem"
    anchor.write_bytes(hub.stack.anchor.public.to_pem())
    admin.write_bytes(hub.admin.public.to_pem())
    s, tls = hub.settings, hub.certs["gateway"]
    return {
        "EVHUB_KAFKA_BOOTSTRAP": hub.stack.bootstrap, "EVHUB_GATEWAY_PORT": str(port),
        "EVHUB_GATEWAY_JURISDICTIONS": json.dumps(s.jurisdictions), "EVHUB_GATEWAY_DATA_DIR": str(s.data_dir),
        "EVHUB_GATEWAY_CONTENT_DIR": str(content_dir), "EVHUB_GATEWAY_TRUST_ANCHOR_FILES": json.dumps([str(anchor)]),
        "EVHUB_GATEWAY_POLICY_ADMIN_KEYS": json.dumps([str(admin)]),
        "EVHUB_GATEWAY_CURSOR_KEYS": json.dumps({k: v.get_secret_value() for k, v in s.cursor_keys.items()}),
        "EVHUB_GATEWAY_CURSOR_KEY_ID": s.cursor_key_id, "EVHUB_GATEWAY_KEYS_TOPIC": s.keys_topic,
        "EVHUB_GATEWAY_POLICY_TOPIC": s.policy_topic, "EVHUB_GATEWAY_AUDIT_TOPIC": s.audit_topic,
        "EVHUB_GATEWAY_DEADLETTER_TOPIC": s.deadletter_topic, "EVHUB_GATEWAY_TLS_CERT": str(tls.cert),
        "EVHUB_GATEWAY_TLS_KEY": str(tls.key), "EVHUB_GATEWAY_TLS_CA": str(tls.ca),
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **extra,
    }  # fmt: skip
