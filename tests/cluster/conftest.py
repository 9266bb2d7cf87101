"""The locked-down three-broker cluster the tests in this folder share, started once per session when needed.

Brokers 1-3 and controllers 101-103 (``services.shared.local_cluster``), mTLS on every listener with development
certificates from the hub's CA, the StandardAuthorizer, and the hub's topics and ACLs provisioned by ``kafka-admin``
exactly as ``evhub kafka --brokers 3 --secure`` does. Fault tests kill, stop and restart its nodes; before every
test :func:`healthy` brings every node back and waits until every partition has all its replicas in sync again.
The session's single embedded broker (``tests/conftest.py``) is untouched: most tests keep using it.

Every fault test adds a :class:`Row`. At the end of the run the rows are printed; with
``EVHUB_RELIABILITY_REPORT=docs/reliability.md`` (``make reliability``) they replace the table between the
``<!-- cluster-faults:begin -->`` and ``<!-- cluster-faults:end -->`` markers of that file — its numbers come from a
real run. ``EVHUB_FAULT_RUNS=N`` (``make soak``) injects each fault N times as often.
"""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.shared.kafka_admin import provision
from services.shared.local_cluster import LocalCluster
from services.shared.local_kafka import ensure_jars, kafka_version
from services.shared.settings import KafkaSettings
from tests.cluster.harness import REPLICATED, Row, in_sync

JURISDICTIONS = ["DE", "FR", "SE"]
BEGIN, END = "<!-- cluster-faults:begin -->", "<!-- cluster-faults:end -->"
_started: list[tuple[LocalCluster, float, dict[int, float]]] = []
_rows: list[Row] = []
_began = time.monotonic()


@pytest.fixture
def report() -> Iterator[list[Row]]:
    rows: list[Row] = []
    yield rows
    _rows.extend(rows)


@pytest.fixture(scope="session")
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    libs = ensure_jars(KafkaSettings().cache_dir)
    local = LocalCluster.throwaway(libs, root=tmp_path_factory.mktemp("cluster"), secure=True)
    local.start()
    try:
        asyncio.run(provision(local.connection(), REPLICATED, JURISDICTIONS))
        _started.append((local, local.startup_seconds, local.rss_mb()))
        yield local
    finally:
        if request.session.testsfailed:  # the brokers' own logs outlive the throwaway cluster, for the post-mortem
            kept = tmp_path_factory.mktemp("cluster-logs")
            for node_id, node in local.nodes.items():
                shutil.copytree(node.workdir / "logs", kept / f"node-{node_id}", dirs_exist_ok=True)
        local.stop()


@pytest.fixture
async def healthy(cluster: LocalCluster) -> LocalCluster:
    """The cluster with every node running and every partition fully in sync (a fault test may have left a node
    killed or frozen)."""
    for node_id in cluster.nodes:
        if cluster.node(node_id).pid is None:
            await asyncio.to_thread(cluster.restart, node_id)  # spawned from the cluster's own long-lived thread
        else:
            cluster.thaw(node_id)
    await in_sync(cluster)
    return cluster


def _table() -> str:
    head = ("| scenario | faults injected | events at risk | acknowledged / served | lost | duplicated "
            "| reads without an audit entry | notes |\n|---|---:|---:|---:|---:|---:|---:|---|\n")  # fmt: skip
    body = "".join(f"| {r.scenario} | {r.faults} | {r.at_risk} | {r.acknowledged} | {r.lost} | {r.duplicated} "
                   f"| {'—' if r.unaudited is None else r.unaudited} | {r.note} |\n" for r in _rows)  # fmt: skip
    when = datetime.now(UTC).replace(microsecond=0).isoformat()
    meta = (f"Recorded {when} by `make reliability` ({time.monotonic() - _began:.0f} s wall, "
            f"EVHUB_FAULT_RUNS={os.environ.get('EVHUB_FAULT_RUNS', '1')}): Kafka {kafka_version()}, three brokers and "
            f"three controllers on one machine, mTLS and ACLs, Python {platform.python_version()}, "
            f"{os.cpu_count()} CPUs.\n\n")  # fmt: skip
    return meta + head + body


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _rows:
        terminalreporter.write_sep("-", "broker faults on the three-broker cluster")
        terminalreporter.write(_table())
        target = os.environ.get("EVHUB_RELIABILITY_REPORT")
        if target:
            path = Path(target)
            text = path.read_text(encoding="utf-8")
            start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
            path.write_text(text[:start] + "\n" + _table() + text[end:], encoding="utf-8")
            terminalreporter.write_line(f"cluster fault table written to {path}")
    for local, seconds, rss in _started:
        terminalreporter.write_line(
            f"Kafka cluster (locked down) at {local.bootstrap}: started in {seconds:.1f}s, "
            f"{sum(rss.values()):.0f} MiB resident ({', '.join(f'{i}: {mb:.0f}' for i, mb in rss.items())})"
        )
