"""Every hub client reaches the locked-down cluster with its own certificate, configured the one way every service
and ``evhub`` command is (``EVHUB_KAFKA_SSL_CERT/KEY/CA``), and is refused with one clear line outside its role.

The publisher and the gateway are shown in the fault tests (they run there as processes with their principals);
here: key custody (``evhub keys``), policy administration (``evhub policy push``), the audit service, and
``evhub kafka acls``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from services.audit.note import NoteSigner
from services.policy.pack import SAMPLE_PACK
from services.shared.audit_records import decode_batch
from services.shared.avro import AvroCodec
from services.shared.errors import EvidenceHubError
from services.shared.kafka import AUDIT_TOPIC, DEAD_LETTER_TOPIC, make_producer
from services.shared.keys import SigningKey
from services.shared.local_cluster import LocalCluster
from services.shared.settings import KafkaSettings
from tests.audit import support
from tests.audit.support import ORIGIN
from tests.cluster.harness import read_topic

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]


def _kafka_env(cluster: LocalCluster, principal: str) -> dict[str, str]:
    files = cluster.certs[principal]
    return {"EVHUB_KAFKA_BOOTSTRAP": cluster.bootstrap, "EVHUB_KAFKA_SSL_CERT": str(files.cert),
            "EVHUB_KAFKA_SSL_KEY": str(files.key), "EVHUB_KAFKA_SSL_CA": str(files.ca),
            "EVHUB_KAFKA_REPLICATION_FACTOR": "3", "EVHUB_KAFKA_MIN_INSYNC_REPLICAS": "2"}  # fmt: skip


def evhub(cluster: LocalCluster, principal: str, *args: str, **extra: str) -> subprocess.CompletedProcess[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EVHUB_")}, **_kafka_env(cluster, principal),
           **extra, "PYTHONPATH": str(ROOT)}  # fmt: skip
    return subprocess.run([sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True,
                          cwd=ROOT, check=False, timeout=180)  # fmt: skip


def _one_clear_line(run: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in run.stderr, run.stderr
    lines = [line for line in run.stderr.splitlines() if line.startswith("evhub:")]
    assert len(lines) == 1, run.stderr
    return lines[0]


def test_key_custody_registers_a_key_and_no_other_principal_may(cluster: LocalCluster, tmp_path: Path) -> None:
    for name in ("anchor", "group"):
        assert evhub(cluster, "key-custody", "keys", "generate", str(tmp_path / name)).returncode == 0
    register = ["keys", "register", "--anchor-key", str(tmp_path / "anchor.key"),
                "--public-key", str(tmp_path / "group.pub.pem"), "--org", "Syrian documentation group"]  # fmt: skip
    refused = evhub(cluster, "publisher", *register)  # may read hub.keys, not write it
    assert refused.returncode == 5, refused.stderr
    assert "refused the certificate" in _one_clear_line(refused)
    unseen = evhub(cluster, "audit", *register)  # may not even see hub.keys
    assert unseen.returncode == 4, unseen.stderr
    assert "may not see it" in _one_clear_line(unseen)
    done = evhub(cluster, "key-custody", *register)
    assert done.returncode == 0, done.stderr
    listed = evhub(cluster, "key-custody", "keys", "list", "--anchor", str(tmp_path / "anchor.pub.pem"))
    assert "Syrian documentation group" in listed.stdout, listed.stderr


def test_policy_administration_pushes_a_version_and_the_gateway_may_not(cluster: LocalCluster, tmp_path: Path) -> None:
    assert evhub(cluster, "policy-admin", "keys", "generate", str(tmp_path / "admin")).returncode == 0
    push = ["policy", "push", str(SAMPLE_PACK), "--key", str(tmp_path / "admin.key"), "--author", "policy board",
            "--trust", str(tmp_path / "admin.pub.pem")]  # fmt: skip
    refused = evhub(cluster, "gateway", *push)  # reads hub.policy, may not write it
    assert refused.returncode == 5, refused.stderr
    assert "refused the certificate" in _one_clear_line(refused)
    pushed = evhub(cluster, "policy-admin", *push)
    assert pushed.returncode == 0, pushed.stderr
    assert "pushed" in pushed.stdout


async def test_the_audit_service_integrates_hub_audit_with_its_own_certificate(
    cluster: LocalCluster, tmp_path: Path
) -> None:
    pki = support.make_pki(tmp_path / "pki")
    files = cluster.certs["audit"]
    kafka = KafkaSettings(ssl_cert=files.cert, ssl_key=files.key, ssl_ca=files.ca, replication_factor=3,
                          min_insync_replicas=2)  # fmt: skip
    settings = support.settings_for(tmp_path, AUDIT_TOPIC, DEAD_LETTER_TOPIC, pki, kafka=kafka)
    signer = NoteSigner(ORIGIN, SigningKey.generate())
    codec = AvroCodec.load()
    marker = f"item-{uuid.uuid4().hex[:8]}"
    producer = make_producer(cluster.connection("gateway"), client_id="faults-gateway")  # the one writer of hub.audit
    await producer.start()
    try:
        await producer.send_and_wait(AUDIT_TOPIC, support.batch(codec, [support.entry(1, item=marker)]))
    finally:
        await producer.stop()
    entries, junk = 0, 0  # what the log must hold once it integrated everything on hub.audit so far
    for _, _, value in await read_topic(cluster, AUDIT_TOPIC):
        try:
            entries += len(decode_batch(codec, value)[2])
        except EvidenceHubError:
            junk += 1  # another test's probe record: the audit service dead-letters it
    async with support.running(settings, bootstrap=cluster.bootstrap, signer=signer, pki=pki) as log:

        async def integrated() -> bool:
            async with log.client("auditor") as http, http.get("/healthz") as r:
                body = await r.json()
            return bool(r.status == 200 and body["size"] >= entries and body["dead_letters"] >= junk)

        await support.wait_for(integrated, within=60, what="hub.audit integrated by the audit principal")


def test_evhub_kafka_acls_provisions_as_the_admin_and_refuses_anyone_else(cluster: LocalCluster) -> None:
    again = evhub(cluster, "kafka-admin", "kafka", "acls", "--jurisdiction", "DE")
    assert again.returncode == 0, again.stderr
    assert "0 created" in again.stdout
    refused = evhub(cluster, "gateway", "kafka", "acls")
    assert refused.returncode == 5, refused.stderr
    assert "super user" in _one_clear_line(refused) or "may not create" in _one_clear_line(refused)


def test_a_service_with_half_its_kafka_tls_settings_refuses_to_start(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "EVHUB_KAFKA_BOOTSTRAP": "127.0.0.1:9",
           "EVHUB_GATEWAY_TLS_CERT": "a", "EVHUB_GATEWAY_TLS_KEY": "b", "EVHUB_GATEWAY_TLS_CA": "c",
           "EVHUB_KAFKA_SSL_CERT": str(tmp_path / "x.pem")}  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "services.gateway"], env=env, capture_output=True, text=True,
                         cwd=tmp_path, check=False, timeout=60)  # fmt: skip
    assert run.returncode == 5
    assert "EVHUB_KAFKA_SSL_KEY" in run.stderr
    assert "Traceback" not in run.stderr
