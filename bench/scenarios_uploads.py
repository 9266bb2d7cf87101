"""Uploads at disk speed (issue 12, item 4): ``evhub publish``'s own client against a real publisher process over
mutual TLS, each next to writing the same bytes to the same disk in the same run.

Owns:
- ``disk-write-fsync``: the baseline for one large file — N MiB written in 1 MiB chunks to a temporary file in a
  directory laid out like the publisher's content store (same file system), fsynced, renamed, the directory fsynced;
- ``hub-upload-large``: one file of N MiB (2 GiB; 8 MiB under ``--quick``) through ``services.cli.publish``
  (hashing, then streaming it as a multipart upload with ``Repr-Digest``) into ``python -m services.publisher``:
  until the publisher answers 201 (stored, signed, acknowledged by Kafka). MiB/s, against ``disk-write-fsync``;
  the shape column reports the **publisher process's** resident-set growth during the upload (VmHWM after minus VmRSS
  before) and its CPU time per MiB;
- ``disk-write-files``: the baseline for many small files — the same files written one at a time, each fsynced and
  renamed into place with its directory fsynced (what storing them naively costs on this disk);
- ``hub-upload-small-files``: N small files (2-20 KiB; 10,000, 200 under ``--quick``) through the same client at
  its default concurrency: files/s end to end, against ``disk-write-files``.

Every call uploads bytes the publisher has not seen (a counter is written into each file untimed), so nothing is a
replay or a stored-once shortcut. Content stored by a call is removed after it, untimed, to bound the disk used.

Does not own: the publisher process (``bench.publisher_rig``) or the client (``services.cli.publish``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Final

from bench.harness import Context, scenario
from bench.publisher_rig import PublisherRig, make_rig, topics_of
from bench.scenarios_hub import sample_metadata
from services.cli.manifest import Entry
from services.cli.publish import DEFAULT_CONCURRENCY, Journal, Outcome, publish_all
from services.publisher.core import parse_metadata
from services.shared.durable_files import sync_dir

MIB: Final = 1 << 20
SMALL_MIN, SMALL_MAX = 2 << 10, 20 << 10
MKV: Final = b"\x1a\x45\xdf\xa3"  # Matroska: the large file is a "video"
PNG: Final = b"\x89PNG\r\n\x1a\n"


def _disk_dir(ctx: Context) -> Path:
    """A temporary directory like the publisher's content store's own (``<data>/content/tmp``), same file system."""
    work = Path(tempfile.mkdtemp(prefix="evhub-bench-disk-"))
    tmp = work / "publisher" / "content" / "tmp"
    tmp.mkdir(parents=True)
    ctx.state.update(work=work, tmp=tmp)
    return tmp


async def _disk_setup(ctx: Context) -> None:
    _disk_dir(ctx)
    ctx.state["chunk"] = os.urandom(MIB)


async def _disk_teardown(ctx: Context) -> None:
    shutil.rmtree(ctx.state["work"], ignore_errors=True)


@scenario(name="disk-write-fsync", unit="MiB/s", events=2048, quick_events=8, record_size=0, setup=_disk_setup,
          teardown=_disk_teardown)  # fmt: skip
async def disk_write_fsync(ctx: Context) -> int:
    """N MiB in 1 MiB chunks to a temporary file beside the content store's, fsynced and renamed: the disk's rate."""
    tmp: Path = ctx.state["tmp"]
    chunk: bytes = ctx.state["chunk"]
    final = tmp.parent / "written"
    with ctx.timed():
        with (tmp / "in-disk").open("wb") as out:
            for _ in range(ctx.events):
                out.write(chunk)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp / "in-disk", final)
        sync_dir(final.parent)
    final.unlink()
    ctx.shape = f"1 file x {ctx.events:,} MiB"
    return ctx.events


async def _rig_setup(ctx: Context) -> PublisherRig:
    rig = await make_rig(ctx.bootstrap)
    await rig.start()
    ctx.state.update(rig=rig, round=0, journal=rig.work / "journal.jsonl")
    return rig


async def _rig_teardown(ctx: Context) -> None:
    rig: PublisherRig = ctx.state["rig"]
    await rig.stop()
    from bench.scenarios_hub import _delete_topics

    await _delete_topics(ctx, topics_of(rig))
    shutil.rmtree(rig.work, ignore_errors=True)


def _forget_stored(rig: PublisherRig) -> None:
    """Remove what the publisher stored (untimed): the next call's bytes are new anyway; this bounds the disk."""
    shutil.rmtree(rig.content_dir / "sha256", ignore_errors=True)
    (rig.content_dir / "sha256").mkdir(exist_ok=True)


def _check(outcomes: list[Outcome]) -> None:
    failed = [o for o in outcomes if o.status != "published"]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(outcomes)} uploads not published; first: {failed[0]}")


async def _publish(ctx: Context, entries: list[Entry], concurrency: int) -> list[Outcome]:
    rig: PublisherRig = ctx.state["rig"]
    ctx.state["journal"].unlink(missing_ok=True)
    return await publish_all(entries, url=rig.url, ssl_context=rig.client_ssl(), journal=Journal(ctx.state["journal"]),
                             concurrency=concurrency)  # fmt: skip


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text(encoding="ascii").rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


# -- one large file ----------------------------------------------------------------------------------------------
async def _large_setup(ctx: Context) -> None:
    rig = await _rig_setup(ctx)
    source = rig.work / "evidence" / "video.mkv"
    source.parent.mkdir()
    with source.open("wb") as out:
        out.write(MKV)
        for _ in range(ctx.events):
            out.write(os.urandom(MIB))
    ctx.state.update(source=source, growth_kib=0, publisher_cpu=[])


@scenario(name="hub-upload-large", unit="MiB/s", baseline="disk-write-fsync", events=2048, quick_events=8,
          record_size=0, setup=_large_setup, teardown=_rig_teardown)  # fmt: skip
async def hub_upload_large(ctx: Context) -> int:
    """One large file through `evhub publish`'s client into the publisher process over mTLS, until 201."""
    rig: PublisherRig = ctx.state["rig"]
    ctx.state["round"] += 1
    source: Path = ctx.state["source"]
    with source.open("r+b") as out:  # new bytes, a new digest: never a replay
        out.seek(len(MKV))
        out.write(ctx.state["round"].to_bytes(8, "big") + os.urandom(8))
    raw = sample_metadata(f"BENCH-LARGE-{rig.jurisdiction}-{ctx.state['round']}", [rig.jurisdiction], 1)
    meta = parse_metadata({**raw, "kind": "VIDEO", "file_name": "video.mkv"})
    before, cpu = rig.rss_kib(), _cpu_seconds(rig.pid)
    rig.reset_peak()
    with ctx.timed():
        outcomes = await _publish(ctx, [Entry(source, meta, 1)], concurrency=1)
    growth = rig.peak_kib() - before
    ctx.state["publisher_cpu"].append((_cpu_seconds(rig.pid) - cpu) / ctx.events)
    _check(outcomes)
    _forget_stored(rig)
    ctx.state["growth_kib"] = max(ctx.state["growth_kib"], growth)
    per_mib = sorted(ctx.state["publisher_cpu"])[len(ctx.state["publisher_cpu"]) // 2] * 1e3
    ctx.shape = (f"1 file x {ctx.events:,} MiB; publisher RSS +{ctx.state['growth_kib'] / 1024:,.1f} MiB (max), "
                 f"{per_mib:,.2f} ms CPU/MiB")  # fmt: skip
    return ctx.events


# -- many small files --------------------------------------------------------------------------------------------
def _small_sizes(count: int) -> list[int]:
    """2-20 KiB, spread evenly (a fixed sequence, the same for every call)."""
    return [SMALL_MIN + (n * 7919) % (SMALL_MAX - SMALL_MIN) for n in range(count)]


def _write_small(folder: Path, sizes: list[int], call: int) -> list[Path]:
    paths = []
    stamp = call.to_bytes(4, "big")
    for n, size in enumerate(sizes):
        path = folder / f"photo-{n:05d}.png"
        path.write_bytes(PNG + stamp + n.to_bytes(4, "big") + os.urandom(size - len(PNG) - 8))
        paths.append(path)
    return paths


async def _small_setup(ctx: Context) -> None:
    rig = await _rig_setup(ctx)
    folder = rig.work / "evidence"
    folder.mkdir()
    ctx.state.update(folder=folder, sizes=_small_sizes(ctx.events), growth_kib=0, publisher_cpu=[])


@scenario(name="hub-upload-small-files", unit="files/s", baseline="disk-write-files", events=10_000,
          quick_events=200, record_size=0, setup=_small_setup, teardown=_rig_teardown)  # fmt: skip
async def hub_upload_small_files(ctx: Context) -> int:
    """Small files (2-20 KiB) through `evhub publish`'s client at its default concurrency, over mTLS, until 201."""
    rig: PublisherRig = ctx.state["rig"]
    ctx.state["round"] += 1
    r = ctx.state["round"]
    paths = _write_small(ctx.state["folder"], ctx.state["sizes"], r)
    entries = []
    for n, path in enumerate(paths):
        raw = sample_metadata(f"BENCH-SMALL-{rig.jurisdiction}-{r}-{n}", [rig.jurisdiction], n)
        entries.append(Entry(path, parse_metadata({**raw, "file_name": path.name}), n))
    before, cpu = rig.rss_kib(), _cpu_seconds(rig.pid)
    rig.reset_peak()
    with ctx.timed():
        outcomes = await _publish(ctx, entries, concurrency=DEFAULT_CONCURRENCY)
    ctx.state["growth_kib"] = max(ctx.state["growth_kib"], rig.peak_kib() - before)
    ctx.state["publisher_cpu"].append((_cpu_seconds(rig.pid) - cpu) / len(paths))
    _check(outcomes)
    _forget_stored(rig)
    total = sum(ctx.state["sizes"])
    per_file = sorted(ctx.state["publisher_cpu"])[len(ctx.state["publisher_cpu"]) // 2] * 1e6
    growth = ctx.state["growth_kib"] / 1024
    ctx.shape = (f"{len(paths):,} files, {total / MIB:,.1f} MiB; concurrency {DEFAULT_CONCURRENCY}; "
                 f"publisher RSS +{growth:,.1f} MiB (max), {per_file:,.0f} µs CPU/file")  # fmt: skip
    return len(paths)


async def _files_setup(ctx: Context) -> None:
    tmp = _disk_dir(ctx)
    ctx.state.update(sizes=_small_sizes(ctx.events), objects=tmp.parent / "sha256", round=0)
    ctx.state["objects"].mkdir()


@scenario(name="disk-write-files", unit="files/s", events=10_000, quick_events=200, record_size=0,
          setup=_files_setup, teardown=_disk_teardown)  # fmt: skip
async def disk_write_files(ctx: Context) -> int:
    """The same small files written one at a time beside the content store's, each fsynced, renamed, dir fsynced."""
    tmp, objects = ctx.state["tmp"], ctx.state["objects"]
    ctx.state["round"] += 1
    stamp = ctx.state["round"].to_bytes(4, "big")
    blobs = [PNG + stamp + n.to_bytes(4, "big") + os.urandom(s - len(PNG) - 8)
             for n, s in enumerate(ctx.state["sizes"])]  # fmt: skip
    with ctx.timed():
        for n, blob in enumerate(blobs):
            part = tmp / f"in-{n}"
            with part.open("wb") as out:
                out.write(blob)
                out.flush()
                os.fsync(out.fileno())
            folder = objects / f"{n % 256:02x}"
            folder.mkdir(exist_ok=True)
            os.replace(part, folder / f"f{n}")
            sync_dir(folder)
    shutil.rmtree(objects)
    objects.mkdir()
    ctx.shape = f"{len(blobs):,} files, {sum(ctx.state['sizes']) / MIB:,.1f} MiB, one at a time"
    return len(blobs)
