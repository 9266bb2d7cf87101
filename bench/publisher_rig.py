"""A real publisher for the upload benchmarks: ``python -m services.publisher`` in its own process, over mutual TLS.

Owns everything an upload scenario (and the memory test of uploads) needs before its timed region: a jurisdiction
no other run uses, a trust anchor and a signing key registered on ``hub.keys``, a development CA with the
publisher's and an archivist's certificates, the publisher process itself (started, waited for, stopped by PID),
and reading that process's memory: its resident set now and its high-water mark since :meth:`PublisherRig.reset_peak`
(``/proc/<pid>/status``: VmRSS, VmHWM; ``/proc/<pid>/clear_refs`` resets the mark), so what a scenario reports is
the publisher's own memory, not the client's.

Does not own: what is measured (``bench.scenarios_uploads``) or the client (``services.cli.publish``).
"""

from __future__ import annotations

import asyncio
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
from typing import Final

import aiohttp

from services.shared.avro import AvroCodec
from services.shared.kafka import KEYS_TOPIC, ensure_hub_topics, evidence_topic, hub_topics, make_producer
from services.shared.keys import SigningKey
from services.shared.local_kafka import die_with_parent, free_port
from services.shared.registry import issue
from services.shared.settings import KafkaSettings
from services.shared.tls import CertFiles, client_context, create_dev_pki

ROOT: Final = Path(__file__).resolve().parents[1]
CLIENT: Final = "archivist"


@dataclass
class PublisherRig:
    bootstrap: str
    work: Path
    jurisdiction: str
    certs: dict[str, CertFiles]
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def data_dir(self) -> Path:
        return self.work / "publisher"

    @property
    def content_dir(self) -> Path:
        """The publisher's content store (``DataDir.content``): its temporary files are on the same disk."""
        return self.data_dir / "content"

    def client_ssl(self) -> ssl.SSLContext:
        return client_context(self.certs[CLIENT])

    def env(self) -> dict[str, str]:
        tls = self.certs["publisher"]
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("EVHUB_")}, "PYTHONPATH": str(ROOT),
            "EVHUB_KAFKA_BOOTSTRAP": self.bootstrap, "EVHUB_PUBLISHER_HOST": "127.0.0.1",
            "EVHUB_PUBLISHER_PORT": str(self.port), "EVHUB_PUBLISHER_DATA_DIR": str(self.data_dir),
            "EVHUB_PUBLISHER_SIGNING_KEY_FILE": str(self.work / "signer.key"),
            "EVHUB_PUBLISHER_TRUST_ANCHOR_FILES": json.dumps([str(self.work / "anchor.pub.pem")]),
            "EVHUB_PUBLISHER_JURISDICTIONS": json.dumps([self.jurisdiction]),
            "EVHUB_PUBLISHER_ALLOWED_CLIENTS": json.dumps([CLIENT]), "EVHUB_PUBLISHER_TLS_CERT": str(tls.cert),
            "EVHUB_PUBLISHER_TLS_KEY": str(tls.key), "EVHUB_PUBLISHER_TLS_CA": str(tls.ca),
            "EVHUB_PUBLISHER_MAX_UPLOADS_PER_CLIENT": "256", **self.extra_env,
        }  # fmt: skip

    async def start(self, *, within_s: float = 120.0) -> None:
        """Start the publisher and wait until ``/healthz`` answers over mTLS. With ``EVHUB_BENCH_PROFILE_PUBLISHER``
        set to a path, the publisher runs under cProfile and writes its profile there when it stops.

        Raises:
            RuntimeError: it exited or did not answer in time (with its log's tail).
        """
        log = self.work / "publisher.log"
        with log.open("ab") as out:
            # S603: the command is this interpreter and, when profiling, the stdlib cProfile: no outside input
            self.process = subprocess.Popen(  # noqa: ASYNC220, S603 - returns at once; readiness is awaited below
                [sys.executable, *_profiled(), "-m", "services.publisher"], env=self.env(), stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT, start_new_session=True,
                preexec_fn=die_with_parent,
            )  # fmt: skip
        connector = aiohttp.TCPConnector(ssl=self.client_ssl())
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
            deadline = asyncio.get_running_loop().time() + within_s
            while True:
                if self.process.poll() is not None or asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"the publisher did not become ready: {log.read_text(errors='replace')[-3000:]}")
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(f"{self.url}/healthz") as response:
                        if response.status == 200:
                            return
                await asyncio.sleep(0.2)

    @property
    def pid(self) -> int:
        if self.process is None:
            raise RuntimeError("the publisher is not running")
        return self.process.pid

    def _status_kib(self, field_name: str) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"no {field_name} in /proc/{self.pid}/status")

    def rss_kib(self) -> int:
        """The publisher's resident set now (VmRSS)."""
        return self._status_kib("VmRSS")

    def peak_kib(self) -> int:
        """The publisher's resident high-water mark (VmHWM) since the last :meth:`reset_peak`."""
        return self._status_kib("VmHWM")

    def reset_peak(self) -> None:
        """Make the high-water mark the current resident set (Linux ``clear_refs``: 5)."""
        Path(f"/proc/{self.pid}/clear_refs").write_text("5", encoding="ascii")

    async def stop(self) -> None:
        """SIGTERM, then wait (bounded); SIGKILL if it does not exit in time."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.process.wait, 30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                await asyncio.to_thread(self.process.wait, 10)
        self.process = None


async def make_rig(bootstrap: str, *, work: Path | None = None) -> PublisherRig:
    """A jurisdiction and topics of its own, the key registered on ``hub.keys``, certificates (nothing started)."""
    work = work or Path(tempfile.mkdtemp(prefix="evhub-bench-uploads-"))
    work.mkdir(parents=True, exist_ok=True)
    jurisdiction = f"UP-{uuid.uuid4().hex[:6].upper()}"
    anchor, signer = SigningKey.generate(), SigningKey.generate()
    (work / "anchor.pub.pem").write_bytes(anchor.public.to_pem())
    (work / "signer.key").write_bytes(signer.to_pem())
    kafka = KafkaSettings(bootstrap=bootstrap)
    await ensure_hub_topics(bootstrap, hub_topics([jurisdiction]), kafka=kafka)
    record = issue(AvroCodec.load(), anchor, public_key=signer.public, organisation="bench uploads",
                   not_before=datetime.now(UTC) - timedelta(days=1))  # fmt: skip
    producer = make_producer(bootstrap, client_id="bench-uploads")
    await producer.start()
    try:
        await producer.send_and_wait(KEYS_TOPIC, record, key=signer.key_id.encode())
    finally:
        await producer.stop()
    certs = create_dev_pki(work / "pki", ["publisher", CLIENT])
    return PublisherRig(bootstrap=bootstrap, work=work, jurisdiction=jurisdiction, certs=certs)


def _profiled() -> list[str]:
    path = os.environ.get("EVHUB_BENCH_PROFILE_PUBLISHER")
    return ["-m", "cProfile", "-o", path] if path else []


def topics_of(rig: PublisherRig) -> list[str]:
    return [evidence_topic(rig.jurisdiction)]
