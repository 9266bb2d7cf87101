"""The embedded Apache Kafka broker (KRaft, broker+controller in one JVM), throwaway or persistent.

Owns: resolving the broker jars from Maven Central into a cache folder outside git; a node's configuration
(:class:`NodeConfig`: id, ports, cluster id, data directory — pure values, rendered to ``server.properties``); and
one node's lifecycle (:class:`LocalKafka`: format its storage once, start the JVM, wait until it serves, stop it by
PID with SIGTERM then SIGKILL, or signal it on purpose for fault injection).

Two modes share that code:
- **throwaway** (tests, the demo): a fresh directory, free ports, a new cluster id, the directory removed on stop;
- **persistent** (``evhub kafka --data DIR``, ``EVHUB_KAFKA_DATA_DIR``): the node's identity and ports are written
  once to ``DIR/node.json``, storage is formatted once, and every later start — after a clean stop or a SIGKILL —
  runs the same node on the same data and the same address.

Does not own: deciding *which* Kafka a process uses (``services.shared.cluster``), topics or clients
(``services.shared.kafka``). The broker is a development and single-machine convenience; production uses a real
cluster (see docker-compose.yml and docs/operations.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ctypes
import fcntl
import json
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
from dataclasses import asdict, dataclass, field
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
NODE_FILE = "node.json"


def claim_directory(directory: Path, what: str) -> int:
    """An exclusive lock on ``directory`` for one launcher (a file descriptor; released when it is closed or the
    process exits).

    Raises:
        BrokerStartError: another launcher holds it.
    """
    fd = os.open(directory / ".launcher.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BrokerStartError(f"another {what} is already running on {directory}") from None
    return fd


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


@dataclass(frozen=True)
class NodeConfig:
    """One node's identity and addresses: everything that must stay the same for it to restart on its data.

    Pure values; :meth:`properties` renders the broker configuration. A persistent node keeps this in
    ``node.json`` beside its data (:func:`load_node` / :func:`save_node`)."""

    broker_port: int
    controller_port: int
    cluster_id: str
    node_id: int = 1

    @classmethod
    def fresh(cls) -> NodeConfig:
        """New free ports on 127.0.0.1 and a new cluster id."""
        broker_port, controller_port = free_port(), free_port()
        while controller_port == broker_port:
            controller_port = free_port()
        return cls(broker_port=broker_port, controller_port=controller_port, cluster_id=new_cluster_id())

    def properties(self, log_dir: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        props = server_properties(broker_port=self.broker_port, controller_port=self.controller_port, log_dir=log_dir)
        props["node.id"] = str(self.node_id)
        props.update(extra or {})
        return props

    def format_options(self) -> list[str]:
        """Extra ``StorageTool format`` options: a lone node bootstraps its own quorum (``--standalone``); members of
        a static quorum (``controller.quorum.voters``, see ``local_cluster``) are formatted without it."""
        return ["--standalone"]

    @property
    def ready_port(self) -> int:
        """The port that answers once the node serves (a controller-only node has no broker port)."""
        return self.broker_port


def load_node(workdir: Path) -> NodeConfig | None:
    """The node a persistent directory was created for, or None for a directory never used.

    Raises:
        BrokerStartError: ``node.json`` exists but is unreadable or malformed.
    """
    path = workdir / NODE_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return NodeConfig(
            broker_port=int(raw["broker_port"]), controller_port=int(raw["controller_port"]),
            cluster_id=str(raw["cluster_id"]), node_id=int(raw["node_id"]),
        )  # fmt: skip
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BrokerStartError(f"{path} is damaged ({exc!r}); restore it or start on a new directory") from exc


def save_node(workdir: Path, node: NodeConfig) -> None:
    """Write ``node.json`` atomically (temporary file, fsync, rename)."""
    path = workdir / NODE_FILE
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        json.dump({**asdict(node), "kafka_version": kafka_version()}, out, indent=2)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, path)


def port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # like the JVM: TIME_WAIT does not count as in use
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


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
    """One broker node's process. ``with LocalKafka(...) as k:`` or ``async with``; ``k.bootstrap`` while running.

    ``persistent=False`` (throwaway): each start is a new node on fresh ports, and :meth:`stop` removes ``workdir``
    if ``remove_on_stop``. ``persistent=True``: the first start creates the node (``node.json``) and formats its
    storage; every later start reuses both, so the data and the bootstrap address survive restarts and crashes.
    A persistent directory is locked while its broker runs: a second launcher on it is refused.
    """

    libs: Path
    workdir: Path
    heap_mb: int = 512
    java: str = "java"
    start_timeout: float = 90.0
    stop_timeout: float = 30.0
    extra: dict[str, str] = field(default_factory=dict)
    persistent: bool = False
    remove_on_stop: bool = False
    #: A node decided by the caller (a member of ``local_cluster.LocalCluster``): every start runs exactly it.
    preset: NodeConfig | None = None
    jvm_options: tuple[str, ...] = ()
    node: NodeConfig | None = field(default=None, init=False)
    _proc: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)
    _lock: int | None = field(default=None, init=False, repr=False)
    _log_offset: int = field(default=0, init=False, repr=False)
    _run: list[str] | None = field(default=None, init=False, repr=False)
    startup_seconds: float = field(default=0.0, init=False)
    formatted_now: bool = field(default=False, init=False)

    @classmethod
    def throwaway(cls, libs: Path, *, root: Path | None = None, heap_mb: int = 512) -> LocalKafka:
        """A broker in a new temporary directory under ``root`` (the system's default if None), removed on stop."""
        if root is not None:
            root.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix="evhub-kafka-", dir=root))
        return cls(libs=libs, workdir=workdir, heap_mb=heap_mb, remove_on_stop=True)

    @property
    def bootstrap(self) -> str:
        if self._proc is None or self.node is None:
            raise BrokerStartError("the local broker is not running")
        return f"127.0.0.1:{self.node.broker_port}"

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

    def _claim(self) -> None:
        """Lock a persistent directory for this launcher (released by :meth:`stop` or by the process exiting).

        Raises:
            BrokerStartError: another launcher runs a broker on it.
        """
        if not self.persistent or self._lock is not None:
            return
        self._lock = claim_directory(self.workdir, "broker")

    def _release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _node(self) -> NodeConfig:
        """This start's node: the persistent one (created on first use), or a fresh one.

        Raises:
            BrokerStartError: ``node.json`` is damaged, or a port it names is taken by another process.
        """
        if self.preset is not None:
            return self.preset
        if not self.persistent:
            return NodeConfig.fresh()
        node = load_node(self.workdir)
        if node is None:
            node = NodeConfig.fresh()
            save_node(self.workdir, node)
            return node
        busy = [p for p in (node.broker_port, node.controller_port) if not port_free(p)]
        if busy:
            raise BrokerStartError(
                f"port {busy[0]} of the broker in {self.workdir} is in use by another process; "
                f"the broker keeps its address across restarts (see {self.workdir / NODE_FILE})"
            )
        return node

    def _prepare(self) -> tuple[list[str] | None, list[str]]:
        """Write the configuration. Returns (the format command, or None if storage is formatted; the run command)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "logs").mkdir(exist_ok=True)
        self._claim()
        self.node = node = self._node()
        config = self.workdir / "server.properties"
        config.write_text(render_properties(node.properties(self.log_dir, self.extra)), encoding="utf-8")
        jvm = [
            self.java, f"-Xms{min(256, self.heap_mb)}m", f"-Xmx{self.heap_mb}m", *self.jvm_options,
            f"-Dlog4j2.configurationFile={LOG4J_CONFIG}", f"-Dkafka.logs.dir={self.workdir / 'logs'}",
            "-cp", self._classpath(),
        ]  # fmt: skip
        run = [*jvm, "kafka.Kafka", str(config)]
        if (self.log_dir / "meta.properties").is_file():  # formatted once; formatting again would refuse anyway
            return None, run
        fmt = [*jvm, "kafka.tools.StorageTool", "format", *node.format_options(), "-t", node.cluster_id,
               "-c", str(config)]  # fmt: skip
        return fmt, run

    def _spawn(self, run: list[str]) -> None:
        try:  # a restarted persistent broker appends to its log: only what this start writes counts
            self._log_offset = self.log_file.stat().st_size
        except FileNotFoundError:
            self._log_offset = 0
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
        assert self.node is not None
        if self._proc.poll() is not None:
            raise BrokerStartError(
                f"the broker exited with code {self._proc.returncode} while starting; "
                f"last log lines:\n{self.tail_log()}"
            )
        try:
            with self.log_file.open("rb") as log_text:
                log_text.seek(self._log_offset)
                text = log_text.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return False
        if READY_MARKER not in text:
            return False
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            return s.connect_ex(("127.0.0.1", self.node.ready_port)) == 0

    def tail_log(self, lines: int = 20) -> str:
        for path in (self.log_file, self.workdir / "logs" / "stdout.log"):
            if path.is_file():
                return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
        return "(no log written)"

    def _formatted(self, result: subprocess.CompletedProcess[bytes] | tuple[int, bytes]) -> None:
        code, output = (result.returncode, result.stdout) if isinstance(result, subprocess.CompletedProcess) else result
        if code != 0:
            raise BrokerStartError(f"formatting KRaft storage failed: {output.decode(errors='replace')[-500:]}")
        self.formatted_now = True

    def _started(self, began: float) -> str:
        self.startup_seconds = time.monotonic() - began
        log.info("Kafka started at %s in %.1fs (pid %s)", self.bootstrap, self.startup_seconds, self.pid)
        return self.bootstrap

    # -- synchronous API (pytest session fixture, CLI) -------------------------------------------------
    def start(self) -> str:
        """Format storage if it never was, start the broker and block until it serves. Returns the bootstrap.

        Raises:
            BrokerStartError: the JVM failed to format or start, or did not become ready in time; a persistent
            directory is in use or its ports are taken.
        """
        began = time.monotonic()
        try:
            self.format_storage()
            self.launch()
            deadline = began + self.start_timeout
            while not self.serving():
                if time.monotonic() > deadline:
                    raise BrokerStartError(f"broker not ready after {self.start_timeout:.0f}s:\n{self.tail_log()}")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        return self._started(began)

    # The three steps of :meth:`start`, for a cluster that formats its nodes in parallel and waits for all of them.
    def format_storage(self) -> None:
        """Write the configuration and format storage if it never was. Blocking, and safe from any thread: it
        spawns no broker.

        Raises:
            BrokerStartError: formatting failed; a persistent directory is in use or its ports are taken.
        """
        fmt, self._run = self._prepare()
        if fmt is not None:
            self._formatted(subprocess.run(fmt, capture_output=False, stdout=subprocess.PIPE,  # noqa: S603
                                           stderr=subprocess.STDOUT, check=False))  # fmt: skip

    def launch(self) -> None:
        """Spawn the JVM configured by :meth:`format_storage`. Call it from a thread that outlives the broker: the
        broker's parent-death signal follows the thread that spawned it."""
        if self._run is None:
            raise BrokerStartError("format_storage() must run before launch()")
        self._spawn(self._run)

    def serving(self) -> bool:
        """True once the node logged that it started and its port accepts connections.

        Raises:
            BrokerStartError: the JVM exited (with its last log lines).
        """
        return self._check_ready()

    def stop(self) -> None:
        """SIGTERM the broker's PID (it shuts down cleanly), SIGKILL it if it has not exited in time. Then release
        a persistent directory, or remove a throwaway one."""
        proc, self._proc = self._proc, None
        try:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                with contextlib.suppress(ProcessLookupError):  # a node stopped by SIGSTOP must wake to shut down
                    os.kill(proc.pid, signal.SIGCONT)
                try:
                    proc.wait(self.stop_timeout)
                except subprocess.TimeoutExpired:
                    log.warning("broker pid %s ignored SIGTERM for %.0fs; killing it", proc.pid, self.stop_timeout)
                    proc.kill()
                    proc.wait()
        finally:
            self._release()
            if self.remove_on_stop and not self.persistent:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the broker's PID (fault injection: SIGKILL, SIGSTOP, SIGCONT). After SIGKILL the process
        is reaped and the node is stopped; a persistent node can then be started again on the same data.

        Raises:
            BrokerStartError: the broker is not running.
        """
        if self._proc is None:
            raise BrokerStartError("the local broker is not running")
        self._proc.send_signal(sig)
        if sig == signal.SIGKILL:
            self._proc.wait(self.stop_timeout)
            self._proc = None
            self._release()

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
        try:
            fmt, run = self._prepare()
            if fmt is not None:
                formatter = await asyncio.create_subprocess_exec(
                    *fmt, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
                )
                output, _ = await formatter.communicate()
                self._formatted((formatter.returncode or 0, output))
            self._spawn(run)
            async with asyncio.timeout(self.start_timeout):
                while not self._check_ready():  # noqa: ASYNC110 - polls a child process, no event to await
                    await asyncio.sleep(0.1)
        except TimeoutError:
            await self.astop()
            raise BrokerStartError(f"broker not ready after {self.start_timeout:.0f}s:\n{self.tail_log()}") from None
        except BaseException:
            await self.astop()
            raise
        return self._started(began)

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
