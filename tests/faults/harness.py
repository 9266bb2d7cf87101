"""The fault suite's parts: real publisher processes, a real client, and an independent count of what Kafka holds.

- :class:`Hub`: one signing key registered on ``hub.keys`` and a set of jurisdictions of its own, on the suite's
  broker; it writes the environment a publisher process needs.
- :class:`PublisherProcess`: ``python -m services.publisher`` started, watched, signalled (SIGKILL, SIGTERM) and
  reaped by PID. Every wait has a deadline; a wait that runs out fails the test (``Bounded``).
- :func:`publish`: the archivists' own client (``services.cli.publish.publish_all``, the code behind
  ``evhub publish``, with its resume journal), over files written for the test.
- :func:`audit`: reads every evidence topic back and counts, with ``tests.shared.independent_verifier`` (Apache avro
  and ``cryptography`` only, nothing of the hub's PAE or codec): records, distinct envelopes, redeliveries,
  sequence numbers signed twice, events per item (an item with two version-1 events was published twice), and
  items missing from a jurisdiction.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp

from services.cli.manifest import Entry
from services.cli.publish import Journal, Outcome, publish_all
from services.publisher.core import parse_metadata
from services.shared.avro import AvroCodec
from services.shared.errors import KafkaUnavailable
from services.shared.kafka import KEYS_TOPIC, ensure_hub_topics, evidence_topic, hub_topics, make_producer, read_to_end
from services.shared.keys import SigningKey
from services.shared.local_kafka import die_with_parent, free_port
from services.shared.registry import issue
from services.shared.settings import KafkaSettings
from tests.publisher.samples import metadata, png
from tests.shared.independent_verifier import Refused, verify
from tests.waiting import Bounded, until

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Hub:
    bootstrap: str
    work: Path
    jurisdictions: list[str]
    anchor: SigningKey = field(default_factory=SigningKey.generate)
    signer: SigningKey = field(default_factory=SigningKey.generate)

    @classmethod
    async def create(cls, bootstrap: str, work: Path, n: int = 3) -> Hub:
        suffix = uuid.uuid4().hex[:6].upper()
        hub = cls(bootstrap, work, [f"{c}-{suffix}" for c in ("DE", "FR", "SE")[:n]])
        work.mkdir(parents=True, exist_ok=True)
        (work / "anchor.pub.pem").write_bytes(hub.anchor.public.to_pem())
        (work / "signer.key").write_bytes(hub.signer.to_pem())
        settings = KafkaSettings(bootstrap=bootstrap)

        async def topics() -> bool:  # a broker restarted by a previous scenario may still be fenced for a moment
            try:
                await ensure_hub_topics(bootstrap, hub_topics(hub.jurisdictions), kafka=settings)
            except KafkaUnavailable:
                return False
            return True

        await until("the hub's topics created", 60, topics, every=1.0)
        record = issue(AvroCodec.load(), hub.anchor, public_key=hub.signer.public, organisation="fault suite",
                       not_before=datetime.now(UTC) - timedelta(days=1))  # fmt: skip
        producer = make_producer(bootstrap, client_id="fault-keys")
        await producer.start()
        try:
            await producer.send_and_wait(KEYS_TOPIC, record, key=hub.signer.key_id.encode())
        finally:
            await producer.stop()
        return hub

    @property
    def topics(self) -> list[str]:
        return [evidence_topic(j) for j in self.jurisdictions]

    def env(self, data_dir: Path, port: int, **extra: str) -> dict[str, str]:
        base = {
            "EVHUB_KAFKA_BOOTSTRAP": self.bootstrap, "EVHUB_KAFKA_REQUEST_TIMEOUT_MS": "5000",
            "EVHUB_PUBLISHER_PORT": str(port), "EVHUB_PUBLISHER_HOST": "127.0.0.1",
            "EVHUB_PUBLISHER_UNSAFE_PLAINTEXT": "true", "EVHUB_PUBLISHER_DATA_DIR": str(data_dir),
            "EVHUB_PUBLISHER_SIGNING_KEY_FILE": str(self.work / "signer.key"),
            "EVHUB_PUBLISHER_TRUST_ANCHOR_FILES": f'["{self.work / "anchor.pub.pem"}"]',
            "EVHUB_PUBLISHER_JURISDICTIONS": "[" + ", ".join(f'"{j}"' for j in self.jurisdictions) + "]",
            "EVHUB_PUBLISHER_RELAY_INTERVAL_S": "0.5", "EVHUB_PUBLISHER_DELIVERY_TIMEOUT_S": "3",
            "EVHUB_PUBLISHER_TRANSACTION_TIMEOUT_S": "10", "EVHUB_PUBLISHER_SHUTDOWN_GRACE_S": "4",
            "EVHUB_PUBLISHER_STARTUP_TIMEOUT_S": "60",
        }  # fmt: skip
        return {**{k: v for k, v in os.environ.items() if not k.startswith("EVHUB_")}, **base, **extra}

    def items(self, folder: Path, prefix: str, count: int, *, start: int = 0) -> list[Entry]:
        """``count`` evidence items with their files, for every jurisdiction of this hub."""
        folder.mkdir(parents=True, exist_ok=True)
        entries = []
        for n in range(start, start + count):
            path = folder / f"{prefix}-{n}.png"
            path.write_bytes(png(seed=hash((prefix, n)) & 0xFFFF) + n.to_bytes(4, "big"))
            meta = parse_metadata(metadata(f"{prefix}-{n}", self.jurisdictions, file_name=path.name))
            entries.append(Entry(path, meta, n))
        return entries


#: Every process the suite started; whatever is still running after a test is killed by PID (conftest).
LIVE: list[subprocess.Popen[bytes]] = []


class PublisherProcess:
    """One ``python -m services.publisher``; stdout+stderr go to ``log``."""

    def __init__(self, hub: Hub, data_dir: Path, *, name: str, port: int | None = None, **extra: str) -> None:
        self.hub, self.data_dir, self.name = hub, data_dir, name
        self.port = port or free_port()
        self.extra = extra
        self.log = hub.work / "logs" / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._offset = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def spawn(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "services.publisher"], env=self.hub.env(self.data_dir, self.port, **self.extra),
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
                preexec_fn=die_with_parent,
            )  # fmt: skip
        LIVE.append(self.proc)

    def output(self) -> str:
        """What this start wrote."""
        with self.log.open("rb") as f:
            f.seek(self._offset)
            return f.read().decode(errors="replace")

    async def start(self, deadline_s: float = 90.0) -> None:
        """Spawn and wait until ``/healthz`` answers; fails (with the log) if it exits first."""
        self.spawn()
        await until(f"{self.name} ready", deadline_s, self._ready)

    async def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s, \
                    s.get(f"{self.url}/healthz") as r:  # fmt: skip
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def refused(self, deadline_s: float = 90.0) -> tuple[int, str]:
        """Spawn and wait for it to exit (it must refuse to start). Returns (exit code, its last line)."""
        self.spawn()
        code = await self.wait(deadline_s)
        lines = [line for line in self.output().splitlines() if line.strip()]
        return code, lines[-1] if lines else ""

    async def wait(self, deadline_s: float) -> int:
        proc = self.proc
        assert proc is not None
        await until(f"{self.name} exits", deadline_s, lambda: proc.poll() is not None)
        return proc.returncode

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def kill(self) -> None:
        self.signal(signal.SIGKILL)
        await self.wait(10)

    async def stop(self, deadline_s: float = 30.0) -> int:
        """SIGTERM, and wait (bounded) for the exit."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.signal(signal.SIGTERM)
        return await self.wait(deadline_s)

    def ensure_gone(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    async def get(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, s.get(self.url + path) as r:
            return r.status, await r.json(content_type=None)


async def publish(url: str, entries: Sequence[Entry], journal: Path, *, concurrency: int = 4,
                  on_done: Callable[[Outcome], None] = lambda o: None) -> list[Outcome]:  # fmt: skip
    """The archivists' client; an unreachable publisher fails every remaining item (retriable) instead of raising."""
    try:
        return await publish_all(entries, url=url, ssl_context=None, journal=Journal(journal),
                                 concurrency=concurrency, on_done=on_done)  # fmt: skip
    except Exception as exc:  # PublisherUnreachable: the process was killed under the client
        return [Outcome(e.metadata.item_id, str(e.path), "failed", error=repr(exc), retriable=True) for e in entries]


async def publish_until_done(url: str, entries: Sequence[Entry], journal: Path, *, attempts: int = 8,
                             concurrency: int = 4) -> list[Outcome]:  # fmt: skip
    """Re-run the client (its journal skips what is done) until every item is published; bounded attempts."""
    for _ in range(attempts):
        outcomes = await publish(url, entries, journal, concurrency=concurrency)
        if all(o.status != "failed" for o in outcomes):
            return outcomes
        await asyncio.sleep(1.0)
    failed = [f"{o.item_id}: {o.error}" for o in outcomes if o.status == "failed"]
    raise Bounded(f"items still failing after {attempts} runs of the client: {failed[:5]}")


@dataclass
class Audit:
    """What Kafka holds for one key, counted by the independent verifier."""

    records: int = 0
    envelopes: int = 0
    redelivered: int = 0  # the same envelope more than once (at-least-once per record)
    signed_twice: int = 0  # a (topic, sequence) with two different envelopes: must be 0
    refused: int = 0  # records that do not verify with the key
    events: dict[str, dict[str, set[str]]] = field(default_factory=dict)  # topic → item → version-1 event ids

    def duplicated(self, topic: str) -> int:
        """Items published twice as new events on ``topic``."""
        return sum(len(ids) - 1 for ids in self.events.get(topic, {}).values() if len(ids) > 1)

    def missing(self, topic: str, items: Sequence[str]) -> int:
        held = self.events.get(topic, {})
        return sum(item not in held for item in items)


async def audit(hub: Hub) -> Audit:
    result = Audit()
    for topic in hub.topics:
        by_sequence: dict[int, set[bytes]] = defaultdict(set)
        seen: set[bytes] = set()
        events: dict[str, set[str]] = defaultdict(set)
        for record in await read_to_end(hub.bootstrap, topic, timeout_s=60):
            result.records += 1
            value = record.value or b""
            try:
                opened = verify(value, topic=topic, public_key=hub.signer.public.raw)
            except Refused:
                result.refused += 1
                continue
            if value in seen:
                result.redelivered += 1
                continue
            seen.add(value)
            by_sequence[opened.sequence].add(value)
            if opened.record.get("version") == 1:
                events[opened.record["item_id"]].add(opened.record["event_id"])
        result.envelopes += len(seen)
        result.signed_twice += sum(len(v) - 1 for v in by_sequence.values() if len(v) > 1)
        result.events[topic] = dict(events)
    return result


@dataclass
class Row:
    """One scenario's line in docs/reliability.md."""

    scenario: str
    runs: int = 0
    at_risk: int = 0  # events whose request was in flight, or signed and unacknowledged, at a fault
    lost: int = 0
    duplicated: int = 0
    redelivered: int = 0
    signed_twice: int = 0
    note: str = ""

    def add_audit(self, hub: Hub, audit_: Audit, items: Sequence[str]) -> None:
        self.lost += sum(audit_.missing(t, items) for t in hub.topics)
        self.duplicated += sum(audit_.duplicated(t) for t in hub.topics)
        self.redelivered += audit_.redelivered
        self.signed_twice += audit_.signed_twice

    def assert_clean(self, context: str = "") -> None:
        """0 lost, 0 published twice, 0 signed twice — and 0 redelivered: the publisher reconciles with Kafka
        before it sends anything again, so even the record-level duplicate window is closed. ``context`` (e.g. the
        publisher's output) is shown when it fails."""
        assert (self.lost, self.duplicated, self.signed_twice, self.redelivered) == (0, 0, 0, 0), f"{self}\n{context}"
