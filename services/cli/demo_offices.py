"""The demo's read path: the gateway and the audit service as processes behind mutual TLS, and the prosecution
offices subscribing to their feeds with ``evhub subscribe --once``.

Owns: the certificates that name the offices and an auditor (``urn:evhub:office:<ID>``, ``urn:evhub:auditor:…``
SAN URIs, from the demo's development CA), starting ``python -m services.gateway`` and ``python -m services.audit``
(stopped by PID when the block ends), running one subscription per office — the same code path as the command —
and printing what each office got, what was withheld from it, and that it verified everything itself.

:class:`ReadPath` is what the auditor's step needs (the audit service's URL, the auditor's certificate, the log's
verifier key). Does not own: the earlier steps (``demo``) or the auditor's (``demo_audit``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from rich.console import Console
from rich.table import Table

from services.audit.note import NoteSigner
from services.cli.audit_client import HttpLogSource
from services.cli.receipt_proofs import AuditProver, log_verifier
from services.cli.subscribe_cmd import Options, Result, subscribe
from services.cli.supervise import running_service
from services.shared.keys import PublicKey, SigningKey
from services.shared.local_kafka import free_port
from services.shared.principals import principal_uri
from services.shared.tls import CertFiles, client_context, issue_leaf

AUDIT_ORIGIN = "evidence-hub.example/demo-audit"


@dataclass(frozen=True)
class ReadPath:
    gateway_url: str
    audit_url: str
    offices: dict[str, CertFiles]  # office id → its client certificate
    auditor: CertFiles
    #: The audit log's verifier key (``<origin>+<key id>+<base64>``): what auditors and offices are given out of band.
    log_vkey: str


@contextlib.asynccontextmanager
async def read_path(out: Console, work: Path, *, bootstrap: str, offices: Mapping[str, str], anchor_pub: Path,
                    admin_pub: Path) -> AsyncIterator[ReadPath]:  # fmt: skip
    """Start the gateway and the audit service; yield where they are; stop both (by PID) at the end.

    Raises:
        ServiceStartError: a service did not become healthy (with its last log lines).
    """
    out.rule("8. The read path: gateway and audit log (python -m services.gateway / services.audit, mTLS 1.3)")
    pki = work / "pki"
    gateway_tls, audit_tls = issue_leaf(pki, "gateway"), issue_leaf(pki, "audit")
    certs = {o: issue_leaf(pki, f"office-{o}", uris=(principal_uri("office", o),)) for o in offices.values()}
    auditor = issue_leaf(pki, "auditor-court", uris=(principal_uri("auditor", "court-1"),))
    log_key = SigningKey.generate()
    log_key_file = work / "keys" / "audit-log.key"
    log_key_file.write_bytes(log_key.to_pem())
    log_key_file.chmod(0o600)
    gateway_port, audit_port = free_port(), free_port()
    gateway_env = {
        "EVHUB_KAFKA_BOOTSTRAP": bootstrap, "EVHUB_GATEWAY_PORT": str(gateway_port),
        "EVHUB_GATEWAY_DATA_DIR": str(work / "gateway"),
        "EVHUB_GATEWAY_CONTENT_DIR": str(work / "publisher" / "content"),
        "EVHUB_GATEWAY_TRUST_ANCHOR_FILES": json.dumps([str(anchor_pub)]),
        "EVHUB_GATEWAY_POLICY_ADMIN_KEYS": json.dumps([str(admin_pub)]),
        "EVHUB_GATEWAY_CURSOR_KEYS": json.dumps({"k1": base64.urlsafe_b64encode(os.urandom(32)).decode()}),
        "EVHUB_GATEWAY_CURSOR_KEY_ID": "k1", "EVHUB_GATEWAY_JURISDICTIONS": json.dumps(sorted(offices)),
        "EVHUB_GATEWAY_TLS_CERT": str(gateway_tls.cert), "EVHUB_GATEWAY_TLS_KEY": str(gateway_tls.key),
        "EVHUB_GATEWAY_TLS_CA": str(gateway_tls.ca),
    }  # fmt: skip
    audit_env = {
        "EVHUB_KAFKA_BOOTSTRAP": bootstrap, "EVHUB_AUDIT_PORT": str(audit_port),
        "EVHUB_AUDIT_DATA_DIR": str(work / "audit"),
        "EVHUB_AUDIT_SIGNING_KEY": str(log_key_file), "EVHUB_AUDIT_ORIGIN": AUDIT_ORIGIN,
        "EVHUB_AUDIT_TLS_CERT": str(audit_tls.cert), "EVHUB_AUDIT_TLS_KEY": str(audit_tls.key),
        "EVHUB_AUDIT_TLS_CA": str(audit_tls.ca),
    }  # fmt: skip
    gateway_url, audit_url = f"https://127.0.0.1:{gateway_port}", f"https://127.0.0.1:{audit_port}"
    ctx = client_context(auditor)
    logs = work / "logs"
    async with (
        running_service("services.gateway", env=gateway_env, health_url=f"{gateway_url}/healthz", ssl_context=ctx,
                        log_file=logs / "gateway.log") as gateway_pid,
        running_service("services.audit", env=audit_env, health_url=f"{audit_url}/healthz", ssl_context=ctx,
                        log_file=logs / "audit.log") as audit_pid,
    ):  # fmt: skip
        out.print(f"gateway pid {gateway_pid} at {gateway_url}; audit log pid {audit_pid} at {audit_url} "
                  f"(origin {AUDIT_ORIGIN}); logs in {logs}")  # fmt: skip
        out.print("office certificates (SAN urn:evhub:office:<ID>): " + ", ".join(sorted(certs)))
        yield ReadPath(gateway_url, audit_url, certs, auditor, NoteSigner(AUDIT_ORIGIN, log_key).vkey)


async def offices_subscribe(out: Console, work: Path, path: ReadPath, *, offices: Mapping[str, str],
                            anchor: PublicKey) -> dict[str, Result]:  # fmt: skip
    """Each office runs ``evhub subscribe --jurisdiction J --out DIR --once --purpose prosecution`` and verifies
    everything with the group's public key (its trust anchor) only."""
    out.rule("9. Each prosecution office subscribes (evhub subscribe --once) and verifies what it receives")
    results: dict[str, Result] = {}
    for jurisdiction, office in offices.items():
        tls = client_context(path.offices[office])
        results[office] = await subscribe(Options(
            jurisdiction=jurisdiction, out=work / "offices" / office, gateway=path.gateway_url, tls=tls, office=office,
            anchors=[anchor], purpose="prosecution", once=True, give_up_after_s=60.0,
        ))  # fmt: skip
    table = Table("office", "events", "withdrawals", "withheld (receipts)", "protected values received",
                  "protected values withheld", "files verified", "failed",
                  title="what each office received, verified with the group's public key alone")  # fmt: skip
    for office, result in results.items():
        t = result.summary["total"]
        table.add_row(office, str(t["events"]), str(t["withdrawals"]), str(t["withheld"]), _labels(t["disclosed"]),
                      _labels(t["withheld_fields"]), f"{t['content_files']} ({t['content_bytes']:,} B)",
                      str(t["failures"]))  # fmt: skip
    out.print(table)
    for office, result in results.items():
        held = sorted(p.name for p in (Path(result.summary["dir"]) / "items").iterdir())
        out.print(f"{office} keeps in {result.summary['dir']}: {', '.join(held)}")
    verified = all(r.exit_code == 0 and r.summary["verified"] for r in results.values())
    out.print("[green]every signature, disclosure and content digest verified by each office[/green]" if verified
              else "[bold red]some office refused a record: see its rejected/ folder[/bold red]")  # fmt: skip
    await _audit_covers(out, path, sum(_receipts(r) for r in results.values()))
    await _prove_receipts(out, work, path, offices=offices, anchor=anchor)
    return results


async def _prove_receipts(out: Console, work: Path, path: ReadPath, *, offices: Mapping[str, str],
                          anchor: PublicKey) -> None:  # fmt: skip
    """Each office runs ``evhub subscribe --once --log-key VKEY`` again: resumed (nothing new), it fetches the proof
    of every receipt it holds from the audit log, checks it with its own copy of the log's key and keeps it."""
    log_key = log_verifier(path.log_vkey)
    kept = []
    for jurisdiction, office in offices.items():
        tls = client_context(path.offices[office])
        async with HttpLogSource(url=path.audit_url, ssl_context=tls) as source:
            result = await subscribe(Options(
                jurisdiction=jurisdiction, out=work / "offices" / office, gateway=path.gateway_url, tls=tls,
                office=office, anchors=[anchor], purpose="prosecution", once=True, give_up_after_s=60.0,
            ), prover=AuditProver(source=source, log_key=log_key))  # fmt: skip
        proofs, new = result.summary["proofs"], result.summary["this_run"]["events"]
        kept.append(f"{office} {proofs['kept']} kept, {proofs['awaiting']} awaiting ({new} new events)")
    out.print("evhub subscribe --once --log-key <the log's verifier key>, run again by each office: receipt proofs "
              "(c2sp.org/tlog-proof@v1, verified, in <dir>/proofs): " + "; ".join(kept))  # fmt: skip


def _labels(counts: Mapping[str, int]) -> str:
    return "\n".join(f"{k.lower().replace('_', ' ')} x{v}" for k, v in counts.items()) or "-"


def _receipts(result: Result) -> int:
    """Receipts an office holds: one per release, refusal and download."""
    t = result.summary["total"]
    return int(t["events"] + t["withdrawals"] + t["withheld"] + t["redelivered"] + t["content_files"])


async def _audit_covers(out: Console, path: ReadPath, receipts: int, *, within_s: float = 30.0) -> None:
    """Wait (bounded) until the audit log's checkpoint covers at least as many entries as the offices hold
    receipts, and say so."""
    size = 0
    connector = aiohttp.TCPConnector(ssl=client_context(path.auditor))
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=5)) as session:
        deadline = asyncio.get_running_loop().time() + within_s
        while asyncio.get_running_loop().time() < deadline:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError):
                async with session.get(f"{path.audit_url}/healthz") as response:
                    size = int((await response.json())["size"])
            if size >= receipts:
                break
            await asyncio.sleep(0.2)
    out.print(f"the audit log's signed checkpoint covers {size} entries; the offices hold {receipts} receipts "
              "(releases, refusals, downloads), each an entry acknowledged by hub.audit before what it covers was "
              "sent")  # fmt: skip
