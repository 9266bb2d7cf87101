"""Publishing through the library path against the real broker: what lands in Kafka, verified independently."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import avro.io
import avro.schema
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.publisher.core import parse_metadata
from services.publisher.pipeline import ContentInfo, PartialDelivery, PublishResult
from services.shared import disclosure
from services.shared.avro import SCHEMA_DIR
from services.shared.envelope import open_envelope, pae
from services.shared.errors import Conflict, NotFound, UntrustedKey, ValidationFailed
from services.shared.kafka import TopicSpec, ensure_topics, read_to_end
from services.shared.media import sniff
from services.shared.registry import issue
from services.shared.sequences import SequenceTracker
from tests.publisher.samples import metadata, png
from tests.publishing_stack import Stack, delete_topic

pytestmark = pytest.mark.kafka


async def _store(stack: Stack, data: bytes, name: str = "frame-14.png") -> ContentInfo:
    async def chunks() -> AsyncIterator[bytes]:
        yield data

    stored = await stack.store.put(chunks(), max_size=1 << 20)
    return ContentInfo(sha256=stored.sha256, size=stored.size, media_type=sniff(stored.head), file_name=name)


async def _publish(stack: Stack, item: str, data: bytes, **kw: Any) -> PublishResult:
    meta = parse_metadata(metadata(item, stack.jurisdictions))
    return await stack.publisher.publish(meta, await _store(stack, data), **kw)


def _apache_decode(schema_file: str, single_object: bytes) -> Any:
    """Decode with the Apache avro package: a second implementation, independent of fastavro."""
    assert single_object[:2] == b"\xc3\x01"
    schema = avro.schema.parse((SCHEMA_DIR / schema_file).read_text())
    reader = avro.io.DatumReader(schema)
    return reader.read(avro.io.BinaryDecoder(io.BytesIO(single_object[10:])))


async def test_published_event_verifies_with_only_the_public_key_and_a_second_avro_implementation(
    stack: Stack,
) -> None:
    data = png(seed=3)
    result = await _publish(stack, "SDG-PHOTO-000227-14", data)
    assert result.complete
    assert result.version == 1
    assert [d.jurisdiction for d in result.deliveries] == sorted(stack.jurisdictions)

    public = Ed25519PublicKey.from_public_bytes(stack.signer.public.raw)  # nothing of the hub's code
    for delivery in result.deliveries:
        records = await read_to_end(stack.bootstrap, delivery.topic)
        assert len(records) == 1
        assert records[0].key == b"CASE-2012-DAMASCUS-227"
        assert (records[0].partition, records[0].offset) == (delivery.partition, delivery.offset)
        envelope = _apache_decode("signed_envelope.avsc", records[0].value)
        (sig,) = envelope["signatures"]
        assert sig["key_id"] == stack.signer.key_id
        assert sig["sequence"] == 1
        public.verify(sig["sig"], pae(envelope["payload_type"], delivery.topic, sig["key_id"], 1, envelope["payload"]))
        event = _apache_decode("evidence_event.avsc", envelope["payload"])
        assert event["event_id"] == result.event_id
        assert event["jurisdiction"] == delivery.jurisdiction
        assert event["content"][0]["sha256"] == result.content.sha256 if result.content else False
        assert event["content"][0]["media_type"] == "image/png"
        assert event["content"][0]["size"] == len(data)
        assert [c["action"] for c in event["custody"]] == ["copied to encrypted drive", "ingested and hashed"]
        # protected values are not in the signed payload, only their digests; disclosures carry them
        assert b"A. K." not in envelope["payload"]
        revealed = disclosure.reveal(envelope["disclosures"], event["protected"])
        assert revealed["witness.name"].value == "A. K."
        assert revealed["location.exact"].label == "LOCATION_EXACT"


async def test_the_hub_verifier_accepts_every_record_and_sees_no_gaps(stack: Stack) -> None:
    for i in range(5):
        await _publish(stack, f"SDG-DOC-{i}", png(seed=i))
    tracker = SequenceTracker()
    for j in stack.jurisdictions:
        topic = stack.topic(j)
        for record in await read_to_end(stack.bootstrap, topic):
            verified = open_envelope(stack.codec, record.value, topic=topic, keys=stack.registry)
            assert tracker.observe(verified.key_id, topic, verified.sequence, record.value)
    assert tracker.gaps() == {}


async def test_repeating_a_request_returns_the_original_and_publishes_nothing_twice(stack: Stack) -> None:
    first = await _publish(stack, "SDG-PHOTO-1", png(seed=1), idempotency_key="upload-1")
    again = await _publish(stack, "SDG-PHOTO-1", png(seed=1), idempotency_key="upload-1")
    without_key = await _publish(stack, "SDG-PHOTO-1", png(seed=1))
    assert not first.replayed
    assert again.replayed
    assert again.event_id == first.event_id
    assert again.deliveries == first.deliveries
    assert without_key.event_id == first.event_id, "same item id + content digest is the same publication"
    for j in stack.jurisdictions:
        assert len(await read_to_end(stack.bootstrap, stack.topic(j))) == 1


async def test_reusing_a_key_or_an_item_id_for_something_else_is_a_conflict(stack: Stack) -> None:
    await _publish(stack, "SDG-PHOTO-2", png(seed=2), idempotency_key="k")
    with pytest.raises(Conflict, match="Idempotency-Key"):
        await _publish(stack, "SDG-PHOTO-3", png(seed=3), idempotency_key="k")
    with pytest.raises(Conflict, match="send a correction"):
        await _publish(stack, "SDG-PHOTO-2", png(seed=99))


async def test_unknown_jurisdiction_is_refused_before_anything_is_written(stack: Stack) -> None:
    meta = parse_metadata(metadata("SDG-X", [stack.jurisdictions[0], "XX-NOWHERE"]))
    with pytest.raises(ValidationFailed) as caught:
        await stack.publisher.publish(meta, await _store(stack, png()))
    assert caught.value.extensions["errors"][0]["field"] == "jurisdictions.1"
    assert await read_to_end(stack.bootstrap, stack.topic(stack.jurisdictions[0])) == []


async def test_partial_delivery_says_which_jurisdictions_failed_and_a_retry_completes_without_duplicates(
    stack: Stack,
) -> None:
    missing = stack.topic(stack.jurisdictions[2])
    await delete_topic(stack.bootstrap, missing)
    with pytest.raises(PartialDelivery) as caught:
        await _publish(stack, "SDG-VIDEO-9", png(seed=9), idempotency_key="video-9")
    failed = [d.jurisdiction for d in caught.value.result.deliveries if not d.delivered]
    assert failed == [stack.jurisdictions[2]]
    assert caught.value.http_status == 503
    assert caught.value.extensions["complete"] is False
    await ensure_topics(stack.bootstrap, [TopicSpec(missing, 3)])
    retried = await _publish(stack, "SDG-VIDEO-9", png(seed=9), idempotency_key="video-9")
    assert retried.complete
    assert retried.event_id == caught.value.result.event_id
    for j in stack.jurisdictions:
        records = await read_to_end(stack.bootstrap, stack.topic(j))
        assert len(records) == 1, f"{j} must hold exactly one copy"


async def test_outbox_relay_delivers_what_a_failed_request_left_behind(stack: Stack) -> None:
    missing = stack.topic(stack.jurisdictions[0])
    await delete_topic(stack.bootstrap, missing)
    with pytest.raises(PartialDelivery):
        await _publish(stack, "SDG-AUDIO-1", png(seed=5))
    await ensure_topics(stack.bootstrap, [TopicSpec(missing, 3)])
    assert await stack.publisher.deliver_pending() == 1
    assert await stack.publisher.deliver_pending() == 0
    assert len(await read_to_end(stack.bootstrap, missing)) == 1


async def test_correction_names_the_version_it_replaces_and_withdrawal_reaches_every_jurisdiction(
    stack: Stack,
) -> None:
    first = await _publish(stack, "SDG-DOC-7", png(seed=7))
    meta = parse_metadata(metadata("SDG-DOC-7", stack.jurisdictions, title="Corrected title"))
    second = await stack.publisher.correct("SDG-DOC-7", meta, await _store(stack, png(seed=7)), idempotency_key="c1")
    assert second.version == 2
    withdrawn = await stack.publisher.withdraw("SDG-DOC-7", "consent withdrawn by the witness")
    assert {d.jurisdiction for d in withdrawn.deliveries} == set(stack.jurisdictions)

    de = stack.topic(stack.jurisdictions[0])
    records = await read_to_end(stack.bootstrap, de)
    kinds = [open_envelope(stack.codec, r.value, topic=de, keys=stack.registry) for r in records]
    events = {v.schema: v.record for v in kinds if v.schema == "evidence_withdrawal"}
    versions = sorted(
        (v.record["version"], v.record["replaces_event_id"]) for v in kinds if v.schema == "evidence_event"
    )
    assert versions == [(1, None), (2, first.event_id)]
    assert events["evidence_withdrawal"]["reason"] == "consent withdrawn by the witness"
    status = await stack.publisher.status("SDG-DOC-7")
    assert status["latest_version"] == 2
    assert status["withdrawn_at"] is not None
    again = await stack.publisher.correct("SDG-DOC-7", meta, await _store(stack, png(seed=7)), idempotency_key="c1")
    assert again.replayed, "repeating the earlier correction is idempotent even after the withdrawal"
    newer = parse_metadata(metadata("SDG-DOC-7", stack.jurisdictions, title="A third title"))
    with pytest.raises(Conflict, match="withdrawn"):
        await stack.publisher.correct("SDG-DOC-7", newer, await _store(stack, png(seed=7)), idempotency_key="c2")
    with pytest.raises(Conflict, match="already withdrawn"):
        await stack.publisher.withdraw("SDG-DOC-7", "another reason")
    with pytest.raises(NotFound):
        await stack.publisher.withdraw("SDG-NOPE", "x")


async def test_a_correction_back_to_an_earlier_text_is_a_new_version(stack: Stack) -> None:
    await _publish(stack, "SDG-DOC-8", png(seed=8))
    x = parse_metadata(metadata("SDG-DOC-8", stack.jurisdictions, title="Text X"))
    y = parse_metadata(metadata("SDG-DOC-8", stack.jurisdictions, title="Text Y"))
    content = await _store(stack, png(seed=8))
    versions = [(await stack.publisher.correct("SDG-DOC-8", m, content, idempotency_key=k)).version
                for m, k in ((x, "k1"), (y, "k2"), (x, "k3"))]  # fmt: skip
    assert versions == [2, 3, 4]
    with pytest.raises(ValidationFailed, match="Idempotency-Key"):
        await stack.publisher.correct("SDG-DOC-8", y, content)


async def test_a_correction_may_not_leave_a_jurisdiction_on_an_old_version(stack: Stack) -> None:
    await _publish(stack, "SDG-DOC-9", png(seed=9))
    narrower = parse_metadata(metadata("SDG-DOC-9", stack.jurisdictions[:1], title="Only DE"))
    with pytest.raises(Conflict, match="would keep version 1 as current"):
        await stack.publisher.correct("SDG-DOC-9", narrower, await _store(stack, png(seed=9)), idempotency_key="n")
    assert (await stack.publisher.status("SDG-DOC-9"))["latest_version"] == 1


async def test_new_metadata_for_a_published_file_says_to_send_a_correction(stack: Stack) -> None:
    await _publish(stack, "SDG-DOC-10", png(seed=10))
    changed = parse_metadata(metadata("SDG-DOC-10", stack.jurisdictions, title="Fixed title"))
    with pytest.raises(Conflict, match="send a correction"):
        await stack.publisher.publish(changed, await _store(stack, png(seed=10)))


async def test_publishing_with_a_revoked_or_expired_key_is_refused_and_writes_nothing(stack: Stack) -> None:
    now, org = datetime.now(UTC), stack.publisher.organisation
    since = stack.registry.entry(stack.signer.key_id).not_before  # a newer revision keeps the key's start
    stack.registry.apply(issue(stack.codec, stack.anchor, public_key=stack.signer.public, organisation=org,
                               not_before=since, revoked_at=now, last_valid_sequence=0, revision=2))  # fmt: skip
    with pytest.raises(UntrustedKey, match="revoked"):
        await _publish(stack, "SDG-R", png())
    stack.registry.apply(issue(stack.codec, stack.anchor, public_key=stack.signer.public, organisation=org,
                               not_before=since, not_after=now - timedelta(hours=1), revision=3))  # fmt: skip
    with pytest.raises(UntrustedKey, match="expired"):
        await _publish(stack, "SDG-R", png())
    for j in stack.jurisdictions:
        assert await read_to_end(stack.bootstrap, stack.topic(j)) == []


async def test_the_feed_check_counts_redeliveries_and_refusals_and_never_stops_on_a_junk_record(stack: Stack) -> None:
    from services.cli.demo import check_feed
    from services.shared.kafka import make_producer

    first = await _publish(stack, "SDG-FEED-1", png(seed=1))
    await _publish(stack, "SDG-FEED-2", png(seed=2))
    topic = first.deliveries[0].topic
    (record, *_) = await read_to_end(stack.bootstrap, topic)
    producer = make_producer(stack.bootstrap, client_id="test-feed")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"not an envelope", key=b"x")  # junk in an evidence topic
        await producer.send_and_wait(topic, record.value, key=record.key)  # an at-least-once redelivery
    finally:
        await producer.stop()
    check = await check_feed(stack.codec, stack.bootstrap, topic, stack.registry, SequenceTracker())
    assert (check.records, check.verified, check.redelivered, check.refused, check.replayed) == (4, 2, 1, 1, 0)
    assert check.gaps == 0
