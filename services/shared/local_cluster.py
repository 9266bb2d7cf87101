"""A replicated Kafka cluster on one machine, from the same Maven jars as the embedded broker.

Owns: the cluster's layout — three brokers and a three-voter controller quorum in their own JVMs (``ClusterNode``:
role, node id, ports, the static quorum, and on a locked-down cluster its TLS and authorizer settings, rendered to
``server.properties``), replication factor 3, ``min.insync.replicas`` 2, unclean leader election off, as in
docker-compose.yml; the development certificates of a locked-down cluster (:func:`kafka_dev_pki`); and the
cluster's lifecycle (:class:`LocalCluster`: format every node in parallel, start them, wait until all serve, stop
them by PID; one node at a time for fault injection: SIGKILL, SIGSTOP/SIGCONT, SIGTERM, restart on its data).

Why dedicated controllers rather than three combined broker+controller nodes (measured in docs/operations.md):
three more JVMs cost ~560 MiB of RSS and ~14 CPU-seconds more to start on 2 cores, and buy the behaviour a replicated
cluster is run for — stopping or killing brokers never takes the controller quorum with it, so the controller
fences a dead broker and shrinks the in-sync replicas, and producers get a clear ``NOT_ENOUGH_REPLICAS`` instead of
timing out against a cluster that has lost its quorum. Kafka's own docs advise against combined nodes for the same
reason.

Does not own: one JVM's lifecycle (``local_kafka.LocalKafka``), the hub's topics (``kafka``) and ACLs
(``kafka_acls``, ``kafka_admin``).
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from services.shared.errors import BrokerStartError
from services.shared.kafka_acls import KAFKA_UNIT, PRINCIPAL_MAPPING_RULES, SERVICES, SUPER_USERS
from services.shared.kafka_connection import KafkaConnection
from services.shared.local_kafka import (
    LocalKafka,
    NodeConfig,
    claim_directory,
    free_port,
    kafka_version,
    new_cluster_id,
    port_free,
)
from services.shared.tls import CertFiles, issue_leaf

log = logging.getLogger(__name__)

Role = Literal["broker", "controller", "broker,controller"]
CLUSTER_FILE = "cluster.json"
CONTROLLER_IDS = 100  # controllers are nodes 101, 102, 103; brokers 1, 2, 3 (the ids partition replicas name)
#: Six JVMs on 2 cores: the C1 compiler only and the serial collector start the cluster with ~40% less CPU and use
#: ~40% less CPU when idle (measured, docs/operations.md). ``make bench`` runs its clusters with the JVM's defaults.
LEAN_JVM = ("-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC")


@dataclass(frozen=True)
class NodeTLS:
    """A node's PEM keystore (key + chain) and truststore (the hub's CA)."""

    keystore: Path
    truststore: Path


def _lean(role: Role) -> dict[str, str]:
    """Small thread pools and buffers: six JVMs share 2 cores."""
    common = {"num.network.threads": "2", "num.io.threads": "2", "background.threads": "2"}
    if "broker" not in role:
        return common
    return common | {
        "num.partitions": "1", "default.replication.factor": "3", "min.insync.replicas": "2",
        "offsets.topic.replication.factor": "3", "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "3", "transaction.state.log.min.isr": "2",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "3", "share.coordinator.state.topic.min.isr": "2",
        "share.coordinator.state.topic.num.partitions": "1",
        "unclean.leader.election.enable": "false", "auto.create.topics.enable": "false",
        "group.initial.rebalance.delay.ms": "0", "num.replica.fetchers": "1",
        "log.cleaner.dedupe.buffer.size": "2097152",
    }  # fmt: skip


def security_properties(tls: NodeTLS) -> dict[str, str]:
    """mTLS on every listener (clients, brokers, controllers), TLS 1.3 only, principals from the certificate, and
    an allow-list authorizer: a resource no ACL names is the super users' alone."""
    return {
        "ssl.keystore.type": "PEM", "ssl.keystore.location": str(tls.keystore),
        "ssl.truststore.type": "PEM", "ssl.truststore.location": str(tls.truststore),
        "ssl.client.auth": "required", "ssl.protocol": "TLSv1.3", "ssl.enabled.protocols": "TLSv1.3",
        "ssl.endpoint.identification.algorithm": "https",
        "ssl.principal.mapping.rules": PRINCIPAL_MAPPING_RULES,
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found": "false",
        "super.users": ";".join(f"User:{u}" for u in SUPER_USERS),
    }  # fmt: skip


@dataclass(frozen=True)
class ClusterNode(NodeConfig):
    """One member of a static quorum: a broker (``broker_port``) or a controller (``controller_port``)."""

    role: Role = "broker"
    voters: str = ""  # controller.quorum.voters: "101@127.0.0.1:p,…"
    tls: NodeTLS | None = None

    def properties(self, log_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        proto = "SSL" if self.tls is not None else "PLAINTEXT"
        props = {
            "process.roles": self.role, "node.id": str(self.node_id), "controller.quorum.voters": self.voters,
            "controller.listener.names": "CONTROLLER", "log.dirs": str(log_dir),
            "listener.security.protocol.map": f"{proto}:{proto},CONTROLLER:{proto}",
        }  # fmt: skip
        listeners = []
        if "broker" in self.role:
            address = f"{proto}://127.0.0.1:{self.broker_port}"
            listeners.append(address)
            props |= {"advertised.listeners": address, "inter.broker.listener.name": proto}
        if "controller" in self.role:
            listeners.append(f"CONTROLLER://127.0.0.1:{self.controller_port}")
        props["listeners"] = ",".join(listeners)
        props |= _lean(self.role)
        if self.tls is not None:
            props |= security_properties(self.tls)
        return props | dict(extra or {})

    def format_options(self) -> list[str]:
        return []  # a static quorum (controller.quorum.voters) is formatted without --standalone

    @property
    def ready_port(self) -> int:
        return self.controller_port if self.role == "controller" else self.broker_port


def layout(*, brokers: int = 3, controllers: int = 3, tls: NodeTLS | None = None,
           combined: bool = False) -> list[ClusterNode]:  # fmt: skip
    """Fresh ports on 127.0.0.1 and a new cluster id for ``brokers`` brokers and ``controllers`` voters, or (only
    to measure what it costs, see bench/cluster_costs.py) ``brokers`` combined broker+controller nodes."""
    cluster_id, ports = new_cluster_id(), set[int]()
    if combined:
        while len(ports) < 2 * brokers:
            ports.add(free_port())
        it = iter(sorted(ports))
        pairs = {i: (next(it), next(it)) for i in range(1, brokers + 1)}
        voters = ",".join(f"{i}@127.0.0.1:{c}" for i, (_, c) in pairs.items())
        return [ClusterNode(broker_port=b, controller_port=c, cluster_id=cluster_id, node_id=i, tls=tls,
                            role="broker,controller", voters=voters) for i, (b, c) in pairs.items()]  # fmt: skip
    while len(ports) < brokers + controllers:
        ports.add(free_port())
    it = iter(sorted(ports))
    ctrl = {CONTROLLER_IDS + i: next(it) for i in range(1, controllers + 1)}
    voters = ",".join(f"{n}@127.0.0.1:{p}" for n, p in ctrl.items())
    nodes = [ClusterNode(broker_port=0, controller_port=p, cluster_id=cluster_id, node_id=n, role="controller",
                         voters=voters, tls=tls) for n, p in ctrl.items()]  # fmt: skip
    nodes += [ClusterNode(broker_port=next(it), controller_port=0, cluster_id=cluster_id, node_id=i, role="broker",
                          voters=voters, tls=tls) for i in range(1, brokers + 1)]  # fmt: skip
    return nodes


def kafka_dev_pki(directory: Path, *, principals: tuple[str, ...] = (*SUPER_USERS, *SERVICES),
                  hosts: tuple[str, ...] = ()) -> dict[str, CertFiles]:  # fmt: skip
    """Development certificates of Kafka principals from the hub's development CA in ``directory``: files
    ``kafka.<principal>.pem`` (+ key, bundle), subject ``CN=<principal>,OU=evhub-kafka``. Existing ones are
    reused. Never for production: the operator's PKI issues the same subjects."""
    return {p: issue_leaf(directory, f"kafka.{p}", cn=p, unit=KAFKA_UNIT, hosts=hosts) for p in principals}


@dataclass
class LocalCluster:
    """Brokers 1..n and controllers 101..10m, each a :class:`LocalKafka` under ``root``. ``pki`` (a directory
    holding the hub's development CA) locks the cluster down: mTLS everywhere and ACLs (see ``kafka_acls``).
    ``persistent``: the layout is kept in ``root/cluster.json`` and every start reuses it and the data."""

    libs: Path
    root: Path
    brokers: int = 3
    controllers: int = 3
    pki: Path | None = None
    persistent: bool = False
    combined: bool = False  # three broker+controller nodes instead: only to measure the difference
    broker_heap_mb: int = 512
    controller_heap_mb: int = 256
    start_timeout: float = 180.0
    jvm_options: tuple[str, ...] = LEAN_JVM
    extra: dict[str, str] = field(default_factory=dict)  # added to every broker's properties
    nodes: dict[int, LocalKafka] = field(default_factory=dict, init=False)
    certs: dict[str, CertFiles] = field(default_factory=dict, init=False)
    startup_seconds: float = field(default=0.0, init=False)
    _lock: int | None = field(default=None, init=False, repr=False)
    #: The one thread every JVM is spawned from, alive until :meth:`stop`: a node's parent-death signal follows the
    #: thread that spawned it, so a node restarted from a short-lived thread (``asyncio.to_thread`` of a test's
    #: event loop) would be SIGTERMed when that thread ends.
    _spawner: concurrent.futures.ThreadPoolExecutor | None = field(default=None, init=False, repr=False)

    @classmethod
    def throwaway(cls, libs: Path, *, root: Path | None = None, secure: bool = False, combined: bool = False,
                  extra: Mapping[str, str] | None = None, jvm_options: tuple[str, ...] = LEAN_JVM,
                  ) -> LocalCluster:  # fmt: skip
        """A cluster in a new temporary directory (removed on stop); ``secure``: with its own development PKI."""
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="evhub-cluster-", dir=root))
        return cls(libs=libs, root=workdir, pki=workdir / "pki" if secure else None, combined=combined,
                   extra=dict(extra or {}), jvm_options=jvm_options)  # fmt: skip

    # -- addresses and credentials -------------------------------------------------------------------------
    @property
    def bootstrap(self) -> str:
        return ",".join(f"127.0.0.1:{n.preset.broker_port}" for i, n in sorted(self.nodes.items())
                        if n.preset is not None and i < CONTROLLER_IDS)  # fmt: skip

    @property
    def broker_ids(self) -> list[int]:
        return [i for i in sorted(self.nodes) if i < CONTROLLER_IDS]

    @property
    def controller_ids(self) -> list[int]:
        return [i for i in sorted(self.nodes) if i > CONTROLLER_IDS]

    def port(self, node_id: int) -> int:
        """The node's listener: a broker's for clients, a controller's for the quorum."""
        preset = self.nodes[node_id].preset
        assert preset is not None
        return preset.ready_port

    def connection(self, principal: str | None = None) -> KafkaConnection:
        """How a client reaches this cluster: as ``principal`` (its development certificate) on a locked-down
        cluster — the super user ``kafka-admin`` if None — or PLAINTEXT."""
        if self.pki is None:
            return KafkaConnection(self.bootstrap)
        return KafkaConnection(self.bootstrap, self.certs[principal or "kafka-admin"])

    # -- lifecycle --------------------------------------------------------------------------------------------
    def _layout(self) -> list[ClusterNode]:
        """Raises: BrokerStartError for a damaged cluster.json, or a port of a persistent cluster in use."""
        path = self.root / CLUSTER_FILE
        tls = None
        if self.pki is not None:
            self.certs = kafka_dev_pki(self.pki)
            broker = self.certs["kafka-broker"]
            tls = NodeTLS(keystore=broker.bundle, truststore=broker.ca)
        if self.persistent and path.is_file():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                nodes = [ClusterNode(**{**n, "tls": tls}) for n in raw["nodes"]]
                secure = bool(raw["secure"])
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise BrokerStartError(f"{path} is damaged ({exc!r}); restore it or start on a new directory") from exc
            if secure != (tls is not None):  # never open a locked-down cluster's data without its authorizer
                raise BrokerStartError(f"the cluster in {self.root} was created {'with' if secure else 'without'} "
                                       "--secure; start it the same way")  # fmt: skip
            busy = [n.ready_port for n in nodes if not port_free(n.ready_port)]
            if busy:
                raise BrokerStartError(f"port {busy[0]} of the cluster in {self.root} is in use by another process; "
                                       f"the cluster keeps its addresses across restarts (see {path})")  # fmt: skip
            return nodes
        nodes = layout(brokers=self.brokers, controllers=self.controllers, tls=tls, combined=self.combined)
        if self.persistent:
            plain = [{k: v for k, v in asdict(n).items() if k != "tls"} for n in nodes]
            kept = {"nodes": plain, "secure": tls is not None, "kafka_version": kafka_version()}
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(kept, indent=2), encoding="utf-8")
            os.replace(tmp, path)
        return nodes

    def _claim(self) -> None:
        """Raises: BrokerStartError if another launcher runs this persistent cluster."""
        if not self.persistent:
            return
        self._lock = claim_directory(self.root, "cluster")

    def start(self) -> str:
        """Format every node (in parallel), start all of them, and block until every one serves. Returns the
        bootstrap addresses.

        Raises:
            BrokerStartError: a node failed to format or start, or the cluster was not up within the timeout.
        """
        began = time.monotonic()
        self.root.mkdir(parents=True, exist_ok=True)
        try:
            self._claim()
            for config in self._layout():
                heap = self.controller_heap_mb if config.role == "controller" else self.broker_heap_mb
                extra = dict(self.extra) if "broker" in config.role else {}
                self.nodes[config.node_id] = LocalKafka(
                    libs=self.libs, workdir=self.root / f"node-{config.node_id}", heap_mb=heap, preset=config,
                    extra=extra, start_timeout=self.start_timeout, jvm_options=self.jvm_options,
                )  # fmt: skip
            with concurrent.futures.ThreadPoolExecutor(max_workers=len(self.nodes)) as pool:
                list(pool.map(LocalKafka.format_storage, self.nodes.values()))
            for node in self.nodes.values():
                self._launch(node)
            self._wait(list(self.nodes.values()), began + self.start_timeout)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        log.info("Kafka cluster started at %s in %.1fs", self.bootstrap, self.startup_seconds)
        return self.bootstrap

    def _launch(self, node: LocalKafka) -> None:
        if self._spawner is None:
            self._spawner = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="kafka-spawner")
        self._spawner.submit(node.launch).result()

    def _wait(self, nodes: list[LocalKafka], deadline: float) -> None:
        pending = list(nodes)
        while pending:
            pending = [n for n in pending if not n.serving()]
            if pending and time.monotonic() > deadline:
                raise BrokerStartError(f"node {pending[0].workdir.name} not ready in time:\n{pending[0].tail_log()}")
            time.sleep(0.2)

    def stop(self) -> None:
        """Stop every node by PID (brokers first, then the quorum), then remove a throwaway cluster's directory."""
        try:
            for node_id in [*self.broker_ids, *self.controller_ids]:
                self.nodes[node_id].stop()
        finally:
            if self._spawner is not None:
                self._spawner.shutdown()
                self._spawner = None
            if self._lock is not None:
                os.close(self._lock)
                self._lock = None
            if not self.persistent:
                shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- one node at a time (fault injection) ------------------------------------------------------------------
    def node(self, node_id: int) -> LocalKafka:
        return self.nodes[node_id]

    def kill(self, node_id: int) -> None:
        """SIGKILL the node: no shutdown of any kind. :meth:`restart` brings it back on its data."""
        self.nodes[node_id].signal(signal.SIGKILL)

    def freeze(self, node_id: int) -> None:
        """SIGSTOP: the node keeps its sockets open and answers nothing until :meth:`thaw`."""
        self.nodes[node_id].signal(signal.SIGSTOP)

    def thaw(self, node_id: int) -> None:
        self.nodes[node_id].signal(signal.SIGCONT)

    def restart(self, node_id: int) -> None:
        """Start a node that was killed or stopped, on its data and its ports; blocks until it serves.

        Raises:
            BrokerStartError: it did not start in time.
        """
        node = self.nodes[node_id]
        node.stop()  # a clean stop if it is still running; nothing if it was killed
        began = time.monotonic()
        try:
            node.format_storage()  # writes its configuration; its data is formatted already
            self._launch(node)  # from the cluster's own thread, whichever thread asks
            self._wait([node], began + self.start_timeout)
        except BaseException:
            node.stop()
            raise

    def running(self) -> list[int]:
        return [i for i, n in sorted(self.nodes.items()) if n.pid is not None]

    def rss_mb(self) -> dict[int, float]:
        """Resident memory of each running node's JVM, in MiB (from /proc)."""
        out = {}
        for node_id, node in self.nodes.items():
            if node.pid is None:
                continue
            for line in Path(f"/proc/{node.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out[node_id] = int(line.split()[1]) / 1024
        return out
