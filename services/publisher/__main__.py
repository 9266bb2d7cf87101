"""``python -m services.publisher``: settings from the environment, logging once, then serve until SIGTERM."""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from services.publisher.service import CRASHED, create_app
from services.publisher.settings import PublisherSettings
from services.shared.errors import EvidenceHubError
from services.shared.tls import server_context


def main() -> int:
    logging.basicConfig(
        level=logging.INFO,
        format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}',
    )
    try:
        settings = PublisherSettings()
        files = settings.tls_files()
        app = create_app(settings)
        web.run_app(app, host=settings.host, port=settings.port, print=None,
                    ssl_context=None if files is None else server_context(files))  # fmt: skip
    except EvidenceHubError as exc:
        print(f"publisher: {exc.detail}", file=sys.stderr)
        return 2
    return 1 if app[CRASHED] else 0


if __name__ == "__main__":
    sys.exit(main())
