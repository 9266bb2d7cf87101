"""1,000 idle SSE subscribers on a real gateway process: its memory stays bounded and other offices are still served.

Bounded in time (every wait has a deadline); on 2 shared cores opening 1,000 mutual-TLS connections takes seconds.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from services.cli.supervise import running_service
from services.shared.local_kafka import free_port
from services.shared.tls import client_context
from tests.gateway.conftest import Hub
from tests.gateway.test_process import _env

pytestmark = pytest.mark.kafka
SUBSCRIBERS = 1000
#: Measured: ~85 KiB of gateway memory per idle mutual-TLS SSE subscriber (309 KiB before the TLS read buffer was
#: cut from asyncio's 256 KiB default, see services/gateway/__main__.py); 160 KiB allows for allocator noise while
#: still failing if a subscriber held a 256 KiB buffer or any records of its own.
MAX_BYTES_PER_SUBSCRIBER = 160 * 1024


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


async def test_a_thousand_idle_subscribers_keep_memory_bounded_and_others_served(hub: Hub, tmp_path: Path) -> None:
    await hub.stop()
    await hub.publish("ITEM-0", countries=("DE", "FR"))
    port = free_port()
    url = f"https://127.0.0.1:{port}"
    env = _env(hub, tmp_path, port)
    de = client_context(hub.certs["DE-GBA-WCU"])
    async with running_service("services.gateway", env=env, health_url=f"{url}/healthz", ssl_context=de,
                               log_file=tmp_path / "gateway.log") as pid:  # fmt: skip
        connector = aiohttp.TCPConnector(ssl=de, limit=0)
        async with aiohttp.ClientSession(connector=connector) as session, asyncio.timeout(240):
            async with session.get(f"{url}/v1/feeds/{hub.codes['DE']}", params={"wait": "5"}) as r:
                cursor = (await r.json())["cursor"]  # the end of the DE feed: subscribers from here are idle
            baseline = _rss(pid)
            headers = {"Accept": "text/event-stream", "Last-Event-ID": cursor}
            responses: list[aiohttp.ClientResponse] = []
            started = time.monotonic()
            for batch in range(SUBSCRIBERS // 50):
                opened = await asyncio.gather(*(session.get(f"{url}/v1/feeds/{hub.codes['DE']}", headers=headers)
                                                for _ in range(50)))  # fmt: skip
                responses += opened
                assert all(r.status == 200 for r in opened), batch
            opening_s = time.monotonic() - started
            grown = _rss(pid) - baseline

            # another office, meanwhile: a new item reaches FR's long poll and its own stream
            fr = client_context(hub.certs["FR-PNAT"])
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=fr)) as other:
                async with other.get(f"{url}/v1/feeds/{hub.codes['FR']}", params={"wait": "5"}) as r:
                    fr_cursor = (await r.json())["cursor"]
                await hub.publish("ITEM-1", countries=("FR",))
                asked = time.monotonic()
                async with other.get(f"{url}/v1/feeds/{hub.codes['FR']}",
                                     params={"cursor": fr_cursor, "wait": "30"}) as r:  # fmt: skip
                    page = await r.json()
                served_s = time.monotonic() - asked
            assert [e["event"]["item_id"] for e in page["events"]] == ["ITEM-1"]
            still_open = sum(1 for r in responses if not r.closed and r.connection is not None)
            for r in responses:
                r.close()
    print(f"\n{SUBSCRIBERS} idle SSE subscribers: opened in {opening_s:.1f}s, gateway RSS +{grown / 2**20:.1f} MiB "
          f"({grown // SUBSCRIBERS // 1024} KiB each) over {baseline / 2**20:.0f} MiB; another office served in "
          f"{served_s:.2f}s; {still_open} still open")  # fmt: skip
    assert still_open == SUBSCRIBERS
    assert grown < SUBSCRIBERS * MAX_BYTES_PER_SUBSCRIBER
    assert served_s < 30
