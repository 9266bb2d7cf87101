"""Turning repeats into one reported number, its spread and its ratio to a baseline. Pure: no I/O, no clock.

Owns: what a reported value means for each unit (a rate from a count and a time, a time per operation, or a
latency percentile), median and min-max over repeats, nearest-rank percentiles, and converting between units of
the same kind so a ratio compares like with like.

Conventions (also stated in docs/performance.md):
- value = the median over repeats; spread = min-max over repeats (with 3-5 repeats an IQR says nothing more);
- latency scenarios: value = median of the per-repeat p50, ``p99`` = median of the per-repeat p99,
  ``max`` = the largest sample of all repeats;
- loop lag (scenarios that measure it): ``lag_p99`` = median of the per-repeat p99, ``lag_max`` = the largest of
  all repeats, in milliseconds; the same for
  its own-CPU part (``bench.harness.LagProbe``);
- CPU per operation: the median over repeats of this process's CPU time in the measured region ÷ operations, in µs;
- ratio = value ÷ baseline value, in the scenario's unit. For a rate (events/s) below 1 is slower than the
  baseline; for a time (µs/op, ms) above 1 is slower.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from bench.harness import LATENCY_UNITS, Repeat

#: Seconds per operation ↔ the unit's value. Rates are per second; times per operation are scaled.
_PER_OP_SCALE: Final = {"µs/op": 1e6, "ms/op": 1e3}
#: Rates: a count per second (for MiB/s the count is of MiB).
_RATE_UNITS: Final = frozenset({"events/s", "records/s", "ops/s", "files/s", "MiB/s"})
_LATENCY_SCALE: Final = {"ms": 1e3, "µs": 1e6}


@dataclass(frozen=True)
class Summary:
    unit: str
    value: float
    low: float
    high: float
    per_repeat: tuple[float, ...]
    ops: int
    p99: float | None = None
    max: float | None = None
    lag_p99_ms: float | None = None
    lag_max_ms: float | None = None
    cpu_us_per_op: float | None = None
    own_lag_p99_ms: float | None = None
    own_lag_max_ms: float | None = None


def percentile(samples: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (``pct`` in 0-100) of unsorted samples.

    Raises:
        ValueError: no samples, or ``pct`` outside 0-100.
    """
    if not samples:
        raise ValueError("no samples")
    if not 0 <= pct <= 100:
        raise ValueError(f"percentile out of range: {pct}")
    ordered = sorted(samples)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def repeat_value(unit: str, repeat: Repeat) -> float:
    """The one number a repeat contributes, in ``unit`` (for latencies: its p50).

    Raises:
        ValueError: the unit is unknown, or a latency unit got no samples.
    """
    if unit in _RATE_UNITS:
        return repeat.ops / repeat.elapsed
    if unit in _PER_OP_SCALE:
        return repeat.elapsed / repeat.ops * _PER_OP_SCALE[unit]
    if unit in _LATENCY_SCALE:
        if not repeat.samples:
            raise ValueError(f"a {unit} scenario must return Latencies")
        return percentile(repeat.samples, 50) * _LATENCY_SCALE[unit]
    raise ValueError(f"unknown unit {unit!r}")


def summarise(unit: str, repeats: Sequence[Repeat]) -> Summary:
    """Median and min-max of the repeats, plus p99 and max for latency units.

    Raises:
        ValueError: no repeats, or see :func:`repeat_value`.
    """
    if not repeats:
        raise ValueError("no repeats")
    values = tuple(repeat_value(unit, r) for r in repeats)
    p99 = worst = None
    if unit in LATENCY_UNITS:
        scale = _LATENCY_SCALE[unit]
        p99 = statistics.median(percentile(r.samples, 99) for r in repeats) * scale
        worst = max(max(r.samples) for r in repeats) * scale
    lagged = [r for r in repeats if r.lag_p99 is not None and r.lag_max is not None]
    lag_p99 = statistics.median(r.lag_p99 for r in lagged if r.lag_p99 is not None) * 1e3 if lagged else None
    lag_max = max(r.lag_max for r in lagged if r.lag_max is not None) * 1e3 if lagged else None
    owned = [r for r in repeats if r.own_lag_p99 is not None and r.own_lag_max is not None]
    own_p99 = statistics.median(r.own_lag_p99 for r in owned if r.own_lag_p99 is not None) * 1e3 if owned else None
    own_max = max(r.own_lag_max for r in owned if r.own_lag_max is not None) * 1e3 if owned else None
    cpus = [r.cpu / r.ops * 1e6 for r in repeats if r.cpu is not None and r.ops]
    return Summary(
        unit=unit, value=statistics.median(values), low=min(values), high=max(values), per_repeat=values,
        ops=sum(r.ops for r in repeats), p99=p99, max=worst, lag_p99_ms=lag_p99, lag_max_ms=lag_max,
        cpu_us_per_op=statistics.median(cpus) if cpus else None, own_lag_p99_ms=own_p99, own_lag_max_ms=own_max,
    )  # fmt: skip


def convert(value: float, from_unit: str, to_unit: str) -> float:
    """Express ``value`` in another unit of the same kind (events/s ↔ µs/op, ms ↔ µs).

    Raises:
        ValueError: the units measure different things (a rate against a latency percentile).
    """
    if from_unit == to_unit:
        return value
    if from_unit in _LATENCY_SCALE and to_unit in _LATENCY_SCALE:
        return value / _LATENCY_SCALE[from_unit] * _LATENCY_SCALE[to_unit]
    if from_unit in LATENCY_UNITS or to_unit in LATENCY_UNITS:
        raise ValueError(f"cannot compare {from_unit} with {to_unit}")
    seconds_per_op = 1 / value if from_unit in _RATE_UNITS else value / _PER_OP_SCALE[from_unit]
    return 1 / seconds_per_op if to_unit in _RATE_UNITS else seconds_per_op * _PER_OP_SCALE[to_unit]


def ratio(value: float, unit: str, baseline_value: float, baseline_unit: str) -> float:
    """value ÷ baseline, both in ``unit``.

    Raises:
        ValueError: see :func:`convert`.
    """
    return value / convert(baseline_value, baseline_unit, unit)


def higher_is_better(unit: str) -> bool:
    """Rates improve upwards; times per operation and latencies improve downwards."""
    return unit in _RATE_UNITS
