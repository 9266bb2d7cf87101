"""Two publishers with one signing key. On one data directory the second is refused (the directory's lock). On two
("two machines") both start, but the key's fence in Kafka lets only one deliver at a time, and whichever takes the
fence back reads what the other published and stops (exit 5): nothing is ever signed twice. Before the fence and
the start-up check, both ran and numbered from 1, interleaving sequence numbers."""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import pytest

from services.shared.local_kafka import LocalKafka
from tests.faults.conftest import runs
from tests.faults.harness import Hub, PublisherProcess, Row, audit, publish, publish_until_done
from tests.waiting import until

pytestmark = pytest.mark.kafka


async def test_a_second_publisher_on_the_same_key_is_refused_or_fenced_and_nothing_is_signed_twice(
    fault_broker: LocalKafka, tmp_path: Path, report: list[Row]
) -> None:
    row = Row("a second publisher process on the same key: same data directory, then another one",
              note="same directory: refused (exit 5, names the holder's pid); another directory: the one that "
                   "loses the key's fence stops (exit 5); the other completes every item")  # fmt: skip
    published: list[str] = []
    hub = await Hub.create(fault_broker.bootstrap, tmp_path / "hub")
    for run in range(runs(1)):
        first = PublisherProcess(hub, tmp_path / f"a{run}", name=f"first-{run}")
        await first.start()
        intruder = PublisherProcess(hub, tmp_path / f"a{run}", name=f"same-dir-{run}")
        code, line = await intruder.refused()
        row.runs += 1
        assert code == 5, line
        assert f"in use by another publisher (pid {first.pid})" in line, line

        second = PublisherProcess(hub, tmp_path / f"b{run}", name=f"second-{run}")
        await second.start()  # takes the key's fence on every topic from the first
        row.runs += 1
        pair = (first, second)
        items = {p: hub.items(tmp_path / "files", f"{p.name}", 12) for p in pair}
        outcomes = await asyncio.gather(*(
            publish(p.url, entries, tmp_path / f"{p.name}.journal") for p, entries in items.items()
        ))  # fmt: skip
        row.at_risk += sum(o.status == "failed" for result in outcomes for o in result)
        # whichever lost the fence and found the other's envelopes has stopped, with one line saying why
        loser = await until("one publisher stops", 60, functools.partial(_stopped, pair))
        survivor = second if loser is first else first
        assert loser.proc is not None
        assert loser.proc.returncode == 5, loser.output()[-2000:]
        last = [line for line in loser.output().splitlines() if line.strip()][-1]
        assert last.startswith("publisher: evidence."), last
        assert survivor.proc is not None
        assert survivor.proc.poll() is None, "the survivor keeps publishing"
        # every item, whoever took it first, is completed through the survivor
        everything = [e for entries in items.values() for e in entries]
        await publish_until_done(survivor.url, everything, tmp_path / f"survivor-{run}.journal")
        published.extend(e.metadata.item_id for e in everything)
        assert await survivor.stop() == 0, survivor.output()[-3000:]
    counted = await audit(hub)
    row.add_audit(hub, counted, published)
    report.append(row)
    row.assert_clean()


def _stopped(pair: tuple[PublisherProcess, PublisherProcess]) -> PublisherProcess | None:
    return next((p for p in pair if p.proc is not None and p.proc.poll() is not None), None)
