"""docs/envelope.md is the contract an office writes its verifier from: its worked example is byte for byte what
the hub's code produces, and a verifier written from the page alone verifies it (and refuses it altered)."""

from __future__ import annotations

import ast
import json
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from services.shared.avro import SCHEMA_DIR as SCHEMAS
from services.shared.avro import fingerprint
from tests.shared import envelope_example, independent_verifier

VERIFIER = Path(independent_verifier.__file__)


def _bytes(block: str) -> bytes:
    return bytes.fromhex("".join(block.split()))


def test_every_block_of_the_worked_example_is_what_the_code_produces() -> None:
    documented, produced = envelope_example.documented(), envelope_example.blocks()
    assert sorted(documented) == sorted(produced)
    for name, text in produced.items():
        assert documented[name] == text, f"docs/envelope.md block {name!r} differs from the code's"


def test_the_pae_prefix_and_the_sizes_the_text_states_hold() -> None:
    doc, blocks = envelope_example.DOC.read_text("utf-8"), envelope_example.documented()
    payload, prefix = _bytes(blocks["payload"]), _bytes(blocks["pae_prefix"])
    stated = prefix.decode("ascii").replace(blocks["key_id"], "<key id>")
    assert f"(in ASCII:\n`{stated}`, ending" in doc
    assert f"({len(payload)} bytes)" in doc
    assert f"({len(_bytes(blocks['envelope']))} bytes)" in doc
    assert f"these {len(prefix)} bytes" in doc


def test_the_fingerprint_table_is_the_contracts_and_the_verifiers() -> None:
    table = re.findall(r"^\| `(\w+)` \| (\d+) \| `([0-9a-f]{16})` \|$", envelope_example.DOC.read_text("utf-8"), re.M)
    assert {n for n, _, _ in table} == set(independent_verifier.FINGERPRINTS.values()) | {"signed_envelope"}
    for name, version, hexed in table:
        released = json.loads((SCHEMAS / "released" / name / f"{version}.avsc").read_text("utf-8"))
        assert fingerprint(released).hex() == hexed
        assert independent_verifier.FINGERPRINTS[bytes.fromhex(hexed)] == name
    current = {n: fingerprint(json.loads((SCHEMAS / f"{n}.avsc").read_text("utf-8"))).hex() for n, _, _ in table}
    assert set(current.values()) <= {h for _, _, h in table}, "a changed schema needs its row in docs/envelope.md"


def _documented_record() -> dict[str, Any]:
    record: dict[str, Any] = json.loads(envelope_example.documented()["record"])
    record["published_at"] = datetime.fromisoformat(record["published_at"]).replace(tzinfo=UTC)
    return record


def test_an_independent_verifier_written_from_the_page_verifies_the_example() -> None:
    blocks = envelope_example.documented()
    opened = independent_verifier.verify(_bytes(blocks["envelope"]), topic="evidence.DE",
                                         public_key=_bytes(blocks["public_key"]))  # fmt: skip
    assert (opened.key_id, opened.sequence) == (blocks["key_id"], 1)
    assert opened.record == _documented_record()
    assert opened.disclosed == {"witness.name": "A. K."}
    assert independent_verifier.pae("application/vnd.evidencehub.evidence-event.v1+avro", "evidence.DE",
                                    opened.key_id, 1, _bytes(blocks["payload"])) == (
        _bytes(blocks["pae_prefix"]) + _bytes(blocks["payload"]))  # fmt: skip


def test_the_independent_verifier_refuses_the_example_altered() -> None:
    blocks = envelope_example.documented()
    envelope, key = _bytes(blocks["envelope"]), _bytes(blocks["public_key"])
    with pytest.raises(independent_verifier.Refused):
        independent_verifier.verify(envelope, topic="evidence.FR", public_key=key)
    accepted = []
    for position in range(10, len(envelope)):  # every byte after the header, lowest bit flipped
        changed = bytearray(envelope)
        changed[position] ^= 0x01
        try:
            independent_verifier.verify(bytes(changed), topic="evidence.DE", public_key=key)
        except Exception:  # any refusal counts: Refused, or the Avro decoder's own errors
            continue
        accepted.append(position)
    assert accepted == []


def test_the_independent_verifier_uses_none_of_the_hubs_code() -> None:
    tree = ast.parse(VERIFIER.read_text("utf-8"))
    modules = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    modules |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in modules if m.split(".")[0] in {"services", "tests", "fastavro"}}, modules
