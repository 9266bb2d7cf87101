"""``python -m services.publisher``: settings from the environment, logging once, then serve until SIGTERM.

``python -m services.publisher recover`` rebuilds the state from Kafka instead (see ``recovery``).

Exit codes: 0 stopped by SIGTERM · 1 crashed · 2 bad input · 3 untrusted key · 4 Kafka or the disk unavailable ·
5 configuration, or state refused (damaged, in use, behind what Kafka holds, fenced by another publisher).
"""

from __future__ import annotations

import gc
import logging
import sys

from services.publisher.courier import FencedNoise
from services.publisher.service import CRASHED, FATAL, STOP, create_app
from services.publisher.settings import PublisherSettings
from services.shared.errors import (
    ConfigurationError,
    EvidenceHubError,
    InfrastructureError,
    InputError,
    TrustError,
)
from services.shared.serve import run, serve
from services.shared.tls import server_context

log = logging.getLogger("services.publisher")


def exit_code(error: EvidenceHubError) -> int:
    for family, code in ((InputError, 2), (TrustError, 3), (InfrastructureError, 4), (ConfigurationError, 5)):
        if isinstance(error, family):
            return code
    return 1


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO,
        format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}',
    )
    logging.getLogger("asyncio").addFilter(FencedNoise())
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["recover"]:
        from services.publisher.recovery import main as recover

        return recover(args[1:])
    try:
        settings = PublisherSettings()
        files = settings.tls_files()
        if files is None:
            log.warning("UNSAFE: EVHUB_PUBLISHER_UNSAFE_PLAINTEXT is set: serving plain HTTP on %s:%d without "
                        "authentication; anyone who can reach it can publish. For local experiments only.",
                        settings.host, settings.port)  # fmt: skip
        app = create_app(settings)
        ssl_context = None if files is None else server_context(files)
        # SIGTERM: waiting requests are answered at once; open connections get a quarter of the grace period
        # (aiohttp may spend it twice: waiting, then cancelling), deliveries in flight 40% (_own_resources), and
        # what is still running at the end a tenth.
        grace = settings.shutdown_grace_s
        run(serve(app, host=settings.host, port=settings.port, ssl_context=ssl_context, shutdown_timeout=grace / 4,
                  stop=app[STOP], exit_within_s=grace + 2), linger_s=grace / 10)  # fmt: skip
    except EvidenceHubError as exc:
        print(f"publisher: {exc.detail}", file=sys.stderr)
        return exit_code(exc)
    except KeyboardInterrupt:
        return 130
    if app[FATAL]:
        gc.collect()  # whatever the collector would log at exit, before the one line that says why
        print(f"publisher: {app[FATAL][0].detail}", file=sys.stderr)
        return exit_code(app[FATAL][0])
    return 1 if app[CRASHED] else 0


if __name__ == "__main__":
    sys.exit(main())
