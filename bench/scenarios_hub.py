"""The hub's own scenarios, each measured against a baseline from the same run on the same broker.

Owns:
- ``hub-publish-library``: signed evidence events through ``EvidencePublisher`` — the request's JSON validated into
  metadata (pydantic), idempotency, sequence numbers, Avro, Ed25519, the SQLite outbox (group commit), delivery in
  Kafka transactions acks=all — each event to 1, 2 or 3 jurisdictions in turn (``scenarios_kafka.spread``), so two
  records per event on average. Its unit is Kafka records (signed envelopes acknowledged) per second, the ratio is
  against ``aiokafka-produce`` writing records of the same size with the same producer settings; events/s is half;
- ``hub-publish-http``: the same through the publisher's HTTP API over mutual TLS, a multipart upload (metadata and
  a small file) per event, 32 clients at once; server and clients share this process and its event loop;
- ``policy-decide-hit`` / ``policy-decide-miss``: Cedar decisions on a cache hit and on a miss (pre-parsed policy
  handles), against ``policy-parse-every-call`` — what deciding costs when the policy text is parsed per call.

The request bodies (JSON text) are made before the timed region; validating them is part of what is measured. The
library scenario's evidence files are not stored: the content store is not on the event path it compares.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import ssl
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web

from bench.harness import Context, scenario
from bench.scenarios_kafka import reader, spread
from services.cli.samples import png
from services.policy.engine import PolicyEngine, PolicyStore
from services.policy.model import READ_ITEM, ItemAttributes
from services.policy.pack import load_pack
from services.policy.version import sign, trusted_keys
from services.publisher import state
from services.publisher.committer import GroupCommitter
from services.publisher.core import build_events, parse_metadata
from services.publisher.courier import OutboxSettings
from services.publisher.outbox import Outbox
from services.publisher.pipeline import ContentInfo, EvidencePublisher
from services.publisher.service import create_app
from services.publisher.settings import PublisherSettings
from services.shared.avro import AvroCodec
from services.shared.content import LocalContentStore
from services.shared.envelope import open_envelope, seal
from services.shared.kafka import ensure_topics, evidence_topic
from services.shared.keys import SigningKey
from services.shared.registry import KeyRegistry, issue
from services.shared.sequences import SequenceTracker
from services.shared.tls import client_context, create_dev_pki, server_context

IN_FLIGHT: Final = 512
HTTP_CLIENTS: Final = 32
POLICY_PACK: Final = Path(__file__).resolve().parents[1] / "policies"


def sample_metadata(item: str, jurisdictions: list[str], n: int) -> dict[str, Any]:
    """What a photograph with custody and two protected values says (~1,050 B envelopes once signed)."""
    return {
        "item_id": item, "case_ids": [f"CASE-SY-{n % 64:03d}"], "jurisdictions": jurisdictions, "kind": "PHOTOGRAPH",
        "title": f"Detention facility photograph {n}", "description": "Photograph from a handed-over collection. " * 4,
        "captured_at": "2013-03-02T09:15:00Z", "device": "camera-A", "collector_pseudonym": "collector-7",
        "region": "governorate (coarse)", "classification": "CONFIDENTIAL", "sensitivity": ["GRAPHIC"],
        "custody": [{"at": "2014-01-15T12:00:00Z", "actor": "archive", "action": "ingested and hashed"},
                    {"at": "2015-02-01T08:00:00Z", "actor": "archive", "action": "copied to cold storage"}],
        "sharing": {"purposes": ["prosecution"]},
        "protected": [{"field": "victim.identity", "label": "VICTIM_IDENTIFYING", "value": f"detainee {n}"},
                      {"field": "location.exact", "label": "LOCATION_EXACT", "value": "33.51N 36.27E"}],
    }  # fmt: skip


async def _publisher_setup(ctx: Context) -> None:
    """Keys, registry, three fresh jurisdiction topics, SQLite state and started couriers, kept in ``ctx.state``."""
    tag = uuid.uuid4().hex[:6].upper()
    jurisdictions = ctx.state.get("jurisdictions") or [f"B{c}-{tag}" for c in "ABC"]
    await ensure_topics(ctx.bootstrap, [ctx.topic_spec(evidence_topic(j), 3) for j in jurisdictions],
                        replication_factor=ctx.replication_factor)  # fmt: skip
    codec, anchor, signer = AvroCodec.load(), SigningKey.generate(), SigningKey.generate()
    registry = KeyRegistry(codec, anchors=[anchor.public])
    registry.apply(issue(codec, anchor, public_key=signer.public, organisation="bench",
                         not_before=datetime.now(UTC) - timedelta(days=1)))  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="evhub-bench-"))
    committer = GroupCommitter(state.connect(work / "publisher.sqlite3"))
    outbox = Outbox(key=signer.public, codec=codec, committer=committer,
                    topics=[evidence_topic(j) for j in jurisdictions],
                    settings=OutboxSettings(bootstrap=ctx.bootstrap))  # fmt: skip
    await outbox.start(timeout_s=60)
    ctx.state.update(
        jurisdictions=jurisdictions, outbox=outbox, committer=committer, work=work, round=0,
        publisher=EvidencePublisher(codec=codec, signer=signer, outbox=outbox, committer=committer,
                                    organisation="bench", jurisdictions=jurisdictions, registry=registry),
    )  # fmt: skip


async def _publisher_teardown(ctx: Context) -> None:
    await ctx.state["outbox"].stop(5.0)
    ctx.state["committer"].close()
    await _delete_topics(ctx, [evidence_topic(j) for j in ctx.state["jurisdictions"]])


async def _delete_topics(ctx: Context, topics: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=ctx.bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(topics)
    finally:
        await admin.close()


def _next_requests(ctx: Context) -> list[tuple[bytes, int]]:
    """This call's request bodies (JSON, as a client sends them) and how many records each makes (1-3)."""
    ctx.state["round"] += 1
    r, names, prefix = ctx.state["round"], ctx.state["jurisdictions"], ctx.state.get("prefix", "BENCH")
    bodies = []
    for i in range(ctx.events):
        targets = spread(i, names)
        bodies.append((json.dumps(sample_metadata(f"{prefix}-{r}-{i}", targets, i)).encode(), len(targets)))
    return bodies


def _sent(ctx: Context) -> tuple[int, int]:
    """(records, envelope bytes) the outbox has had acknowledged so far."""
    stats = ctx.state["outbox"].stats()
    return stats["records_sent"], stats["bytes_sent"]


def _shape(ctx: Context, events: int, records: int, sent_before: tuple[int, int]) -> None:
    """Report what one call did, with the envelopes' actual mean size (the "N x size" column)."""
    records_now, bytes_now = _sent(ctx)
    sent, size = records_now - sent_before[0], bytes_now - sent_before[1]
    ctx.record_size = round(size / max(1, sent))
    ctx.shape = f"{events:,} events, {records:,} records x {ctx.record_size:,} B"


@scenario(name="hub-publish-library", unit="records/s", baseline="aiokafka-produce", events=10_000,
          quick_events=500, setup=_publisher_setup, teardown=_publisher_teardown, loop_lag=True)  # fmt: skip
async def hub_publish_library(ctx: Context) -> int:
    """Signed evidence through EvidencePublisher: validation, Avro, Ed25519, SQLite outbox, Kafka transactions."""
    return await _publish_library(ctx)


@scenario(name="hub-publish-library-rf3", unit="records/s", baseline="hub-publish-library", events=10_000,
          quick_events=500, setup=_publisher_setup, teardown=_publisher_teardown, cluster=True,
          loop_lag=True)  # fmt: skip
async def hub_publish_library_rf3(ctx: Context) -> int:
    """The same on the three-broker cluster, RF 3, min.insync.replicas 2: the hub's cost of replication."""
    return await _publish_library(ctx)


async def _publish_library(ctx: Context, *, timed: bool = True) -> int:
    publisher: EvidencePublisher = ctx.state["publisher"]
    requests = _next_requests(ctx)
    window = asyncio.Semaphore(IN_FLIGHT)
    before = _sent(ctx)

    async def one(body: bytes, n: int) -> None:
        async with window:
            meta = parse_metadata(body)  # what the HTTP edge does with a request's metadata part
            sha = hashlib.sha256(meta.item_id.encode()).hexdigest()
            await publisher.publish(meta, ContentInfo(sha256=sha, size=48_213 + n, media_type="image/jpeg",
                                                      file_name="photo.jpg"))  # fmt: skip

    with ctx.timed() if timed else contextlib.nullcontext():
        await asyncio.gather(*(one(body, n) for n, (body, _) in enumerate(requests)))
    records = sum(k for _, k in requests)
    _shape(ctx, len(requests), records, before)
    return records


async def _verify_setup(ctx: Context) -> None:
    """One topic holding ``events`` signed evidence envelopes (the sample events, ~1,080 B), one sequence number
    each, and a registry trusting their key. Sealed and written before anything is timed."""
    from confluent_kafka import Producer

    codec, anchor, signer = AvroCodec.load(), SigningKey.generate(), SigningKey.generate()
    registry = KeyRegistry(codec, anchors=[anchor.public])
    registry.apply(issue(codec, anchor, public_key=signer.public, organisation="bench",
                         not_before=datetime.now(UTC) - timedelta(days=1)))  # fmt: skip
    jurisdiction = f"BV-{uuid.uuid4().hex[:6].upper()}"
    topic = evidence_topic(jurisdiction)  # an envelope names its jurisdiction, and verifies only on its topic
    await ensure_topics(ctx.bootstrap, [ctx.topic_spec(topic, 3)], replication_factor=ctx.replication_factor)
    meta = parse_metadata(sample_metadata("BENCH-VERIFY", [jurisdiction], 1))
    now = datetime.now(UTC)
    producer = Producer({"bootstrap.servers": ctx.bootstrap, "acks": "all", "enable.idempotence": True,
                         "linger.ms": 5, "queue.buffering.max.kbytes": 65536})  # fmt: skip
    size = 0
    for n in range(ctx.events):
        events, disclosures = build_events(
            meta, event_id=str(uuid.uuid4()), version=1, replaces_event_id=None, organisation="bench",
            key_id=signer.key_id, content=[{"media_type": "image/jpeg", "size": 48_213, "sha256": "0" * 64,
                                            "file_name": "photo.jpg"}],
            published_at=now, salts=[bytes(16), bytes(16)],
        )  # fmt: skip
        envelope = seal(codec, schema="evidence_event", record=events[jurisdiction], topic=topic, signer=signer,
                        sequence=n + 1, disclosures=disclosures)  # fmt: skip
        producer.produce(topic, envelope, key=f"CASE-{n % 64}".encode())
        producer.poll(0)
        size += len(envelope)
    if producer.flush(60) != 0:
        raise RuntimeError("pre-producing the envelopes did not finish")
    ctx.state.update(topic=topic, codec=codec, registry=registry)
    ctx.record_size = round(size / max(1, ctx.events))


async def _verify_teardown(ctx: Context) -> None:
    await _delete_topics(ctx, [ctx.state["topic"]])


@scenario(name="hub-verify", unit="records/s", baseline="aiokafka-consume", events=50_000, quick_events=500,
          setup=_verify_setup, teardown=_verify_teardown)  # fmt: skip
async def hub_verify(ctx: Context) -> int:
    """What an office's client or the gateway does with each record: read it (read_committed, as
    ``aiokafka-consume``), verify the envelope (Avro, Ed25519 over PAE, the key trusted for that sequence number
    and time, every disclosure against its signed digest) and check its sequence number (no replay, no gap)."""
    topic, codec, registry = ctx.state["topic"], ctx.state["codec"], ctx.state["registry"]
    async with reader(ctx.bootstrap, topic, client_id="bench-hub-verify") as consumer:
        tracker = SequenceTracker()
        seen = 0
        with ctx.timed():
            async with asyncio.timeout(120):
                while seen < ctx.events:
                    for records in (await consumer.getmany(timeout_ms=1_000)).values():
                        for record in records:
                            verified = open_envelope(codec, record.value, topic=topic, keys=registry)
                            tracker.observe(verified.key_id, topic, verified.sequence, record.value)
                            seen += 1
    return seen


async def _two_process_setup(ctx: Context) -> None:
    """This process's publisher, and a second process (``bench.publish_worker``) with a key of its own publishing
    to the same three topics from a state of its own: sequence numbers are per (key, topic), so the two never
    share a counter, and each key's Kafka fence is its own."""
    await _publisher_setup(ctx)
    worker = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.publish_worker", ctx.bootstrap, *ctx.state["jurisdictions"],
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert worker.stdout is not None
    async with asyncio.timeout(120):
        ready = await worker.stdout.readline()
    if ready.strip() != b"ready":
        raise RuntimeError(f"the second publisher process did not start: {ready!r}")
    ctx.state["worker"] = worker


async def _two_process_teardown(ctx: Context) -> None:
    worker: asyncio.subprocess.Process = ctx.state["worker"]
    assert worker.stdin is not None
    worker.stdin.close()
    try:
        async with asyncio.timeout(30):
            await worker.wait()
    except TimeoutError:
        worker.kill()
        await worker.wait()
    await _publisher_teardown(ctx)


@scenario(name="hub-publish-library-2proc", unit="records/s", baseline="hub-publish-library", events=10_000,
          quick_events=500, setup=_two_process_setup, teardown=_two_process_teardown, loop_lag=True)  # fmt: skip
async def hub_publish_library_2proc(ctx: Context) -> int:
    """The library path in two publisher processes at once, each with its own key and state, half the events
    each: what a second process adds on this machine (records/s of both together; CPU per record of both)."""
    worker: asyncio.subprocess.Process = ctx.state["worker"]
    assert worker.stdin is not None
    assert worker.stdout is not None
    half = ctx.events // 2
    with ctx.timed():
        worker.stdin.write(f"{half}\n".encode())
        await worker.stdin.drain()
        ctx.events, events = half, ctx.events
        try:
            mine = await _publish_library(ctx, timed=False)
        finally:
            ctx.events = events
        async with asyncio.timeout(600):
            line = (await worker.stdout.readline()).split()
    theirs, cpu = int(line[0]), float(line[1])
    ctx.add_cpu(cpu)
    ctx.shape = f"{ctx.events:,} events, {mine + theirs:,} records x {ctx.record_size:,} B"
    return mine + theirs


async def _http_setup(ctx: Context) -> None:
    await _publisher_setup(ctx)
    work: Path = ctx.state["work"]
    pki = create_dev_pki(work / "pki", ["publisher", "archivist"])
    settings = PublisherSettings(
        tls_cert=pki["publisher"].cert, tls_key=pki["publisher"].key, tls_ca=pki["publisher"].ca,
        allowed_clients=["archivist"], jurisdictions=ctx.state["jurisdictions"], data_dir=work,
    )  # fmt: skip
    app = create_app(settings, publisher=ctx.state["publisher"], store=LocalContentStore(work / "content"))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(pki["publisher"])).start()
    ctx.state.update(runner=runner, url=f"https://127.0.0.1:{runner.addresses[0][1]}/v1/evidence",
                     client_ssl=client_context(pki["archivist"]), file=png(64, 48))  # fmt: skip


async def _http_teardown(ctx: Context) -> None:
    await ctx.state["runner"].cleanup()
    await _publisher_teardown(ctx)


@scenario(name="hub-publish-http", unit="records/s", baseline="aiokafka-produce", events=3_000, quick_events=100,
          setup=_http_setup, teardown=_http_teardown, loop_lag=True)  # fmt: skip
async def hub_publish_http(ctx: Context) -> int:
    """Signed evidence events through the HTTP API: mTLS, multipart upload, content store, then the library path."""
    requests = _next_requests(ctx)
    before = _sent(ctx)
    ctx_ssl: ssl.SSLContext = ctx.state["client_ssl"]
    connector = aiohttp.TCPConnector(ssl=ctx_ssl, limit=HTTP_CLIENTS)
    async with aiohttp.ClientSession(connector=connector) as session:
        window = asyncio.Semaphore(HTTP_CLIENTS)

        async def one(body: bytes, n: int) -> None:
            form = aiohttp.FormData()
            form.add_field("metadata", body, content_type="application/json")
            form.add_field("file", ctx.state["file"] + n.to_bytes(4, "big"), filename="photo.png")
            async with window, session.post(ctx.state["url"], data=form) as response:
                if response.status != 201:
                    raise RuntimeError(f"publish failed: {response.status} {await response.text()}")

        with ctx.timed():
            await asyncio.gather(*(one(body, i) for i, (body, _) in enumerate(requests)))
    records = sum(k for _, k in requests)
    _shape(ctx, len(requests), records, before)
    return records


def _policy_engine() -> tuple[PolicyEngine, list[ItemAttributes]]:
    admin = SigningKey.generate()
    pack = load_pack(POLICY_PACK)
    store = PolicyStore(trusted=trusted_keys([admin.public]))
    effective = datetime(2020, 1, 1, tzinfo=UTC)
    store.accept(sign(pack.version(author="bench", effective_from=effective), admin), appended_at=effective)
    items = [
        ItemAttributes(item_id=f"i{n}", jurisdictions=("DE", "FR"), case_ids=("CASE-SY-001",),
                       classification=("RESTRICTED", "CONFIDENTIAL", "SECRET")[n % 3],
                       sensitivity=("GRAPHIC",), consent_purposes=("prosecution",),
                       protected_fields=("WITNESS_IDENTIFYING", "LOCATION_EXACT"))
        for n in range(3)
    ]  # fmt: skip
    return PolicyEngine(store), items


async def _policy_setup(ctx: Context) -> None:
    engine, items = _policy_engine()
    ctx.state.update(engine=engine, items=items, at=datetime(2026, 6, 1, tzinfo=UTC))


def _decide_loop(ctx: Context, decide: Any) -> int:
    items, at = ctx.state["items"], ctx.state["at"]
    offices = ("DE-GBA-WCU", "FR-PNAT")
    with ctx.timed():
        for n in range(ctx.events):
            decide(offices[n & 1], READ_ITEM, items[n % 3], at, "prosecution")
    return ctx.events


@scenario(name="policy-parse-every-call", unit="µs/op", events=200, quick_events=20, setup=_policy_setup)
async def policy_parse_every_call(ctx: Context) -> int:
    """A Cedar decision that parses the policy text, schema and entities on every call (the naive way)."""
    return _decide_loop(ctx, ctx.state["engine"].decide_parse_every_call)


@scenario(name="policy-decide-miss", unit="µs/op", baseline="policy-parse-every-call", events=2_000,
          quick_events=100, setup=_policy_setup)  # fmt: skip
async def policy_decide_miss(ctx: Context) -> int:
    """A decision on a cache miss: pre-parsed policy set and office entities, the item added per call."""
    return _decide_loop(ctx, ctx.state["engine"].decide_uncached)


@scenario(name="policy-decide-hit", unit="µs/op", baseline="policy-parse-every-call", events=200_000,
          quick_events=5_000, setup=_policy_setup)  # fmt: skip
async def policy_decide_hit(ctx: Context) -> int:
    """A decision on a cache hit (same office, action, item attributes, version and second)."""
    engine: PolicyEngine = ctx.state["engine"]
    engine.decide("DE-GBA-WCU", READ_ITEM, ctx.state["items"][0], ctx.state["at"], "prosecution")  # prime
    return _decide_loop(ctx, engine.decide)
