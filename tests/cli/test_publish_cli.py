"""``evhub publish`` as an archivist runs it: a real process, a real publisher over mTLS, the real broker."""

from __future__ import annotations

import asyncio
import csv
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from services.cli.samples import pdf, png, wav
from services.publisher.service import create_app
from services.publisher.settings import PublisherSettings
from services.shared.kafka import read_to_end
from services.shared.tls import CertFiles, create_dev_pki, server_context
from tests.publishing_stack import Stack

pytestmark = pytest.mark.kafka


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str


@dataclass
class Hub:
    url: str
    client: CertFiles
    stack: Stack

    async def evhub(self, *args: str, cert: bool = True) -> Run:
        creds = ["--url", self.url, "--cert", str(self.client.cert), "--key", str(self.client.key),
                 "--ca", str(self.client.ca)] if cert else []  # fmt: skip
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "services.cli", *args, *creds,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode is not None
        return Run(proc.returncode, out.decode(), err.decode())


@pytest.fixture
async def hub(stack: Stack, tmp_path: Path) -> AsyncIterator[Hub]:
    pki = create_dev_pki(tmp_path / "pki", ["publisher", "archivist"])
    settings = PublisherSettings(
        tls_cert=pki["publisher"].cert, tls_key=pki["publisher"].key, tls_ca=pki["publisher"].ca,
        allowed_clients=["archivist"], jurisdictions=stack.jurisdictions, data_dir=tmp_path / "unused",
    )  # fmt: skip
    runner = web.AppRunner(create_app(settings, publisher=stack.publisher, store=stack.store))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_context(pki["publisher"]))
    await site.start()
    try:
        yield Hub(f"https://127.0.0.1:{runner.addresses[0][1]}", pki["archivist"], stack)
    finally:
        await runner.cleanup()


def _csv_batch(folder: Path, jurisdictions: list[str], n: int = 3) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    makers = [lambda i: png(16, 16, seed=i), lambda i: pdf(f"statement {i}"), lambda i: wav(seed=i)]
    names = ["photo-{}.jpg", "statement-{}.bin", "interview-{}.dat"]  # wrong extensions on purpose
    rows = []
    for i in range(n):
        name = names[i % 3].format(i)
        (folder / name).write_bytes(makers[i % 3](i))
        rows.append({
            "file": name, "item_id": f"SDG-CSV-{i}", "case_ids": "CASE-SY-001",
            "jurisdictions": ";".join(jurisdictions),
            "kind": "DOCUMENT", "title": f"Item {i}", "classification": "RESTRICTED", "purposes": "prosecution",
            "protected:WITNESS_IDENTIFYING:witness.name": f"witness {i}" if i == 1 else "",
        })  # fmt: skip
    manifest = folder / "manifest.csv"
    with manifest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return manifest


async def test_csv_batch_publishes_with_media_types_from_the_bytes_and_a_rerun_skips_everything(
    hub: Hub, tmp_path: Path
) -> None:
    folder = tmp_path / "batch"
    _csv_batch(folder, hub.stack.jurisdictions)
    first = await hub.evhub("publish", str(folder), "--json")
    assert first.code == 0, first.stderr
    report = json.loads(first.stdout)
    assert (report["published"], report["failed"]) == (3, 0)
    assert sorted(i["media_type"] for i in report["items"]) == ["application/pdf", "audio/wav", "image/png"]

    again = await hub.evhub("publish", str(folder))
    assert again.code == 0, again.stderr
    assert "0 published, 3 already published, 0 failed" in again.stdout
    for j in hub.stack.jurisdictions:
        assert len(await read_to_end(hub.stack.bootstrap, hub.stack.topic(j))) == 3


async def test_an_interrupted_batch_resumes_and_a_lost_journal_still_never_duplicates(hub: Hub, tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    manifest = _csv_batch(folder, hub.stack.jurisdictions, n=4)
    lines = manifest.read_text().splitlines()
    manifest.write_text("\n".join(lines[:3]) + "\n")  # the first run only got through two items
    assert (await hub.evhub("publish", str(folder), "--json")).code == 0
    manifest.write_text("\n".join(lines) + "\n")
    resumed = json.loads((await hub.evhub("publish", str(folder), "--json")).stdout)
    assert (resumed["already-published"], resumed["published"]) == (2, 2)

    (folder / ".evhub-publish.jsonl").unlink()
    rerun = json.loads((await hub.evhub("publish", str(folder), "--json")).stdout)
    assert (rerun["already-published"], rerun["published"]) == (4, 0), "the server's idempotency catches it"
    for j in hub.stack.jurisdictions:
        assert len(await read_to_end(hub.stack.bootstrap, hub.stack.topic(j))) == 4


async def test_a_bad_manifest_is_one_clear_line_per_problem_and_nothing_is_sent(hub: Hub, tmp_path: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "a.png").write_bytes(png())
    (folder / "manifest.json").write_text(json.dumps([
        {"file": "a.png", "item_id": "SDG-A", "case_ids": ["C"], "jurisdictions": ["DE"], "kind": "SELFIE",
         "title": "x"},
        {"file": "missing.png", "item_id": "SDG-B", "case_ids": ["C"], "jurisdictions": ["DE"], "kind": "OTHER",
         "title": "y"},
    ]))  # fmt: skip
    run = await hub.evhub("publish", str(folder))
    assert run.code == 2
    assert run.stderr.startswith("evhub: ")
    assert "Traceback" not in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1
    assert "row 1: kind" in run.stderr
    assert "row 2: file" in run.stderr


async def test_a_rejected_item_is_reported_and_the_rest_still_publish(hub: Hub, tmp_path: Path) -> None:
    folder = tmp_path / "mixed"
    _csv_batch(folder, hub.stack.jurisdictions, n=2)
    manifest = folder / "manifest.csv"
    text = manifest.read_text().replace(hub.stack.jurisdictions[0], "ZZ", 1)  # first row: unknown jurisdiction
    manifest.write_text(text)
    run = await hub.evhub("publish", str(folder), "--json")
    assert run.code == 1
    report = json.loads(run.stdout)
    failed = [i for i in report["items"] if i["status"] == "failed"]
    assert [i["item_id"] for i in failed] == ["SDG-CSV-0"]
    assert "jurisdictions.0" in failed[0]["error"]
    assert report["published"] == 1


async def test_without_a_client_certificate_the_cli_says_so(hub: Hub, tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    _csv_batch(folder, hub.stack.jurisdictions, n=1)
    run = await hub.evhub("publish", str(folder), cert=False)
    assert run.code == 5
    assert "client certificate" in run.stderr


async def test_check_validates_the_manifest_without_certificates_or_network(hub: Hub, tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    _csv_batch(folder, hub.stack.jurisdictions, n=3)
    run = await hub.evhub("publish", str(folder), "--check", cert=False)
    assert run.code == 0, run.stderr
    assert "3 items ready to publish" in run.stdout
    assert await read_to_end(hub.stack.bootstrap, hub.stack.topic(hub.stack.jurisdictions[0])) == []


async def test_an_unreachable_publisher_stops_the_batch_with_one_line_and_exit_4(hub: Hub, tmp_path: Path) -> None:
    from services.shared.local_kafka import free_port

    folder = tmp_path / "batch"
    _csv_batch(folder, hub.stack.jurisdictions, n=3)
    hub.url = f"https://127.0.0.1:{free_port()}"
    run = await hub.evhub("publish", str(folder))
    assert run.code == 4
    errors = [line for line in run.stderr.splitlines() if line.startswith("evhub:")]
    assert len(errors) == 1
    assert errors[0].startswith("evhub: cannot reach the publisher")
    assert "Traceback" not in run.stderr


async def test_an_unwritable_journal_is_refused_before_anything_is_sent(hub: Hub, tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    _csv_batch(folder, hub.stack.jurisdictions, n=2)
    run = await hub.evhub("publish", str(folder), "--journal", str(tmp_path / "no" / "such" / "dir" / "j.jsonl"))
    assert run.code == 5
    assert "resume journal" in run.stderr
    assert "Traceback" not in run.stderr
    assert await read_to_end(hub.stack.bootstrap, hub.stack.topic(hub.stack.jurisdictions[0])) == []


async def test_a_malformed_protected_column_names_the_column(hub: Hub, tmp_path: Path) -> None:
    folder = tmp_path / "batch"
    manifest = _csv_batch(folder, hub.stack.jurisdictions, n=1)
    manifest.write_text(manifest.read_text().replace("protected:WITNESS_IDENTIFYING:witness.name", "protected:WITNESS"))
    run = await hub.evhub("publish", str(folder), "--check")
    assert run.code == 2
    assert "protected:WITNESS" in run.stderr
    assert "protected:<LABEL>:<field>" in run.stderr


@pytest.mark.parametrize(
    ("on_disk", "file_name"),
    [("photo\u202egnp.exe", None), ("frame.png", "../../frame.png"), ("frame.png", "frame\x00.png")],
    ids=["name-on-disk-with-bidi-override", "manifest-path-traversal", "manifest-nul"],
)
async def test_an_unsafe_file_name_is_refused_before_anything_is_sent(
    hub: Hub, tmp_path: Path, on_disk: str, file_name: str | None
) -> None:
    folder = tmp_path / "names"
    folder.mkdir()
    (folder / on_disk).write_bytes(png())
    row = {"file": on_disk, "item_id": "SDG-NAME", "case_ids": ["C"], "jurisdictions": hub.stack.jurisdictions,
           "kind": "PHOTOGRAPH", "title": "x"}  # fmt: skip
    if file_name is not None:
        row["file_name"] = file_name
    (folder / "manifest.json").write_text(json.dumps([row]))
    run = await hub.evhub("publish", str(folder))
    assert run.code == 2
    assert "row 1: file_name" in run.stderr
    assert "Traceback" not in run.stderr
    assert await read_to_end(hub.stack.bootstrap, hub.stack.topic(hub.stack.jurisdictions[0])) == []
