"""Sub-commands of ``evhub``. Each handler is ``async def (args) -> exit code``."""

from __future__ import annotations

import argparse
import asyncio
import signal
from pathlib import Path
from typing import Any

from services.shared.cluster import akafka_cluster
from services.shared.errors import ConfigurationError
from services.shared.kafka import ensure_hub_topics, hub_topics
from services.shared.settings import KafkaSettings


def register(sub: Any) -> None:
    from services.cli import audit_cmd, certs_cmd, demo, keys_cmd, policy, publish_cmd, publisher_cmd, subscribe_cmd

    publish_cmd.register(sub)
    publisher_cmd.register(sub)
    keys_cmd.register(sub)
    certs_cmd.register(sub)
    policy.register(sub)
    subscribe_cmd.register(sub)
    audit_cmd.register(sub)
    kafka = sub.add_parser("kafka", help="run the embedded single-node Kafka broker until Ctrl-C or SIGTERM")
    kafka.add_argument("--jurisdiction", action="append", default=[], help="also create evidence.<J> (repeatable)")
    kafka.add_argument("--data", type=Path, metavar="DIR",
                       help="keep the broker's data and address in DIR across restarts (formatted on first use); "
                            "without it the broker is throwaway: its directory is removed when it stops")  # fmt: skip
    kafka.set_defaults(handler=run_kafka)
    demo.register(sub)


async def run_kafka(args: argparse.Namespace) -> int:
    """Run the embedded broker until Ctrl-C or SIGTERM; either stops it cleanly (a throwaway directory is removed).

    Raises:
        ConfigurationError: ``--data`` with an external cluster. BrokerStartError: the broker did not start.
    """
    settings = KafkaSettings()
    if args.data is not None:
        if settings.bootstrap:
            raise ConfigurationError("--data is for the embedded broker, but EVHUB_KAFKA_BOOTSTRAP names a cluster")
        settings = settings.model_copy(update={"data_dir": args.data.resolve()})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        async with akafka_cluster(settings) as target:
            report = await ensure_hub_topics(target.bootstrap, hub_topics(args.jurisdiction), kafka=settings)
            created = report.created
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
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    print("Kafka stopped.", flush=True)
    return 0
