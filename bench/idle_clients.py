"""``python -m bench.idle_clients``: hold N idle Server-Sent-Events subscriptions open against a gateway.

Used by ``gateway-idle-1000`` so that the subscribers' own memory is not counted in the gateway's process. Opens
the connections 50 at a time over mutual TLS, prints ``ready <n>`` once every one answered 200, then holds them
until it is killed (the scenario stops it by PID).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

import aiohttp

from services.shared.tls import CertFiles, client_context


async def hold(url: str, n: int, files: CertFiles) -> None:
    connector = aiohttp.TCPConnector(ssl=client_context(files), limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        responses: list[aiohttp.ClientResponse] = []
        headers = {"Accept": "text/event-stream"}
        for _ in range(0, n, 50):
            batch = min(50, n - len(responses))
            opened = await asyncio.gather(*(session.get(url, headers=headers) for _ in range(batch)))
            if any(r.status != 200 for r in opened):
                print(f"failed {[r.status for r in opened]}", flush=True)
                return
            responses += opened
        print(f"ready {len(responses)}", flush=True)
        await asyncio.Event().wait()


def main() -> int:
    p = argparse.ArgumentParser(prog="python -m bench.idle_clients")
    p.add_argument("--url", required=True)
    p.add_argument("--n", type=int, required=True)
    p.add_argument("--cert", type=Path, required=True)
    p.add_argument("--key", type=Path, required=True)
    p.add_argument("--ca", type=Path, required=True)
    args = p.parse_args()
    try:
        asyncio.run(hold(args.url, args.n, CertFiles(cert=args.cert, key=args.key, ca=args.ca)))
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
