"""The locked-down three-broker cluster the tests in this folder share, started once per session when needed.

Brokers 1-3 and controllers 101-103 (``services.shared.local_cluster``), mTLS on every listener with development
certificates from the hub's CA, the StandardAuthorizer, and the hub's topics and ACLs provisioned by ``kafka-admin``
exactly as ``evhub kafka --brokers 3 --secure`` does. Fault tests kill, stop and restart its nodes; before every
test :func:`healthy` brings every node back and waits until every partition has all its replicas in sync again.
The session's single embedded broker (``tests/conftest.py``) is untouched: most tests keep using it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from aiokafka.errors import KafkaError

from services.shared.kafka import make_admin
from services.shared.kafka_admin import provision
from services.shared.local_cluster import LocalCluster
from services.shared.local_kafka import ensure_jars
from services.shared.settings import KafkaSettings

#: What every hub service on the cluster is configured with (docker-compose.yml's values).
REPLICATED = KafkaSettings(replication_factor=3, min_insync_replicas=2, request_timeout_ms=10_000)
JURISDICTIONS = ["DE", "FR", "SE"]
_started: list[tuple[LocalCluster, float, dict[int, float]]] = []


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    libs = ensure_jars(KafkaSettings().cache_dir)
    local = LocalCluster.throwaway(libs, root=tmp_path_factory.mktemp("cluster"), secure=True)
    local.start()
    try:
        asyncio.run(provision(local.connection(), REPLICATED, JURISDICTIONS))
        _started.append((local, local.startup_seconds, local.rss_mb()))
        yield local
    finally:
        local.stop()


async def in_sync(cluster: LocalCluster, *, within_s: float = 90.0) -> None:
    """Wait until every partition of every topic has a leader and all its replicas in sync.

    Raises:
        AssertionError: not within ``within_s``.
    """
    deadline = time.monotonic() + within_s
    lagging: list[str] = ["(not asked yet)"]
    while time.monotonic() < deadline:
        admin = make_admin(cluster.connection(), request_timeout_ms=5_000)
        try:
            await admin.start()
            described = await admin.describe_topics()
            lagging = [f"{t['topic']}[{p['partition']}] isr {p['isr']} of {p['replicas']} leader {p['leader']}"
                       for t in described for p in t["partitions"]
                       if p["leader"] < 0 or sorted(p["isr"]) != sorted(p["replicas"])]  # fmt: skip
            if not lagging:
                return
        except (KafkaError, OSError) as exc:  # a node still starting: ask again
            lagging = [repr(exc)]
        finally:
            await admin.close()
        await asyncio.sleep(0.5)
    raise AssertionError(f"the cluster did not get back in sync within {within_s:.0f}s: {lagging[:5]}")


@pytest.fixture
async def healthy(cluster: LocalCluster) -> LocalCluster:
    """The cluster with every node running and every partition fully in sync (a fault test may have left a node
    killed or frozen)."""
    for node_id in cluster.nodes:
        node = cluster.node(node_id)
        if node.pid is None:
            await asyncio.to_thread(node.start)
        else:
            cluster.thaw(node_id)
    await in_sync(cluster)
    return cluster


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for local, seconds, rss in _started:
        terminalreporter.write_line(
            f"Kafka cluster (locked down) at {local.bootstrap}: started in {seconds:.1f}s, "
            f"{sum(rss.values()):.0f} MiB resident ({', '.join(f'{i}: {mb:.0f}' for i, mb in rss.items())})"
        )
