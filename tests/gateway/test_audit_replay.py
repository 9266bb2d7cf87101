"""End to end: the gateway's real audit records (offices reading their feeds over mTLS) integrated by the real audit
service, then replayed by ``evhub audit replay`` as a real process — every decision reproduced — and an office
proving one of its receipts with ``evhub audit prove`` and checking it offline with ``evhub audit verify-proof``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from aiohttp import web

from services.audit.note import NoteSigner
from services.audit.service import create_app as audit_app
from services.audit.settings import AuditSettings
from services.shared.audit_records import decode_batch
from services.shared.kafka import read_to_end
from services.shared.keys import SigningKey
from services.shared.tls import client_context, issue_leaf, server_context
from tests.audit import cli_support, support
from tests.gateway.conftest import Hub

pytestmark = pytest.mark.kafka
ORIGIN = "audit.evidence-hub.test/gateway"


async def test_the_gateways_audit_records_replay_with_every_decision_reproduced(hub: Hub, tmp_path: Path) -> None:
    await hub.publish("ITEM-RESTRICTED", classification="RESTRICTED")
    await hub.publish("ITEM-CONFIDENTIAL", classification="CONFIDENTIAL")
    await hub.publish("ITEM-SECRET", classification="SECRET")
    feeds = {country: (await hub.drain(country, until=lambda e: len(e) >= 3))[0] for country in ("DE", "FR", "SE")}
    assert {e["type"] for e in feeds["SE"]} == {"event", "withheld"}  # both releases and refusals were recorded
    records = await read_to_end(hub.stack.bootstrap, hub.settings.audit_topic)
    size = sum(len(decode_batch(hub.stack.codec, r.value)[2]) for r in records)

    server = issue_leaf(hub.pki, "audit")
    signer = NoteSigner(ORIGIN, SigningKey.generate())
    settings = AuditSettings(topic=hub.settings.audit_topic, dead_letter_topic=hub.settings.deadletter_topic,
                             data_dir=tmp_path / "audit", origin=ORIGIN, tls_cert=server.cert, tls_key=server.key,
                             tls_ca=server.ca)  # fmt: skip
    runner = web.AppRunner(audit_app(settings, bootstrap=hub.stack.bootstrap, signer=signer))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(server)).start()
        base = f"https://127.0.0.1:{runner.addresses[0][1]}"
        auditor = hub.certs["auditor"]
        running = support.Running(runner.app, base, support.Pki(server, {"auditor": client_context(auditor)},
                                                                {"auditor": auditor}))  # fmt: skip

        async def integrated() -> bool:
            async with running.client("auditor") as http, http.get("/healthz") as r:
                return bool((await r.json())["size"] == size)

        await support.wait_for(integrated, what=f"the audit log to hold the gateway's {size} entries")
        admin = tmp_path / "admin.pub.pem"
        admin.write_bytes(hub.admin.public.to_pem())
        replay = await cli_support.evhub(
            "audit", "replay", "--json", "--log-key", signer.vkey, "--trust", str(admin), "--policy-topic",
            hub.settings.policy_topic, "--state-dir", str(tmp_path / "state"),
            *cli_support.tls_args(base, hub.certs["auditor"]), env={"EVHUB_KAFKA_BOOTSTRAP": hub.stack.bootstrap},
        )  # fmt: skip
        assert replay.code == 0, replay.stderr + replay.stdout
        report = json.loads(replay.stdout)
        assert (report["replayed"], report["discrepancies"]) == (size, 0)
        assert {"DE-GBA-WCU", "FR-PNAT", "SE-IPC"} <= set(report["offices"])
        assert report["offices"]["SE-IPC"].get("REFUSED", 0) >= 1

        receipt = next(e["receipt"] for e in feeds["FR"] if e["type"] == "event")
        out = tmp_path / "receipt.tlog-proof"
        proved = await cli_support.evhub("audit", "prove", "--receipt", receipt, "--log-key", signer.vkey, "--out",
                                         str(out), *cli_support.tls_args(base, hub.certs["FR-PNAT"]))  # fmt: skip
        assert proved.code == 0, proved.stderr
        checked = await cli_support.evhub("audit", "verify-proof", str(out), "--log-key", signer.vkey, "--receipt",
                                          receipt, "--json")  # fmt: skip
        assert checked.code == 0, checked.stderr
        assert json.loads(checked.stdout)["office"] == "FR-PNAT"
    finally:
        await runner.cleanup()
