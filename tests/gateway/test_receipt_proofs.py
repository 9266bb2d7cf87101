"""An office keeps a proof of every receipt: `evhub subscribe --log-key` against the gateway and the audit log, both
as their own processes.

- Every receipt the office holds ends up with a `c2sp.org/tlog-proof@v1` in DIR/proofs, for that receipt, under a
  checkpoint signed by the log key the office was given (checked again here with `evhub audit verify-proof`).
- An office given another key for the log (the audit service is not the one it trusts) refuses the proofs: exit 3
  and no proof kept.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from services.audit.note import NoteSigner
from services.cli.supervise import running_service
from services.shared.keys import SigningKey
from services.shared.local_kafka import free_port
from services.shared.tls import client_context, issue_leaf
from tests.gateway.conftest import OFFICES, Hub
from tests.gateway.test_subscribe_process import ROOT, _env, _subscribe_argv

pytestmark = pytest.mark.kafka
ORIGIN = "evidence-hub.example/test-audit"


def _receipts(out: Path) -> set[str]:
    with sqlite3.connect(f"file:{out / 'state.sqlite3'}?mode=ro", uri=True) as db:
        return {r[0] for r in db.execute("SELECT receipt FROM receipts")}


async def _subscribe(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, argv, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                   capture_output=True, text=True, timeout=180, check=False)  # fmt: skip


async def test_an_office_keeps_a_verified_proof_of_every_receipt_and_refuses_a_log_it_does_not_trust(
    hub: Hub, tmp_path: Path
) -> None:
    await hub.stop()  # the gateway runs as its own process on the same state and topics
    for n in range(3):
        await hub.publish(f"PROOF-{n}", classification="RESTRICTED", seed=300 + n)
    await hub.publish("PROOF-CASE-3", classification="RESTRICTED", case_ids=["CASE-SY-003"], seed=310)  # not DE's

    gateway_port, audit_port = free_port(), free_port()
    gateway_url, audit_url = f"https://127.0.0.1:{gateway_port}", f"https://127.0.0.1:{audit_port}"
    log_key = SigningKey.generate()
    (tmp_path / "log.key").write_bytes(log_key.to_pem())
    vkey = NoteSigner(ORIGIN, log_key).vkey
    audit_tls = issue_leaf(hub.certs["gateway"].ca.parent, "audit-service")
    audit_env = {
        "EVHUB_KAFKA_BOOTSTRAP": hub.stack.bootstrap, "EVHUB_AUDIT_PORT": str(audit_port),
        "EVHUB_AUDIT_DATA_DIR": str(tmp_path / "audit"), "EVHUB_AUDIT_SIGNING_KEY": str(tmp_path / "log.key"),
        "EVHUB_AUDIT_ORIGIN": ORIGIN, "EVHUB_AUDIT_TOPIC": hub.settings.audit_topic,
        "EVHUB_AUDIT_DEAD_LETTER_TOPIC": hub.settings.deadletter_topic, "EVHUB_AUDIT_TLS_CERT": str(audit_tls.cert),
        "EVHUB_AUDIT_TLS_KEY": str(audit_tls.key), "EVHUB_AUDIT_TLS_CA": str(audit_tls.ca), "PYTHONPATH": str(ROOT),
    }  # fmt: skip
    ctx = client_context(hub.certs[OFFICES["DE"]])
    logs, out = tmp_path / "logs", tmp_path / "office-DE"
    anchor = tmp_path / "anchor.pub.pem"
    async with (
        running_service("services.gateway", env=_env(hub, tmp_path, gateway_port), health_url=f"{gateway_url}/healthz",
                        ssl_context=ctx, log_file=logs / "gateway.log"),
        running_service("services.audit", env=audit_env, health_url=f"{audit_url}/healthz", ssl_context=ctx,
                        log_file=logs / "audit.log"),
    ):  # fmt: skip
        argv = _subscribe_argv(hub, gateway_url, "DE", out, anchor, "--once", "--log-key", vkey, "--audit", audit_url)
        summary: dict[str, Any] = {}
        async with asyncio.timeout(120):  # runs again (resumed) until a checkpoint covers every receipt
            while not summary or summary["proofs"]["awaiting"]:
                run = await _subscribe(argv)
                assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
                summary = json.loads(run.stdout)
        receipts = _receipts(out)
        assert (summary["total"]["events"], summary["total"]["withheld"]) == (3, 1), summary["total"]
        assert len(receipts) >= 5  # three releases, one refusal, three downloads
        assert summary["proofs"] == {"kept": len(receipts), "awaiting": 0}
        assert {p.name.removesuffix(".tlog-proof") for p in (out / "proofs").iterdir()} == receipts
        for receipt in sorted(receipts)[:2]:
            check = await _subscribe([sys.executable, "-m", "services.cli", "audit", "verify-proof",
                                      str(out / "proofs" / f"{receipt}.tlog-proof"), "--log-key", vkey,
                                      "--receipt", receipt, "--json"])  # fmt: skip
            assert check.returncode == 0, check.stderr
            assert json.loads(check.stdout)["office"] == OFFICES["DE"]

        other = NoteSigner(ORIGIN, SigningKey.generate()).vkey  # the same name, another key
        wary = tmp_path / "office-DE-wary"
        run = await _subscribe(_subscribe_argv(hub, gateway_url, "DE", wary, anchor, "--once", "--log-key", other,
                                               "--audit", audit_url))  # fmt: skip
        assert run.returncode == 3, run.stdout[-2000:] + run.stderr[-2000:]
        assert not (wary / "proofs").exists() or not list((wary / "proofs").iterdir())
