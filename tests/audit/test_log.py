"""The sequencing core: exactly-once leaves in offset order, dead letters with reasons, and a signer that never
signs two inconsistent checkpoints."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from services.audit import merkle
from services.audit.checkpoint import Checkpoint
from services.audit.log import CheckpointSigner, Record, Sequencer, micros
from services.audit.note import NoteSigner
from services.audit.tiles import Tile, TiledTree, TileNodeReader
from services.shared.avro import AvroCodec
from services.shared.errors import Conflict
from services.shared.keys import SigningKey
from tests.audit import support

SIGNER = NoteSigner("o.example/log", SigningKey.generate())


def _tree(entries: list[bytes]) -> tuple[TiledTree, dict[Tile, bytes]]:
    tree, files = TiledTree(), {}
    for w in tree.append(entries):
        files[w.tile] = w.data
    return tree, files


def test_the_signer_refuses_a_smaller_a_different_or_a_forked_tree() -> None:
    history = [f"e{i}".encode() for i in range(40)]
    fork = [*history[:5], b"rewritten", *history[6:]]
    a10, _ = _tree(history[:10])
    a40, files = _tree(history)
    b40, fork_files = _tree(fork)
    signer = CheckpointSigner(SIGNER, last=None)
    signer.sign(Checkpoint(SIGNER.name, 10, a10.root()), TileNodeReader(10, lambda t: files[t]))
    with pytest.raises(Conflict, match="not consistent with size 10"):
        signer.sign(Checkpoint(SIGNER.name, 40, b40.root()), TileNodeReader(40, lambda t: fork_files[t]))
    signer.sign(Checkpoint(SIGNER.name, 40, a40.root()), TileNodeReader(40, lambda t: files[t]))
    with pytest.raises(Conflict, match="does not extend"):
        signer.sign(Checkpoint(SIGNER.name, 10, a10.root()), TileNodeReader(40, lambda t: files[t]))
    with pytest.raises(Conflict, match="does not extend"):
        signer.sign(Checkpoint(SIGNER.name, 40, b40.root()), TileNodeReader(40, lambda t: fork_files[t]))
    signer.sign(Checkpoint(SIGNER.name, 40, a40.root()), TileNodeReader(40, lambda t: files[t]))  # same: fine


def test_a_sequencer_restored_onto_a_forked_tree_refuses_to_sign(codec: AvroCodec) -> None:
    history = [f"e{i}".encode() for i in range(12)]
    honest, _ = _tree(history)
    forked, files = _tree([*history[:3], b"other", *history[4:]])
    sequencer = Sequencer(codec=codec, tree=forked, next_offset=5,
                          signer=CheckpointSigner(SIGNER, last=Checkpoint(SIGNER.name, 12, honest.root())))  # fmt: skip
    record = Record(5, support.batch(codec, [support.entry(1)]))
    with pytest.raises(Conflict):
        sequencer.integrate([record], known=lambda ids: set(), read_tile=lambda t: files[t])
    assert sequencer.size == 12


def test_integration_is_exactly_once_in_offset_order_with_dead_letters(codec: AvroCodec) -> None:
    entries = [support.entry(n) for n in range(6)]
    first = support.batch(codec, entries[:3])
    records = [Record(3, first), Record(4, b"junk"), Record(5, first), Record(6, support.batch(codec, entries[2:])),
               Record(7, None)]  # fmt: skip
    sequencer = Sequencer(codec=codec, signer=CheckpointSigner(SIGNER, last=None), tree=TiledTree(), next_offset=4)
    files: dict[Tile, bytes] = {}
    done = sequencer.integrate(records, known=lambda ids: set(), read_tile=lambda t: files[t])
    # offset 3 is below the committed offset: a redelivery, skipped
    assert [e.entry_id for e in done.entries] == [e["entry_id"] for e in entries]
    assert [e.offset for e in done.entries] == [5, 5, 5, 6, 6, 6]
    assert done.duplicates == 1
    assert [(d.offset, d.reason) for d in done.dead_letters] == [(4, "not Avro single-object encoding"),
                                                                 (7, "a record without a value")]  # fmt: skip
    assert done.next_offset == 8
    assert sequencer.size == 0  # nothing adopted until committed
    sequencer.adopt(done)
    for w in done.writes:
        files[w.tile] = w.data
    again = sequencer.integrate([Record(8, first)], known=lambda ids: set(ids), read_tile=lambda t: files[t])
    assert again.entries == []
    assert again.duplicates == 3
    assert again.checkpoint == done.checkpoint
    assert merkle.tree_root(TileNodeReader(6, lambda t: files[t]), 6) == done.checkpoint.root
    with pytest.raises(Conflict):
        sequencer.adopt(done)  # an integration not built on the current state


def test_the_service_prints_its_verifier_key(tmp_path: Path) -> None:
    key = SigningKey.generate()
    (tmp_path / "log.key").write_bytes(key.to_pem())
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
           "EVHUB_AUDIT_SIGNING_KEY": str(tmp_path / "log.key"), "EVHUB_AUDIT_ORIGIN": "o.example/log"}  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "services.audit", "vkey"], env=env, capture_output=True, text=True,
                         timeout=60, check=False)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == NoteSigner("o.example/log", key).vkey


def test_times_are_indexed_to_the_exact_microsecond() -> None:
    at = datetime(2026, 5, 1, 12, 0, 0, 999_999, tzinfo=UTC)
    assert micros(at) == 1_777_636_800_999_999
    assert micros(datetime(2262, 4, 11, 23, 47, 16, 854_775, tzinfo=UTC)) == 9_223_372_036_854_775
