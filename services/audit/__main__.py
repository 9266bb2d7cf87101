"""``python -m services.audit``: build the settings once, configure logging once, serve until stopped."""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys

from aiohttp import web
from pydantic import ValidationError

from services.audit.service import create_app
from services.audit.settings import AuditSettings
from services.shared.errors import ConfigurationError, EvidenceHubError
from services.shared.tls import server_context


async def serve(settings: AuditSettings) -> None:
    """Serve until SIGTERM or SIGINT, then shut down cleanly.

    Raises:
        ConfigurationError: no Kafka cluster, no TLS files, or no signing key configured.
    """
    bootstrap = settings.kafka.bootstrap
    if not bootstrap:
        raise ConfigurationError("EVHUB_KAFKA_BOOTSTRAP is required: the audit service reads hub.audit from it")
    files = settings.tls_files()
    runner = web.AppRunner(create_app(settings, bootstrap=bootstrap))
    await runner.setup()
    # Everything allocated so far lives as long as the process: keep it out of the collector's scans, which
    # otherwise rescan it while integration allocates (measured: ~20 % of an integration's CPU time).
    gc.freeze()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        ssl_context = None if files is None else server_context(files)
        await web.TCPSite(runner, settings.host, settings.port, ssl_context=ssl_context).start()
        logging.getLogger("services.audit").info(
            "audit service on %s://%s:%d (Kafka %s, origin %s)", "http" if files is None else "https",
            settings.host, settings.port, bootstrap, settings.origin,
        )  # fmt: skip
        await stop.wait()
    finally:
        await runner.cleanup()


def main(argv: list[str] | None = None) -> int:
    """Serve; or, with the single argument ``vkey``, print the log's verifier key (what auditors, offices and
    witnesses configure) and exit."""
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        level=logging.INFO,
        format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}',
        stream=sys.stderr,
    )
    try:
        settings = AuditSettings()
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in first["loc"])
        print(f"audit service: setting {where.upper()} (EVHUB_AUDIT_…): {first['msg']}", file=sys.stderr)
        return 5
    if args == ["vkey"]:
        try:
            print(settings.load_signer().vkey)
        except EvidenceHubError as exc:
            print(f"audit service: {exc.detail}", file=sys.stderr)
            return 5
        return 0
    if args:
        print("usage: python -m services.audit [vkey]", file=sys.stderr)
        return 2
    try:
        asyncio.run(serve(settings))
    except EvidenceHubError as exc:
        print(f"audit service: {exc.detail}", file=sys.stderr)
        return 5 if exc.http_status == 500 else 4
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
