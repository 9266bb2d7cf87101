"""docker-compose.yml can't run here (no Docker engine), so its structure is checked instead."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from services.shared.local_cluster import NodeTLS, security_properties

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return data


def _brokers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _kafka(compose).items() if s["environment"]["KAFKA_PROCESS_ROLES"] == "broker"}


def test_every_service_has_an_image_or_a_build_that_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            build = service["build"]
            context = ROOT / (build["context"] if isinstance(build, dict) else build)
            dockerfile = context / (build.get("dockerfile", "Dockerfile") if isinstance(build, dict) else "Dockerfile")
            assert dockerfile.is_file(), f"{name}: {dockerfile} missing"


def _controllers(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in _kafka(compose).items() if s["environment"]["KAFKA_PROCESS_ROLES"] == "controller"}


def _kafka(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in compose["services"].items() if str(s.get("image", "")).startswith("apache/kafka")}


def _env_name(key: str) -> str:
    """The apache/kafka image's mapping of a config key to its environment variable."""
    return "KAFKA_" + key.replace("-", "___").replace("_", "__").replace(".", "_").upper()


def test_three_brokers_and_a_three_voter_controller_quorum_as_the_local_cluster(compose: dict[str, Any]) -> None:
    brokers, controllers = _brokers(compose), _controllers(compose)
    assert len(brokers) == 3
    assert len(controllers) == 3
    assert {b["environment"]["KAFKA_PROCESS_ROLES"] for b in brokers.values()} == {"broker"}
    voters = {str(n["environment"]["KAFKA_CONTROLLER_QUORUM_VOTERS"]) for n in _kafka(compose).values()}
    assert len(voters) == 1, "nodes disagree on the quorum"
    members = {int(v.split("@")[0]): v.split("@")[1].split(":")[0] for v in voters.pop().split(",")}
    assert members == {int(c["environment"]["KAFKA_NODE_ID"]): c["hostname"] for c in controllers.values()}
    assert {int(b["environment"]["KAFKA_NODE_ID"]) for b in brokers.values()} == {1, 2, 3}  # as local_cluster
    assert set(members) == {101, 102, 103}
    assert len({str(n["environment"]["CLUSTER_ID"]) for n in _kafka(compose).values()}) == 1


def test_cluster_is_durable_rf3_min_isr2_no_unclean_election(compose: dict[str, Any]) -> None:
    for name, broker in _brokers(compose).items():
        env = broker["environment"]
        assert int(env["KAFKA_DEFAULT_REPLICATION_FACTOR"]) == 3, name
        assert int(env["KAFKA_MIN_INSYNC_REPLICAS"]) == 2, name
        assert int(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == 3, name
        assert int(env["KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"]) == 2, name
        assert str(env["KAFKA_UNCLEAN_LEADER_ELECTION_ENABLE"]).lower() == "false", name
        assert str(env["KAFKA_ADVERTISED_LISTENERS"]).endswith(f"{broker['hostname']}:9092"), name
        assert "SSL://" not in str(env["KAFKA_ADVERTISED_LISTENERS"]), "the image would demand JKS files"


def test_every_node_is_locked_down_exactly_as_the_local_cluster(compose: dict[str, Any], tmp_path: Path) -> None:
    """mTLS on every listener, the same principal mapping, authorizer and super users as ``evhub kafka --secure``."""
    local = security_properties(NodeTLS(keystore=tmp_path / "k.pem", truststore=tmp_path / "ca.pem"))
    for name, node in _kafka(compose).items():
        env = {k: str(v).replace("$$", "$") for k, v in node["environment"].items()}  # compose escapes $ as $$
        protocols = {pair.split(":")[1] for pair in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")}
        assert protocols == {"SSL"}, f"{name}: every listener speaks TLS"
        for key, value in local.items():
            if key.endswith(".location"):
                assert env[_env_name(key)].startswith("/etc/kafka/secrets/"), (name, key)
                continue
            assert env[_env_name(key)] == value, (name, key)
        assert env["KAFKA_SSL_KEYSTORE_LOCATION"].endswith("kafka.kafka-broker.bundle.pem")
        assert "./var/secrets:/etc/kafka/secrets:ro" in node["volumes"], name


def test_hub_services_point_at_all_brokers_each_with_its_own_kafka_principal(compose: dict[str, Any]) -> None:
    hub = {n: s for n, s in compose["services"].items() if n not in _kafka(compose)}
    principals = {"publisher": "publisher", "gateway": "gateway", "policy": "policy-admin",
                  "kafka-acls": "kafka-admin"}  # fmt: skip
    assert set(hub) == set(principals)
    for name, service in hub.items():
        env = service["environment"]
        bootstrap = str(env["EVHUB_KAFKA_BOOTSTRAP"])
        assert sorted(h.split(":")[0] for h in bootstrap.split(",")) == sorted(_brokers(compose)), name
        assert env["EVHUB_KAFKA_SSL_CERT"] == f"/run/secrets/kafka.{principals[name]}.pem", name
        assert env["EVHUB_KAFKA_SSL_KEY"] == f"/run/secrets/kafka.{principals[name]}.key", name
        assert env["EVHUB_KAFKA_SSL_CA"] == "/run/secrets/ca.pem", name
        assert int(env["EVHUB_KAFKA_REPLICATION_FACTOR"]) == 3, name
        assert int(env["EVHUB_KAFKA_MIN_INSYNC_REPLICAS"]) == 2, name
        if name != "kafka-acls":  # services start once the topics and ACLs are provisioned
            assert service["depends_on"] == {"kafka-acls": {"condition": "service_completed_successfully"}}, name
    assert hub["kafka-acls"]["command"][:2] == ["kafka", "acls"]
    assert sorted(hub["kafka-acls"]["depends_on"]) == sorted(_brokers(compose))
