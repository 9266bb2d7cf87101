"""The follower of control topics on the real broker: replay to the end, follow, know how old its view is."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from services.shared.cluster import KafkaTarget
from services.shared.errors import NotFound, StaleView
from services.shared.follower import Record, TopicFollower
from services.shared.kafka import TopicSpec, ensure_topics, make_producer, read_to_end
from tests.publishing_stack import delete_topic

pytestmark = pytest.mark.kafka


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    producer = make_producer(bootstrap, client_id="test-follower")
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send_and_wait(topic, value, partition=i % 2)
    finally:
        await producer.stop()


async def test_replay_reads_to_the_end_seen_at_the_start_and_run_follows_what_comes_after(
    kafka: KafkaTarget, topic_name: str
) -> None:
    await ensure_topics(kafka.bootstrap, [TopicSpec(topic_name, 2)])
    await _produce(kafka.bootstrap, topic_name, [b"a", b"b", b"c"])
    seen: list[Record] = []
    follower = TopicFollower(bootstrap=kafka.bootstrap, topic=topic_name, client_id="t", on_record=seen.append)
    await follower.replay()
    assert sorted(r.value for r in seen) == [b"a", b"b", b"c"]
    assert follower.caught_up.is_set()

    seen.clear()
    following = TopicFollower(bootstrap=kafka.bootstrap, topic=topic_name, client_id="t", on_record=seen.append)
    task = asyncio.create_task(following.run())
    try:
        await asyncio.wait_for(following.caught_up.wait(), 20)
        await _produce(kafka.bootstrap, topic_name, [b"d", b"e"])
        async with asyncio.timeout(20):
            while len(seen) < 5:  # noqa: ASYNC110 - polling a plain list the follower appends to
                await asyncio.sleep(0.05)
        assert sorted(r.value for r in seen) == [b"a", b"b", b"c", b"d", b"e"]
        following.check_fresh(10.0)  # following an answering cluster: the view is current
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [r.value for r in await read_to_end(kafka.bootstrap, topic_name)] == [b"a", b"c", b"d", b"b", b"e"]


async def test_a_view_that_stops_being_confirmed_becomes_stale(kafka: KafkaTarget, topic_name: str) -> None:
    """The topic disappears under a running follower: fetches stop being answered, so its view ages and a caller
    with a bound refuses to act on it."""
    await ensure_topics(kafka.bootstrap, [TopicSpec(topic_name, 1)])
    follower = TopicFollower(bootstrap=kafka.bootstrap, topic=topic_name, client_id="t", on_record=lambda r: None)
    with pytest.raises(StaleView, match="still being replayed"):
        follower.check_fresh(60)
    task = asyncio.create_task(follower.run())
    try:
        await asyncio.wait_for(follower.caught_up.wait(), 20)
        follower.check_fresh(30)
        await delete_topic(kafka.bootstrap, topic_name)
        async with asyncio.timeout(30):
            while (age := follower.age()) is not None and age <= 1.0:  # noqa: ASYNC110 - a clock, not an event
                await asyncio.sleep(0.1)
        with pytest.raises(StaleView, match="s old"):
            follower.check_fresh(1.0)
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def test_a_missing_topic_is_not_found(kafka: KafkaTarget, topic_name: str) -> None:
    follower = TopicFollower(bootstrap=kafka.bootstrap, topic=topic_name, client_id="t", on_record=lambda r: None)
    with pytest.raises(NotFound):
        await follower.replay()
