"""``python -m services.gateway``: build the settings once, configure logging once, serve mTLS until stopped."""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import gc
import logging
import signal
import ssl
import sys

from aiohttp import web
from pydantic import ValidationError

from services.gateway.service import CRASHED, create_app
from services.gateway.settings import GatewaySettings
from services.shared.errors import ConfigurationError, EvidenceHubError
from services.shared.tls import server_context

#: asyncio's TLS transport allocates (and zero-fills) a 256 KiB read buffer per connection (``SSLProtocol.max_size``
#: in CPython 3.11 to 3.13): with 1,000 idle subscribers that alone was 250 MiB of the gateway's 300 MiB. Offices only
#: send small GET requests, so 32 KiB (two TLS records) is plenty; measured in tests/gateway/test_idle.py.
TLS_READ_BUFFER = 32 * 1024


#: CPython's cyclic GC runs a young collection every 700 allocations; a feed page keeps ~50 objects per record alive
#: until it is sent, so many survive into the oldest generation, whose collections then scan the whole tail (every
#: record decoded in memory): measured in bench/scenarios_gateway.py, 3 full collections of ~0.3 s each while one
#: office read 12,000 records — 15 % of the time, and a 0.3 s stall of every connection. Records are acyclic and
#: freed by reference counting; only the (rare) cycles wait for the larger threshold.
GC_THRESHOLDS = (50_000, 20, 20)


def tune_tls_read_buffer() -> None:
    if getattr(asyncio.sslproto.SSLProtocol, "max_size", 0) > TLS_READ_BUFFER:
        asyncio.sslproto.SSLProtocol.max_size = TLS_READ_BUFFER


def tune_gc() -> None:
    gc.set_threshold(*GC_THRESHOLDS)


async def serve(settings: GatewaySettings) -> int:
    """Serve until SIGTERM or SIGINT (0), or until a background task fails (1).

    Raises:
        ConfigurationError: no Kafka cluster, no TLS files, no trust anchor, policy-admin key or cursor key.
    """
    bootstrap = settings.kafka.bootstrap
    if not bootstrap:
        raise ConfigurationError("EVHUB_KAFKA_BOOTSTRAP is required: the gateway reads the evidence topics from it")
    files = settings.tls_files()
    app = create_app(settings, bootstrap=bootstrap)
    # A client that goes away cancels its long poll or stream at once; a stop waits at most 10 s for handlers.
    runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=10)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        context = server_context(files, minimum_version=ssl.TLSVersion.TLSv1_3)
        await web.TCPSite(runner, settings.host, settings.port, ssl_context=context).start()
        logging.getLogger("services.gateway").info("gateway %s on https://%s:%d (Kafka %s)", settings.instance,
                                                   settings.host, settings.port, bootstrap)  # fmt: skip
        stopped, crashed = asyncio.create_task(stop.wait()), asyncio.create_task(app[CRASHED].wait())
        await asyncio.wait([stopped, crashed], return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        crashed.cancel()
        return 1 if app[CRASHED].is_set() else 0
    finally:
        await runner.cleanup()


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}',
        stream=sys.stderr,
    )
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    try:
        settings = GatewaySettings()
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        print(f"gateway: invalid settings (EVHUB_GATEWAY_*): {problems}", file=sys.stderr)
        return 5
    tune_tls_read_buffer()
    tune_gc()
    try:
        return asyncio.run(serve(settings))
    except EvidenceHubError as exc:
        print(f"gateway: {exc.detail}", file=sys.stderr)
        return 5 if exc.http_status == 500 else 4
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
