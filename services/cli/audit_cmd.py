"""``evhub audit``: replay the audit log (auditors), prove a receipt (offices), verify a proof offline, witness.

    evhub audit replay --log-key VKEY [--witness VKEY … --quorum N] [--start/--end/--office/--item/…]
                       [--json] [--jsonl FILE] [--csv FILE] [--dir COPY]
    evhub audit prove --receipt ID --log-key VKEY [--out FILE]
    evhub audit verify-proof FILE --log-key VKEY [--witness VKEY … --quorum N] [--receipt ID]
    evhub audit witness --log-key VKEY --witness-key PEM --name NAME [--once | --interval S]
    evhub audit witness-vkey --witness-key PEM --name NAME

Exit codes (``services/cli/main.py``): 0 everything verified · **1 a check failed**: a replay found a discrepancy
(the log, its history or a decision), a witness refused to cosign · 2 bad input (also a malformed or oversized
answer from the server) · 3 untrusted: the checkpoint's signature, a missing witness quorum, an invalid proof ·
4 the audit service or Kafka unreachable · 5 configuration.

The log's verifier key is always the user's (``--log-key``), never taken from the server. Policy versions for the
re-decision come from ``hub.policy`` on Kafka (``EVHUB_KAFKA_BOOTSTRAP``), accepted only with the auditor's own
policy-admin keys (``--trust`` / ``EVHUB_POLICY_ADMIN_KEYS``), as ``evhub policy`` does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import json
import logging
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from services.audit.checkpoint import TlogProof
from services.audit.note import CosignatureVerifier, NoteSigner, Verifier
from services.cli.audit_client import AuditServiceUnavailable, DirectoryLogSource, EntryQuery, HttpLogSource
from services.cli.audit_report import COLUMNS, ReplayReport, row
from services.cli.audit_state import CheckpointState
from services.cli.client_settings import ClientSettings
from services.cli.policy import bootstrap, trusted_store
from services.cli.receipt_proofs import check_proof, log_verifier, read_vkey
from services.cli.redecision import Replayed
from services.cli.replay import ReplayOptions, replay
from services.cli.witness import CheckFailed, witness_once
from services.policy.engine import PolicyEngine
from services.policy.topic import load_store
from services.shared.avro import AvroCodec
from services.shared.errors import (
    ConfigurationError,
    DecodeError,
    EvidenceHubError,
    InfrastructureError,
    NotFound,
    UntrustedKey,
    ValidationFailed,
)
from services.shared.kafka import POLICY_TOPIC
from services.shared.keys import SigningKey
from services.shared.tls import client_context

log = logging.getLogger(__name__)


def _time(text: str) -> str:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from exc
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError("give a time zone, e.g. 2026-01-31T12:00:00Z")
    return moment.isoformat()


def register(sub: Any) -> None:
    audit = sub.add_parser("audit", help="the audit log: replay it, prove a receipt, verify a proof, witness it")
    verbs = audit.add_subparsers(dest="audit_command", required=True)

    def server(p: argparse.ArgumentParser) -> None:
        p.add_argument("--url", help="audit service (default $EVHUB_CLIENT_AUDIT_URL or https://127.0.0.1:8083)")
        p.add_argument("--cert", type=Path, help="your client certificate (PEM; an auditor's or an office's)")
        p.add_argument("--key", type=Path, help="its private key (PEM)")
        p.add_argument("--ca", type=Path, help="the CA that signed the audit service's certificate")

    def log_key(p: argparse.ArgumentParser) -> None:
        p.add_argument("--log-key", required=True, help="the log's verifier key (name+id+key, or @FILE holding it), "
                       "from the log's operator out of band: never taken from the server")  # fmt: skip

    def witnesses(p: argparse.ArgumentParser) -> None:
        p.add_argument("--witness", action="append", default=[], help="a witness's verifier key (repeatable)")
        p.add_argument("--quorum", type=int, default=0, help="require cosignatures by this many of --witness")

    def state(p: argparse.ArgumentParser) -> None:
        p.add_argument("--state-dir", type=Path, help="where the last verified checkpoint is kept (default "
                       "$EVHUB_CLIENT_STATE_DIR or ~/.local/state/evhub)")  # fmt: skip

    r = verbs.add_parser("replay", help="verify the whole log (or a range / filter) and re-decide every entry")
    server(r)
    log_key(r)
    witnesses(r)
    state(r)
    r.add_argument("--dir", type=Path, help="replay a copy of the log's directory instead of the audit service")
    r.add_argument("--trust", type=Path, action="append", default=[], help="trusted policy-admin public key (PEM)")
    r.add_argument("--policy-topic", default=POLICY_TOPIC, help=argparse.SUPPRESS)
    r.add_argument("--start", type=int, help="first index (a subset replay)")
    r.add_argument("--end", type=int, help="index after the last one")
    r.add_argument("--office", help="only this office's entries")
    r.add_argument("--item", help="only this item's entries")
    r.add_argument("--decision", choices=("RELEASED", "REFUSED", "UNKNOWN"))
    r.add_argument("--since", type=_time, help="decided at or after (ISO 8601 with a zone)")
    r.add_argument("--until", type=_time, help="decided before")
    r.add_argument("--json", action="store_true", help="print the report as JSON instead of tables")
    r.add_argument("--jsonl", type=Path, help="write one JSON line per replayed entry to FILE")
    r.add_argument("--csv", type=Path, help="write one CSV row per replayed entry to FILE")
    r.set_defaults(handler=run_replay)

    p = verbs.add_parser("prove", help="fetch the c2sp.org/tlog-proof@v1 of one of your receipts, verified")
    server(p)
    log_key(p)
    p.add_argument("--receipt", required=True, help="the receipt id (the audit entry id you received)")
    p.add_argument("--size", type=int, help="prove against the checkpoint of this size (default: the latest)")
    p.add_argument("--out", type=Path, help="where to write it (default: <receipt>.tlog-proof)")
    p.set_defaults(handler=run_prove)

    v = verbs.add_parser("verify-proof", help="verify a tlog-proof file offline (no network)")
    v.add_argument("file", type=Path)
    log_key(v)
    witnesses(v)
    v.add_argument("--receipt", help="also require the proven entry to be this receipt")
    v.add_argument("--json", action="store_true")
    v.set_defaults(handler=run_verify_proof)

    w = verbs.add_parser("witness", help="cosign each new checkpoint consistent with the last one cosigned")
    server(w)
    log_key(w)
    state(w)
    w.add_argument("--witness-key", type=Path, required=True, help="the witness's Ed25519 private key (PEM)")
    w.add_argument("--name", required=True, help="the witness's name (its key name, e.g. oversight.example/w1)")
    w.add_argument("--once", action="store_true", help="one round, then exit (default: follow until Ctrl-C)")
    w.add_argument("--interval", type=float, default=10.0, help="seconds between rounds when following")
    w.set_defaults(handler=run_witness)

    k = verbs.add_parser("witness-vkey", help="print a witness key's verifier key (to give to the log and auditors)")
    k.add_argument("--witness-key", type=Path, required=True)
    k.add_argument("--name", required=True)
    k.set_defaults(handler=run_witness_vkey)


def _log_key(args: argparse.Namespace) -> Verifier:
    return log_verifier(args.log_key)


def _witnesses(args: argparse.Namespace) -> list[Verifier]:
    out: list[Verifier] = []
    for text in args.witness:
        verifier = read_vkey(text, "--witness")
        if not isinstance(verifier, CosignatureVerifier):
            raise UntrustedKey("--witness keys are cosignature/v1 verifier keys (type 0x04)")
        out.append(verifier)
    if not 0 <= args.quorum <= len(out):
        raise ValidationFailed(f"--quorum {args.quorum} needs at least that many --witness keys (given {len(out)})")
    return out


def _settings(args: argparse.Namespace) -> ClientSettings:
    given = {"audit_url": getattr(args, "url", None), "cert": getattr(args, "cert", None),
             "key": getattr(args, "key", None), "ca": getattr(args, "ca", None),
             "state_dir": getattr(args, "state_dir", None)}  # fmt: skip
    return ClientSettings(**{k: v for k, v in given.items() if v is not None})


def _http(settings: ClientSettings) -> HttpLogSource:
    return HttpLogSource(url=settings.audit_url, ssl_context=client_context(settings.cert_files()))


async def _policy(args: argparse.Namespace) -> tuple[PolicyEngine, str]:
    store = trusted_store(args.trust)
    with contextlib.suppress(NotFound):  # no version was ever pushed: decisions naming one are reported unknown
        await load_store(bootstrap(), store, topic=args.policy_topic)
    refused = sum(store.rejected.values())
    text = (
        f"{len(store.history())} policy version(s) replayed from {args.policy_topic}, each signed by a "
        "policy-admin key you trust" + (f"; {refused} record(s) refused" if refused else "")
    )
    return PolicyEngine(store, cache_size=1 << 18), text


class _Exports:
    """The JSONL and CSV files rows are streamed to (so a million entries never sit in memory)."""

    def __init__(self, stack: ExitStack, jsonl: Path | None, csv_path: Path | None) -> None:
        self._jsonl: IO[str] | None = None
        self._csv: Any = None
        try:
            if jsonl is not None:
                self._jsonl = stack.enter_context(jsonl.open("w", encoding="utf-8"))
            if csv_path is not None:
                out = stack.enter_context(csv_path.open("w", encoding="utf-8", newline=""))
                self._csv = csv.DictWriter(out, fieldnames=list(COLUMNS))
                self._csv.writeheader()
        except OSError as exc:
            raise ConfigurationError(f"cannot write {exc.filename}: {exc.strerror}") from exc

    def __call__(self, replayed: Replayed) -> None:
        record = row(replayed)
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record, separators=(",", ":")) + "\n")
        if self._csv is not None:
            self._csv.writerow(record)


@contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False) as progress:
        task = progress.add_task("replaying entries", total=None)

        def update(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        yield update


async def run_replay(args: argparse.Namespace) -> int:
    log_verifier = _log_key(args)
    witness_keys = _witnesses(args)
    settings = _settings(args)
    query = EntryQuery(start=args.start or 0, end=args.end, office=args.office, item=args.item,
                       decision=args.decision, since=args.since, until=args.until)  # fmt: skip
    if args.dir is not None and not query.is_everything:
        raise ValidationFailed("--dir replays a whole copy: --start, --end and the filters need the audit service")
    engine, policy_text = await _policy(args)
    state = CheckpointState(settings.state_dir, role="auditor")
    opts = ReplayOptions(log=log_verifier, engine=engine, codec=AvroCodec.load(), state=state,
                         witnesses=witness_keys, quorum=args.quorum, query=query)  # fmt: skip
    began = time.perf_counter()
    with ExitStack() as stack:
        exports = _Exports(stack, args.jsonl, args.csv)
        show = not args.json and Console(stderr=True).is_terminal
        with _progress(show) as progress:
            if args.dir is not None:
                report = await replay(DirectoryLogSource(args.dir), opts, progress=progress, rows=exports)
            else:
                async with _http(settings) as source:
                    report = await replay(source, opts, progress=progress, rows=exports)
    report.checks["policy"] = policy_text
    elapsed = time.perf_counter() - began
    if args.json:
        json.dump({**report.to_json(), "seconds": round(elapsed, 2)}, sys.stdout, indent=2)
        print()
    else:
        out = Console()
        _print_report(out if out.is_terminal else Console(width=160), report, elapsed)
    return 0 if report.ok else 1


def _print_report(console: Console, report: ReplayReport, elapsed: float) -> None:
    console.print(f"[bold]evhub audit replay[/bold] {report.origin}: {report.replayed} entries replayed "
                  f"({report.mode}) in {elapsed:.1f}s")  # fmt: skip
    for name, text in report.checks.items():
        console.print(f"  {name}: {text}")
    offices = Table(title="releases and refusals per office")
    for column in ("office", "released", "refused", "other"):
        offices.add_column(column, justify="left" if column == "office" else "right")
    for office, c in sorted(report.offices.items()):
        other = sum(c.values()) - c["RELEASED"] - c["REFUSED"]
        offices.add_row(office, str(c["RELEASED"]), str(c["REFUSED"]), str(other))
    console.print(offices)
    items = Table(title="releases and refusals per item")
    for column in ("item", "released", "refused"):
        items.add_column(column, justify="left" if column == "item" else "right")
    ranked = sorted(report.items.items(), key=lambda kv: (-sum(kv[1].values()), kv[0]))
    for item, c in ranked[:25]:
        items.add_row(item, str(c["RELEASED"]), str(c["REFUSED"]))
    if len(ranked) > 25:
        items.caption = f"the 25 most read of {len(ranked)} items (--json lists all)"
    console.print(items)
    if report.ok:
        console.print(f"[green]ok[/green]: the log verifies and every one of the {report.replayed} decisions is "
                      "reproduced by the policy in force when it was taken")  # fmt: skip
        return
    found = Table(title=f"{report.count} discrepancies")
    for column in ("index", "kind", "what is wrong"):
        found.add_column(column)
    listed = report.sorted_discrepancies()
    for d in listed[:50]:
        found.add_row("-" if d.index is None else str(d.index), f"[red]{d.kind}[/red]", d.detail)
    if report.count > 50:
        found.caption = f"the first 50 of {report.count} (--json, --jsonl and --csv list them all)"
    console.print(found)
    console.print(f"[red]FAILED[/red]: {report.count} discrepancies "
                  f"({', '.join(f'{n} {k}' for k, n in sorted(report.kinds.items()))})")  # fmt: skip


async def run_prove(args: argparse.Namespace) -> int:
    log_verifier = _log_key(args)
    settings = _settings(args)
    async with _http(settings) as source:
        data = await source.receipt(args.receipt, args.size)
    entry, verified = check_proof(data, log_verifier, [], 0, args.receipt)
    out: Path = args.out or Path(f"{args.receipt}.tlog-proof")
    try:
        out.write_bytes(data)
    except OSError as exc:
        raise ConfigurationError(f"cannot write {out}: {exc.strerror}") from exc
    proof = TlogProof.parse(data)
    print(f"wrote {out}: receipt {args.receipt} is entry {proof.index} of the log {verified.checkpoint.origin} "
          f"(size {verified.checkpoint.size}), {entry['decision']} {entry['action']} for {entry['office']}, "
          "verified with your log key")  # fmt: skip
    return 0


async def run_verify_proof(args: argparse.Namespace) -> int:
    log_verifier = _log_key(args)
    witness_keys = _witnesses(args)
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise ValidationFailed(f"cannot read {args.file}: {exc.strerror}") from exc
    entry, verified = check_proof(data, log_verifier, witness_keys, args.quorum, args.receipt)
    proof = TlogProof.parse(data)
    cp = verified.checkpoint
    item = (entry.get("item") or {}).get("item_id")
    summary = {"ok": True, "receipt": entry["entry_id"], "index": proof.index, "origin": cp.origin, "size": cp.size,
               "office": entry["office"], "action": entry["action"], "item": item, "decision": entry["decision"],
               "at": entry["at"].isoformat(), "policy_version": entry.get("policy_version"),
               "cosigned_by": sorted(verified.cosigned_by)}  # fmt: skip
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"ok: receipt {summary['receipt']} is entry {proof.index} of {cp.origin} under a checkpoint of size "
              f"{cp.size} signed by the log key" + (f" and cosigned by {', '.join(summary['cosigned_by'])}"
                                                    if summary["cosigned_by"] else ""))  # fmt: skip
        print(f"  {entry['decision']} {entry['action']} of {item or entry['jurisdiction']} for {entry['office']} at "
              f"{summary['at']} under policy {summary['policy_version']}")  # fmt: skip
    return 0


def _witness_signer(args: argparse.Namespace) -> NoteSigner:
    try:
        key = SigningKey.from_pem(args.witness_key.read_bytes())
    except OSError as exc:
        raise ConfigurationError(f"cannot read {args.witness_key}: {exc.strerror}") from exc
    except EvidenceHubError as exc:
        raise ConfigurationError(f"{args.witness_key} is not an Ed25519 private key: {exc.detail}") from exc
    try:
        return NoteSigner(args.name, key, sig_type=4)
    except (ValueError, DecodeError) as exc:
        raise ValidationFailed(f"--name {args.name!r} is not a valid key name (no spaces or '+')") from exc


async def run_witness_vkey(args: argparse.Namespace) -> int:
    print(_witness_signer(args).vkey)
    return 0


async def run_witness(args: argparse.Namespace) -> int:
    log_verifier = _log_key(args)
    signer = _witness_signer(args)
    settings = _settings(args)
    state = CheckpointState(settings.state_dir, role=f"witness-{signer.key_id:08x}")
    async with _http(settings) as source:
        while True:
            try:
                done = await witness_once(source, log=log_verifier, signer=signer, state=state,
                                          now=lambda: int(time.time()))  # fmt: skip
                print(done.message, flush=True)
            except (AuditServiceUnavailable, InfrastructureError) as exc:
                if args.once:
                    raise
                print(f"evhub: {exc.detail} (trying again in {args.interval:g}s)", file=sys.stderr, flush=True)
            except CheckFailed:
                raise  # a fork or a rollback: stop and say so
            if args.once:
                return 0
            await asyncio.sleep(args.interval)
