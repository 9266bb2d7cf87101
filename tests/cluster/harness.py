"""The broker-fault tests' parts: the hub on the locked-down cluster, a streaming archivist, and independent counts.

- :class:`ClusterHub`: one signing key registered on ``hub.keys`` (by the key custodian's Kafka principal) and
  jurisdictions of its own; the environment of a publisher process speaking mTLS to Kafka as ``publisher``.
- :class:`Streamer`: an archivist publishing over HTTP without pause, each item retried with its Idempotency-Key
  until acknowledged (a 503 is expected during faults); it knows what was acknowledged, when, and where.
- :func:`read_topic`: every committed record of a topic, read with a plain aiokafka consumer whose TLS context is
  built here from the files; :func:`count` decides with ``tests.shared.independent_verifier`` (Apache avro and
  ``cryptography``, nothing of the hub's codec or PAE) what is lost, duplicated, or acknowledged somewhere else.
- :func:`replica_logs`: what each broker's own log segments hold — Kafka's record-batch format parsed from the
  files on disk — to count on how many replicas an acknowledged event really is.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import struct
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from services.cli.supervise import running_service
from services.shared.avro import AvroCodec
from services.shared.kafka import KEYS_TOPIC, ensure_hub_topics, evidence_topic, hub_topics, make_producer
from services.shared.keys import SigningKey
from services.shared.local_cluster import LocalCluster
from services.shared.local_kafka import free_port
from services.shared.registry import issue
from services.shared.settings import KafkaSettings
from services.shared.tls import CertFiles
from tests.publisher.samples import metadata, png
from tests.shared.independent_verifier import Refused, verify
from tests.waiting import Bounded, until

#: What every hub service on the cluster is configured with (docker-compose.yml's values).
REPLICATED = KafkaSettings(replication_factor=3, min_insync_replicas=2, request_timeout_ms=10_000)


def runs(default: int) -> int:
    """How many times a scenario injects its fault: ``default`` times ``EVHUB_FAULT_RUNS`` (1 in ``make test``)."""
    return default * max(1, int(os.environ.get("EVHUB_FAULT_RUNS", "1")))


@dataclass
class Row:
    """One scenario's line in docs/reliability.md."""

    scenario: str
    faults: int = 0  # signals sent to brokers (SIGKILL, SIGSTOP, SIGTERM)
    at_risk: int = 0  # publications in flight, or reads being served, when a fault was injected
    acknowledged: int = 0  # publications acknowledged (or reads served) in the scenario
    lost: int = 0
    duplicated: int = 0
    unaudited: int | None = None  # reads served without an audit entry (gateway scenarios)
    note: str = ""


def tls_context(files: CertFiles) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(files.ca))
    ctx.load_cert_chain(str(files.cert), str(files.key))
    return ctx


@asynccontextmanager
async def admin_client(cluster: LocalCluster, via: int | None = None) -> AsyncIterator[AIOKafkaAdminClient]:
    """An admin client as ``kafka-admin``; ``via`` a broker known to answer (others may be frozen)."""
    ctx = tls_context(cluster.certs["kafka-admin"])
    bootstrap = cluster.bootstrap if via is None else f"127.0.0.1:{cluster.port(via)}"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, security_protocol="SSL", ssl_context=ctx,
                                request_timeout_ms=5_000)  # fmt: skip
    await admin.start()
    try:
        yield admin
    finally:
        await admin.close()


async def partitions(cluster: LocalCluster, topic: str, *, via: int | None = None) -> dict[int, dict[str, Any]]:
    """partition → {"leader", "isr", "replicas"} as the cluster's metadata says now."""
    async with admin_client(cluster, via) as admin:
        (described,) = await admin.describe_topics([topic])
    return {p["partition"]: p for p in described["partitions"]}


async def in_sync(cluster: LocalCluster, *, within_s: float = 120.0) -> None:
    """Every partition of every topic has a leader and all its replicas in sync (Bounded otherwise)."""

    async def check() -> bool:
        try:
            async with admin_client(cluster) as admin:
                described = await admin.describe_topics()
        except Exception:  # a node still starting: ask again
            return False
        return all(p["leader"] >= 0 and sorted(p["isr"]) == sorted(p["replicas"])
                   for t in described for p in t["partitions"])  # fmt: skip

    await until("every partition back in sync", within_s, check, every=0.5)


@dataclass
class ClusterHub:
    cluster: LocalCluster
    work: Path
    jurisdictions: list[str]
    anchor: SigningKey = field(default_factory=SigningKey.generate)
    signer: SigningKey = field(default_factory=SigningKey.generate)

    @classmethod
    async def create(cls, cluster: LocalCluster, work: Path, *, keys_topics: tuple[str, ...] = (KEYS_TOPIC,),
                     countries: tuple[str, ...] = ("DE",)) -> ClusterHub:  # fmt: skip
        suffix = uuid.uuid4().hex[:6].upper()
        hub = cls(cluster, work, [f"{c}-{suffix}" for c in countries])
        work.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - a test's own small files
        (work / "anchor.pub.pem").write_bytes(hub.anchor.public.to_pem())
        (work / "signer.key").write_bytes(hub.signer.to_pem())
        specs = [s for s in hub_topics(hub.jurisdictions) if s.name in hub.topics]  # created by the operator
        await ensure_hub_topics(cluster.connection(), specs, kafka=REPLICATED)
        record = issue(AvroCodec.load(), hub.anchor, public_key=hub.signer.public, organisation="fault suite",
                       not_before=datetime.now(UTC) - timedelta(days=1))  # fmt: skip
        producer = make_producer(cluster.connection("key-custody"), client_id="faults-keys")
        await producer.start()
        try:
            for topic in keys_topics:
                await producer.send_and_wait(topic, record, key=hub.signer.key_id.encode())
        finally:
            await producer.stop()
        return hub

    @property
    def topics(self) -> list[str]:
        return [evidence_topic(j) for j in self.jurisdictions]

    def kafka_env(self, principal: str) -> dict[str, str]:
        files = self.cluster.certs[principal]
        return {"EVHUB_KAFKA_BOOTSTRAP": self.cluster.bootstrap, "EVHUB_KAFKA_SSL_CERT": str(files.cert),
                "EVHUB_KAFKA_SSL_KEY": str(files.key), "EVHUB_KAFKA_SSL_CA": str(files.ca),
                "EVHUB_KAFKA_REPLICATION_FACTOR": "3", "EVHUB_KAFKA_MIN_INSYNC_REPLICAS": "2",
                "EVHUB_KAFKA_REQUEST_TIMEOUT_MS": str(REPLICATED.request_timeout_ms)}  # fmt: skip

    @asynccontextmanager
    async def publisher(self, name: str = "publisher") -> AsyncIterator[str]:
        """``python -m services.publisher`` as its own process (Kafka principal ``publisher``), plain HTTP on
        loopback; yields its URL."""
        port = free_port()
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("EVHUB_")}, **self.kafka_env("publisher"),
            "EVHUB_PUBLISHER_HOST": "127.0.0.1", "EVHUB_PUBLISHER_PORT": str(port),
            "EVHUB_PUBLISHER_UNSAFE_PLAINTEXT": "true", "EVHUB_PUBLISHER_DATA_DIR": str(self.work / name),
            "EVHUB_PUBLISHER_SIGNING_KEY_FILE": str(self.work / "signer.key"),
            "EVHUB_PUBLISHER_TRUST_ANCHOR_FILES": json.dumps([str(self.work / "anchor.pub.pem")]),
            "EVHUB_PUBLISHER_JURISDICTIONS": json.dumps(self.jurisdictions),
            "EVHUB_PUBLISHER_RELAY_INTERVAL_S": "0.5",
        }  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        async with running_service("services.publisher", env=env, health_url=f"{url}/healthz", ssl_context=None,
                                   log_file=self.work / "logs" / f"{name}.log", timeout_s=120):  # fmt: skip
            yield url


@dataclass(frozen=True)
class Acked:
    item_id: str
    event_id: str
    deliveries: tuple[tuple[str, int, int], ...]  # (topic, partition, offset) the publisher answered with

    @classmethod
    def of(cls, item_id: str, answer: dict[str, Any]) -> Acked:
        deliveries = tuple((d["topic"], d["partition"], d["offset"]) for d in answer["deliveries"])
        return cls(item_id, answer["event_id"], deliveries)


async def publish(session: aiohttp.ClientSession, url: str, item_id: str, jurisdictions: list[str]) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("metadata", json.dumps(metadata(item_id, jurisdictions)), content_type="application/json")
    form.add_field("file", png(seed=hash(item_id) & 0xFFFF) + item_id.encode(), filename=f"{item_id}.png",
                   content_type="image/png")  # fmt: skip
    async with session.post(f"{url}/v1/evidence", data=form, headers={"Idempotency-Key": item_id}) as response:
        return response.status, await response.json(content_type=None)


class Streamer:
    """Publishes ``prefix-0``, ``prefix-1``, … until :meth:`stop`, each worker starting an item at most every
    ``pace_s`` (a steady load, not a flood: the machine's 2 cores also run six JVMs); every item is retried with its
    own Idempotency-Key until acknowledged (201, or 200 for a replay). Keeps what was acknowledged and the answers."""

    def __init__(self, url: str, jurisdictions: list[str], prefix: str, *, concurrency: int = 4,
                 pace_s: float = 0.05) -> None:  # fmt: skip
        self.url, self.jurisdictions, self.prefix, self.concurrency = url, jurisdictions, prefix, concurrency
        self.pace_s = pace_s
        self.acked: dict[str, Acked] = {}
        self.unavailable: list[dict[str, Any]] = []  # the 503 problems answered
        self.in_flight: set[str] = set()
        self.started = 0
        self._stop = asyncio.Event()
        self._next = 0

    def stop(self) -> None:
        self._stop.set()

    async def wait_acked(self, more: int, *, within_s: float) -> None:
        target = len(self.acked) + more
        await until(f"{more} more acknowledged publications", within_s, lambda: len(self.acked) >= target)

    async def run(self, *, settle_s: float = 240.0) -> None:
        """Until stopped; then every item started is retried until acknowledged (Bounded after ``settle_s``)."""
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            await asyncio.gather(*(self._worker(session, settle_s) for _ in range(self.concurrency)))

    async def _worker(self, session: aiohttp.ClientSession, settle_s: float) -> None:
        while not self._stop.is_set():
            item_id = f"{self.prefix}-{self._next}"
            self._next += 1
            self.started += 1
            self.in_flight.add(item_id)
            began = time.monotonic()
            await self._until_acked(session, item_id, settle_s)
            self.in_flight.discard(item_id)
            await asyncio.sleep(max(0.0, self.pace_s - (time.monotonic() - began)))  # load shaping, not a sync

    async def _until_acked(self, session: aiohttp.ClientSession, item_id: str, settle_s: float) -> None:
        deadline: float | None = None
        while True:
            try:
                status, body = await publish(session, self.url, item_id, self.jurisdictions)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, body = 0, {"detail": repr(exc)}
            if status in (200, 201):
                self.acked[item_id] = Acked.of(item_id, body)
                return
            if status == 503:
                self.unavailable.append(body)
            elif status != 0:
                raise AssertionError(f"{item_id}: unexpected {status}: {body}")
            if self._stop.is_set():
                deadline = deadline or time.monotonic() + settle_s
                if time.monotonic() > deadline:
                    raise Bounded(f"{item_id} not acknowledged within {settle_s:.0f}s after the faults")
            await asyncio.sleep(0.2)


async def read_topic(cluster: LocalCluster, topic: str) -> list[tuple[int, int, bytes]]:
    """Every committed record of ``topic`` as (partition, offset, value), read as ``kafka-admin``."""
    ctx = tls_context(cluster.certs["kafka-admin"])
    consumer = AIOKafkaConsumer(
        bootstrap_servers=cluster.bootstrap, security_protocol="SSL", ssl_context=ctx, group_id=None,
        enable_auto_commit=False, isolation_level="read_committed", auto_offset_reset="earliest",
    )  # fmt: skip
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in sorted(await partitions(cluster, topic))]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[tuple[int, int, bytes]] = []
        async with asyncio.timeout(60):
            while [tp for tp in tps if await consumer.position(tp) < ends[tp]]:
                for tp, records in (await consumer.getmany(*tps, timeout_ms=500)).items():
                    out += [(tp.partition, r.offset, r.value or b"") for r in records if r.offset < ends[tp]]
        return sorted(out)
    finally:
        await consumer.stop()


@dataclass
class Count:
    """What the topics hold for the acknowledged publications, decided by the independent verifier."""

    acked: int = 0
    lost: list[str] = field(default_factory=list)  # acknowledged, not in its topic
    duplicated: int = 0  # copies beyond the first of an event in a topic (a redelivered envelope included)
    misplaced: list[str] = field(default_factory=list)  # the acknowledged (partition, offset) holds another event
    refused: int = 0  # records that do not verify with the key


async def count(hub: ClusterHub, acked: dict[str, Acked]) -> Count:
    result = Count(acked=len(acked))
    for topic in hub.topics:
        where: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for partition, offset, value in await read_topic(hub.cluster, topic):
            try:
                opened = verify(value, topic=topic, public_key=hub.signer.public.raw)
            except Refused:
                result.refused += 1
                continue
            where[opened.record["event_id"]].append((partition, offset))
        result.duplicated += sum(len(places) - 1 for places in where.values())
        for item in acked.values():
            for t, partition, offset in item.deliveries:
                if t != topic:
                    continue
                if item.event_id not in where:
                    result.lost.append(f"{item.item_id} ({t}[{partition}]@{offset})")
                elif (partition, offset) not in where[item.event_id]:
                    result.misplaced.append(f"{item.item_id}: acknowledged at {partition}@{offset}, "
                                            f"found at {where[item.event_id]}")  # fmt: skip
    return result


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return (value >> 1) ^ -(value & 1), i  # zigzag


def _records(segment: bytes) -> Iterator[tuple[int, bytes]]:
    """(offset, value) of every data record in a log segment (record batch format v2, uncompressed)."""
    i = 0
    while i + 61 <= len(segment):
        base_offset, length = struct.unpack_from(">qi", segment, i)
        end = i + 12 + length
        if length <= 0 or end > len(segment):
            return  # a batch cut short by a kill: not in this log
        attributes = struct.unpack_from(">h", segment, i + 21)[0]
        assert attributes & 0x07 == 0, "compressed batches are not expected"
        n = struct.unpack_from(">i", segment, i + 57)[0]
        j = i + 61
        for _ in range(n):
            size, j = _varint(segment, j)
            after = j + size
            j += 1  # attributes
            _, j = _varint(segment, j)  # timestamp delta
            offset_delta, j = _varint(segment, j)
            key_length, j = _varint(segment, j)
            j += max(key_length, 0)
            value_length, j = _varint(segment, j)
            value = segment[j : j + max(value_length, 0)]
            if not attributes & 0x20:  # control batches (transaction markers) carry no data
                yield base_offset + offset_delta, value
            j = after
        i = end


def replica_logs(cluster: LocalCluster, broker: int, topic: str) -> dict[tuple[int, int], bytes]:
    """(partition, offset) → value of every record in ``broker``'s log segments of ``topic``, as on disk now."""
    out = {}
    for directory in cluster.node(broker).log_dir.glob(f"{topic}-*"):
        partition = int(directory.name.rsplit("-", 1)[1])
        for segment in sorted(directory.glob("*.log")):
            for offset, value in _records(segment.read_bytes()):
                out[(partition, offset)] = value
    return out


def replicas_holding(logs: dict[int, dict[tuple[int, int], bytes]], item: Acked, topic: str) -> Counter[int]:
    """For each delivery of ``item`` to ``topic``: on how many brokers' logs its event is at that offset."""
    held: Counter[int] = Counter()
    for t, partition, offset in item.deliveries:
        if t == topic:
            held[offset] = sum(item.event_id.encode() in log.get((partition, offset), b"") for log in logs.values())
    return held
