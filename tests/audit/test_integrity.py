"""CopyCheck and SubsetCheck: a copy of the log checked against its signed checkpoint, every fault named by index
and told apart — an altered entry, a deleted or inserted one, an altered tile, a rewritten history."""

from __future__ import annotations

import pytest

from services.audit.checkpoint import Checkpoint
from services.audit.integrity import CopyCheck, Finding, SubsetCheck, bundles, tiles_for_entries, upper_tiles
from services.audit.tiles import ENTRIES, TILE_WIDTH, Tile, TiledTree, bundle_bytes, tiles_for_size

ORIGIN = "test.example/log"


def _log(n: int, *, salt: bytes = b"") -> tuple[list[bytes], dict[Tile, bytes], Checkpoint]:
    entries = [salt + f"entry {i:07d} ".encode() * 3 for i in range(n)]
    tree = TiledTree()
    stored: dict[Tile, bytes] = {}
    for i in range(0, n, 1000):  # integrations of 1,000, as the service would write them
        for write in tree.append(entries[i : i + 1000]):
            stored[write.tile] = write.data
    return entries, stored, Checkpoint(ORIGIN, n, tree.root())


def _check(entries: list[bytes], stored: dict[Tile, bytes], cp: Checkpoint, *, earlier: Checkpoint | None = None,
           bundle_override: dict[int, bytes] | None = None) -> list[Finding]:  # fmt: skip
    upper = {t: stored[t] for t in upper_tiles(cp.size) if t in stored}
    check = CopyCheck(cp, upper=upper, earlier=earlier)
    for b in bundles(cp.size):
        data = (bundle_override or {}).get(b.index) or bundle_bytes(entries[b.index * TILE_WIDTH :][: b.width])
        check.add(data, stored[Tile(0, b.index, b.width)])
    return check.finish()


def _kinds(findings: list[Finding]) -> list[tuple[str, int | None]]:
    return [(f.kind, f.index) for f in findings]


@pytest.mark.parametrize("n", [1, 255, 256, 257, 600, 65_536 + 300])
def test_an_intact_copy_has_no_findings(n: int) -> None:
    entries, stored, cp = _log(n)
    assert _check(entries, stored, cp) == []


def test_one_changed_byte_in_an_entry_names_its_index() -> None:
    entries, stored, cp = _log(600)
    changed = list(entries)
    changed[300] = changed[300][:-1] + b"X"
    assert _kinds(_check(changed, stored, cp)) == [("entry-changed", 300)]


def test_an_altered_leaf_tile_is_told_apart_from_an_altered_entry() -> None:
    entries, stored, cp = _log(600)
    for tile, index in ((Tile(0, 0), 77), (Tile(0, 2, 600 - 512), 512 + 9)):
        data = bytearray(stored[tile])
        data[(index % 256) * 32 + 5] ^= 1
        findings = _check(entries, {**stored, tile: bytes(data)}, cp)
        assert _kinds(findings) == [("tile-changed", index)]
        assert "the entries hash to the signed root" in findings[0].detail


def test_an_altered_upper_tile_is_named() -> None:
    entries, stored, cp = _log(65_536 + 300)
    tile = Tile(1, 0)
    data = bytearray(stored[tile])
    data[3 * 32] ^= 1
    assert _kinds(_check(entries, {**stored, tile: bytes(data)}, cp)) == [("tile-changed", 3 * 256)]


def test_a_deleted_and_an_inserted_entry_are_named() -> None:
    entries, stored, cp = _log(600)
    first = entries[:256]
    deleted = bundle_bytes(first[:40] + first[41:])
    assert _kinds(_check(entries, stored, cp, bundle_override={0: deleted})) == [("entry-deleted", 40)]
    inserted = bundle_bytes([*first[:7], entries[3], *first[7:]])
    assert _kinds(_check(entries, stored, cp, bundle_override={0: inserted})) == [("entry-inserted", 7)]
    truncated = bundle_bytes(first)[:-3]
    findings = _check(entries, stored, cp, bundle_override={0: truncated})
    assert ("bundle-malformed", 255) in _kinds(findings)


def test_a_copy_that_matches_neither_way_says_so_and_lists_where() -> None:
    entries, stored, cp = _log(600)
    changed = list(entries)
    changed[10] = b"forged"
    tile = Tile(0, 1)
    data = bytearray(stored[tile])
    data[0] ^= 1
    findings = _check(changed, {**stored, tile: bytes(data)}, cp)
    assert ("root-mismatch", None) in _kinds(findings)
    assert {("entry-changed", 10), ("entry-changed", 256)} <= set(_kinds(findings))


def test_a_rewritten_history_is_found_from_the_entries_themselves() -> None:
    entries, stored, cp = _log(600)
    _, _, earlier = _log(300, salt=b"other ")  # what the auditor saw before: another first 300 entries
    assert _kinds(_check(entries, stored, cp, earlier=earlier)) == [("history-rewritten", 300)]
    _, _, genuine = _log(300)
    assert _check(entries, stored, cp, earlier=genuine) == []


def test_subset_check_verifies_picked_entries_against_the_signed_root() -> None:
    entries, stored, cp = _log(65_536 + 300)
    picked = [0, 5, 60_000, 65_536 + 299]
    needed = {*upper_tiles(cp.size), *tiles_for_size(cp.size), *tiles_for_entries(picked, cp.size)}
    tiles = {t: stored[t] for t in needed if t.level != ENTRIES}
    check = SubsetCheck(cp, tiles)
    assert check.root() is None
    assert [check.entry(i, entries[i]) for i in picked] == [None] * 4
    assert _kinds([f for f in [check.entry(5, b"forged")] if f]) == [("entry-changed", 5)]
    bad = dict(tiles)
    t0 = Tile(0, 0)
    bad[t0] = bytes([bad[t0][0] ^ 1]) + bad[t0][1:]
    finding = SubsetCheck(cp, bad).entry(5, entries[5])
    assert finding is not None
    assert finding.kind == "tile-changed"
    edge = Tile(0, cp.size // 256, cp.size % 256)
    bad = {**tiles, edge: bytes(32) + tiles[edge][32:]}
    root = SubsetCheck(cp, bad).root()
    assert root is not None
    assert root.kind == "root-mismatch"
