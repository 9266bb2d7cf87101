"""Selective disclosure of protected values, the SD-JWT way, inside signed Avro payloads.

A protected value (a witness's name, an exact location…) is never signed in the clear. The publisher draws a
random salt and builds a *disclosure* ``base64url(JSON [salt, field, value])``; the signed payload holds only
``base64url(SHA-256(ascii(disclosure)))`` with the value's label. A reader given a disclosure recomputes its digest
and finds it among the signed ones — so withholding a disclosure never breaks the signature, and a disclosure
can't be forged or moved to another item.

Pure: salts are parameters (``secrets.token_bytes(16)`` in the shell). No I/O.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from services.shared.errors import DecodeError, InvalidSignature

MAX_DISCLOSURE_CHARS: Final = 64 * 1024
SALT_BYTES: Final = 16


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def digest_of(disclosure: str) -> str:
    return _b64(hashlib.sha256(disclosure.encode("ascii")).digest())


@dataclass(frozen=True)
class Disclosure:
    field: str
    value: str
    label: str
    encoded: str
    digest: str


def make(field: str, value: str, *, label: str, salt: bytes) -> Disclosure:
    if len(salt) < SALT_BYTES:
        raise ValueError("salts must be at least 128 bits")
    encoded = _b64(json.dumps([_b64(salt), field, value], ensure_ascii=False, separators=(",", ":")).encode())
    return Disclosure(field=field, value=value, label=label, encoded=encoded, digest=digest_of(encoded))


def reveal(disclosures: Iterable[str], signed: Iterable[Mapping[str, str]]) -> dict[str, Disclosure]:
    """Check each disclosure against the signed digests and return them by field name.

    Raises:
        DecodeError: a disclosure is malformed or oversized.
        InvalidSignature: a disclosure's digest is not among the signed ones (forged, altered or misplaced).
    """
    labels = {d["digest"]: d["label"] for d in signed}
    out: dict[str, Disclosure] = {}
    for encoded in disclosures:
        if len(encoded) > MAX_DISCLOSURE_CHARS:
            raise DecodeError("disclosure too large")
        if not encoded.isascii():  # disclosures are unsigned input; digest_of would raise UnicodeEncodeError
            raise DecodeError("malformed disclosure")
        digest = digest_of(encoded)
        if digest not in labels:
            raise InvalidSignature("invalid signature")
        try:
            salt, field, value = json.loads(_unb64(encoded))
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            raise DecodeError("malformed disclosure") from exc
        if not (isinstance(salt, str) and isinstance(field, str) and isinstance(value, str)):
            raise DecodeError("malformed disclosure")
        out[field] = Disclosure(field=field, value=value, label=labels[digest], encoded=encoded, digest=digest)
    return out


def visible(disclosures: Iterable[str], signed: Iterable[Mapping[str, str]], *, allowed: Iterable[str]) -> list[str]:
    """The disclosures an office may receive (what the gateway forwards): only those whose *signed* label is in
    ``allowed`` (``Decision.disclosed_fields``). Everything else is dropped — a label not allowed or unknown, a
    disclosure matching no signed digest (it could only be a forgery), a non-ASCII one. An allow-list: a label
    nobody thought of is withheld, never forwarded."""
    permitted = set(allowed)
    labels = {d["digest"]: d["label"] for d in signed}
    return [
        d for d in disclosures
        if d.isascii() and len(d) <= MAX_DISCLOSURE_CHARS and labels.get(digest_of(d)) in permitted
    ]  # fmt: skip
