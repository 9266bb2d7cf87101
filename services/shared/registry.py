"""The publisher key registry: which Ed25519 keys may sign evidence, when, and up to which sequence number.

Owns: key records signed by a *trust anchor* (an admin key named in configuration, never in the records), the
ordering rules of a key's history — a newer revision replaces an older one, but may not change the key's
organisation or move its ``not_before`` (so a revocation can never make signatures made before it unverifiable,
nor hand a key's past to another organisation; python-tuf's trusted metadata set owns its rules the same way) —
and the checks an envelope's signer must pass:
unknown → refused; before ``not_before`` or from ``not_after`` → refused; revoked → refused, except
signatures whose sequence number is at or below ``last_valid_sequence`` (made before the compromise), which
still verify. Weak (small-order, non-canonical) public keys are refused when a record is applied.

Pure core (:class:`KeyRegistry`); the records live in the compacted ``hub.keys`` topic, keyed by key id, read and
written by ``services.shared.keystore``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from services.shared.avro import AvroCodec
from services.shared.errors import ConfigurationError, DecodeError, EvidenceHubError, TrustError, UntrustedKey
from services.shared.keys import PublicKey, SigningKey, key_id_for

log = logging.getLogger(__name__)

KEY_RECORD_SCHEMA: Final = "key_record"


@dataclass(frozen=True)
class KeyEntry:
    key: PublicKey
    organisation: str
    not_before: datetime
    not_after: datetime | None
    revoked_at: datetime | None
    last_valid_sequence: int | None
    last_valid_sequences: Mapping[str, int]
    revision: int


def _zigzag(n: int) -> bytes:
    """Avro's encoding of a long (zig-zag, then base-128 varint)."""
    value, out = (n << 1) ^ (n >> 63), bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def signed_part(data: bytes, anchor_sig: bytes) -> bytes:
    """The exact bytes the anchor signed: the record as written, its last field (``anchor_sig``) emptied.

    Verifying the bytes as written — not a re-encoding with today's schema — keeps records written with an older
    released schema verifiable after the schema evolves, as long as ``anchor_sig`` stays the last field.

    Raises:
        UntrustedKey: the record does not end with its signature field.
    """
    suffix = _zigzag(len(anchor_sig)) + anchor_sig
    if not data.endswith(suffix):
        raise UntrustedKey("malformed key record signature")
    return data[: len(data) - len(suffix)] + _zigzag(0)


def issue(
    codec: AvroCodec, anchor: SigningKey, *, public_key: PublicKey, organisation: str, not_before: datetime,
    not_after: datetime | None = None, revoked_at: datetime | None = None,
    last_valid_sequence: int | None = None, last_valid_sequences: Mapping[str, int] | None = None,
    revision: int = 1,
) -> bytes:  # fmt: skip
    """A key record for ``public_key`` signed by ``anchor``, Avro-encoded for the ``hub.keys`` topic.

    On revocation, ``last_valid_sequences`` gives the last genuine sequence number per topic (sequence numbers
    count per key and topic); ``last_valid_sequence`` applies to topics not listed there."""
    record: dict[str, Any] = {
        "key_id": public_key.key_id, "public_key": public_key.raw, "organisation": organisation,
        "not_before": not_before, "not_after": not_after, "revoked_at": revoked_at,
        "last_valid_sequence": last_valid_sequence, "last_valid_sequences": dict(last_valid_sequences or {}),
        "revision": revision,
        "anchor_key_id": anchor.key_id, "anchor_sig": b"",
    }  # fmt: skip
    record["anchor_sig"] = anchor.sign(codec.encode(KEY_RECORD_SCHEMA, record))
    return codec.encode(KEY_RECORD_SCHEMA, record)


def _check_succession(current: KeyEntry, raw: Mapping[str, Any]) -> None:
    """A newer record for a known key may revoke it, cut it off or end its validity; it may not rewrite who the key
    belonged to or from when. Signatures already made stay as verifiable as they were.

    Raises:
        UntrustedKey: a stale revision, another organisation, or another ``not_before``.
    """
    if raw["revision"] <= current.revision:
        raise UntrustedKey(f"stale revision {raw['revision']} (have {current.revision})")
    if raw["organisation"] != current.organisation:
        raise UntrustedKey(f"revision {raw['revision']} changes the key's organisation from {current.organisation!r}")
    if raw["not_before"] != current.not_before:
        raise UntrustedKey(
            f"revision {raw['revision']} moves the key's not_before from {current.not_before.isoformat()}"
        )


class KeyRegistry:
    """Trusted publisher keys, as of the records applied so far. Implements ``envelope.KeyResolver``."""

    def __init__(self, codec: AvroCodec, *, anchors: Iterable[PublicKey]) -> None:
        self._codec = codec
        self._anchors = {a.key_id: a for a in anchors}
        if not self._anchors:
            raise ConfigurationError("a key registry needs at least one trust anchor")
        self._entries: dict[str, KeyEntry] = {}
        self.rejected = 0

    def apply(self, data: bytes) -> KeyEntry:
        """Apply one record from ``hub.keys``.

        Raises:
            DecodeError: the record is not a key record.
            TrustError: not signed by a trust anchor, key id doesn't match the key, weak key, stale revision, or a
                newer revision that changes the key's organisation or moves its ``not_before``.
        """
        try:
            raw = self._codec.decode(data, expect=KEY_RECORD_SCHEMA, max_bytes=64 * 1024)
            anchor = self._anchors.get(raw["anchor_key_id"])
            if anchor is None:
                raise UntrustedKey("key record not signed by a trust anchor")
            anchor.verify(raw["anchor_sig"], signed_part(data, raw["anchor_sig"]))
            key = PublicKey.from_raw(raw["public_key"])
            if key.key_id != raw["key_id"] or key_id_for(raw["public_key"]) != raw["key_id"]:
                raise UntrustedKey("key id does not match the public key")
            current = self._entries.get(key.key_id)
            if current is not None:
                _check_succession(current, raw)
        except (DecodeError, TrustError):
            self.rejected += 1
            raise
        entry = KeyEntry(
            key=key, organisation=raw["organisation"], not_before=raw["not_before"], not_after=raw["not_after"],
            revoked_at=raw["revoked_at"], last_valid_sequence=raw["last_valid_sequence"],
            last_valid_sequences=dict(raw["last_valid_sequences"]), revision=raw["revision"],
        )  # fmt: skip
        self._entries[key.key_id] = entry
        return entry

    def apply_all(self, records: Iterable[bytes]) -> int:
        """Apply records in log order, skipping (and counting) the bad ones. Returns how many were applied."""
        applied = 0
        for data in records:
            try:
                self.apply(data)
                applied += 1
            except EvidenceHubError as exc:
                log.error("skipped key record: %s", exc.detail)
        return applied

    def entry(self, key_id: str) -> KeyEntry:
        found = self._entries.get(key_id)
        if found is None:
            raise UntrustedKey("unknown key")
        return found

    def resolve(self, key_id: str, *, sequence: int, topic: str) -> PublicKey:
        entry = self.entry(key_id)
        if entry.revoked_at is not None:
            cutoff = entry.last_valid_sequences.get(topic, entry.last_valid_sequence)
            if cutoff is None or sequence > cutoff:
                raise UntrustedKey("revoked key")
        return entry.key

    def check_signed_at(self, key_id: str, signed_at: datetime) -> None:
        entry = self.entry(key_id)
        if signed_at < entry.not_before:
            raise UntrustedKey("key not yet valid")
        if entry.not_after is not None and signed_at >= entry.not_after:
            raise UntrustedKey("expired key")

    def organisation_of(self, key_id: str) -> str:
        return self.entry(key_id).organisation

    def check_can_sign(self, key_id: str, now: datetime, *, organisation: str) -> None:
        """Refuse to publish with a key that receivers would refuse, in the name of ``organisation``.

        Raises:
            UntrustedKey: unknown, not yet valid, expired, revoked, or registered for another organisation.
        """
        entry = self.entry(key_id)
        if entry.revoked_at is not None:
            raise UntrustedKey("revoked key")
        if entry.organisation != organisation:
            raise UntrustedKey(f"the signing key is registered for {entry.organisation!r}, not {organisation!r}")
        self.check_signed_at(key_id, now)

    def key_ids(self) -> list[str]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)
