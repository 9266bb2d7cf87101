"""The demo's last step: an auditor replays the audit log, an office proves a receipt offline, and a tampered copy of
the log is caught.

Owns: running ``evhub audit replay``, ``evhub audit verify-proof`` and ``evhub audit replay --dir`` as the users
would — each its own process (``python -m services.cli``), bounded in time — and printing what they said. Does not
own: starting the audit service (``demo_offices``) or anything the commands check (``services.cli.replay``,
``receipt_proofs``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rich.console import Console

from services.cli.demo_offices import ReadPath
from services.cli.supervise import run_evhub


async def auditor_replays(out: Console, work: Path, path: ReadPath, *, bootstrap: str, admin_pub: Path,
                          log_dir: Path, proofs: Path) -> bool:  # fmt: skip
    """Step 10. True when the replay verified, the office's proof verified and the tampered copy was caught."""
    out.rule("10. An auditor replays the audit log (evhub audit replay); an office proves a receipt; a tampered copy")
    env = {"EVHUB_KAFKA_BOOTSTRAP": bootstrap}
    tls = ["--cert", str(path.auditor.cert), "--key", str(path.auditor.key), "--ca", str(path.auditor.ca)]
    common = ["--log-key", path.log_vkey, "--trust", str(admin_pub)]
    replayed = await run_evhub("audit", "replay", "--url", path.audit_url, *tls, *common,
                           "--state-dir", str(work / "auditor"), env=env)  # fmt: skip
    out.print("$ evhub audit replay --url … --log-key <the log's verifier key> --trust policy-admin.pub.pem")
    out.print(replayed.output, markup=False, highlight=False)

    proof = min(proofs.glob("*.tlog-proof"), default=None)
    proved = False
    if proof is None:
        out.print("[red]the office holds no receipt proof[/red]")
    else:
        receipt = proof.name.removesuffix(".tlog-proof")
        checked = await run_evhub("audit", "verify-proof", str(proof), "--log-key", path.log_vkey, "--receipt", receipt,
                              env=env)  # fmt: skip
        out.print(f"$ evhub audit verify-proof {proof} --log-key … --receipt {receipt}   (offline)")
        out.print(checked.output, markup=False, highlight=False)
        proved = checked.code == 0

    copy = work / "audit-copy"
    shutil.copytree(log_dir, copy)
    bundle = _first_bundle(copy)
    data = bytearray(bundle.read_bytes())
    data[-1] ^= 0x01  # one bit of the last entry the bundle holds
    bundle.write_bytes(bytes(data))
    tampered = await run_evhub("audit", "replay", "--dir", str(copy), *common, "--json",
                               "--state-dir", str(work / "auditor-copy"), env=env)  # fmt: skip
    out.print(f"$ evhub audit replay --dir {copy} … --json   (a copy of the log, one bit flipped in "
              f"{bundle.relative_to(copy)})")  # fmt: skip
    try:
        report = json.loads(tampered.output[: tampered.output.rindex("}") + 1])
        found = "; ".join(f"entry {d['index']}: {d['kind']} ({d['detail']})" for d in report["listed"][:3])
        out.print(f"ok: {report['ok']}; {report['discrepancies']} discrepancies: {found}", markup=False)
    except (ValueError, KeyError, TypeError):
        out.print(tampered.output, markup=False, highlight=False)
    out.print(f"exit codes: replay {replayed.code}, verify-proof {'0' if proved else 'failed'}, "
              f"replay of the tampered copy {tampered.code} (1 = a discrepancy found)")  # fmt: skip
    return replayed.code == 0 and proved and tampered.code == 1


def _first_bundle(log: Path) -> Path:
    """The bundle that holds entry 0 in the tree the checkpoint signs: the full ``tile/entries/000`` or the widest
    partial ``000.p/<W>`` (narrower partials are left from earlier, smaller checkpoints)."""
    entries = log / "tile" / "entries"
    if (entries / "000").is_file():
        return entries / "000"
    return max((entries / "000.p").iterdir(), key=lambda p: int(p.name))
