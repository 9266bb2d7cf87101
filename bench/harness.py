"""The scenario API: what a benchmark scenario is, what it is given, and what it may return.

Owns: the registry (:func:`scenario`), the :class:`Context` a scenario receives (bootstrap, a fresh-topic factory,
event count, record size, an optional timed region) and the two result kinds: an operation count (the harness
turns it into a rate or a time per operation) and :class:`Latencies` (per-operation samples, reported as
p50/p99/max). Also runs one scenario's warm-ups and repeats (:func:`run_scenario`), which the child process and
the profiler share, and — for scenarios registered with ``loop_lag=True`` — measures how late the event loop
runs a timer during the timed region (:class:`LagProbe`): what every other connection of a service would wait.

Does not own: processes, the broker, statistics or output (``bench.runner``, ``bench.stats``, ``bench.report``).

Adding a scenario (hub scenarios go in ``bench/scenarios_hub.py``, imported by :func:`load_scenarios` when present)::

    @scenario(name="hub-publish-library", unit="events/s", baseline="aiokafka-produce")
    async def hub_publish_library(ctx: Context) -> int:
        topic = await ctx.topic(partitions=3)
        async with make_hub_publisher(ctx.bootstrap, topic) as publisher:  # untimed set-up
            with ctx.timed():                                              # only this block is measured
                for i in range(ctx.events):
                    await publisher.publish(...)
        return ctx.events

Without ``ctx.timed()`` the whole call is measured. ``setup``/``teardown`` (async, given the context) run once per
child process around all warm-ups and repeats and may keep things in ``ctx.state``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import importlib.util
import math
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, get_args

from services.shared.kafka import TopicSpec, ensure_topics

Unit = Literal["events/s", "records/s", "ops/s", "files/s", "MiB/s", "µs/op", "ms/op", "ms", "µs"]
UNITS: Final = frozenset(get_args(Unit))
#: Units whose value is a latency percentile of :class:`Latencies` samples; the others are computed from a count.
LATENCY_UNITS: Final = frozenset({"ms", "µs"})
DEFAULT_RECORD_SIZE: Final = 1536
#: The loop-lag probe's timer period: it asks to run every 5 ms and records how late it ran.
LAG_PERIOD_S: Final = 0.005
#: Modules that define scenarios. The hub's module is optional: it is written by whoever adds hub scenarios.
SCENARIO_MODULES: Final = (
    "bench.scenarios_kafka",
    "bench.scenarios_hub",
    "bench.scenarios_gateway",
    "bench.scenarios_audit",
    "bench.scenarios_uploads",
)


@dataclass(frozen=True)
class Latencies:
    """A latency scenario's result: one sample per operation, in seconds (e.g. publish-to-delivery times)."""

    samples: Sequence[float]


ScenarioResult = int | Latencies
ScenarioFn = Callable[["Context"], Awaitable[ScenarioResult]]
Hook = Callable[["Context"], Awaitable[None]]


@dataclass
class Context:
    """What a scenario gets. One context lives for one child process: set-up, warm-ups, repeats, teardown."""

    bootstrap: str
    scenario: str
    events: int
    record_size: int
    seconds: float | None = None
    quick: bool = False
    #: 3 and 2 on the three-broker cluster (``cluster=True`` scenarios): every topic a scenario creates is replicated.
    replication_factor: int = 1
    min_insync_replicas: int = 1
    #: Free for ``setup`` to leave things in for the scenario (pre-produced topics, clients, keys …).
    state: dict[str, Any] = field(default_factory=dict)
    _topics: list[str] = field(default_factory=list, repr=False)
    _timed: float | None = field(default=None, repr=False)
    _cpu: float | None = field(default=None, repr=False)
    _payload: bytes | None = field(default=None, repr=False)
    _admin: Any = field(default=None, repr=False)
    #: Set by ``--profile``: a ``cProfile.Profile`` switched on only inside :meth:`timed` blocks.
    profiler: Any = field(default=None, repr=False)
    #: What one call did, for the report's "N x size" column, when the scenario knows better than
    #: ``events x record_size`` (e.g. "2,000 events, 4,000 records x 1,047 B"). Set by the scenario.
    shape: str | None = None
    #: Measure the event loop's lag inside :meth:`timed` blocks (``loop_lag=True`` scenarios).
    probe_lag: bool = False
    _lag: LagProbe | None = field(default=None, repr=False)

    async def topic(self, *, partitions: int = 3, config: Mapping[str, str] | None = None) -> str:
        """Create a topic no other run uses, wait until every partition has a leader, and return its name.
        The topic is deleted when the child ends.

        Raises:
            TimeoutError: the partitions had no leader within 30 s.
        """
        name = f"bench.{self.scenario}.{uuid.uuid4().hex[:10]}"
        await ensure_topics(self.bootstrap, [self.topic_spec(name, partitions, config)],
                            replication_factor=self.replication_factor)  # fmt: skip
        self._topics.append(name)
        admin = await self._admin_client()
        async with asyncio.timeout(30):
            while not _all_led(await admin.describe_topics([name]), partitions):  # noqa: ASYNC110 - no event
                await asyncio.sleep(0.05)
        return name

    def topic_spec(self, name: str, partitions: int, config: Mapping[str, str] | None = None) -> TopicSpec:
        """A topic as this context's Kafka wants it (``min.insync.replicas`` 2 on the cluster)."""
        return TopicSpec(name, partitions, {"min.insync.replicas": str(self.min_insync_replicas), **(config or {})})

    async def _admin_client(self) -> Any:
        if self._admin is None:
            from aiokafka.admin import AIOKafkaAdminClient  # deferred: only the child needs it

            admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
            await admin.start()
            self._admin = admin
        return self._admin

    @property
    def payload(self) -> bytes:
        """``record_size`` random bytes (incompressible), made once per context."""
        if self._payload is None:
            self._payload = os.urandom(self.record_size)
        return self._payload

    def deadline(self) -> float:
        """``time.perf_counter()`` value at which a duration-bound scenario (``seconds=``) should stop."""
        return time.perf_counter() + (self.seconds if self.seconds is not None else 0.0)

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        """Measure only this block (blocks add up). Without one, the harness measures the whole call."""
        if self.probe_lag:
            self._lag = self._lag or LagProbe()
            self._lag.start()
        if self.profiler is not None:
            self.profiler.enable()
        began, cpu = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            self._timed = (self._timed or 0.0) + time.perf_counter() - began
            self._cpu = (self._cpu or 0.0) + time.process_time() - cpu
            if self.profiler is not None:
                self.profiler.disable()
            if self._lag is not None:
                self._lag.stop()

    def add_cpu(self, seconds: float) -> None:
        """Count CPU time another process spent on this call's operations (a scenario's helper process)."""
        self._cpu = (self._cpu or 0.0) + seconds

    def lag(self) -> tuple[float, float, float, float] | None:
        """(p99, max, own-CPU p99, own-CPU max) loop lag of the current call in seconds (:class:`LagProbe`), or
        None if not measured."""
        if self._lag is None or not self._lag.samples:
            return None
        wall, own = sorted(self._lag.samples), sorted(self._lag.own_cpu)
        rank = max(0, math.ceil(0.99 * len(wall)) - 1)
        return wall[rank], wall[-1], own[rank], own[-1]

    @property
    def used_timed(self) -> bool:
        """Whether the last call measured ``timed()`` blocks (rather than the whole call)."""
        return self._timed is not None

    async def aclose(self) -> None:
        """Delete the topics this context created (an external cluster should not fill up with bench data)."""
        admin, self._admin = self._admin, None
        if admin is None:
            return
        try:
            if self._topics:
                await admin.delete_topics(self._topics)
                self._topics.clear()
        finally:
            await admin.close()


class LagProbe:
    """How late the event loop runs a timer due every :data:`LAG_PERIOD_S`: a sample per period, in seconds.

    A callback or task step that keeps the loop busy for 30 ms shows as a sample of ~30 ms: every other connection
    of the process waited that long. On a shared machine the kernel's scheduling adds to it: a process waiting for
    a core is late too. So each sample also has an *own-CPU* part: the lateness, capped at the CPU time the loop's
    thread used between arming the timer and running it — lateness while descheduled, or while another thread of
    the process held the interpreter lock, does not count; work done during the period itself (up to 5 ms) may.
    Under heavy load that part says what the loop's own code stalls, the other what a client would see."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.own_cpu: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="loop-lag-probe")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            due, cpu = loop.time() + LAG_PERIOD_S, time.thread_time()
            await asyncio.sleep(LAG_PERIOD_S)
            late = max(0.0, loop.time() - due)
            self.samples.append(late)
            self.own_cpu.append(min(late, time.thread_time() - cpu))


def _all_led(described: list[dict[str, Any]], partitions: int) -> bool:
    """True when the topic metadata shows ``partitions`` partitions, each with a leader."""
    return bool(described) and all(
        t["error_code"] == 0
        and len(t["partitions"]) == partitions
        and all(p["error_code"] == 0 and p["leader"] >= 0 for p in t["partitions"])
        for t in described
    )


@dataclass(frozen=True)
class Scenario:
    name: str
    fn: ScenarioFn
    unit: Unit
    baseline: str | None
    events: int
    quick_events: int
    record_size: int
    seconds: float | None
    quick_seconds: float | None
    setup: Hook | None
    teardown: Hook | None
    description: str
    cluster: bool = False  # runs on the three-broker cluster (RF 3, min ISR 2) instead of the single broker
    loop_lag: bool = False


SCENARIOS: dict[str, Scenario] = {}


def scenario(
    *,
    name: str,
    unit: Unit = "events/s",
    baseline: str | None = None,
    events: int = 50_000,
    quick_events: int = 2_000,
    record_size: int = DEFAULT_RECORD_SIZE,
    seconds: float | None = None,
    quick_seconds: float | None = None,
    setup: Hook | None = None,
    teardown: Hook | None = None,
    cluster: bool = False,
    loop_lag: bool = False,
) -> Callable[[ScenarioFn], ScenarioFn]:
    """Register an async scenario. ``baseline`` names the scenario its ratio is taken against (run in the same
    run); ``None`` makes it a baseline itself. ``cluster`` runs it on the local three-broker cluster (replication
    factor 3, ``min.insync.replicas`` 2) that the parent starts next to the single broker: a cluster scenario whose
    baseline is the same scenario on the single broker measures the cost of replication. ``events``/``seconds``
    are the full-run size, ``quick_*`` the ``--quick`` size. ``record_size`` 0: records play no part (a decision, a
    decode); the report then shows the count alone. ``loop_lag`` measures the event loop's lag inside the
    scenario's ``ctx.timed()`` blocks (:class:`LagProbe`). The function's docstring's first line becomes its
    description.

    Raises:
        ValueError: the name is taken or the unit unknown.
    """
    if unit not in UNITS:
        raise ValueError(f"unknown unit {unit!r}; one of {sorted(UNITS)}")

    def register(fn: ScenarioFn) -> ScenarioFn:
        if name in SCENARIOS:
            raise ValueError(f"scenario {name!r} is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        SCENARIOS[name] = Scenario(
            name=name, fn=fn, unit=unit, baseline=baseline, events=events, quick_events=quick_events,
            record_size=record_size, seconds=seconds, quick_seconds=quick_seconds, setup=setup,
            teardown=teardown, description=doc[0] if doc else "", cluster=cluster, loop_lag=loop_lag,
        )  # fmt: skip
        return fn

    return register


def load_scenarios() -> dict[str, Scenario]:
    """Import every scenario module that exists (``bench.scenarios_hub`` is optional) and return the registry.

    Raises:
        ValueError: a scenario names a baseline that is not registered.
    """
    for module in SCENARIO_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
    for spec in SCENARIOS.values():
        if spec.baseline is not None and spec.baseline not in SCENARIOS:
            raise ValueError(f"scenario {spec.name!r} names an unknown baseline {spec.baseline!r}")
    return SCENARIOS


@dataclass(frozen=True)
class Repeat:
    """One measured call: operations done and seconds measured, or latency samples (seconds); the event loop's lag
    during it (p99, max; seconds) when measured; the CPU seconds this process used in the measured region (all its
    threads; not the broker's) — on a shared, loaded machine a steadier figure than the wall clock."""

    ops: int
    elapsed: float
    samples: tuple[float, ...] = ()
    lag_p99: float | None = None
    lag_max: float | None = None
    cpu: float | None = None
    own_lag_p99: float | None = None
    own_lag_max: float | None = None


async def run_once(spec: Scenario, ctx: Context) -> Repeat:
    """Call the scenario once and time it (its ``ctx.timed()`` blocks if it used any, else the whole call).

    Raises:
        RuntimeError: the scenario reported no operations or a non-positive time.
    """
    gc.collect()
    ctx._timed, ctx._cpu, ctx._lag = None, None, None
    ctx.probe_lag = spec.loop_lag
    began, cpu_began = time.perf_counter(), time.process_time()
    result = await spec.fn(ctx)
    elapsed = time.perf_counter() - began if ctx._timed is None else ctx._timed
    cpu = time.process_time() - cpu_began if ctx._cpu is None else ctx._cpu
    p99, worst, own_p99, own_max = ctx.lag() or (None, None, None, None)
    if isinstance(result, Latencies):
        samples = tuple(result.samples)
        if not samples:
            raise RuntimeError(f"{spec.name}: no latency samples")
        return Repeat(ops=len(samples), elapsed=elapsed, samples=samples, lag_p99=p99, lag_max=worst, cpu=cpu,
                      own_lag_p99=own_p99, own_lag_max=own_max)  # fmt: skip
    if result <= 0 or elapsed <= 0:
        raise RuntimeError(f"{spec.name}: {result} operations in {elapsed:.6f}s")
    return Repeat(ops=result, elapsed=elapsed, lag_p99=p99, lag_max=worst, cpu=cpu, own_lag_p99=own_p99,
                  own_lag_max=own_max)  # fmt: skip


async def run_scenario(
    spec: Scenario, ctx: Context, *, warmups: int, repeats: int, after_setup: Callable[[], None] | None = None
) -> list[Repeat]:
    """Set-up, ``warmups`` unrecorded calls, ``repeats`` recorded ones, teardown; topics deleted at the end.
    ``after_setup`` runs between set-up and the first warm-up (the child resets its peak RSS there)."""
    try:
        if spec.setup is not None:
            await spec.setup(ctx)
        if after_setup is not None:
            after_setup()
        try:
            for _ in range(warmups):
                await run_once(spec, ctx)
            return [await run_once(spec, ctx) for _ in range(repeats)]
        finally:
            if spec.teardown is not None:
                await spec.teardown(ctx)
    finally:
        await ctx.aclose()
