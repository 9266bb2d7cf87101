"""A policy pack on disk: the Cedar policies, the Cedar schema and the office entities a version is built from.

Owns: the directory layout (``*.cedar`` policies, read in name order; one ``*.cedarschema``; ``offices.json``;
optionally ``items.json`` with sample items for ``evhub policy explain``), reading it, and turning it into an
unsigned :class:`PolicyVersion`. This is a shell module: it reads files.

Does not own: whether the pack is valid (``compiled.diagnose``), signing (``version.sign``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from services.policy.model import ItemAttributes, Office
from services.policy.version import PolicyVersion
from services.shared.errors import NotFound, PolicyError, ValidationFailed

#: The sample pack shipped with the repository (used by the demo and the tests).
SAMPLE_PACK = Path(__file__).resolve().parents[2] / "policies"

_OFFICES = TypeAdapter(tuple[Office, ...])
_ITEMS = TypeAdapter(tuple[ItemAttributes, ...])


@dataclass(frozen=True)
class PolicyPack:
    policy_text: str
    schema_text: str
    offices: tuple[Office, ...]

    def version(self, *, author: str, effective_from: datetime) -> PolicyVersion:
        return PolicyVersion(
            policy_text=self.policy_text, schema_text=self.schema_text, offices=self.offices,
            author=author, effective_from=effective_from,
        )  # fmt: skip


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise NotFound(f"cannot read {path}: {exc}") from exc


def load_pack(path: Path, *, schema: Path | None = None, offices: Path | None = None) -> PolicyPack:
    """``path`` is a pack directory or one ``.cedar`` file (schema and offices then come from its directory
    unless given).

    Raises:
        NotFound: a file is missing or unreadable.
        PolicyError: the schema is ambiguous or ``offices.json`` is malformed.
    """
    folder = path if path.is_dir() else path.parent
    if path.is_dir():
        sources = sorted(path.glob("*.cedar"))
        if not sources:
            raise NotFound(f"no *.cedar policy files in {path}")
        policy_text = "\n".join(_read(p) for p in sources)
    else:
        policy_text = _read(path)
    if schema is None:
        candidates = sorted(folder.glob("*.cedarschema"))
        if len(candidates) != 1:
            raise PolicyError(f"expected exactly one *.cedarschema in {folder}, found {len(candidates)}")
        schema = candidates[0]
    offices_path = offices or folder / "offices.json"
    try:
        office_list = _OFFICES.validate_json(_read(offices_path))
    except ValidationError as exc:
        raise PolicyError(f"{offices_path}: {exc.error_count()} invalid office field(s): {exc.errors()[0]['msg']}",
                          diagnostics=[str(e["msg"]) for e in exc.errors()]) from exc  # fmt: skip
    return PolicyPack(policy_text=policy_text, schema_text=_read(schema), offices=office_list)


def load_items(path: Path) -> dict[str, ItemAttributes]:
    """Sample items by id.

    Raises:
        NotFound: the file is missing. ValidationFailed: it does not hold a list of items.
    """
    try:
        items = _ITEMS.validate_json(_read(path))
    except ValidationError as exc:
        raise ValidationFailed(f"{path}: not a list of items ({exc.error_count()} errors)") from exc
    return {i.item_id: i for i in items}


def load_item_json(text: str) -> ItemAttributes:
    """Raises: ValidationFailed for anything that is not one item's attributes."""
    try:
        return ItemAttributes.model_validate(json.loads(text))
    except (ValueError, ValidationError) as exc:
        raise ValidationFailed(f"not an item's attributes: {exc}") from exc
