"""The publisher's disk full (a small tmpfs holding its data directory): uploads get a 503 and keep nothing, the
service stays up, and once space is freed the same uploads complete — nothing lost, nothing twice. Needs root (or
CAP_SYS_ADMIN) to mount the tmpfs; skipped otherwise."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.shared.local_kafka import LocalKafka
from tests.faults.harness import Hub, PublisherProcess, Row, audit, publish, publish_until_done

pytestmark = pytest.mark.kafka
SIZE = 6 << 20


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE}", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip()}): disk-full needs root")
    try:
        yield mount
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_a_full_disk_is_a_503_that_keeps_nothing_and_the_publisher_recovers_when_space_returns(
    fault_broker: LocalKafka, tmp_path: Path, small_disk: Path, report: list[Row]
) -> None:
    hub = await Hub.create(fault_broker.bootstrap, tmp_path / "hub")
    data = small_disk / "data"
    publisher = PublisherProcess(hub, data, name="publisher")
    await publisher.start()
    try:
        free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
        filler = small_disk / "filler"
        filler.write_bytes(bytes(free - (600 << 10)))  # about 600 KiB left for the publisher
        entries = hub.items(tmp_path / "files", "full", 8)
        for entry in entries:  # 300 KiB each: the disk fills up after one or two
            entry.path.write_bytes(entry.path.read_bytes() + bytes(300 << 10))
        outcomes = await publish(publisher.url, entries, tmp_path / "full.journal", concurrency=1)
        full = [o for o in outcomes if o.status == "failed"]
        assert full, "the disk was full"
        assert all(o.error.startswith("503") for o in full), [o.error for o in full]
        status, _ = await publisher.get("/healthz")
        assert status == 200, "the service stays up"
        assert list((data / "content" / "tmp").iterdir()) == [], "nothing half-written is kept"
        filler.unlink()
        await publish_until_done(publisher.url, entries, tmp_path / "full.journal")
    finally:
        assert await publisher.stop() == 0, publisher.output()[-3000:]
    row = Row("the publisher's disk full (a 6 MiB tmpfs), then space freed", runs=1, at_risk=len(full),
              note="uploads answered 503 and kept nothing; the service stayed up; all completed once space "
                   "returned")  # fmt: skip
    row.add_audit(hub, await audit(hub), [e.metadata.item_id for e in entries])
    report.append(row)
    row.assert_clean()
