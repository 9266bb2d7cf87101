"""The publisher killed with SIGKILL in the middle of a batch, again and again; the archivist's client re-runs and
resumes. Nothing acknowledged is lost, nothing is published twice, and an envelope Kafka acknowledged just before
the kill is recognised at the next start (read back from Kafka and marked), not sent again."""

from __future__ import annotations

import asyncio
import functools
import json
from pathlib import Path

import pytest

from services.cli.publish import Outcome
from services.shared.local_kafka import LocalKafka
from tests.faults.conftest import runs
from tests.faults.harness import Hub, PublisherProcess, Row, audit, publish, publish_until_done
from tests.publisher.samples import metadata, png
from tests.waiting import until

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
        assert await publisher.stop() == 0, publisher.output()[-3000:]
    counted = await audit(hub)
    row.add_audit(hub, counted, [e.metadata.item_id for e in entries])
    report.append(row)
    assert counted.refused == 0
    row.assert_clean()


async def test_temporary_files_of_uploads_killed_mid_way_are_removed_at_the_next_start(
    fault_broker: LocalKafka, tmp_path: Path, report: list[Row]
) -> None:
    """Before: 27 MB of temporary files stayed in the content store after 3 kills during 64 MB uploads."""
    hub = await Hub.create(fault_broker.bootstrap, tmp_path / "hub")
    data = tmp_path / "data"
    temporary = data / "content" / "tmp"
    left = 0
    for k in range(runs(2)):
        publisher = PublisherProcess(hub, data, name=f"publisher-{k}")
        await publisher.start()
        assert "UNSAFE" in publisher.output(), "plain HTTP is announced loudly at start"
        meta = json.dumps(metadata(f"big-{k}", hub.jurisdictions))
        head = (f"--b\r\nContent-Disposition: form-data; name=\"metadata\"\r\nContent-Type: application/json\r\n\r\n"
                f"{meta}\r\n--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"v.png\"\r\n"
                "Content-Type: application/octet-stream\r\n\r\n").encode()  # fmt: skip
        _, writer = await asyncio.open_connection("127.0.0.1", publisher.port)
        writer.write(
            f"POST /v1/evidence HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            f"Content-Length: {len(head) + (64 << 20)}\r\n\r\n".encode()
            + head
            + png(seed=k)
            + bytes(8 << 20)
        )
        await writer.drain()
        await until("the upload is being stored", 30, lambda: any(temporary.iterdir()))
        await publisher.kill()
        writer.close()
        left += len(list(temporary.iterdir()))
    assert left > 0, "a kill mid-upload leaves its temporary file (what the start must clean)"
    publisher = PublisherProcess(hub, data, name="publisher-after")
    await publisher.start()
    assert list(temporary.iterdir()) == [], "removed at start"
    assert await publisher.stop() == 0, publisher.output()[-3000:]
    report.append(
        Row(
            "publisher SIGKILL during large uploads (temporary files)",
            runs=runs(2),
            note=f"{left} temporary files left by the kills, all removed at the next start",
        )
    )
