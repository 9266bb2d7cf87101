"""Test support for ``evhub audit``: a signed policy on a fresh hub.policy topic, audit entries decided by that
policy exactly as the gateway records them, the audit service with them, and ``evhub`` run as a real process.

``decided_entry`` mirrors the gateway's ``audit_entry`` (services/gateway/release.py): what a released or refused
read records. It is a stand-in producer of hub.audit records, not a check: the replay under test re-decides them.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from services.audit.note import NoteSigner
from services.policy.engine import PolicyEngine, PolicyStore
from services.policy.model import READ_FEED, Decision, FeedRef, ItemAttributes
from services.policy.pack import SAMPLE_PACK, load_items, load_pack
from services.policy.topic import load_store, publish_version
from services.policy.version import SignedPolicyVersion, sign, trusted_keys
from services.shared.keys import SigningKey
from services.shared.settings import KafkaSettings
from services.shared.tls import CertFiles

ROOT = Path(__file__).resolve().parents[2]
ITEMS = load_items(SAMPLE_PACK / "items.json")


@dataclass
class Policy:
    topic: str
    admin_pem: Path
    engine: PolicyEngine
    versions: list[str]

    def start(self, version: str) -> datetime:
        return self.engine.store.in_force_from(version)


async def push_policy(bootstrap: str, topic: str, tmp: Path, *, versions: int = 1) -> Policy:
    """Sign the sample pack with a fresh admin key and append ``versions`` versions to ``topic`` (1 s apart in
    ``effective_from``, each effective at once); the returned engine replayed them from the topic."""
    admin = SigningKey.generate()
    admin_pem = tmp / "policy-admin.pub.pem"
    admin_pem.write_bytes(admin.public.to_pem())
    pack = load_pack(SAMPLE_PACK)
    pushed: list[SignedPolicyVersion] = []
    for n in range(versions):
        effective = datetime.now(UTC).replace(microsecond=0) + timedelta(milliseconds=n)
        signed = sign(pack.version(author=f"board-{n}", effective_from=effective), admin)
        await publish_version(bootstrap, signed, topic=topic, kafka=KafkaSettings())
        pushed.append(signed)
        await asyncio.sleep(0.01)  # distinct broker timestamps (ordering, not synchronisation)
    store = await load_store(bootstrap, PolicyStore(trusted=trusted_keys([admin.public])), topic=topic)
    return Policy(topic, admin_pem, PolicyEngine(store), [s.content_hash for s in pushed])


def _deny_source(decision: Decision) -> str | None:
    if decision.allowed:
        return None
    if decision.policy_version is None:
        return "NO_POLICY"
    if any(r.startswith("unknown office") for r in decision.reasons):
        return "UNKNOWN_OFFICE"
    if decision.errors:
        return "ERROR"
    return "RULE" if decision.determining_policies else "DEFAULT_DENY"


def decided_entry(
    engine: PolicyEngine, *, office: str, at: datetime, item: ItemAttributes | None = None, action: str = "ReadItem",
    jurisdiction: str = "DE", purpose: str | None = "prosecution", n: int = 0, **override: Any,
) -> dict[str, Any]:  # fmt: skip
    """An audit entry for ``office`` reading ``item`` (or the ``jurisdiction`` feed) at ``at``, decided by
    ``engine`` and recorded as the gateway records it; ``override`` replaces fields (forged records)."""
    resource = FeedRef(jurisdiction=jurisdiction) if item is None else item
    decision = engine.decide(office, READ_FEED if item is None else action, resource, at, purpose)
    present = set(item.protected_fields) if item else set()
    allowed = [f for f in decision.disclosed_fields if f in present] if decision.allowed else []
    withheld = [f for f in dict.fromkeys([*item.protected_fields, *item.undecidable_fields]) if f not in allowed] \
        if item else []  # fmt: skip
    entry: dict[str, Any] = {
        "entry_id": str(uuid.uuid4()), "at": at, "gateway": "gw-test", "office": office,
        "client_cert_sha256": "ab" * 32, "request_id": f"req-{n}", "action": READ_FEED if item is None else action,
        "purpose": purpose, "jurisdiction": jurisdiction,
        "item": None if item is None else {
            "topic": f"evidence.{jurisdiction}", "partition": 0, "offset": n, "payload_type": "application/vnd.evhub",
            "event_id": f"ev-{n}", "item_id": item.item_id, "version": 1, "key_id": "k" * 64, "sequence": n,
            "envelope_sha256": "cd" * 32, "content_sha256": None, "content_range": None},
        "attributes": None if item is None else {
            "jurisdictions": list(item.jurisdictions), "case_ids": list(item.case_ids),
            "classification": item.classification, "sensitivity": list(item.sensitivity),
            "embargo_until": item.embargo_until, "consent_jurisdictions": list(item.consent_jurisdictions),
            "consent_purposes": list(item.consent_purposes), "withdrawn": item.withdrawn,
            "protected_fields": list(item.protected_fields)},
        "decision": "RELEASED" if decision.allowed else "REFUSED", "deny_source": _deny_source(decision),
        "disclosed_fields": allowed, "withheld_fields": withheld, "policy_version": decision.policy_version,
        "determining_policies": list(decision.determining_policies), "errors": list(decision.errors),
    }  # fmt: skip
    entry.update(override)
    return entry


def reads(engine: PolicyEngine, start: datetime, count: int) -> list[dict[str, Any]]:
    """``count`` decided reads: every office reading every sample item, and its own feed, one microsecond apart."""
    offices = [("DE-GBA-WCU", "DE"), ("FR-PNAT", "FR"), ("SE-IPC", "SE")]
    items: list[ItemAttributes | None] = [*ITEMS.values(), None]
    out = []
    for n in range(count):
        office, jurisdiction = offices[n % 3]
        item = items[(n // 3) % len(items)]
        action = "ReadContent" if n % 7 == 0 and item is not None else "ReadItem"
        out.append(decided_entry(engine, office=office, item=item, action=action, jurisdiction=jurisdiction,
                                 at=start + timedelta(microseconds=n), n=n))  # fmt: skip
    return out


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


async def evhub(*args: str, env: dict[str, str] | None = None, within: float = 180) -> Run:
    """``python -m services.cli ARGS`` as a real process; its exit code, stdout and stderr."""
    full_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(ROOT), "HOME": str(ROOT),
                **(env or {})}  # fmt: skip
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, env=full_env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(within):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def tls_args(url: str, files: CertFiles) -> list[str]:
    return ["--url", url, "--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca)]


def replay_args(policy: Policy, signer: NoteSigner, state: Path, extra: Sequence[str] = ()) -> list[str]:
    return ["audit", "replay", "--log-key", signer.vkey, "--trust", str(policy.admin_pem), "--policy-topic",
            policy.topic, "--state-dir", str(state), *extra]  # fmt: skip
