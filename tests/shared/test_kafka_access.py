"""How a hub client reaches Kafka (KafkaConnection, KafkaSettings' TLS files), who may do what (the ACL table), and
what the local cluster's nodes are configured with — the pure parts, without a broker."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.shared.errors import ConfigurationError
from services.shared.kafka_acls import (
    ADMIN,
    BROKER,
    PRINCIPAL_MAPPING_RULES,
    SERVICES,
    Grant,
    HubTopicNames,
    hub_grants,
)
from services.shared.kafka_connection import KafkaConnection, connection_of
from services.shared.local_cluster import NodeTLS, layout
from services.shared.local_kafka import render_properties
from services.shared.settings import KafkaSettings
from services.shared.tls import CertFiles, issue_leaf


def test_a_bare_address_is_plaintext_and_a_certificate_makes_it_mutual_tls(tmp_path: Path) -> None:
    plain = connection_of("127.0.0.1:9092")
    assert plain.aiokafka_options() == {"bootstrap_servers": "127.0.0.1:9092", "security_protocol": "PLAINTEXT"}
    assert plain.librdkafka_config() == {"bootstrap.servers": "127.0.0.1:9092", "security.protocol": "PLAINTEXT"}
    files = issue_leaf(tmp_path, "kafka.gateway", cn="gateway", unit="evhub-kafka")
    tls = KafkaConnection("127.0.0.1:9093", files)
    options = tls.aiokafka_options()
    assert options["security_protocol"] == "SSL"
    assert options["ssl_context"].check_hostname
    config = tls.librdkafka_config()
    assert config["ssl.certificate.location"] == str(files.cert)
    assert config["ssl.endpoint.identification.algorithm"] == "https"
    assert str(tls) == "127.0.0.1:9093"  # what logs and errors show: never the files


def test_an_unloadable_client_certificate_is_a_configuration_error(tmp_path: Path) -> None:
    files = issue_leaf(tmp_path, "kafka.audit", cn="audit", unit="evhub-kafka")
    other = issue_leaf(tmp_path, "kafka.gateway", cn="gateway", unit="evhub-kafka")
    mismatched = CertFiles(cert=files.cert, key=other.key, ca=files.ca)
    with pytest.raises(ConfigurationError, match="cannot load the Kafka client certificate"):
        KafkaConnection("127.0.0.1:9093", mismatched).aiokafka_options()


@pytest.mark.parametrize(
    ("given", "message"),
    [({"ssl_cert": "c.pem"}, "EVHUB_KAFKA_SSL_KEY, EVHUB_KAFKA_SSL_CA not set"),
     ({"ssl_cert": "c.pem", "ssl_key": "k.pem", "ssl_ca": "missing.pem"}, "not readable"),
     ({}, "no Kafka bootstrap")],
    ids=["half", "unreadable", "no-address"],
)  # fmt: skip
def test_kafka_tls_settings_are_all_three_files_or_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, given: dict[str, str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    for name in ("c.pem", "k.pem"):
        (tmp_path / name).write_text("x")
    bootstrap = None if not given else "127.0.0.1:9092"
    with pytest.raises(ConfigurationError, match=message):
        KafkaSettings(bootstrap=bootstrap, **given).connection()  # type: ignore[arg-type]


def test_blank_tls_variables_mean_plaintext(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("EVHUB_KAFKA_SSL_CERT", "EVHUB_KAFKA_SSL_KEY", "EVHUB_KAFKA_SSL_CA"):
        monkeypatch.setenv(name, " ")
    assert KafkaSettings(bootstrap="127.0.0.1:9092").connection().tls is None


#: The table of docs/operations.md, row by row: (principal, resource, name, operations).
DOCUMENTED = {
    ("publisher", "topic", "evidence.", frozenset({"write", "read", "describe_configs"})),
    ("publisher", "topic", "hub.keys", frozenset({"read", "describe_configs"})),
    ("publisher", "transactional_id", "evhub-publisher.", frozenset({"write"})),
    ("gateway", "topic", "evidence.", frozenset({"read", "describe_configs"})),
    ("gateway", "topic", "hub.keys", frozenset({"read", "describe_configs"})),
    ("gateway", "topic", "hub.policy", frozenset({"read", "describe_configs"})),
    ("gateway", "topic", "hub.audit", frozenset({"write", "describe_configs"})),
    ("gateway", "topic", "hub.deadletter", frozenset({"write", "describe_configs"})),
    ("audit", "topic", "hub.audit", frozenset({"read", "describe_configs"})),
    ("audit", "topic", "hub.deadletter", frozenset({"write", "describe_configs"})),
    ("policy-admin", "topic", "hub.policy", frozenset({"read", "write", "describe_configs"})),
    ("key-custody", "topic", "hub.keys", frozenset({"read", "write", "describe_configs"})),
}


def test_the_grants_are_exactly_the_documented_table() -> None:
    rows: dict[tuple[str, str, str], set[str]] = {}
    for g in hub_grants():
        rows.setdefault((g.principal, g.resource, g.name), set()).add(g.operation)
    assert {(p, r, n, frozenset(ops)) for (p, r, n), ops in rows.items()} == DOCUMENTED
    assert all(g.principal in SERVICES for g in hub_grants())
    assert not {"create", "delete", "alter", "alter_configs", "all"} & {g.operation for g in hub_grants()}
    prefixed = {g.name for g in hub_grants() if g.pattern == "prefixed"}
    assert prefixed == {"evidence.", "evhub-publisher."}


def test_grants_follow_the_topic_names_they_are_given() -> None:
    names = HubTopicNames(keys="hub.keys.t1", audit="hub.audit.t1")
    grants = set(hub_grants(names))
    assert Grant("gateway", "topic", "literal", "hub.audit.t1", "write") in grants
    assert not any(g.name in ("hub.keys", "hub.audit") for g in grants)


@pytest.mark.parametrize(
    ("subject", "principal"),
    [("CN=gateway,OU=evhub-kafka,O=Evidence Hub dev", "gateway"),
     ("CN=kafka-admin,OU=evhub-kafka,O=Any Org", "kafka-admin"),
     ("O=Evidence Hub dev,CN=gateway", None),  # the gateway's HTTPS certificate: no OU
     ("CN=gateway,OU=other,O=Evidence Hub dev", None),
     ("CN=gateway,OU=evhub-kafka,O=x,OU=evhub-kafka", None),
     ("CN=Gateway,OU=evhub-kafka,O=x", None),  # principals are lower case
     ("CN=office-DE-GBA-WCU,O=Evidence Hub dev", None)],
)  # fmt: skip
def test_only_kafka_client_certificates_map_to_a_short_principal(subject: str, principal: str | None) -> None:
    """Kafka's RULE syntax is a Java regex; this one uses nothing Python's re reads differently."""
    rule = PRINCIPAL_MAPPING_RULES.split("/")[0].removeprefix("RULE:")
    match = re.match(rule, subject)
    assert (match.group(1) if match else None) == principal
    assert PRINCIPAL_MAPPING_RULES.endswith(",DEFAULT")  # anything else keeps its whole DN: named by no ACL


def test_cluster_nodes_brokers_and_a_static_quorum(tmp_path: Path) -> None:
    tls = NodeTLS(keystore=tmp_path / "k.pem", truststore=tmp_path / "ca.pem")
    nodes = layout(tls=tls)
    ports = [n.ready_port for n in nodes]
    assert len(set(ports)) == 6
    controllers = [n for n in nodes if n.role == "controller"]
    brokers = [n for n in nodes if n.role == "broker"]
    assert [n.node_id for n in controllers] == [101, 102, 103]
    assert [n.node_id for n in brokers] == [1, 2, 3]
    assert len({n.cluster_id for n in nodes}) == 1
    for node in nodes:
        props = node.properties(tmp_path / "data")
        render_properties(props)  # no empty values
        assert node.format_options() == []  # a static quorum is formatted without --standalone
        assert props["controller.quorum.voters"] == ",".join(f"{c.node_id}@127.0.0.1:{c.controller_port}"
                                                             for c in controllers)  # fmt: skip
        assert set(props["listener.security.protocol.map"].split(",")) == {"SSL:SSL", "CONTROLLER:SSL"}
        assert props["ssl.client.auth"] == "required"
        assert props["allow.everyone.if.no.acl.found"] == "false"
        assert props["super.users"] == f"User:{BROKER};User:{ADMIN}"
        assert "127.0.0.1" in props["listeners"]
    broker = brokers[0].properties(tmp_path / "data")
    assert broker["min.insync.replicas"] == "2"
    assert broker["default.replication.factor"] == "3"
    assert broker["unclean.leader.election.enable"] == "false"
    assert broker["transaction.state.log.min.isr"] == "2"
    assert "min.insync.replicas" not in controllers[0].properties(tmp_path / "data")
