"""The embedded broker: configuration it writes, jar cache, start/stop by PID, clear errors, persistent mode."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from services.shared.cluster import KafkaTarget
from services.shared.errors import BrokerStartError
from services.shared.kafka import TopicSpec, ensure_topics, make_producer, read_to_end
from services.shared.local_kafka import (
    LocalKafka,
    ensure_jars,
    new_cluster_id,
    render_properties,
    server_properties,
)
from services.shared.settings import KafkaSettings

ROOT = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie still answers kill(0); it is gone for our purposes once reaped
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


def test_properties_bind_loopback_and_never_write_empty_values(tmp_path: Path) -> None:
    props = server_properties(broker_port=19092, controller_port=19093, log_dir=tmp_path)
    text = render_properties(props)
    assert "listeners=PLAINTEXT://127.0.0.1:19092,CONTROLLER://127.0.0.1:19093\n" in text
    assert "advertised.listeners=PLAINTEXT://127.0.0.1:19092\n" in text
    assert "auto.create.topics.enable=false\n" in text
    assert all(not line.endswith("=") for line in text.splitlines())
    with pytest.raises(ValueError, match="empty values"):
        render_properties({**props, "super.users": ""})


def test_cluster_id_is_22_chars_of_base64url_over_16_bytes() -> None:
    ids = {new_cluster_id() for _ in range(2000)}
    assert len(ids) == 2000
    for cid in ids:
        assert len(cid) == 22
        assert not cid.startswith("-"), "the storage tool would read it as an option"
        assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_second_resolution_reuses_cached_jars_without_maven(kafka: KafkaTarget) -> None:
    if kafka.kind != "local":
        pytest.skip("only the embedded broker resolves jars")
    settings = KafkaSettings()
    # With Maven made unavailable, a cache hit must still answer; a miss would raise BrokerStartError.
    libs = ensure_jars(settings.cache_dir, mvn="/nonexistent/mvn")
    assert libs == kafka.libs
    names = {p.name for p in libs.glob("*.jar")}
    assert any(n.startswith("kafka_2.13-") for n in names)
    assert any(n.startswith("log4j-slf4j-impl-") for n in names), "the logging binding must be there"


def test_broker_logs_to_its_file(kafka: KafkaTarget) -> None:
    if kafka.kind != "local":
        pytest.skip("only the embedded broker has a local log file")
    assert kafka.log_file is not None
    assert "Kafka Server started" in kafka.log_file.read_text()


def test_stop_leaves_no_broker_process(kafka: KafkaTarget, tmp_path: Path) -> None:
    if kafka.libs is None:
        pytest.skip("only the embedded broker is started from jars")
    broker = LocalKafka(libs=kafka.libs, workdir=tmp_path / "k", heap_mb=256)
    with broker:
        pid = broker.pid
        assert pid is not None
        assert _alive(pid)
        assert broker.bootstrap.startswith("127.0.0.1:")
    assert not _alive(pid)
    with pytest.raises(BrokerStartError, match="not running"):
        _ = broker.bootstrap


def test_bad_broker_config_is_a_clear_error_and_leaves_nothing_running(kafka: KafkaTarget, tmp_path: Path) -> None:
    if kafka.libs is None:
        pytest.skip("only the embedded broker is started from jars")
    broker = LocalKafka(libs=kafka.libs, workdir=tmp_path / "bad", heap_mb=256, extra={"node.id": "not-a-number"})
    with pytest.raises(BrokerStartError, match="formatting KRaft storage failed"):
        broker.start()
    assert broker.pid is None


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> None:
    await ensure_topics(bootstrap, [TopicSpec(topic, 3)])
    producer = make_producer(bootstrap, client_id="persistence")
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send(topic, value, key=str(i % 7).encode())
        await producer.flush()  # acks=all: every record is acknowledged before the broker is killed
    finally:
        await producer.stop()


async def test_a_persistent_broker_killed_with_sigkill_restarts_on_its_data_and_address_with_nothing_lost(
    kafka: KafkaTarget, tmp_path: Path
) -> None:
    if kafka.libs is None:
        pytest.skip("only the embedded broker is started from jars")
    workdir = tmp_path / "persistent"
    sent = [f"evidence-{i}".encode() for i in range(300)]
    first = LocalKafka(libs=kafka.libs, workdir=workdir, heap_mb=256, persistent=True)
    await first.astart()
    try:
        assert first.formatted_now
        bootstrap, pid = first.bootstrap, first.pid
        assert pid is not None
        await _produce(bootstrap, "evidence.XX", sent)
        first.signal(signal.SIGKILL)
        assert not _alive(pid)
    finally:
        await first.astop()
    again = LocalKafka(libs=kafka.libs, workdir=workdir, heap_mb=256, persistent=True)
    await again.astart()
    try:
        assert not again.formatted_now, "formatted once, never again"
        assert again.bootstrap == bootstrap, "the address survives the restart"
        received = await read_to_end(again.bootstrap, "evidence.XX")
        assert sorted(r.value for r in received if r.value is not None) == sorted(sent)
        intruder = LocalKafka(libs=kafka.libs, workdir=workdir, heap_mb=256, persistent=True)
        with pytest.raises(BrokerStartError, match="already running"):
            await intruder.astart()
        assert intruder.pid is None
    finally:
        await again.astop()
    assert (workdir / "data" / "meta.properties").is_file(), "a persistent broker's data stays after stop"


def _run_evhub_kafka(env: dict[str, str], *args: str) -> tuple[subprocess.Popen[str], list[str]]:
    """Start ``evhub kafka`` and read its output until it says it is ready (bounded by the broker's own timeout)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.cli", "kafka", *args], env=env, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    for line in proc.stdout:  # ends when the process exits; the broker start is bounded (90 s)
        lines.append(line)
        if "stops it" in line:
            break
    return proc, lines


def _sigterm(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    return out


def test_evhub_kafka_stopped_with_sigterm_cleans_up_and_keeps_persistent_data(
    kafka: KafkaTarget, tmp_path: Path
) -> None:
    if kafka.libs is None:
        pytest.skip("only the embedded broker is started from jars")
    env = {**os.environ, "EVHUB_KAFKA_WORK_ROOT": str(tmp_path / "work"), "EVHUB_KAFKA_HEAP_MB": "256"}
    env.pop("EVHUB_KAFKA_BOOTSTRAP", None)
    proc, lines = _run_evhub_kafka(env)
    assert any("throwaway" in line for line in lines), lines
    assert list((tmp_path / "work").iterdir()) != []
    out = _sigterm(proc)
    assert proc.returncode == 0, out
    assert list((tmp_path / "work").iterdir()) == [], "SIGTERM, like Ctrl-C, removes the throwaway directory"

    data = tmp_path / "kafka-data"
    proc, lines = _run_evhub_kafka(env, "--data", str(data), "--jurisdiction", "XX")
    assert any(f"data: {data}" in line for line in lines), lines
    _sigterm(proc)
    assert proc.returncode == 0
    assert (data / "node.json").is_file()
    assert (data / "data" / "meta.properties").is_file(), "the persistent broker's data is kept"
