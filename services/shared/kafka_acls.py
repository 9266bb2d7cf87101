"""Who may do what inside Kafka: the hub's Kafka principals and the ACLs each one is granted.

A locked-down cluster (mTLS on every listener, ``StandardAuthorizer``, ``allow.everyone.if.no.acl.found=false``)
names a client by its certificate. Only certificates whose subject carries ``OU=evhub-kafka`` map to a short
principal, their CN (``User:gateway``, see :data:`PRINCIPAL_MAPPING_RULES`); every other certificate — an office's,
an auditor's, a service's HTTP certificate — keeps its whole distinguished name as its principal, which no ACL
ever names, so Kafka refuses it everything. That holds even for an office whose id equals a service name.

The grants are an allow-list, one row per (principal, resource, operation):

| principal | may |
| --- | --- |
| ``publisher`` | write and read back ``evidence.*``, read ``hub.keys``, use transactional ids ``evhub-publisher.*`` |
| ``gateway`` | read ``evidence.*``, ``hub.keys``, ``hub.policy``; write ``hub.audit``, ``hub.deadletter`` |
| ``audit`` | read ``hub.audit``; write ``hub.deadletter`` |
| ``policy-admin`` | read and write ``hub.policy`` (the policy service, ``evhub policy push``) |
| ``key-custody`` | read and write ``hub.keys`` (``evhub keys``) |

Each of them may also describe the configuration of the topics it uses (the start-up check of topic settings,
``kafka.ensure_hub_topics``). No service may create, delete or alter a topic, or change an ACL: the brokers
(``kafka-broker``) and the operator's tool (``kafka-admin``, ``evhub kafka acls``) are the only super users.

Pure: no I/O. Does not own: applying the grants (``kafka_admin``), the certificates (``tls``, ``local_cluster``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from services.shared.kafka import AUDIT_TOPIC, DEAD_LETTER_TOPIC, EVIDENCE_PREFIX, KEYS_TOPIC, POLICY_TOPIC

#: The organisational unit that marks a certificate as a Kafka client of the hub.
KAFKA_UNIT: Final = "evhub-kafka"
BROKER: Final = "kafka-broker"
ADMIN: Final = "kafka-admin"
PUBLISHER: Final = "publisher"
GATEWAY: Final = "gateway"
AUDIT: Final = "audit"
POLICY_ADMIN: Final = "policy-admin"
KEY_CUSTODY: Final = "key-custody"
SUPER_USERS: Final = (BROKER, ADMIN)
SERVICES: Final = (PUBLISHER, GATEWAY, AUDIT, POLICY_ADMIN, KEY_CUSTODY)
#: The transactional ids the publisher's fenced producers use (``evhub-publisher.<key id>.<topic>``).
PUBLISHER_TRANSACTIONS: Final = "evhub-publisher."
#: ``ssl.principal.mapping.rules``: CN of an ``OU=evhub-kafka`` certificate of the hub's CA, else the whole DN.
PRINCIPAL_MAPPING_RULES: Final = rf"RULE:^CN=([a-z][a-z0-9-]{{0,62}}),OU={KAFKA_UNIT},O=[^,]+$/$1/,DEFAULT"

Resource = Literal["topic", "transactional_id", "group", "cluster"]
Pattern = Literal["literal", "prefixed"]
Operation = Literal["read", "write", "describe", "describe_configs", "create", "alter", "delete", "alter_configs",
                    "idempotent_write", "all"]  # fmt: skip


@dataclass(frozen=True, order=True)
class Grant:
    """ALLOW ``operation`` on a resource to ``User:<principal>`` from any host."""

    principal: str
    resource: Resource
    pattern: Pattern
    name: str
    operation: Operation

    def __str__(self) -> str:
        star = "*" if self.pattern == "prefixed" else ""
        return f"User:{self.principal} {self.operation} {self.resource} {self.name}{star}"


@dataclass(frozen=True)
class HubTopicNames:
    """The topic names the grants name (the defaults are the hub's; tests use their own)."""

    keys: str = KEYS_TOPIC
    policy: str = POLICY_TOPIC
    audit: str = AUDIT_TOPIC
    deadletter: str = DEAD_LETTER_TOPIC
    evidence_prefix: str = EVIDENCE_PREFIX


def _topic(principal: str, name: str, *operations: Operation, prefixed: bool = False) -> list[Grant]:
    pattern: Pattern = "prefixed" if prefixed else "literal"
    return [Grant(principal, "topic", pattern, name, op) for op in (*operations, "describe_configs")]


def hub_grants(topics: HubTopicNames | None = None) -> list[Grant]:
    """Every ACL the hub's services need, and nothing more (the table in the module docstring), sorted."""
    t = topics or HubTopicNames()
    grants = [
        *_topic(PUBLISHER, t.evidence_prefix, "write", "read", prefixed=True),
        *_topic(PUBLISHER, t.keys, "read"),
        Grant(PUBLISHER, "transactional_id", "prefixed", PUBLISHER_TRANSACTIONS, "write"),
        *_topic(GATEWAY, t.evidence_prefix, "read", prefixed=True),
        *_topic(GATEWAY, t.keys, "read"),
        *_topic(GATEWAY, t.policy, "read"),
        *_topic(GATEWAY, t.audit, "write"),
        *_topic(GATEWAY, t.deadletter, "write"),
        *_topic(AUDIT, t.audit, "read"),
        *_topic(AUDIT, t.deadletter, "write"),
        *_topic(POLICY_ADMIN, t.policy, "read", "write"),
        *_topic(KEY_CUSTODY, t.keys, "read", "write"),
    ]
    return sorted(set(grants))
