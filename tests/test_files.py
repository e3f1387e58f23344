"""robonet.files.atomic_write: the one state-file writer (temp file, fsync, os.replace, fsync dir)."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from unittest import mock

from twisted.trial.unittest import SynchronousTestCase

from robonet import files
from robonet.files import atomic_write


class AtomicWriteTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.dir = Path(tempfile.mkdtemp())
        self.addCleanup(shutil.rmtree, self.dir, True)

    def test_writes_and_replaces(self) -> None:
        """A new file gets the bytes; a second write replaces it by rename (new inode), no temp left."""
        path = self.dir / "state.json"
        atomic_write(path, b"one")
        inode = path.stat().st_ino
        atomic_write(str(path), b"two")
        self.assertEqual(path.read_bytes(), b"two")
        self.assertNotEqual(path.stat().st_ino, inode)
        self.assertEqual(os.listdir(self.dir), ["state.json"])

    def test_mode_bits_exact(self) -> None:
        """The mode is exactly what is asked for, whatever the umask; a secret is 0600."""
        old = os.umask(0o077)
        self.addCleanup(os.umask, old)
        atomic_write(self.dir / "public", b"x", mode=0o644)
        os.umask(0)
        atomic_write(self.dir / "secret", b"x", mode=0o600)
        self.assertEqual(stat.S_IMODE((self.dir / "public").stat().st_mode), 0o644)
        self.assertEqual(stat.S_IMODE((self.dir / "secret").stat().st_mode), 0o600)

    def test_creates_parent(self) -> None:
        """A missing parent directory is created."""
        atomic_write(self.dir / "a" / "b" / "f", b"x")
        self.assertEqual((self.dir / "a" / "b" / "f").read_bytes(), b"x")

    def test_large_data(self) -> None:
        """Short writes are continued until every byte is written."""
        data = os.urandom(3 * 2**20)
        atomic_write(self.dir / "big", data)
        self.assertEqual((self.dir / "big").read_bytes(), data)

    def test_failure_keeps_old_content(self) -> None:
        """If the write fails (here: fsync), the old file is untouched and no temporary file remains."""
        path = self.dir / "state"
        atomic_write(path, b"old")
        with mock.patch.object(files.os, "fsync", side_effect=OSError(5, "EIO")):
            self.assertRaises(OSError, atomic_write, path, b"new")
        self.assertEqual(path.read_bytes(), b"old")
        self.assertEqual(os.listdir(self.dir), ["state"])

    def test_fsyncs_file_and_directory(self) -> None:
        """The data and the directory entry are both fsynced, the file before the rename."""
        calls: list[str] = []
        real_fsync, real_replace = os.fsync, os.replace

        def fsync(fd: int) -> None:
            calls.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
            real_fsync(fd)

        def replace(a: str, b: str) -> None:
            calls.append("replace")
            real_replace(a, b)

        with mock.patch.object(files.os, "fsync", fsync), mock.patch.object(files.os, "replace", replace):
            atomic_write(self.dir / "f", b"x")
        self.assertEqual(calls, ["file", "replace", "dir"])

    def test_unwritable_raises(self) -> None:
        """A parent that is a file: OSError, nothing written."""
        (self.dir / "file").write_text("x")
        self.assertRaises(OSError, atomic_write, self.dir / "file" / "f", b"x")
