"""Signed notes, checkpoints, cosignatures and tlog-proofs: the spec's own example, and every way to be wrong."""

from __future__ import annotations

import base64
from collections.abc import Callable

import pytest

from services.audit import merkle, note
from services.audit.checkpoint import Checkpoint, TlogProof, cosign, open_checkpoint, verify_tlog_proof
from services.audit.note import COSIGNATURE_V1, NoteSigner
from services.audit.tiles import TiledTree, TileNodeReader
from services.shared.errors import DecodeError, InvalidProof, InvalidSignature, UntrustedKey
from services.shared.keys import SigningKey

ORIGIN = "audit.evidence-hub.example/log"
SPEC_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
SPEC_NOTE = (
    "This is an example message.\n\n\u2014 example.com/foo "
    "Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6TfXppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n"
).encode()

LOG = NoteSigner(ORIGIN, SigningKey.generate())
WITNESS = NoteSigner("witness.example/w1", SigningKey.generate(), COSIGNATURE_V1)
OTHER_WITNESS = NoteSigner("witness.example/w2", SigningKey.generate(), COSIGNATURE_V1)


def test_the_signed_note_spec_example_verifies_and_our_key_ids_match_it() -> None:
    verifier = note.parse_vkey(SPEC_VKEY)
    parsed, verified = note.open_note(SPEC_NOTE, [verifier])
    assert parsed.text == "This is an example message.\n"
    assert verified[0].key_id == 0x530D903A
    assert verifier.vkey == SPEC_VKEY


def test_a_vkey_round_trips_and_a_wrong_id_or_type_is_refused() -> None:
    assert note.parse_vkey(LOG.vkey).key_id == LOG.key_id
    name, key_id, b64 = LOG.vkey.split("+", 2)
    with pytest.raises(UntrustedKey):
        note.parse_vkey(f"{name}+{int(key_id, 16) ^ 1:08x}+{b64}")
    with pytest.raises(UntrustedKey):
        note.parse_vkey(f"{name}+{key_id}+" + base64.b64encode(b"\x02" + base64.b64decode(b64)[1:]).decode())
    with pytest.raises(UntrustedKey):  # the identity point: a key that verifies anything
        note.parse_vkey(note.vkey("x.example/k", 1, b"\x01" + bytes(31)))


def _checkpoint(size: int = 3) -> tuple[Checkpoint, bytes]:
    tree = TiledTree()
    tree.append([f"e{i}".encode() for i in range(size)])
    cp = Checkpoint(ORIGIN, size, tree.root())
    return cp, cp.sign(LOG)


def test_checkpoint_text_is_the_c2sp_format() -> None:
    cp = Checkpoint(ORIGIN, 20852163, base64.b64decode("CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I="))
    assert cp.text() == f"{ORIGIN}\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    assert Checkpoint.parse(cp.text()) == cp
    data = cp.sign(LOG)
    assert data.decode().startswith(cp.text() + "\n\u2014 " + ORIGIN + " ")
    assert open_checkpoint(data, log=LOG.verifier()).checkpoint == cp


def _forge(data: bytes) -> bytes:
    text, sig = data.decode().rsplit(" ", 1)
    raw = bytearray(base64.b64decode(sig))
    raw[10] ^= 1
    return (text + " " + base64.b64encode(bytes(raw)).decode() + "\n").encode()


def _only_text(data: bytes) -> bytes:
    return data.decode().split("\n\n")[0].encode() + b"\n\n"


def _other_key(data: bytes) -> bytes:
    return Checkpoint.parse(data.decode().split("\n\n")[0] + "\n").sign(NoteSigner(ORIGIN, SigningKey.generate()))


def _other_origin(data: bytes) -> bytes:
    # our key, under our name, over a checkpoint whose origin line names another log
    text = Checkpoint("other.example/log", 3, Checkpoint.parse(data.decode().split("\n\n")[0] + "\n").root).text()
    return note.Note(text, (LOG.sign(text),)).encode()


def _changed_size(data: bytes) -> bytes:
    return data.replace(b"\n3\n", b"\n4\n", 1)


REJECTIONS: dict[str, tuple[Callable[[bytes], bytes], type[Exception]]] = {
    "forged signature": (_forge, InvalidSignature),
    "no signature at all": (_only_text, DecodeError),
    "signed by an unknown key of the same name": (_other_key, InvalidSignature),
    "another log's origin signed with our key": (_other_origin, InvalidSignature),
    "size changed after signing": (_changed_size, InvalidSignature),
    "not UTF-8": (lambda d: d.replace(b"log", b"l\xffg", 1), DecodeError),
    "a control character": (lambda d: d.replace(b"log", b"l\tg", 1), DecodeError),
    "a second, failing signature by the log's key": (lambda d: d + _forge(d).split(b"\n\n")[1], InvalidSignature),
    "too large": (lambda d: d + b"\xe2\x80\x94 x " + b"A" * note.MAX_NOTE_BYTES + b"\n", DecodeError),
}


@pytest.mark.parametrize("case", REJECTIONS)
def test_a_bad_checkpoint_is_refused(case: str) -> None:
    tamper, error = REJECTIONS[case]
    _, data = _checkpoint()
    with pytest.raises(error):
        open_checkpoint(tamper(data), log=LOG.verifier())


def test_unknown_extra_cosignatures_are_ignored_and_known_ones_counted() -> None:
    _, data = _checkpoint()
    stranger = NoteSigner("stranger.example/w", SigningKey.generate(), COSIGNATURE_V1)
    cosigned = note.with_signatures(data, [cosign(data, log=LOG.verifier(), last=None, proof=[], witness=stranger,
                                                  timestamp=1_700_000_000)])  # fmt: skip
    opened = open_checkpoint(cosigned, log=LOG.verifier(), witnesses=[WITNESS.verifier()])
    assert opened.cosigned_by == {}
    with pytest.raises(InvalidSignature):
        open_checkpoint(cosigned, log=LOG.verifier(), witnesses=[WITNESS.verifier()], quorum=1)
    mine = cosign(data, log=LOG.verifier(), last=None, proof=[], witness=WITNESS, timestamp=1_700_000_001)
    both = note.with_signatures(cosigned, [mine])
    opened = open_checkpoint(both, log=LOG.verifier(), witnesses=[WITNESS.verifier(), OTHER_WITNESS.verifier()],
                             quorum=1)  # fmt: skip
    assert opened.cosigned_by == {"witness.example/w1": 1_700_000_001}
    forged = note.Signature(mine.name, mine.key_id, (1_700_000_002).to_bytes(8, "big") + mine.data[8:])
    with pytest.raises(InvalidSignature):  # a cosignature whose time was changed no longer verifies
        open_checkpoint(note.with_signatures(data, [forged]), log=LOG.verifier(), witnesses=[WITNESS.verifier()])


def test_the_cosigned_message_is_the_spec_s() -> None:
    _, data = _checkpoint()
    sig = cosign(data, log=LOG.verifier(), last=None, proof=[], witness=WITNESS, timestamp=1679315147)
    text = data.decode().split("\n\n")[0] + "\n"
    WITNESS.key.public.verify(sig.data[8:], f"cosignature/v1\ntime 1679315147\n{text}".encode())
    assert sig.data[:8] == (1679315147).to_bytes(8, "big")


def test_a_witness_cosigns_only_a_consistent_larger_checkpoint() -> None:
    entries = [f"e{i}".encode() for i in range(10)]
    small, big, fork = TiledTree(), TiledTree(), TiledTree()
    files: dict[str, bytes] = {}
    small.append(entries[:4])
    for w in big.append(entries):
        files[w.tile.path] = w.data
    fork.append([*entries[:3], b"rewritten", *entries[4:]])
    old = Checkpoint(ORIGIN, 4, small.root())
    proof = merkle.consistency_proof(TileNodeReader(10, lambda t: files[t.path]), 4, 10)
    new = Checkpoint(ORIGIN, 10, big.root()).sign(LOG)
    cosign(new, log=LOG.verifier(), last=old, proof=proof, witness=WITNESS, timestamp=1)
    with pytest.raises(InvalidProof):
        cosign(Checkpoint(ORIGIN, 10, fork.root()).sign(LOG), log=LOG.verifier(), last=old, proof=proof,
               witness=WITNESS, timestamp=1)  # fmt: skip
    with pytest.raises(InvalidProof):
        cosign(Checkpoint(ORIGIN, 4, small.root()).sign(LOG), log=LOG.verifier(),
               last=Checkpoint(ORIGIN, 10, big.root()), proof=[], witness=WITNESS, timestamp=1)  # fmt: skip


def test_a_tlog_proof_round_trips_verifies_offline_and_binds_the_entry() -> None:
    entries = [f"entry {i}".encode() for i in range(300)]
    tree, files = TiledTree(), {}
    for w in tree.append(entries):
        files[w.tile.path] = w.data
    signed = Checkpoint(ORIGIN, 300, tree.root()).sign(LOG)
    reader = TileNodeReader(300, lambda t: files[t.path])
    proof = TlogProof(257, tuple(merkle.inclusion_proof(reader, 257, 300)), signed, extra=b"receipt-id")
    data = proof.encode()
    assert data.startswith(b"c2sp.org/tlog-proof@v1\nextra cmVjZWlwdC1pZA==\nindex 257\n")
    assert TlogProof.parse(data) == proof
    assert verify_tlog_proof(data, entry=entries[257], log=LOG.verifier()).checkpoint.size == 300
    with pytest.raises(InvalidProof):
        verify_tlog_proof(data, entry=entries[256], log=LOG.verifier())
    with pytest.raises(InvalidProof):
        verify_tlog_proof(data.replace(b"index 257", b"index 258"), entry=entries[257], log=LOG.verifier())
    with pytest.raises(InvalidSignature):
        verify_tlog_proof(data, entry=entries[257], log=NoteSigner(ORIGIN, SigningKey.generate()).verifier())
    with pytest.raises(DecodeError):
        TlogProof.parse(data.replace(b"index 257", b"index 0257"))
