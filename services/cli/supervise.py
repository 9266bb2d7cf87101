"""Starting the hub's services as real processes (``python -m services.<name>``) for the demo and tests.

Owns: spawning a service with its environment, waiting until its ``/healthz`` answers over (m)TLS, and stopping it
by PID — SIGTERM, then SIGKILL after a deadline. Never by name. Also running an ``evhub`` command as its own
process, bounded in time (:func:`run_evhub`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from services.shared.errors import InfrastructureError
from services.shared.local_kafka import die_with_parent


class ServiceStartError(InfrastructureError):
    title = "A hub service failed to start"
    type_slug = "service-start"


@contextlib.asynccontextmanager
async def running_service(
    module: str, *, env: Mapping[str, str], health_url: str, ssl_context: ssl.SSLContext | None, log_file: Path,
    timeout_s: float = 60.0,
) -> AsyncIterator[int]:  # fmt: skip
    """Run ``python -m <module>`` until the block ends; yields its PID once ``health_url`` answers 200.

    Raises:
        ServiceStartError: the process exited or did not become healthy in time (with its last log lines).
    """
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        proc = subprocess.Popen(  # noqa: S603, ASYNC220 - spawning returns at once; waiting is done async below
            [sys.executable, "-m", module], env={**os.environ, **env}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
            preexec_fn=die_with_parent,
        )  # fmt: skip
    try:
        await _wait_healthy(proc, health_url, ssl_context, log_file, timeout_s)
        yield proc.pid
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(proc.wait, 20)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


async def _wait_healthy(
    proc: subprocess.Popen[bytes], url: str, ctx: ssl.SSLContext | None, log_file: Path, timeout_s: float
) -> None:
    connector = aiohttp.TCPConnector(ssl=ctx if ctx is not None else False)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=2)) as session:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            if proc.poll() is not None:
                raise ServiceStartError(f"{url} exited with {proc.returncode}:\n{_tail(log_file)}")
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except (aiohttp.ClientError, TimeoutError):
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise ServiceStartError(f"{url} not healthy after {timeout_s:.0f}s:\n{_tail(log_file)}")
            await asyncio.sleep(0.2)


COMMAND_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Ran:
    code: int
    output: str


async def run_evhub(*args: str, env: dict[str, str], timeout_s: float = COMMAND_TIMEOUT_S) -> Ran:
    """Run ``evhub ARGS`` as its own process; its exit code and what it printed (stdout, then stderr).

    Raises:
        InfrastructureError: it did not finish within ``timeout_s`` (it is killed).
    """
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.cli", *args, env={**os.environ, "COLUMNS": "150", **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise InfrastructureError(f"evhub {args[0]} {args[1]} did not finish within {timeout_s:.0f} s") from None
    return Ran(proc.returncode or 0, (out + err).decode("utf-8", "replace"))
