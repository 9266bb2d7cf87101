"""Kafka itself refuses every principal outside its role, on the locked-down three-broker cluster.

Each row of the table is one client operation by one certificate — produce, consume, describe (metadata and
configuration), create a topic, use a transactional id — and the broker's answer. The probes are librdkafka
(confluent-kafka) clients configured here from the certificate files alone: the hub's own Kafka code decides
nothing. The answers are Kafka's error codes: ``TOPIC_AUTHORIZATION_FAILED`` and friends. An office's certificate
(issued by the same CA, naming ``urn:evhub:office:…``) is refused everything; a client without a certificate, with
another CA's, or speaking TLS 1.2 does not get past the handshake — on the brokers' and the controllers' ports.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from pathlib import Path
from typing import Any, Literal

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition
from confluent_kafka.admin import (
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ConfigResource,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from services.shared.kafka_acls import Grant, hub_grants
from services.shared.kafka_admin import apply_grants
from services.shared.local_cluster import LocalCluster
from services.shared.tls import CertFiles, issue_leaf

pytestmark = pytest.mark.kafka
Op = Literal["produce", "consume", "describe", "configs", "create", "transaction"]
TOPICS = {"keys": "hub.keys", "policy": "hub.policy", "audit": "hub.audit", "deadletter": "hub.deadletter",
          "evidence": "evidence.DE"}  # fmt: skip
OFFICE = "office-DE-GBA-WCU"
HTTPS_GATEWAY = "https-gateway"
OFFICE_NAMED_PUBLISHER = "office-publisher"

# (principal, operation, target, allowed). Targets name TOPICS or, for transactions, a transactional id.
TABLE: list[tuple[str, Op, str, bool]] = [
    # the publisher: writes evidence, reads it back and hub.keys, fences with its own transactional ids
    ("publisher", "produce", "evidence", True), ("publisher", "consume", "evidence", True),
    ("publisher", "consume", "keys", True), ("publisher", "produce", "keys", False),
    ("publisher", "produce", "policy", False), ("publisher", "consume", "audit", False),
    ("publisher", "describe", "audit", False), ("publisher", "create", "evidence.NEW", False),
    ("publisher", "transaction", "evhub-publisher.k1.evidence.DE", True),
    ("publisher", "transaction", "someone-else.k1", False),
    # the gateway: reads evidence, keys, policy; writes audit and dead letters
    ("gateway", "consume", "evidence", True), ("gateway", "consume", "keys", True),
    ("gateway", "consume", "policy", True), ("gateway", "produce", "audit", True),
    ("gateway", "produce", "deadletter", True), ("gateway", "produce", "evidence", False),
    ("gateway", "produce", "keys", False), ("gateway", "produce", "policy", False),
    ("gateway", "consume", "audit", False), ("gateway", "create", "evidence.NEW", False),
    ("gateway", "transaction", "evhub-publisher.k1.evidence.DE", False),
    # the audit service: reads hub.audit, writes dead letters
    ("audit", "consume", "audit", True), ("audit", "produce", "deadletter", True),
    ("audit", "produce", "audit", False), ("audit", "consume", "evidence", False),
    ("audit", "describe", "evidence", False), ("audit", "consume", "keys", False),
    # policy administration and key custody: their one topic each
    ("policy-admin", "produce", "policy", True), ("policy-admin", "consume", "policy", True),
    ("policy-admin", "produce", "keys", False), ("policy-admin", "consume", "evidence", False),
    ("key-custody", "produce", "keys", True), ("key-custody", "consume", "keys", True),
    ("key-custody", "produce", "policy", False), ("key-custody", "consume", "evidence", False),
    ("key-custody", "produce", "evidence", False),
    # describing a topic's configuration (the services' start-up check) is theirs for their own topics only
    ("gateway", "configs", "audit", True), ("publisher", "configs", "audit", False),
    # an office's certificate from the hub's own CA: nothing at all
    (OFFICE, "produce", "evidence", False), (OFFICE, "consume", "evidence", False),
    (OFFICE, "describe", "evidence", False), (OFFICE, "create", "evidence.NEW", False),
    (OFFICE, "produce", "audit", False), (OFFICE, "consume", "keys", False),
    (OFFICE, "transaction", "evhub-publisher.k1.evidence.DE", False),
    # a certificate whose CN is a service's name but that is not a Kafka client certificate (no OU=evhub-kafka):
    # the gateway's HTTPS certificate (`evhub certs issue --service gateway`), an office that calls itself publisher
    (HTTPS_GATEWAY, "consume", "evidence", False), (HTTPS_GATEWAY, "produce", "audit", False),
    (OFFICE_NAMED_PUBLISHER, "produce", "evidence", False), (OFFICE_NAMED_PUBLISHER, "consume", "keys", False),
]  # fmt: skip
REFUSED = {KafkaError.TOPIC_AUTHORIZATION_FAILED, KafkaError.CLUSTER_AUTHORIZATION_FAILED,
           KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED}  # fmt: skip


def _config(cluster: LocalCluster, files: CertFiles) -> dict[str, Any]:
    return {"bootstrap.servers": cluster.bootstrap, "security.protocol": "SSL", "ssl.ca.location": str(files.ca),
            "ssl.certificate.location": str(files.cert), "ssl.key.location": str(files.key)}  # fmt: skip


def _visible(config: dict[str, Any], topic: str) -> bool | None:
    """True if the principal may see ``topic``'s metadata, False if Kafka refuses it."""
    metadata = AdminClient(config).list_topics(topic=topic, timeout=15)
    error = metadata.topics[topic].error
    if error is not None and error.code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
        return False
    assert error is None, error
    return True


def _produce(config: dict[str, Any], topic: str) -> KafkaError | None:
    outcome: list[KafkaError | None] = []
    producer = Producer({**config, "acks": "all", "enable.idempotence": False, "message.timeout.ms": 15_000})
    producer.produce(topic, b"acl probe", key=b"probe", on_delivery=lambda err, _msg: outcome.append(err))
    producer.flush(20)
    assert outcome, "no delivery report within 20 s"
    return outcome[0]


def _consume(config: dict[str, Any], topic: str) -> KafkaError | None:
    """None if a record was fetched. READ implies DESCRIBE in Kafka, so a topic whose metadata is refused is a
    refused read (librdkafka then waits silently instead of fetching)."""
    if not _visible(config, topic):
        return KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    # librdkafka wants a group id; the probe never joins or commits (its group lookup is refused, and ignored)
    consumer = Consumer({**config, "group.id": "acl-probe", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, 0, OFFSET_BEGINNING)])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is None:
                continue
            error = message.error()
            if error is not None and error.code() == KafkaError.GROUP_AUTHORIZATION_FAILED:
                continue
            return error
        raise AssertionError(f"no record and no refusal from {topic} within 20 s")
    finally:
        consumer.close()


def _create(config: dict[str, Any], topic: str) -> KafkaError | None:
    admin = AdminClient(config)  # kept referenced until the answer is in: a destroyed client fails its futures
    future = admin.create_topics([NewTopic(topic, 1, 3)], request_timeout=15)[topic]
    try:
        future.result(timeout=20)
    except Exception as exc:  # confluent raises KafkaException carrying the KafkaError
        return exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else KafkaError(KafkaError._FAIL)
    return None


def _configs(config: dict[str, Any], topic: str) -> KafkaError | None:
    admin = AdminClient(config)
    futures = admin.describe_configs([ConfigResource(ResourceType.TOPIC, topic)], request_timeout=15)
    try:
        next(iter(futures.values())).result(timeout=20)
    except Exception as exc:
        return exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else KafkaError(KafkaError._FAIL)
    return None


def _transaction(config: dict[str, Any], transactional_id: str) -> KafkaError | None:
    producer = Producer({**config, "transactional.id": transactional_id, "transaction.timeout.ms": 10_000})
    try:
        producer.init_transactions(20)
    except Exception as exc:
        return exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else KafkaError(KafkaError._FAIL)
    return None


def probe(config: dict[str, Any], op: Op, target: str) -> KafkaError | None:
    topic = TOPICS.get(target, target)
    if op == "describe":
        return None if _visible(config, topic) else KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED)
    return {"produce": _produce, "consume": _consume, "create": _create, "configs": _configs,
            "transaction": _transaction}[op](config, topic)  # fmt: skip


@pytest.fixture(scope="module")
def certs(cluster: LocalCluster) -> dict[str, CertFiles]:
    assert cluster.pki is not None
    office = issue_leaf(cluster.pki, OFFICE, uris=("urn:evhub:office:DE-GBA-WCU",))
    https_gateway = issue_leaf(cluster.pki, HTTPS_GATEWAY, cn="gateway")
    named_publisher = issue_leaf(cluster.pki, OFFICE_NAMED_PUBLISHER, cn="publisher",
                                 uris=("urn:evhub:office:publisher",))  # fmt: skip
    # every probed topic holds a record (a keyed one: hub.keys is compacted), so an allowed read has one to fetch
    admin = _config(cluster, cluster.certs["kafka-admin"])
    for topic in TOPICS.values():
        assert _produce(admin, topic) is None
    return {**cluster.certs, OFFICE: office, HTTPS_GATEWAY: https_gateway, OFFICE_NAMED_PUBLISHER: named_publisher}


@pytest.mark.parametrize(("principal", "op", "target", "allowed"), TABLE,
                         ids=[f"{p}-{o}-{t}-{'ok' if a else 'refused'}" for p, o, t, a in TABLE])  # fmt: skip
def test_kafka_answers_each_principal_by_the_acl_table(
    cluster: LocalCluster, certs: dict[str, CertFiles], principal: str, op: Op, target: str, allowed: bool
) -> None:
    error = probe(_config(cluster, certs[principal]), op, target)
    if allowed:
        assert error is None, f"{principal} {op} {target}: {error}"
    else:
        assert error is not None, f"{principal} {op} {target} was allowed"
        assert error.code() in REFUSED, f"{principal} {op} {target}: refused for another reason: {error}"


def _handshake(port: int, ctx: ssl.SSLContext) -> str:
    """Connect, finish the handshake and read: TLS 1.3 reports a missing client certificate only then."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"\x00\x00\x00\x00")
                tls.recv(1)
        except (ssl.SSLError, ConnectionError, OSError) as exc:
            return f"refused: {exc}"
    return "accepted"


@pytest.mark.parametrize("client", ["no certificate", "another CA", "TLS 1.2", "plaintext"])
def test_a_client_without_a_certificate_of_the_hub_ca_cannot_connect(
    cluster: LocalCluster, certs: dict[str, CertFiles], tmp_path: Path, client: str
) -> None:
    ca = certs["kafka-admin"].ca
    ctx = ssl.create_default_context(cafile=str(ca))
    if client == "another CA":  # a certificate that names a super user, but from a CA the cluster does not trust
        forged = issue_leaf(tmp_path / "other-ca", "kafka-admin", unit="evhub-kafka")
        ctx.load_cert_chain(str(forged.cert), str(forged.key))
    elif client == "TLS 1.2":
        ctx.load_cert_chain(str(certs["kafka-admin"].cert), str(certs["kafka-admin"].key))
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    ports = [cluster.port(i) for i in cluster.nodes]
    for port in ports:  # every broker and every controller
        if client == "plaintext":  # a Kafka ApiVersions request in the clear: no Kafka answer, at most a TLS alert
            client_id = b"plaintext"
            header = struct.pack(">hhih", 18, 0, 1, len(client_id)) + client_id
            with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
                raw.sendall(struct.pack(">i", len(header)) + header)
                raw.settimeout(10)
                try:
                    answer = raw.recv(64)
                except (TimeoutError, ConnectionError):
                    answer = b""
            assert answer == b"" or answer[0] == 0x15, f"port {port} answered plaintext with {answer.hex()}"
            continue
        assert _handshake(port, ctx).startswith("refused"), f"{client} reached port {port}"
    # the same context with the hub CA's certificate does get through: the refusals above are about the client
    good = ssl.create_default_context(cafile=str(ca))
    good.load_cert_chain(str(certs["kafka-admin"].cert), str(certs["kafka-admin"].key))
    with socket.create_connection(("127.0.0.1", ports[0]), timeout=10) as raw, \
            good.wrap_socket(raw, server_hostname="127.0.0.1") as tls:  # fmt: skip
        assert tls.version() == "TLSv1.3"


async def test_acls_are_created_once_and_a_grant_beyond_the_table_is_reported(cluster: LocalCluster) -> None:
    again = await apply_grants(cluster.connection(), hub_grants())
    assert (again.created, len(again.kept), again.extra) == ([], len(hub_grants()), [])
    # a broader grant someone added by hand is named (not removed: that is the operator's call)
    extra = Grant("audit", "topic", "literal", "hub.policy", "read")
    await apply_grants(cluster.connection(), [extra], principals=())
    try:
        report = await apply_grants(cluster.connection(), hub_grants())
        assert report.extra == ["User:audit allow read topic hub.policy"]
        assert report.created == []
    finally:
        binding = AclBindingFilter(ResourceType.TOPIC, "hub.policy", ResourcePatternType.LITERAL, "User:audit", "*",
                             AclOperation.READ, AclPermissionType.ALLOW)  # fmt: skip
        admin = AdminClient(_config(cluster, cluster.certs["kafka-admin"]))
        for future in admin.delete_acls([binding], request_timeout=15).values():
            await asyncio.to_thread(future.result, 20)
