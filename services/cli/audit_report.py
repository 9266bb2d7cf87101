"""The report of an audit-log replay: what was verified, releases and refusals per office and item, every
discrepancy with its index, and the rows exported as JSONL and CSV.

Owns :class:`ReplayReport` (aggregates in bounded memory: counts per office and per item, the discrepancies — the
first ``MAX_DISCREPANCIES`` kept with their details, the rest counted), :class:`Discrepancy` (an index, a kind, a
plain sentence saying what is wrong and where) and :func:`row` (one replayed entry as a flat record; the same keys
in JSONL and in CSV, :data:`COLUMNS`).

Pure: no I/O, no clock. Does not own printing (``audit_cmd``) or deciding what is wrong (``redecision``,
``services.audit.integrity``).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Final

from services.audit.integrity import Finding
from services.cli.redecision import Replayed

MAX_DISCREPANCIES: Final = 10_000
COLUMNS: Final = (
    "index", "entry_id", "at", "office", "action", "item_id", "decision", "policy_version", "in_force",
    "redecided", "ok", "problems",
)  # fmt: skip


@dataclass(frozen=True)
class Discrepancy:
    """One thing wrong: ``index`` is the log index it concerns (None when it concerns the whole log)."""

    index: int | None
    kind: str
    detail: str
    entry_id: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"index": self.index, "kind": self.kind, "entry_id": self.entry_id or None, "detail": self.detail}


def row(r: Replayed) -> dict[str, Any]:
    """One replayed entry as a flat record (JSONL line, CSV row)."""
    return {
        "index": r.index, "entry_id": r.entry_id, "at": None if r.at is None else r.at.isoformat(),
        "office": r.office, "action": r.action, "item_id": r.item_id, "decision": r.decision,
        "policy_version": r.policy_version, "in_force": r.in_force, "redecided": r.redecided, "ok": r.ok,
        "problems": "; ".join(f"{p.kind}: {p.detail}" for p in r.problems),
    }  # fmt: skip


@dataclass
class ReplayReport:
    """Everything a replay found, in bounded memory."""

    origin: str
    size: int
    mode: str  # "full" (every entry, from the bundles) or "subset" (a range or a filter, from the query API)
    checks: dict[str, str] = field(default_factory=dict)  # what was verified, in words (signature, history, …)
    replayed: int = 0
    offices: dict[str, Counter[str]] = field(default_factory=dict)
    items: dict[str, Counter[str]] = field(default_factory=dict)
    discrepancies: list[Discrepancy] = field(default_factory=list)
    dropped: int = 0  # discrepancies counted but not kept
    kinds: Counter[str] = field(default_factory=Counter)

    def add(self, r: Replayed) -> None:
        self.replayed += 1
        if r.office:
            self.offices.setdefault(r.office, Counter())[r.decision or "UNDECODABLE"] += 1
        if r.item_id:
            self.items.setdefault(r.item_id, Counter())[r.decision] += 1
        for p in r.problems:
            self.discrepancy(Discrepancy(r.index, p.kind, p.detail, r.entry_id))

    def add_findings(self, findings: list[Finding], dropped: int = 0) -> None:
        for f in findings:
            self.discrepancy(Discrepancy(f.index, f.kind, f.detail))
        self.dropped += dropped

    def discrepancy(self, d: Discrepancy) -> None:
        self.kinds[d.kind] += 1
        if len(self.discrepancies) < MAX_DISCREPANCIES:
            self.discrepancies.append(d)
        else:
            self.dropped += 1

    @property
    def ok(self) -> bool:
        return not self.discrepancies and not self.dropped

    @property
    def count(self) -> int:
        return len(self.discrepancies) + self.dropped

    def sorted_discrepancies(self) -> list[Discrepancy]:
        return sorted(self.discrepancies, key=lambda d: (-1 if d.index is None else d.index, d.kind))

    def to_json(self) -> dict[str, Any]:
        return {
            "origin": self.origin, "size": self.size, "mode": self.mode, "ok": self.ok, "checks": self.checks,
            "replayed": self.replayed, "discrepancies": self.count, "by_kind": dict(sorted(self.kinds.items())),
            "offices": {o: dict(c) for o, c in sorted(self.offices.items())},
            "items": {i: dict(c) for i, c in sorted(self.items.items())},
            "listed": [d.to_json() for d in self.sorted_discrepancies()], "not_listed": self.dropped,
        }  # fmt: skip
