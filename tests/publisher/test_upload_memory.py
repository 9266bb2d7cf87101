"""A large upload streams through the publisher with bounded memory: ``python -m services.publisher`` as its own
process over mutual TLS, ``evhub publish``'s client sending a 256 MiB file; the publisher's resident set (VmHWM
from before the upload to its end, ``/proc/<pid>/status``) grows by less than 64 MiB. A memory assertion, not a
timed one."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from bench.publisher_rig import PublisherRig, make_rig
from bench.scenarios_hub import sample_metadata
from services.cli.manifest import Entry
from services.cli.publish import Journal, publish_all
from services.publisher.core import parse_metadata
from services.shared.cluster import KafkaTarget

pytestmark = pytest.mark.kafka
MIB = 1 << 20
SIZE_MIB = 256
BOUND_MIB = 64


@pytest.fixture
async def rig(kafka: KafkaTarget, tmp_path: Path) -> AsyncIterator[PublisherRig]:
    rig = await make_rig(kafka.bootstrap, work=tmp_path / "rig")
    try:
        await rig.start()
        yield rig
    finally:
        await rig.stop()


async def test_a_256_mib_upload_grows_the_publishers_memory_by_less_than_64_mib(rig: PublisherRig,
                                                                                 tmp_path: Path) -> None:  # fmt: skip
    video = tmp_path / "video.mkv"
    with video.open("wb") as out:
        out.write(b"\x1a\x45\xdf\xa3")  # Matroska
        for _ in range(SIZE_MIB):
            out.write(os.urandom(MIB))
    meta = parse_metadata({**sample_metadata("SDG-LARGE-1", [rig.jurisdiction], 1), "kind": "VIDEO",
                           "file_name": "video.mkv"})  # fmt: skip
    before = rig.rss_kib()
    rig.reset_peak()
    [outcome] = await publish_all([Entry(video, meta, 1)], url=rig.url, ssl_context=rig.client_ssl(),
                                  journal=Journal(tmp_path / "journal.jsonl"), concurrency=1)  # fmt: skip
    growth_mib = (rig.peak_kib() - before) / 1024
    assert outcome.status == "published", outcome.error
    assert outcome.size == video.stat().st_size
    stored = rig.content_dir / "sha256" / outcome.sha256[:2] / outcome.sha256
    assert stored.stat().st_size == video.stat().st_size
    assert growth_mib < BOUND_MIB, f"the publisher's resident set grew by {growth_mib:.1f} MiB"
