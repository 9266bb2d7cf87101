"""The Avro contract may only evolve compatibly: every current schema reads every released version.

Releasing a schema = copying ``schemas/<name>.avsc`` unchanged to ``schemas/released/<name>/<n+1>.avsc``. Released
files are never edited: data written with them sits in topics retained forever. Between releases the current schema
may run ahead of the newest release, but only compatibly.

Compatibility is checked by the Apache ``avro`` package's checker, not by our own code.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

import avro.schema
import pytest
from avro.compatibility import ReaderWriterCompatibilityChecker, SchemaCompatibilityType

from services.shared.avro import SCHEMA_DIR

CURRENT: Final = {p.stem: p for p in sorted(SCHEMA_DIR.glob("*.avsc"))}
RELEASED: Final = {
    folder.name: sorted(folder.glob("*.avsc"), key=lambda p: int(p.stem))
    for folder in sorted((SCHEMA_DIR / "released").iterdir())
    if folder.is_dir()
}
PAIRS: Final = [(name, path) for name, paths in RELEASED.items() for path in paths]


def _parse(path: Path) -> avro.schema.Schema:
    return avro.schema.parse(path.read_text("utf-8"))


def _compatible(reader: avro.schema.Schema, writer: avro.schema.Schema) -> bool:
    # avro 1.12.2 declares ``def __init__(self):`` without ``-> None``; everything else it has is typed.
    checker = ReaderWriterCompatibilityChecker()  # type: ignore[no-untyped-call]
    result = checker.get_compatibility(reader, writer)
    return bool(result.compatibility is SchemaCompatibilityType.compatible)


def test_the_contract_is_not_empty() -> None:
    assert set(CURRENT) == {
        "audit_batch",
        "audit_entry",
        "evidence_event",
        "evidence_withdrawal",
        "key_record",
        "signed_envelope",
    }


@pytest.mark.parametrize("name", sorted(CURRENT))
def test_every_current_schema_has_a_released_version(name: str) -> None:
    assert RELEASED.get(name), f"schemas/released/{name}/1.avsc is missing: copy {name}.avsc there to release it"


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_versions_belong_to_a_current_schema_and_are_numbered_from_1(name: str) -> None:
    assert name in CURRENT, f"released/{name} has no current schema: removing a schema breaks its readers"
    assert [int(p.stem) for p in RELEASED[name]] == list(range(1, len(RELEASED[name]) + 1))


@pytest.mark.parametrize(("name", "released"), PAIRS, ids=[f"{n}-v{p.stem}" for n, p in PAIRS])
def test_current_schema_reads_every_released_version(name: str, released: Path) -> None:
    assert _compatible(_parse(CURRENT[name]), _parse(released)), f"{name}.avsc cannot read data written with {released}"


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_newest_release_is_the_current_schema_or_compatibly_behind(name: str) -> None:
    newest = RELEASED[name][-1]
    if json.loads(newest.read_text("utf-8")) == json.loads(CURRENT[name].read_text("utf-8")):
        return
    # Not yet released: allowed, as long as data written by the newest release stays readable (the next release
    # copies the current schema to released/<name>/<n+1>.avsc).
    assert _compatible(_parse(CURRENT[name]), _parse(newest))


def _withdrawal() -> dict[str, Any]:
    schema: dict[str, Any] = json.loads(CURRENT["evidence_withdrawal"].read_text("utf-8"))
    return schema


def _released_withdrawal() -> avro.schema.Schema:
    return _parse(RELEASED["evidence_withdrawal"][0])


def test_adding_a_field_with_a_default_is_compatible() -> None:
    changed = _withdrawal()
    changed["fields"].append({"name": "note", "type": ["null", "string"], "default": None})
    assert _compatible(avro.schema.parse(json.dumps(changed)), _released_withdrawal())


BREAKING: Final[list[tuple[str, str]]] = [
    ("new_field_without_default", "add"),
    ("field_type_changed", "retype"),
    ("record_renamed", "rename"),
    ("enum_symbol_removed_without_default", "enum"),
]


@pytest.mark.parametrize("change", [row[1] for row in BREAKING], ids=[row[0] for row in BREAKING])
def test_the_checker_catches_a_breaking_change(tmp_path: Path, change: str) -> None:
    """Proves the compatibility tests above can fail: each of these edits, written to a copy, is refused."""
    if change == "enum":
        event: dict[str, Any] = json.loads(CURRENT["evidence_event"].read_text("utf-8"))
        kind = next(f for f in event["fields"] if f["name"] == "classification")
        kind["type"]["symbols"].remove("PUBLIC")
        del kind["type"]["default"]
        copy = tmp_path / "evidence_event.avsc"
        copy.write_text(json.dumps(event), "utf-8")
        assert not _compatible(_parse(copy), _parse(RELEASED["evidence_event"][0]))
        return
    changed = _withdrawal()
    if change == "add":
        changed["fields"].append({"name": "note", "type": "string"})
    elif change == "retype":
        next(f for f in changed["fields"] if f["name"] == "withdrawn_version")["type"] = "string"
    else:
        changed["name"] = "Withdrawal"
    copy = tmp_path / "evidence_withdrawal.avsc"
    copy.write_text(json.dumps(changed), "utf-8")
    assert not _compatible(_parse(copy), _released_withdrawal())
