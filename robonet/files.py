"""Atomic state-file writes: the one helper every module that persists state uses.

Readers (and a daemon restarted after a crash or a power cut) see either the old content or the
whole new content of a file, never a mixture or an empty file: the data goes to a temporary file in
the same directory (so the rename cannot cross a file system), is fsynced, renamed over the target
with ``os.replace`` (atomic on POSIX) and the directory is fsynced so the rename itself is durable.
Callers: the node identity (:mod:`robonet.node`), the camera settings and the camera password
(:mod:`robonet.services.camera`).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path: Path | str, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` by ``data`` atomically and durably, with permission bits ``mode``.

    The parent directory is created if missing. The temporary file is created with mode 0600 and
    set to ``mode`` before any byte is written, so a secret (``mode=0o600``) is never readable by
    others, even for a moment; the bits are exact (the umask does not apply). On any error the
    temporary file is removed and ``path`` is left as it was. Raises OSError (or a subclass).
    A failing fsync of the directory (some file systems refuse it) is not an error: the data
    itself has been synced.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path | str) -> None:
    """fsync ``directory`` so that renames and creations in it survive a power cut (best effort)."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
