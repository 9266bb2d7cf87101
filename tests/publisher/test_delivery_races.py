"""What the second review found: the relay racing requests, refused rows starving the relay, a unit that raises
something other than an Exception, a publish key reused for a correction, a file changed during upload."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.publisher import state
from services.publisher.committer import GroupCommitter
from services.publisher.core import parse_metadata
from services.publisher.pipeline import ContentInfo, PartialDelivery
from services.shared.content import LocalContentStore
from services.shared.errors import Conflict, DigestMismatch, StoreUnavailable
from services.shared.kafka import TopicSpec, ensure_topics, read_to_end
from services.shared.media import sniff
from services.shared.registry import issue
from tests.publisher.samples import metadata, png
from tests.publishing_stack import Stack, delete_topic


async def _content(stack: Stack, seed: int) -> ContentInfo:
    async def chunks() -> AsyncIterator[bytes]:
        yield png(seed=seed)

    stored = await stack.store.put(chunks(), max_size=1 << 20)
    return ContentInfo(sha256=stored.sha256, size=stored.size, media_type=sniff(stored.head), file_name="p.png")


@pytest.mark.kafka
async def test_the_relay_running_beside_requests_never_sends_an_envelope_twice(stack: Stack) -> None:
    stop = asyncio.Event()

    async def relay() -> None:
        while not stop.is_set():
            await stack.publisher.deliver_pending()
            await asyncio.sleep(0)

    relaying = asyncio.create_task(relay())
    try:
        contents = [await _content(stack, n) for n in range(150)]
        await asyncio.gather(*(
            stack.publisher.publish(parse_metadata(metadata(f"SDG-RACE-{n}", stack.jurisdictions)), c)
            for n, c in enumerate(contents)
        ))  # fmt: skip
    finally:
        stop.set()
        await relaying
    assert stack.outbox.stats()["records_sent"] == 150 * len(stack.jurisdictions), "each envelope sent once"
    for j in stack.jurisdictions:
        records = await read_to_end(stack.bootstrap, stack.topic(j))
        assert len(records) == 150
        assert len({r.value for r in records}) == 150


@pytest.mark.kafka
async def test_envelopes_of_a_revoked_key_are_abandoned_and_do_not_starve_the_relay(stack: Stack) -> None:
    topic = stack.topic(stack.jurisdictions[0])
    await delete_topic(stack.bootstrap, topic)
    contents = [await _content(stack, n) for n in range(3)]
    outcomes = await asyncio.gather(*(
        stack.publisher.publish(parse_metadata(metadata(f"SDG-ABANDON-{n}", stack.jurisdictions)), c)
        for n, c in enumerate(contents)
    ), return_exceptions=True)  # fmt: skip
    assert all(isinstance(o, PartialDelivery) for o in outcomes), outcomes
    stack.registry.apply(issue(stack.codec, stack.anchor, public_key=stack.signer.public,
                               organisation=stack.publisher.organisation,
                               not_before=stack.registry.entry(stack.signer.key_id).not_before,
                               revoked_at=datetime.now(UTC),
                               last_valid_sequences={topic: 0}, last_valid_sequence=10**9, revision=2))  # fmt: skip
    await ensure_topics(stack.bootstrap, [TopicSpec(topic, 3)])
    assert await stack.publisher.deliver_pending(limit=2) == 0
    assert await stack.publisher.deliver_pending(limit=2) == 0
    assert await stack.publisher.committer.run(lambda conn: state.pending(conn)) == [], "all three abandoned"
    assert await read_to_end(stack.bootstrap, topic) == [], "receivers would have refused them"


async def test_a_unit_raising_a_base_exception_fails_its_group_cleanly_and_the_committer_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    committer = GroupCommitter(state.connect(tmp_path / "s.sqlite3"))

    def write(conn: sqlite3.Connection) -> int:
        return state.next_sequence(conn, "k", "t")

    class Abort(BaseException):  # like KeyboardInterrupt, not an Exception — but it does not stop pytest
        pass

    def interrupted(conn: sqlite3.Connection) -> None:
        state.next_sequence(conn, "k", "t")
        raise Abort

    with pytest.raises(StoreUnavailable):
        await committer.submit(interrupted)
    assert await committer.run(write) == 1, "the group was rolled back, and the next one works"
    committer.close()


@pytest.mark.kafka
async def test_a_publish_key_reused_for_a_correction_is_a_conflict(stack: Stack) -> None:
    meta = parse_metadata(metadata("SDG-KEY-1", stack.jurisdictions))
    content = await _content(stack, 1)
    await stack.publisher.publish(meta, content, idempotency_key="same")
    with pytest.raises(Conflict, match="Idempotency-Key"):
        await stack.publisher.correct("SDG-KEY-1", meta, content, idempotency_key="same")


async def test_bytes_that_differ_from_the_announced_digest_are_not_kept(tmp_path: Path) -> None:
    store = LocalContentStore(tmp_path / "store")

    async def chunks() -> AsyncIterator[bytes]:
        yield png(seed=1)

    with pytest.raises(DigestMismatch):
        await store.put(chunks(), max_size=1 << 20, expected_sha256="0" * 64)
    assert [p for p in (tmp_path / "store").rglob("*") if p.is_file()] == []
