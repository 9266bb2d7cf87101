"""The audit service against the real broker, over real mTLS: integration, exactly-once, queries, access, proofs,
receipts, dead letters, and restarts that resume where the last commit ended."""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition

from services.audit import merkle
from services.audit.checkpoint import open_checkpoint, verify_tlog_proof
from services.audit.note import NoteSigner
from services.audit.verify import verify_entries
from services.shared.avro import AvroCodec
from services.shared.cluster import KafkaTarget
from services.shared.errors import ConfigurationError
from services.shared.kafka import TopicSpec, ensure_topics, make_consumer, partitions_of
from services.shared.keys import SigningKey
from tests.audit import support
from tests.audit.support import ORIGIN, Pki, Running

pytestmark = pytest.mark.kafka
SIGNER = NoteSigner(ORIGIN, SigningKey.generate())


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return support.make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def topics(kafka: KafkaTarget, topic_name: str) -> tuple[str, str]:
    return await support.audit_topics(kafka.bootstrap, topic_name)


@pytest.fixture
async def log(kafka: KafkaTarget, topics: tuple[str, str], tmp_path: Path, pki: Pki) -> AsyncIterator[Running]:
    settings = support.settings_for(tmp_path, *topics, pki)
    async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as running:
        yield running


async def _size(log: Running) -> int:
    async with log.client("auditor") as http, http.get("/v1/log/checkpoint") as r:
        data = await r.read()
    return open_checkpoint(data, log=SIGNER.verifier()).checkpoint.size


async def _wait_size(log: Running, size: int) -> None:
    async def reached() -> bool:
        return await _size(log) >= size

    await support.wait_for(reached, what=f"a checkpoint of size {size}")


async def _json(log: Running, who: str, path: str, status: int = 200) -> Any:
    async with log.client(who) as http, http.get(path) as r:
        body = await r.json(content_type=None)
        assert r.status == status, body
        return body


async def test_batches_become_leaves_once_in_offset_order(
    kafka: KafkaTarget, codec: AvroCodec, topics: tuple[str, str], log: Running
) -> None:
    entries = [support.entry(n) for n in range(40)]
    first, second = support.batch(codec, entries[:25]), support.batch(codec, entries[25:])
    # a producer retry (the same record twice), and one entry redelivered inside a later batch
    again = support.batch(codec, [entries[3], support.entry(99, entry_id=str(uuid.uuid4()))])
    await support.produce(kafka.bootstrap, topics[0], [first, first, second, again])
    await _wait_size(log, 41)
    body = await _json(log, "auditor", "/v1/log/entries?limit=1000")
    ids = [e["entry_id"] for e in body["entries"]]
    assert ids == [e["entry_id"] for e in entries] + [ids[-1]]
    assert len(set(ids)) == 41
    health = await _json(log, "auditor", "/healthz")
    assert health["duplicates"] == 26  # the whole second copy of the first batch, and entry 3
    leaves = [base64.b64decode(e["entry"]) for e in body["entries"]]
    async with log.client("auditor") as http, http.get("/v1/log/checkpoint") as r:
        checkpoint = open_checkpoint(await r.read(), log=SIGNER.verifier()).checkpoint
    verify_entries(leaves, checkpoint)


async def test_queries_filter_and_offices_see_only_their_own(
    kafka: KafkaTarget, codec: AvroCodec, topics: tuple[str, str], log: Running
) -> None:
    entries = [support.entry(n) for n in range(30)]
    await support.produce(kafka.bootstrap, topics[0], [support.batch(codec, entries)])
    await _wait_size(log, 30)
    de = await _json(log, "DE-GBA-WCU", "/v1/log/entries")
    assert {e["office"] for e in de["entries"]} == {"DE-GBA-WCU"}
    assert len(de["entries"]) == 10
    await _json(log, "DE-GBA-WCU", "/v1/log/entries?office=FR-PNAT", 403)
    refused = await _json(log, "auditor", "/v1/log/entries?decision=REFUSED&item=item-0")
    assert [e["index"] for e in refused["entries"]] == [n for n in range(30) if n % 3 == 0 and n % 7 == 0]
    timed = await _json(log, "auditor", "/v1/log/entries?since=2026-05-01T12:00:10Z&until=2026-05-01T12:00:12Z")
    assert [e["index"] for e in timed["entries"]] == [10, 11]
    page = await _json(log, "auditor", "/v1/log/entries?start=5&end=9")
    assert [e["index"] for e in page["entries"]] == [5, 6, 7, 8]
    fr_entry = entries[1]["entry_id"]
    await _json(log, "DE-GBA-WCU", f"/v1/log/entries/{fr_entry}", 404)
    await _json(log, "DE-GBA-WCU", "/v1/log/proof/inclusion?index=1", 403)
    await _json(log, "DE-GBA-WCU", f"/v1/log/receipt/{fr_entry}", 404)
    assert (await _json(log, "FR-PNAT", f"/v1/log/entries/{fr_entry}"))["index"] == 1
    await _json(log, "nobody", "/v1/log/checkpoint", 403)
    async with log.client("DE-GBA-WCU") as http:
        async with http.get("/v1/log/tile/entries/000.p/30") as r:
            assert r.status == 403  # bundles name every office's reads
        async with http.get("/v1/log/tile/0/000.p/30") as r:
            assert r.status == 200
            assert len(await r.read()) == 30 * 32
        async with http.get("/v1/log/tile/0/000.p/31") as r:
            assert r.status == 404  # beyond the latest checkpoint


async def test_proofs_and_receipts_verify_offline(
    kafka: KafkaTarget, codec: AvroCodec, topics: tuple[str, str], log: Running
) -> None:
    entries = [support.entry(n) for n in range(300)]
    await support.produce(kafka.bootstrap, topics[0], [support.batch(codec, entries[:100])])
    await _wait_size(log, 100)
    async with log.client("auditor") as http, http.get("/v1/log/checkpoint") as r:
        old = open_checkpoint(await r.read(), log=SIGNER.verifier()).checkpoint
    await support.produce(kafka.bootstrap, topics[0], [support.batch(codec, entries[100:])])
    await _wait_size(log, 300)
    async with log.client("auditor") as http, http.get("/v1/log/checkpoint") as r:
        new = open_checkpoint(await r.read(), log=SIGNER.verifier()).checkpoint
    body = await _json(log, "auditor", f"/v1/log/proof/consistency?from={old.size}&to={new.size}")
    merkle.verify_consistency(old.size, new.size, old.root, new.root, [base64.b64decode(h) for h in body["proof"]])
    mine = entries[257]
    office = mine["office"]
    body = await _json(log, office, f"/v1/log/proof/inclusion?entry_id={mine['entry_id']}&size={old.size}", 404)
    body = await _json(log, office, f"/v1/log/proof/inclusion?entry_id={mine['entry_id']}")
    entry = await _json(log, office, f"/v1/log/entries/{mine['entry_id']}")
    merkle.verify_inclusion(257, new.size, merkle.leaf_hash(base64.b64decode(entry["entry"])),
                            [base64.b64decode(h) for h in body["proof"]], new.root)  # fmt: skip
    async with log.client(office) as http, http.get(f"/v1/log/receipt/{mine['entry_id']}") as r:
        assert r.status == 200
        receipt = await r.read()
    assert receipt.startswith(b"c2sp.org/tlog-proof@v1\nextra ")
    verified = verify_tlog_proof(receipt, entry=base64.b64decode(entry["entry"]), log=SIGNER.verifier())
    assert verified.checkpoint == new
    async with log.client(office) as http, http.get(f"/v1/log/receipt/{mine['entry_id']}?size=100") as r:
        assert r.status == 404  # not in that tree
    async with log.client(office) as http:
        async with http.get("/v1/log/tile/0/000") as r:
            full = await r.read()
        async with http.get("/v1/log/tile/0/000.p/100") as r:  # deleted once tile 0 was full: cut from it
            assert r.status == 200
            assert await r.read() == full[: 100 * 32]


async def test_an_undecodable_record_is_dead_lettered_counted_and_the_log_goes_on(
    kafka: KafkaTarget, codec: AvroCodec, topics: tuple[str, str], log: Running
) -> None:
    good = [support.entry(n) for n in range(5)]
    not_an_entry = codec.encode("audit_batch", {"batch_id": "b", "gateway": "g", "entries": [b"\xc3\x01junk"]})
    await support.produce(kafka.bootstrap, topics[0], [b"not avro at all", support.batch(codec, good[:2]),
                                                       not_an_entry, support.batch(codec, good[2:])])  # fmt: skip
    await _wait_size(log, 5)
    health = await _json(log, "auditor", "/healthz")
    assert health["dead_letters"] == 2
    consumer = make_consumer(kafka.bootstrap, group_id=None, client_id="test-dlq")
    await consumer.start()
    try:
        tp = TopicPartition(topics[1], 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        got = await consumer.getmany(tp, timeout_ms=10_000)
        records = got.get(tp, [])
    finally:
        await consumer.stop()
    assert [r.value for r in records] == [b"not avro at all", not_an_entry]
    reasons = [dict(r.headers)["reason"].decode() for r in records]
    assert "Avro" in reasons[0]
    assert reasons[1].startswith("entry 0 of the batch")
    assert [dict(r.headers)["offset"] for r in records] == [b"0", b"2"]


async def test_a_restart_resumes_exactly_where_the_last_commit_ended(
    kafka: KafkaTarget, codec: AvroCodec, topics: tuple[str, str], tmp_path: Path, pki: Pki
) -> None:
    settings = support.settings_for(tmp_path, *topics, pki)
    entries = [support.entry(n) for n in range(60)]
    async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as first:
        await support.produce(kafka.bootstrap, topics[0], [support.batch(codec, entries[:20])])
        await _wait_size(first, 20)
        async with first.client("auditor") as http, http.get("/v1/log/checkpoint") as r:
            before = open_checkpoint(await r.read(), log=SIGNER.verifier()).checkpoint
    await support.produce(kafka.bootstrap, topics[0], [support.batch(codec, entries[20:]),
                                                       support.batch(codec, entries[:5])])  # fmt: skip
    async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as second:
        await _wait_size(second, 60)
        body = await _json(second, "auditor", "/v1/log/entries")
        assert [e["entry_id"] for e in body["entries"]] == [e["entry_id"] for e in entries]
        proof = await _json(second, "auditor", "/v1/log/proof/consistency?from=20&to=60")
        async with second.client("auditor") as http, http.get("/v1/log/checkpoint") as r:
            after = open_checkpoint(await r.read(), log=SIGNER.verifier()).checkpoint
        merkle.verify_consistency(20, 60, before.root, after.root, [base64.b64decode(h) for h in proof["proof"]])
        ready = await _json(second, "auditor", "/readyz")
        assert ready["size"] == 60


async def test_missing_topics_are_created_and_a_partitioned_one_refused(
    kafka: KafkaTarget, topic_name: str, tmp_path: Path, pki: Pki
) -> None:
    fresh = (f"{topic_name}.new.audit", f"{topic_name}.new.dlq")
    settings = support.settings_for(tmp_path / "a", *fresh, pki)
    async with support.running(settings, bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki) as log:
        assert (await _json(log, "auditor", "/healthz"))["size"] == 0
    assert await partitions_of(kafka.bootstrap, fresh[0]) == [0]
    split = f"{topic_name}.split.audit"
    await ensure_topics(kafka.bootstrap, [TopicSpec(split, 2)])
    with pytest.raises(ConfigurationError, match="exactly one partition"):
        async with support.running(support.settings_for(tmp_path / "b", split, fresh[1], pki),
                                   bootstrap=kafka.bootstrap, signer=SIGNER, pki=pki):  # fmt: skip
            pass
