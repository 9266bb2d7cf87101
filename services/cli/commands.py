"""Sub-commands of ``evhub``. Each handler is ``async def (args) -> exit code``."""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from services.shared.cluster import akafka_cluster
from services.shared.kafka import ensure_hub_topics, hub_topics
from services.shared.settings import KafkaSettings


def register(sub: Any) -> None:
    from services.cli import certs_cmd, demo, keys_cmd, policy, publish_cmd, subscribe_cmd

    publish_cmd.register(sub)
    keys_cmd.register(sub)
    certs_cmd.register(sub)
    policy.register(sub)
    subscribe_cmd.register(sub)
    kafka = sub.add_parser("kafka", help="run the embedded single-node Kafka broker until Ctrl-C")
    kafka.add_argument("--jurisdiction", action="append", default=[], help="also create evidence.<J> (repeatable)")
    kafka.set_defaults(handler=run_kafka)
    demo.register(sub)


async def run_kafka(args: argparse.Namespace) -> int:
    settings = KafkaSettings()
    async with akafka_cluster(settings) as target:
        created = (await ensure_hub_topics(target.bootstrap, hub_topics(args.jurisdiction), kafka=settings)).created
        print(f"Kafka ({target.kind}) at {target.bootstrap}"
              + (f", started in {target.startup_seconds:.1f}s, pid {target.pid}" if target.pid else ""))
        if target.log_file:
            print(f"broker log: {target.log_file}")
        print(f"topics created: {', '.join(created) or '(all existed)'}")
        print("Ctrl-C stops it.", flush=True)
        await asyncio.Event().wait()
    return 0

