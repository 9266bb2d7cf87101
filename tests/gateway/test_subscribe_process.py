"""End to end through real sockets and real processes: the gateway (`python -m services.gateway`) and three offices
running `evhub subscribe` against the sample policy pack.

- Each office (DE, FR, SE) holds exactly what the sample policy allows it — the expectation is written out by hand
  below from policies/evidence.cedar and policies/offices.json, not computed by the policy engine — with exactly the
  protected values its clearances allow, every signature verified by the office itself.
- Records injected straight into the DE topic (a bad signature, a replayed sequence number, a copy of an FR record)
  are never delivered, and no office's report shows a failure: the gateway never released them.
- A DE office following with SSE resumes after the gateway is SIGKILLed and restarted: no gap, no duplicate.
- Every receipt an office holds is an entry of hub.audit at the offset it was given, appended (broker time,
  LogAppendTime) no later than the moment the office received the event.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.cli.supervise import running_service
from services.shared.envelope import open_envelope, seal
from services.shared.kafka import TopicSpec, ensure_topics, evidence_topic, read_to_end
from services.shared.local_kafka import free_port
from services.shared.tls import client_context
from tests.gateway.conftest import CASE, OFFICES, Hub, audit_log, gateway_env
from tests.publishing_stack import delete_topic

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]
BOTH = ["LOCATION_EXACT", "WITNESS_IDENTIFYING"]

# item → (classification, case, consent jurisdictions, what DE, FR and SE each get: None = withheld, else the
# protected labels disclosed). DE-GBA-WCU: SECRET+PROTECTION, cases 001 and 002. FR-PNAT: CONFIDENTIAL+PROTECTION,
# cases 001 and 003. SE-IPC: RESTRICTED, case 001, no PROTECTION (so never the witness's identity).
POLICY: dict[str, tuple[str, str, tuple[str, ...], dict[str, list[str] | None]]] = {
    "E2E-RESTRICTED": ("RESTRICTED", "CASE-SY-001", (), {"DE": BOTH, "FR": BOTH, "SE": ["LOCATION_EXACT"]}),
    "E2E-CONFIDENTIAL": ("CONFIDENTIAL", "CASE-SY-001", (), {"DE": BOTH, "FR": BOTH, "SE": None}),
    "E2E-SECRET": ("SECRET", "CASE-SY-001", (), {"DE": BOTH, "FR": None, "SE": None}),
    "E2E-CASE-002": ("RESTRICTED", "CASE-SY-002", (), {"DE": BOTH, "FR": None, "SE": None}),
    "E2E-CASE-003": ("RESTRICTED", "CASE-SY-003", (), {"DE": None, "FR": BOTH, "SE": None}),
    "E2E-CONSENT-FR": ("RESTRICTED", "CASE-SY-001", ("FR",), {"DE": None, "FR": BOTH, "SE": None}),
    "E2E-PUBLIC": ("PUBLIC", "CASE-SY-001", (), {"DE": BOTH, "FR": BOTH, "SE": ["LOCATION_EXACT"]}),
}


def _env(hub: Hub, tmp_path: Path, port: int) -> dict[str, str]:
    return gateway_env(hub, tmp_path, port, content_dir=hub.content.path_of("0" * 64).parents[2])


def _subscribe_argv(hub: Hub, url: str, country: str, out: Path, anchor: Path, *extra: str) -> list[str]:
    files = hub.certs[OFFICES[country]]
    return [sys.executable, "-m", "services.cli", "subscribe", "--jurisdiction", hub.codes[country], "--out", str(out),
            "--gateway", url, "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca),
            "--trust-anchor", str(anchor), "--purpose", "prosecution", "--json", *extra]  # fmt: skip


async def _once(hub: Hub, url: str, country: str, out: Path, anchor: Path) -> dict[str, Any]:
    run = await asyncio.to_thread(subprocess.run, _subscribe_argv(hub, url, country, out, anchor, "--once"),
                                  env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                                  timeout=180, check=False)  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "REFUSED" not in run.stderr
    summary: dict[str, Any] = json.loads(run.stdout)
    return summary


def _rows(out: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{out / 'state.sqlite3'}?mode=ro", uri=True) as db:
        return db.execute(sql).fetchall()


def _held(out: Path) -> dict[str, list[str]]:
    """item → protected labels disclosed, read back from the files an office keeps (not from its summary)."""
    held = {}
    for item, kind, path in _rows(out, "SELECT item_id, kind, path FROM items"):
        if kind == "event":
            disclosed = json.loads((out / path / "disclosures.json").read_text())["received"]
            held[item] = sorted(d["label"] for d in disclosed)
    return held


async def _inject(hub: Hub) -> None:
    """Three records written straight into the DE topic, after the genuine ones of their partition, as a
    broker-level attacker (or a publisher that signs a sequence number twice) could."""
    codec, de = hub.stack.codec, evidence_topic(hub.codes["DE"])
    genuine = (await read_to_end(hub.stack.bootstrap, de))[0].value or b""
    raw = codec.decode(genuine, expect="signed_envelope")
    raw["signatures"] = [{**raw["signatures"][0], "sig": bytes(64)}]
    verified = open_envelope(codec, genuine, topic=de, keys=hub.stack.registry)
    replayed = seal(codec, schema="evidence_event", topic=de, signer=hub.stack.signer, sequence=verified.sequence,
                    record={**verified.record, "event_id": "forged-event", "title": "a different event"})  # fmt: skip
    foreign = (await read_to_end(hub.stack.bootstrap, evidence_topic(hub.codes["FR"])))[0].value or b""
    for value in (codec.encode("signed_envelope", raw), replayed, foreign):
        await hub.produce(de, value, key=CASE.encode())  # the partition of the genuine records of this case


async def _wait_for_items(out: Path, n: int, proc: subprocess.Popen[bytes], within: float = 120) -> None:
    async with asyncio.timeout(within):
        while not (out / "state.sqlite3").exists() or len(_rows(out, "SELECT 1 FROM items")) < n:
            assert proc.poll() is None, "the follower stopped"
            await asyncio.sleep(0.2)


async def test_three_offices_hold_what_the_policy_allows_and_resume_across_a_gateway_kill(
    hub: Hub, tmp_path: Path
) -> None:
    await hub.stop()  # the gateway runs as its own process on the same state and topics
    # the audit topic stamps each record with the broker's clock when it is appended (LogAppendTime)
    await delete_topic(hub.stack.bootstrap, hub.settings.audit_topic)
    await ensure_topics(hub.stack.bootstrap, [TopicSpec(hub.settings.audit_topic, 1,
                                                        {"message.timestamp.type": "LogAppendTime"})])  # fmt: skip
    for n, (item, (classification, case, consent, _)) in enumerate(POLICY.items()):
        sharing = {"allowed_jurisdictions": [hub.codes[c] for c in consent], "purposes": []}
        await hub.publish(item, classification=classification, case_ids=[case], seed=100 + n, sharing=sharing)
    await hub.publish("E2E-WITHDRAWN", classification="RESTRICTED", seed=99)
    await hub.stack.publisher.withdraw("E2E-WITHDRAWN", "consent withdrawn")
    await _inject(hub)

    port = free_port()
    url = f"https://127.0.0.1:{port}"
    env = _env(hub, tmp_path, port)
    anchor = tmp_path / "anchor.pub.pem"
    logs = tmp_path / "logs"
    ctx = client_context(hub.certs["DE-GBA-WCU"])
    dirs = {c: tmp_path / f"office-{c}" for c in OFFICES}
    follower: subprocess.Popen[bytes] | None = None
    follower_log = logs / "follower.log"
    try:
        async with running_service("services.gateway", env=env, health_url=f"{url}/healthz", ssl_context=ctx,
                                   log_file=logs / "gateway-1.log") as pid:  # fmt: skip
            for country, out in dirs.items():
                summary = await _once(hub, url, country, out, anchor)
                expected = {item: sorted(labels) for item, (*_, who) in POLICY.items()
                            if (labels := who[country]) is not None}  # fmt: skip
                assert _held(out) == expected, country
                # the withdrawn item: read after its withdrawal, its event is refused (rule "withdrawn"); the
                # withdrawal itself reaches every office that could read the item
                withheld = sum(1 for *_, who in POLICY.values() if who[country] is None) + 1
                total = summary["total"]
                assert (total["withheld"], total["withdrawals"]) == (withheld, 1), country
                assert (total["failures"], total["redelivered"]) == (0, 0), country
                assert summary["verified"] is True
                assert summary["sequence"]["unexplained"] == 0, summary["sequence"]
                assert (total["content_files"], total["content_refused"]) == (len(expected), 0), country
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
                session.get(f"{url}/healthz") as r,
            ):
                dead = (await r.json())["dead_letters"]
            # the injected records, each for its own reason: dead-lettered, never released
            assert dead == {"InvalidSignature": 2, "ReplayDetected": 1}, dead

            held_before = len(_rows(dirs["DE"], "SELECT 1 FROM items"))
            argv = _subscribe_argv(hub, url, "DE", dirs["DE"], anchor)  # following with SSE, until SIGTERM
            with follower_log.open("wb") as output:
                follower = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT,  # noqa: ASYNC220
                                            env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
            for i in range(3):
                await hub.publish(f"E2E-LIVE-{i}", countries=("DE",), seed=200 + i)
            await _wait_for_items(dirs["DE"], held_before + 3, follower)
            os.kill(pid, signal.SIGKILL)  # no clean shutdown: whatever was in flight is lost
        for i in range(3, 6):  # published while the gateway is down
            await hub.publish(f"E2E-LIVE-{i}", countries=("DE",), seed=200 + i)
        async with running_service("services.gateway", env=env, health_url=f"{url}/healthz", ssl_context=ctx,
                                   log_file=logs / "gateway-2.log"):  # fmt: skip
            for i in range(6, 8):
                await hub.publish(f"E2E-LIVE-{i}", countries=("DE",), seed=200 + i)
            await _wait_for_items(dirs["DE"], held_before + 8, follower)
            follower.send_signal(signal.SIGTERM)  # a follower stops cleanly, its state committed
            assert await asyncio.to_thread(follower.wait, 60) == 0, follower_log.read_text()[-2000:]
            again = await _once(hub, url, "DE", dirs["DE"], anchor)
    finally:
        if follower is not None and follower.poll() is None:
            follower.kill()
            await asyncio.to_thread(follower.wait)
    assert again["this_run"]["events"] == 0  # nothing new, nothing twice
    assert again["total"]["redelivered"] == 0
    assert again["sequence"]["unexplained"] == 0

    de = dirs["DE"]
    items = _rows(de, "SELECT item_id, kind, version, topic, part, off FROM items")
    assert len({(i, k, v) for i, k, v, *_ in items}) == len(items)  # no duplicate
    positions = [(t, p, o) for *_, t, p, o in items]
    assert len(set(positions)) == len(positions)
    live = {i for i, *_ in items if i.startswith("E2E-LIVE-")}
    assert live == {f"E2E-LIVE-{i}" for i in range(8)}  # no gap
    withheld = _rows(de, "SELECT count(*) FROM receipts WHERE kind = 'withheld'")[0][0]
    valid = len(await read_to_end(hub.stack.bootstrap, evidence_topic(hub.codes["DE"]))) - 3  # minus the injected
    assert len(items) + withheld == valid  # every genuine record: held, or withheld with its receipt

    log = await audit_log(hub)
    receipts = _rows(de, "SELECT receipt, kind, audit_topic, audit_off, audit_index, received_at FROM receipts")
    assert Counter(k for _, k, *_ in receipts)["download"] == len(_held(de))
    for receipt, kind, topic, offset, index, received_at in receipts:
        audited = log[receipt]
        assert (topic, audited.offset, audited.index) == (hub.settings.audit_topic, offset, index)
        assert audited.entry["office"] == "DE-GBA-WCU"
        assert audited.entry["decision"] == ("REFUSED" if kind == "withheld" else "RELEASED")
        assert audited.timestamp_ms <= datetime.fromisoformat(received_at).timestamp() * 1000 + 1, kind
