"""Kafka wiring: producer and consumer factories with safe defaults, and the hub's topics.

Owns: the settings every producer and consumer of the hub must have (acks=all + idempotence; auto-commit
off), the names and configs of the hub's topics, and creating them idempotently at start-up — every hub topic
through :func:`ensure_hub_topics`, with the configured replication factor and ``min.insync.replicas``, reporting
an existing topic whose settings are weaker than the hub needs. Translates aiokafka's errors into
:class:`KafkaUnavailable` / :class:`ConfigurationError` here and nowhere else.

Every factory takes a :class:`KafkaConnection` (the address and, on a locked-down cluster, the client certificate)
or a bare address (PLAINTEXT), so a service passes its TLS settings in one place: ``KafkaSettings.connection()``.

Does not own: which cluster (``services.shared.cluster``), what is in the records (``envelope``/``avro``), what a
principal may do (``kafka_acls``).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import (
    ClusterAuthorizationFailedError,
    GroupAuthorizationFailedError,
    KafkaError,
    TopicAlreadyExistsError,
    TopicAuthorizationFailedError,
    TransactionalIdAuthorizationFailed,
    for_code,
)

from services.shared.errors import ConfigurationError, KafkaUnavailable, NotFound
from services.shared.kafka_connection import Kafka, connection_of
from services.shared.settings import KafkaSettings

log = logging.getLogger(__name__)

#: What every hub producer has, whatever the caller asks for: a record is acknowledged only once all in-sync
#: replicas hold it, and retries never duplicate or reorder it. aiokafka's defaults are acks=1, no idempotence.
PRODUCER_SAFETY: Final[Mapping[str, Any]] = {"acks": "all", "enable_idempotence": True}
#: Batching, chosen on measurements on a 2-core machine against a local broker (docs/performance.md, 1,050 B records,
#: acks=all, idempotent, 3 partitions): aiokafka keeps one batch per partition in flight, so its default 16 KiB batch
#: (~15 records) makes acks=all round trips the bound — 5,500-9,900 records/s; 64 KiB 18,700-19,800/s; 256 KiB
#: 28,400-30,600/s; 1 MiB 25,200-28,100/s. With batches this large a linger adds nothing (records gather while the
#: previous batch is in flight): 256 KiB with linger 5 ms gave 24,100-27,100/s. Callers may override (a latency-bound
#: producer may linger less); the bench's raw-aiokafka baseline uses exactly these.
PRODUCER_TUNING: Final[Mapping[str, Any]] = {"max_batch_size": 256 << 10, "linger_ms": 0}
#: Consumers commit explicitly, after the effect of a record is durable, and never see aborted records.
CONSUMER_SAFETY: Final[Mapping[str, Any]] = {"enable_auto_commit": False, "isolation_level": "read_committed"}

KEYS_TOPIC: Final = "hub.keys"
POLICY_TOPIC: Final = "hub.policy"
AUDIT_TOPIC: Final = "hub.audit"
DEAD_LETTER_TOPIC: Final = "hub.deadletter"
EVIDENCE_PREFIX: Final = "evidence."
_JURISDICTION = re.compile(r"^[A-Z]{2}(-[A-Z0-9]{1,8})?$")


def evidence_topic(jurisdiction: str) -> str:
    """``DE`` → ``evidence.DE``. Jurisdictions are ISO 3166-1 alpha-2 codes, optionally with a suffix (``INT-ICC``
    style is not accepted to keep topic names predictable; use ``XX-ICC``).

    Raises:
        ConfigurationError: the code is not a valid jurisdiction.
    """
    if not _JURISDICTION.fullmatch(jurisdiction):
        raise ConfigurationError(f"not a jurisdiction code: {jurisdiction!r}")
    return EVIDENCE_PREFIX + jurisdiction


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    config: Mapping[str, str] = field(default_factory=dict)


def hub_topics(
    jurisdictions: Iterable[str], *, evidence_partitions: int = 3, min_insync_replicas: int = 1
) -> list[TopicSpec]:
    """Every topic the hub needs. Evidence, policy and audit are kept forever; keys are compacted."""
    forever = {"retention.ms": "-1", "retention.bytes": "-1", "cleanup.policy": "delete"}
    isr = {"min.insync.replicas": str(min_insync_replicas), "unclean.leader.election.enable": "false"}
    specs = [
        TopicSpec(KEYS_TOPIC, 1, {"cleanup.policy": "compact", **isr}),
        # The broker stamps each policy record: a version may not take effect before that moment (policy.engine).
        TopicSpec(POLICY_TOPIC, 1, {**forever, **isr, "message.timestamp.type": "LogAppendTime"}),
        TopicSpec(AUDIT_TOPIC, 1, {**forever, **isr}),
        TopicSpec(DEAD_LETTER_TOPIC, 1, {**forever, **isr}),
    ]
    specs += [TopicSpec(evidence_topic(j), evidence_partitions, {**forever, **isr}) for j in jurisdictions]
    return specs


#: Kafka's answers to a principal outside its ACLs: retrying will not help, the certificate or the ACLs are wrong.
REFUSALS: Final = (TopicAuthorizationFailedError, ClusterAuthorizationFailedError, GroupAuthorizationFailedError,
                   TransactionalIdAuthorizationFailed)  # fmt: skip


def kafka_error(exc: KafkaError, what: str, kafka: Kafka) -> ConfigurationError | KafkaUnavailable:
    """One translation of an aiokafka error for callers outside this module: a refusal by the cluster's ACLs is a
    :class:`ConfigurationError` naming the client's certificate; anything else :class:`KafkaUnavailable`."""
    connection = connection_of(kafka)
    if isinstance(exc, REFUSALS):
        who = f"the certificate {connection.tls.cert}" if connection.tls else "a client without a certificate"
        return ConfigurationError(f"{what}: Kafka at {connection} refused {who} ({type(exc).__name__}); each hub "
                                  "service and command has its own Kafka principal (docs/operations.md)")  # fmt: skip
    return KafkaUnavailable(f"{what}: Kafka at {connection} did not accept it ({exc!r})")


def _refuse_unsafe(requested: Mapping[str, Any], safety: Mapping[str, Any]) -> None:
    clash = sorted(k for k in requested if k in safety and requested[k] != safety[k])
    if clash:
        raise ConfigurationError(f"refusing to weaken {', '.join(clash)} (hub clients always use {dict(safety)})")


def make_producer(kafka: Kafka, *, client_id: str, **options: Any) -> AIOKafkaProducer:
    """An idempotent, acks=all producer (not started). ``options`` are passed to aiokafka (batching, linger …).

    Raises:
        ConfigurationError: ``options`` try to weaken acks or idempotence; the TLS files cannot be loaded.
    """
    _refuse_unsafe(options, PRODUCER_SAFETY)
    defaults: dict[str, Any] = {**PRODUCER_TUNING, "request_timeout_ms": 30_000}
    return AIOKafkaProducer(
        client_id=client_id, **connection_of(kafka).aiokafka_options(), **{**defaults, **options, **PRODUCER_SAFETY}
    )


def make_consumer(kafka: Kafka, *topics: str, group_id: str | None, client_id: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer with auto-commit off and read_committed isolation (not started).

    Raises:
        ConfigurationError: ``options`` try to turn auto-commit on or read uncommitted records; the TLS files cannot
            be loaded.
    """
    _refuse_unsafe(options, CONSUMER_SAFETY)
    defaults: dict[str, Any] = {"auto_offset_reset": "earliest"}
    return AIOKafkaConsumer(
        *topics, group_id=group_id, client_id=client_id, **connection_of(kafka).aiokafka_options(),
        **{**defaults, **options, **CONSUMER_SAFETY},
    )  # fmt: skip


def make_admin(kafka: Kafka, **options: Any) -> AIOKafkaAdminClient:
    """An aiokafka admin client (not started) for topics and their configuration; ACLs are ``kafka_admin``'s.

    Raises:
        ConfigurationError: the TLS files cannot be loaded.
    """
    return AIOKafkaAdminClient(**connection_of(kafka).aiokafka_options(), **options)


async def ensure_topics(
    bootstrap: Kafka, specs: Iterable[TopicSpec], *, replication_factor: int = 1, timeout_ms: int = 30_000
) -> list[str]:
    """Create the topics that don't exist yet; leave existing ones alone. Returns the names created.

    Raises:
        KafkaUnavailable: the cluster did not answer or refused a topic. ConfigurationError: a missing topic this
            principal may not create (on a locked-down cluster the operator creates them: ``evhub kafka acls``).
    """
    specs = list(specs)
    admin = make_admin(bootstrap, request_timeout_ms=timeout_ms)
    try:
        await admin.start()
        existing = set(await admin.list_topics())
        wanted = [s for s in specs if s.name not in existing]
        if not wanted:
            return []
        response = await admin.create_topics(
            [NewTopic(s.name, s.partitions, replication_factor, topic_configs=dict(s.config)) for s in wanted],
            timeout_ms=timeout_ms,
        )
        created = []
        for topic, code, *rest in response.topic_errors:
            if code == 0:
                created.append(topic)
                continue
            error = for_code(code)
            if error is TopicAlreadyExistsError:  # a concurrent start-up created it first
                continue
            if error is TopicAuthorizationFailedError or error is ClusterAuthorizationFailedError:
                raise ConfigurationError(f"topic {topic} is missing or hidden from this client, and it may not create "
                                         "it: on a locked-down cluster the operator creates the hub's topics and "
                                         "ACLs (evhub kafka acls)")  # fmt: skip
            raise KafkaUnavailable(f"could not create topic {topic}: {error.__name__} {rest[0] if rest else ''}")
        log.info("created topics %s", created)
        return created
    except KafkaError as exc:
        raise KafkaUnavailable(f"Kafka at {bootstrap} did not answer: {exc}") from exc
    finally:
        await admin.close()


@dataclass(frozen=True)
class WeakSetting:
    """An existing hub topic whose setting is weaker than the hub needs (or, for non-numeric settings, other)."""

    topic: str
    setting: str
    wanted: str
    actual: str

    def __str__(self) -> str:
        return f"topic {self.topic}: {self.setting} is {self.actual}, the hub needs {self.wanted}"


@dataclass(frozen=True)
class TopicReport:
    created: list[str]
    weaker: list[WeakSetting]


#: Settings where a larger number is stronger; every other configured setting must be exactly as specified.
_AT_LEAST: Final = frozenset({"replication factor", "min.insync.replicas"})


async def ensure_hub_topics(bootstrap: Kafka, specs: Iterable[TopicSpec], *, kafka: KafkaSettings) -> TopicReport:
    """The one way a hub topic is created: missing ones with ``kafka.replication_factor`` and
    ``kafka.min_insync_replicas`` (overriding whatever ``specs`` say), existing ones checked — each setting weaker
    than that (a lower replication factor or ``min.insync.replicas``, a retention, cleanup or timestamp type other
    than the spec's) is logged as a warning naming topic and setting, and returned. It does not refuse to start:
    altering a topic is the cluster operator's job (``kafka-configs``, partition reassignment), and a service that
    refused would only add an outage to the shortfall; the warning says exactly what to fix.

    Raises:
        KafkaUnavailable: the cluster did not answer, or refused to create a topic (e.g. fewer brokers than the
            replication factor). ConfigurationError: a missing topic this principal may not create.
    """
    isr = {"min.insync.replicas": str(kafka.min_insync_replicas), "unclean.leader.election.enable": "false"}
    specs = [TopicSpec(s.name, s.partitions, {**s.config, **isr}) for s in specs]
    created = await ensure_topics(bootstrap, specs, replication_factor=kafka.replication_factor,
                                  timeout_ms=kafka.request_timeout_ms)  # fmt: skip
    existing = [s for s in specs if s.name not in created]
    weaker = await _weaker_settings(bootstrap, existing, replication_factor=kafka.replication_factor,
                                    timeout_ms=kafka.request_timeout_ms) if existing else []  # fmt: skip
    for finding in weaker:
        log.warning("%s (set it on the cluster; the hub does not alter existing topics)", finding)
    return TopicReport(created=created, weaker=weaker)


def _is_weaker(setting: str, wanted: str, actual: str) -> bool:
    if setting in _AT_LEAST:
        return int(actual) < int(wanted)
    return actual != wanted


async def _weaker_settings(
    bootstrap: Kafka, specs: list[TopicSpec], *, replication_factor: int, timeout_ms: int
) -> list[WeakSetting]:
    """Raises: KafkaUnavailable if the cluster does not describe the topics."""
    admin = make_admin(bootstrap, request_timeout_ms=timeout_ms)
    try:
        await admin.start()
        described = await admin.describe_topics([s.name for s in specs])
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, s.name) for s in specs])
    except KafkaError as exc:
        raise KafkaUnavailable(f"Kafka at {bootstrap} did not answer: {exc}") from exc
    finally:
        await admin.close()
    replicas = {t["topic"]: min((len(p["replicas"]) for p in t["partitions"]), default=0) for t in described}
    configs = {resource[3]: {entry[0]: entry[1] for entry in resource[4]}
               for response in responses for resource in response.resources}  # fmt: skip
    weaker = []
    for spec in specs:
        wanted = {"replication factor": str(replication_factor), **spec.config}
        actual = {"replication factor": str(replicas.get(spec.name, 0)), **configs.get(spec.name, {})}
        weaker += [WeakSetting(spec.name, key, value, actual.get(key, "(unset)")) for key, value in wanted.items()
                   if key not in actual or _is_weaker(key, value, actual[key])]  # fmt: skip
    return weaker


async def replication_shortfall(kafka: Kafka, topics: Sequence[str], *, timeout_ms: int = 5_000) -> list[str]:
    """Why an acks=all write to ``topics`` cannot be acknowledged now, one line per partition: it has no leader, or
    fewer in-sync replicas than the topic's ``min.insync.replicas`` (the broker then refuses it with
    NOT_ENOUGH_REPLICAS, which clients retry until they time out). Empty when every partition can take writes.

    Raises:
        KafkaUnavailable: the cluster did not answer.
    """
    admin = make_admin(kafka, request_timeout_ms=timeout_ms)
    try:
        await admin.start()
        described = await admin.describe_topics(list(topics))
        responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t) for t in topics])
    except KafkaError as exc:
        raise KafkaUnavailable(f"Kafka at {kafka} did not answer: {exc}") from exc
    finally:
        await admin.close()
    min_isr = {resource[3]: int(dict((e[0], e[1]) for e in resource[4]).get("min.insync.replicas") or 1)
               for response in responses for resource in response.resources}  # fmt: skip
    short = []
    for topic in described:
        for p in sorted(topic["partitions"], key=lambda p: p["partition"]):
            where, needed = f"{topic['topic']}[{p['partition']}]", min_isr.get(topic["topic"], 1)
            if p["leader"] < 0:
                short.append(f"{where} has no leader")
            elif len(p["isr"]) < needed:
                short.append(f"{where} has {len(p['isr'])} of {len(p['replicas'])} replicas in sync, "
                             f"min.insync.replicas is {needed}")  # fmt: skip
    return short


async def partitions_of(bootstrap: Kafka, topic: str) -> list[int]:
    """Raises: KafkaUnavailable if the cluster doesn't answer or the topic doesn't exist (or may not be described
    by this client: Kafka does not tell the two apart)."""
    admin = make_admin(bootstrap)
    try:
        await admin.start()
        (described,) = await admin.describe_topics([topic])
    except KafkaError as exc:
        raise KafkaUnavailable(f"Kafka at {bootstrap} did not answer: {exc}") from exc
    finally:
        await admin.close()
    if described["error_code"] != 0 or not described["partitions"]:
        hidden = " (or this client's certificate may not see it)" if connection_of(bootstrap).tls else ""
        raise KafkaUnavailable(f"topic {topic} does not exist{hidden}")
    return sorted(p["partition"] for p in described["partitions"])


async def read_to_end(bootstrap: Kafka, topic: str, *, timeout_s: float = 30.0) -> list[ConsumerRecord[bytes, bytes]]:
    """Every record of ``topic`` from the beginning up to the end offsets seen at the start of the call, ordered by
    partition and offset. For small, forever-kept control topics; a replay by ``follower.TopicFollower``.

    Raises:
        KafkaUnavailable: the cluster did not answer, the topic does not exist, or it could not be read to its end
            in time.
    """
    from services.shared.follower import TopicFollower  # the follower builds on this module's factories

    records: list[ConsumerRecord[bytes, bytes]] = []
    follower = TopicFollower(bootstrap=bootstrap, topic=topic, client_id=f"replay-{topic}", on_record=records.append)
    try:
        await follower.replay(timeout_s=timeout_s)
    except NotFound as exc:
        raise KafkaUnavailable(exc.detail) from exc
    records.sort(key=lambda r: (r.partition, r.offset))
    return records
