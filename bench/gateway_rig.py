"""A hub for the gateway's benchmarks: topics, the group's key, the sample policy, certificates, signed evidence, and
the gateway itself — as its own process (``python -m services.gateway``) or inside the scenario's process.

Owns everything a gateway scenario needs before its timed region: a jurisdiction and hub topics no other run uses,
a trust anchor and a signing key registered on the rig's ``hub.keys``, the sample policy pack with ten offices of
the rig's jurisdiction (``BENCH-0`` … ``BENCH-9``: cleared for SECRET but not PROTECTION, so every release withholds
the witness's identity — redaction on), a development CA with the gateway's and the offices' certificates, and
signed evidence envelopes (~1.3 KB of metadata, two protected values) produced with acks=all.

Does not own: what is measured (``bench.scenarios_gateway``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

import aiohttp

from services.gateway.service import gateway_topics
from services.gateway.settings import GatewaySettings
from services.policy.model import Office
from services.policy.pack import SAMPLE_PACK, load_pack
from services.policy.version import sign
from services.shared import disclosure
from services.shared.avro import AvroCodec
from services.shared.envelope import seal
from services.shared.kafka import ensure_hub_topics, evidence_topic, make_producer
from services.shared.keys import SigningKey
from services.shared.local_kafka import free_port
from services.shared.principals import principal_uri
from services.shared.registry import issue
from services.shared.settings import KafkaSettings
from services.shared.tls import CertFiles, client_context, issue_leaf

ROOT: Final = Path(__file__).resolve().parents[1]
ORGANISATION: Final = "bench documentation group"
OFFICES: Final = tuple(f"BENCH-{i}" for i in range(10))
CASE: Final = "CASE-SY-001"
CLASSIFICATIONS: Final = ("RESTRICTED", "CONFIDENTIAL", "SECRET")


@dataclass
class Rig:
    bootstrap: str
    jurisdiction: str
    settings: GatewaySettings
    codec: AvroCodec
    signer: SigningKey
    anchor: SigningKey
    admin: SigningKey
    work: Path
    certs: dict[str, CertFiles]
    next_sequence: int = 1
    process: subprocess.Popen[bytes] | None = None
    url: str = ""
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def topic(self) -> str:
        return evidence_topic(self.jurisdiction)

    def ssl_for(self, office: str) -> ssl.SSLContext:
        return client_context(self.certs[office])

    def feed_url(self) -> str:
        return f"{self.url}/v1/feeds/{self.jurisdiction}"

    def envelope(self, n: int, *, published_at: datetime | None = None) -> tuple[str, bytes]:
        """A signed evidence event (its event id, the envelope), numbered by this rig's sequence counter."""
        event_id = f"bench-{uuid.uuid4().hex}"
        witness = disclosure.make("witness.name", f"witness {n}", label="WITNESS_IDENTIFYING", salt=os.urandom(16))
        place = disclosure.make("location.exact", "33.51N 36.27E", label="LOCATION_EXACT", salt=os.urandom(16))
        record = {
            "event_id": event_id, "item_id": f"BENCH-{n}", "version": 1, "replaces_event_id": None,
            "publisher": {"organisation": ORGANISATION, "key_id": self.signer.key_id},
            "case_ids": [CASE, f"CASE-SY-{n % 64:03d}"], "jurisdiction": self.jurisdiction, "kind": "PHOTOGRAPH",
            "title": f"Detention facility photograph {n}",
            "description": "Photograph from a handed-over collection. " * 4,
            "content": [{"media_type": "image/jpeg", "size": 48_213, "sha256": os.urandom(32).hex(),
                         "file_name": f"photo-{n}.jpg"}],
            "capture": {"captured_at": datetime(2013, 3, 2, 9, 15, tzinfo=UTC), "device": "camera-A",
                        "collector_pseudonym": "collector-7", "region": "governorate (coarse)"},
            "custody": [{"at": datetime(2014, 1, 15, 12, tzinfo=UTC), "actor": "archive", "action": "ingested",
                         "sha256": None},
                        {"at": datetime(2015, 2, 1, 8, tzinfo=UTC), "actor": "archive", "action": "copied",
                         "sha256": None}],
            "classification": CLASSIFICATIONS[n % 3], "sensitivity": ["GRAPHIC"],
            "sharing": {"allowed_jurisdictions": [], "purposes": [], "consent_reference": None, "embargo_until": None},
            "related_items": [], "published_at": published_at or datetime.now(UTC),
            "protected": [{"label": d.label, "digest": d.digest} for d in (witness, place)],
        }  # fmt: skip
        sequence, self.next_sequence = self.next_sequence, self.next_sequence + 1
        return event_id, seal(self.codec, schema="evidence_event", record=record, topic=self.topic, signer=self.signer,
                              sequence=sequence, disclosures=[witness.encoded, place.encoded])  # fmt: skip

    async def produce(self, count: int) -> None:
        """``count`` signed events on the rig's topic, all acknowledged (set-up: as fast as the broker takes them)."""
        producer = make_producer(self.bootstrap, client_id="bench-rig", max_batch_size=1 << 20)
        await producer.start()
        try:
            futures = []
            for n in range(count):
                _, envelope = self.envelope(n)
                futures.append(await producer.send(self.topic, envelope, key=f"CASE-SY-{n % 64:03d}".encode()))
            await asyncio.gather(*futures)
        finally:
            await producer.stop()

    def env(self) -> dict[str, str]:
        s, tls = self.settings, self.certs["gateway"]
        return {
            **os.environ, "PYTHONPATH": str(ROOT), "EVHUB_KAFKA_BOOTSTRAP": self.bootstrap,
            "EVHUB_GATEWAY_PORT": str(s.port), "EVHUB_GATEWAY_JURISDICTIONS": json.dumps(s.jurisdictions),
            "EVHUB_GATEWAY_DATA_DIR": str(s.data_dir), "EVHUB_GATEWAY_CONTENT_DIR": str(s.content_dir),
            "EVHUB_GATEWAY_TRUST_ANCHOR_FILES": json.dumps([str(p) for p in s.trust_anchor_files]),
            "EVHUB_GATEWAY_POLICY_ADMIN_KEYS": json.dumps([str(p) for p in s.policy_admin_keys]),
            "EVHUB_GATEWAY_CURSOR_KEYS": json.dumps({k: v.get_secret_value() for k, v in s.cursor_keys.items()}),
            "EVHUB_GATEWAY_CURSOR_KEY_ID": s.cursor_key_id, "EVHUB_GATEWAY_KEYS_TOPIC": s.keys_topic,
            "EVHUB_GATEWAY_POLICY_TOPIC": s.policy_topic, "EVHUB_GATEWAY_AUDIT_TOPIC": s.audit_topic,
            "EVHUB_GATEWAY_DEADLETTER_TOPIC": s.deadletter_topic, "EVHUB_GATEWAY_TLS_CERT": str(tls.cert),
            "EVHUB_GATEWAY_TLS_KEY": str(tls.key), "EVHUB_GATEWAY_TLS_CA": str(tls.ca), **self.extra_env,
        }  # fmt: skip

    async def start_process(self, *, verified: int = 0, within_s: float = 120.0) -> None:
        """Start ``python -m services.gateway`` and wait until it is healthy and its reader verified ``verified``
        records (so a timed region measures delivery, not the one-time verification).

        Raises:
            RuntimeError: the gateway exited or did not get there in time (with its log's tail).
        """
        log = self.work / "gateway.log"
        with log.open("ab") as out:
            self.process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; readiness is awaited below
                [sys.executable, "-m", "services.gateway"],
                env=self.env(),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.url = f"https://127.0.0.1:{self.settings.port}"
        connector = aiohttp.TCPConnector(ssl=self.ssl_for(OFFICES[0]))
        async with aiohttp.ClientSession(connector=connector) as session:
            deadline = asyncio.get_running_loop().time() + within_s
            while True:
                if self.process.poll() is not None or asyncio.get_running_loop().time() > deadline:
                    tail = log.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"the gateway did not become ready: {tail}")
                with contextlib.suppress(aiohttp.ClientError, ValueError):
                    async with session.get(f"{self.url}/healthz") as response:
                        body = await response.json()
                        if response.status == 200 and body["readers"][self.jurisdiction]["verified"] >= verified:
                            return
                await asyncio.sleep(0.2)

    def gateway_pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    async def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, 20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait)
        self.process = None


async def make_rig(bootstrap: str, *, offices: int = len(OFFICES)) -> Rig:
    """Topics, keys, policy and certificates for one benchmark process (nothing is produced yet)."""
    suffix = uuid.uuid4().hex[:6].upper()
    jurisdiction = f"DE-{suffix}"
    work = Path(tempfile.mkdtemp(prefix="evhub-bench-gateway-"))
    codec, anchor, signer, admin = AvroCodec.load(), SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    for name, key in (("anchor", anchor), ("admin", admin)):
        (work / f"{name}.pub.pem").write_bytes(key.public.to_pem())
    pki = work / "pki"
    certs = {"gateway": issue_leaf(pki, "gateway")}
    certs |= {o: issue_leaf(pki, o, uris=(principal_uri("office", o),)) for o in OFFICES[:offices]}
    settings = GatewaySettings(
        kafka=KafkaSettings(bootstrap=bootstrap), jurisdictions=[jurisdiction], port=free_port(),
        data_dir=work / "gateway", content_dir=work / "content", instance="gw-bench",
        keys_topic=f"hub.keys.bench.{suffix}", policy_topic=f"hub.policy.bench.{suffix}",
        audit_topic=f"hub.audit.bench.{suffix}", deadletter_topic=f"hub.deadletter.bench.{suffix}",
        cursor_keys={"k1": base64.urlsafe_b64encode(os.urandom(32)).decode()}, cursor_key_id="k1",
        trust_anchor_files=[work / "anchor.pub.pem"], policy_admin_keys=[work / "admin.pub.pem"],
        tls_cert=certs["gateway"].cert, tls_key=certs["gateway"].key, tls_ca=certs["gateway"].ca,
    )  # fmt: skip
    await ensure_hub_topics(bootstrap, gateway_topics(settings), kafka=settings.kafka)
    producer = make_producer(bootstrap, client_id="bench-rig")
    await producer.start()
    try:
        record = issue(codec, anchor, public_key=signer.public, organisation=ORGANISATION,
                       not_before=datetime.now(UTC) - timedelta(days=1))  # fmt: skip
        await producer.send_and_wait(settings.keys_topic, record, key=signer.key_id.encode())
        pack = load_pack(SAMPLE_PACK)
        bench_offices = tuple(Office(office_id=o, jurisdiction=jurisdiction, clearances=("SECRET",),
                                     assigned_cases=(CASE,), purposes=("prosecution",)) for o in OFFICES)  # fmt: skip
        version = pack.version(author="bench", effective_from=datetime.now(UTC).replace(microsecond=0))
        signed = sign(version.model_copy(update={"offices": pack.offices + bench_offices}), admin)
        await producer.send_and_wait(settings.policy_topic, signed.to_record(), key=signed.content_hash.encode())
    finally:
        await producer.stop()
    return Rig(bootstrap=bootstrap, jurisdiction=jurisdiction, settings=settings, codec=codec, signer=signer,
               anchor=anchor, admin=admin, work=work, certs=certs)  # fmt: skip


async def delete_topics(bootstrap: str, topics: list[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.delete_topics(topics)
    finally:
        await admin.close()


def rig_topics(rig: Rig) -> list[str]:
    s = rig.settings
    return [rig.topic, s.keys_topic, s.policy_topic, s.audit_topic, s.deadletter_topic]


def feed_events(body: Any) -> list[Any]:
    events = body.get("events") if isinstance(body, dict) else None
    if not isinstance(events, list):
        raise RuntimeError(f"not a feed page: {str(body)[:200]}")
    return events
