"""The fault suite's broker (its own, persistent: it is killed, stopped and restarted on its data) and its report.

Every scenario adds a :class:`tests.faults.harness.Row`. At the end of the run the rows are printed; with
``EVHUB_RELIABILITY_REPORT=docs/reliability.md`` (``make reliability``) they replace the table between the
``<!-- faults:begin -->`` and ``<!-- faults:end -->`` markers of that file — the numbers there come from a real run.
``EVHUB_FAULT_RUNS=N`` multiplies how often each fault is injected (``make soak``).
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.shared.local_kafka import LocalKafka, ensure_jars, kafka_version
from services.shared.settings import KafkaSettings
from tests.faults.harness import LIVE, Row

_rows: list[Row] = []
_began = time.monotonic()
BEGIN, END = "<!-- faults:begin -->", "<!-- faults:end -->"


def runs(default: int) -> int:
    """How many times a scenario injects its fault: ``default`` times ``EVHUB_FAULT_RUNS`` (1 in ``make test``)."""
    return default * max(1, int(os.environ.get("EVHUB_FAULT_RUNS", "1")))


@pytest.fixture(scope="session")
def fault_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A persistent embedded broker for the fault suite alone (the session's broker is shared by every test and
    must never be stopped)."""
    libs = ensure_jars(KafkaSettings().cache_dir)
    broker = LocalKafka(libs=libs, workdir=tmp_path_factory.mktemp("fault-broker"), heap_mb=384, persistent=True)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(autouse=True)
def _reap() -> Iterator[None]:
    """Kill (by PID) whatever a test started and left running, e.g. after a failed assertion."""
    yield
    while LIVE:
        proc = LIVE.pop()
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.fixture
def report() -> Iterator[list[Row]]:
    rows: list[Row] = []
    yield rows
    _rows.extend(rows)


def _table() -> str:
    head = ("| scenario | runs | events at risk | lost | published twice | redelivered records "
            "| sequence numbers signed twice | notes |\n|---|---:|---:|---:|---:|---:|---:|---|\n")  # fmt: skip
    body = "".join(
        f"| {r.scenario} | {r.runs} | {r.at_risk} | {r.lost} | {r.duplicated} | {r.redelivered} | {r.signed_twice} "
        f"| {r.note} |\n"
        for r in _rows
    )
    when = datetime.now(UTC).replace(microsecond=0).isoformat()
    meta = (f"Recorded {when} by `make reliability` ({time.monotonic() - _began:.0f} s wall, "
            f"EVHUB_FAULT_RUNS={os.environ.get('EVHUB_FAULT_RUNS', '1')}): Kafka {kafka_version()} (embedded, "
            f"one node), Python {platform.python_version()}, {os.cpu_count()} CPUs.\n\n")  # fmt: skip
    return meta + head + body


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _rows:
        return
    terminalreporter.write_sep("-", "fault suite")
    terminalreporter.write(_table())
    target = os.environ.get("EVHUB_RELIABILITY_REPORT")
    if target:
        path = Path(target)
        text = path.read_text(encoding="utf-8")
        start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
        path.write_text(text[:start] + "\n" + _table() + text[end:], encoding="utf-8")
        terminalreporter.write_line(f"fault suite table written to {path}")
