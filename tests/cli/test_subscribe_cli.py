"""`evhub subscribe` refuses what it cannot do with one line and the documented exit code, before touching anything
it should not (no gateway is needed for these)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.cli.subscribe_store import SubscriptionStore
from services.shared.keys import SigningKey
from services.shared.principals import principal_uri
from services.shared.tls import issue_leaf

ROOT = Path(__file__).resolve().parents[2]


def _run(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("EVHUB_CLIENT_")}
    return subprocess.run([sys.executable, "-m", "services.cli", "subscribe", *args], cwd=tmp_path, text=True,
                          capture_output=True, env={**clean, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=120,
                          check=False)  # fmt: skip


@pytest.fixture
def office(tmp_path: Path) -> list[str]:
    files = issue_leaf(tmp_path / "pki", "office-DE", uris=(principal_uri("office", "DE-GBA-WCU"),))
    anchor = tmp_path / "anchor.pub.pem"
    anchor.write_bytes(SigningKey.generate().public.to_pem())
    return ["--cert", str(files.cert), "--key", str(files.key), "--ca", str(files.ca), "--trust-anchor", str(anchor),
            "--gateway", "https://127.0.0.1:1"]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--jurisdiction", "de"], 2, "not a jurisdiction code"),
        (["--jurisdiction", "DE", "--max", "0"], 2, "--max must be between 1 and 500"),
        (["--jurisdiction", "DE", "--once", "--give-up-after", "0"], 4, "127.0.0.1:1"),
    ],
    ids=["bad-jurisdiction", "bad-max", "gateway-unreachable"],
)
def test_refusals_are_one_line_with_the_documented_exit_code(
    tmp_path: Path, office: list[str], args: list[str], code: int, message: str
) -> None:
    run = _run(tmp_path, *args, "--out", str(tmp_path / "out"), *office)
    assert run.returncode == code, run.stderr
    assert message in run.stderr
    assert len(run.stderr.strip().splitlines()) <= 2  # a warning line for the retry at most, then the error
    assert "Traceback" not in run.stderr


def test_no_trust_anchor_is_a_configuration_error(tmp_path: Path, office: list[str]) -> None:
    without = [a for i, a in enumerate(office) if a != "--trust-anchor" and office[i - 1] != "--trust-anchor"]
    run = _run(tmp_path, "--jurisdiction", "DE", "--out", str(tmp_path / "out"), *without)
    assert run.returncode == 5
    assert "no trust anchor configured" in run.stderr


def test_a_certificate_naming_no_office_is_refused(tmp_path: Path, office: list[str]) -> None:
    service = issue_leaf(tmp_path / "pki", "gateway")
    args = [*office]
    args[args.index("--cert") + 1], args[args.index("--key") + 1] = str(service.cert), str(service.key)
    run = _run(tmp_path, "--jurisdiction", "DE", "--out", str(tmp_path / "out"), *args)
    assert run.returncode == 5
    assert "not a certificate naming an office" in run.stderr


def test_a_directory_is_one_subscription_held_by_one_process(tmp_path: Path, office: list[str]) -> None:
    out = tmp_path / "out"
    store = SubscriptionStore(out, meta={"jurisdiction": "FR", "office": "DE-GBA-WCU", "topic": "evidence.FR"})
    try:
        held = _run(tmp_path, "--jurisdiction", "FR", "--out", str(out), *office)
    finally:
        store.close()
    assert held.returncode == 2
    assert "another evhub subscribe is using" in held.stderr
    other = _run(tmp_path, "--jurisdiction", "DE", "--out", str(out), *office)
    assert other.returncode == 5
    assert "holds the subscription of jurisdiction 'FR'" in other.stderr


async def test_the_receipt_proof_hook_keeps_each_proof_beside_the_items(tmp_path: Path) -> None:
    """The place `evhub audit prove` plugs in: receipts without a proof are asked for one; a proof is kept in
    DIR/proofs/<receipt>.tlog-proof and noted; a receipt not yet covered by a checkpoint is asked again next time."""
    from services.cli.subscribe_cmd import fetch_proofs
    from services.cli.subscribe_store import Batch

    store = SubscriptionStore(tmp_path, meta={"jurisdiction": "DE", "office": "DE-GBA-WCU", "topic": "evidence.DE"})
    try:
        audit = ("hub.audit", 0, 7, 0)
        store.commit(Batch(receipts=[(r, "withheld", None, None, None, None, None, *audit, "2026-12-01T00:00:00+00:00")
                                     for r in ("r-1", "r-2")]), sequences={})  # fmt: skip

        class Prover:
            def __init__(self) -> None:
                self.asked: list[str] = []

            async def prove(self, receipt: str) -> bytes | None:
                self.asked.append(receipt)
                return b"c2sp.org/tlog-proof@v1\n" if receipt == "r-1" else None

        prover = Prover()
        assert await fetch_proofs(store, prover) == 1
        assert (tmp_path / "proofs" / "r-1.tlog-proof").read_bytes() == b"c2sp.org/tlog-proof@v1\n"
        assert store.receipts_without_proof() == ["r-2"]
        assert await fetch_proofs(store, prover) == 0
        assert prover.asked == ["r-1", "r-2", "r-2"]
    finally:
        store.close()
