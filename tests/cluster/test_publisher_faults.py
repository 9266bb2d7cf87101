"""Broker faults under the publisher, on the locked-down three-broker cluster (RF 3, min.insync.replicas 2).

The publisher runs as its own process (``python -m services.publisher``, Kafka principal ``publisher``) and an
archivist streams evidence to it over HTTP without pause, retrying each item with its Idempotency-Key until it is
acknowledged. Afterwards every acknowledged event is counted in its topic by an independent reader: lost,
duplicated (a second copy of an event, a redelivered envelope included), or acknowledged at an offset that holds
something else.

"Acknowledged only once on two replicas" is shown on the brokers' own disks: both followers of a partition are
frozen until the controller drops them from the in-sync replicas, so only the leader could still take a write, and
then the leader is killed; at that instant every acknowledged event must be in at least two brokers' log segments.
With the topic's ``min.insync.replicas`` and ``transaction.state.log.min.isr`` both lowered to 1 this fails (tried).
Lowering only the topic's is not enough (tried): the publisher acknowledges once its transaction commits, and the
commit needs the transaction log's in-sync replicas too.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiokafka.errors import KafkaError

from services.shared.local_cluster import LocalCluster
from tests.cluster.harness import (
    Acked,
    ClusterHub,
    Row,
    Streamer,
    count,
    in_sync,
    partitions,
    publish,
    read_topic,
    replica_logs,
    replicas_holding,
    runs,
)
from tests.waiting import Bounded, until

pytestmark = pytest.mark.kafka


@asynccontextmanager
async def streaming(streamer: Streamer) -> AsyncIterator[Streamer]:
    """Stream during the block; after it, let every item started be acknowledged (bounded). If the block failed,
    the stream is cancelled at once (the failure is the story, not the stream)."""
    task = asyncio.create_task(streamer.run())
    try:
        yield streamer
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    streamer.stop()
    await asyncio.wait_for(task, 300)


async def test_partition_leaders_killed_while_publishing_every_ack_is_on_two_replicas_and_in_its_topic_once(
    healthy: LocalCluster, tmp_path: Path, report: list[Row]
) -> None:
    cluster = healthy
    hub = await ClusterHub.create(cluster, tmp_path)
    topic = hub.topics[0]
    row = Row("partition leader SIGKILLed while the publisher streams; once after freezing both followers")
    async with hub.publisher() as url, streaming(Streamer(url, hub.jurisdictions, "kill")) as streamer:
        await streamer.wait_acked(10, within_s=90)
        for n in range(runs(2)):  # the plain failover: the leader dies, an in-sync follower takes over
            leader = (await partitions(cluster, topic))[n % 3]["leader"]
            row.at_risk += len(streamer.in_flight)
            cluster.kill(leader)
            row.faults += 1
            await streamer.wait_acked(10, within_s=120)  # publishing goes on with two brokers
            await asyncio.to_thread(cluster.restart, leader)
            await in_sync(cluster)

        for n in range(runs(1)):  # only the leader could still take a write: then it dies
            leader = (await partitions(cluster, topic))[(n + 2) % 3]["leader"]
            followers = [b for b in cluster.broker_ids if b != leader]
            for follower in followers:
                cluster.freeze(follower)
            row.faults += len(followers)

            async def alone(leader: int = leader) -> bool:
                try:  # the admin client may pick a frozen broker: ask again
                    parts = await partitions(cluster, topic, via=leader)
                except KafkaError:
                    return False
                return all(p["isr"] == [leader] for p in parts.values())

            await until("the controller fences both frozen followers", 90, alone, every=1.0)
            acked, refused = len(streamer.acked), len(streamer.unavailable)

            # A write the leader alone took would be acknowledged now; the hub refuses it (503).
            def answered(a: int = acked, r: int = refused) -> bool:
                return len(streamer.unavailable) > r or len(streamer.acked) > a + 2

            await until("an answer to a publication after the shrink", 90, answered)
            row.at_risk += len(streamer.in_flight)
            cluster.kill(leader)
            row.faults += 1
            logs = {b: replica_logs(cluster, b, topic) for b in cluster.broker_ids}
            under = [f"{item.item_id}@{offset}: {held} replica(s)" for item in list(streamer.acked.values())
                     for offset, held in replicas_holding(logs, item, topic).items() if held < 2]  # fmt: skip
            assert under == [], f"acknowledged on fewer than two replicas: {under[:5]}"
            for follower in followers:
                cluster.thaw(follower)
            await asyncio.to_thread(cluster.restart, leader)
            await in_sync(cluster)
            await streamer.wait_acked(10, within_s=180)  # and publishing resumes by itself
    found = await count(hub, streamer.acked)
    row.acknowledged, row.lost, row.duplicated = len(streamer.acked), len(found.lost), found.duplicated
    row.note = (f"{len(streamer.unavailable)} answers were 503 during the faults and retried with the same "
                "Idempotency-Key; every acknowledged event was on ≥ 2 brokers' disks when its leader died")  # fmt: skip
    report.append(row)
    assert found.lost == [], found.lost[:5]
    assert found.misplaced == [], found.misplaced[:5]
    assert found.duplicated == 0
    assert found.refused == 0
    assert found.acked > 30


async def test_two_of_three_brokers_killed_publishing_stops_with_a_clear_503_and_resumes_by_itself(
    healthy: LocalCluster, tmp_path: Path, report: list[Row]
) -> None:
    cluster = healthy
    hub = await ClusterHub.create(cluster, tmp_path)
    topic = hub.topics[0]
    row = Row("two of three brokers SIGKILLed, then one restarted")
    async with hub.publisher() as url, aiohttp.ClientSession() as session:
        before = [await publish(session, url, f"before-{i}", hub.jurisdictions) for i in range(runs(5))]
        assert {status for status, _ in before} == {201}
        held = len(await read_topic(cluster, topic))
        survivor, *killed = cluster.broker_ids
        for broker in killed:
            cluster.kill(broker)
        row.faults += len(killed)

        seen: dict[int, dict[str, object]] = {}

        async def shrunk() -> bool:  # the controller fenced both and dropped them from every in-sync set
            try:
                seen.update(await partitions(cluster, topic, via=survivor))
            except KafkaError:
                return False
            return all(p["isr"] == [survivor] and p["leader"] == survivor for p in seen.values())

        try:  # the survivor must also lead every partition, or even reading the topic has nowhere to go
            await until("the controller drops the dead brokers from the in-sync replicas", 60, shrunk, every=1.0)
        except Bounded as exc:
            state = [(p["leader"], p["isr"]) for p in seen.values()]
            raise Bounded(f"{exc}; (leader, isr) per partition: {state}") from None

        during = []
        for i in range(runs(3)):
            async with asyncio.timeout(60):
                status, problem = await publish(session, url, f"during-{i}", hub.jurisdictions)
            during.append(f"during-{i}")
            row.at_risk += 1
            assert status == 503, problem
            assert "not enough in-sync replicas" in problem["detail"], problem["detail"]
            assert problem["kafka_shortfall"], problem
        await asyncio.to_thread(cluster.restart, killed[0])  # one broker back: two in sync again, as min ISR asks

        # Read back only now: with one replica in sync, a partition whose leadership moved to the survivor was seen
        # unreadable (ListOffsets answered LeaderNotAvailable for over 180 s) until a second broker returned
        async def read_back() -> tuple[int] | None:
            try:
                return (len(await read_topic(cluster, topic)),)
            except KafkaError:
                return None

        (after_outage,) = await until("the topic is readable again", 180, read_back, every=1.0)
        assert after_outage == held  # the refused publications wrote nothing, so nothing was acknowledged

        for item in during:  # the archivist's retry is answered without any restart of the publisher

            async def accepted(item: str = item) -> bool:
                status, _ = await publish(session, url, item, hub.jurisdictions)
                return status in (200, 201)

            await until(f"{item} accepted once a broker is back", 120, accepted, every=1.0)
        after = [await publish(session, url, f"after-{i}", hub.jurisdictions) for i in range(runs(5))]
        assert {status for status, _ in after} == {201}
        await asyncio.to_thread(cluster.restart, killed[1])
        acked = {}
        for item in [f"before-{i}" for i in range(runs(5))] + during + [f"after-{i}" for i in range(runs(5))]:
            status, body = await publish(session, url, item, hub.jurisdictions)  # replayed: 200 with the original
            assert status == 200, body
            acked[item] = Acked.of(item, body)
    found = await count(hub, acked)
    row.acknowledged, row.lost, row.duplicated = len(acked), len(found.lost), found.duplicated
    row.note = ("while two were down each publication was refused at once with a 503 naming the partitions short of "
                "in-sync replicas, nothing stored or signed; retries succeeded once one broker was back")  # fmt: skip
    report.append(row)
    assert (found.lost, found.misplaced, found.duplicated, found.refused) == ([], [], 0, 0)


async def test_a_rolling_restart_of_every_broker_and_controller_under_load_loses_and_duplicates_nothing(
    healthy: LocalCluster, tmp_path: Path, report: list[Row]
) -> None:
    cluster = healthy
    hub = await ClusterHub.create(cluster, tmp_path)
    row = Row("rolling restart (SIGTERM, start, back in sync) of brokers 1-3 and controllers 101-103 under load")
    async with hub.publisher() as url, streaming(Streamer(url, hub.jurisdictions, "roll")) as streamer:
        await streamer.wait_acked(10, within_s=90)
        for _ in range(runs(1)):
            for node in [*cluster.broker_ids, *cluster.controller_ids]:
                row.at_risk += len(streamer.in_flight)
                await asyncio.to_thread(cluster.node(node).stop)  # a clean shutdown hands its leaderships over first
                row.faults += 1
                await streamer.wait_acked(5, within_s=120)  # publishing goes on without it
                await asyncio.to_thread(cluster.restart, node)
                await in_sync(cluster)
        await streamer.wait_acked(10, within_s=120)
    found = await count(hub, streamer.acked)
    row.acknowledged, row.lost, row.duplicated = len(streamer.acked), len(found.lost), found.duplicated
    row.note = f"{len(streamer.unavailable)} answers were 503 and retried with the same Idempotency-Key"
    report.append(row)
    assert (found.lost, found.misplaced, found.duplicated, found.refused) == ([], [], 0, 0)
    assert found.acked > 30
