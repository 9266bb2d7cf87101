"""`make bench` works: the quick mode measures every scenario and its baseline on the session broker, reports
positive numbers and ratios, writes a result file `bench.compare` can read, and leaves docs/performance.md alone.

Never a speed threshold: these machines are shared; a number here proves the harness, not the hub.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compare, report, stats
from bench.harness import Context, Latencies, Repeat, Scenario, ScenarioFn, Unit, load_scenarios, run_scenario
from bench.scenarios_kafka import RECORD_BYTES
from services.shared.cluster import KafkaTarget

ROOT = Path(__file__).resolve().parents[1]
BASELINES = {"aiokafka-produce", "aiokafka-consume", "confluent-produce", "confluent-consume"}


@pytest.mark.kafka
def test_quick_run_measures_every_scenario_against_its_baseline(kafka: KafkaTarget, tmp_path: Path) -> None:
    docs_before = report.DOCS.read_bytes()
    out = tmp_path / "quick.json"
    env = {**os.environ, "EVHUB_KAFKA_BOOTSTRAP": kafka.bootstrap}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=420, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    doc = json.loads(out.read_text(encoding="utf-8"))
    assert doc["format"] == report.FORMAT
    assert doc["mode"] == "quick"
    assert doc["environment"]["kafka_broker"]
    assert doc["environment"]["nproc"] >= 1
    rows = {row["name"]: row for row in doc["scenarios"]}
    assert set(rows) == set(load_scenarios())
    assert set(rows) >= BASELINES
    for name, row in rows.items():
        assert row["error"] is None, name
        assert row["value"] > 0, name
        assert row["ratio"] > 0, name
        assert row["low"] <= row["value"] <= row["high"], name
        assert len(row["per_repeat"]) == 3, name
        assert row["peak_rss_kib"] > 0, name
        assert row["cpu_us_per_op"] > 0, name
        assert f"`{name}`" in proc.stdout  # the table is printed
    assert rows["aiokafka-produce"]["ratio"] == 1
    # the replication cost: the same scenarios on the three-broker cluster the run started, against one broker
    assert rows["aiokafka-produce-rf3"]["baseline"] == "aiokafka-produce"
    assert rows["hub-publish-library-rf3"]["baseline"] == "hub-publish-library"
    assert doc["cluster"]["startup_seconds"] > 0
    assert doc["cluster"]["peak_rss_kib"] > 0
    # like with like: the baseline's records are the size of the envelopes the hub actually wrote, 1-3 per event
    for hub in ("hub-publish-library", "hub-publish-http"):
        assert abs(rows[hub]["record_size"] - RECORD_BYTES) <= 0.05 * RECORD_BYTES, rows[hub]
        shape = re.fullmatch(r"([\d,]+) events, ([\d,]+) records x [\d,]+ B", rows[hub]["shape"])
        assert shape is not None, rows[hub]["shape"]
        events, records = (int(g.replace(",", "")) for g in shape.groups())
        assert events < records <= 3 * events  # fanned out to 1-3 jurisdictions
        assert rows[hub]["lag_p99_ms"] is not None
        assert rows[hub]["lag_max_ms"] >= rows[hub]["lag_p99_ms"]
        assert 0 <= rows[hub]["own_lag_max_ms"] <= rows[hub]["lag_max_ms"]
    # a second publisher process (its own key and state, the same topics), against one
    assert rows["hub-publish-library-2proc"]["baseline"] == "hub-publish-library"
    # verifying what was published, next to reading it raw: the same records, the same consumer settings
    assert rows["hub-verify"]["baseline"] == "aiokafka-consume"
    assert abs(rows["hub-verify"]["record_size"] - RECORD_BYTES) <= 0.05 * RECORD_BYTES, rows["hub-verify"]
    assert "load average" in proc.stdout
    assert report.DOCS.read_bytes() == docs_before  # --quick never rewrites the page

    assert compare.main([str(out), str(out)]) == 0


def test_compare_reports_change_in_percent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def result(value: float, ratio: float) -> dict[str, object]:
        row = {"name": "hub-publish", "unit": "events/s", "value": value, "ratio": ratio}
        return {"format": report.FORMAT, "started_at": "t", "mode": "full", "scenarios": [row]}

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(result(1000, 0.5)), encoding="utf-8")
    b.write_text(json.dumps(result(800, 0.4)), encoding="utf-8")
    assert compare.main([str(a), str(b)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if "hub-publish" in x)
    assert "-20.0% worse" in line


def test_rewriting_the_page_keeps_the_hand_written_parts() -> None:
    page = f"# Performance\nintro\n{report.BEGIN}\nold table\n{report.END}\n## Profile\nhand-written\n"
    new = report.replace_region(page, "| new | table |")
    assert new == f"# Performance\nintro\n{report.BEGIN}\n| new | table |\n{report.END}\n## Profile\nhand-written\n"
    with pytest.raises(ValueError, match="refusing"):
        report.replace_region("no markers here", "x")


def test_summary_is_median_and_min_max_and_latency_percentiles() -> None:
    rates = stats.summarise("events/s", [Repeat(100, 1.0), Repeat(300, 1.0), Repeat(200, 1.0)])
    assert (rates.value, rates.low, rates.high) == (200, 100, 300)
    per_op = stats.summarise("µs/op", [Repeat(1000, 0.002)])
    assert per_op.value == pytest.approx(2.0)
    samples = tuple(i / 1000 for i in range(1, 101))  # 1..100 ms
    latency = stats.summarise("ms", [Repeat(100, 1.0, samples)])
    assert (latency.value, latency.p99, latency.max) == pytest.approx((50, 99, 100))
    # a µs/op scenario against an events/s baseline: 2 µs/op vs 1,000,000/s (1 µs/op) is twice the cost
    assert stats.ratio(2.0, "µs/op", 1_000_000, "events/s") == pytest.approx(2.0)
    with pytest.raises(ValueError, match="cannot compare"):
        stats.ratio(1.0, "ms", 1.0, "events/s")


async def test_harness_times_the_timed_block_and_keeps_latency_samples() -> None:
    async def throughput(ctx: Context) -> int:
        await asyncio.sleep(0.05)  # untimed set-up inside the call
        with ctx.timed():
            await asyncio.sleep(0.01)
        return ctx.events

    async def latency(ctx: Context) -> Latencies:
        return Latencies([0.001, 0.002, 0.003])

    def spec(fn: ScenarioFn, unit: Unit) -> Scenario:
        return Scenario(name="t", fn=fn, unit=unit, baseline=None, events=10, quick_events=10, record_size=1,
                        seconds=None, quick_seconds=None, setup=None, teardown=None, description="")  # fmt: skip

    ctx = Context(bootstrap="127.0.0.1:9", scenario="t", events=10, record_size=1)
    (timed,) = await run_scenario(spec(throughput, "events/s"), ctx, warmups=0, repeats=1)
    assert timed.ops == 10
    assert 0.01 <= timed.elapsed < 0.05
    repeats = await run_scenario(spec(latency, "ms"), ctx, warmups=1, repeats=3)
    assert stats.summarise("ms", repeats).value == pytest.approx(2.0)
