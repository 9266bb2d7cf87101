"""``evhub audit witness`` and the log's cosignatures, as real processes over real mTLS with the real broker: a
witness cosigns, the log serves the cosignature, a replay can require a quorum, and a witness refuses to cosign a
forked log (so the hub cannot show different histories to different people)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from services.audit.checkpoint import open_checkpoint
from services.audit.note import COSIGNATURE_V1, NoteSigner, with_signatures
from services.shared.avro import AvroCodec
from services.shared.cluster import KafkaTarget
from services.shared.keys import SigningKey
from tests.audit import cli_support, support
from tests.audit.cli_support import Policy
from tests.audit.support import ORIGIN, Pki

pytestmark = pytest.mark.kafka
SIGNER = NoteSigner(ORIGIN, SigningKey.generate())


@dataclass
class Witness:
    name: str
    pem: Path
    signer: NoteSigner
    state: Path


def _witness(tmp: Path, name: str) -> Witness:
    key = SigningKey.generate()
    slug = name.replace("/", "_")
    pem = tmp / f"{slug}.key"
    pem.write_bytes(key.to_pem())
    return Witness(name, pem, NoteSigner(name, key, sig_type=COSIGNATURE_V1), tmp / f"state-{slug}")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return support.make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Log:
    base: str
    topic: str
    policy: Policy
    kafka: KafkaTarget
    pki: Pki

    def witness_args(self, w: Witness, *extra: str, who: str = "DE-GBA-WCU") -> list[str]:
        return ["audit", "witness", "--log-key", SIGNER.vkey, "--witness-key", str(w.pem), "--name", w.name,
                "--state-dir", str(w.state), *cli_support.tls_args(self.base, self.pki.files[who]), *extra]  # fmt: skip

    async def witness(self, w: Witness, *extra: str) -> cli_support.Run:
        return await cli_support.evhub(*self.witness_args(w, "--once", *extra))

    async def replay(self, state: Path, *extra: str) -> cli_support.Run:
        args = cli_support.replay_args(
            self.policy, SIGNER, state, [*cli_support.tls_args(self.base, self.pki.files["auditor"]), *extra]
        )
        return await cli_support.evhub(*args, env={"EVHUB_KAFKA_BOOTSTRAP": self.kafka.bootstrap})

    async def get(self, path: str, who: str = "auditor") -> tuple[int, bytes]:
        connector = aiohttp.TCPConnector(ssl=self.pki.clients[who])
        async with aiohttp.ClientSession(connector=connector) as http, http.get(self.base + path) as r:
            return r.status, await r.read()

    async def post(self, path: str, body: bytes, who: str = "auditor") -> tuple[int, Any]:
        connector = aiohttp.TCPConnector(ssl=self.pki.clients[who])
        async with aiohttp.ClientSession(connector=connector) as http, http.post(self.base + path, data=body) as r:
            return r.status, await r.json(content_type=None)

    async def checkpoint(self, witnesses: list[Witness]) -> tuple[int, dict[str, int]]:
        _, body = await self.get("/v1/log/checkpoint")
        verified = open_checkpoint(body, log=SIGNER.verifier(), witnesses=[w.signer.verifier() for w in witnesses])
        return verified.checkpoint.size, verified.cosigned_by


async def _wait_size(log: Log, size: int) -> None:
    async def reached() -> bool:
        status, _ = await log.get("/readyz")
        return status == 200 and (await log.checkpoint([]))[0] >= size

    await support.wait_for(reached, what=f"size {size}")


@asynccontextmanager
async def _log(kafka: KafkaTarget, codec: AvroCodec, name: str, tmp: Path, pki: Pki, witnesses: list[Witness],
               policy: Policy, entries: list[dict[str, Any]]) -> AsyncIterator[Log]:  # fmt: skip
    topic, dead = await support.audit_topics(kafka.bootstrap, name)
    await support.produce(kafka.bootstrap, topic, [support.batch(codec, entries)])
    settings = support.settings_for(tmp, topic, dead, pki, witness_keys=[w.signer.vkey for w in witnesses])
    async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as running:
        log = Log(running.base, topic, policy, kafka, pki)
        await _wait_size(log, len(entries))
        yield log


async def test_witnesses_cosign_the_log_serves_it_and_a_replay_requires_a_quorum(
    kafka: KafkaTarget, codec: AvroCodec, topic_name: str, tmp_path: Path, pki: Pki
) -> None:  # fmt: skip
    policy = await cli_support.push_policy(kafka.bootstrap, f"{topic_name}.policy", tmp_path)
    entries = cli_support.reads(policy.engine, policy.start(policy.versions[0]) + timedelta(seconds=1), 300)
    w1, w2 = _witness(tmp_path, "oversight.example/w1"), _witness(tmp_path, "office.example/w2")
    async with _log(kafka, codec, topic_name, tmp_path, pki, [w1, w2], policy, entries[:200]) as log:
        first = await log.witness(w1)
        assert first.code == 0, first.stderr
        assert "cosigned size 200" in first.stdout
        assert "first checkpoint seen" in first.stdout
        size, cosigned = await log.checkpoint([w1, w2])
        assert (size, set(cosigned)) == (200, {w1.name})  # the served checkpoint carries the cosignature
        again = await log.witness(w1)
        assert "already carries" in again.stdout

        vkeys = ["--witness", w1.signer.vkey, "--witness", w2.signer.vkey]
        ok = await log.replay(tmp_path / "a1", "--json", *vkeys, "--quorum", "1")
        assert ok.code == 0, ok.stderr + ok.stdout
        assert f"size 200 cosigned by {w1.name}" in ok.json()["checks"]["witnesses"]
        short = await log.replay(tmp_path / "a2", *vkeys, "--quorum", "2")
        assert short.code == 3, short.stderr  # untrusted: no checkpoint carries two of the witnesses' cosignatures
        assert "no checkpoint" in short.stderr

        await support.produce(kafka.bootstrap, log.topic, [support.batch(codec, entries[200:])])
        await _wait_size(log, 300)
        # the latest (300) is not cosigned yet: a quorum is met by the older cosigned checkpoint, consistent with it
        behind = await log.replay(tmp_path / "a3", "--json", *vkeys, "--quorum", "1")
        assert behind.code == 0, behind.stderr + behind.stdout
        assert "entries 200 to 299 are not witnessed yet" in behind.json()["checks"]["witnesses"]
        assert (await log.witness(w1)).code == 0
        second = await log.witness(w2)
        assert "cosigned size 300" in second.stdout
        size, cosigned = await log.checkpoint([w1, w2])
        assert (size, set(cosigned)) == (300, {w1.name, w2.name})
        both = await log.replay(tmp_path / "a2", *vkeys, "--quorum", "2")
        assert both.code == 0, both.stderr + both.stdout

        # the log keeps only cosignatures by witnesses it is configured with, and only ones that verify
        _, served = await log.get("/v1/log/checkpoint")
        stranger = NoteSigner("stranger.example/w", SigningKey.generate(), sig_type=COSIGNATURE_V1)
        text = served.split(b"\n\n")[0].decode() + "\n"
        status, body = await log.post(
            "/v1/log/cosignature", with_signatures(served, [stranger.sign(text, timestamp=5)])
        )
        assert status == 200  # the configured ones it already carries verify; the stranger's is ignored
        assert "stranger.example/w" not in body["witnesses"]
        bare = served.split(b"\n\n")[0] + b"\n\n" + served.split(b"\n\n")[1].split(b"\n")[0] + b"\n"
        status, _ = await log.post("/v1/log/cosignature", with_signatures(bare, [stranger.sign(text, timestamp=5)]))
        assert status == 403
        forged = w1.signer.sign(text, timestamp=7)
        flipped = forged.data[:-1] + bytes([forged.data[-1] ^ 1])  # never the genuine signature
        forged_line = with_signatures(bare, [type(forged)(forged.name, forged.key_id, flipped)])
        status, _ = await log.post("/v1/log/cosignature", forged_line)
        assert status == 422


async def test_a_witness_refuses_to_cosign_a_forked_log(
    kafka: KafkaTarget, codec: AvroCodec, topic_name: str, tmp_path: Path, pki: Pki
) -> None:  # fmt: skip
    policy = await cli_support.push_policy(kafka.bootstrap, f"{topic_name}.policy", tmp_path)
    history = cli_support.reads(policy.engine, policy.start(policy.versions[0]) + timedelta(seconds=1), 60)
    fork = [*history[:10], {**history[10], "entry_id": "00000000-0000-4000-8000-0000000f0f0f"}, *history[11:]]
    w = _witness(tmp_path, "oversight.example/w1")
    async with _log(kafka, codec, f"{topic_name}.a", tmp_path / "a", pki, [w], policy, history[:30]) as shown_to_some:
        assert (await shown_to_some.witness(w)).code == 0
    recorded = (w.state).rglob("checkpoint")
    before = {p: p.read_bytes() for p in recorded}
    # the same key and origin show others a different history of 60 entries
    async with _log(kafka, codec, f"{topic_name}.b", tmp_path / "b", pki, [w], policy, fork) as shown_to_others:
        refused = await shown_to_others.witness(w)
        assert refused.code == 1, refused.stderr
        assert "refusing to cosign size 60" in refused.stderr
        assert "forked" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        _, cosigned = await shown_to_others.checkpoint([w])
        assert cosigned == {}  # the forked log got no cosignature
    assert {p: p.read_bytes() for p in before} == before  # the witness still holds the history it cosigned
    # the cosignature of one history is refused by a log (same key and origin) showing another at that size
    [cosigned_note] = before.values()
    async with _log(kafka, codec, f"{topic_name}.d", tmp_path / "d", pki, [w], policy, fork[:30]) as other:
        status, body = await other.post("/v1/log/cosignature", cosigned_note)
        assert status == 409, body
        assert "another checkpoint of size 30" in body["detail"]
        assert (await other.checkpoint([w]))[1] == {}
    # and a log that goes back to a smaller size is refused as well
    async with _log(kafka, codec, f"{topic_name}.c", tmp_path / "c", pki, [w], policy, history[:20]) as rolled_back:
        refused = await rolled_back.witness(w)
        assert refused.code == 1
        assert "smaller than size 30" in refused.stderr


async def test_a_following_witness_cosigns_each_new_checkpoint(
    kafka: KafkaTarget, codec: AvroCodec, topic_name: str, tmp_path: Path, pki: Pki
) -> None:  # fmt: skip
    policy = await cli_support.push_policy(kafka.bootstrap, f"{topic_name}.policy", tmp_path)
    entries = cli_support.reads(policy.engine, policy.start(policy.versions[0]) + timedelta(seconds=1), 90)
    w = _witness(tmp_path, "oversight.example/w1")
    async with _log(kafka, codec, topic_name, tmp_path, pki, [w], policy, entries[:30]) as log:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(cli_support.ROOT)}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", *log.witness_args(w, "--interval", "0.2"), env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            for size, more in ((30, entries[30:60]), (60, entries[60:]), (90, [])):

                async def cosigned(size: int = size) -> bool:
                    served, by = await log.checkpoint([w])
                    return served == size and w.name in by

                await support.wait_for(cosigned, what=f"the witness to cosign size {size}")
                if more:
                    await support.produce(kafka.bootstrap, log.topic, [support.batch(codec, more)])
        finally:
            os.kill(proc.pid, signal.SIGINT)
            out, err = await proc.communicate()
        assert proc.returncode == 130, err.decode()
        lines = out.decode().splitlines()
        assert [x for x in lines if x.startswith("cosigned")][-1].startswith("cosigned size 90")
