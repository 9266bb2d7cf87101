"""The audit log's scenarios: integrating ``hub.audit``, the delay until a checkpoint covers an entry, and an
auditor's replay — each on the run's broker, with realistic entries (``AuditEntry`` records of ~600 bytes decided by
the sample policy, as the gateway writes them: batches of 50 per ``hub.audit`` record, 10 for latency).

Owns:
- ``audit-decode``: the floor both others stand on — decoding every entry (fastavro, bounded, exact), one core;
- ``audit-integrate``: N entries waiting on a fresh one-partition topic; the audit service started in-process on a
  fresh data directory; timed until a signed checkpoint covers all N (one SQLite commit, tile and bundle writes
  with fsync and a signed checkpoint per integration of up to 2,000 records);
- ``audit-checkpoint-latency``: with the service caught up, batches produced at 100/s; per batch the time from the
  broker's acknowledgement to the commit of the first checkpoint covering it (p50/p99/max);
- ``audit-replay``: a log of N entries served by ``python -m services.audit`` in its own process over mTLS, and
  ``evhub audit replay``'s driver in this one: checkpoint signature, every bundle and tile fetched and recomputed,
  every entry decoded and re-decided under ``hub.policy`` (replayed with the admin key), first-run state recorded.

Does not own: the harness (``bench.harness``) or what is measured (``services.audit``, ``services.cli.replay``).
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from bench.harness import Context, Latencies, scenario
from services.audit import api
from services.audit.checkpoint import Checkpoint
from services.audit.index import SqliteIndex
from services.audit.log import CheckpointSigner, Integration, index_fields
from services.audit.note import NoteSigner
from services.audit.service import create_app
from services.audit.settings import AuditSettings
from services.audit.tiles import TiledTree, TileNodeReader
from services.audit.tilestore import PosixTileStore
from services.cli.audit_client import HttpLogSource
from services.cli.audit_state import CheckpointState
from services.cli.replay import ReplayOptions, replay
from services.policy.engine import PolicyEngine, PolicyStore
from services.policy.model import FeedRef, ItemAttributes
from services.policy.pack import SAMPLE_PACK, load_items, load_pack
from services.policy.topic import load_store, publish_version
from services.policy.version import sign, trusted_keys
from services.shared import audit_records
from services.shared.avro import AvroCodec
from services.shared.kafka import AUDIT_TOPIC, DEAD_LETTER_TOPIC, POLICY_TOPIC, hub_topics, make_producer
from services.shared.keys import SigningKey
from services.shared.principals import principal_uri
from services.shared.settings import KafkaSettings
from services.shared.tls import client_context, create_dev_pki, issue_leaf

ORIGIN: Final = "bench.evidence-hub.example/audit"
#: The average encoded AuditEntry here (the column the report shows as the record size).
ENTRY_BYTES: Final = 560
OFFICES: Final = (("DE-GBA-WCU", "DE"), ("FR-PNAT", "FR"), ("SE-IPC", "SE"))
ROOT: Final = Path(__file__).resolve().parents[1]


def _entries(engine: PolicyEngine, codec: AvroCodec, n: int, start: datetime) -> list[bytes]:
    """``n`` encoded entries decided by ``engine``: every office reading the sample items (and its feed), a
    microsecond apart from ``start``, as the gateway records them."""
    items: list[ItemAttributes | None] = [*load_items(SAMPLE_PACK / "items.json").values(), None]
    out = []
    for i in range(n):
        office, jurisdiction = OFFICES[i % 3]
        item = items[(i // 3) % len(items)]
        at = start + timedelta(microseconds=i)
        resource = FeedRef(jurisdiction=jurisdiction) if item is None else item
        action = "ReadFeed" if item is None else "ReadItem"
        d = engine.decide(office, action, resource, at, "prosecution")
        present = set(item.protected_fields) if item else set()
        disclosed = [f for f in d.disclosed_fields if f in present] if d.allowed else []
        entry: dict[str, Any] = {
            "entry_id": str(uuid.uuid4()), "at": at, "gateway": "gw-bench", "office": office,
            "client_cert_sha256": "ab" * 32, "request_id": f"req-{i}", "action": action, "purpose": "prosecution",
            "jurisdiction": jurisdiction,
            "item": None if item is None else {
                "topic": f"evidence.{jurisdiction}", "partition": i % 3, "offset": i,
                "payload_type": "application/vnd.evidence-hub.evidence-event+avro", "event_id": str(uuid.uuid4()),
                "item_id": item.item_id, "version": 1, "key_id": "k" * 64, "sequence": i, "envelope_sha256": "cd" * 32},
            "attributes": None if item is None else {
                "jurisdictions": list(item.jurisdictions), "case_ids": list(item.case_ids),
                "classification": item.classification, "sensitivity": list(item.sensitivity),
                "embargo_until": item.embargo_until, "consent_jurisdictions": list(item.consent_jurisdictions),
                "consent_purposes": list(item.consent_purposes), "withdrawn": item.withdrawn,
                "protected_fields": list(item.protected_fields)},
            "decision": "RELEASED" if d.allowed else "REFUSED", "disclosed_fields": disclosed,
            "withheld_fields": [f for f in (item.protected_fields if item else ()) if f not in disclosed],
            "policy_version": d.policy_version, "determining_policies": list(d.determining_policies),
        }  # fmt: skip
        out.append(audit_records.encode_entry(codec, entry))
    return out


async def _policy(ctx: Context) -> tuple[PolicyEngine, SigningKey, str]:
    """The sample pack signed and appended to a fresh policy topic, replayed back (as an auditor would)."""
    admin = SigningKey.generate()
    topic = await ctx.topic(partitions=1, config={s.name: s for s in hub_topics([])}[POLICY_TOPIC].config)
    version = load_pack(SAMPLE_PACK).version(author="bench", effective_from=datetime.now(UTC).replace(microsecond=0))
    await publish_version(ctx.bootstrap, sign(version, admin), topic=topic, kafka=KafkaSettings())
    store = await load_store(ctx.bootstrap, PolicyStore(trusted=trusted_keys([admin.public])), topic=topic)
    return PolicyEngine(store), admin, topic


async def _decided(ctx: Context, n: int) -> tuple[list[bytes], SigningKey, str]:
    engine, admin, topic = await _policy(ctx)
    start = engine.store.in_force_from(engine.store.history()[0].content_hash) + timedelta(seconds=1)
    return _entries(engine, AvroCodec.load(), n, start), admin, topic


async def _audit_topics(ctx: Context) -> tuple[str, str]:
    """A fresh hub.audit-like topic and its dead-letter topic, configured as the hub creates them."""
    specs = {s.name: s for s in hub_topics([])}
    return (await ctx.topic(partitions=1, config=specs[AUDIT_TOPIC].config),
            await ctx.topic(partitions=1, config=specs[DEAD_LETTER_TOPIC].config))  # fmt: skip


async def _produce(bootstrap: str, topic: str, batches: list[bytes]) -> None:
    producer = make_producer(bootstrap, client_id="bench-gateway", max_batch_size=1 << 20, linger_ms=5)
    await producer.start()
    try:
        for i in range(0, len(batches), 200):
            await asyncio.gather(*[await producer.send(topic, b) for b in batches[i : i + 200]])
    finally:
        await producer.stop()


def _batches(codec: AvroCodec, entries: list[bytes], per: int) -> list[bytes]:
    return [audit_records.encode_batch(codec, batch_id=str(uuid.uuid4()), gateway="gw-bench",
                                       entries=entries[i : i + per]) for i in range(0, len(entries), per)]  # fmt: skip


# -- decode (the floor) -------------------------------------------------------------------------------------------
async def _decode_setup(ctx: Context) -> None:
    engine, _, _ = await _policy(ctx)
    start = datetime.now(UTC) + timedelta(seconds=1)
    ctx.state.update(codec=AvroCodec.load(), entries=_entries(engine, AvroCodec.load(), min(ctx.events, 20_000), start))


@scenario(name="audit-decode", record_size=ENTRY_BYTES, events=200_000, quick_events=2_000, setup=_decode_setup)
async def audit_decode(ctx: Context) -> int:
    """Decoding AuditEntry records (bounded, exact; what the log checks of every entry), one core."""
    codec, entries = ctx.state["codec"], ctx.state["entries"]
    with ctx.timed():
        for i in range(ctx.events):
            audit_records.decode_entry(codec, entries[i % len(entries)])
    return ctx.events


# -- integration ----------------------------------------------------------------------------------------------------
async def _integrate_setup(ctx: Context) -> None:
    entries, _, _ = await _decided(ctx, ctx.events)
    topic, dead = await _audit_topics(ctx)
    await _produce(ctx.bootstrap, topic, _batches(AvroCodec.load(), entries, 50))
    ctx.state.update(topic=topic, dead=dead, work=Path(tempfile.mkdtemp(prefix="evhub-bench-audit-")), round=0)


async def _cleanup(ctx: Context) -> None:
    shutil.rmtree(ctx.state["work"], ignore_errors=True)


def _settings(ctx: Context, name: str, **extra: Any) -> AuditSettings:
    ctx.state["round"] += 1
    return AuditSettings(topic=ctx.state["topic"], dead_letter_topic=ctx.state["dead"], origin=ORIGIN,
                         data_dir=ctx.state["work"] / f"{name}-{ctx.state['round']}", unsafe_plaintext=True,
                         **extra)  # fmt: skip


@scenario(name="audit-integrate", record_size=ENTRY_BYTES, baseline="audit-decode", events=200_000, quick_events=2_000,
          setup=_integrate_setup, teardown=_cleanup)  # fmt: skip
async def audit_integrate(ctx: Context) -> int:
    """hub.audit entries integrated per second until a signed checkpoint covers them all (service start included)."""
    app = create_app(_settings(ctx, "log"), bootstrap=ctx.bootstrap, signer=NoteSigner(ORIGIN, SigningKey.generate()))
    runner = web.AppRunner(app)
    with ctx.timed():
        await runner.setup()
        gc.freeze()  # as python -m services.audit does once it has started
        try:
            integrator = app[api.INTEGRATOR]
            async with asyncio.timeout(300):
                while integrator.view.size < ctx.events:
                    await integrator.integrated.wait()
        finally:
            await runner.cleanup()
            gc.unfreeze()
    shutil.rmtree(ctx.state["work"] / f"log-{ctx.state['round']}", ignore_errors=True)
    return ctx.events


# -- latency --------------------------------------------------------------------------------------------------------
async def _latency_setup(ctx: Context) -> None:
    entries, _, _ = await _decided(ctx, ctx.events * 10 * 5)  # distinct entries for a warm-up and the repeats
    topic, dead = await _audit_topics(ctx)
    ctx.state.update(entries=entries, topic=topic, dead=dead,
                     work=Path(tempfile.mkdtemp(prefix="evhub-bench-audit-")), round=0, used=0)  # fmt: skip
    app = create_app(_settings(ctx, "latency"), bootstrap=ctx.bootstrap,
                     signer=NoteSigner(ORIGIN, SigningKey.generate()))  # fmt: skip
    runner = web.AppRunner(app)
    await runner.setup()
    ctx.state.update(app=app, runner=runner)


async def _latency_teardown(ctx: Context) -> None:
    await ctx.state["runner"].cleanup()
    await _cleanup(ctx)


@scenario(name="audit-checkpoint-latency", record_size=ENTRY_BYTES, unit="ms", events=200, quick_events=20,
          setup=_latency_setup, teardown=_latency_teardown)  # fmt: skip
async def audit_checkpoint_latency(ctx: Context) -> Latencies:
    """Broker ack of an audit batch (10 entries, 100 batches/s) → commit of a checkpoint covering it."""
    integrator = ctx.state["app"][api.INTEGRATOR]
    codec = AvroCodec.load()
    commits: list[tuple[float, int]] = []

    async def watch() -> None:
        while True:
            await integrator.integrated.wait()
            commits.append((time.perf_counter(), integrator.view.size))

    watcher = asyncio.create_task(watch())
    producer = make_producer(ctx.bootstrap, client_id="bench-gateway", linger_ms=0)
    await producer.start()
    acked: list[tuple[float, int]] = []
    base = integrator.view.size
    try:
        for i in range(ctx.events):
            used = ctx.state["used"] % (len(ctx.state["entries"]) - 10)
            ctx.state["used"] += 10
            data = audit_records.encode_batch(codec, batch_id=str(uuid.uuid4()), gateway="gw-bench",
                                              entries=ctx.state["entries"][used : used + 10])  # fmt: skip
            await producer.send_and_wait(ctx.state["topic"], data)
            acked.append((time.perf_counter(), base + (i + 1) * 10))
            await asyncio.sleep(0.01)  # pacing: 100 batches/s, as a busy gateway would
        async with asyncio.timeout(120):
            while integrator.view.size < acked[-1][1]:
                await integrator.integrated.wait()
    finally:
        await producer.stop()
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
    if ctx.state["used"] > len(ctx.state["entries"]) - 10:
        raise RuntimeError("the latency scenario ran out of distinct entries")  # a re-used entry id is skipped
    return Latencies([max(0.0, next(t for t, s in commits if s >= size) - at) for at, size in acked])


# -- replay ---------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _build_log(entries: list[bytes], root: Path, signer: NoteSigner, codec: AvroCodec) -> None:
    """The log the audit service would have built from these entries: tiles, bundles, index and checkpoint (written
    directly: integrating a million entries through Kafka first would take most of the bench's budget)."""
    tree, tiles = TiledTree(), PosixTileStore(root=root / "log")
    index = SqliteIndex(path=root / "index.sqlite3")
    try:
        rows = [index_fields(i, audit_records.decode_entry(codec, e), i) for i, e in enumerate(entries)]
        for i in range(0, len(entries), 65_536):
            tiles.write(tree.append(entries[i : i + 65_536]))
        tiles.write(tree.edge_tiles())
        checkpoint = Checkpoint(ORIGIN, tree.size, tree.root())
        reader = TileNodeReader(tree.size, tiles.read)
        signed = CheckpointSigner(signer, last=None).sign(checkpoint, reader)
        index.commit(Integration(0, checkpoint, signed, len(entries), rows, [], [], 0, tree), signed_at=time.time())
        tiles.write_checkpoint(signed)
    finally:
        index.close()
        tiles.close()


async def _replay_setup(ctx: Context) -> None:
    entries, admin, policy_topic = await _decided(ctx, ctx.events)
    work = Path(tempfile.mkdtemp(prefix="evhub-bench-replay-"))
    key = SigningKey.generate()
    signer = NoteSigner(ORIGIN, key)
    await asyncio.to_thread(_build_log, entries, work / "audit", signer, AvroCodec.load())
    (work / "log.key").write_bytes(key.to_pem())
    pki = create_dev_pki(work / "pki", ["audit"])["audit"]
    auditor = issue_leaf(work / "pki", "auditor", uris=(principal_uri("auditor", "bench"),))
    topic, dead = await _audit_topics(ctx)
    port = _free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
           "EVHUB_KAFKA_BOOTSTRAP": ctx.bootstrap, "EVHUB_AUDIT_TOPIC": topic, "EVHUB_AUDIT_DEAD_LETTER_TOPIC": dead,
           "EVHUB_AUDIT_DATA_DIR": str(work / "audit"), "EVHUB_AUDIT_SIGNING_KEY": str(work / "log.key"),
           "EVHUB_AUDIT_ORIGIN": ORIGIN, "EVHUB_AUDIT_PORT": str(port), "EVHUB_AUDIT_TLS_CERT": str(pki.cert),
           "EVHUB_AUDIT_TLS_KEY": str(pki.key), "EVHUB_AUDIT_TLS_CA": str(pki.ca)}  # fmt: skip
    log = (work / "audit.log").open("wb")
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "services.audit", env=env, stdout=log, stderr=log)
    ctx.state.update(work=work, proc=proc, logfile=log, admin=admin, policy_topic=policy_topic, signer=signer, round=0,
                     url=f"https://127.0.0.1:{port}", ssl=client_context(auditor))  # fmt: skip
    async with asyncio.timeout(120):
        while True:
            if proc.returncode is not None:
                raise RuntimeError(f"the audit service exited: {(work / 'audit.log').read_text()[-2000:]}")
            try:
                async with HttpLogSource(url=ctx.state["url"], ssl_context=ctx.state["ssl"]) as source:
                    await source.checkpoint()
                break
            except Exception:  # not up yet
                await asyncio.sleep(0.2)


async def _replay_teardown(ctx: Context) -> None:
    proc: asyncio.subprocess.Process = ctx.state["proc"]
    os.kill(proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(30):
            await proc.wait()
    except TimeoutError:
        os.kill(proc.pid, signal.SIGKILL)
        await proc.wait()
    ctx.state["logfile"].close()
    shutil.rmtree(ctx.state["work"], ignore_errors=True)


@scenario(name="audit-replay", record_size=ENTRY_BYTES, baseline="audit-decode", events=100_000, quick_events=2_000,
          setup=_replay_setup, teardown=_replay_teardown)  # fmt: skip
async def audit_replay(ctx: Context) -> int:
    """Entries replayed per second: fetched over mTLS, recomputed into the tree, decoded and re-decided."""
    ctx.state["round"] += 1
    state = CheckpointState(ctx.state["work"] / f"state-{ctx.state['round']}", role="auditor")
    store = PolicyStore(trusted=trusted_keys([ctx.state["admin"].public]))  # hub.policy as the auditor replays it
    await load_store(ctx.bootstrap, store, topic=ctx.state["policy_topic"])
    opts = ReplayOptions(log=ctx.state["signer"].verifier(), engine=PolicyEngine(store, cache_size=1 << 18),
                         codec=AvroCodec.load(), state=state)  # fmt: skip
    with ctx.timed():
        async with HttpLogSource(url=ctx.state["url"], ssl_context=ctx.state["ssl"]) as source:
            report = await replay(source, opts)
    if not report.ok or report.replayed != ctx.events:
        raise RuntimeError(f"the replay found {report.count} discrepancies in {report.replayed} entries")
    return report.replayed
