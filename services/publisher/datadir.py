"""The publisher's data directory: one process at a time.

Owns: the exclusive lock on ``DATA_DIR`` (``flock`` on ``DATA_DIR/publisher.lock``, held for the life of the process;
the kernel drops it when the process dies, SIGKILL included, so a crash never leaves a stale lock) and the paths of
what lives there: the SQLite state and the content store.

Does not own: what the state means (``state``), the content (``services.shared.content``). Two publishers on *other*
directories with the same signing key are stopped by the key's fence in Kafka (``outbox``), not here.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from services.shared.errors import StateRefused, StoreUnavailable

STATE_FILE = "publisher.sqlite3"
LOCK_FILE = "publisher.lock"


class DataDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd: int | None = None

    @property
    def state(self) -> Path:
        return self.root / STATE_FILE

    @property
    def content(self) -> Path:
        return self.root / "content"

    def lock(self) -> None:
        """Take the directory for this process.

        Raises:
            StateRefused: another process holds it (its PID is named).
            StoreUnavailable: the directory can't be created or the lock file opened.
        """
        if self._fd is not None:
            return
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StoreUnavailable(f"cannot use {self.root} as the publisher's data directory: {exc.strerror}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise StateRefused(
                f"data directory {self.root} is in use by another publisher (pid {holder}); "
                "one publisher per data directory and per signing key"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def unlock(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None
