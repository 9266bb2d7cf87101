"""The embedded single-node Apache Kafka broker (KRaft, broker+controller in one JVM).

Owns: resolving the broker jars from Maven Central into a cache folder outside git, writing a lean
``server.properties``, formatting KRaft storage, starting the JVM on free 127.0.0.1 ports with a fresh data
directory, waiting until it serves, and stopping it by PID (SIGTERM, then SIGKILL after a deadline).

Does not own: deciding *which* Kafka a process uses (``services.shared.cluster``), topics or clients
(``services.shared.kafka``). The broker is a development and CI convenience; production uses a real cluster
(see docker-compose.yml and docs/operations.md).
"""

from __future__ import annotations

import asyncio
import base64
import ctypes
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self

from services.shared.errors import BrokerStartError

log = logging.getLogger(__name__)

OPS_KAFKA = Path(__file__).resolve().parents[2] / "ops" / "kafka"
POM = OPS_KAFKA / "pom.xml"
LOG4J_CONFIG = OPS_KAFKA / "log4j2.properties"
DEPENDENCY_PLUGIN = "org.apache.maven.plugins:maven-dependency-plugin:3.8.1"
READY_MARKER = "Kafka Server started"
_COMPLETE = ".complete"


def kafka_version() -> str:
    """The broker version pinned in ops/kafka/pom.xml (the one place that names it)."""
    text = POM.read_text(encoding="utf-8")
    start = text.index("<kafka.version>") + len("<kafka.version>")
    return text[start : text.index("</kafka.version>", start)].strip()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "evidence-hub" / "kafka"


def ensure_jars(cache_dir: Path, *, mvn: str = "mvn") -> Path:
    """Return the folder holding the broker's runtime jars, resolving them with Maven on first use.

    The result is cached per pom content; a second call (or a second clone) re-uses it without touching the
    network. Resolution goes into a temporary folder that is renamed into place, so an interrupted download
    never leaves a half-filled cache.

    Raises:
        BrokerStartError: Maven is missing or failed.
    """
    import hashlib

    pom_digest = hashlib.sha256(POM.read_bytes()).hexdigest()[:12]
    libs = cache_dir / f"{kafka_version()}-{pom_digest}" / "libs"
    if (libs / _COMPLETE).is_file():
        return libs
    if shutil.which(mvn) is None:
        raise BrokerStartError("Maven ('mvn') is not on PATH; it is needed once to fetch the Kafka jars")
    libs.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="libs-", dir=libs.parent))
    started = time.monotonic()
    cmd = [
        mvn, "-B", "-q", "-f", str(POM), f"{DEPENDENCY_PLUGIN}:copy-dependencies",
        "-DincludeScope=runtime", f"-DoutputDirectory={staging}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)  # noqa: S603
    if proc.returncode != 0:
        shutil.rmtree(staging, ignore_errors=True)
        tail = (proc.stdout + proc.stderr).strip().splitlines()[-5:]
        raise BrokerStartError("Maven could not resolve the Kafka jars: " + " | ".join(tail))
    (staging / _COMPLETE).write_text(kafka_version(), encoding="utf-8")
    try:
        staging.rename(libs)
    except OSError:  # another process won the race; theirs is as good as ours
        shutil.rmtree(staging, ignore_errors=True)
    log.info("resolved Kafka %s jars in %.1fs into %s", kafka_version(), time.monotonic() - started, libs)
    return libs


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def new_cluster_id() -> str:
    """22 characters of base64url over 16 random bytes, the form KRaft expects. Never starting with ``-``: the
    storage tool's argument parser would take such an id for an option (1 start in 64 failed that way)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode("ascii")
        if not cid.startswith("-"):
            return cid


def server_properties(*, broker_port: int, controller_port: int, log_dir: Path) -> dict[str, str]:
    """Lean single-node settings for a 2-core machine. Pure: no I/O."""
    return {
        "process.roles": "broker,controller",
        "node.id": "1",
        "controller.quorum.bootstrap.servers": f"127.0.0.1:{controller_port}",
        "listeners": f"PLAINTEXT://127.0.0.1:{broker_port},CONTROLLER://127.0.0.1:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://127.0.0.1:{broker_port}",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": "1",
        "offsets.topic.replication.factor": "1",
        "offsets.topic.num.partitions": "1",
        "transaction.state.log.replication.factor": "1",
        "transaction.state.log.min.isr": "1",
        "transaction.state.log.num.partitions": "1",
        "share.coordinator.state.topic.replication.factor": "1",
        "share.coordinator.state.topic.min.isr": "1",
        "share.coordinator.state.topic.num.partitions": "1",
        "group.initial.rebalance.delay.ms": "0",
        "num.network.threads": "2",
        "num.io.threads": "2",
        "background.threads": "2",
        "log.cleaner.dedupe.buffer.size": "2097152",
        "auto.create.topics.enable": "false",
        "unclean.leader.election.enable": "false",
    }


def render_properties(props: Mapping[str, str]) -> str:
    """Java properties text. Refuses empty values: Kafka ≥ 4.2 rejects ``key=`` for list configs."""
    empty = [k for k, v in props.items() if v == ""]
    if empty:
        raise ValueError(f"empty values are not allowed: {', '.join(empty)}")
    return "".join(f"{k}={v}\n" for k, v in props.items())


def die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to SIGTERM the broker if the process that started it dies without stopping it."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except OSError:
        pass


@dataclass
class LocalKafka:
    """One broker process. ``with LocalKafka(...) as k:`` or ``async with``; ``k.bootstrap`` while running."""

    libs: Path
    workdir: Path
    heap_mb: int = 512
    java: str = "java"
    start_timeout: float = 90.0
    stop_timeout: float = 30.0
    extra: dict[str, str] = field(default_factory=dict)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _broker_port: int = field(default=0, init=False)
    startup_seconds: float = field(default=0.0, init=False)

    @property
    def bootstrap(self) -> str:
        if self._proc is None:
            raise BrokerStartError("the local broker is not running")
        return f"127.0.0.1:{self._broker_port}"

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def log_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def log_file(self) -> Path:
        return self.workdir / "logs" / "server.log"

    def _classpath(self) -> str:
        return str(self.libs / "*")  # the JVM expands the wildcard; no shell is involved

    def _prepare(self) -> tuple[list[str], list[str]]:
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self._broker_port, controller_port = free_port(), free_port()
        while controller_port == self._broker_port:
            controller_port = free_port()
        props = server_properties(
            broker_port=self._broker_port, controller_port=controller_port, log_dir=self.log_dir
        )
        props.update(self.extra)
        config = self.workdir / "server.properties"
        config.write_text(render_properties(props), encoding="utf-8")
        jvm = [
            self.java, f"-Xms{min(256, self.heap_mb)}m", f"-Xmx{self.heap_mb}m",
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", f"-Dkafka.logs.dir={self.workdir / 'logs'}",
            "-cp", self._classpath(),
        ]  # fmt: skip
        fmt = [*jvm, "kafka.tools.StorageTool", "format", "--standalone",
               "-t", new_cluster_id(), "-c", str(config)]  # fmt: skip
        run = [*jvm, "kafka.Kafka", str(config)]
        return fmt, run

    def _spawn(self, run: list[str]) -> None:
        out = (self.workdir / "logs" / "stdout.log").open("ab")
        try:
            self._proc = subprocess.Popen(  # noqa: S603
                run, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=die_with_parent,
            )  # fmt: skip
        finally:
            out.close()

    def _check_ready(self) -> bool:
        assert self._proc is not None
        if self._proc.poll() is not None:
            raise BrokerStartError(
                f"the broker exited with code {self._proc.returncode} while starting; "
                f"last log lines:\n{self.tail_log()}"
            )
        try:
            text = self.log_file.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return False
        if READY_MARKER not in text:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            return s.connect_ex(("127.0.0.1", self._broker_port)) == 0

    def tail_log(self, lines: int = 20) -> str:
        for path in (self.log_file, self.workdir / "logs" / "stdout.log"):
            if path.is_file():
                return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        return "(no log written)"

    def _formatted(self, result: subprocess.CompletedProcess[bytes] | tuple[int, bytes]) -> None:
        code, output = (
            (result.returncode, result.stdout) if isinstance(result, subprocess.CompletedProcess) else result
        )
        if code != 0:
            raise BrokerStartError(f"formatting KRaft storage failed: {output.decode(errors='replace')[-500:]}")

    # -- synchronous API (pytest session fixture, CLI) -------------------------------------------------
    def start(self) -> str:
        """Format storage, start the broker and block until it serves. Returns the bootstrap address.

        Raises:
            BrokerStartError: the JVM failed to format or start, or did not become ready in time.
        """
        began = time.monotonic()
        fmt, run = self._prepare()
        self._formatted(subprocess.run(fmt, capture_output=False, stdout=subprocess.PIPE,  # noqa: S603
                                       stderr=subprocess.STDOUT, check=False))  # fmt: skip
        self._spawn(run)
        deadline = began + self.start_timeout
        try:
            while not self._check_ready():
                if time.monotonic() > deadline:
                    raise BrokerStartError(f"broker not ready after {self.start_timeout:.0f}s:\n{self.tail_log()}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        log.info("Kafka started at %s in %.1fs (pid %s)", self.bootstrap, self.startup_seconds, self.pid)
        return self.bootstrap

    def stop(self) -> None:
        """SIGTERM the broker's PID (it shuts down cleanly), SIGKILL it if it has not exited in time."""
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(self.stop_timeout)
        except subprocess.TimeoutExpired:
            log.warning("broker pid %s ignored SIGTERM for %.0fs; killing it", proc.pid, self.stop_timeout)
            proc.kill()
            proc.wait()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- asynchronous API (services, bench) --------------------------------------------------------------
    async def astart(self) -> str:
        """Like :meth:`start` without blocking the event loop. The JVM is spawned from the calling thread so
        that its parent-death signal is tied to a thread that lives as long as the loop."""
        began = time.monotonic()
        fmt, run = self._prepare()
        formatter = await asyncio.create_subprocess_exec(
            *fmt, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        output, _ = await formatter.communicate()
        self._formatted((formatter.returncode or 0, output))
        self._spawn(run)
        try:
            async with asyncio.timeout(self.start_timeout):
                while not self._check_ready():  # noqa: ASYNC110 - polls a child process, no event to await
                    await asyncio.sleep(0.1)
        except TimeoutError:
            self.stop()
            raise BrokerStartError(
                f"broker not ready after {self.start_timeout:.0f}s:\n{self.tail_log()}"
            ) from None
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        log.info("Kafka started at %s in %.1fs (pid %s)", self.bootstrap, self.startup_seconds, self.pid)
        return self.bootstrap

    async def astop(self) -> None:
        await asyncio.to_thread(self.stop)

    async def __aenter__(self) -> Self:
        await self.astart()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.astop()


if __name__ == "__main__":  # `python -m services.shared.local_kafka`: fetch the jars (used by the Makefile)
    import sys

    began = time.monotonic()
    try:
        path = ensure_jars(default_cache_dir())
    except BrokerStartError as exc:
        print(f"kafka: {exc.detail}", file=sys.stderr)
        raise SystemExit(4) from None
    jars = len(list(path.glob("*.jar")))
    print(f"Kafka {kafka_version()}: {jars} jars in {path} ({time.monotonic() - began:.1f}s)")
