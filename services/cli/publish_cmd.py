"""``evhub publish PATH… [--manifest FILE]``: progress bar, summary table, ``--json``, resumable."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from services.cli import manifest
from services.cli.client_settings import ClientSettings
from services.cli.publish import DEFAULT_CONCURRENCY, Journal, Outcome, publish_all, summary
from services.shared.errors import ValidationFailed
from services.shared.tls import client_context


def register(sub: Any) -> None:
    p = sub.add_parser("publish", help="publish evidence files described by a manifest (JSON or CSV)")
    p.add_argument("paths", nargs="+", type=Path, help="files or folders (a folder: every manifest row under it)")
    p.add_argument("--manifest", type=Path, help="manifest file (default: manifest.json or manifest.csv in the folder)")
    p.add_argument("--url", help="publisher URL (default $EVHUB_CLIENT_URL or https://127.0.0.1:8443)")
    p.add_argument("--cert", type=Path, help="client certificate (PEM)")
    p.add_argument("--key", type=Path, help="client private key (PEM)")
    p.add_argument("--ca", type=Path, help="CA that signed the publisher's certificate")
    p.add_argument("--journal", type=Path, help="resume journal (default: .evhub-publish.jsonl beside the manifest)")
    p.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY)
    p.add_argument("--json", action="store_true", help="print a JSON summary instead of the table")
    p.add_argument("--check", action="store_true", help="validate the manifest and the files, send nothing")
    p.set_defaults(handler=run_publish)


def _find_manifest(paths: list[Path], given: Path | None) -> Path:
    if given is not None:
        return given
    folders = [p if p.is_dir() else p.parent for p in paths]
    for folder in dict.fromkeys(folders):
        for name in ("manifest.json", "manifest.csv"):
            if (folder / name).is_file():
                return folder / name
    raise ValidationFailed("no manifest: pass --manifest, or put manifest.json / manifest.csv in the folder")


def _selected(entries: list[manifest.Entry], paths: list[Path]) -> list[manifest.Entry]:
    roots = [p.resolve() for p in paths]
    return [e for e in entries if any(e.path == r or r in e.path.parents for r in roots)]


async def run_publish(args: argparse.Namespace) -> int:
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        raise ValidationFailed(f"no such file or folder: {', '.join(map(str, missing))}")
    manifest_path = _find_manifest(args.paths, args.manifest)
    entries = _selected(manifest.load(manifest_path), args.paths)  # every row checked before anything is sent
    if not entries:
        named = ", ".join(map(str, args.paths))
        raise ValidationFailed(f"no manifest row of {manifest_path} names a file under {named}")
    if args.check:
        size = sum(e.path.stat().st_size for e in entries)
        print(f"{manifest_path}: {len(entries)} items ready to publish ({size:,} bytes)")
        return 0
    overrides = {k: v for k, v in {"url": args.url, "cert": args.cert, "key": args.key, "ca": args.ca}.items() if v}
    settings = ClientSettings(**overrides)
    ssl_context = client_context(settings.cert_files())
    journal = Journal(args.journal or manifest_path.parent / ".evhub-publish.jsonl")
    total = sum(e.path.stat().st_size for e in entries)
    console = Console(stderr=True)
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
               TimeRemainingColumn())  # fmt: skip
    with Progress(*columns, console=console, disable=args.json, transient=False) as progress:
        task = progress.add_task(f"publishing {len(entries)} items", total=total)

        def done(outcome: Outcome) -> None:
            if outcome.status == "failed":
                progress.console.print(f"[red]failed[/red] {outcome.item_id}: {outcome.error}")

        outcomes = await publish_all(
            entries, url=settings.url.rstrip("/"), ssl_context=ssl_context, journal=journal,
            concurrency=max(1, args.concurrency), on_progress=lambda n: progress.advance(task, n), on_done=done,
        )  # fmt: skip
    result = summary(outcomes)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        print()
    else:
        out = Console()
        _print_table(out if out.is_terminal else Console(width=160), outcomes, result)  # logs: don't truncate
    return 1 if result["failed"] else 0


def _print_table(console: Console, outcomes: list[Outcome], result: dict[str, Any]) -> None:
    table = Table(title="evhub publish")
    for column in ("item", "status", "media type", "size", "jurisdictions", "event / error"):
        table.add_column(column)
    shown = [o for o in outcomes if o.status == "failed"] + [o for o in outcomes if o.status != "failed"]
    for o in shown[:50]:
        style = {"published": "green", "already-published": "cyan", "failed": "red"}[o.status]
        table.add_row(o.item_id, f"[{style}]{o.status}[/{style}]", o.media_type, f"{o.size:,}", o.jurisdictions,
                      o.error or o.event_id)  # fmt: skip
    if len(shown) > 50:
        table.caption = f"… and {len(shown) - 50} more (use --json for all)"
    console.print(table)
    console.print(
        f"{result['total']} items, {result['bytes']:,} bytes: {result['published']} published, "
        f"{result['already-published']} already published, {result['failed']} failed"
        + (
            f" — {result['retriable']} of them may succeed if you run the same command again"
            if result["retriable"]
            else ""
        )
        + (
            " — the others need their metadata or file fixed (see the table)"
            if result["failed"] > result["retriable"]
            else ""
        )
    )
