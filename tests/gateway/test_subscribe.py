"""`evhub subscribe` against a real gateway (real broker, real mutual TLS 1.3, the publisher's real events and files):
what an office keeps, that it resumes without gaps or duplicates (a `kill -9` mid-download included), and that a
gateway that lies is refused loudly."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import signal
import sqlite3
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from services.cli.subscribe_cmd import Options, subscribe
from services.publisher.core import parse_metadata
from services.publisher.pipeline import ContentInfo
from services.shared.envelope import with_disclosures
from services.shared.kafka import evidence_topic
from services.shared.media import sniff
from services.shared.registry import issue
from services.shared.tls import client_context, server_context
from tests.gateway.conftest import CASE, OFFICES, CountingStore, Hub, audit_log
from tests.publisher.samples import metadata, png

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]


def _options(hub: Hub, country: str, out: Path, **overrides: Any) -> Options:
    office = OFFICES[country]
    base = {"jurisdiction": hub.codes[country], "out": out, "gateway": hub.url,
            "tls": client_context(hub.certs[office]), "office": office, "anchors": [hub.stack.anchor.public],
            "purpose": "prosecution", "once": True, "give_up_after_s": 30.0}  # fmt: skip
    return Options(**{**base, **overrides})


def _db(out: Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(f"file:{out / 'state.sqlite3'}?mode=ro", uri=True) as db:
        return db.execute(sql).fetchall()


async def test_an_office_keeps_exactly_what_it_may_see_verified_with_every_receipt_in_the_audit_log(
    hub: Hub, tmp_path: Path
) -> None:
    await hub.publish("ITEM-RESTRICTED", classification="RESTRICTED", seed=11)
    await hub.publish("ITEM-CONFIDENTIAL", classification="CONFIDENTIAL", seed=12)
    out = tmp_path / "se"
    result = await subscribe(_options(hub, "SE", out))

    assert result.exit_code == 0, result.summary
    run = result.summary["this_run"]
    assert (run["events"], run["withheld"], run["failures"], run["redelivered"]) == (1, 1, 0, 0)
    assert run["disclosed"] == {"LOCATION_EXACT": 1}
    assert run["withheld_fields"] == {"WITNESS_IDENTIFYING": 1}
    assert result.summary["caught_up"] is True
    version = out / "items" / "ITEM-RESTRICTED" / "v1"
    assert sorted(p.name for p in version.iterdir()) == ["content", "disclosures.json", "envelope.avro", "event.json"]
    assert hashlib.sha256((version / "content" / "ITEM-RESTRICTED.png").read_bytes()).digest() == hashlib.sha256(
        png(seed=11)).digest()  # fmt: skip
    disclosed = json.loads((version / "disclosures.json").read_text())
    assert [d["field"] for d in disclosed["received"]] == ["location.exact"]
    assert disclosed["withheld_labels"] == ["WITNESS_IDENTIFYING"]
    assert not (out / "items" / "ITEM-CONFIDENTIAL").exists()  # withheld: nothing of it, only its receipt

    log = await audit_log(hub)
    receipts = _db(out, "SELECT receipt, kind, audit_off, audit_index, received_at FROM receipts")
    assert sorted(k for _, k, *_ in receipts) == ["download", "event", "withheld"]
    for receipt, kind, offset, index, received_at in receipts:
        audited = log[receipt]
        assert (audited.offset, audited.index) == (offset, index)
        assert audited.entry["office"] == "SE-IPC"
        assert audited.entry["action"] == ("ReadContent" if kind == "download" else "ReadItem")
        assert audited.timestamp_ms <= datetime.fromisoformat(received_at).timestamp() * 1000 + 1

    again = await subscribe(_options(hub, "SE", out))  # resumes at its cursor: nothing new, nothing twice
    assert (again.summary["this_run"]["events"], again.summary["this_run"]["withheld"]) == (0, 0)
    await hub.publish("ITEM-NEXT", classification="RESTRICTED", seed=13)
    third = await subscribe(_options(hub, "SE", out))
    assert third.summary["this_run"]["events"] == 1
    assert third.summary["total"]["events"] == 2
    assert len(_db(out, "SELECT * FROM items")) == 2


async def test_following_with_sse_stops_cleanly_and_the_next_run_continues_where_it_stopped(
    hub: Hub, tmp_path: Path
) -> None:
    for i in range(3):
        await hub.publish(f"ITEM-{i}", countries=("DE",), seed=20 + i)
    out = tmp_path / "de"
    follower = asyncio.create_task(subscribe(_options(hub, "DE", out, once=False, transport="sse")))
    async with asyncio.timeout(60):
        while not (out / "state.sqlite3").exists() or len(_db(out, "SELECT * FROM items")) < 3:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    await hub.publish("ITEM-3", countries=("DE",), seed=23)
    async with asyncio.timeout(60):
        while len(_db(out, "SELECT * FROM items")) < 4:  # noqa: ASYNC110 - the follower commits as it goes
            await asyncio.sleep(0.1)
    assert not follower.done()  # its SIGTERM handler is installed (else the signal would stop pytest)
    os.kill(os.getpid(), signal.SIGTERM)  # what a service manager sends: the follower stops after committing
    result = await asyncio.wait_for(follower, 30)
    assert result.exit_code == 0
    assert result.summary["this_run"]["events"] == 4
    rerun = await subscribe(_options(hub, "DE", out))
    assert rerun.summary["this_run"]["events"] == 0
    assert rerun.summary["total"]["events"] == 4


class GatedStore(CountingStore):
    """The real content store, whose reads pause after the first megabyte until the test opens the gate."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = asyncio.Event()
        self.offsets: list[int] = []

    async def read(self, sha256: str, *, offset: int = 0) -> AsyncIterator[bytes]:
        self.offsets.append(offset)
        sent = 0
        async for chunk in super().read(sha256, offset=offset):
            for i in range(0, len(chunk), 256 * 1024):
                if sent >= 1 << 20:
                    await self.gate.wait()
                yield chunk[i : i + 256 * 1024]
                sent += min(256 * 1024, len(chunk) - i)


def _cli(hub: Hub, country: str, out: Path, anchor: Path, *extra: str) -> list[str]:
    files = hub.certs[OFFICES[country]]
    return [sys.executable, "-m", "services.cli", "subscribe", "--jurisdiction", hub.codes[country], "--out", str(out),
            "--gateway", hub.url, "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca),
            "--trust-anchor", str(anchor), "--purpose", "prosecution", *extra]  # fmt: skip


async def test_kill_9_mid_download_resumes_the_file_with_a_range_request_and_keeps_it_once(
    hub: Hub, tmp_path: Path
) -> None:
    gated = GatedStore(hub.content.path_of("0" * 64).parents[2])
    hub.content = gated
    await hub.stop()
    await hub.start()
    data = png(seed=5) + os.urandom(6 << 20)

    async def chunks() -> AsyncIterator[bytes]:
        yield data

    stored = await hub.stack.store.put(chunks(), max_size=64 << 20)
    content = ContentInfo(sha256=stored.sha256, size=stored.size, media_type=sniff(stored.head), file_name="big.png")
    meta = metadata("ITEM-BIG", [hub.codes["DE"]], case_ids=[CASE],
                    sharing={"allowed_jurisdictions": [], "purposes": []})  # fmt: skip
    assert (await hub.stack.publisher.publish(parse_metadata(meta), content)).complete
    anchor = tmp_path / "anchor.pub.pem"
    anchor.write_bytes(hub.stack.anchor.public.to_pem())
    out = tmp_path / "de"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    part = out / "items" / "ITEM-BIG" / "v1" / "content" / ".big.png.part"
    log_file = tmp_path / "first-run.log"
    with log_file.open("wb") as output:
        proc = subprocess.Popen(_cli(hub, "DE", out, anchor, "--once"), env=env, stdout=output,  # noqa: ASYNC220
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        async with asyncio.timeout(60):
            while not part.exists() or part.stat().st_size < (1 << 20):
                assert proc.poll() is None, log_file.read_text()
                await asyncio.sleep(0.05)
    finally:
        proc.kill()  # kill -9 mid-download
        await asyncio.to_thread(proc.wait)
    gated.gate.set()
    assert not (out / "items" / "ITEM-BIG" / "v1" / "content" / "big.png").exists()

    run = await asyncio.to_thread(subprocess.run, [*_cli(hub, "DE", out, anchor, "--once", "--json")], env=env,
                                  capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["total"]["events"] == 1
    assert summary["total"]["content_bytes"] == len(data)
    kept = (out / "items" / "ITEM-BIG" / "v1" / "content" / "big.png").read_bytes()
    assert hashlib.sha256(kept).hexdigest() == stored.sha256
    assert not part.exists()
    assert gated.offsets[0] == 0
    assert gated.offsets[-1] >= 1 << 20  # the second run asked only for the rest (Range)
    assert len(_db(out, "SELECT * FROM items")) == 1
    log = await audit_log(hub)
    ranges = [e.entry["item"]["content_range"] for e in log.values() if e.entry["action"] == "ReadContent"]
    assert any(r and not r.startswith("bytes 0-") for r in ranges), ranges  # the resumed download, audited


class LyingGateway:
    """A gateway in front of the real one that tampers with what it forwards (real mutual TLS, the hub's CA)."""

    def __init__(self, hub: Hub, tamper: str) -> None:
        self.hub, self.tamper = hub, tamper
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def keys(self, request: web.Request) -> web.Response:
        record = issue(self.hub.stack.codec, self.hub.stack.anchor, public_key=self.hub.stack.signer.public,
                       organisation="Syrian documentation group",
                       not_before=datetime.now(UTC) - timedelta(days=1))  # fmt: skip
        return web.json_response({"records": [base64.b64encode(record).decode()]})

    async def feed(self, request: web.Request) -> web.Response:
        status, body = await self.hub.page("DE", cursor=request.query.get("cursor"))
        for event in body.get("events", []):
            if event["type"] != "event":
                continue
            envelope = base64.b64decode(event["envelope"])
            if self.tamper == "title":
                event["event"]["title"] = "nothing happened here"
            elif self.tamper == "disclosure":
                codec = self.hub.stack.codec
                raw = codec.decode(envelope, expect="signed_envelope")
                raw["disclosures"] = [d[:-2] + ("AA" if d[-2:] != "AA" else "BB") for d in raw["disclosures"]]
                event["envelope"] = base64.b64encode(codec.encode("signed_envelope", raw)).decode()
            elif self.tamper == "payload":
                flipped = bytearray(envelope)
                flipped[len(flipped) // 3] ^= 0x20
                event["envelope"] = base64.b64encode(bytes(flipped)).decode()
            elif self.tamper == "stripped":  # not tampering: withholding a disclosure never breaks the signature
                event["envelope"] = base64.b64encode(with_disclosures(self.hub.stack.codec, envelope, [])).decode()
        return web.json_response(body, status=status)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/v1/keys", self.keys)
        app.router.add_get("/v1/feeds/{jurisdiction}", self.feed)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        ctx = server_context(self.hub.certs["gateway"], minimum_version=ssl.TLSVersion.TLSv1_3)
        await web.TCPSite(self.runner, "127.0.0.1", 0, ssl_context=ctx).start()
        self.url = f"https://127.0.0.1:{self.runner.addresses[0][1]}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


@pytest.mark.parametrize("tamper", ["title", "disclosure", "payload"])
async def test_a_gateway_that_tampers_is_refused_loudly_with_exit_3(hub: Hub, tmp_path: Path, tamper: str) -> None:
    await hub.publish("ITEM-0", countries=("DE",), classification="RESTRICTED", seed=30)
    lying = LyingGateway(hub, tamper)
    await lying.start()
    try:
        anchor = tmp_path / "anchor.pub.pem"
        anchor.write_bytes(hub.stack.anchor.public.to_pem())
        out = tmp_path / "de"
        argv = [*_cli(hub, "DE", out, anchor, "--once", "--json")]
        argv[argv.index("--gateway") + 1] = lying.url
        run = await asyncio.to_thread(subprocess.run, argv, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                      capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    finally:
        await lying.stop()
    assert run.returncode == 3, run.stdout + run.stderr  # "untrusted data" (services/cli/main.py)
    assert "REFUSED" in run.stderr
    summary = json.loads(run.stdout)
    assert summary["verified"] is False
    assert summary["this_run"]["failures"] == 1
    assert summary["this_run"]["events"] == 0
    assert not (out / "items").exists()  # nothing of it is kept as evidence
    [rejected] = list((out / "rejected").iterdir())
    kept = json.loads(rejected.read_text())
    assert kept["event"]["topic"] == evidence_topic(hub.codes["DE"])  # what the gateway sent, for the record


async def test_a_gateway_withholding_disclosures_is_not_tampering(hub: Hub, tmp_path: Path) -> None:
    await hub.publish("ITEM-0", countries=("DE",), classification="RESTRICTED", seed=31)
    lying = LyingGateway(hub, "stripped")
    await lying.start()
    try:
        result = await subscribe(_options(hub, "DE", tmp_path / "de", gateway=lying.url))
    finally:
        await lying.stop()
    assert result.exit_code == 0
    assert result.summary["this_run"]["events"] == 1
    assert result.summary["this_run"]["withheld_fields"] == {"LOCATION_EXACT": 1, "WITNESS_IDENTIFYING": 1}
