"""C2SP signed notes with Ed25519: keys, key ids, verifier keys, signing, and opening a note with trusted keys.

Owns the signed-note format (c2sp.org/signed-note): a UTF-8 text ending in a newline, a blank line, then signature
lines ``— <key name> base64(key id || signature)``; the key id ``SHA-256(name || 0x0A || type || public key)[:4]``;
verifier keys ``<name>+<hex key id>+base64(type || public key)``; two signature types:

- ``0x01`` Ed25519 over the note text (the log's own signature on a checkpoint);
- ``0x04`` timestamped Ed25519 cosignatures (c2sp.org/tlog-cosignature ``cosignature/v1``): 8-byte big-endian
  POSIX time then the Ed25519 signature over ``cosignature/v1\\ntime <t>\\n`` + the note text.

Opening a note follows the spec: signatures by unknown keys (name and id not both matching) are ignored; a
signature by a known key must verify or the whole note is refused; at least one known key must have signed.

Pure: no I/O, no clock (a cosignature's time is a parameter). Does not own what the text means (``checkpoint``).
Public keys go through :class:`services.shared.keys.PublicKey`, which refuses small-order keys.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Final, Protocol

from services.shared.errors import DecodeError, EvidenceHubError, InvalidSignature, UntrustedKey
from services.shared.keys import PublicKey, SigningKey

ED25519: Final = 0x01
COSIGNATURE_V1: Final = 0x04
#: Generous for checkpoints with many cosignatures; the spec asks verifiers to accept at least 16 signatures.
MAX_NOTE_BYTES: Final = 256 * 1024
MAX_SIGNATURES: Final = 100
MAX_TIMESTAMP: Final = (1 << 63) - 1
DASH: Final = "\u2014"


def check_name(name: str) -> str:
    """Raises: DecodeError unless ``name`` is a valid key name (non-empty, no Unicode space, no ``+``)."""
    if not name or "+" in name or any(c.isspace() for c in name) or any(ord(c) < 0x20 for c in name):
        raise DecodeError(f"not a valid key name: {name[:80]!r}")
    return name


def key_id(name: str, sig_type: int, public_key: bytes) -> int:
    return int.from_bytes(hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public_key).digest()[:4], "big")


def cosignature_message(text: str, timestamp: int) -> bytes:
    """What an Ed25519 cosigner signs: the header line, the time line, then the whole note text."""
    return f"cosignature/v1\ntime {timestamp}\n".encode() + text.encode()


@dataclass(frozen=True)
class Signature:
    """One signature line: the key name, the key id and the signature bytes that follow the id."""

    name: str
    key_id: int
    data: bytes

    @property
    def line(self) -> str:
        return f"{DASH} {self.name} {base64.b64encode(self.key_id.to_bytes(4, 'big') + self.data).decode()}\n"


@dataclass(frozen=True)
class Note:
    text: str
    signatures: tuple[Signature, ...]

    def encode(self) -> bytes:
        return (self.text + "\n" + "".join(s.line for s in self.signatures)).encode()


class Verifier(Protocol):
    """A trusted key: its name and id, and a check of one signature over a note's text."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> int: ...

    def verify(self, text: str, data: bytes) -> bool: ...


@dataclass(frozen=True)
class Ed25519Verifier:
    """Verifies type 0x01 signatures (a log's signature on its checkpoint)."""

    name: str
    public_key: PublicKey
    sig_type = ED25519

    @property
    def key_id(self) -> int:
        return key_id(self.name, self.sig_type, self.public_key.raw)

    @property
    def vkey(self) -> str:
        return vkey(self.name, self.sig_type, self.public_key.raw)

    def verify(self, text: str, data: bytes) -> bool:
        try:
            self.public_key.verify(data, text.encode())
        except InvalidSignature:
            return False
        return True


@dataclass(frozen=True)
class CosignatureVerifier:
    """Verifies type 0x04 cosignatures (``cosignature/v1``); :func:`cosignature_time` reads a verified one's time."""

    name: str
    public_key: PublicKey
    sig_type = COSIGNATURE_V1

    @property
    def key_id(self) -> int:
        return key_id(self.name, self.sig_type, self.public_key.raw)

    @property
    def vkey(self) -> str:
        return vkey(self.name, self.sig_type, self.public_key.raw)

    def verify(self, text: str, data: bytes) -> bool:
        if len(data) != 8 + 64:
            return False
        timestamp = int.from_bytes(data[:8], "big")
        if timestamp > MAX_TIMESTAMP:
            return False
        try:
            self.public_key.verify(data[8:], cosignature_message(text, timestamp))
        except InvalidSignature:
            return False
        return True


def cosignature_time(signature: Signature) -> int:
    """The POSIX time a (verified) cosignature states."""
    return int.from_bytes(signature.data[:8], "big")


@dataclass(frozen=True)
class NoteSigner:
    """Signs note texts as ``name`` with an Ed25519 key: type 0x01 (a log) or 0x04 (a cosigner, with a time)."""

    name: str
    key: SigningKey
    sig_type: int = ED25519

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.sig_type not in (ED25519, COSIGNATURE_V1):
            raise ValueError(f"unsupported signature type {self.sig_type:#04x}")

    @property
    def key_id(self) -> int:
        return key_id(self.name, self.sig_type, self.key.public.raw)

    @property
    def vkey(self) -> str:
        return vkey(self.name, self.sig_type, self.key.public.raw)

    def verifier(self) -> Verifier:
        cls = Ed25519Verifier if self.sig_type == ED25519 else CosignatureVerifier
        return cls(self.name, self.key.public)

    def sign(self, text: str, *, timestamp: int | None = None) -> Signature:
        """Raises: ValueError for a text that is not a note text, or a timestamp missing / given where it does not
        belong / out of range."""
        check_text(text)
        if self.sig_type == ED25519:
            if timestamp is not None:
                raise ValueError("a plain Ed25519 note signature carries no time")
            return Signature(self.name, self.key_id, self.key.sign(text.encode()))
        if timestamp is None or not 0 <= timestamp <= MAX_TIMESTAMP:
            raise ValueError("a cosignature needs a POSIX time between 0 and 2^63-1")
        data = timestamp.to_bytes(8, "big") + self.key.sign(cosignature_message(text, timestamp))
        return Signature(self.name, self.key_id, data)


def vkey(name: str, sig_type: int, public_key: bytes) -> str:
    check_name(name)
    encoded = base64.b64encode(bytes([sig_type]) + public_key).decode()
    return f"{name}+{key_id(name, sig_type, public_key):08x}+{encoded}"


def parse_vkey(text: str) -> Ed25519Verifier | CosignatureVerifier:
    """A verifier from a vkey string (types 0x01 and 0x04).

    Raises:
        UntrustedKey: malformed, an unsupported type, a key id that does not match, or a weak public key.
    """
    parts = text.strip().split("+", 2)  # base64 may itself contain "+"
    try:
        name, hex_id, b64 = parts
        check_name(name)
        raw = base64.b64decode(b64, validate=True)
        wanted = int(hex_id, 16)
    except (ValueError, binascii.Error, EvidenceHubError) as exc:
        raise UntrustedKey("not a verifier key (name+id+base64)") from exc
    if len(hex_id) != 8 or len(raw) != 33 or raw[0] not in (ED25519, COSIGNATURE_V1):
        raise UntrustedKey("not an Ed25519 or cosignature/v1 verifier key")
    if key_id(name, raw[0], raw[1:]) != wanted:
        raise UntrustedKey("the verifier key's id does not match its key")
    public = PublicKey.from_raw(raw[1:])
    return Ed25519Verifier(name, public) if raw[0] == ED25519 else CosignatureVerifier(name, public)


def check_text(text: str) -> None:
    """Raises: ValueError unless ``text`` is a note text: non-empty, ends in a newline, no control characters but
    newlines."""
    if not text.endswith("\n") or any(ord(c) < 0x20 and c != "\n" for c in text):
        raise ValueError("a note text ends in a newline and has no control characters but newlines")


def parse(data: bytes) -> Note:
    """Split a signed note into its text and signature lines, checking the format only (nothing is verified).

    Raises:
        DecodeError: too large, not UTF-8, control characters, no signature block, or a malformed signature line.
    """
    if len(data) > MAX_NOTE_BYTES:
        raise DecodeError(f"a note of {len(data)} bytes is over {MAX_NOTE_BYTES}")
    try:
        whole = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError("a note must be UTF-8") from exc
    if any(ord(c) < 0x20 and c != "\n" for c in whole) or not whole.endswith("\n"):
        raise DecodeError("malformed note: control characters or no final newline")
    split = whole.rfind("\n\n")
    if split < 0:
        raise DecodeError("malformed note: no blank line before the signatures")
    text, block = whole[: split + 1], whole[split + 2 :]
    lines = block.split("\n")[:-1]
    if not lines or len(lines) > MAX_SIGNATURES:
        raise DecodeError(f"a note carries 1 to {MAX_SIGNATURES} signatures, not {len(lines)}")
    signatures = []
    for line in lines:
        parts = line.split(" ")
        if len(parts) != 3 or parts[0] != DASH:
            raise DecodeError("malformed signature line")
        try:
            name = check_name(parts[1])
            raw = base64.b64decode(parts[2], validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DecodeError("malformed signature line") from exc
        if len(raw) < 5:
            raise DecodeError("malformed signature line: too short")
        signatures.append(Signature(name, int.from_bytes(raw[:4], "big"), raw[4:]))
    return Note(text, tuple(signatures))


def open_note(data: bytes, verifiers: list[Verifier] | tuple[Verifier, ...]) -> tuple[Note, tuple[Signature, ...]]:
    """The note and the signatures that verified with ``verifiers``; unknown signatures are ignored.

    Raises:
        DecodeError: a malformed note.
        InvalidSignature: a signature by a known key fails, a known key signed twice, or no known key signed.
    """
    note = parse(data)
    known = {(v.name, v.key_id): v for v in verifiers}
    verified: list[Signature] = []
    seen: set[tuple[str, int]] = set()
    for signature in note.signatures:
        verifier = known.get((signature.name, signature.key_id))
        if verifier is None:
            continue
        if (signature.name, signature.key_id) in seen:
            raise InvalidSignature("invalid signature")
        seen.add((signature.name, signature.key_id))
        if not verifier.verify(note.text, signature.data):
            raise InvalidSignature("invalid signature")
        verified.append(signature)
    if not verified:
        raise InvalidSignature("invalid signature")
    return note, tuple(verified)


def with_signatures(data: bytes, extra: list[Signature] | tuple[Signature, ...]) -> bytes:
    """The note ``data`` with ``extra`` signature lines added (a line already present is not repeated).

    Raises:
        DecodeError: ``data`` is not a note, or the result would carry too many signatures.
    """
    note = parse(data)
    lines = list(note.signatures)
    for signature in extra:
        if signature not in lines:
            lines.append(signature)
    if len(lines) > MAX_SIGNATURES:
        raise DecodeError(f"a note carries at most {MAX_SIGNATURES} signatures")
    return Note(note.text, tuple(lines)).encode()
