"""The publisher killed with SIGKILL in the middle of a batch, again and again; the archivist's client re-runs and
resumes. Nothing acknowledged is lost, nothing is published twice, and an envelope Kafka acknowledged just before
the kill is recognised at the next start (read back from Kafka and marked), not sent again."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest

from services.cli.publish import Outcome
from services.shared.local_kafka import LocalKafka
from tests.faults.conftest import runs
from tests.faults.harness import Hub, PublisherProcess, Row, audit, publish, publish_until_done, until

pytestmark = pytest.mark.kafka
CONCURRENCY = 6


def _confirmed(into: list[Outcome], outcome: Outcome) -> None:
    if outcome.status != "failed":
        into.append(outcome)


def _grown(confirmed: list[Outcome], before: int, client: asyncio.Task[list[Outcome]]) -> bool:
    return len(confirmed) >= before + 12 or client.done()


async def test_publisher_killed_mid_batch_resumes_with_nothing_lost_or_published_twice(
    fault_broker: LocalKafka, tmp_path: Path, report: list[Row]
) -> None:
    hub = await Hub.create(fault_broker.bootstrap, tmp_path / "hub")
    data, journal = tmp_path / "data", tmp_path / "batch.journal"
    kills = runs(3)
    entries = hub.items(tmp_path / "files", "kill", 20 * (kills + 1))
    row = Row("publisher SIGKILL mid-batch, the client re-runs and resumes",
              note=f"{len(entries)} items x {len(hub.jurisdictions)} jurisdictions; at risk = requests in flight at "
                   "the kill")  # fmt: skip
    confirmed: list[Outcome] = []
    for k in range(kills):
        publisher = PublisherProcess(hub, data, name=f"publisher-{k}")
        await publisher.start()
        client = asyncio.create_task(publish(publisher.url, entries, journal, concurrency=CONCURRENCY,
                                             on_done=functools.partial(_confirmed, confirmed)))  # fmt: skip
        await until("a part of the batch confirmed", 120, functools.partial(_grown, confirmed, len(confirmed), client))
        remaining = len(entries) - len({o.item_id for o in confirmed})
        await publisher.kill()
        row.runs += 1
        row.at_risk += min(CONCURRENCY, remaining)
        await asyncio.wait_for(client, 60)
    publisher = PublisherProcess(hub, data, name="publisher-last")
    await publisher.start()
    try:
        outcomes = await publish_until_done(publisher.url, entries, journal)
        assert all(o.status in ("published", "already-published") for o in outcomes)
    finally:
        assert await publisher.stop() == 0
    counted = await audit(hub)
    row.add_audit(hub, counted, [e.metadata.item_id for e in entries])
    report.append(row)
    assert counted.refused == 0
    row.assert_clean()
