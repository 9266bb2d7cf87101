"""The broker under the publisher: killed with SIGKILL and restarted on its data, and stopped (SIGSTOP) for longer
than the delivery timeout — with and without a SIGTERM to the publisher during the outage.

What a user sees: requests are answered within the delivery timeout — a 503 naming the jurisdictions not yet
acknowledged — instead of hanging for as long as the outage lasts; ``/healthz`` keeps answering and ``/readyz``
says not ready; SIGTERM during the outage stops the publisher within its grace period; once Kafka is back the
outbox finishes, the client's re-run completes, and nothing is lost, published twice or signed twice."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from services.cli.manifest import Entry
from services.cli.publish import Outcome
from services.shared.local_kafka import LocalKafka
from tests.faults.conftest import runs
from tests.faults.harness import Hub, PublisherProcess, Row, audit, publish, publish_until_done
from tests.waiting import Bounded, until

pytestmark = pytest.mark.kafka
STOP_S = float(os.environ.get("EVHUB_FAULT_STOP_S", "8"))  # longer than the suite's delivery timeout (3 s)


def _confirmed(into: list[Outcome], outcome: Outcome) -> None:
    if outcome.status != "failed":
        into.append(outcome)


def _grown(confirmed: list[Outcome], before: int, client: asyncio.Task[list[Outcome]]) -> bool:
    return len(confirmed) >= before + 6 or client.done()


async def test_broker_killed_and_restarted_on_its_data_loses_nothing(
    fault_broker: LocalKafka, tmp_path: Path, report: list[Row]
) -> None:
    hub = await Hub.create(fault_broker.bootstrap, tmp_path / "hub")
    publisher = PublisherProcess(hub, tmp_path / "data", name="publisher")
    await publisher.start()
    kills = runs(2)
    entries = hub.items(tmp_path / "files", "bkill", 15 * (kills + 1))
    journal = tmp_path / "batch.journal"
    row = Row("broker SIGKILL mid-batch, restarted on the same data and address",
              note="the publisher keeps running; at risk = items not confirmed when the broker died")  # fmt: skip
    confirmed: list[Outcome] = []
    for _ in range(kills):
        client = asyncio.create_task(publish(publisher.url, entries, journal, concurrency=4,
                                             on_done=functools.partial(_confirmed, confirmed)))  # fmt: skip
        await until("a part of the batch confirmed", 120, functools.partial(_grown, confirmed, len(confirmed), client))
        row.at_risk += len(entries) - len({o.item_id for o in confirmed})
        fault_broker.signal(signal.SIGKILL)
        row.runs += 1
        await fault_broker.astart()  # same node.json: same data, same port (spawned from this thread:
        # the broker's parent-death signal follows the thread that forked it)
        await asyncio.wait_for(client, 120)
        assert publisher.proc is not None
        assert publisher.proc.poll() is None, "the publisher survives the broker's restart"
    try:
        await publish_until_done(publisher.url, entries, journal)
    finally:
        assert await publisher.stop() == 0, publisher.output()[-3000:]
    counted = await audit(hub)
    row.add_audit(hub, counted, [e.metadata.item_id for e in entries])
    report.append(row)
    # one full run found 32 item-topic events missing after the client had every item confirmed: show what the
    # publisher said, and what each topic holds, next time
    row.assert_clean(f"{counted.records} records, {counted.envelopes} envelopes, events per topic: "
                     f"{ {t: len(e) for t, e in counted.events.items()} }\n{publisher.output()[-4000:]}")  # fmt: skip


async def test_broker_stopped_longer_than_the_delivery_timeout_bounds_every_wait(
    fault_broker: LocalKafka, tmp_path: Path, report: list[Row]
) -> None:
    hub = await Hub.create(fault_broker.bootstrap, tmp_path / "hub")
    data = tmp_path / "data"
    publisher = PublisherProcess(hub, data, name="publisher")
    await publisher.start()
    row = Row(f"broker SIGSTOP for {STOP_S:g} s (delivery timeout 3 s), then SIGTERM to the publisher during a "
              "second stop", note="every request answered (503 naming the jurisdictions); /healthz answered "
              "throughout, /readyz 503; SIGTERM: exit 0 within the grace period")  # fmt: skip
    entries: list[Entry] = []
    for run in range(runs(1)):
        batch = hub.items(tmp_path / "files", f"stop{run}", 12)
        entries += batch
        fault_broker.signal(signal.SIGSTOP)
        stopped = time.monotonic()
        row.runs += 1
        try:
            outcomes = await asyncio.wait_for(publish(publisher.url, batch[:4], tmp_path / f"s{run}.journal"), 30)
            row.at_risk += len(batch[:4])
            unacknowledged = [o for o in outcomes if o.status == "failed"]
            assert unacknowledged, "nothing can be acknowledged while the broker is stopped"
            assert all("503" in o.error for o in unacknowledged), [o.error for o in unacknowledged]
            assert any("not yet delivered to" in o.error for o in unacknowledged), [o.error for o in outcomes]
            status, body = await publisher.get("/readyz")
            assert status == 503, body
            health, _ = await publisher.get("/healthz")  # answered (bounded by the client's 5 s timeout)
            assert health == 200
            # the fault's length, not a synchronisation: the broker stays stopped for STOP_S in all
            await asyncio.sleep(max(0.0, STOP_S - (time.monotonic() - stopped)))
        finally:
            fault_broker.signal(signal.SIGCONT)
        await until("ready again", 60, functools.partial(_ready, publisher))
        await publish_until_done(publisher.url, batch, tmp_path / f"s{run}.journal")

    # SIGTERM while Kafka does not answer: the publisher stops within its grace period (4 s) plus its producers'
    # bounded stop, and nothing it had signed is half-sent and half-marked: the next start reconciles.
    batch = hub.items(tmp_path / "files", "term", 6)
    entries += batch
    fault_broker.signal(signal.SIGSTOP)
    try:
        client = asyncio.create_task(publish(publisher.url, batch, tmp_path / "term.journal"))
        # signed and recorded, waiting for Kafka: the publisher knows the item, Kafka does not
        await until("a request in flight", 15, functools.partial(_recorded, publisher, batch[0].metadata.item_id))
        row.at_risk += len(batch)
        publisher.signal(signal.SIGTERM)
        terminated = time.monotonic()
        row.runs += 1
        try:
            code = await publisher.wait(20)
            row.note += f" (it took {time.monotonic() - terminated:.1f} s, grace 4 s)"
        except Bounded:
            pytest.fail(f"SIGTERM during an outage did not stop the publisher:\n{publisher.output()[-2000:]}")
        assert code == 0, publisher.output()[-2000:]
        await asyncio.wait_for(client, 30)
    finally:
        fault_broker.signal(signal.SIGCONT)
    publisher = PublisherProcess(hub, data, name="publisher-after")
    await publisher.start()
    try:
        await publish_until_done(publisher.url, entries, tmp_path / "all.journal")
    finally:
        assert await publisher.stop() == 0, publisher.output()[-3000:]
    counted = await audit(hub)
    row.add_audit(hub, counted, [e.metadata.item_id for e in entries])
    report.append(row)
    row.assert_clean()


async def _ready(publisher: PublisherProcess) -> bool:
    try:
        status, _ = await publisher.get("/readyz")
    except (aiohttp.ClientError, TimeoutError):  # not listening yet
        return False
    return status == 200


async def _recorded(publisher: PublisherProcess, item_id: str) -> bool:
    status, _ = await publisher.get(f"/v1/evidence/{item_id}")
    return status == 200


async def test_a_publisher_started_while_the_broker_is_stopped_waits_for_it_and_starts(
    fault_broker: LocalKafka, tmp_path: Path, report: list[Row]
) -> None:
    """Before: a start while the broker did not answer (or right after it resumed) exited on NodeNotReadyError."""
    hub = await Hub.create(fault_broker.bootstrap, tmp_path / "hub")
    publisher = PublisherProcess(hub, tmp_path / "data", name="publisher")
    fault_broker.signal(signal.SIGSTOP)
    try:
        publisher.spawn()
        # it is trying to reach Kafka, not giving up: still running after its first attempts failed
        await until("the first attempt fails", 30, lambda: "retrying" in publisher.output())
        assert publisher.proc is not None
        assert publisher.proc.poll() is None
    finally:
        fault_broker.signal(signal.SIGCONT)
    await until("ready once Kafka answers", 90, functools.partial(_ready, publisher))
    entries = hub.items(tmp_path / "files", "late", 3)
    await publish_until_done(publisher.url, entries, tmp_path / "late.journal")
    assert await publisher.stop() == 0, publisher.output()[-3000:]
    row = Row("publisher started while the broker is stopped, broker resumed", runs=1,
              note="the start retries until Kafka answers (bounded by the start-up timeout), then serves")  # fmt: skip
    row.add_audit(hub, await audit(hub), [e.metadata.item_id for e in entries])
    report.append(row)
    row.assert_clean()
