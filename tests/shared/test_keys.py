"""Ed25519 keys: key ids, PEM, refusing public keys that could sign anything, one opaque signature error."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Final

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from hypothesis import given
from hypothesis import strategies as st

from services.shared.errors import InvalidSignature, UntrustedKey
from services.shared.keys import PublicKey, SigningKey, is_weak_public_key, key_id_for
from tests.shared.records import PUBLISHER_PUBLIC, PUBLISHER_SEED, seed_key, signing_key_from_seed

VECTORS: Final = Path(__file__).resolve().parents[1] / "vectors"
_P: Final = 2**255 - 19
_L: Final = 2**252 + 27742317777372353535851937790883648493  # order of the Ed25519 base point
IDENTITY: Final = bytes([1]) + bytes(31)

_SMALL_ORDER: Final = json.loads((VECTORS / "ed25519_small_order.json").read_text("utf-8"))["keys"]


def test_key_id_is_sha256_of_the_raw_public_key() -> None:
    key = signing_key_from_seed(PUBLISHER_SEED)
    assert key.public.raw == PUBLISHER_PUBLIC  # RFC 8032 §7.1 TEST 1
    assert key.key_id == key.public.key_id == hashlib.sha256(PUBLISHER_PUBLIC).hexdigest()
    assert key_id_for(PUBLISHER_PUBLIC) == "21fe31dfa154a261626bf854046fd2271b7bed4b6abe45aa58877ef47f9721b9"


def test_public_key_pem_round_trip() -> None:
    public = seed_key(1).public
    pem = public.to_pem()
    assert pem.startswith(b"-----BEGIN PUBLIC KEY-----")
    again = PublicKey.from_pem(pem)
    assert (again.raw, again.key_id) == (public.raw, public.key_id)


def test_signing_key_pem_round_trip_signs_the_same() -> None:
    key = signing_key_from_seed(PUBLISHER_SEED)
    again = SigningKey.from_pem(key.to_pem())
    assert again.key_id == key.key_id
    assert again.sign(b"msg") == key.sign(b"msg")  # Ed25519 is deterministic: same key, same signature
    key.public.verify(again.sign(b"msg"), b"msg")


def test_repr_of_a_signing_key_does_not_leak_it() -> None:
    key = signing_key_from_seed(PUBLISHER_SEED)
    text = repr(key)
    assert PUBLISHER_SEED.hex() not in text
    assert "PRIVATE" not in text
    assert key.key_id[:16] in text


def _ec_public_pem() -> bytes:
    return (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )


def _ec_private_pem() -> bytes:
    return ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _encrypted_ed25519_pem() -> bytes:
    return Ed25519PrivateKey.from_private_bytes(PUBLISHER_SEED).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"correct horse"),
    )


def _identity_public_pem() -> bytes:
    # OpenSSL itself loads the identity point without complaint; our loader must not.
    return Ed25519PublicKey.from_public_bytes(IDENTITY).public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    "pem",
    [b"", b"not a pem", _ec_public_pem(), _identity_public_pem(), seed_key(1).to_pem()],
    ids=["empty", "garbage", "ecdsa_p256_key", "identity_point_key", "private_key_given_as_public"],
)
def test_public_key_from_pem_refuses(pem: bytes) -> None:
    with pytest.raises(UntrustedKey):
        PublicKey.from_pem(pem)


@pytest.mark.parametrize(
    "pem",
    [b"garbage", _ec_private_pem(), _encrypted_ed25519_pem(), seed_key(1).public.to_pem()],
    ids=["garbage", "ecdsa_p256_key", "password_protected", "public_key_given_as_private"],
)
def test_signing_key_from_pem_refuses(pem: bytes) -> None:
    with pytest.raises(UntrustedKey):
        SigningKey.from_pem(pem)


@pytest.mark.parametrize("raw_hex", [k["hex"] for k in _SMALL_ORDER], ids=[k["name"] for k in _SMALL_ORDER])
def test_small_order_and_non_canonical_keys_are_refused(raw_hex: str) -> None:
    raw = bytes.fromhex(raw_hex)
    assert is_weak_public_key(raw)
    with pytest.raises(UntrustedKey):
        PublicKey.from_raw(raw)


def test_non_canonical_encoding_of_a_good_point_is_refused() -> None:
    # y = 3 is on the curve and of large order; y = 3 + p encodes the same point non-canonically.
    canonical, non_canonical = (3).to_bytes(32, "little"), (3 + _P).to_bytes(32, "little")
    assert not is_weak_public_key(canonical)
    assert is_weak_public_key(non_canonical)


@pytest.mark.parametrize(
    "raw",
    [b"", PUBLISHER_PUBLIC[:31], PUBLISHER_PUBLIC + b"\x00", PUBLISHER_PUBLIC * 2],
    ids=["empty", "31_bytes", "33_bytes", "64_bytes"],
)
def test_wrong_length_keys_are_refused(raw: bytes) -> None:
    assert is_weak_public_key(raw)
    with pytest.raises(UntrustedKey):
        PublicKey.from_raw(raw)


def test_off_curve_encoding_is_refused() -> None:
    raw = (2).to_bytes(32, "little")  # y = 2: (y*y - 1)/(d*y*y + 1) has no square root
    assert is_weak_public_key(raw)


def test_why_the_check_matters_openssl_accepts_a_forgery_for_the_identity_key() -> None:
    """With A = identity, R = identity and S = 0, [S]B = R + [k]A holds for every message k.

    If this test starts failing, OpenSSL began refusing the forgery itself; our check stays necessary for any
    other verifier the offices use.
    """
    forged = IDENTITY + bytes(32)
    for message in (b"I never signed this", b"", b"\x00" * 1000):
        Ed25519PublicKey.from_public_bytes(IDENTITY).verify(forged, message)  # raises if refused
    with pytest.raises(UntrustedKey):
        PublicKey.from_raw(IDENTITY)


@given(seed=st.binary(min_size=32, max_size=32))
def test_generated_keys_are_never_refused(seed: bytes) -> None:
    raw = (
        Ed25519PrivateKey.from_private_bytes(seed)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    assert not is_weak_public_key(raw)
    assert PublicKey.from_raw(raw).key_id == hashlib.sha256(raw).hexdigest()


def test_freshly_generated_keys_are_accepted() -> None:
    for _ in range(20):
        key = SigningKey.generate()
        assert not is_weak_public_key(key.public.raw)


MESSAGE: Final = b"evidence event bytes"
_KEY: Final = signing_key_from_seed(PUBLISHER_SEED)
_SIG: Final = _KEY.sign(MESSAGE)


def _flip(data: bytes, index: int) -> bytes:
    out = bytearray(data)
    out[index] ^= 0x01
    return bytes(out)


def _s_plus_l(sig: bytes) -> bytes:
    s = int.from_bytes(sig[32:], "little") + _L
    assert s < 2**256
    return sig[:32] + s.to_bytes(32, "little")


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        (_SIG, MESSAGE + b"!"),
        (_SIG, b""),
        (_flip(_SIG, 0), MESSAGE),
        (_flip(_SIG, 31), MESSAGE),
        (_flip(_SIG, 32), MESSAGE),
        (_flip(_SIG, 63), MESSAGE),
        (_s_plus_l(_SIG), MESSAGE),
        (_SIG[:63], MESSAGE),
        (_SIG + b"\x00", MESSAGE),
        (b"", MESSAGE),
        (bytes(64), MESSAGE),
        (IDENTITY + bytes(32), MESSAGE),
        (seed_key(2).sign(MESSAGE), MESSAGE),
    ],
    ids=[
        "other_message", "empty_message", "R_first_byte", "R_last_byte", "S_first_byte", "S_last_byte",
        "S_plus_group_order_malleated", "truncated", "extended", "empty", "all_zero", "identity_forgery",
        "signed_by_another_key",
    ],
)  # fmt: skip
def test_every_wrong_signature_raises_invalid_signature(signature: bytes, message: bytes) -> None:
    with pytest.raises(InvalidSignature) as caught:
        _KEY.public.verify(signature, message)
    assert str(caught.value) == "invalid signature"  # one opaque message, whatever was wrong


def test_a_good_signature_verifies() -> None:
    _KEY.public.verify(_SIG, MESSAGE)
