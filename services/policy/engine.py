"""Which policy version was in force when, and the decisions it gives — the pure core of access policy.

Owns: :class:`PolicyStore` (every accepted version, refusing unsigned, wrongly signed, invalid or back-dated
ones while the version in force stays in force; the count of refused records) and :class:`PolicyEngine`
(``decide`` with a bounded cache, plus uncached and parse-every-call variants for benchmarks). Pure: versions
arrive as bytes or models, time arrives as ``at`` / ``appended_at``; no asyncio, aiohttp, aiokafka, os or time here.

Does not own: reading ``hub.policy`` (``topic``), HTTP (``service``), what the rules say (the policy pack).

History is never rewritten. A version may not take effect before the log accepted it: one whose
``effective_from`` is earlier than its ``hub.policy`` record's timestamp (``appended_at``) minus a small clock-skew
allowance is refused, and one accepted within the allowance takes effect just after it was appended
(``appended_at`` + 1 ms, the resolution of Kafka timestamps), not at the earlier moment it names. So a read
decided at time T by a store that had every record appended by then is decided by the version that
:meth:`PolicyStore.in_force` names for T forever after — the version an auditor replaying ``hub.policy`` finds.

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
from datetime import datetime, timedelta
from typing import Final

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
from services.shared.errors import (
    ConfigurationError,
    DecodeError,
    NotFound,
    PolicyError,
    TrustError,
    ValidationFailed,
)  # fmt: skip
from services.shared.keys import PublicKey

log = logging.getLogger(__name__)

Resource = ItemAttributes | FeedRef


#: How much earlier than its record's timestamp a version may say it takes effect (clocks of the pushing host
#: and the broker disagree a little); the default of every store, the policy service and ``evhub policy push``.
MAX_CLOCK_SKEW: Final = timedelta(seconds=30)
#: Kafka record timestamps are whole milliseconds: a record stamped T was appended somewhere in [T, T + 1 ms).
APPEND_RESOLUTION: Final = timedelta(milliseconds=1)


class PolicyStore:
    """All accepted policy versions, in log order: ``effective_from`` strictly increases, and the moment each
    takes effect (:meth:`in_force_from`) never decreases."""

    def __init__(self, *, trusted: Mapping[str, PublicKey], max_clock_skew: timedelta = MAX_CLOCK_SKEW) -> None:
        """Raises: ConfigurationError for a negative clock-skew allowance."""
        if max_clock_skew < timedelta(0):
            raise ConfigurationError("the clock-skew allowance for policy versions cannot be negative")
        self._trusted = dict(trusted)
        self._max_clock_skew = max_clock_skew
        self._versions: list[CompiledPolicy] = []
        self._starts: list[datetime] = []
        self._by_hash: dict[str, CompiledPolicy] = {}
        self._start_of: dict[str, datetime] = {}
        #: Refused records by reason family (``DecodeError``, ``UntrustedKey``, ``PolicyError`` …).
        self.rejected: Counter[str] = Counter()

    def check(self, signed: SignedPolicyVersion, *, appended_at: datetime) -> CompiledPolicy:
        """Everything :meth:`accept` checks, without adding the version. A known version is returned as is.
        ``appended_at`` is when the version is (about to be) appended to ``hub.policy``: "now" before publishing.

        Raises:
            TrustError: unsigned, untrusted key, or a signature that does not match.
            PolicyError: Cedar refused the policies, schema or offices; ``effective_from`` is not later than the
                newest accepted version's; or it is earlier than ``appended_at`` minus the clock-skew allowance
                (history is never rewritten).
            ValidationFailed: ``appended_at`` has no time zone (a caller bug).
        """
        known = self._by_hash.get(signed.content_hash)
        if known is not None:
            return known
        if appended_at.tzinfo is None:
            raise ValidationFailed("appended_at must carry a time zone")
        version = signed.verify(self._trusted)
        newest = self._versions[-1].effective_from if self._versions else None
        if newest is not None and version.effective_from <= newest:
            raise PolicyError(
                f"policy version {signed.content_hash[:16]} is effective from {version.effective_from.isoformat()},"
                f" not after the newest version's {newest.isoformat()}"
            )
        if version.effective_from < appended_at - self._max_clock_skew:
            raise PolicyError(
                f"policy version {signed.content_hash[:16]} is back-dated: effective from"
                f" {version.effective_from.isoformat()}, but appended at {appended_at.isoformat()} (allowed clock"
                f" skew {self._max_clock_skew.total_seconds():g} s); a version may not take effect before it was"
                " accepted"
            )
        return compile_version(version)

    def check_record(self, record: bytes, *, appended_at: datetime) -> CompiledPolicy:
        """The one check a ``hub.policy`` record passes before anyone publishes it (the policy service's
        ``POST /v1/versions`` and ``evhub policy push``): decoded exactly as :meth:`ingest` decodes it, then
        :meth:`check`. Adds nothing.

        Raises:
            DecodeError: not a canonical policy record. TrustError, PolicyError, ValidationFailed: as :meth:`check`.
        """
        return self.check(from_record(record), appended_at=appended_at)

    def accept(self, signed: SignedPolicyVersion, *, appended_at: datetime) -> CompiledPolicy:
        """Verify, validate and add one version appended to the log at ``appended_at``; re-accepting a known
        version is a no-op that returns it. A refused version changes nothing: the version in force stays.

        Raises:
            TrustError, PolicyError, ValidationFailed: as :meth:`check`.
        """
        if signed.content_hash in self._by_hash:
            return self._by_hash[signed.content_hash]
        compiled = self.check(signed, appended_at=appended_at)
        version = compiled.version
        # In force from its effective_from, but never before the log held it; and in log order even if the
        # broker's clock stepped back.
        start = max(version.effective_from, appended_at + APPEND_RESOLUTION, *self._starts[-1:])
        self._versions.append(compiled)
        self._starts.append(start)
        self._by_hash[compiled.content_hash] = compiled
        self._start_of[compiled.content_hash] = start
        log.info("policy version %s by %s accepted, effective from %s, in force from %s", compiled.content_hash,
                 version.author, version.effective_from.isoformat(), start.isoformat())  # fmt: skip
        return compiled

    def ingest(self, record: bytes, *, where: str, appended_at: datetime) -> CompiledPolicy | None:
        """Apply one ``hub.policy`` record, whose Kafka timestamp is ``appended_at``; a record that cannot be
        trusted or used is logged, counted and skipped — never applied. ``where`` (e.g. ``hub.policy[0]@17``) goes
        into the log line."""
        try:
            return self.accept(from_record(record), appended_at=appended_at)
        except (DecodeError, TrustError, PolicyError) as exc:
            self.rejected[type(exc).__name__] += 1
            log.error("policy record %s refused (%s): %s", where, type(exc).__name__, exc.detail)
            return None

    def in_force_from(self, content_hash: str) -> datetime:
        """The moment an accepted version took effect: its ``effective_from``, or just after it was appended if
        that was later.

        Raises:
            NotFound: no accepted version has that hash.
        """
        start = self._start_of.get(content_hash)
        if start is None:
            raise NotFound(f"no policy version {content_hash}")
        return start

    def in_force(self, at: datetime) -> CompiledPolicy | None:
        """The version in force at ``at``: the newest whose :meth:`in_force_from` is not after it."""
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
        _second(at)  # a naive time is refused before it is compared with the versions' moments
        return self._decide(self.store.in_force(at), office_id, action, item, at, purpose)

    def decide_under(
        self, content_hash: str, office_id: str, action: str, item: Resource, at: datetime, purpose: str | None = None
    ) -> Decision:
        """The decision the accepted version ``content_hash`` gives at ``at``, whether or not it was in force then:
        what an auditor's replay re-decides a recorded decision with (the version the record names). Cached like
        :meth:`decide`.

        Raises:
            NotFound: no accepted version has exactly that hash.
        """
        compiled = self.store.get(content_hash)
        if compiled.content_hash != content_hash:  # ``get`` also matches a prefix; a record names the whole hash
            raise NotFound(f"no policy version {content_hash}")
        return self._decide(compiled, office_id, action, item, at, purpose)

    def _decide(
        self, compiled: CompiledPolicy | None, office_id: str, action: str, item: Resource, at: datetime,
        purpose: str | None,
    ) -> Decision:  # fmt: skip
        now = _second(at)
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
