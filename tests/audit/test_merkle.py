"""RFC 6962 hashing and proofs: transparency-dev/merkle's golden vectors, and every proof we generate verifies."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from services.audit import merkle
from services.shared.errors import InvalidProof

VECTORS = Path(__file__).resolve().parents[1] / "vectors" / "merkle"


def _load(kind: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        (str(p.relative_to(VECTORS / kind)), json.loads(p.read_text()))
        for p in sorted((VECTORS / kind).rglob("*.json"))
    ]


def _b(text: str) -> bytes:
    return base64.b64decode(text)


class ListReader:
    """Perfect-subtree hashes straight from a list of leaf hashes (the reference the tiles must agree with)."""

    def __init__(self, leaves: list[bytes]) -> None:
        self.leaves = leaves

    def node(self, level: int, index: int) -> bytes:
        lo = index << level
        assert lo + (1 << level) <= len(self.leaves)
        return merkle.root_of(self.leaves[lo : lo + (1 << level)])


def test_the_vectors_are_there() -> None:
    assert len(_load("inclusion")) > 90
    assert len(_load("consistency")) > 90


@pytest.mark.parametrize(("name", "v"), _load("inclusion"), ids=lambda x: x if isinstance(x, str) else "")
def test_inclusion_vectors(name: str, v: dict[str, Any]) -> None:
    args = (v["leafIdx"], v["treeSize"], _b(v["leafHash"]), [_b(h) for h in v["proof"] or []], _b(v["root"]))
    if v["wantErr"]:
        with pytest.raises(InvalidProof):
            merkle.verify_inclusion(*args)
    else:
        merkle.verify_inclusion(*args)


@pytest.mark.parametrize(("name", "v"), _load("consistency"), ids=lambda x: x if isinstance(x, str) else "")
def test_consistency_vectors(name: str, v: dict[str, Any]) -> None:
    args = (v["size1"], v["size2"], _b(v["root1"]), _b(v["root2"]), [_b(h) for h in v["proof"] or []])
    if v["wantErr"]:
        with pytest.raises(InvalidProof):
            merkle.verify_consistency(*args)
    else:
        merkle.verify_consistency(*args)


def test_rfc6962_hashes_of_the_empty_tree_and_one_empty_leaf() -> None:
    assert merkle.EMPTY_ROOT.hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    assert merkle.leaf_hash(b"").hex() == "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"


def test_every_generated_proof_verifies_and_no_other_leaf_or_size_passes() -> None:
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(70)]
    reader = ListReader(leaves)
    roots = [merkle.root_of(leaves[:n]) for n in range(len(leaves) + 1)]
    for size in range(1, len(leaves) + 1):
        assert merkle.tree_root(reader, size) == roots[size]
        for index in range(size):
            proof = merkle.inclusion_proof(reader, index, size)
            merkle.verify_inclusion(index, size, leaves[index], proof, roots[size])
            with pytest.raises(InvalidProof):
                merkle.verify_inclusion(index, size, leaves[(index + 1) % len(leaves)], proof, roots[size])
        for size1 in range(size + 1):
            proof = merkle.consistency_proof(reader, size1, size)
            if size1 == 0:
                assert proof == []
                continue
            merkle.verify_consistency(size1, size, roots[size1], roots[size], proof)
            if 0 < size1 < size:
                with pytest.raises(InvalidProof):
                    merkle.verify_consistency(size1, size, roots[size1 - 1], roots[size], proof)
                with pytest.raises(InvalidProof):
                    merkle.verify_consistency(size1, size, roots[size1], roots[size], proof[:-1])
                with pytest.raises(InvalidProof):
                    merkle.verify_consistency(size1, size, roots[size1], roots[size], [*proof, leaves[0]])


def test_a_proof_of_the_wrong_length_is_refused_before_chaining() -> None:
    leaves = [merkle.leaf_hash(bytes([i])) for i in range(8)]
    proof = merkle.inclusion_proof(ListReader(leaves), 3, 8)
    with pytest.raises(InvalidProof, match="has 4 hashes, not 3") as info:
        merkle.verify_inclusion(3, 8, leaves[3], [*proof, proof[0]], merkle.root_of(leaves))
    assert info.value.index == 3
