"""The one place that decides which Kafka a process talks to (see :class:`KafkaSettings`).

Yields a :class:`KafkaTarget`: the bootstrap address and, for the embedded broker, where its data and log live.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from services.shared.errors import BrokerStartError
from services.shared.local_kafka import LocalKafka, ensure_jars, free_port
from services.shared.settings import KafkaSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KafkaTarget:
    bootstrap: str
    kind: Literal["external", "testcontainers", "local"]
    log_dir: Path | None = None
    log_file: Path | None = None
    libs: Path | None = None
    pid: int | None = None
    startup_seconds: float = 0.0
    data_dir: Path | None = None  # a persistent broker's directory (None: throwaway, removed on stop)


def docker_answers() -> bool:
    """True if a Docker engine responds to a ping (the docker SDK comes with testcontainers)."""
    try:
        import docker  # deferred: only needed on machines that have an engine

        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # no SDK, no socket, engine down: all mean "no"
        return False


@contextlib.contextmanager
def _testcontainers_kafka(settings: KafkaSettings) -> Iterator[KafkaTarget]:  # pragma: no cover - needs Docker
    from testcontainers.core.container import DockerContainer
    from testcontainers.core.waiting_utils import wait_for_logs

    host_port = free_port()
    env = {
        "KAFKA_NODE_ID": "1",
        "KAFKA_PROCESS_ROLES": "broker,controller",
        "KAFKA_LISTENERS": "PLAINTEXT://0.0.0.0:9092,CONTROLLER://0.0.0.0:9093",
        "KAFKA_ADVERTISED_LISTENERS": f"PLAINTEXT://127.0.0.1:{host_port}",
        "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "KAFKA_CONTROLLER_LISTENER_NAMES": "CONTROLLER",
        "KAFKA_CONTROLLER_QUORUM_VOTERS": "1@localhost:9093",
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR": "1",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR": "1",
        "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS": "0",
        "KAFKA_AUTO_CREATE_TOPICS_ENABLE": "false",
    }
    container = DockerContainer(settings.image).with_bind_ports(9092, host_port)
    for key, value in env.items():
        container = container.with_env(key, value)
    with container:
        wait_for_logs(container, "Kafka Server started", timeout=120)
        yield KafkaTarget(bootstrap=f"127.0.0.1:{host_port}", kind="testcontainers")


@contextlib.contextmanager
def kafka_cluster(settings: KafkaSettings) -> Iterator[KafkaTarget]:
    """Provide a Kafka cluster for the duration of the block; stop whatever this call started.

    Raises:
        BrokerStartError: the local broker (or container) could not be started.
    """
    if settings.bootstrap:
        yield KafkaTarget(bootstrap=settings.bootstrap, kind="external")
        return
    if settings.provider == "testcontainers":
        if not docker_answers():
            raise BrokerStartError("EVHUB_KAFKA=testcontainers, but no Docker engine answers")
        with _testcontainers_kafka(settings) as target:
            yield target
        return
    broker = local_broker(settings, ensure_jars(settings.cache_dir))
    try:
        broker.start()
        yield _local_target(broker)
    finally:
        broker.stop()


@contextlib.asynccontextmanager
async def akafka_cluster(settings: KafkaSettings) -> AsyncIterator[KafkaTarget]:
    """:func:`kafka_cluster` for async callers: the local broker starts without blocking the loop."""
    if settings.bootstrap or settings.provider == "testcontainers":
        with kafka_cluster(settings) as target:
            yield target
        return
    import asyncio

    broker = local_broker(settings, await asyncio.to_thread(ensure_jars, settings.cache_dir))
    try:
        await broker.astart()
        yield _local_target(broker)
    finally:
        await broker.astop()


def local_broker(settings: KafkaSettings, libs: Path) -> LocalKafka:
    """The embedded broker the settings ask for: persistent on ``data_dir`` if set, else throwaway."""
    if settings.data_dir is not None:
        return LocalKafka(libs=libs, workdir=settings.data_dir, heap_mb=settings.heap_mb, persistent=True)
    return LocalKafka.throwaway(libs, root=settings.work_root, heap_mb=settings.heap_mb)


def _local_target(broker: LocalKafka) -> KafkaTarget:
    return KafkaTarget(
        bootstrap=broker.bootstrap, kind="local", log_dir=broker.log_dir, log_file=broker.log_file,
        libs=broker.libs, pid=broker.pid, startup_seconds=broker.startup_seconds,
        data_dir=broker.workdir if broker.persistent else None,
    )  # fmt: skip
