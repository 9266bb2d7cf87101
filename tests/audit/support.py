"""Test support for the audit service: hub.audit-like topics on the real broker, audit batches, principals'
certificates from the dev CA, an mTLS client, and the service started in-process on a real TLS socket."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from services.audit.note import NoteSigner
from services.audit.service import create_app
from services.audit.settings import AuditSettings
from services.shared import audit_records
from services.shared.avro import AvroCodec
from services.shared.kafka import TopicSpec, ensure_topics, make_producer
from services.shared.tls import CertFiles, client_context, create_dev_pki, server_context

ORIGIN = "audit.evidence-hub.test/log"
OFFICES = ("DE-GBA-WCU", "FR-PNAT", "SE-ICC")


def entry(n: int, *, office: str | None = None, item: str | None = None, decision: str | None = None,
          entry_id: str | None = None) -> dict[str, Any]:  # fmt: skip
    office = office or OFFICES[n % len(OFFICES)]
    return {
        "entry_id": entry_id or str(uuid.uuid4()), "at": dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
        + dt.timedelta(seconds=n), "gateway": "gw-1", "office": office, "client_cert_sha256": "ab" * 32,
        "request_id": f"r{n}", "action": "ReadItem", "jurisdiction": "DE",
        "item": {"topic": "evidence.DE", "partition": 0, "offset": n, "payload_type": "application/vnd.evhub",
                 "event_id": f"ev-{n}", "item_id": item or f"item-{n % 7}", "version": 1, "key_id": "k" * 64,
                 "sequence": n, "envelope_sha256": "cd" * 32},
        "decision": decision or ("RELEASED" if n % 3 else "REFUSED"),
    }  # fmt: skip


def batch(codec: AvroCodec, entries: list[dict[str, Any]], batch_id: str | None = None) -> bytes:
    raw = [audit_records.encode_entry(codec, e) for e in entries]
    return audit_records.encode_batch(codec, batch_id=batch_id or str(uuid.uuid4()), gateway="gw-1", entries=raw)


async def audit_topics(bootstrap: str, name: str) -> tuple[str, str]:
    """A fresh one-partition audit topic and its dead-letter topic."""
    topic, dead = f"{name}.audit", f"{name}.deadletter"
    await ensure_topics(bootstrap, [TopicSpec(topic, 1), TopicSpec(dead, 1)])
    return topic, dead


async def produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = make_producer(bootstrap, client_id="test-gateway", max_batch_size=1 << 20)
    await producer.start()
    try:
        futures = [await producer.send(topic, v) for v in values]
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


def issue_principal(directory: Path, name: str, uri: str | None) -> CertFiles:
    """A client certificate from the dev CA in ``directory`` carrying ``uri`` as a SAN (or none)."""
    ca_key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes())
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    if uri:
        sans.append(x509.UniformResourceIdentifier(uri))
    cert = (
        x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    files = CertFiles(cert=directory / f"{name}.pem", key=directory / f"{name}.key", ca=directory / "ca.pem")
    files.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()))  # fmt: skip
    files.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return files


@dataclass
class Pki:
    server: CertFiles
    clients: dict[str, ssl.SSLContext]
    #: The same principals' certificate files (for ``evhub`` run as a process).
    files: dict[str, CertFiles]


def make_pki(directory: Path) -> Pki:
    server = create_dev_pki(directory, ["audit"])["audit"]
    files = {"auditor": issue_principal(directory, "auditor", "urn:evhub:auditor:court-1"),
             "nobody": issue_principal(directory, "nobody", None)}  # fmt: skip
    for office in (*OFFICES, "SE-IPC"):
        files[office] = issue_principal(directory, office, f"urn:evhub:office:{office}")
    return Pki(server, {name: client_context(f) for name, f in files.items()}, files)


def settings_for(tmp: Path, topic: str, dead: str, pki: Pki, **overrides: Any) -> AuditSettings:
    return AuditSettings(
        topic=topic, dead_letter_topic=dead, data_dir=tmp / "audit", origin=ORIGIN, tls_cert=pki.server.cert,
        tls_key=pki.server.key, tls_ca=pki.server.ca, **overrides,
    )  # fmt: skip


@dataclass
class Running:
    app: web.Application
    base: str
    pki: Pki

    @asynccontextmanager
    async def client(self, who: str) -> AsyncIterator[aiohttp.ClientSession]:
        connector = aiohttp.TCPConnector(ssl=self.pki.clients[who])
        async with aiohttp.ClientSession(base_url=self.base, connector=connector) as session:
            yield session


@asynccontextmanager
async def running(settings: AuditSettings, *, bootstrap: str, signer: NoteSigner, pki: Pki,
                  clock: Callable[[], float] | None = None) -> AsyncIterator[Running]:  # fmt: skip
    app = create_app(settings, bootstrap=bootstrap, signer=signer, clock=clock)
    runner = web.AppRunner(app)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(pki.server))
        await site.start()
        port = runner.addresses[0][1]
        yield Running(app, f"https://127.0.0.1:{port}", pki)
    finally:
        await runner.cleanup()


async def wait_for(condition: Callable[[], Awaitable[bool]], *, within: float = 30.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds, failing after ``within`` seconds (never a fixed sleep as sync)."""
    try:
        async with asyncio.timeout(within):
            while True:
                if await condition():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out after {within:g}s waiting for {what}") from None
