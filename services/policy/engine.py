"""Which policy version was in force when, and the decisions it gives — the pure core of access policy.

Owns: :class:`PolicyStore` (every accepted version, refusing unsigned, wrongly signed, invalid or back-dated
ones while the version in force stays in force; the count of refused records) and :class:`PolicyEngine`
(``decide`` with a bounded cache, plus uncached and parse-every-call variants for benchmarks). Pure: versions
arrive as bytes or models, time arrives as ``at``; no asyncio, aiohttp, aiokafka, os or time here.

Does not own: reading ``hub.policy`` (``topic``), HTTP (``service``), what the rules say (the policy pack).

Cache soundness: a decision depends only on (version, office, action, the item's :meth:`policy_key`, purpose,
``at`` to the second). ``at`` is truncated to whole seconds before Cedar sees it, and policies may not name
items (``compiled``), so the key determines the answer exactly.
"""

from __future__ import annotations

import bisect
import json
import logging
from collections import Counter, OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import cedarpy

from services.policy.compiled import CompiledPolicy, compile_version, office_entity, request, resource_entity
from services.policy.model import (
    ACTIONS,
    REDACTING_ACTIONS,
    Decision,
    FeedRef,
    ItemAttributes,
    ProtectedLabel,
    protected_action,
)
from services.policy.version import SignedPolicyVersion, from_record
from services.shared.errors import DecodeError, NotFound, PolicyError, TrustError, ValidationFailed
from services.shared.keys import PublicKey

log = logging.getLogger(__name__)

Resource = ItemAttributes | FeedRef


class PolicyStore:
    """All accepted policy versions, ordered by ``effective_from`` (which strictly increases)."""

    def __init__(self, *, trusted: Mapping[str, PublicKey]) -> None:
        self._trusted = dict(trusted)
        self._versions: list[CompiledPolicy] = []
        self._starts: list[datetime] = []
        self._by_hash: dict[str, CompiledPolicy] = {}
        #: Refused records by reason family (``DecodeError``, ``UntrustedKey``, ``PolicyError`` …).
        self.rejected: Counter[str] = Counter()

    def check(self, signed: SignedPolicyVersion) -> CompiledPolicy:
        """Everything :meth:`accept` checks, without adding the version. A known version is returned as is.

        Raises:
            TrustError: unsigned, untrusted key, or a signature that does not match.
            PolicyError: Cedar refused the policies, schema or offices, or ``effective_from`` is not later than
                the newest accepted version's (history is never rewritten).
        """
        known = self._by_hash.get(signed.content_hash)
        if known is not None:
            return known
        version = signed.verify(self._trusted)
        if self._starts and version.effective_from <= self._starts[-1]:
            raise PolicyError(
                f"policy version {signed.content_hash[:16]} is effective from {version.effective_from.isoformat()},"
                f" not after the newest version's {self._starts[-1].isoformat()}"
            )
        return compile_version(version)

    def accept(self, signed: SignedPolicyVersion) -> CompiledPolicy:
        """Verify, validate and add one version; re-accepting a known version is a no-op that returns it. A
        refused version changes nothing: the version in force stays in force.

        Raises:
            TrustError, PolicyError: as :meth:`check`.
        """
        if signed.content_hash in self._by_hash:
            return self._by_hash[signed.content_hash]
        compiled = self.check(signed)
        version = compiled.version
        self._versions.append(compiled)
        self._starts.append(version.effective_from)
        self._by_hash[compiled.content_hash] = compiled
        log.info("policy version %s by %s accepted, effective from %s",
                 compiled.content_hash, version.author, version.effective_from.isoformat())  # fmt: skip
        return compiled

    def ingest(self, record: bytes, *, where: str) -> CompiledPolicy | None:
        """Apply one ``hub.policy`` record; a record that cannot be trusted or used is logged, counted and
        skipped — never applied. ``where`` (e.g. ``hub.policy[0]@17``) goes into the log line."""
        try:
            return self.accept(from_record(record))
        except (DecodeError, TrustError, PolicyError) as exc:
            self.rejected[type(exc).__name__] += 1
            log.error("policy record %s refused (%s): %s", where, type(exc).__name__, exc.detail)
            return None

    def in_force(self, at: datetime) -> CompiledPolicy | None:
        """The version in force at ``at``: the newest whose ``effective_from`` is not after it."""
        index = bisect.bisect_right(self._starts, at)
        return self._versions[index - 1] if index else None

    def get(self, content_hash: str) -> CompiledPolicy:
        """Raises: NotFound for an unknown hash (a unique prefix of at least 8 hex digits also matches)."""
        found = self._by_hash.get(content_hash)
        if found is None and len(content_hash) >= 8:
            matches = [v for h, v in self._by_hash.items() if h.startswith(content_hash)]
            found = matches[0] if len(matches) == 1 else None
        if found is None:
            raise NotFound(f"no policy version {content_hash}")
        return found

    def history(self) -> list[CompiledPolicy]:
        return list(self._versions)


@dataclass(frozen=True)
class CacheInfo:
    hits: int
    misses: int
    size: int
    maxsize: int


def _ids(compiled: CompiledPolicy, reasons: list[str]) -> tuple[str, ...]:
    return tuple(sorted(compiled.policy_ids.get(r, r) for r in reasons))


def _second(at: datetime) -> datetime:
    if at.tzinfo is None:
        raise ValidationFailed("decision time must carry a time zone")
    return at.replace(microsecond=0)


def _side(now: datetime, moment: datetime) -> int:
    return (now > moment) - (now < moment)


def _time_key(compiled: CompiledPolicy | None, item: Resource, now: datetime) -> object:
    """What of ``now`` a decision can depend on. Under a version that only compares time with fixed moments (its
    literals and the item's embargo), that is which side of each moment ``now`` is on — so one cached decision
    serves every read until the next moment passes. Otherwise (or with no version) the second itself."""
    if compiled is None or compiled.time_thresholds is None:
        return now
    moments = compiled.time_thresholds
    if isinstance(item, ItemAttributes) and item.embargo_until is not None:
        moments = (*moments, item.embargo_until)
    return tuple(_side(now, m) for m in moments)


class PolicyEngine:
    """Decisions under the version in force. ``decide`` caches; the other two variants exist for comparison."""

    def __init__(self, store: PolicyStore, *, cache_size: int = 65_536) -> None:
        self.store = store
        self._cache: OrderedDict[tuple[object, ...], Decision] = OrderedDict()
        self._maxsize = cache_size
        self._hits = 0
        self._misses = 0

    def decide(self, office_id: str, action: str, item: Resource, at: datetime, purpose: str | None = None) -> Decision:
        """May ``office_id`` do ``action`` to ``item`` at ``at`` (for ``purpose``)? Unknown office, action or
        no version in force → deny. A naive ``at`` raises ValidationFailed (a caller bug, not a denial)."""
        now = _second(at)
        compiled = self.store.in_force(at)  # the exact moment picks the version; Cedar sees whole seconds
        key_item = item.policy_key() if isinstance(item, ItemAttributes) else ("feed", item.jurisdiction)
        key = (None if compiled is None else compiled.content_hash, office_id, action, key_item, purpose,
               _time_key(compiled, item, now))  # fmt: skip
        cached = self._cache.get(key)
        if cached is not None:
            self._hits += 1
            self._cache.move_to_end(key)
            return cached
        self._misses += 1
        decision = _evaluate(compiled, office_id, action, item, now, purpose)
        self._cache[key] = decision
        if len(self._cache) > self._maxsize:
            self._cache.popitem(last=False)
        return decision

    def decide_uncached(
        self, office_id: str, action: str, item: Resource, at: datetime, purpose: str | None = None
    ) -> Decision:
        """``decide`` without the cache: the parse-once Cedar handles, evaluated every call."""
        now = _second(at)
        return _evaluate(self.store.in_force(at), office_id, action, item, now, purpose)

    def decide_parse_every_call(
        self, office_id: str, action: str, item: Resource, at: datetime, purpose: str | None = None
    ) -> Decision:
        """The naive baseline: hand Cedar the policy, schema and entity text on every call (benchmarks only)."""
        now = _second(at)
        return _evaluate(self.store.in_force(at), office_id, action, item, now, purpose, parse_every_call=True)

    def cache_info(self) -> CacheInfo:
        return CacheInfo(hits=self._hits, misses=self._misses, size=len(self._cache), maxsize=self._maxsize)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._hits = self._misses = 0


def _decided_labels(action: str, item: Resource) -> tuple[ProtectedLabel, ...]:
    """The protected labels on ``item`` that deciding ``action`` decides: every decidable one for ``ReadItem`` /
    ``ReadContent``, the action's own label for ``ReadProtected_<LABEL>``, none otherwise."""
    if not isinstance(item, ItemAttributes):
        return ()
    present = tuple(dict.fromkeys(item.protected_fields))
    if action in REDACTING_ACTIONS:
        return present
    return tuple(label for label in present if protected_action(label) == action)


def _evaluate(
    compiled: CompiledPolicy | None, office_id: str, action: str, item: Resource, now: datetime,
    purpose: str | None, *, parse_every_call: bool = False,
) -> Decision:  # fmt: skip
    undecidable: tuple[str, ...] = ()
    everything: tuple[str, ...] = ()
    if isinstance(item, ItemAttributes):
        undecidable = tuple(dict.fromkeys(item.undecidable_fields))
        everything = (*dict.fromkeys(item.protected_fields), *undecidable)
    if compiled is None:
        return Decision.deny(f"no valid policy version in force at {now.isoformat()}").model_copy(
            update={"withheld_fields": everything}
        )
    version = compiled.content_hash
    if office_id not in compiled.offices:
        return Decision(allowed=False, withheld_fields=everything, policy_version=version,
                        reasons=(f"unknown office {office_id!r}",))  # fmt: skip
    if action not in ACTIONS:
        return Decision(allowed=False, withheld_fields=everything, policy_version=version,
                        reasons=(f"unknown action {action!r}",))  # fmt: skip
    decided = _decided_labels(action, item)
    # ReadItem/ReadContent decide each label with a request of its own; ReadProtected_<LABEL> is that request.
    per_label = decided if action in REDACTING_ACTIONS else ()
    requests = [request(office_id, a, item, now, purpose) for a in (action, *map(protected_action, per_label))]
    if parse_every_call:
        text = compiled.version
        entities = json.dumps([*map(office_entity, text.offices), resource_entity(item)])
        results = cedarpy.is_authorized_batch(requests, text.policy_text, entities, schema=text.schema_text)
    else:
        entities_handle = compiled.entities.with_added_json_str(json.dumps([resource_entity(item)]))
        results = cedarpy.is_authorized_batch(requests, compiled.policies, entities_handle, schema=compiled.schema)
    main, fields = results[0], results[1:]
    determining = _ids(compiled, main.diagnostics.reasons)
    errors = tuple(main.diagnostics.errors)
    if not main.allowed:
        why = f"denied by {', '.join(determining)}" if determining else "default deny: no policy permits this"
        return Decision(allowed=False, withheld_fields=everything, policy_version=version,
                        determining_policies=determining, reasons=(why,), errors=errors)  # fmt: skip
    reasons = [f"allowed by {', '.join(determining)}"]
    disclosed: list[str] = [] if per_label else list(decided)
    for label, result in zip(per_label, fields, strict=True):
        if result.allowed:
            disclosed.append(label)
            continue
        by = _ids(compiled, result.diagnostics.reasons)
        reasons.append(f"{label} withheld: " + (f"by {', '.join(by)}" if by else "no policy permits it"))
    if undecidable:
        reasons.append(f"{', '.join(undecidable)} withheld: no policy decides these labels")
    withheld = tuple(label for label in everything if label not in disclosed)
    return Decision(allowed=True, withheld_fields=withheld, disclosed_fields=tuple(disclosed),
                    policy_version=version, determining_policies=determining, reasons=tuple(reasons),
                    errors=errors)  # fmt: skip
