"""``evhub`` entry point: parses arguments, configures logging once, maps errors to exit codes.

Exit codes: 0 ok · 1 a check failed (e.g. verification found problems) · 2 usage or bad input ·
3 untrusted data (e.g. ``evhub subscribe`` received a record that failed verification) · 4 infrastructure
unavailable (retry later) · 5 configuration · 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from services.cli import commands
from services.shared.errors import (
    ConfigurationError,
    DecodeError,
    EvidenceHubError,
    InfrastructureError,
    InputError,
    PolicyError,
    TrustError,
)

EXIT_CODES: list[tuple[type[EvidenceHubError], int]] = [
    (InputError, 2),
    (DecodeError, 2),
    (PolicyError, 2),
    (TrustError, 3),
    (InfrastructureError, 4),
    (ConfigurationError, 5),
]


def exit_code_for(error: EvidenceHubError) -> int:
    for family, code in EXIT_CODES:
        if isinstance(error, family):
            return code
    return 1


def one_line(error: EvidenceHubError, shown: int = 5) -> str:
    """The error as one line, naming the first few field problems it carries."""
    problems = [f"{e.get('field')}: {e.get('message')}" for e in error.extensions.get("errors", [])]
    if not problems:
        return error.detail
    more = f"; and {len(problems) - shown} more" if len(problems) > shown else ""
    return f"{error.detail} ({'; '.join(problems[:shown])}{more})".replace("\n", " ")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="evhub", description="Evidence Hub command line")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True)
    commands.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format='{"ts":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}',
        stream=sys.stderr,
    )
    if not args.verbose:  # aiokafka logs retried, recovered errors as warnings; a user only needs the outcome
        logging.getLogger("aiokafka").setLevel(logging.ERROR)
    try:
        result: int = asyncio.run(args.handler(args))
        return result
    except EvidenceHubError as exc:
        print(f"evhub: {one_line(exc)}", file=sys.stderr)
        return exit_code_for(exc)
    except KeyboardInterrupt:
        print("evhub: interrupted", file=sys.stderr)
        return 130
