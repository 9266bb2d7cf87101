"""``python -m services.gateway`` as a real process: killed mid-feed and restarted, an office resumes with no gap
and no duplicate; every item reached it only after its audit entry was on the broker."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.cli.supervise import running_service
from services.shared.kafka import TopicSpec, ensure_topics, evidence_topic, read_to_end
from services.shared.local_kafka import free_port
from services.shared.tls import client_context
from tests.gateway.conftest import Hub, audit_log, gateway_env
from tests.publishing_stack import delete_topic

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]


def _env(hub: Hub, tmp_path: Path, port: int) -> dict[str, str]:
    return gateway_env(hub, tmp_path, port, content_dir=hub.settings.content_dir, EVHUB_GATEWAY_TAIL_RECORDS="16")


async def _page(session: aiohttp.ClientSession, url: str, cursor: str | None) -> tuple[dict[str, Any], float]:
    params = {"max": "7", "wait": "1"} | ({"cursor": cursor} if cursor else {})
    async with session.get(url, params=params) as response:
        received_ms = time.time() * 1000  # the headers are in: nothing of the body was read before this
        assert response.status == 200, await response.text()
        return await response.json(), received_ms


async def test_an_office_resumes_after_the_gateway_is_killed_with_no_gap_and_no_duplicate(
    hub: Hub, tmp_path: Path
) -> None:
    await hub.stop()  # this test runs the gateway as its own process, on the same state and topics
    # the audit topic stamps each record with the broker's clock when it is appended (LogAppendTime)
    await delete_topic(hub.stack.bootstrap, hub.settings.audit_topic)
    await ensure_topics(hub.stack.bootstrap, [TopicSpec(hub.settings.audit_topic, 1,
                                                        {"message.timestamp.type": "LogAppendTime"})])  # fmt: skip
    for i in range(24):
        await hub.publish(f"ITEM-{i:02d}", countries=("DE",), classification="SECRET" if i % 5 else "PUBLIC",
                          sharing={"allowed_jurisdictions": [hub.codes["FR"]] if i % 7 == 0 else [],
                                   "purposes": []})  # fmt: skip
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    ctx = client_context(hub.certs["DE-GBA-WCU"])
    feed = f"{url}/v1/feeds/{hub.codes['DE']}"
    events: list[dict[str, Any]] = []
    received: dict[str, float] = {}
    cursor = None
    logs = tmp_path / "logs"

    async def follow(session: aiohttp.ClientSession, pages: int | None) -> None:
        nonlocal cursor
        n = 0
        deadline = time.monotonic() + 120
        while pages is None or n < pages:
            assert time.monotonic() < deadline, f"the feed did not reach every record: {len(events)} events"
            body, at = await _page(session, feed, cursor)
            for event in body["events"]:
                received[event["receipt"]] = at
            events.extend(body["events"])
            cursor = body["cursor"]
            n += 1
            if pages is None and body["caught_up"] and len(events) >= 30:
                return

    env = _env(hub, tmp_path, port)
    async with running_service("services.gateway", env=env, health_url=f"{url}/healthz", ssl_context=ctx,
                               log_file=logs / "first.log") as pid:  # fmt: skip
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session:
            await follow(session, 2)
        os.kill(pid, signal.SIGKILL)  # no clean shutdown: whatever was in flight is lost
    for i in range(24, 30):  # published while the gateway is down
        await hub.publish(f"ITEM-{i:02d}", countries=("DE",))
    async with (
        running_service("services.gateway", env=env, health_url=f"{url}/healthz", ssl_context=ctx,
                        log_file=logs / "second.log"),
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as session,
    ):  # fmt: skip
        await follow(session, None)

    log = await audit_log(hub)
    seen = [(log[e["receipt"]].entry["item"]["partition"], log[e["receipt"]].entry["item"]["offset"]) for e in events]
    topic = [(r.partition, r.offset) for r in await read_to_end(hub.stack.bootstrap, evidence_topic(hub.codes["DE"]))]
    assert sorted(seen) == sorted(topic)  # every record exactly once: no gap, no duplicate
    assert len(topic) == 30
    assert {e["type"] for e in events} == {"event", "withheld"}
    for event in events:  # the write-ahead order, observed from outside: broker append time ≤ first byte received
        audited = log[event["receipt"]]
        assert (audited.offset, audited.index) == (event["audit"]["offset"], event["audit"]["index"])
        assert audited.timestamp_ms <= received[event["receipt"]]


@pytest.mark.parametrize(
    ("env", "message"),
    [({}, "TLS is required"), ({"EVHUB_GATEWAY_TAIL_RECORDS": "x"}, "tail_records"),
     ({"EVHUB_GATEWAY_TLS_CERT": "a", "EVHUB_GATEWAY_TLS_KEY": "b", "EVHUB_GATEWAY_TLS_CA": "c"}, "trust anchor")],
    ids=["no-tls", "malformed-setting", "no-trust-anchor"],
)  # fmt: skip
def test_a_misconfigured_gateway_exits_with_one_clear_line(tmp_path: Path, env: dict[str, str], message: str) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "EVHUB_KAFKA_BOOTSTRAP": "127.0.0.1:9", **env}
    run = subprocess.run([sys.executable, "-m", "services.gateway"], capture_output=True, text=True, cwd=tmp_path,
                         env=env, check=False, timeout=60)  # fmt: skip
    assert run.returncode == 5
    assert message in run.stderr
    assert "Traceback" not in run.stderr
