"""Ed25519 keys: key ids, loading, signing, and refusing public keys that could sign anything.

Owns: the key id rule (SHA-256 of the raw 32-byte public key, lower-case hex), the check that refuses
non-canonical and small-order public keys, and PEM/raw (de)serialisation. Pure: no I/O, no clock.

Does not own: which keys are trusted when (``services.shared.registry``), what is signed (``envelope``).

Why the small-order check: with the identity point ``01 00…00`` as public key and R = identity, S = 0, OpenSSL's
Ed25519 accepts *any* message (reproduced with cryptography 50.0.2). A signer who registered such a key could
later deny everything it signed. We decode the point and refuse it if 8·P is the identity (its order divides 8),
and refuse encodings with y ≥ p or a sign bit on x = 0, which are not canonical.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature as _CryptoInvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from services.shared.errors import InvalidSignature, UntrustedKey

_P = 2**255 - 19
_D = (-121665 * pow(121666, _P - 2, _P)) % _P
_SQRT_M1 = pow(2, (_P - 1) // 4, _P)


def _decode_point(raw: bytes) -> tuple[int, int] | None:
    """RFC 8032 §5.1.3 point decoding, strict: None for non-canonical or off-curve encodings."""
    y = int.from_bytes(raw, "little") & ((1 << 255) - 1)
    sign = raw[31] >> 7
    if y >= _P:
        return None
    u = (y * y - 1) % _P
    v = (_D * y * y + 1) % _P
    x = (u * pow(v, 3, _P) * pow(u * pow(v, 7, _P), (_P - 5) // 8, _P)) % _P
    if (v * x * x - u) % _P != 0:
        if (v * x * x + u) % _P != 0:
            return None
        x = (x * _SQRT_M1) % _P
    if x == 0 and sign == 1:
        return None
    if x & 1 != sign:
        x = _P - x
    return x, y


def _double(point: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """Extended-coordinates doubling on edwards25519 (a = -1)."""
    x, y, z, _ = point
    a, b, c = x * x % _P, y * y % _P, 2 * z * z % _P
    h = (a + b) % _P
    e = (h - (x + y) * (x + y)) % _P
    g = (a - b) % _P
    f = (c + g) % _P
    return e * f % _P, g * h % _P, f * g % _P, e * h % _P


def is_weak_public_key(raw: bytes) -> bool:
    """True for encodings that must never be trusted: wrong length, not canonical, off-curve, or small order."""
    if len(raw) != 32:
        return True
    point = _decode_point(raw)
    if point is None:
        return True
    x, y = point
    p = (x, y, 1, x * y % _P)
    for _ in range(3):
        p = _double(p)
    return p[0] % _P == 0 and (p[1] - p[2]) % _P == 0  # 8·P is the identity (0, 1)


def key_id_for(raw_public_key: bytes) -> str:
    return hashlib.sha256(raw_public_key).hexdigest()


@dataclass(frozen=True)
class PublicKey:
    """A vetted Ed25519 public key. Construct with :meth:`from_raw` / :meth:`from_pem`, never directly."""

    raw: bytes
    key_id: str
    _key: Ed25519PublicKey

    @classmethod
    def from_raw(cls, raw: bytes) -> PublicKey:
        """Raises: UntrustedKey for weak or malformed keys."""
        if is_weak_public_key(raw):
            raise UntrustedKey("weak or malformed Ed25519 public key")
        return cls(raw=bytes(raw), key_id=key_id_for(raw), _key=Ed25519PublicKey.from_public_bytes(raw))

    @classmethod
    def from_pem(cls, pem: bytes) -> PublicKey:
        """Raises: UntrustedKey if the PEM is not an Ed25519 public key, or the key is weak."""
        try:
            key = serialization.load_pem_public_key(pem)
        except (ValueError, TypeError) as exc:
            raise UntrustedKey("not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise UntrustedKey("not an Ed25519 public key")
        return cls.from_raw(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))

    def verify(self, signature: bytes, message: bytes) -> None:
        """Raises: InvalidSignature (one opaque error for every way a signature can be wrong)."""
        if len(signature) != 64:
            raise InvalidSignature("invalid signature")
        try:
            self._key.verify(signature, message)
        except _CryptoInvalidSignature as exc:
            raise InvalidSignature("invalid signature") from exc

    def to_pem(self) -> bytes:
        return self._key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True)
class SigningKey:
    """An Ed25519 private key with its public half and key id. Never logged, never serialised by accident."""

    _key: Ed25519PrivateKey
    public: PublicKey

    @classmethod
    def generate(cls) -> SigningKey:
        return cls._wrap(Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes) -> SigningKey:
        """Raises: UntrustedKey if the PEM is not an unencrypted Ed25519 private key."""
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise UntrustedKey("not an unencrypted PEM private key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise UntrustedKey("not an Ed25519 private key")
        return cls._wrap(key)

    @classmethod
    def _wrap(cls, key: Ed25519PrivateKey) -> SigningKey:
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return cls(_key=key, public=PublicKey.from_raw(raw))

    @property
    def key_id(self) -> str:
        return self.public.key_id

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def to_pem(self) -> bytes:
        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id[:16]}…)"
