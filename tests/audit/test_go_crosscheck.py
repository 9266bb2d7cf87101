"""Independent verifiability: Go's golang.org/x/mod/sumdb/note and sumdb/tlog accept our checkpoint, tiles, entry
bundles, inclusion and consistency proofs and tlog-proof receipts, and refuse a tampered copy.

The Go program (tests/go/tlogcheck) imports nothing of ours; it reads the log directory as it is served.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import pytest

from services.audit import merkle, note
from services.audit.checkpoint import Checkpoint, TlogProof
from services.audit.note import COSIGNATURE_V1, NoteSigner
from services.audit.tiles import TiledTree, TileNodeReader
from services.shared.keys import SigningKey
from tests.audit import golang

ORIGIN = "audit.evidence-hub.example/test-log"
SIZES = [1, 255, 256, 257, 1000, 65_537, 70_123]


@pytest.fixture(scope="module")
def tlogcheck(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return golang.build(tmp_path_factory.mktemp("go"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, dict[str, Any]]:
    directory = tmp_path_factory.mktemp("log")
    signer = NoteSigner(ORIGIN, SigningKey.generate())
    entries = [f'{{"entry": {i}, "office": "DE-GBA"}}'.encode() for i in range(SIZES[-1])]
    tree, roots, signed = TiledTree(), {}, {}
    for previous, size in zip([0, *SIZES], SIZES, strict=False):
        for w in tree.append(entries[previous:size]):
            path = directory / w.tile.path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(w.data)
        roots[size] = tree.root()
        signed[size] = Checkpoint(ORIGIN, size, tree.root()).sign(signer)
    final = SIZES[-1]
    witness = NoteSigner("witness.example/w1", SigningKey.generate(), COSIGNATURE_V1)
    cosig = witness.sign(Checkpoint(ORIGIN, final, roots[final]).text(), timestamp=1_767_225_600)
    (directory / "checkpoint").write_bytes(note.with_signatures(signed[final], [cosig]))  # Go must ignore it
    reader = TileNodeReader(final, lambda t: (directory / t.path).read_bytes())
    inclusion = [
        {"index": i, "size": s, "root": _b64(roots[s]), "entry": _b64(entries[i]),
         "proof": [_b64(h) for h in merkle.inclusion_proof(reader, i, s)]}
        for s in SIZES for i in sorted({0, s // 2, s - 1})
    ]  # fmt: skip
    consistency = [
        {"size1": a, "size2": b, "root1": _b64(roots[a]), "root2": _b64(roots[b]),
         "proof": [_b64(h) for h in merkle.consistency_proof(reader, a, b)]}
        for a in SIZES for b in SIZES if a < b
    ]  # fmt: skip
    receipts = [
        {"proof": TlogProof(i, tuple(merkle.inclusion_proof(reader, i, final)), signed[final], extra=b"r").encode()
         .decode(), "entry": _b64(entries[i])}
        for i in (0, 4242, final - 1)
    ]  # fmt: skip
    checks = {"inclusion": inclusion, "consistency": consistency, "receipts": receipts,
              "earlier_checkpoints": [signed[s].decode() for s in SIZES[:-1]]}  # fmt: skip
    return directory, signer.vkey, checks


def test_go_sumdb_accepts_our_checkpoint_tiles_bundles_and_proofs(
    tlogcheck: Path, log: tuple[Path, str, dict[str, Any]]
) -> None:
    directory, vkey, checks = log
    ok, output = golang.check(tlogcheck, directory, vkey, checks)
    assert ok, output
    assert f"ok checkpoint {ORIGIN} size 70123" in output
    assert "ok 70123 entries from the entry bundles match the tree" in output
    assert "ok 21 consistency proofs" in output
    assert "ok 3 tlog-proof receipts" in output


def test_go_sumdb_refuses_a_changed_tile_a_changed_entry_and_another_key(
    tlogcheck: Path, log: tuple[Path, str, dict[str, Any]], tmp_path: Path
) -> None:
    directory, vkey, _ = log
    for path, offset in [("tile/0/273.p/235", 0), ("tile/0/100", 5), ("tile/1/001.p/17", 33), ("tile/entries/007", 40)]:
        copy = tmp_path / path.replace("/", "_")
        shutil.copytree(directory, copy)
        target = copy / path
        data = bytearray(target.read_bytes())
        data[offset] ^= 1
        target.write_bytes(bytes(data))
        ok, output = golang.check(tlogcheck, copy, vkey)
        assert not ok, f"{path}: {output}"
    other = NoteSigner(ORIGIN, SigningKey.generate()).vkey
    ok, output = golang.check(tlogcheck, directory, other)
    assert not ok
    assert "checkpoint" in output
