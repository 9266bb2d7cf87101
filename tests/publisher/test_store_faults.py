"""Another process holding the state's write lock (an operator's sqlite3 shell, say): requests wait for it or get a
503, the event loop keeps serving, the outbox relay never crashes, and no delivery mark is lost (nothing is sent
twice). Before: the lock was waited for on the event loop (/healthz took seconds), the relay crashed and took the
service down, and marks were dropped."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from services.publisher.service import CRASHED, create_app
from services.publisher.settings import PublisherSettings
from services.shared.kafka import read_to_end
from tests.publisher.samples import metadata, png
from tests.publishing_stack import Stack

pytestmark = pytest.mark.kafka


class Lock:
    """``BEGIN IMMEDIATE`` held by another process until released."""

    def __init__(self, db: Path) -> None:
        code = ("import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
                "c.execute('BEGIN IMMEDIATE')\nprint('locked', flush=True)\nsys.stdin.readline()\n")  # fmt: skip
        self.proc = subprocess.Popen([sys.executable, "-c", code, str(db)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)  # fmt: skip
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "locked"

    def release(self) -> None:
        """The holder ends its transaction by exiting; its pipes are closed."""
        if self.proc.returncode is None:
            self.proc.communicate("\n", timeout=10)


@pytest.fixture
def lock(tmp_path: Path) -> Iterator[list[Lock]]:
    held: list[Lock] = []
    yield held
    for lock in held:
        lock.release()


@pytest.fixture
async def url(stack: Stack, tmp_path: Path) -> AsyncIterator[str]:
    settings = PublisherSettings(unsafe_plaintext=True, jurisdictions=stack.jurisdictions, data_dir=tmp_path / "x",
                                 relay_interval_s=0.1)  # fmt: skip
    app = create_app(settings, publisher=stack.publisher, store=stack.store, authenticate=lambda r: "tester")
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        assert app[CRASHED] == [], "the relay never crashed"
        await runner.cleanup()


async def test_a_lock_held_elsewhere_delays_requests_but_never_the_event_loop_and_loses_no_mark(
    stack: Stack, url: str, lock: list[Lock], tmp_path: Path
) -> None:
    db = tmp_path / "publisher.sqlite3"
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    async with session:
        lock.append(Lock(db))
        form = aiohttp.FormData()
        form.add_field("metadata", json.dumps(metadata("SDG-LOCK-1", stack.jurisdictions)),
                       content_type="application/json")  # fmt: skip
        form.add_field("file", png(seed=1), filename="p.png")
        request = asyncio.create_task(session.post(f"{url}/v1/evidence", data=form))
        # while the lock is held: the loop answers at once (a blocked loop would miss this 1 s bound)
        for _ in range(5):
            async with session.get(f"{url}/healthz", timeout=aiohttp.ClientTimeout(total=1)) as r:
                assert r.status == 200
        assert not request.done(), "the request waits for the lock"
        lock[0].release()
        async with await request as response:
            assert response.status == 201, await response.text()
        # the delivery marks are written once the lock is gone, so the relay sends nothing again
        for _ in range(10):
            await stack.publisher.deliver_pending()
    assert stack.outbox.stats()["records_sent"] == len(stack.jurisdictions)
    for j in stack.jurisdictions:
        assert len(await read_to_end(stack.bootstrap, stack.topic(j))) == 1


async def test_a_lock_held_longer_than_the_store_timeout_is_a_503_and_the_service_goes_on(
    stack: Stack, url: str, lock: list[Lock], tmp_path: Path
) -> None:
    stack.publisher.committer.timeout = 1.0
    lock.append(Lock(tmp_path / "publisher.sqlite3"))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        form = aiohttp.FormData()
        form.add_field("metadata", json.dumps(metadata("SDG-LOCK-2", stack.jurisdictions)),
                       content_type="application/json")  # fmt: skip
        form.add_field("file", png(seed=2), filename="p.png")
        async with session.post(f"{url}/v1/evidence", data=form) as r:
            body = await r.json(content_type=None)
            assert r.status == 503, body
            assert "locked by another process" in body["detail"]
        lock[0].release()
        form = aiohttp.FormData()
        form.add_field("metadata", json.dumps(metadata("SDG-LOCK-2", stack.jurisdictions)),
                       content_type="application/json")  # fmt: skip
        form.add_field("file", png(seed=2), filename="p.png")
        async with session.post(f"{url}/v1/evidence", data=form) as r:
            assert r.status == 201, await r.text()
