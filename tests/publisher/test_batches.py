"""Requests decided in one batch see each other: the same request twice is one event, two items get consecutive
sequence numbers, a correction follows the publication made just before it, and one refused request leaves the
others of its batch untouched. The batch is made deterministic by holding the committer's thread busy while the
requests queue up behind it."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import pytest

from services.publisher import state
from services.publisher.core import parse_metadata
from services.publisher.pipeline import ContentInfo, PublishResult
from services.shared.errors import Conflict
from services.shared.kafka import read_to_end
from tests.publisher.samples import metadata, png
from tests.publishing_stack import Stack

pytestmark = pytest.mark.kafka
T = TypeVar("T")


async def _content(stack: Stack, seed: int) -> ContentInfo:
    data = png(seed=seed)

    async def chunks() -> AsyncIterator[bytes]:
        yield data

    stored = await stack.store.put(chunks(), max_size=1 << 20)
    return ContentInfo(stored.sha256, stored.size, "image/png", f"frame-{seed}.png")


async def _one_batch(stack: Stack, *requests: Awaitable[T]) -> list[T | BaseException]:
    """Run ``requests`` so that they are decided in one batch: the committer's thread is held by a unit until
    every request has queued behind it."""
    release = threading.Event()

    def hold(conn: sqlite3.Connection) -> None:
        release.wait(30)

    held = stack.publisher.committer.submit(hold)
    tasks = [asyncio.ensure_future(r) for r in requests]
    for _ in range(20):  # let each request run up to its batch (no await in between but the batch's)
        await asyncio.sleep(0)
    batches_before = stack.publisher.batches
    release.set()
    await held
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert stack.publisher.batches - batches_before == 1, "the requests were decided together"
    return results


async def test_the_same_request_twice_in_one_batch_is_one_event(stack: Stack) -> None:
    meta = parse_metadata(metadata("SDG-BATCH-1", stack.jurisdictions))
    content = await _content(stack, 1)
    first, second = await _one_batch(
        stack, stack.publisher.publish(meta, content, idempotency_key="k1"),
        stack.publisher.publish(meta, content, idempotency_key="k1"),
    )  # fmt: skip
    assert isinstance(first, PublishResult)
    assert isinstance(second, PublishResult)
    assert (first.replayed, second.replayed) == (False, True)
    assert second.event_id == first.event_id
    assert [d.sequence for d in second.deliveries] == [d.sequence for d in first.deliveries]
    for jurisdiction in stack.jurisdictions:
        records = await read_to_end(stack.bootstrap, stack.topic(jurisdiction))
        assert len(records) == 1, f"{jurisdiction} got the event once"


async def test_items_of_one_batch_get_consecutive_sequence_numbers_and_a_refusal_stays_alone(stack: Stack) -> None:
    metas = [parse_metadata(metadata(f"SDG-BATCH-{n}", stack.jurisdictions)) for n in range(2, 6)]
    contents = [await _content(stack, n) for n in range(2, 6)]
    other = parse_metadata({**metadata("SDG-BATCH-2", stack.jurisdictions), "title": "something else"})
    results = await _one_batch(
        stack, *(stack.publisher.publish(m, c) for m, c in zip(metas[:2], contents[:2], strict=True)),
        stack.publisher.publish(other, contents[0]),  # same item and file, other metadata: a conflict
        *(stack.publisher.publish(m, c) for m, c in zip(metas[2:], contents[2:], strict=True)),
    )  # fmt: skip
    assert isinstance(results[2], Conflict), "the item was published earlier in the same batch"
    published = [r for r in results if isinstance(r, PublishResult)]
    assert len(published) == 4
    assert not any(r.replayed for r in published)
    for i, jurisdiction in enumerate(sorted(stack.jurisdictions)):
        assert [r.deliveries[i].sequence for r in published] == [1, 2, 3, 4], jurisdiction
    rows: Any = await stack.publisher.committer.run(lambda conn: state.pending(conn))
    assert rows == [], "everything was delivered; the refused request wrote nothing"


async def test_a_correction_follows_the_publication_made_earlier_in_its_batch(stack: Stack) -> None:
    meta = parse_metadata(metadata("SDG-BATCH-7", stack.jurisdictions))
    fixed = parse_metadata({**metadata("SDG-BATCH-7", stack.jurisdictions), "title": "corrected title"})
    content = await _content(stack, 7)
    first, second = await _one_batch(
        stack, stack.publisher.publish(meta, content),
        stack.publisher.correct("SDG-BATCH-7", fixed, content, idempotency_key="fix-1"),
    )  # fmt: skip
    assert isinstance(first, PublishResult)
    assert isinstance(second, PublishResult)
    assert (first.version, second.version) == (1, 2)
    status = await stack.publisher.status("SDG-BATCH-7")
    assert status["latest_version"] == 2
    assert [v["event_id"] for v in status["versions"]] == [first.event_id, second.event_id]


async def test_a_key_used_twice_in_one_batch_for_different_items_is_a_conflict(stack: Stack) -> None:
    metas = [parse_metadata(metadata(f"SDG-BATCH-{n}", stack.jurisdictions)) for n in (8, 9)]
    contents = [await _content(stack, n) for n in (8, 9)]
    first, second = await _one_batch(
        stack, *(stack.publisher.publish(m, c, idempotency_key="shared") for m, c in zip(metas, contents, strict=True))
    )  # fmt: skip
    assert isinstance(first, PublishResult)
    assert not first.replayed
    assert isinstance(second, Conflict)
    assert "Idempotency-Key" in second.detail
