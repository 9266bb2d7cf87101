"""Session-wide real infrastructure: one Kafka cluster for the whole run (see services.shared.cluster)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from hypothesis import settings

from services.shared.cluster import KafkaTarget, kafka_cluster
from services.shared.settings import KafkaSettings

# Shared, noisy machines: a property is about what is accepted, never about how fast one example runs.
settings.register_profile("evhub", deadline=None)
settings.load_profile("evhub")

pytest_plugins = ["tests.publishing_stack"]  # the `stack` and `codec` fixtures, shared by several folders

_started: list[KafkaTarget] = []


@pytest.fixture(scope="session")
def kafka() -> Iterator[KafkaTarget]:
    with kafka_cluster(KafkaSettings()) as target:
        _started.append(target)
        yield target


@pytest.fixture
def topic_name(request: pytest.FixtureRequest) -> str:
    """A topic name no other test uses (tests share one broker)."""
    return f"t.{request.node.name[:40].replace('[', '.').replace(']', '')}.{uuid.uuid4().hex[:8]}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    for target in _started:
        line = f"Kafka ({target.kind}) at {target.bootstrap}"
        if target.kind == "local":
            line += f": started in {target.startup_seconds:.1f}s from {target.libs}"
        terminalreporter.write_line(line)
