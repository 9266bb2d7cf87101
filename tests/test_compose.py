"""docker-compose.yml can't run here (no Docker engine), so its structure is checked instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _brokers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if str(s.get("image", "")).startswith("apache/kafka")}


def test_every_service_has_an_image_or_a_build_that_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            build = service["build"]
            context = ROOT / (build["context"] if isinstance(build, dict) else build)
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def test_three_brokers_agree_on_one_controller_quorum(compose: dict[str, Any]) -> None:
    brokers = _brokers(compose)
    assert len(brokers) == 3
    voters = {str(b["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"]) for b in brokers.values()}
    assert len(voters) == 1, "brokers disagree on the quorum"
    members = {int(v.split("@")[0]): v.split("@")[1].split(":")[0] for v in voters.pop().split(",")}
    node_ids = {int(b["environment"]["KAFKA_NODE_ID"]): b["hostname"] for b in brokers.values()}
    assert members == node_ids
    assert len({str(b["environment"]["CLUSTER_ID"]) for b in brokers.values()}) == 1


def test_cluster_is_durable_rf3_min_isr2_no_unclean_election(compose: dict[str, Any]) -> None:
    for name, broker in _brokers(compose).items():
        env = broker["environment"]
        assert int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == 3, name
        assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) == 2, name
        assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 3, name
        assert int(env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"]) == 2, name
        assert str(env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"]).lower() == "false", name
        assert str(env["KAFKA_ADVERTISED_LISTENERS"]).endswith(f"{broker['hostname']}:9092"), name


def test_hub_services_point_at_all_brokers(compose: dict[str, Any]) -> None:
    hub = {n: s for n, s in compose["services"].items() if n not in _brokers(compose)}
    for name, service in hub.items():
        bootstrap = str(service["environment"]["EVHUB_KAFKA_BOOTSTRAP"])
        assert sorted(h.split(":")[0] for h in bootstrap.split(",")) == sorted(_brokers(compose)), name
        assert service.get("depends_on"), f"{name} must start after the brokers"
