"""Writing a small file so that a crash leaves either the old content or the new, never a mix.

Owns: :func:`replace_atomically` (a uniquely named temporary file in the same directory, fsync, rename, then the
directory's fsync unless the caller syncs many directories at once) and :func:`sync_dir`. Used for checkpoints,
tiles, receipts' proofs and an office's saved items.

Does not own: the content store's streamed writes (``content``), which hash while writing.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def replace_atomically(path: Path, data: bytes, *, sync_directory: bool = True) -> None:
    """``path`` holds ``data`` or what it held before. Safe for concurrent writers of different paths in one directory.

    Raises:
        OSError: the disk refused; the temporary file is removed.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if sync_directory:
        sync_dir(path.parent)


def sync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable. Raises: OSError."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
