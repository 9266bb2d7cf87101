"""A malicious audit server: a proxy in front of the real audit service (real TLS, real broker) that alters its
answers. Each alteration ends in a clear one-line error or a named discrepancy, with bounded reads, never a crash."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from services.audit.note import COSIGNATURE_V1, NoteSigner
from services.shared.avro import AvroCodec
from services.shared.cluster import KafkaTarget
from services.shared.keys import SigningKey
from services.shared.tls import server_context
from tests.audit import cli_support, support
from tests.audit.cli_support import Policy, Run
from tests.audit.support import ORIGIN, Pki

pytestmark = pytest.mark.kafka
SIGNER = NoteSigner(ORIGIN, SigningKey.generate())
WITNESS_KEY = SigningKey.generate()
WITNESS = NoteSigner("oversight.example/w1", WITNESS_KEY, sig_type=COSIGNATURE_V1)
Rewrite = Callable[[str, int, bytes], tuple[int, bytes]]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return support.make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Proxy:
    base: str
    rules: dict[str, Rewrite] = field(default_factory=dict)  # path prefix → how the answer is altered


@dataclass
class Setup:
    proxy: Proxy
    policy: Policy
    pki: Pki
    kafka: KafkaTarget
    entries: list[dict[str, object]]
    topic: str

    async def replay(self, state: Path, *extra: str) -> Run:
        args = cli_support.replay_args(
            self.policy, SIGNER, state, [*cli_support.tls_args(self.proxy.base, self.pki.files["auditor"]), *extra]
        )
        return await cli_support.evhub(*args, env={"EVHUB_KAFKA_BOOTSTRAP": self.kafka.bootstrap})


@pytest.fixture
async def setup(kafka: KafkaTarget, codec: AvroCodec, topic_name: str, tmp_path: Path, pki: Pki
                ) -> AsyncIterator[Setup]:  # fmt: skip
    policy = await cli_support.push_policy(kafka.bootstrap, f"{topic_name}.policy", tmp_path)
    entries = cli_support.reads(policy.engine, policy.start(policy.versions[0]) + timedelta(seconds=1), 300)
    topic, dead = await support.audit_topics(kafka.bootstrap, topic_name)
    await support.produce(kafka.bootstrap, topic, [support.batch(codec, entries[:100])])
    settings = support.settings_for(tmp_path, topic, dead, pki, witness_keys=[WITNESS.vkey])
    async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as real:
        await _wait(real, 100)
        proxy = Proxy("")
        upstream = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pki.clients["auditor"]))

        async def forward(request: web.Request) -> web.Response:
            body = await request.read()
            async with upstream.request(request.method, real.base + request.path_qs, data=body or None) as r:
                status, data = r.status, await r.read()
            for prefix, rewrite in proxy.rules.items():
                if request.path.startswith(prefix):
                    status, data = rewrite(request.path_qs, status, data)
            return web.Response(status=status, body=data, content_type="application/octet-stream")

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", forward)
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(pki.server)).start()
            proxy.base = f"https://127.0.0.1:{runner.addresses[0][1]}"
            yield Setup(proxy, policy, pki, kafka, entries, topic)
        finally:
            await runner.cleanup()
            await upstream.close()


async def _wait(real: support.Running, size: int) -> None:
    async def reached() -> bool:
        async with real.client("auditor") as http, http.get("/healthz") as r:
            return bool((await r.json())["size"] >= size)

    await support.wait_for(reached, what=f"size {size}")


def _one_line(run: Run) -> None:
    assert run.stderr.startswith("evhub: "), run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr
    assert "Traceback" not in run.stderr


def _flip(at: int) -> Rewrite:
    def rewrite(path: str, status: int, data: bytes) -> tuple[int, bytes]:
        return status, data[:at] + bytes([data[at] ^ 1]) + data[at + 1 :]

    return rewrite


def _huge(n: int) -> Rewrite:
    return lambda path, status, data: (200, b"\0" * n)


def _body(value: bytes, status: int = 200) -> Rewrite:
    return lambda path, s, data: (status, value)


@pytest.mark.parametrize(
    ("rule", "code", "message"),
    [
        (("/v1/log/tile/0/000.p/100", _huge(10 << 20)), 2, "over the 3200-byte bound"),
        (("/v1/log/tile/entries/000.p/100", _huge(64 << 20)), 2, "bound for it: refused"),
        (("/v1/log/checkpoint", _huge(1 << 20)), 2, "over the 262144-byte bound"),
        (("/v1/log/checkpoint", _body(b"not a note")), 2, "malformed note"),
        (("/v1/log/tile/0/000.p/100", _body(b"", 503)), 4, "(503)"),
        (("/v1/log/entries", _body(b"{not json")), 2, "is not JSON"),
        (("/v1/log/entries", _body(json.dumps({"entries": "x", "next_start": None}).encode())), 2, "not a page"),
        (("/v1/log/entries", _body(json.dumps({"entries": [{"index": 1, "entry": "%%"}]}).encode())), 2, "base64"),
    ],
    ids=["huge-tile", "huge-bundle", "huge-checkpoint", "garbage-checkpoint", "unavailable", "entries-not-json",
         "entries-wrong-shape", "entry-not-base64"],
)  # fmt: skip
async def test_a_hostile_answer_is_one_clear_line(
    setup: Setup, tmp_path: Path, rule: tuple[str, Rewrite], code: int, message: str
) -> None:  # fmt: skip
    setup.proxy.rules[rule[0]] = rule[1]
    subset = ["--office", "DE-GBA-WCU"] if rule[0] == "/v1/log/entries" else []
    run = await setup.replay(tmp_path / "state", *subset)
    assert run.code == code, run.stderr + run.stdout
    _one_line(run)
    assert message in run.stderr


async def test_a_wrong_tile_or_entry_from_the_server_is_a_named_discrepancy(setup: Setup, tmp_path: Path) -> None:
    setup.proxy.rules["/v1/log/tile/0/000.p/100"] = _flip(42 * 32)
    run = await setup.replay(tmp_path / "a", "--json")
    assert run.code == 1, run.stderr
    assert [(d["index"], d["kind"]) for d in run.json()["listed"]] == [(42, "tile-changed")]
    setup.proxy.rules.clear()

    def forge_entry(path: str, status: int, data: bytes) -> tuple[int, bytes]:
        page = json.loads(data)
        raw = bytearray(base64.b64decode(page["entries"][1]["entry"]))
        raw[-2] ^= 1
        page["entries"][1]["entry"] = base64.b64encode(bytes(raw)).decode()
        return status, json.dumps(page).encode()

    setup.proxy.rules["/v1/log/entries"] = forge_entry
    run = await setup.replay(tmp_path / "b", "--json", "--start", "10", "--end", "20")
    assert run.code == 1, run.stderr
    assert (11, "entry-changed") in [(d["index"], d["kind"]) for d in run.json()["listed"]]


async def test_a_wrong_consistency_proof_fails_the_history_check_and_the_witness(
    setup: Setup, codec: AvroCodec, tmp_path: Path
) -> None:  # fmt: skip
    state = tmp_path / "state"
    assert (await setup.replay(state)).code == 0  # the auditor has verified size 100
    pem = tmp_path / "w.key"
    pem.write_bytes(WITNESS_KEY.to_pem())
    witness = ["audit", "witness", "--once", "--log-key", SIGNER.vkey, "--witness-key", str(pem), "--name",
               WITNESS.name, "--state-dir", str(tmp_path / "w"),
               *cli_support.tls_args(setup.proxy.base, setup.pki.files["auditor"])]  # fmt: skip
    first = await cli_support.evhub(*witness)
    assert first.code == 0, first.stderr  # the witness has cosigned size 100
    await support.produce(setup.kafka.bootstrap, setup.topic, [support.batch(codec, setup.entries[100:])])

    async def grown() -> bool:
        return await _size(setup) == 300

    await support.wait_for(grown, what="size 300")

    def wrong_proof(path: str, status: int, data: bytes) -> tuple[int, bytes]:
        body = json.loads(data)
        body["proof"][0] = base64.b64encode(bytes(32)).decode()
        return status, json.dumps(body).encode()

    setup.proxy.rules["/v1/log/proof/consistency"] = wrong_proof
    run = await setup.replay(state, "--start", "0", "--end", "5", "--json")  # a subset: the proof is all it has
    assert run.code == 1, run.stderr
    assert (100, "history-rewritten") in [(d["index"], d["kind"]) for d in run.json()["listed"]]
    full = await setup.replay(state, "--json")  # a full replay finds the prefix intact from the entries themselves
    assert full.code == 1, full.stderr
    details = [d["detail"] for d in full.json()["listed"] if d["kind"] == "history-rewritten"]
    assert details
    assert all("not an extension" in d for d in details)  # only the proof is wrong: the entries still hash right
    refused = await cli_support.evhub(*witness)
    assert refused.code == 1, refused.stderr
    _one_line(refused)
    assert "refusing to cosign size 300" in refused.stderr


async def _size(setup: Setup) -> int:
    connector = aiohttp.TCPConnector(ssl=setup.pki.clients["auditor"])
    async with aiohttp.ClientSession(connector=connector) as http, http.get(setup.proxy.base + "/healthz") as r:
        return int((await r.json(content_type=None))["size"])


async def test_a_wrong_receipt_proof_is_never_written(setup: Setup, tmp_path: Path) -> None:
    setup.proxy.rules["/v1/log/receipt/"] = lambda path, status, data: (status, data.replace(b"index ", b"index 1", 1))
    receipt = str(setup.entries[5]["entry_id"])
    out = tmp_path / "p"
    run = await cli_support.evhub("audit", "prove", "--receipt", receipt, "--log-key", SIGNER.vkey, "--out", str(out),
                                  *cli_support.tls_args(setup.proxy.base, setup.pki.files["auditor"]))  # fmt: skip
    assert run.code == 3, run.stderr
    _one_line(run)
    assert not out.exists()
