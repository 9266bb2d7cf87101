"""``evhub kafka``: the embedded broker or a local three-broker cluster until Ctrl-C; ``evhub kafka acls``.

- ``evhub kafka [--data DIR]``: one broker+controller (the development default; ``make demo``);
- ``evhub kafka --brokers 3 [--secure] [--data DIR]``: brokers 1-3 and controllers 101-103 on 127.0.0.1 (RF 3,
  ``min.insync.replicas`` 2); ``--secure`` locks it down — mTLS on every listener with development certificates from
  the hub's CA, the StandardAuthorizer, and the hub's topics and ACLs provisioned — and prints each service's
  ``EVHUB_KAFKA_SSL_*``;
- ``evhub kafka acls``: provision an existing locked-down cluster (topics and ACLs, idempotent), connecting as a
  super user with ``EVHUB_KAFKA_BOOTSTRAP`` and ``EVHUB_KAFKA_SSL_*``.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from services.shared.cluster import akafka_cluster
from services.shared.errors import ConfigurationError
from services.shared.kafka import ensure_hub_topics, hub_topics
from services.shared.kafka_acls import SERVICES
from services.shared.kafka_admin import Provisioned, provision
from services.shared.local_cluster import LocalCluster
from services.shared.local_kafka import ensure_jars
from services.shared.settings import KafkaSettings


def register(sub: Any) -> None:
    kafka = sub.add_parser(
        "kafka",
        help="run the embedded Kafka broker, or a local three-broker cluster, until "
        "Ctrl-C or SIGTERM; `evhub kafka acls` provisions a locked-down cluster",
    )
    kafka.add_argument("--jurisdiction", action="append", default=[], help="also create evidence.<J> (repeatable)")
    kafka.add_argument("--data", type=Path, metavar="DIR",
                       help="keep the broker's data and address in DIR across restarts (formatted on first use); "
                            "without it the broker is throwaway: its directory is removed when it stops")  # fmt: skip
    kafka.add_argument(
        "--brokers",
        type=int,
        choices=(1, 3),
        default=1,
        help="3: brokers 1-3 and a three-voter controller quorum, RF 3, min.insync.replicas 2",
    )
    kafka.add_argument(
        "--secure", action="store_true", help="with --brokers 3: mTLS on every listener and ACLs per service principal"
    )
    kafka.set_defaults(handler=run_kafka)
    more = kafka.add_subparsers(dest="kafka_command", required=False)
    acls = more.add_parser(
        "acls",
        help="create the hub's topics and ACLs on a locked-down cluster (idempotent); "
        "connects with EVHUB_KAFKA_BOOTSTRAP and a super user's EVHUB_KAFKA_SSL_*",
    )
    acls.add_argument("--jurisdiction", action="append", default=[], help="also create evidence.<J> (repeatable)")
    acls.set_defaults(handler=run_acls)


def _until_signalled() -> tuple[asyncio.Event, list[signal.Signals]]:
    stop, loop = asyncio.Event(), asyncio.get_running_loop()
    sigs = [signal.SIGTERM, signal.SIGINT]
    for sig in sigs:
        loop.add_signal_handler(sig, stop.set)
    return stop, sigs


async def run_kafka(args: argparse.Namespace) -> int:
    """Run the embedded broker (or the cluster) until Ctrl-C or SIGTERM; either stops it cleanly (a throwaway
    directory is removed).

    Raises:
        ConfigurationError: ``--data`` with an external cluster; ``--secure`` without ``--brokers 3``.
        BrokerStartError: the broker did not start.
    """
    settings = KafkaSettings()
    if (args.data is not None or args.brokers == 3) and settings.bootstrap:
        raise ConfigurationError("--data and --brokers are for the local Kafka, but EVHUB_KAFKA_BOOTSTRAP names one")
    if args.secure and args.brokers != 3:
        raise ConfigurationError("--secure locks down the three-broker cluster: use it with --brokers 3")
    if args.brokers == 3:
        return await _run_cluster(args, settings)
    if args.data is not None:
        settings = settings.model_copy(update={"data_dir": args.data.resolve()})
    stop, sigs = _until_signalled()
    try:
        async with akafka_cluster(settings) as target:
            created = (await ensure_hub_topics(target.bootstrap, hub_topics(args.jurisdiction), kafka=settings)).created
            started = f", started in {target.startup_seconds:.1f}s, pid {target.pid}" if target.pid else ""
            print(f"Kafka ({target.kind}) at {target.bootstrap}{started}")
            print(f"data: {target.data_dir} (kept across restarts)" if target.data_dir else
                  "data: throwaway (removed when it stops; --data DIR keeps it)")  # fmt: skip
            if target.log_file:
                print(f"broker log: {target.log_file}")
            print(f"topics created: {', '.join(created) or '(all existed)'}")
            print("Ctrl-C or SIGTERM stops it.", flush=True)
            await stop.wait()
    finally:
        for sig in sigs:
            asyncio.get_running_loop().remove_signal_handler(sig)
    print("Kafka stopped.", flush=True)
    return 0


async def _run_cluster(args: argparse.Namespace, settings: KafkaSettings) -> int:
    libs = await asyncio.to_thread(ensure_jars, settings.cache_dir)
    if args.data is not None:
        root = args.data.resolve()
        cluster = LocalCluster(libs=libs, root=root, persistent=True, pki=root / "pki" if args.secure else None)
    else:
        cluster = LocalCluster.throwaway(libs, root=settings.work_root, secure=args.secure)
    stop, sigs = _until_signalled()
    try:
        cluster.start()  # blocking by design: the JVMs' parent-death signal follows this (the main) thread
        try:
            replicated = settings.model_copy(update={"replication_factor": 3, "min_insync_replicas": 2})
            if args.secure:
                report(await provision(cluster.connection(), replicated, args.jurisdiction))
            else:
                created = (await ensure_hub_topics(cluster.bootstrap, hub_topics(args.jurisdiction),
                                                   kafka=replicated)).created  # fmt: skip
                print(f"topics created: {', '.join(created) or '(all existed)'}")
            _describe(cluster)
            await stop.wait()
        finally:
            await asyncio.to_thread(cluster.stop)
    finally:
        for sig in sigs:
            asyncio.get_running_loop().remove_signal_handler(sig)
    print("Kafka stopped.", flush=True)
    return 0


def _describe(cluster: LocalCluster) -> None:
    rss = cluster.rss_mb()
    print(f"Kafka cluster at {cluster.bootstrap}: brokers {cluster.broker_ids}, controllers {cluster.controller_ids},"
          f" started in {cluster.startup_seconds:.1f}s, {sum(rss.values()):.0f} MiB resident "
          f"({', '.join(f'{i}: {mb:.0f}' for i, mb in rss.items())})")  # fmt: skip
    print(f"data: {cluster.root}" + (" (kept across restarts)" if cluster.persistent else " (removed when it stops)"))
    print("hub services: EVHUB_KAFKA_REPLICATION_FACTOR=3 EVHUB_KAFKA_MIN_INSYNC_REPLICAS=2 "
          f"EVHUB_KAFKA_BOOTSTRAP={cluster.bootstrap}")  # fmt: skip
    if cluster.pki is not None:
        print(f"locked down: mTLS (CA {cluster.pki / 'ca.pem'}) and ACLs; each principal sets its certificate:")
        for principal in (*SERVICES, "kafka-admin"):
            files = cluster.certs[principal]
            print(f"  {principal}: EVHUB_KAFKA_SSL_CERT={files.cert} EVHUB_KAFKA_SSL_KEY={files.key} "
                  f"EVHUB_KAFKA_SSL_CA={files.ca}")  # fmt: skip
    print("Ctrl-C or SIGTERM stops it.", flush=True)


def report(done: Provisioned) -> None:
    print(f"topics created: {', '.join(done.topics.created) or '(all existed)'}")
    for weak in done.topics.weaker:
        print(f"warning: {weak}")
    print(f"ACLs: {len(done.acls.created)} created, {len(done.acls.kept)} already in force")
    for grant in done.acls.created:
        print(f"  + {grant}")
    for line in done.acls.extra:
        print(f"warning: beyond the hub's table: {line}")


async def run_acls(args: argparse.Namespace) -> int:
    """Raises: ConfigurationError (no bootstrap, incomplete TLS, not a super user, no authorizer),
    KafkaUnavailable."""
    settings = KafkaSettings()
    if not settings.bootstrap:
        raise ConfigurationError("set EVHUB_KAFKA_BOOTSTRAP and a super user's EVHUB_KAFKA_SSL_* (kafka-admin)")
    report(await provision(settings.connection(), settings, args.jurisdiction))
    return 0
