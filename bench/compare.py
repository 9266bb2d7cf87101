"""``python -m bench.compare A.json B.json``: how each scenario changed from run A to run B, in percent.

Owns: reading two result files written by ``python -m bench`` and printing, per scenario, the change of its
median and of its ratio to the baseline. On shared, noisy machines the ratio (measured against a baseline in the
same run, on the same broker) is the number to trust; the absolute change is shown beside it.

Does not own: running benchmarks, or deciding what change is significant (look at the spreads in each file).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import FORMAT
from bench.stats import higher_is_better


def load(path: Path) -> dict[str, Any]:
    """Read a result file.

    Raises:
        ValueError: not a bench result file.
    """
    doc: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    return doc


def _change(old: float | None, new: float | None) -> float | None:
    if old is None or new is None or old == 0:
        return None
    return (new - old) / old * 100


def _pct(change: float | None) -> str:
    return "—" if change is None else f"{change:+.1f}%"


def _verdict(change: float | None, unit: str) -> str:
    if change is None or abs(change) < 0.05:
        return ""
    better = (change > 0) == higher_is_better(unit)
    return "better" if better else "worse"


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """A Markdown table: per scenario, A → B for the median and the ratio, with the change in percent."""
    rows_a = {s["name"]: s for s in a["scenarios"]}
    rows_b = {s["name"]: s for s in b["scenarios"]}
    lines = [
        f"A: {a['started_at']} ({a['mode']})   B: {b['started_at']} ({b['mode']})",
        "",
        "| scenario | unit | A median | B median | change | ratio A | ratio B | ratio change |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name in [*rows_a, *(n for n in rows_b if n not in rows_a)]:
        ra, rb = rows_a.get(name), rows_b.get(name)
        if ra is None or rb is None:
            lines.append(f"| `{name}` | | {'only in ' + ('A' if rb is None else 'B')} | | | | | |")
            continue
        unit = rb["unit"]
        value_change, ratio_change = _change(ra["value"], rb["value"]), _change(ra["ratio"], rb["ratio"])
        verdict = _verdict(value_change, unit)
        cells = [
            f"`{name}`", unit, _fmt(ra["value"]), _fmt(rb["value"]),
            f"{_pct(value_change)} {verdict}".strip(), _fmt(ra["ratio"]), _fmt(rb["ratio"]), _pct(ratio_change),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:,.3g}" if value < 100 else f"{value:,.0f}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description="compare two bench result files")
    parser.add_argument("a", type=Path, help="the earlier result file (e.g. bench/results/<timestamp>.json)")
    parser.add_argument("b", type=Path, help="the later one (e.g. bench/results/latest.json)")
    args = parser.parse_args(argv)
    try:
        text = compare(load(args.a), load(args.b))
    except (OSError, ValueError, KeyError) as exc:
        print(f"bench.compare: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
