"""Provisioning a locked-down cluster: the hub's topics and ACLs, created idempotently by a super user.

Owns: ACL administration through confluent-kafka's AdminClient (aiokafka has no ACL API) — reading the ACLs in
force, creating the missing rows of ``kafka_acls.hub_grants`` (creating a binding that exists is a no-op in Kafka,
so a second run changes nothing), and reporting bindings of the hub's principals that the table does not name (they
are not removed: that is the operator's call, and the report names each one). :func:`provision` does both topics and
ACLs; ``evhub kafka acls``, the local cluster and the tests run it as ``kafka-admin``. The blocking client runs in a
worker thread; its errors are translated here.

Does not own: what the grants are (``kafka_acls``), the topics' settings (``kafka.ensure_hub_topics``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiokafka.client import AIOKafkaClient
from aiokafka.errors import KafkaError
from aiokafka.protocol.admin import DescribeAclsRequest
from confluent_kafka import KafkaError as RdKafkaError
from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclBindingFilter,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
)

from services.shared.errors import ConfigurationError, KafkaUnavailable
from services.shared.kafka import TopicReport, TopicSpec, ensure_hub_topics, hub_topics
from services.shared.kafka_acls import SERVICES, Grant, HubTopicNames, hub_grants
from services.shared.kafka_connection import Kafka, connection_of
from services.shared.settings import KafkaSettings

log = logging.getLogger(__name__)

_RESOURCES: Final = {"topic": ResourceType.TOPIC, "transactional_id": ResourceType.TRANSACTIONAL_ID,
                     "group": ResourceType.GROUP, "cluster": ResourceType.BROKER}  # fmt: skip
_PATTERNS: Final = {"literal": ResourcePatternType.LITERAL, "prefixed": ResourcePatternType.PREFIXED}
#: A filter field that matches any value: None, as confluent-kafka documents (its annotations say ``str``).
_ANY: Any = None


@dataclass(frozen=True)
class AclReport:
    created: list[Grant]
    kept: list[Grant]
    #: Bindings in force for a hub principal that the table does not name (``User:x op resource name``).
    extra: list[str]


@dataclass(frozen=True)
class Provisioned:
    topics: TopicReport
    acls: AclReport


def _binding(grant: Grant) -> AclBinding:
    name = "kafka-cluster" if grant.resource == "cluster" else grant.name
    return AclBinding(_RESOURCES[grant.resource], name, _PATTERNS[grant.pattern], f"User:{grant.principal}", "*",
                      AclOperation[grant.operation.upper()], AclPermissionType.ALLOW)  # fmt: skip


def _describe(binding: Any) -> str:
    star = "*" if binding.resource_pattern_type == ResourcePatternType.PREFIXED else ""
    return (f"{binding.principal} {binding.permission_type.name.lower()} {binding.operation.name.lower()} "
            f"{binding.restype.name.lower()} {binding.name}{star}")  # fmt: skip


def _translate(exc: KafkaException, what: str) -> Exception:
    error = exc.args[0] if exc.args and isinstance(exc.args[0], RdKafkaError) else None
    code = error.code() if error is not None else None
    if code in (RdKafkaError.CLUSTER_AUTHORIZATION_FAILED, RdKafkaError.TOPIC_AUTHORIZATION_FAILED):
        return ConfigurationError(f"{what}: this client is not a super user of the cluster ({exc})")
    if code == RdKafkaError.SECURITY_DISABLED:
        return ConfigurationError(f"{what}: the cluster has no authorizer (ACLs need a locked-down cluster)")
    return KafkaUnavailable(f"{what}: {exc}")


def _apply(config: dict[str, str], grants: Sequence[Grant], principals: Iterable[str], timeout_s: float) -> AclReport:
    admin = AdminClient({**config, "client.id": "evhub-kafka-acls"})
    wanted = {_binding(g): g for g in grants}
    try:
        every = AclBindingFilter(ResourceType.ANY, _ANY, ResourcePatternType.ANY, _ANY, _ANY, AclOperation.ANY,
                                 AclPermissionType.ANY)  # fmt: skip
        existing = admin.describe_acls(every, request_timeout=timeout_s).result(timeout=timeout_s)
        missing = [b for b in wanted if b not in existing]
        if missing:
            for future in admin.create_acls(missing, request_timeout=timeout_s).values():
                future.result(timeout=timeout_s)
    except KafkaException as exc:
        raise _translate(exc, "ACLs could not be read or created") from exc
    ours = {f"User:{p}" for p in principals}
    extra = sorted(_describe(b) for b in existing if b.principal in ours and b not in wanted)
    kept = sorted(wanted[b] for b in wanted if b in existing)
    return AclReport(created=sorted(wanted[b] for b in missing), kept=kept, extra=extra)


def _key(grant: Grant) -> tuple[int, str, int, str, int]:
    """A grant as DescribeAcls answers it: (resource type, name, pattern type, principal, operation) codes."""
    name = "kafka-cluster" if grant.resource == "cluster" else grant.name
    return (_RESOURCES[grant.resource].value, name, _PATTERNS[grant.pattern].value, f"User:{grant.principal}",
            AclOperation[grant.operation.upper()].value)  # fmt: skip


async def _enforced_everywhere(kafka: Kafka, grants: Sequence[Grant], timeout_s: float) -> None:
    """Wait until every broker's authorizer holds ``grants``: brokers learn ACLs from the metadata log a moment
    after the controller commits them, and a client that reached a lagging broker would be refused.

    Raises:
        KafkaUnavailable: a broker did not hold them within ``timeout_s``.
    """
    wanted = {_key(g) for g in grants}
    client = AIOKafkaClient(**connection_of(kafka).aiokafka_options(), request_timeout_ms=5_000)
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        await client.bootstrap()
        for broker in client.cluster.brokers():
            while True:  # the DescribeAcls filter matching everything: ANY type, name, pattern, operation, permission
                response = await client.send(broker.nodeId, DescribeAclsRequest(1, None, 1, None, None, 1, 1))
                held = {(r[0], r[1], r[2], acl[0], acl[2]) for r in response.resources for acl in r[3]}
                if wanted <= held:
                    break
                if asyncio.get_running_loop().time() > deadline:
                    raise KafkaUnavailable(f"broker {broker.nodeId} does not enforce {len(wanted - held)} of the new "
                                           f"ACLs after {timeout_s:.0f}s")  # fmt: skip
                await asyncio.sleep(0.2)
    except KafkaError as exc:
        raise KafkaUnavailable(f"Kafka at {kafka} did not describe its ACLs: {exc!r}") from exc
    finally:
        await client.close()


async def apply_grants(kafka: Kafka, grants: Sequence[Grant], *, principals: Iterable[str] = SERVICES,
                       timeout_s: float = 30.0) -> AclReport:  # fmt: skip
    """Create the grants not yet in force and return once every broker enforces them; report bindings of
    ``principals`` beyond them (logged as warnings).

    Raises:
        ConfigurationError: the client is not a super user, or the cluster has no authorizer.
        KafkaUnavailable: the cluster did not answer in time.
    """
    config = connection_of(kafka).librdkafka_config()
    report = await asyncio.to_thread(_apply, config, list(grants), list(principals), timeout_s)
    await _enforced_everywhere(kafka, grants, timeout_s)
    for line in report.extra:
        log.warning("ACL in force beyond the hub's table: %s (remove it with kafka-acls --remove if unintended)", line)
    return report


async def provision(kafka: Kafka, settings: KafkaSettings, jurisdictions: Sequence[str],
                    names: HubTopicNames | None = None) -> Provisioned:  # fmt: skip
    """The hub's topics (``ensure_hub_topics``, with the replication of ``settings``) and every service's ACLs.

    Raises:
        ConfigurationError: not a super user, or no authorizer. KafkaUnavailable: the cluster did not answer.
    """
    n = names or HubTopicNames()
    rename = {"hub.keys": n.keys, "hub.policy": n.policy, "hub.audit": n.audit, "hub.deadletter": n.deadletter}
    specs = [TopicSpec(rename.get(s.name, s.name), s.partitions, s.config) for s in hub_topics(jurisdictions)]
    topics = await ensure_hub_topics(kafka, specs, kafka=settings)
    return Provisioned(topics=topics, acls=await apply_grants(kafka, hub_grants(n)))
