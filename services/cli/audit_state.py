"""What ``evhub audit`` remembers between runs: the last checkpoint an auditor verified, or a witness cosigned,
per log — in a local state directory, never on the server.

Owns the files ``<state dir>/<role>/<sha256(origin)[:32]>/checkpoint`` (the signed note as verified) and their
atomic replacement (temporary file, fsync, rename, directory fsync), and an exclusive lock per log and role
(``flock``), so that two witness processes on one state directory cannot both cosign from the same old size (the
race c2sp.org/tlog-witness warns of: checking the old size and recording the new checkpoint are one step).

The first run finds nothing and records what it verified: trust on first use. From then on the log must only grow
from that checkpoint. A state file that no longer opens with the log's key is an error, never silently replaced.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

from services.audit.checkpoint import Checkpoint, open_checkpoint
from services.audit.note import Verifier
from services.shared.durable_files import replace_atomically
from services.shared.errors import ConfigurationError, EvidenceHubError


class CheckpointState:
    def __init__(self, root: Path, *, role: str) -> None:
        self._root = root
        self._role = role

    def directory(self, origin: str) -> Path:
        return self._root / self._role / hashlib.sha256(origin.encode()).hexdigest()[:32]

    def path(self, origin: str) -> Path:
        return self.directory(origin) / "checkpoint"

    def load(self, origin: str, log: Verifier) -> tuple[Checkpoint, bytes] | None:
        """The checkpoint recorded for ``origin`` (verified again with ``log``), or None on a first run.

        Raises:
            ConfigurationError: the state file is unreadable, or no longer a checkpoint of this log with this key.
        """
        path = self.path(origin)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ConfigurationError(f"cannot read {path}: {exc.strerror}") from exc
        try:
            cp = open_checkpoint(data, log=log).checkpoint
        except EvidenceHubError as exc:
            raise ConfigurationError(f"{path} does not hold a checkpoint of {origin} signed by the given log key "
                                     f"({exc.detail}); move it away only if you know why") from exc  # fmt: skip
        return cp, data

    def save(self, origin: str, data: bytes) -> Path:
        """Record ``data`` (a verified checkpoint note) atomically. Raises: ConfigurationError."""
        path = self.path(origin)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(path, data)
        except OSError as exc:
            raise ConfigurationError(f"cannot record the checkpoint in {path}: {exc.strerror}") from exc
        return path

    @contextlib.contextmanager
    def locked(self, origin: str) -> Iterator[None]:
        """Hold the exclusive lock of this log and role.

        Raises:
            ConfigurationError: another process holds it (one witness per state directory and log).
        """
        directory = self.directory(origin)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigurationError(f"cannot use {directory}: {exc.strerror}") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise ConfigurationError(f"another evhub process uses {directory}; run one {self._role} per "
                                         "state directory") from exc  # fmt: skip
            yield
        finally:
            os.close(fd)
