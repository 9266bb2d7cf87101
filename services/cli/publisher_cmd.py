"""``evhub publisher recover`` and ``evhub publisher backup``: the publisher's state, for its operators.

``recover`` rebuilds the state from Kafka when the publisher refuses to start because its state is behind what
Kafka holds (lost, emptied, restored from an old copy) — see ``services.publisher.recovery``. It uses the
publisher's own settings (``EVHUB_PUBLISHER_*``, ``EVHUB_KAFKA_*``) and needs the publisher stopped.

``backup DEST`` writes a consistent copy of the state while the publisher runs (SQLite ``VACUUM INTO``: the state
as of one commit). Restoring a copy is safe: the publisher compares it with Kafka at start and refuses it if it is
behind (then ``recover``). Copy the content store (``DATA_DIR/content``) after the state, so every file the copy
refers to is in the content copy.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
from pathlib import Path
from typing import Any

from services.publisher.datadir import DataDir
from services.publisher.settings import PublisherSettings
from services.shared.errors import ConfigurationError, StoreUnavailable


def register(sub: Any) -> None:
    p = sub.add_parser("publisher", help="the publisher's state: recover it from Kafka, back it up")
    verbs = p.add_subparsers(dest="verb", required=True)
    rec = verbs.add_parser("recover", help="rebuild the publisher's state from Kafka (publisher stopped)")
    rec.set_defaults(handler=run_recover)
    bak = verbs.add_parser("backup", help="a consistent copy of the publisher's state, taken while it runs")
    bak.add_argument("dest", type=Path, help="the copy to write (must not exist)")
    bak.add_argument("--data-dir", type=Path, help="the publisher's data directory (default $EVHUB_PUBLISHER_DATA_DIR)")
    bak.set_defaults(handler=run_backup)


async def run_recover(args: argparse.Namespace) -> int:
    from services.publisher.recovery import describe, recover

    report = await recover(PublisherSettings(), progress=lambda line: print(line, flush=True))
    for line in describe(report):
        print(line)
    return 1 if report.signed_twice else 0


async def run_backup(args: argparse.Namespace) -> int:
    """Raises: ConfigurationError (no state there, or ``dest`` exists), StoreUnavailable (the copy failed)."""
    data_dir = args.data_dir or PublisherSettings().data_dir
    source = DataDir(data_dir).state
    if not source.is_file():
        raise ConfigurationError(f"no publisher state at {source}")
    if args.dest.exists():
        raise ConfigurationError(f"{args.dest} exists; a backup never overwrites")
    await asyncio.to_thread(_vacuum_into, source, args.dest)
    print(f"backed up {source} to {args.dest} ({args.dest.stat().st_size} bytes); now copy {data_dir / 'content'}")
    return 0


def _vacuum_into(source: Path, dest: Path) -> None:
    try:
        conn = sqlite3.connect(source, timeout=30.0)
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"cannot open {source}: {exc}") from exc
    try:
        conn.execute("VACUUM INTO ?", (str(dest),))
    except sqlite3.Error as exc:
        raise StoreUnavailable(f"backup to {dest} failed: {exc}") from exc
    finally:
        conn.close()
