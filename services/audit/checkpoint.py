"""C2SP tlog-checkpoint, tlog-cosignature and tlog-proof: the signed statements about the audit log.

Owns:
- :class:`Checkpoint`: the note text ``<origin>\\n<size>\\n<base64 root>\\n[extension lines]``, formatted and
  parsed strictly (no leading zeros, a 32-byte root, non-empty extension lines);
- :func:`open_checkpoint`: a checkpoint note verified with the log's key (key name = origin) and, optionally, a
  quorum of witness cosignatures; unknown signatures are ignored, as the signed-note spec says;
- :func:`cosign`: what a witness does (item 6): check the new checkpoint is consistent with the last one it
  cosigned, then cosign it (``cosignature/v1``, a time);
- :class:`TlogProof`: ``c2sp.org/tlog-proof@v1`` — the offline proof (index, inclusion proof, checkpoint) that
  turns an office's receipt into evidence, and :func:`verify_tlog_proof`.

Pure: no I/O, no clock. Does not own: the signature format (``note``), the tree (``merkle``/``tiles``).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

from services.audit import merkle, note
from services.audit.note import NoteSigner, Signature, Verifier
from services.shared.errors import DecodeError, InvalidProof, InvalidSignature

TLOG_PROOF_HEADER: Final = "c2sp.org/tlog-proof@v1"
MAX_PROOF_BYTES: Final = note.MAX_NOTE_BYTES + 8 * 1024


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def text(self) -> str:
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(), *self.extensions]
        return "".join(line + "\n" for line in lines)

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """Raises: DecodeError unless ``text`` is a checkpoint body."""
        lines = text.split("\n")
        if len(lines) < 4 or lines[-1] != "" or any(line == "" for line in lines[:-1]):
            raise DecodeError("a checkpoint is at least three non-empty lines, each ending in a newline")
        origin, size_text, root_text, *extensions = lines[:-1]
        if not size_text.isascii() or not size_text.isdigit() or (size_text != "0" and size_text[0] == "0"):
            raise DecodeError(f"not a tree size: {size_text[:30]!r}")
        try:
            root = base64.b64decode(root_text, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise DecodeError("the root hash is not base64") from exc
        size = int(size_text)
        if len(root) != merkle.HASH_SIZE or size >= 1 << 63:
            raise DecodeError("a checkpoint names a 32-byte root and a size below 2^63")
        if base64.b64encode(root).decode() != root_text:
            raise DecodeError("the root hash is not canonical base64")
        return cls(origin, size, root, tuple(extensions))

    def sign(self, signer: NoteSigner) -> bytes:
        """The signed note: this checkpoint signed by the log's key (whose name must be the origin).

        Raises:
            ValueError: the signer's key name is not the origin, or the signer is not a plain Ed25519 signer.
        """
        if signer.name != self.origin or signer.sig_type != note.ED25519:
            raise ValueError("a checkpoint is signed by the log's Ed25519 key named after its origin")
        text = self.text()
        return note.Note(text, (signer.sign(text),)).encode()


@dataclass(frozen=True)
class VerifiedCheckpoint:
    checkpoint: Checkpoint
    note: bytes
    cosigned_by: dict[str, int] = field(default_factory=dict)  # witness name → the time it cosigned


def open_checkpoint(
    data: bytes, *, log: Verifier, witnesses: Sequence[Verifier] = (), quorum: int = 0
) -> VerifiedCheckpoint:
    """A checkpoint signed by ``log`` (origin = its key name) and cosigned by at least ``quorum`` of ``witnesses``.

    Raises:
        DecodeError: not a checkpoint note.
        InvalidSignature: the log's signature is missing, forged or by an unknown key, a known cosignature does not
            verify, or fewer than ``quorum`` witnesses cosigned.
    """
    if quorum > len(witnesses):
        raise ValueError(f"a quorum of {quorum} out of {len(witnesses)} witnesses can never be met")
    parsed, verified = note.open_note(data, [log, *witnesses])
    checkpoint = Checkpoint.parse(parsed.text)
    if checkpoint.origin != log.name:
        raise InvalidSignature("invalid signature")  # a checkpoint of another log, signed with this key
    if not any(s.name == log.name and s.key_id == log.key_id for s in verified):
        raise InvalidSignature("invalid signature")
    witness_ids = {(w.name, w.key_id) for w in witnesses}
    cosigned = {s.name: note.cosignature_time(s) for s in verified if (s.name, s.key_id) in witness_ids}
    if len(cosigned) < quorum:
        raise InvalidSignature("invalid signature")
    return VerifiedCheckpoint(checkpoint, data, cosigned)


def check_consistent(
    old: Checkpoint, new: Checkpoint, proof: Sequence[bytes]
) -> None:  # fmt: skip
    """Raises: InvalidProof unless ``new`` extends ``old`` (same origin, no smaller, and the proof checks out)."""
    if old.origin != new.origin:
        raise InvalidProof(f"checkpoints of two logs: {old.origin!r} and {new.origin!r}")
    if old.size == 0:
        if new.size == 0 and new.root != old.root:
            raise InvalidProof("two different roots for the empty tree", index=0)
        return
    merkle.verify_consistency(old.size, new.size, old.root, new.root, proof)


def cosign(
    data: bytes, *, log: Verifier, last: Checkpoint | None, proof: Sequence[bytes], witness: NoteSigner,
    timestamp: int,
) -> Signature:  # fmt: skip
    """A witness's cosignature on checkpoint note ``data``, given only if it is signed by ``log`` and consistent
    with ``last`` (the largest checkpoint this witness cosigned before, or None) through ``proof``.

    Raises:
        DecodeError, InvalidSignature: ``data`` is not a checkpoint signed by ``log``.
        InvalidProof: it is inconsistent with ``last``, or smaller (a witness never goes back).
        ValueError: ``witness`` is not a cosignature/v1 signer.
    """
    if witness.sig_type != note.COSIGNATURE_V1:
        raise ValueError("a witness cosigns with a cosignature/v1 (type 0x04) key")
    verified = open_checkpoint(data, log=log)
    if last is not None:
        check_consistent(last, verified.checkpoint, proof)
    return witness.sign(verified.checkpoint.text(), timestamp=timestamp)


@dataclass(frozen=True)
class TlogProof:
    """``c2sp.org/tlog-proof@v1``: the index of an entry, its inclusion proof, and the checkpoint (verbatim)."""

    index: int
    proof: tuple[bytes, ...]
    checkpoint: bytes
    extra: bytes | None = None

    def encode(self) -> bytes:
        lines = [TLOG_PROOF_HEADER]
        if self.extra is not None:
            lines.append("extra " + base64.b64encode(self.extra).decode())
        lines.append(f"index {self.index}")
        lines += [base64.b64encode(h).decode() for h in self.proof]
        return ("\n".join(lines) + "\n\n").encode() + self.checkpoint

    @classmethod
    def parse(cls, data: bytes) -> TlogProof:
        """Raises: DecodeError unless ``data`` is a tlog-proof (the checkpoint is not verified here)."""
        if len(data) > MAX_PROOF_BYTES:
            raise DecodeError(f"a tlog proof of {len(data)} bytes is over {MAX_PROOF_BYTES}")
        head, sep, checkpoint = data.partition(b"\n\n")
        if not sep:
            raise DecodeError("a tlog proof has a blank line before its checkpoint")
        try:
            lines = head.decode("ascii").split("\n")
        except UnicodeDecodeError as exc:
            raise DecodeError("a tlog proof's header is ASCII") from exc
        if lines[0] != TLOG_PROOF_HEADER:
            raise DecodeError(f"not a {TLOG_PROOF_HEADER} proof")
        rest = lines[1:]
        extra = None
        try:
            if rest and rest[0].startswith("extra "):
                extra = base64.b64decode(rest.pop(0)[6:], validate=True)
            if not rest or not rest[0].startswith("index "):
                raise DecodeError("a tlog proof names the entry's index")
            index_text = rest.pop(0)[6:]
            if not index_text.isdigit() or (index_text != "0" and index_text[0] == "0") or len(index_text) > 19:
                raise DecodeError("not an entry index")
            if len(rest) > 64:
                raise DecodeError("an inclusion proof has at most 64 hashes")
            proof = tuple(base64.b64decode(line, validate=True) for line in rest)
        except (binascii.Error, ValueError) as exc:
            raise DecodeError("malformed tlog proof") from exc
        if any(len(h) != merkle.HASH_SIZE for h in proof):
            raise DecodeError("an inclusion proof is made of 32-byte hashes")
        return cls(int(index_text), proof, checkpoint, extra)


def verify_tlog_proof(
    data: bytes, *, entry: bytes, log: Verifier, witnesses: Sequence[Verifier] = (), quorum: int = 0
) -> VerifiedCheckpoint:
    """Check that ``entry`` (the leaf's bytes) is in the log at the proof's index, under a checkpoint signed by
    ``log`` and cosigned by ``quorum`` of ``witnesses`` (the tlog-proof spec's four steps).

    Raises:
        DecodeError: not a tlog proof / checkpoint.
        InvalidSignature: the checkpoint's signatures fail the policy.
        InvalidProof: the inclusion proof does not bind the entry to the checkpoint's root.
    """
    proof = TlogProof.parse(data)
    verified = open_checkpoint(proof.checkpoint, log=log, witnesses=witnesses, quorum=quorum)
    cp = verified.checkpoint
    merkle.verify_inclusion(proof.index, cp.size, merkle.leaf_hash(entry), proof.proof, cp.root)
    return verified
