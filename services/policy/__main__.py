"""``python -m services.policy``: build the settings once, configure logging once, serve until stopped."""

from __future__ import annotations

import asyncio
import logging
import sys

from aiohttp import web

from services.policy.service import create_app
from services.policy.settings import PolicySettings
from services.shared.cluster import akafka_cluster
from services.shared.errors import EvidenceHubError


async def serve(settings: PolicySettings) -> None:
    async with akafka_cluster(settings.kafka) as target:
        runner = web.AppRunner(create_app(settings, bootstrap=target.bootstrap))
        await runner.setup()
        try:
            await web.TCPSite(runner, settings.host, settings.port).start()
            logging.getLogger("services.policy").info(
                "policy service on http://%s:%d (Kafka %s)", settings.host, settings.port, target.bootstrap
            )
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}',
        stream=sys.stderr,
    )
    try:
        asyncio.run(serve(PolicySettings()))
    except EvidenceHubError as exc:
        print(f"policy service: {exc.detail}", file=sys.stderr)
        return 5 if exc.http_status == 500 else 4
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
