"""`make demo` is the story new users see first: it must run end to end and say what it did."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from services.shared.cluster import KafkaTarget

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.kafka
def test_the_demo_publishes_verifies_and_decides(kafka: KafkaTarget, tmp_path: Path) -> None:
    env = {**os.environ, "EVHUB_KAFKA_BOOTSTRAP": kafka.bootstrap, "COLUMNS": "200"}
    run = subprocess.run(
        [sys.executable, "-m", "services.cli", "demo", "--workdir", str(tmp_path / "demo")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    assert "first run: 15 items" in out
    assert "15 published, 0 already published, 0 failed" in out
    assert "second run (resumed: nothing is published twice): 15 items" in out
    assert "0 published, 15 already published, 0 failed" in out
    for topic in ("evidence.DE", "evidence.FR", "evidence.SE"):
        cells = r"\s*│\s*(\d+)" * 7
        row = re.search(rf"{re.escape(topic)}{cells}", out)
        assert row is not None, topic
        records, verified, redelivered, refused, replayed, _, gaps = map(int, row.groups())
        assert records == verified + redelivered > 0
        assert (refused, replayed, gaps) == (0, 0, 0)
    assert "allow" in out
    assert "deny" in out
    # 9. each office subscribed with `evhub subscribe --once`, received its own view and verified all of it
    rows = {
        m[1]: tuple(map(int, m.groups()[1:]))
        for m in re.finditer(
            r"│ (DE-GBA-WCU|FR-PNAT|SE-IPC)\s*│\s*(\d+)\s*│\s*(\d+)\s*│\s*(\d+)\s*│.*?│\s*(\d+) \(.*?│\s*(\d+)\s*│", out
        )
    }
    assert set(rows) == {"DE-GBA-WCU", "FR-PNAT", "SE-IPC"}, out[-4000:]
    for office, (events, _withdrawals, withheld, files, failed) in rows.items():
        assert events + withheld == 10, office  # every record of the office's feed: released or withheld
        assert files == events, office  # every file downloaded and checked against its signed SHA-256
        assert failed == 0, office
    assert rows["DE-GBA-WCU"][0] > rows["FR-PNAT"][0] > rows["SE-IPC"][0] > 0  # clearances differ, so do the views
    assert "every signature, disclosure and content digest verified by each office" in out
    for office in ("DE-GBA-WCU", "FR-PNAT", "SE-IPC"):
        items = tmp_path / "demo" / "offices" / office / "items"
        assert sorted(p.name for p in items.iterdir()), office
        for version in items.glob("*/v*"):
            assert (version / "envelope.avro").is_file()
            assert (version / "event.json").is_file()
    # step 9's second run: every receipt's proof fetched, verified and kept; step 10: the auditor's checks
    proofs = re.findall(r"(\S+) (\d+) kept, (\d+) awaiting \(0 new events\)", out)
    assert {office for office, *_ in proofs} == {"DE-GBA-WCU", "FR-PNAT", "SE-IPC"}, out[-4000:]
    assert all(int(kept) > 0 and int(awaiting) == 0 for _, kept, awaiting in proofs), proofs
    assert "ok: the log verifies and every one of the" in out
    assert "exit codes: replay 0, verify-proof 0, replay of the tampered copy 1" in out
    assert "entry-changed" in out
    assert "Everything the demo started has been stopped." in out
    assert not [line for line in run.stderr.splitlines() if "Traceback" in line]
