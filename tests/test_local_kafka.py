"""The embedded broker: configuration it writes, jar cache, start/stop by PID, clear errors."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from services.shared.cluster import KafkaTarget
from services.shared.errors import BrokerStartError
from services.shared.local_kafka import (
    LocalKafka,
    ensure_jars,
    new_cluster_id,
    render_properties,
    server_properties,
)
from services.shared.settings import KafkaSettings


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
