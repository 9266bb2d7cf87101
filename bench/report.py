"""What a run leaves behind: the Markdown table, the generated region of docs/performance.md, the JSON file.

Owns: turning child results into rows (value, spread, ratio to the baseline measured in the same run, peak RSS),
describing the machine and versions, the JSON document ``bench.compare`` reads, and rewriting only the text
between ``<!-- bench:begin -->`` and ``<!-- bench:end -->`` so the hand-written parts of the page stay.

Does not own: running anything (``bench.runner``) or the arithmetic (``bench.stats``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final

from bench.harness import Scenario
from bench.runner import ChildResult, Plan, RunOutcome
from bench.stats import Summary, higher_is_better, ratio, summarise
from services.shared.local_kafka import kafka_version

FORMAT: Final = "evidence-hub-bench/1"
BEGIN: Final = "<!-- bench:begin -->"
END: Final = "<!-- bench:end -->"
ROOT: Final = Path(__file__).resolve().parents[1]
DOCS: Final = ROOT / "docs" / "performance.md"
RESULTS: Final = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Row:
    name: str
    description: str
    unit: str
    baseline: str | None
    value: float | None
    low: float | None
    high: float | None
    per_repeat: tuple[float, ...]
    p99: float | None
    max: float | None
    ratio: float | None
    peak_rss_kib: int
    events: int
    record_size: int
    wall_seconds: float
    error: str | None
    lag_p99_ms: float | None = None
    lag_max_ms: float | None = None
    shape: str | None = None
    load_1m: float | None = None
    cpu_us_per_op: float | None = None
    own_lag_p99_ms: float | None = None
    own_lag_max_ms: float | None = None

    def size_cell(self) -> str:
        """What one call did: the scenario's own words, or N x record size (N alone where records play no part)."""
        if self.shape:
            return self.shape
        return f"{self.events:,} x {self.record_size:,} B" if self.record_size else f"{self.events:,}"


def build_rows(specs: Sequence[Scenario], results: Sequence[ChildResult]) -> list[Row]:
    """One row per scenario; a baseline's ratio is 1, a failed scenario (or one whose baseline failed) has none."""
    by_name = {r.name: r for r in results}
    summaries: dict[str, Summary] = {
        r.name: summarise(spec.unit, r.repeats) for spec in specs if not (r := by_name[spec.name]).error
    }
    rows = []
    for spec in specs:
        result, summary = by_name[spec.name], summaries.get(spec.name)
        base = summaries.get(spec.baseline) if spec.baseline else summary
        rel = None
        if summary is not None and base is not None:
            rel = ratio(summary.value, summary.unit, base.value, base.unit)
        rows.append(Row(
            name=spec.name, description=spec.description, unit=spec.unit, baseline=spec.baseline,
            value=summary.value if summary else None, low=summary.low if summary else None,
            high=summary.high if summary else None, per_repeat=summary.per_repeat if summary else (),
            p99=summary.p99 if summary else None, max=summary.max if summary else None, ratio=rel,
            peak_rss_kib=result.peak_rss_kib, events=result.events, record_size=result.record_size,
            wall_seconds=result.wall_seconds, error=result.error, shape=result.shape, load_1m=result.load_1m,
            lag_p99_ms=summary.lag_p99_ms if summary else None, lag_max_ms=summary.lag_max_ms if summary else None,
            cpu_us_per_op=summary.cpu_us_per_op if summary else None,
            own_lag_p99_ms=summary.own_lag_p99_ms if summary else None,
            own_lag_max_ms=summary.own_lag_max_ms if summary else None,
        ))  # fmt: skip
    return rows


def _num(value: float) -> str:
    if value >= 1000:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}"


def _ratio_cell(row: Row) -> str:
    if row.ratio is None:
        return "—"
    if row.baseline is None:
        return "1 (baseline)"
    direction = "higher is better" if higher_is_better(row.unit) else "lower is better"
    return f"**{row.ratio:.3g}x** {row.baseline} ({direction})"


def _lag_cell(r: Row) -> str:
    if r.lag_p99_ms is None or r.lag_max_ms is None:
        return "—"
    own = f" ({r.own_lag_p99_ms:.1f} / {r.own_lag_max_ms:.0f})" if r.own_lag_p99_ms is not None and r.own_lag_max_ms \
        is not None else ""  # fmt: skip
    return f"{r.lag_p99_ms:.1f} / {r.lag_max_ms:.0f} ms{own}"


def markdown_table(rows: Sequence[Row]) -> str:
    """The results as a Markdown table; a latency column appears when some scenario reports latencies, a loop-lag
    column when some scenario measured its event loop's lag."""
    latency = any(r.p99 is not None for r in rows)
    lagged = any(r.lag_p99_ms is not None for r in rows)
    head = ["scenario", "median", "ratio to baseline", "spread (min-max)"]
    head += ["p99 / max"] if latency else []
    head += ["loop lag p99 / max (own CPU)"] if lagged else []
    head += ["CPU per op", "peak RSS", "N x size"]
    aligns = ["---", "---:", "---", "---:"] + ["---:"] * (latency + lagged) + ["---:", "---:", "---:"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(aligns) + "|"]
    for r in rows:
        if r.value is None or r.low is None or r.high is None:
            cells = [f"`{r.name}`", f"failed: {r.error}", "—", "—"] + ["—"] * (latency + lagged + 1)
        else:
            cells = [f"`{r.name}`", f"{_num(r.value)} {r.unit}", _ratio_cell(r), f"{_num(r.low)}-{_num(r.high)}"]
            if latency:
                cells.append(f"{_num(r.p99)} / {_num(r.max)} {r.unit}" if r.p99 is not None and r.max else "—")
            if lagged:
                cells.append(_lag_cell(r))
            cells.append(f"{_num(r.cpu_us_per_op)} µs" if r.cpu_us_per_op is not None else "—")
        cells += [f"{r.peak_rss_kib / 1024:.0f} MiB", r.size_cell()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _meminfo_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError):
        return None
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
    """Versions and machine size, so two runs can be told apart."""
    import confluent_kafka  # deferred: only the parent describes the run

    return {
        "python": platform.python_version(),
        "aiokafka": metadata.version("aiokafka"),
        "confluent_kafka": metadata.version("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "kafka_broker": kafka_version(),
        "nproc": len(os.sched_getaffinity(0)),
        "memory_gib": _meminfo_gib(),
        "cpu": _cpu_model(),
        "platform": platform.platform(),
    }


def document(rows: Sequence[Row], outcome: RunOutcome, plan: Plan, started: dt.datetime) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "started_at": started.isoformat(timespec="seconds"),
        "mode": "quick" if plan.quick else "full",
        "plan": asdict(plan),
        "environment": environment(),
        "broker": {
            "kind": outcome.broker_kind,
            "startup_seconds": round(outcome.broker_startup_seconds, 2),
            "peak_rss_kib": outcome.broker_peak_rss_kib,
        },
        "cluster": None
        if outcome.cluster_startup_seconds is None
        else {
            "layout": "brokers 1-3, controllers 101-103, RF 3, min.insync.replicas 2, PLAINTEXT",
            "startup_seconds": round(outcome.cluster_startup_seconds, 2),
            "peak_rss_kib": outcome.cluster_peak_rss_kib,
        },
        "wall_seconds": round(outcome.wall_seconds, 1),
        "scenarios": [asdict(r) for r in rows],
    }


def write_json(doc: dict[str, Any], *, out: Path | None, started: dt.datetime, latest: bool = True) -> Path:
    """``out`` if given; otherwise bench/results/<UTC timestamp>.json, copied to bench/results/latest.json when
    ``latest`` (only full runs, whose table docs/performance.md shows, become the reference)."""
    text = json.dumps(doc, indent=2, ensure_ascii=False) + "\n"
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        return out
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(text, encoding="utf-8")
    if latest:
        shutil.copyfile(path, RESULTS / "latest.json")
    return path


def load_summary(doc: dict[str, Any]) -> str:
    """The 1-minute load averages seen as the scenarios' processes ended: how busy the shared machine was."""
    loads = [r["load_1m"] for r in doc["scenarios"] if r.get("load_1m") is not None]
    return f"1-minute load average {min(loads):.1f}-{max(loads):.1f} during the run" if loads else "load not recorded"


def generated_section(table: str, doc: dict[str, Any]) -> str:
    env, broker, plan, cluster = doc["environment"], doc["broker"], doc["plan"], doc.get("cluster")
    rss = f", peak RSS {broker['peak_rss_kib'] / 1024:.0f} MiB" if broker["peak_rss_kib"] else ""
    three = ""
    if cluster:
        jvms = (cluster["peak_rss_kib"] or 0) / 1024
        three = (f" The `-rf3` scenarios ran on a local three-broker cluster ({cluster['layout']}; started in "
                 f"{cluster['startup_seconds']:.0f} s, its six JVMs' peak RSS {jvms:.0f} MiB together).")  # fmt: skip
    return "\n".join([
        f"Measured {doc['started_at']} by `make bench` ({doc['wall_seconds']:.0f} s wall). "
        f"Python {env['python']}, aiokafka {env['aiokafka']}, confluent-kafka {env['confluent_kafka']} "
        f"(librdkafka {env['librdkafka']}), Kafka broker {env['kafka_broker']} ({broker['kind']}{rss}). "
        f"Machine: {env['nproc']} CPUs ({env['cpu']}), {env['memory_gib']} GiB memory, {env['platform']}; "
        f"{load_summary(doc)}.{three}",
        "",
        f"{plan['rounds']} round(s), scenarios taking turns; in each round every scenario ran in a fresh process: "
        f"{plan['warmups']} warm-up, then {plan['repeats']} measured repeats. *median* and *spread* (min-max) are "
        "over all measured repeats; *peak RSS* is the highest high-water mark of the scenario's processes, counted "
        "from the end of set-up.",
        "",
        table,
    ])  # fmt: skip


def replace_region(text: str, body: str) -> str:
    """``text`` with everything between the bench markers replaced by ``body``; the rest is left byte for byte.

    Raises:
        ValueError: the markers are missing or out of order (nothing is rewritten then).
    """
    start, end = text.find(BEGIN), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"{BEGIN} … {END} not found in order; refusing to rewrite the page")
    return text[: start + len(BEGIN)] + "\n" + body.strip("\n") + "\n" + text[end:]


def update_docs(body: str, path: Path = DOCS) -> None:
    """Rewrite the generated region of docs/performance.md (atomically: write a sibling, then rename)."""
    new = replace_region(path.read_text(encoding="utf-8"), body)
    staging = path.with_suffix(".md.tmp")
    staging.write_text(new, encoding="utf-8")
    staging.replace(path)
