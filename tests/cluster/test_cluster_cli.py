"""``evhub kafka --brokers 3 --secure --data DIR``: the locked-down cluster as a user starts it, keeps it across a
restart, and refuses to open its data without its authorizer."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from services.shared.kafka import make_producer
from services.shared.kafka_connection import KafkaConnection
from services.shared.local_kafka import die_with_parent
from services.shared.tls import CertFiles
from tests.waiting import Bounded

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]
READY = "Ctrl-C or SIGTERM stops it."


async def _evhub_kafka(data: Path, *flags: str) -> tuple[asyncio.subprocess.Process, list[str]]:
    """Start ``evhub kafka --brokers 3 … --data DATA`` and return it with what it printed until it serves (or until
    it exited)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("EVHUB_")}, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", "kafka", "--brokers", "3", *flags, "--data", str(data),
        "--jurisdiction", "DE", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, cwd=ROOT,
        start_new_session=True, preexec_fn=die_with_parent,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    try:
        async with asyncio.timeout(240):
            while line := (await proc.stdout.readline()).decode():
                lines.append(line.rstrip())
                if line.strip() == READY:
                    break
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise Bounded(f"evhub kafka did not serve in 240 s: {lines[-10:]}") from None
    return proc, lines


async def _stop(proc: asyncio.subprocess.Process) -> str:
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout is not None
    async with asyncio.timeout(120):
        rest = (await proc.stdout.read()).decode()
        assert await proc.wait() == 0, rest
    return rest


def _value(lines: list[str], pattern: str) -> str:
    found = [m.group(1) for line in lines if (m := re.search(pattern, line))]
    assert found, f"{pattern} not in {lines}"
    return found[0]


async def test_the_locked_down_cluster_keeps_its_address_data_and_acls_across_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "cluster"
    proc, lines = await _evhub_kafka(data, "--secure")
    try:
        bootstrap = _value(lines, r"EVHUB_KAFKA_BOOTSTRAP=(\S+)")
        assert "brokers [1, 2, 3], controllers [101, 102, 103]" in "\n".join(lines)
        assert re.search(r"ACLs: \d+ created, 0 already in force", "\n".join(lines))
        cert, key, ca = (_value(lines, rf"publisher: .*EVHUB_KAFKA_SSL_{n}=(\S+)") for n in ("CERT", "KEY", "CA"))
        publisher = make_producer(KafkaConnection(bootstrap, CertFiles(Path(cert), Path(key), Path(ca))),
                                  client_id="cli-test")  # fmt: skip
        await publisher.start()  # the printed settings are a working principal
        try:
            await publisher.send_and_wait("evidence.DE", b"kept", key=b"k")
        finally:
            await publisher.stop()
    finally:
        assert "Kafka stopped." in await _stop(proc)

    proc, lines = await _evhub_kafka(data, "--secure")
    try:
        assert _value(lines, r"EVHUB_KAFKA_BOOTSTRAP=(\S+)") == bootstrap  # the same address
        assert "topics created: (all existed)" in lines
        assert re.search(r"ACLs: 0 created, \d+ already in force", "\n".join(lines))
        assert "(kept across restarts)" in "\n".join(lines)
    finally:
        await _stop(proc)

    refused, lines = await _evhub_kafka(data)  # its data must never be opened without the authorizer
    assert await asyncio.wait_for(refused.wait(), 60) == 4
    assert any("was created with --secure" in line for line in lines), lines
