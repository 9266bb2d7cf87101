"""RFC 6962 / RFC 9162 Merkle trees: hashing, inclusion and consistency proofs, generated and verified.

Owns: the leaf and node hashes (``SHA-256(0x00 || leaf)``, ``SHA-256(0x01 || left || right)``), the root of a
list of leaves, proof generation from any source of perfect-subtree hashes (a :class:`NodeReader`, e.g. tiles),
and proof verification. Verification checks a proof's length against the one the tree shape dictates *before*
chaining any hash (sigstore-python's ``_internal/merkle.py`` and transparency-dev/merkle do the same), so a
truncated or padded proof is refused rather than chained.

Pure: no I/O, no clock. Does not own: where hashes are stored (``tiles``), what a checkpoint is (``checkpoint``).
Every failure raises :class:`InvalidProof`; ``index`` names the leaf or size at fault where there is one.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final, Protocol

from services.shared.errors import InvalidProof

HASH_SIZE: Final = 32
#: The root of the empty tree: SHA-256 of nothing (RFC 9162 §2.1.1).
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()


def leaf_hash(data: bytes) -> bytes:
    return hashlib.sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return hashlib.sha256(b"\x01" + left + right).digest()


def _split(n: int) -> int:
    """The largest power of two strictly below ``n`` (n ≥ 2): where RFC 6962 splits a range of n leaves."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(hashes: Sequence[bytes]) -> bytes:
    """The Merkle Tree Hash over ``hashes`` taken as the leaf hashes (or as the roots of equal perfect subtrees).

    Iterative, bottom-up: pairs are hashed level by level and an odd last node is carried up unchanged, which is
    exactly RFC 6962's split at the largest power of two.
    """
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        nxt = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])
        level = nxt
    return level[0]


class NodeReader(Protocol):
    """Hashes of perfect subtrees: ``node(level, index)`` covers leaves ``[index·2^level, (index+1)·2^level)``.

    Callers only ask for nodes wholly inside the tree size they are proving; a reader raises if it lacks one.
    """

    def node(self, level: int, index: int) -> bytes: ...


def range_hash(reader: NodeReader, lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) for a range that starts where RFC 6962 recursion can start (``lo`` a multiple of a power of
    two at least ``hi - lo``), built from perfect subtrees."""
    n = hi - lo
    if n <= 0:
        raise ValueError(f"empty range [{lo}, {hi})")
    if n & (n - 1) == 0:
        level = n.bit_length() - 1
        return reader.node(level, lo >> level)
    k = _split(n)
    return node_hash(range_hash(reader, lo, lo + k), range_hash(reader, lo + k, hi))


def tree_root(reader: NodeReader, size: int) -> bytes:
    return EMPTY_ROOT if size == 0 else range_hash(reader, 0, size)


def _check_size(size: int) -> None:
    if size < 0 or size >= 1 << 63:
        raise InvalidProof(f"tree size {size} is out of range", index=size)


def inclusion_proof(reader: NodeReader, index: int, size: int) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of ``size`` leaves (RFC 9162 §2.1.3.1), leaf's sibling first.

    Raises:
        InvalidProof: ``index`` is not a leaf of that tree.
    """
    _check_size(size)
    if not 0 <= index < size:
        raise InvalidProof(f"leaf {index} is not in a tree of size {size}", index=index)
    inner = (index ^ (size - 1)).bit_length()
    proof = []
    for level in range(inner):
        sibling = (index >> level) ^ 1
        lo = sibling << level
        proof.append(range_hash(reader, lo, min(lo + (1 << level), size)))
    for level in range(inner, size.bit_length()):
        if (index >> level) & 1:
            proof.append(reader.node(level, (index >> level) ^ 1))
    return proof


def consistency_proof(reader: NodeReader, size1: int, size2: int) -> list[bytes]:
    """The proof that the tree of ``size1`` leaves is a prefix of the tree of ``size2`` (RFC 9162 §2.1.4.1).

    Raises:
        InvalidProof: ``size1 > size2``.
    """
    _check_size(size1)
    _check_size(size2)
    if size1 > size2:
        raise InvalidProof(f"no consistency proof from size {size1} down to {size2}", index=size1)
    if size1 == 0 or size1 == size2:
        return []
    proof: list[bytes] = []
    _subproof(reader, size1, 0, size2, True, proof)
    return proof


def _subproof(reader: NodeReader, m: int, lo: int, hi: int, complete: bool, out: list[bytes]) -> None:
    n = hi - lo
    if m == n:
        if not complete:
            out.append(range_hash(reader, lo, hi))
        return
    k = _split(n)
    if m <= k:
        _subproof(reader, m, lo, lo + k, complete, out)
        out.append(range_hash(reader, lo + k, hi))
    else:
        _subproof(reader, m - k, lo + k, hi, False, out)
        out.append(range_hash(reader, lo, lo + k))


def _check_hashes(*hashes: bytes) -> None:
    for h in hashes:
        if len(h) != HASH_SIZE:
            raise InvalidProof(f"a hash of {len(h)} bytes, not {HASH_SIZE}")


def _chain_inner(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        seed = node_hash(seed, h) if (index >> i) & 1 == 0 else node_hash(h, seed)
    return seed


def _chain_inner_right(seed: bytes, proof: Sequence[bytes], index: int) -> bytes:
    for i, h in enumerate(proof):
        if (index >> i) & 1:
            seed = node_hash(h, seed)
    return seed


def _chain_border_right(seed: bytes, proof: Sequence[bytes]) -> bytes:
    for h in proof:
        seed = node_hash(h, seed)
    return seed


def _decompose(index: int, size: int) -> tuple[int, int]:
    """(inner, border): the proof's hashes below the point where the leaf's path leaves the right edge, and the
    left siblings above it."""
    inner = (index ^ (size - 1)).bit_length()
    return inner, (index >> inner).bit_count()


def root_from_inclusion_proof(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root that ``proof`` implies for leaf hash ``leaf`` at ``index`` in a tree of ``size``.

    Raises:
        InvalidProof: index out of range, a hash of the wrong length, or a proof of the wrong length.
    """
    _check_size(size)
    if not 0 <= index < size:
        raise InvalidProof(f"leaf {index} is not in a tree of size {size}", index=index)
    _check_hashes(leaf, *proof)
    inner, border = _decompose(index, size)
    if len(proof) != inner + border:
        raise InvalidProof(f"inclusion proof for leaf {index} has {len(proof)} hashes, not {inner + border}",
                           index=index)  # fmt: skip
    return _chain_border_right(_chain_inner(leaf, proof[:inner], index), proof[inner:])


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """Raises: InvalidProof unless ``proof`` proves leaf hash ``leaf`` at ``index`` under ``root``."""
    _check_hashes(root)
    if root_from_inclusion_proof(index, size, leaf, proof) != root:
        raise InvalidProof(f"inclusion proof for leaf {index} does not lead to the root of size {size}", index=index)


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]) -> None:
    """Raises: InvalidProof unless ``proof`` shows the tree (size1, root1) is a prefix of (size2, root2); also for
    ``size1 == 0``, which proves nothing (callers with no earlier tree skip the check)."""
    _check_size(size1)
    _check_size(size2)
    if size1 > size2:
        raise InvalidProof(f"size {size1} is larger than {size2}: a log never shrinks", index=size1)
    if size1 == 0:
        # Every tree extends the empty one, so such a proof proves nothing; transparency-dev/merkle's vectors (and
        # Go's checker) refuse it, and a caller with no earlier checkpoint simply has nothing to check.
        raise InvalidProof("a consistency check against the empty tree is meaningless", index=0)
    if size1 == size2:
        if proof:
            raise InvalidProof("equal sizes need an empty consistency proof", index=size1)
        if root1 != root2:
            raise InvalidProof(f"two different roots for size {size1}", index=size1)
        return
    if not proof:
        raise InvalidProof(f"empty consistency proof from {size1} to {size2}", index=size1)
    _check_hashes(root1, root2, *proof)
    # Skip the levels where size1's subtree is complete: its root is node (level, index) of both trees.
    level = ((size1 & -size1).bit_length()) - 1
    index = (size1 - 1) >> level
    inner, border = _decompose(index, ((size2 - 1) >> level) + 1)
    seed, rest = (root1, list(proof)) if index == 0 else (proof[0], list(proof[1:]))
    if len(rest) != inner + border:
        want = inner + border + (0 if index == 0 else 1)
        raise InvalidProof(f"consistency proof from {size1} to {size2} has {len(proof)} hashes, not {want}",
                           index=size1)  # fmt: skip
    hash1 = _chain_border_right(_chain_inner_right(seed, rest[:inner], index), rest[inner:])
    if hash1 != root1:
        raise InvalidProof(f"consistency proof does not lead to the root of size {size1}", index=size1)
    hash2 = _chain_border_right(_chain_inner(seed, rest[:inner], index), rest[inner:])
    if hash2 != root2:
        raise InvalidProof(f"consistency proof does not lead to the root of size {size2}", index=size2)
