"""Realistic sample evidence for tests: metadata and small generated files with real magic numbers."""

from __future__ import annotations

from typing import Any

from services.cli.samples import png

__all__ = ["metadata", "png"]


def metadata(item_id: str, jurisdictions: list[str], **overrides: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "item_id": item_id,
        "case_ids": ["CASE-2012-DAMASCUS-227"],
        "jurisdictions": jurisdictions,
        "kind": "PHOTOGRAPH",
        "title": "Detention facility, corridor, photograph 227/14",
        "description": "Photograph from the collection handed over by a defector; file 227, frame 14.",
        "captured_at": "2013-03-02T09:15:00Z",
        "device": "Nikon D90",
        "collector_pseudonym": "collector-7",
        "region": "Damascus governorate",
        "custody": [
            {"at": "2013-08-01T00:00:00Z", "actor": "collector-7", "action": "copied to encrypted drive"},
            {"at": "2014-01-15T12:00:00Z", "actor": "archive", "action": "ingested and hashed"},
        ],
        "classification": "CONFIDENTIAL",
        "sensitivity": ["GRAPHIC"],
        "sharing": {"allowed_jurisdictions": [], "purposes": ["criminal-investigation"]},
        "protected": [
            {"field": "witness.name", "label": "WITNESS_IDENTIFYING", "value": "A. K."},
            {"field": "location.exact", "label": "LOCATION_EXACT", "value": "33.5138N 36.2765E"},
        ],
    }
    meta.update(overrides)
    return meta
