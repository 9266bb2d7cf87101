"""Runs tests/go/tlogcheck — Go's own sumdb/note and sumdb/tlog — against a log directory (independent check).

Nothing here decides anything: it builds the Go program once per session and returns its verdict and output.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "go" / "tlogcheck"


def build(out_dir: Path) -> Path:
    go = shutil.which("go")
    if go is None:
        pytest.fail("Go is not installed: the independent check of the audit log needs the go command (CI has it)")
    binary = out_dir / "tlogcheck"
    run = subprocess.run([go, "build", "-o", str(binary), "."], cwd=SOURCE, capture_output=True, text=True,
                         timeout=300, check=False)  # fmt: skip
    assert run.returncode == 0, f"go build failed:\n{run.stderr}"
    return binary


def check(binary: Path, directory: Path, vkey: str, checks: dict[str, Any] | None = None) -> tuple[bool, str]:
    args = [str(binary), "-vkey", vkey, "-dir", str(directory)]
    if checks is not None:
        path = directory.parent / f"{directory.name}.checks.json"
        path.write_text(json.dumps(checks))
        args += ["-checks", str(path)]
    run = subprocess.run(args, capture_output=True, text=True, timeout=300, check=False)
    return run.returncode == 0, run.stdout + run.stderr
