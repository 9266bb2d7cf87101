"""``evhub audit prove`` (an office fetches the tlog-proof of its receipt, verified before it is written) and
``evhub audit verify-proof`` (offline: no network), as real processes against the audit service over mTLS."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from services.audit.checkpoint import TlogProof
from services.audit.note import COSIGNATURE_V1, NoteSigner
from services.shared.avro import AvroCodec
from services.shared.cluster import KafkaTarget
from services.shared.keys import SigningKey
from tests.audit import cli_support, support
from tests.audit.support import ORIGIN, Pki, Running

pytestmark = pytest.mark.kafka
SIGNER = NoteSigner(ORIGIN, SigningKey.generate())
WITNESS_KEY = SigningKey.generate()
WITNESS = NoteSigner("oversight.example/w1", WITNESS_KEY, sig_type=COSIGNATURE_V1)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return support.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def log(kafka: KafkaTarget, codec: AvroCodec, topic_name: str, tmp_path: Path, pki: Pki
              ) -> AsyncIterator[tuple[Running, list[dict[str, object]]]]:  # fmt: skip
    policy = await cli_support.push_policy(kafka.bootstrap, f"{topic_name}.policy", tmp_path)
    entries = cli_support.reads(policy.engine, policy.start(policy.versions[0]) + timedelta(seconds=1), 40)
    topic, dead = await support.audit_topics(kafka.bootstrap, topic_name)
    await support.produce(kafka.bootstrap, topic, [support.batch(codec, entries)])
    settings = support.settings_for(tmp_path, topic, dead, pki, witness_keys=[WITNESS.vkey])
    async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as running:

        async def ready() -> bool:
            async with running.client("auditor") as http, http.get("/healthz") as r:
                return bool((await r.json())["size"] == len(entries))

        await support.wait_for(ready, what="40 entries")
        yield running, entries


async def test_an_office_proves_its_receipt_and_anyone_verifies_it_offline(
    log: tuple[Running, list[dict[str, object]]], pki: Pki, tmp_path: Path
) -> None:  # fmt: skip
    running, entries = log
    mine = next(e for e in entries if e["office"] == "FR-PNAT" and e["decision"] == "RELEASED")
    receipt = str(mine["entry_id"])
    out = tmp_path / "receipt.tlog-proof"
    tls = cli_support.tls_args(running.base, pki.files["FR-PNAT"])
    proved = await cli_support.evhub("audit", "prove", "--receipt", receipt, "--log-key", SIGNER.vkey,
                                     "--out", str(out), *tls)  # fmt: skip
    assert proved.code == 0, proved.stderr
    assert f"receipt {receipt} is entry {entries.index(mine)}" in proved.stdout
    assert out.read_bytes().startswith(b"c2sp.org/tlog-proof@v1\n")

    # offline: no --url, no certificate; a proxy setting pointing nowhere would not matter
    verified = await cli_support.evhub(
        "audit",
        "verify-proof",
        str(out),
        "--log-key",
        SIGNER.vkey,
        "--receipt",
        receipt,
        "--json",
        env={"EVHUB_CLIENT_AUDIT_URL": "https://192.0.2.1:9"},
    )
    assert verified.code == 0, verified.stderr
    summary = json.loads(verified.stdout)
    assert (summary["receipt"], summary["office"], summary["decision"]) == (receipt, "FR-PNAT", "RELEASED")

    other = str(next(e for e in entries if e["entry_id"] != receipt)["entry_id"])
    wrong = await cli_support.evhub("audit", "verify-proof", str(out), "--log-key", SIGNER.vkey, "--receipt", other)
    assert wrong.code == 3, wrong.stderr
    foreign = NoteSigner(ORIGIN, SigningKey.generate())
    wrong_key = await cli_support.evhub("audit", "verify-proof", str(out), "--log-key", foreign.vkey)
    assert wrong_key.code == 3, wrong_key.stderr
    proof = TlogProof.parse(out.read_bytes())
    assert proof.extra is not None
    tampered = TlogProof(proof.index, proof.proof, proof.checkpoint, extra=proof.extra[:-1] + b"\x01")
    (tmp_path / "t").write_bytes(tampered.encode())
    changed = await cli_support.evhub("audit", "verify-proof", str(tmp_path / "t"), "--log-key", SIGNER.vkey)
    assert changed.code == 3, changed.stderr
    moved = TlogProof(proof.index + 1, proof.proof, proof.checkpoint, extra=proof.extra)
    (tmp_path / "m").write_bytes(moved.encode())
    assert (await cli_support.evhub("audit", "verify-proof", str(tmp_path / "m"), "--log-key", SIGNER.vkey)).code == 3
    (tmp_path / "g").write_bytes(b"not a proof")
    garbage = await cli_support.evhub("audit", "verify-proof", str(tmp_path / "g"), "--log-key", SIGNER.vkey)
    assert garbage.code == 2, garbage.stderr
    assert "Traceback" not in garbage.stderr

    # another office's receipt is not found for this office; an auditor may prove any receipt
    de = str(next(e for e in entries if e["office"] == "DE-GBA-WCU")["entry_id"])
    refused = await cli_support.evhub("audit", "prove", "--receipt", de, "--log-key", SIGNER.vkey,
                                      "--out", str(tmp_path / "x"), *tls)  # fmt: skip
    assert refused.code == 2, refused.stderr
    assert "(404)" in refused.stderr
    assert not (tmp_path / "x").exists()


async def test_a_receipt_proven_after_a_witness_cosigned_carries_the_cosignature(
    log: tuple[Running, list[dict[str, object]]], pki: Pki, tmp_path: Path
) -> None:  # fmt: skip
    running, entries = log
    pem = tmp_path / "w.key"
    pem.write_bytes(WITNESS_KEY.to_pem())
    tls = cli_support.tls_args(running.base, pki.files["SE-IPC"])
    witnessed = await cli_support.evhub(
        "audit",
        "witness",
        "--once",
        "--log-key",
        SIGNER.vkey,
        "--witness-key",
        str(pem),
        "--name",
        WITNESS.name,
        "--state-dir",
        str(tmp_path / "w"),
        *tls,
    )
    assert witnessed.code == 0, witnessed.stderr
    mine = str(next(e for e in entries if e["office"] == "SE-IPC")["entry_id"])
    out = tmp_path / "p"
    proved = await cli_support.evhub("audit", "prove", "--receipt", mine, "--log-key", SIGNER.vkey, "--out", str(out),
                                     *tls)  # fmt: skip
    assert proved.code == 0, proved.stderr
    quorum = ["--witness", WITNESS.vkey, "--quorum", "1"]
    verified = await cli_support.evhub("audit", "verify-proof", str(out), "--log-key", SIGNER.vkey, *quorum)
    assert verified.code == 0, verified.stderr
    assert WITNESS.name in verified.stdout
    assert base64.b64decode(out.read_bytes().split(b"\n")[1][6:])  # the entry travels in the proof's extra line
