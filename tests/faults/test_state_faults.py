"""The publisher's state lost, emptied, restored from an old copy, its WAL deleted after a SIGKILL, or damaged:
the publisher refuses to start (exit 5, one line naming the topic and both numbers) instead of signing sequence
numbers the key already used; ``evhub publisher recover`` rebuilds the state from Kafka; then nothing already
published is published again and nothing is signed twice. Before this check existed, each of these started
silently and signed from 1 (or from the copy's number) again."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from services.shared.local_kafka import LocalKafka
from tests.faults.harness import ROOT, Hub, PublisherProcess, Row, audit, publish_until_done

pytestmark = pytest.mark.kafka


def _evhub(hub: Hub, data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", "publisher", *args], env=hub.env(data_dir, 0), cwd=ROOT,
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip


def _delete(data: Path) -> None:
    for name in ("publisher.sqlite3", "publisher.sqlite3-wal", "publisher.sqlite3-shm"):
        (data / name).unlink(missing_ok=True)


def _empty(data: Path) -> None:
    _delete(data)
    (data / "publisher.sqlite3").write_bytes(b"")


def _restore(backup: Path) -> Callable[[Path], None]:
    def restore(data: Path) -> None:
        _delete(data)
        shutil.copyfile(backup, data / "publisher.sqlite3")

    return restore


def _remove_wal(data: Path) -> None:
    (data / "publisher.sqlite3-wal").unlink(missing_ok=True)
    (data / "publisher.sqlite3-shm").unlink(missing_ok=True)


async def test_lost_emptied_old_or_wal_less_state_is_refused_then_recovered_and_nothing_is_signed_twice(
    fault_broker: LocalKafka, tmp_path: Path, report: list[Row]
) -> None:
    hub = await Hub.create(fault_broker.bootstrap, tmp_path / "hub")
    data = tmp_path / "data"
    published: list[str] = []
    row = Row("state deleted / emptied / restored from an old copy / WAL deleted after SIGKILL → refused, recovered",
              note="at risk = sequence numbers Kafka holds above the state's counter (they would be signed again); "
                   "each start refused with exit 5 naming topic and numbers; `evhub publisher recover`, then "
                   "every item re-sent: all replayed")  # fmt: skip

    async def publish_more(prefix: str, n: int) -> None:
        publisher = PublisherProcess(hub, data, name=f"publisher-{prefix}")
        await publisher.start()
        try:
            entries = hub.items(tmp_path / "files", prefix, n)
            await publish_until_done(publisher.url, entries, tmp_path / f"{prefix}.journal")
            published.extend(e.metadata.item_id for e in entries)
        finally:
            assert await publisher.stop() == 0, publisher.output()[-3000:]

    await publish_more("first", 6)
    backup = tmp_path / "backup.sqlite3"
    assert _evhub(hub, data, "backup", str(backup), "--data-dir", str(data)).returncode == 0
    await publish_more("second", 6)

    async def kill_mid_batch_then_remove_wal(data_dir: Path) -> None:
        publisher = PublisherProcess(hub, data_dir, name="publisher-wal")
        await publisher.start()
        entries = hub.items(tmp_path / "files", "wal", 4)
        await publish_until_done(publisher.url, entries, tmp_path / "wal.journal")
        published.extend(e.metadata.item_id for e in entries)
        await publisher.kill()  # nothing checkpointed since: the last commits live in the WAL only
        _remove_wal(data_dir)

    damages: list[tuple[str, Callable[[Path], Awaitable[None] | None]]] = [
        ("deleted", _delete), ("emptied", _empty),
        ("restored from an old copy", _restore(backup)),
        ("WAL deleted after SIGKILL", kill_mid_batch_then_remove_wal),
    ]  # fmt: skip
    for round_, (what, damage) in enumerate(damages):
        done = damage(data)
        if done is not None:
            await done
        row.runs += 1
        code, line = await PublisherProcess(hub, data, name=f"refused-{round_}").refused()
        assert code == 5, (what, line)
        assert line.startswith("publisher: evidence."), (what, line)
        assert "signed by this key" in line, (what, line)
        assert "its counter is" in line, (what, line)
        assert "evhub publisher recover" in line, (what, line)
        numbers = re.search(r"holds sequence (\d+) signed by this key.*its counter is (\d+)", line)
        assert numbers is not None, line
        row.at_risk += int(numbers[1]) - int(numbers[2])  # numbers Kafka holds that this state would sign again
        recovered = _evhub(hub, data, "recover")
        assert recovered.returncode == 0, recovered.stdout + recovered.stderr
        # the whole collection again: everything already published is recognised, nothing new is signed
        publisher = PublisherProcess(hub, data, name=f"recovered-{round_}")
        await publisher.start()
        try:
            entries = [e for prefix in ("first", "second", "wal")
                       for e in hub.items(tmp_path / "files", prefix, 6 if prefix != "wal" else 4)
                       if e.metadata.item_id in published]  # fmt: skip
            outcomes = await publish_until_done(publisher.url, entries, tmp_path / f"again-{round_}.journal")
            assert {o.status for o in outcomes} == {"already-published"}, [o for o in outcomes if o.error]
            fresh = hub.items(tmp_path / "files", f"after-{round_}", 2)
            await publish_until_done(publisher.url, fresh, tmp_path / f"after-{round_}.journal")
            published.extend(e.metadata.item_id for e in fresh)
        finally:
            assert await publisher.stop() == 0, publisher.output()[-3000:]
    counted = await audit(hub)
    row.add_audit(hub, counted, published)
    report.append(row)
    assert counted.refused == 0
    row.assert_clean()


async def test_damaged_state_is_refused_with_exit_5_and_one_line(
    fault_broker: LocalKafka, tmp_path: Path, report: list[Row]
) -> None:
    hub = await Hub.create(fault_broker.bootstrap, tmp_path / "hub")
    data = tmp_path / "data"
    publisher = PublisherProcess(hub, data, name="publisher")
    await publisher.start()
    entries = hub.items(tmp_path / "files", "dmg", 20)
    await publish_until_done(publisher.url, entries, tmp_path / "dmg.journal")
    assert await publisher.stop() == 0, publisher.output()[-3000:]
    row = Row("state file damaged: a waiting envelope's bytes; 64 bytes of the outbox's sequence index", runs=2,
              note="refused with exit 5 (the envelope's signature; `PRAGMA integrity_check`); moved aside and "
                   "recovered")  # fmt: skip
    state_file = data / "publisher.sqlite3"
    intact = tmp_path / "intact.sqlite3"
    shutil.copyfile(state_file, intact)
    flip_envelope_byte(state_file)  # content damage no SQLite check can see
    code, line = await PublisherProcess(hub, data, name="damaged-envelope").refused()
    assert code == 5, line
    assert "no longer verifies" in line, line
    shutil.copyfile(intact, state_file)
    flip_index_bytes(state_file, "outbox_signed", 64)
    code, line = await PublisherProcess(hub, data, name="damaged").refused()
    assert code == 5, line
    assert line.startswith("publisher: publisher state"), line
    assert "damaged" in line, line
    assert "Traceback" not in PublisherProcess(hub, data, name="damaged").log.read_text()
    os.replace(state_file, data / "publisher.sqlite3.damaged")
    for suffix in ("-wal", "-shm"):
        Path(f"{state_file}{suffix}").unlink(missing_ok=True)
    recovered = _evhub(hub, data, "recover")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    publisher = PublisherProcess(hub, data, name="recovered")
    await publisher.start()
    try:
        outcomes = await publish_until_done(publisher.url, entries, tmp_path / "again.journal")
        assert {o.status for o in outcomes} == {"already-published"}
    finally:
        assert await publisher.stop() == 0, publisher.output()[-3000:]
    row.add_audit(hub, await audit(hub), [e.metadata.item_id for e in entries])
    report.append(row)
    row.assert_clean()


def flip_envelope_byte(path: Path) -> None:
    """One bit of a stored envelope flipped, and the row made to wait for delivery again (as after a lost mark)."""
    import sqlite3

    conn = sqlite3.connect(path, isolation_level=None)
    try:
        (rowid, envelope) = conn.execute("SELECT rowid, envelope FROM outbox LIMIT 1").fetchone()
        damaged = bytearray(envelope)
        damaged[len(damaged) // 3] ^= 0x04
        conn.execute("UPDATE outbox SET envelope = ?, delivered_at = NULL, partition = NULL, offset = NULL "
                     "WHERE rowid = ?", (bytes(damaged), rowid))  # fmt: skip
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        conn.close()


def flip_index_bytes(path: Path, index: str, count: int) -> None:
    """Invert ``count`` bytes at the start of the cell content of ``index``'s root page (the page header's bytes
    5 and 6 say where it begins): keys the index holds no longer match the table's rows. `quick_check`, which the
    publisher used to rely on, still says ok (asserted here); `integrity_check` does not."""
    import sqlite3

    conn = sqlite3.connect(path)
    try:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        (root,) = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = ?", (index,)).fetchone()
    finally:
        conn.close()
    page = (root - 1) * page_size
    with path.open("r+b") as f:
        f.seek(page + 5)
        content = int.from_bytes(f.read(2), "big") or 65536
        start = page + content + 8  # past the first cell's header bytes, into its key
        f.seek(start)
        data = f.read(count)
        f.seek(start)
        f.write(bytes(b ^ 0xFF for b in data))
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA quick_check").fetchone()[0] == "ok", "the damage quick_check cannot see"
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] != "ok"
    finally:
        conn.close()
