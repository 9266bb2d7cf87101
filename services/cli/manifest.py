"""The publishing manifest: which file is which evidence item, in JSON or CSV, as archivists keep it.

JSON: a list of objects, each the publisher's metadata plus ``"file": "relative/path.jpg"``.
CSV: one row per file with columns ``file, item_id, case_ids, jurisdictions, kind, title`` and optionally
``description, classification, sensitivity, captured_at, device, collector_pseudonym, region, purposes,
allowed_jurisdictions, consent_reference, embargo_until``; list cells are separated by ``;``. A protected value
goes in a column named ``protected:<LABEL>:<field>``, e.g. ``protected:WITNESS_IDENTIFYING:witness.name``.

Pure apart from reading the manifest file itself. Every problem is reported with the row and the field.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.publisher.core import EvidenceMetadata, parse_metadata
from services.shared.errors import ValidationFailed

LIST_COLUMNS = {"case_ids", "jurisdictions", "sensitivity", "purposes", "allowed_jurisdictions", "related_items"}
SHARING_COLUMNS = {"purposes", "allowed_jurisdictions", "consent_reference", "embargo_until"}
MAX_MANIFEST_BYTES = 64 << 20


@dataclass(frozen=True)
class Entry:
    path: Path
    metadata: EvidenceMetadata
    row: int


def _csv_rows(text: str) -> list[dict[str, Any]]:
    rows = []
    reader = csv.DictReader(io.StringIO(text))
    for column in reader.fieldnames or ():
        if column.startswith("protected:") and len(column.split(":", 2)) != 3:
            raise ValueError(f"column {column!r} should be protected:<LABEL>:<field>")
    for row in reader:
        entry: dict[str, Any] = {}
        sharing: dict[str, Any] = {}
        protected = []
        for column, raw in row.items():
            if column is None or raw is None or raw.strip() == "":
                continue
            value = raw.strip()
            if column.startswith("protected:"):
                _, label, field = column.split(":", 2)
                protected.append({"field": field, "label": label, "value": value})
                continue
            parsed: Any = [v.strip() for v in value.split(";") if v.strip()] if column in LIST_COLUMNS else value
            (sharing if column in SHARING_COLUMNS else entry)[column] = parsed
        if sharing:
            entry["sharing"] = sharing
        if protected:
            entry["protected"] = protected
        rows.append(entry)
    return rows


def load(manifest: Path) -> list[Entry]:
    """Read and validate every row; file paths are relative to the manifest's folder.

    Raises:
        ValidationFailed: unreadable manifest, or rows with invalid metadata or missing files (all reported,
            each error's field prefixed with ``row N``).
    """
    try:
        if manifest.stat().st_size > MAX_MANIFEST_BYTES:
            raise ValidationFailed(f"{manifest} is larger than {MAX_MANIFEST_BYTES} bytes")
        text = manifest.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ValidationFailed(f"cannot read manifest {manifest}: {exc.strerror}") from exc
    try:
        rows = _csv_rows(text) if manifest.suffix.lower() == ".csv" else json.loads(text)
    except (ValueError, csv.Error) as exc:
        kind = "CSV" if manifest.suffix.lower() == ".csv" else "JSON"
        raise ValidationFailed(f"{manifest} is not valid {kind}: {exc}") from exc
    if not isinstance(rows, list):
        raise ValidationFailed(f"{manifest} must hold a list of items")
    entries, errors, seen = [], [], set()
    for n, raw in enumerate(rows, start=1):
        if not isinstance(raw, dict) or not isinstance(raw.get("file"), str):
            errors.append({"field": f"row {n}: file", "message": "each item needs a 'file'"})
            continue
        path = (manifest.parent / raw["file"]).resolve()
        fields = {k: v for k, v in raw.items() if k != "file"}
        fields.setdefault("file_name", path.name)
        try:
            meta = parse_metadata(fields)
        except ValidationFailed as exc:
            errors += [{"field": f"row {n}: {e['field']}", "message": e["message"]} for e in exc.extensions["errors"]]
            continue
        if not path.is_file():
            errors.append({"field": f"row {n}: file", "message": f"no such file: {raw['file']}"})
        if meta.item_id in seen:
            errors.append({"field": f"row {n}: item_id", "message": f"{meta.item_id} appears twice"})
        seen.add(meta.item_id)
        entries.append(Entry(path=path, metadata=meta, row=n))
    if errors:
        raise ValidationFailed(f"{manifest}: {len(errors)} problem(s)", errors=errors)
    return entries
