"""Policy versions: the canonical form, its content hash, the policy-admin signature, and the topic record.

Owns: what a version is (Cedar policy text + Cedar schema + office entities + author + effective_from), the one
canonical byte form that is hashed and signed, DSSE-style signing (PAE over a payload type and the canonical
bytes), verification against explicitly trusted keys, and the bounded JSON record on ``hub.policy``. Pure: keys
and time are parameters.

Does not own: whether the policy text parses or validates (``compiled``), which version is in force
(``engine``), where trusted keys come from (the service's settings — never from a record).

The canonical form is JSON with sorted keys, no insignificant whitespace, UTF-8, offices sorted by id, and
``effective_from`` in UTC with microseconds (``2026-01-31T12:00:00.000000Z``). Only strings, lists and objects
occur in it, so it is also the RFC 8785 (JCS) form of the same object.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, Final

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from services.policy.model import Office
from services.shared.errors import ConfigurationError, DecodeError, UntrustedKey
from services.shared.keys import PublicKey, SigningKey

FORMAT: Final = "evhub-policy-version/1"
PAYLOAD_TYPE: Final = "application/vnd.evidence-hub.policy-version+json"
MAX_RECORD_BYTES: Final = 1 << 20


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE pre-authentication encoding: what is actually signed."""
    kind = payload_type.encode("utf-8")
    return b"DSSEv1 %d %b %d %b" % (len(kind), kind, len(payload), payload)


def _utc(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class PolicyVersion(BaseModel):
    """One version of the access policy, unsigned. Build it, then :func:`sign` it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    policy_text: str = Field(min_length=1)
    schema_text: str = Field(min_length=1)
    offices: tuple[Office, ...]
    author: str = Field(min_length=1, max_length=200)
    effective_from: AwareDatetime

    def canonical_bytes(self) -> bytes:
        body = {
            "format": FORMAT,
            "policy_text": self.policy_text,
            "schema_text": self.schema_text,
            "offices": [
                {k: list(v) if isinstance(v, tuple) else v for k, v in o.model_dump().items()}
                for o in sorted(self.offices, key=lambda o: o.office_id)
            ],
            "author": self.author,
            "effective_from": _utc(self.effective_from),
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")

    @property
    def content_hash(self) -> str:
        """SHA-256 of the canonical form, lower-case hex: the name of this version in every decision."""
        return hashlib.sha256(self.canonical_bytes()).hexdigest()


class SignedPolicyVersion(BaseModel):
    """A version with its signature as it travels on ``hub.policy``. ``signature`` may be absent in a record
    (the service must refuse it); :meth:`verify` is the only way to trust one."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: PolicyVersion
    key_id: str | None = None
    signature: bytes | None = None

    @property
    def content_hash(self) -> str:
        return self.version.content_hash

    def verify(self, trusted: Mapping[str, PublicKey]) -> PolicyVersion:
        """Check the signature against explicitly trusted policy-admin keys; return the verified version.

        Raises:
            UntrustedKey: unsigned, or signed by a key that is not trusted.
            InvalidSignature: the signature does not match the canonical form (any tampering).
        """
        if self.signature is None or self.key_id is None:
            raise UntrustedKey("policy version is unsigned")
        key = trusted.get(self.key_id)
        if key is None:
            raise UntrustedKey("policy version is signed by an untrusted key")
        key.verify(self.signature, pae(PAYLOAD_TYPE, self.version.canonical_bytes()))
        return self.version

    def to_record(self) -> bytes:
        """The JSON value written to ``hub.policy`` (key: the content hash)."""
        record: dict[str, Any] = {
            "format": FORMAT,
            "hash": self.content_hash,
            "version": json.loads(self.version.canonical_bytes()),
            "key_id": self.key_id,
            "signature": None if self.signature is None else base64.b64encode(self.signature).decode("ascii"),
        }
        return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sign(version: PolicyVersion, key: SigningKey) -> SignedPolicyVersion:
    signature = key.sign(pae(PAYLOAD_TYPE, version.canonical_bytes()))
    return SignedPolicyVersion(version=version, key_id=key.key_id, signature=signature)


def from_record(data: bytes) -> SignedPolicyVersion:
    """Decode a ``hub.policy`` record, bounded and strict. Does not verify: call :meth:`~SignedPolicyVersion.verify`.

    Raises:
        DecodeError: too large, not JSON, the wrong shape, its stated hash is not the hash of its content, or
            it is not byte-for-byte the canonical record (:meth:`SignedPolicyVersion.to_record`).
    """
    if len(data) > MAX_RECORD_BYTES:
        raise DecodeError(f"policy record of {len(data)} bytes exceeds {MAX_RECORD_BYTES}")
    try:
        raw = json.loads(data)
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise DecodeError("not a policy version record")
        body = dict(raw["version"])
        body.pop("format", None)
        version = PolicyVersion.model_validate(body)
        signature = raw.get("signature")
        signed = SignedPolicyVersion(
            version=version,
            key_id=raw.get("key_id"),
            signature=None if signature is None else base64.b64decode(signature, validate=True),
        )
    except DecodeError:
        raise
    except (ValueError, TypeError, KeyError, binascii.Error, ValidationError) as exc:
        raise DecodeError(f"undecodable policy record: {type(exc).__name__}") from exc
    if raw.get("hash") != signed.content_hash:
        raise DecodeError("policy record's stated hash does not match its content")
    if signed.to_record() != data:  # one byte form per version: what was published is what is stored
        raise DecodeError("policy record is not in canonical form")
    return signed


def trusted_keys(keys: list[PublicKey] | tuple[PublicKey, ...]) -> dict[str, PublicKey]:
    """Index vetted keys by key id (weak keys were already refused by :class:`PublicKey`).

    Raises:
        ConfigurationError: no keys at all — an empty trust set would accept nothing.
    """
    if not keys:
        raise ConfigurationError("no trusted policy-admin keys configured")
    return {k.key_id: k for k in keys}
