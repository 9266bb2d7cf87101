"""docs/security.md, followed by hand: a receipt from the running service verified with hashlib, base64 and plain
`cryptography` only — no Evidence Hub code decides anything here (the service is only started with it)."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from services.audit.note import NoteSigner
from services.shared.avro import AvroCodec
from services.shared.cluster import KafkaTarget
from services.shared.keys import SigningKey
from tests.audit import support
from tests.audit.support import ORIGIN

pytestmark = pytest.mark.kafka


def _verify_checkpoint(note: bytes, vkey: str) -> tuple[str, int, bytes]:
    """The docs' recipe: split at the blank line, match name and key id, Ed25519 over the text."""
    name, key_id_hex, material = vkey.split("+", 2)
    raw = base64.b64decode(material)
    assert raw[0] == 0x01
    assert hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4].hex() == key_id_hex
    text, _, signatures = note.decode().rpartition("\n\n")
    text += "\n"
    verified = False
    for line in signatures.splitlines():
        dash, key_name, sig = line.split(" ")
        assert dash == "\u2014"
        blob = base64.b64decode(sig)
        if key_name == name and blob[:4].hex() == key_id_hex:
            Ed25519PublicKey.from_public_bytes(raw[1:]).verify(blob[4:], text.encode())  # raises if forged
            verified = True
    assert verified
    origin, size, root = text.splitlines()[:3]
    assert origin == name
    return origin, int(size), base64.b64decode(root)


def _node(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _inclusion_root(index: int, size: int, leaf: bytes, proof: list[bytes]) -> bytes:
    """RFC 9162 §2.1.3.2 as the docs spell it out."""
    fn, sn, r = index, size - 1, leaf
    for p in proof:
        assert sn != 0
        if fn & 1 or fn == sn:
            r = _node(p, r)
            while not fn & 1 and fn != 0:
                fn, sn = fn >> 1, sn >> 1
        else:
            r = _node(r, p)
        fn, sn = fn >> 1, sn >> 1
    assert sn == 0
    return r


async def test_a_receipt_verifies_by_hand_as_the_docs_say(
    kafka: KafkaTarget, codec: AvroCodec, topic_name: str, tmp_path: Path
) -> None:
    pki = support.make_pki(tmp_path / "pki")
    signer = NoteSigner(ORIGIN, SigningKey.generate())
    topic, dead = await support.audit_topics(kafka.bootstrap, topic_name)
    entries = [support.entry(n) for n in range(777)]
    await support.produce(
        kafka.bootstrap, topic, [support.batch(codec, entries[i : i + 100]) for i in range(0, 777, 100)]
    )
    settings = support.settings_for(tmp_path, topic, dead, pki)
    async with support.running(settings, bootstrap=kafka.bootstrap, signer=signer, pki=pki) as log:

        async def all_in() -> bool:
            async with log.client("auditor") as http, http.get("/healthz") as r:
                return r.status == 200 and (await r.json())["size"] == 777

        await support.wait_for(all_in, what="777 entries")
        mine = entries[500]
        async with log.client(mine["office"]) as http, http.get(f"/v1/log/receipt/{mine['entry_id']}") as r:
            receipt = await r.read()
    head, _, note = receipt.partition(b"\n\n")
    lines = head.decode().splitlines()
    assert lines[0] == "c2sp.org/tlog-proof@v1"
    entry = base64.b64decode(lines[1].removeprefix("extra "))
    assert mine["entry_id"].encode() in entry  # the entry the office holds a receipt for
    index = int(lines[2].removeprefix("index "))
    proof = [base64.b64decode(x) for x in lines[3:]]
    _, size, root = _verify_checkpoint(note, signer.vkey)
    assert (index, size) == (500, 777)
    assert _inclusion_root(index, size, hashlib.sha256(b"\x00" + entry).digest(), proof) == root
    assert _inclusion_root(index, size, hashlib.sha256(b"\x00" + entry + b"x").digest(), proof) != root
