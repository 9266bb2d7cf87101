"""Faults with the real broker: the service SIGKILLed mid-batch again and again, a full disk under the tiles, a
changed tile, and a rewritten history — nothing lost, nothing twice, no inconsistent checkpoint, each fault named."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.audit import merkle
from services.audit.checkpoint import Checkpoint, check_consistent, open_checkpoint
from services.audit.note import NoteSigner
from services.audit.tiles import Tile, TileNodeReader
from services.audit.verify import verify_entries
from services.shared.avro import AvroCodec
from services.shared.cluster import KafkaTarget
from services.shared.errors import DecodeError, InvalidProof, InvalidSignature, StoreUnavailable
from services.shared.keys import SigningKey
from tests.audit import golang, support
from tests.audit.support import ORIGIN, Pki

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]
KEY = SigningKey.generate()
SIGNER = NoteSigner(ORIGIN, KEY)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return support.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def topics(kafka: KafkaTarget, topic_name: str) -> tuple[str, str]:
    return await support.audit_topics(kafka.bootstrap, topic_name)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Process:
    """``python -m services.audit`` as a child process, configured through its environment only."""

    def __init__(self, env: dict[str, str], log: Path, port: int, pki: Pki) -> None:
        self.env, self.log, self.port, self.pki = env, log, port, pki
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "services.audit"], env=self.env, cwd=ROOT,
                                         stdout=out, stderr=out)  # fmt: skip

    def kill(self, sig: int = signal.SIGKILL) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, sig)
        self.proc.wait(timeout=60)

    async def get(self, path: str, who: str = "auditor") -> tuple[int, bytes]:
        connector = aiohttp.TCPConnector(ssl=self.pki.clients[who])
        async with (
            aiohttp.ClientSession(connector=connector) as http,
            http.get(f"https://127.0.0.1:{self.port}{path}") as r,
        ):
            return r.status, await r.read()

    async def size(self) -> int | None:
        try:
            status, body = await self.get("/v1/log/checkpoint")
        except aiohttp.ClientError:
            return None
        return open_checkpoint(body, log=SIGNER.verifier()).checkpoint.size if status == 200 else None


@pytest.fixture
async def process(kafka: KafkaTarget, topics: tuple[str, str], tmp_path: Path, pki: Pki) -> AsyncIterator[Process]:
    key = tmp_path / "log.key"
    key.write_bytes(KEY.to_pem())
    port = _free_port()
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT),
           "EVHUB_KAFKA_BOOTSTRAP": kafka.bootstrap, "EVHUB_AUDIT_TOPIC": topics[0],
           "EVHUB_AUDIT_DEAD_LETTER_TOPIC": topics[1], "EVHUB_AUDIT_DATA_DIR": str(tmp_path / "audit"),
           "EVHUB_AUDIT_SIGNING_KEY": str(key), "EVHUB_AUDIT_ORIGIN": ORIGIN, "EVHUB_AUDIT_PORT": str(port),
           "EVHUB_AUDIT_TLS_CERT": str(pki.server.cert), "EVHUB_AUDIT_TLS_KEY": str(pki.server.key),
           "EVHUB_AUDIT_TLS_CA": str(pki.server.ca), "EVHUB_AUDIT_MAX_RECORDS": "20"}  # fmt: skip
    process = Process(env, tmp_path / "audit.log", port, pki)
    try:
        yield process
    finally:
        if process.proc is not None and process.proc.poll() is None:
            process.kill()


async def _all_entries(process: Process, size: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < size:
        status, body = await process.get(f"/v1/log/entries?start={len(out)}&limit=1000")
        assert status == 200, body
        page = __import__("json").loads(body)["entries"]
        assert page, "the log ended early"
        out += page
    return out


async def test_sigkilled_mid_batch_many_times_loses_nothing_and_never_forks(
    kafka: KafkaTarget, codec: AvroCodec, topics: tuple[str, str], process: Process, tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:  # fmt: skip
    entries = [support.entry(n) for n in range(6000)]
    batches = [support.batch(codec, entries[i : i + 40]) for i in range(0, len(entries), 40)]
    batches += batches[::10]  # producer retries: whole batches again, later

    async def gateway() -> None:
        for i in range(0, len(batches), 5):
            await support.produce(kafka.bootstrap, topics[0], batches[i : i + 5])
            await asyncio.sleep(0.05)  # pacing, so the kills land while batches keep arriving

    producing = asyncio.create_task(gateway())
    observed: list[bytes] = []
    kills = 0
    try:
        for _ in range(12):
            process.start()
            await support.wait_for(lambda: _is_up(process), within=60, what="the audit service to start")
            first = await process.size()
            assert first is not None

            async def progressed(first: int = first) -> bool:
                size = await process.size()
                return size is not None and (size > first or producing.done())

            await support.wait_for(progressed, within=60, what="integration to progress")
            observed.append((await process.get("/v1/log/checkpoint"))[1])
            process.kill()
            kills += 1
        await producing
        process.start()
        await support.wait_for(lambda: _is_up(process), within=60, what="the audit service to start")

        async def caught_up() -> bool:
            return await process.size() == len(entries)

        await support.wait_for(caught_up, within=90, what=f"all {len(entries)} entries")
        logged = await _all_entries(process, len(entries))
        final = (await process.get("/v1/log/checkpoint"))[1]
    finally:
        producing.cancel()
        await asyncio.gather(producing, return_exceptions=True)
    assert kills == 12
    assert [e["entry_id"] for e in logged] == [e["entry_id"] for e in entries]  # none lost, none twice, in order
    latest = open_checkpoint(final, log=SIGNER.verifier()).checkpoint
    verify_entries([base64.b64decode(e["entry"]) for e in logged], latest)
    tiles = tmp_path / "audit" / "log"
    reader = TileNodeReader(latest.size, lambda t: (tiles / t.path).read_bytes())
    with sqlite3.connect(tmp_path / "audit" / "index.sqlite3") as db:
        signed = [bytes(r[0]) for r in db.execute("SELECT note FROM checkpoints ORDER BY size")]
    assert set(observed) <= set(signed)
    for note in signed:  # every checkpoint ever committed is a prefix of the final tree
        cp = open_checkpoint(note, log=SIGNER.verifier()).checkpoint
        check_consistent(cp, latest, merkle.consistency_proof(reader, cp.size, latest.size) if cp.size else [])
    ok, output = golang.check(golang.build(tmp_path_factory.mktemp("go")), tiles, SIGNER.vkey,
                              {"earlier_checkpoints": [n.decode() for n in signed]})  # fmt: skip
    assert ok, output
    process.kill(signal.SIGTERM)


async def _is_up(process: Process) -> bool:
    assert process.proc is not None
    if process.proc.poll() is not None:
        raise AssertionError(f"the audit service exited: {process.log.read_text()[-2000:]}")
    return await process.size() is not None


@pytest.fixture
def small_disk(tmp_path: Path) -> AsyncIterator[Path] | Any:
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root (CI runs as root)")
    mount = tmp_path / "tiles"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=96k", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_under_the_tiles_stops_integration_and_it_catches_up_when_space_returns(
    kafka: KafkaTarget, codec: AvroCodec, topics: tuple[str, str], tmp_path: Path, pki: Pki, small_disk: Path
) -> None:
    settings = support.settings_for(tmp_path, *topics, pki, tiles_dir=small_disk, checkpoint_interval_s=0.2)
    entries = [support.entry(n) for n in range(400)]
    async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as log:
        await support.produce(kafka.bootstrap, topics[0], [support.batch(codec, entries[:100])])

        async def first() -> bool:
            async with log.client("auditor") as http, http.get("/healthz") as r:
                return r.status == 200 and (await r.json())["size"] == 100

        await support.wait_for(first, what="the first 100 entries")
        await support.produce(kafka.bootstrap, topics[0], [support.batch(codec, entries[i : i + 10])
                                                           for i in range(100, 400, 10)])  # fmt: skip

        async def stalled() -> bool:
            async with log.client("auditor") as http, http.get("/readyz") as r:
                return r.status == 503 and "no space left" in (await r.json(content_type=None))["detail"]

        await support.wait_for(stalled, what="/readyz to report the full disk")
        async with log.client("auditor") as http, http.get("/v1/log/checkpoint") as r:
            stuck = open_checkpoint(await r.read(), log=SIGNER.verifier()).checkpoint
        assert 100 <= stuck.size < 400
        await asyncio.to_thread(subprocess.run, ["mount", "-o", "remount,size=16m", str(small_disk)], check=True)

        async def caught_up() -> bool:
            async with log.client("auditor") as http, http.get("/readyz") as r:
                return r.status == 200 and (await r.json())["size"] == 400

        await support.wait_for(caught_up, what="the log to catch up once space returned")
        async with log.client("auditor") as http, http.get("/v1/log/entries") as r:
            logged = (await r.json())["entries"]
        async with log.client("auditor") as http, http.get("/v1/log/checkpoint") as r:
            latest = open_checkpoint(await r.read(), log=SIGNER.verifier()).checkpoint
        assert [e["entry_id"] for e in logged] == [e["entry_id"] for e in entries]
        reader = TileNodeReader(400, lambda t: (small_disk / t.path).read_bytes())
        check_consistent(stuck, latest, merkle.consistency_proof(reader, stuck.size, 400))


async def test_a_changed_tile_is_named_and_the_service_refuses_to_extend_it(
    kafka: KafkaTarget, codec: AvroCodec, topics: tuple[str, str], tmp_path: Path, pki: Pki
) -> None:
    settings = support.settings_for(tmp_path, *topics, pki)
    entries = [support.entry(n) for n in range(300)]
    async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as log:
        await support.produce(kafka.bootstrap, topics[0], [support.batch(codec, entries)])

        async def done() -> bool:
            async with log.client("auditor") as http, http.get("/healthz") as r:
                return r.status == 200 and (await r.json())["size"] == 300

        await support.wait_for(done, what="300 entries")
        async with log.client("auditor") as http, http.get("/v1/log/entries") as r:
            leaves = [base64.b64decode(e["entry"]) for e in (await r.json())["entries"]]
        async with log.client("auditor") as http, http.get("/v1/log/checkpoint") as r:
            latest = open_checkpoint(await r.read(), log=SIGNER.verifier()).checkpoint
        async with log.client("auditor") as http, http.get("/v1/log/checkpoint") as r:
            served = await r.read()
    tiles = settings.tiles_root

    def stored(t: Tile) -> bytes:
        return (tiles / t.path).read_bytes()

    changed = [*leaves[:123], leaves[123][:-1] + bytes([leaves[123][-1] ^ 1]), *leaves[124:]]
    for copy, index in ((changed, 123), (leaves[:200] + leaves[201:], 200), ([*leaves[:7], leaves[3], *leaves[7:]], 7)):
        with pytest.raises(InvalidProof) as info:  # a changed, a deleted, an inserted entry in the served copy
            verify_entries(copy, latest, stored=stored)
        assert info.value.index == index
    forged = bytearray(served)
    forged[-5] ^= 1
    for bad in (
        bytes(forged),
        served.split(b"\n\n")[0] + b"\n\n",
        Checkpoint.parse(served.decode().split("\n\n")[0] + "\n").sign(NoteSigner(ORIGIN, SigningKey.generate())),
    ):
        with pytest.raises((InvalidSignature, DecodeError)):  # forged, missing, or by another key: refused
            open_checkpoint(bad, log=SIGNER.verifier())
    for path, index in (("tile/0/000", 77), ("tile/0/001.p/44", 256 + 9)):
        original = (tiles / path).read_bytes()
        data = bytearray(original)
        data[(index % 256) * 32 + 5] ^= 0x01
        (tiles / path).write_bytes(bytes(data))
        with pytest.raises(InvalidProof) as info:  # a replay of the served copy names the entry
            verify_entries(leaves, latest, stored=lambda t: (tiles / t.path).read_bytes())
        assert info.value.index == index
        with pytest.raises(StoreUnavailable, match=r"damaged|do not hash"):  # the service will not extend it
            async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki):
                pass
        (tiles / path).write_bytes(original)
    async with (
        support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as log,
        log.client("auditor") as http,
        http.get("/readyz") as r,
    ):
        assert r.status == 200


async def test_a_rewritten_history_fails_the_consistency_check_against_an_earlier_checkpoint(
    kafka: KafkaTarget, codec: AvroCodec, topic_name: str, tmp_path: Path, pki: Pki
) -> None:
    entries = [support.entry(n) for n in range(40)]
    rewritten = [*entries[:5], support.entry(5, entry_id=str(uuid.uuid4())), *entries[6:]]
    checkpoints: list[Checkpoint] = []
    proofs: list[list[bytes]] = []
    for i, history in enumerate((entries, rewritten)):
        topic, dead = await support.audit_topics(kafka.bootstrap, f"{topic_name}.{i}")
        settings = support.settings_for(tmp_path / str(i), topic, dead, pki)
        async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as log:
            await support.produce(kafka.bootstrap, topic, [support.batch(codec, history[:20])])
            if i == 1:
                await support.produce(kafka.bootstrap, topic, [support.batch(codec, history[20:])])
            want = 20 if i == 0 else 40

            async def reached(log: support.Running = log, want: int = want) -> bool:
                async with log.client("auditor") as http, http.get("/healthz") as r:
                    return r.status == 200 and (await r.json())["size"] == want

            await support.wait_for(reached, what=f"size {want}")
            async with log.client("auditor") as http:
                async with http.get("/v1/log/checkpoint") as r:
                    checkpoints.append(open_checkpoint(await r.read(), log=SIGNER.verifier()).checkpoint)
                async with http.get("/v1/log/proof/consistency?from=20&to=40" if i else "/healthz") as r:
                    body = await r.json()
                    proofs.append([base64.b64decode(h) for h in body.get("proof", [])])
    earlier, forked = checkpoints
    with pytest.raises(InvalidProof):  # same key, same origin, a different history: the auditor's check fails
        check_consistent(earlier, forked, proofs[1])
    assert Tile(0, 0, 20).path == "tile/0/000.p/20"
