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
    assert "Everything the demo started has been stopped." in out
    assert not [line for line in run.stderr.splitlines() if "Traceback" in line]
