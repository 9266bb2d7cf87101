"""Processes: the parent starts the broker (and, for cluster scenarios, the three-broker cluster) once and runs
each scenario in a child process of its own.

Owns: choosing which scenarios run (a requested scenario brings its baseline along, baselines run first), the
run plan (full or ``--quick`` sizes), spawning ``python -m bench --child NAME`` per scenario with the broker's
bootstrap, and the child side: run the scenario, report its repeats and its peak RSS from the end of set-up on
(VmHWM, falling back to ``ru_maxrss``) as one JSON line on stdout. A child per scenario keeps peak RSS per
scenario and stops state (allocator, client threads, caches) leaking from one scenario into the next.

Does not own: what a scenario does (``bench.harness`` and the scenario modules), statistics, output.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Final

from bench.harness import Context, Repeat, Scenario, run_scenario
from services.shared.cluster import KafkaTarget, akafka_cluster
from services.shared.local_cluster import LEAN_JVM, LocalCluster
from services.shared.local_kafka import ensure_jars
from services.shared.settings import KafkaSettings

log = logging.getLogger(__name__)

CHILD_TIMEOUT_S: Final = 600.0


@dataclass(frozen=True)
class Plan:
    """How much each scenario does. A run is ``rounds`` rounds; in each, every scenario gets a fresh child that
    does ``warmups`` + ``repeats`` calls, scenarios taking turns (round-robin), so a noisy minute on a shared
    machine hits a scenario and its baseline alike. ``events``/``record_size``/``seconds`` override every
    scenario's own size."""

    quick: bool = False
    rounds: int = 3
    warmups: int = 1
    repeats: int = 3
    events: int | None = None
    record_size: int | None = None
    seconds: float | None = None

    @classmethod
    def for_mode(cls, *, quick: bool, **overrides: Any) -> Plan:
        base = {"quick": quick, "rounds": 1 if quick else 3, "warmups": 1, "repeats": 3}
        return cls(**{**base, **{k: v for k, v in overrides.items() if v is not None}})

    def events_for(self, spec: Scenario) -> int:
        return self.events or (spec.quick_events if self.quick else spec.events)

    def record_size_for(self, spec: Scenario) -> int:
        return self.record_size or spec.record_size

    def seconds_for(self, spec: Scenario) -> float | None:
        return self.seconds or (spec.quick_seconds if self.quick else spec.seconds) or spec.seconds


@dataclass(frozen=True)
class ChildResult:
    name: str
    repeats: tuple[Repeat, ...]
    peak_rss_kib: int
    events: int
    record_size: int
    wall_seconds: float
    error: str | None = None
    shape: str | None = None  # the scenario's own description of one call (``Context.shape``)
    #: The machine's 1-minute load average when the child finished (others' work on these shared cores shows here).
    load_1m: float | None = None


def select(registry: dict[str, Scenario], names: Sequence[str]) -> list[Scenario]:
    """The scenarios to run: ``names`` (or all) plus the baselines they need, baselines first.

    Raises:
        KeyError: a name is not registered.
    """
    wanted: list[str] = list(names) or list(registry)
    missing = [n for n in wanted if n not in registry]
    if missing:
        raise KeyError(f"unknown scenario(s) {', '.join(missing)}; known: {', '.join(registry)}")
    chosen: dict[str, Scenario] = {}

    def add(name: str) -> None:
        spec = registry[name]
        if spec.baseline is not None:
            add(spec.baseline)
        chosen.setdefault(name, spec)

    for name in wanted:
        add(name)
    return list(chosen.values())


# -- child ------------------------------------------------------------------------------------------------------
async def child_main(spec: Scenario, *, bootstrap: str, plan: Plan) -> ChildResult:
    """Run one scenario in this process and say how much memory the process needed at its peak."""
    ctx = Context(
        bootstrap=bootstrap, scenario=spec.name, events=plan.events_for(spec),
        record_size=plan.record_size_for(spec), seconds=plan.seconds_for(spec), quick=plan.quick,
        replication_factor=3 if spec.cluster else 1, min_insync_replicas=2 if spec.cluster else 1,
    )  # fmt: skip
    began = time.perf_counter()
    repeats = await run_scenario(spec, ctx, warmups=plan.warmups, repeats=plan.repeats, after_setup=reset_peak_rss)
    return ChildResult(
        name=spec.name, repeats=tuple(repeats), events=ctx.events, record_size=ctx.record_size,
        peak_rss_kib=peak_rss_kib(), wall_seconds=time.perf_counter() - began, shape=ctx.shape,
        load_1m=os.getloadavg()[0],
    )  # fmt: skip


def reset_peak_rss() -> None:
    """Forget the peak so far (Linux: ``5`` into /proc/self/clear_refs), so a scenario's set-up — e.g. writing
    200,000 records to read back — does not count as the scenario's memory. Without it the peak includes set-up."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5", encoding="ascii")


def peak_rss_kib() -> int:
    """This process's peak resident set in KiB: VmHWM (reset by :func:`reset_peak_rss`), else ``ru_maxrss``.
    VmHWM, because ``ru_maxrss`` also keeps the peak of threads that already exited (librdkafka's, in set-up)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def child_json(result: ChildResult) -> str:
    return json.dumps(asdict(result))


def parse_child(line: str) -> ChildResult:
    raw = json.loads(line)
    repeats = tuple(Repeat(ops=r["ops"], elapsed=r["elapsed"], samples=tuple(r["samples"]), lag_p99=r.get("lag_p99"),
                           lag_max=r.get("lag_max"), cpu=r.get("cpu"), own_lag_p99=r.get("own_lag_p99"),
                           own_lag_max=r.get("own_lag_max")) for r in raw["repeats"])  # fmt: skip
    return ChildResult(**{**raw, "repeats": repeats})


# -- parent -----------------------------------------------------------------------------------------------------
def _child_argv(spec: Scenario, bootstrap: str, plan: Plan) -> list[str]:
    argv = [sys.executable, "-m", "bench", "--child", spec.name, "--bootstrap", bootstrap,
            "--warmups", str(plan.warmups), "--repeats", str(plan.repeats)]  # fmt: skip
    if plan.quick:
        argv.append("--quick")
    for flag, value in (("--events", plan.events), ("--record-size", plan.record_size), ("--seconds", plan.seconds)):
        if value is not None:
            argv += [flag, str(value)]
    return argv


async def run_child(spec: Scenario, bootstrap: str, plan: Plan) -> ChildResult:
    """Spawn the child for ``spec``, wait for it, and parse its JSON line. A failure becomes ``error``."""
    began = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        *_child_argv(spec, bootstrap, plan), stdout=asyncio.subprocess.PIPE, stderr=None, cwd=Path.cwd()
    )
    try:
        async with asyncio.timeout(CHILD_TIMEOUT_S):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        out = b""
    lines = out.decode(errors="replace").strip().splitlines()
    if proc.returncode == 0 and lines:
        try:
            return parse_child(lines[-1])
        except (ValueError, KeyError, TypeError) as exc:
            error = f"unreadable child output: {exc}"
    else:
        error = f"child exited with {proc.returncode}" + (" (timed out)" if not lines else "")
    return ChildResult(name=spec.name, repeats=(), peak_rss_kib=0, events=0, record_size=0,
                       wall_seconds=time.perf_counter() - began, error=error)  # fmt: skip


def broker_peak_rss_kib(target: KafkaTarget) -> int | None:
    """The local broker JVM's peak RSS (VmHWM), if this run started it."""
    return _peak_rss_of(target.pid)


@dataclass(frozen=True)
class RunOutcome:
    results: list[ChildResult]
    broker_kind: str
    broker_startup_seconds: float
    broker_peak_rss_kib: int | None
    wall_seconds: float
    #: The three-broker cluster, when cluster scenarios ran: its start-up and its JVMs' peak RSS (summed).
    cluster_startup_seconds: float | None = None
    cluster_peak_rss_kib: int | None = None


@contextlib.contextmanager
def three_brokers(settings: KafkaSettings, needed: bool, bootstrap: str | None, *,
                  quick: bool = False) -> Iterator[LocalCluster | str | None]:  # fmt: skip
    """The cluster the cluster scenarios run on: ``bootstrap`` if given (``--cluster-bootstrap``), else a local one
    (plaintext, so that the ratio measures replication alone; the JVM's default compilers, like the single broker —
    the lean ones for ``--quick``, which only shows the harness works), stopped at the end; None when no cluster
    scenario runs."""
    if not needed or bootstrap:
        yield bootstrap
        return
    cluster = LocalCluster.throwaway(ensure_jars(settings.cache_dir), root=settings.work_root,
                                     jvm_options=LEAN_JVM if quick else ())  # fmt: skip
    cluster.start()  # from the parent's main thread: the JVMs' parent-death signal follows it
    try:
        yield cluster
    finally:
        cluster.stop()


def _peak_rss_of(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def merge(rounds: Sequence[ChildResult]) -> ChildResult:
    """One scenario's children over all rounds: repeats concatenated, the highest peak RSS, the first error."""
    first = rounds[0]
    error = next((r.error for r in rounds if r.error), None)
    return ChildResult(
        name=first.name, repeats=() if error else tuple(x for r in rounds for x in r.repeats),
        peak_rss_kib=max(r.peak_rss_kib for r in rounds), events=max(r.events for r in rounds),
        record_size=max(r.record_size for r in rounds), wall_seconds=sum(r.wall_seconds for r in rounds),
        error=error, shape=next((r.shape for r in rounds if r.shape), None),
        load_1m=max((r.load_1m for r in rounds if r.load_1m is not None), default=None),
    )  # fmt: skip


async def run_all(specs: Sequence[Scenario], plan: Plan, settings: KafkaSettings,
                  cluster_bootstrap: str | None = None) -> RunOutcome:  # fmt: skip
    """Start (or find) the broker once — and the three-broker cluster if a cluster scenario runs — then run the
    rounds: each scenario's child in turn, one at a time (2 cores: running two scenarios at once would measure their
    contention). A scenario that failed is not run again."""
    began = time.perf_counter()
    children: dict[str, list[ChildResult]] = {spec.name: [] for spec in specs}
    cluster_seconds, cluster_rss = None, None
    with three_brokers(settings, any(s.cluster for s in specs), cluster_bootstrap, quick=plan.quick) as cluster:
        replicated = cluster.bootstrap if isinstance(cluster, LocalCluster) else cluster
        async with akafka_cluster(settings) as target:
            log.info("Kafka (%s) at %s; three brokers at %s", target.kind, target.bootstrap, replicated)
            for round_no in range(1, plan.rounds + 1):
                for spec in specs:
                    if any(r.error for r in children[spec.name]):
                        continue
                    print(f"bench: round {round_no}/{plan.rounds}: {spec.name} …", file=sys.stderr, flush=True)
                    result = await run_child(spec, replicated if spec.cluster and replicated else target.bootstrap,
                                             plan)  # fmt: skip
                    if result.error:
                        print(f"bench: {spec.name} failed: {result.error}", file=sys.stderr, flush=True)
                    children[spec.name].append(result)
            broker_rss = broker_peak_rss_kib(target)
        if isinstance(cluster, LocalCluster):
            cluster_seconds = cluster.startup_seconds
            cluster_rss = sum(_peak_rss_of(n.pid) or 0 for n in cluster.nodes.values())
    return RunOutcome(
        results=[merge(children[spec.name]) for spec in specs], broker_kind=target.kind,
        broker_startup_seconds=target.startup_seconds, broker_peak_rss_kib=broker_rss,
        wall_seconds=time.perf_counter() - began, cluster_startup_seconds=cluster_seconds,
        cluster_peak_rss_kib=cluster_rss,
    )  # fmt: skip
