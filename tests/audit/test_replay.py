"""``evhub audit replay`` as an auditor runs it: a real process, the audit service over real mTLS, hub.policy on
the real broker. The whole log verified and every decision reproduced; the report, its exports, its state; a
subset replay; and every way a log or a decision can be wrong, named by index with exit code 1."""

from __future__ import annotations

import csv
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from services.audit.note import NoteSigner
from services.audit.settings import AuditSettings
from services.audit.tiles import ENTRIES, Tile, bundle_bytes, bundle_entries
from services.shared.avro import AvroCodec
from services.shared.cluster import KafkaTarget
from services.shared.keys import SigningKey
from tests.audit import cli_support, support
from tests.audit.cli_support import Policy, Run
from tests.audit.support import ORIGIN, Pki, Running

pytestmark = pytest.mark.kafka
SIGNER = NoteSigner(ORIGIN, SigningKey.generate())
SIZE = 600  # two full bundles and a partial one


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return support.make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class Hub:
    kafka: KafkaTarget
    policy: Policy
    log: Running
    settings: AuditSettings
    pki: Pki
    state: Path
    topic: str
    entries: list[dict[str, Any]]

    async def replay(self, *extra: str, who: str = "auditor", state: Path | None = None) -> Run:
        args = cli_support.replay_args(self.policy, SIGNER, state or self.state,
                                       [*cli_support.tls_args(self.log.base, self.pki.files[who]), *extra])  # fmt: skip
        return await cli_support.evhub(*args, env={"EVHUB_KAFKA_BOOTSTRAP": self.kafka.bootstrap})

    async def add(self, codec: AvroCodec, entries: list[dict[str, Any]]) -> None:
        await support.produce(self.kafka.bootstrap, self.topic, [support.batch(codec, entries)])
        self.entries += entries
        await wait_size(self.log, len(self.entries))


async def wait_size(log: Running, size: int) -> None:
    async def reached() -> bool:
        async with log.client("auditor") as http, http.get("/healthz") as r:
            return r.status == 200 and (await r.json())["size"] >= size

    await support.wait_for(reached, what=f"the log to reach size {size}")


@pytest.fixture
async def hub(kafka: KafkaTarget, codec: AvroCodec, topic_name: str, tmp_path: Path, pki: Pki) -> AsyncIterator[Hub]:
    policy = await cli_support.push_policy(kafka.bootstrap, f"{topic_name}.policy", tmp_path)
    topic, dead = await support.audit_topics(kafka.bootstrap, topic_name)
    start = policy.start(policy.versions[0]) + timedelta(seconds=1)
    entries = cli_support.reads(policy.engine, start, SIZE)
    batches = [support.batch(codec, entries[i : i + 50]) for i in range(0, SIZE, 50)]
    await support.produce(kafka.bootstrap, topic, batches)
    settings = support.settings_for(tmp_path, topic, dead, pki)
    async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as log:
        await wait_size(log, SIZE)
        yield Hub(kafka, policy, log, settings, pki, tmp_path / "state", topic, entries)


def _kinds(report: dict[str, Any]) -> list[tuple[int | None, str]]:
    return [(d["index"], d["kind"]) for d in report["listed"]]


async def test_the_whole_log_verifies_and_every_decision_is_reproduced(hub: Hub, tmp_path: Path) -> None:
    first = await hub.replay("--json", "--jsonl", str(tmp_path / "r.jsonl"), "--csv", str(tmp_path / "r.csv"))
    assert first.code == 0, first.stderr + first.stdout
    report = first.json()
    assert report["ok"] is True
    assert (report["size"], report["replayed"], report["mode"], report["discrepancies"]) == (SIZE, SIZE, "full", 0)
    assert "trusted on first use" in report["checks"]["history"]
    assert "recorded as last verified" in report["checks"]["recorded"]
    released = sum(1 for e in hub.entries if e["decision"] == "RELEASED")
    assert 0 < released < SIZE  # the sample policy both releases and refuses
    assert sum(c.get("RELEASED", 0) for c in report["offices"].values()) == released
    de = [e for e in hub.entries if e["office"] == "DE-GBA-WCU"]
    assert report["offices"]["DE-GBA-WCU"] == {d: sum(1 for e in de if e["decision"] == d)
                                               for d in ("RELEASED", "REFUSED")}  # fmt: skip
    assert report["items"]["item-embargoed-0003"] == {"REFUSED": sum(1 for e in hub.entries if e["item"] and
                                                      e["item"]["item_id"] == "item-embargoed-0003")}  # fmt: skip
    lines = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [x["entry_id"] for x in lines] == [e["entry_id"] for e in hub.entries]
    assert all(x["ok"] and x["redecided"] == x["decision"] for x in lines)
    with (tmp_path / "r.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == SIZE
    assert rows[0]["entry_id"] == hub.entries[0]["entry_id"]

    second = await hub.replay()  # the human report, and the history check against the recorded checkpoint
    assert second.code == 0, second.stderr + second.stdout
    assert f"consistent with the checkpoint of size {SIZE} you verified before" in second.stdout
    assert "releases and refusals per office" in second.stdout
    assert "every one of the 600 decisions is reproduced" in second.stdout


async def test_a_subset_replay_checks_what_it_is_shown(hub: Hub) -> None:
    run = await hub.replay("--json", "--office", "FR-PNAT", "--start", "100", "--end", "400")
    assert run.code == 0, run.stderr + run.stdout
    report = run.json()
    assert report["mode"] == "subset"
    assert report["replayed"] == sum(1 for e in hub.entries[100:400] if e["office"] == "FR-PNAT")
    assert set(report["offices"]) == {"FR-PNAT"}
    office = await hub.replay("--json", "--item", "item-photo-0001", who="SE-IPC")  # an office replays its own
    assert office.code == 0, office.stderr + office.stdout
    assert set(office.json()["offices"]) == {"SE-IPC"}


async def test_decisions_the_policy_would_not_have_taken_are_named(
    hub: Hub, codec: AvroCodec, kafka: KafkaTarget, tmp_path: Path
) -> None:  # fmt: skip
    engine, items = hub.policy.engine, cli_support.ITEMS
    at = hub.entries[-1]["at"] + timedelta(seconds=1)
    secret = items["item-embargoed-0003"]
    forged = [
        # RELEASED to an office the policy refuses (SE-IPC has no SECRET clearance; the item is embargoed too)
        cli_support.decided_entry(engine, office="SE-IPC", item=secret, at=at, jurisdiction="SE",
                                  decision="RELEASED", deny_source=None),
        # a version hash that was never pushed
        cli_support.decided_entry(engine, office="DE-GBA-WCU", item=items["item-photo-0001"], at=at,
                                  policy_version="f" * 64),
        # released although the recorded attributes say withdrawn (and the policy refuses it)
        cli_support.decided_entry(engine, office="FR-PNAT", item=items["item-withdrawn-0004"], at=at,
                                  jurisdiction="FR", decision="RELEASED"),
        # disclosed a protected field the policy withholds from an office without PROTECTION clearance
        cli_support.decided_entry(engine, office="SE-IPC", item=items["item-photo-0001"], at=at, jurisdiction="SE",
                                  disclosed_fields=["VICTIM_IDENTIFYING", "LOCATION_EXACT"], withheld_fields=[]),
    ]  # fmt: skip
    await hub.add(codec, forged)
    run = await hub.replay("--json")
    assert run.code == 1, run.stderr + run.stdout
    found = set(_kinds(run.json()))
    assert {(SIZE, "decision-differs"), (SIZE, "released-under-embargo"), (SIZE + 1, "unknown-policy-version"),
            (SIZE + 2, "released-after-withdrawal"), (SIZE + 3, "disclosed-differs"),
            (SIZE + 3, "withheld-differs")} <= found  # fmt: skip
    assert all(index is not None and index >= SIZE for index, _ in found)  # the genuine 600 are fine
    text = await hub.replay()
    assert text.code == 1
    assert "FAILED" in text.stdout
    assert "was RELEASED, but policy version" in text.stdout


async def test_a_version_that_was_not_in_force_is_named(
    kafka: KafkaTarget, codec: AvroCodec, topic_name: str, tmp_path: Path, pki: Pki
) -> None:  # fmt: skip
    policy = await cli_support.push_policy(kafka.bootstrap, f"{topic_name}.policy", tmp_path, versions=2)
    old, new = policy.versions
    at = policy.start(new) + timedelta(seconds=1)
    genuine = cli_support.decided_entry(policy.engine, office="DE-GBA-WCU", item=cli_support.ITEMS["item-photo-0001"],
                                        at=at)  # fmt: skip
    stale = {**genuine, "entry_id": "00000000-0000-4000-8000-000000000001", "policy_version": old}
    early = {**genuine, "entry_id": "00000000-0000-4000-8000-000000000002",
             "at": policy.start(old) - timedelta(hours=1), "policy_version": old}  # fmt: skip
    topic, dead = await support.audit_topics(kafka.bootstrap, topic_name)
    await support.produce(kafka.bootstrap, topic, [support.batch(codec, [genuine, stale, early])])
    settings = support.settings_for(tmp_path, topic, dead, pki)
    async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as log:
        await wait_size(log, 3)
        args = cli_support.replay_args(
            policy, SIGNER, tmp_path / "state", ["--json", *cli_support.tls_args(log.base, pki.files["auditor"])]
        )
        run = await cli_support.evhub(*args, env={"EVHUB_KAFKA_BOOTSTRAP": kafka.bootstrap})
    assert run.code == 1, run.stderr + run.stdout
    kinds = _kinds(run.json())
    assert (0, "policy-not-in-force") not in kinds
    assert (1, "policy-not-in-force") in kinds  # a newer version was in force: the gateway used a stale one
    assert (2, "policy-not-in-force") in kinds  # no version was in force an hour before the first took effect
    assert "was decided under policy version" in next(d["detail"] for d in run.json()["listed"] if d["index"] == 1)


def _tamper(path: Path, offset: int) -> bytes:
    original = path.read_bytes()
    data = bytearray(original)
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    return original


async def test_a_changed_byte_in_a_stored_entry_or_tile_is_named(hub: Hub) -> None:
    tiles = hub.settings.tiles_root
    bundle = tiles / Tile(ENTRIES, 1).path
    entries = bundle_entries(bundle.read_bytes(), Tile(ENTRIES, 1))
    offset = sum(2 + len(e) for e in entries[:44]) + 2 + len(entries[44]) - 3  # inside entry 256 + 44
    original = _tamper(bundle, offset)
    run = await hub.replay("--json")
    bundle.write_bytes(original)
    assert run.code == 1, run.stderr + run.stdout
    assert (300, "entry-changed") in _kinds(run.json())
    assert "recorded" in run.json()["checks"]  # …and the checkpoint was not recorded as verified
    assert run.json()["checks"]["recorded"].startswith("not recorded")

    tile = tiles / "tile/0/001"
    original = _tamper(tile, 9 * 32 + 4)
    run = await hub.replay("--json")
    tile.write_bytes(original)
    assert run.code == 1, run.stderr + run.stdout
    assert _kinds(run.json()) == [(256 + 9, "tile-changed")]
    assert (await hub.replay()).code == 0  # restored: verifies again


async def test_a_tampered_copy_of_the_log_is_caught(hub: Hub, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(hub.settings.tiles_root, copy)
    state = tmp_path / "copy-state"
    base = cli_support.replay_args(hub.policy, SIGNER, state, ["--json", "--dir", str(copy)])
    env = {"EVHUB_KAFKA_BOOTSTRAP": hub.kafka.bootstrap}
    assert (await cli_support.evhub(*base, env=env)).code == 0
    first = copy / Tile(ENTRIES, 0).path
    entries = bundle_entries(first.read_bytes(), Tile(ENTRIES, 0))
    cases = {
        "changed": ([*entries[:17], entries[17][:-1] + b"?", *entries[18:]], (17, "entry-changed")),
        "deleted": ([*entries[:40], *entries[41:]], (40, "entry-deleted")),
        "inserted": ([*entries[:7], entries[3], *entries[7:]], (7, "entry-inserted")),
    }  # fmt: skip
    original = first.read_bytes()
    for name, (tampered, expected) in cases.items():
        first.write_bytes(bundle_bytes(tampered))
        run = await cli_support.evhub(*base, env=env)
        assert run.code == 1, (name, run.stderr)
        assert expected in _kinds(run.json()), name
    first.write_bytes(original)
    assert (await cli_support.evhub(*base, env=env)).code == 0


async def test_a_forged_missing_or_foreign_checkpoint_signature_is_refused(hub: Hub, tmp_path: Path) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(hub.settings.tiles_root, copy)
    served = (copy / "checkpoint").read_bytes()
    text = served.split(b"\n\n")[0] + b"\n"
    other = NoteSigner(ORIGIN, SigningKey.generate())
    forged = bytearray(served)
    forged[-6] ^= 1
    from services.audit.checkpoint import Checkpoint

    foreign = Checkpoint.parse(text.decode()).sign(other)
    env = {"EVHUB_KAFKA_BOOTSTRAP": hub.kafka.bootstrap}
    for bad in (bytes(forged), text + b"\n", foreign):
        (copy / "checkpoint").write_bytes(bad)
        args = cli_support.replay_args(hub.policy, SIGNER, tmp_path / "s", ["--dir", str(copy)])
        run = await cli_support.evhub(*args, env=env)
        assert run.code in (2, 3), run.stderr
        assert run.stderr.startswith("evhub: ")
        assert len(run.stderr.strip().splitlines()) == 1
        assert "Traceback" not in run.stderr


async def test_a_rewritten_history_fails_against_the_checkpoint_seen_before(
    kafka: KafkaTarget, codec: AvroCodec, topic_name: str, tmp_path: Path, pki: Pki
) -> None:  # fmt: skip
    policy = await cli_support.push_policy(kafka.bootstrap, f"{topic_name}.policy", tmp_path)
    start = policy.start(policy.versions[0]) + timedelta(seconds=1)
    history = cli_support.reads(policy.engine, start, 40)
    rewritten = [*history[:5], {**history[5], "entry_id": "00000000-0000-4000-8000-00000000abcd"}, *history[6:]]
    state = tmp_path / "state"
    runs = []
    for i, (entries, size) in enumerate(((history, 20), (rewritten, 40), (history, 10))):
        topic, dead = await support.audit_topics(kafka.bootstrap, f"{topic_name}.{i}")
        await support.produce(kafka.bootstrap, topic, [support.batch(codec, entries[:size])])
        settings = support.settings_for(tmp_path / str(i), topic, dead, pki)
        async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as log:
            await wait_size(log, size)
            args = cli_support.replay_args(
                policy, SIGNER, state, ["--json", *cli_support.tls_args(log.base, pki.files["auditor"])]
            )
            runs.append(await cli_support.evhub(*args, env={"EVHUB_KAFKA_BOOTSTRAP": kafka.bootstrap}))
    first, forked, shrunk = runs
    assert first.code == 0, first.stderr
    assert forked.code == 1, forked.stderr
    kinds = _kinds(forked.json())
    assert (20, "history-rewritten") in kinds
    details = [d["detail"] for d in forked.json()["listed"] if d["kind"] == "history-rewritten"]
    assert any("no longer hash to the checkpoint" in d for d in details)  # found from the entries themselves
    assert any("not an extension" in d for d in details)  # and by the consistency proof
    assert shrunk.code == 1
    assert (10, "log-shrank") in _kinds(shrunk.json())
