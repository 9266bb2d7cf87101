"""``python -m bench --profile NAME``: where one scenario spends its time, under cProfile, in percent.

Owns: running one scenario in this process (set-up and a warm-up unprofiled, then one profiled call — only its
``ctx.timed()`` blocks if it has any, the region the harness measures) and printing the functions with the most
cumulative and the most own time as a share of the profiled time. cProfile sees Python frames only: time in
librdkafka's threads or the broker is invisible here (it shows as the Python call that waited, e.g. ``flush`` or
``select``), and profiling slows Python code, so read shares, not absolute times.

Does not own: the broker (``bench.runner`` / ``services.shared.cluster``) or the scenario.
"""

from __future__ import annotations

import cProfile
import pstats
from collections.abc import Iterable
from typing import Any, Final

from bench.harness import Context, Scenario, run_once
from bench.runner import Plan
from services.shared.cluster import akafka_cluster
from services.shared.settings import KafkaSettings

# pstats' per-function tuple: (primitive calls, total calls, own time, cumulative time, callers)
_OWN: Final = 2
_CUMULATIVE: Final = 3


def _label(func: tuple[str, int, str]) -> str:
    filename, line, name = func
    if filename == "~":  # built-in
        return name
    parts = filename.replace("\\", "/").split("/")
    short = "/".join(parts[parts.index("site-packages") + 1 :] if "site-packages" in parts else parts[-2:])
    return f"{short}:{line}({name})"


def top(stats: pstats.Stats, *, key: int, limit: int, total: float) -> list[str]:
    """The ``limit`` functions with the most time by ``key``, as ``share%  seconds  function`` lines."""
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]  # pstats keeps its table untyped
    ranked: Iterable[tuple[Any, Any]] = sorted(table.items(), key=lambda item: item[1][key], reverse=True)
    lines = []
    for func, row in list(ranked)[:limit]:
        lines.append(f"{row[key] / total * 100:6.1f}%  {row[key]:8.3f}s  {row[1]:>9,}  {_label(func)}")
    return lines


async def profile(spec: Scenario, plan: Plan, settings: KafkaSettings, *, limit: int = 25) -> str:
    """Profile one call of ``spec`` (after its set-up and a warm-up) and return the report text."""
    async with akafka_cluster(settings) as target:
        ctx = Context(
            bootstrap=target.bootstrap, scenario=spec.name, events=plan.events_for(spec),
            record_size=plan.record_size_for(spec), seconds=plan.seconds_for(spec), quick=plan.quick,
        )  # fmt: skip
        profiler = cProfile.Profile()
        try:
            if spec.setup is not None:
                await spec.setup(ctx)
            try:
                await run_once(spec, ctx)  # warm-up, unprofiled; tells whether the scenario times a block
                region = "its timed() blocks" if ctx.used_timed else "the whole call"
                if ctx.used_timed:
                    ctx.profiler = profiler
                    repeat = await run_once(spec, ctx)
                else:
                    profiler.enable()
                    try:
                        repeat = await run_once(spec, ctx)
                    finally:
                        profiler.disable()
            finally:
                if spec.teardown is not None:
                    await spec.teardown(ctx)
        finally:
            await ctx.aclose()
    stats = pstats.Stats(profiler)
    total: float = stats.total_tt  # type: ignore[attr-defined]  # sum of own time: the profiled wall time
    head = [
        f"profile of {spec.name}: {repeat.ops:,} operations; profiled {region}: {total:.3f}s under cProfile "
        f"({repeat.elapsed:.3f}s measured, the profiler's overhead included)",
        "",
        f"top {limit} by cumulative time (share of the profiled call, seconds, calls, function):",
    ]
    own = ["", f"top {limit} by own time:"]
    body = top(stats, key=_CUMULATIVE, limit=limit, total=total) + own + top(stats, key=_OWN, limit=limit, total=total)
    return "\n".join(head + body)
