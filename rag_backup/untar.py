"""Extraction of a base backup's tar (pg_basebackup's: ustar headers, regular files and
directories) from decrypted pieces, in a thread of the restore's own pipeline: no pipe and
no tar process in between (docs/backup.md, benchmark: that hop was a sixth of a large
restore's CPU).

The archive is untrusted until the whole stream has been authenticated (the manifest's
SHA-256, the message's MDC), so: only regular files and directories, names relative and
without '..', every header's checksum checked, nothing opened through a symbolic link
(directories are opened by descriptor with O_NOFOLLOW, files created with O_EXCL and
O_NOFOLLOW: none can exist beforehand in the fresh directory, and no member can make a
link), modes limited to owner and group read/write, and as root every file and
directory handed to the data directory's owner. A member named twice is refused."""

from __future__ import annotations

import os
import time
from pathlib import PurePosixPath

from rag_backup import clibs
from rag_backup.errors import BackupError

BLOCK = 512
REGULAR = (b"0", b"\0")
DIRECTORY = b"5"
# Modes kept from the archive (PostgreSQL's are 0600/0700, or 0640/0750 with group access).
FILE_MODE_MASK = 0o640
DIR_MODE_MASK = 0o750
OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
CREATE_FILE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
# With ``writeback``: the write-back of a file is started every this many bytes written.
WRITEBACK_BYTES = 8 << 20


def _octal(field: bytes, what: str, name: str) -> int:
    digits = field.rstrip(b"\0 ").lstrip(b" ")
    if not digits or any(c not in b"01234567" for c in digits):
        raise BackupError(f"physical backup archive: bad {what} in the header of {name!r}")
    return int(digits, 8)


def _checksum_ok(header: bytes) -> bool:
    recorded = header[148:156].rstrip(b"\0 ").lstrip(b" ")
    if not recorded or any(c not in b"01234567" for c in recorded):
        return False
    return sum(header[:148]) + 8 * 32 + sum(header[156:]) == int(recorded, 8)


class TarExtractor:
    """Feed it the archive in pieces (``feed``), then ``finish``; ``close`` in any case.
    ``root`` None: nothing is written, the archive is only checked as an extraction would
    check it (what ``verify`` does). ``owner`` (uid, gid): given to every file and directory
    made (when running as root).
    ``writeback``: start the kernel's write-back of each file's data as it is written
    (sync_file_range, asynchronous), so a sync at the end has little left to wait for."""

    def __init__(
        self,
        root: str | os.PathLike[str] | None,
        owner: tuple[int, int] | None,
        *,
        writeback: bool = False,
    ) -> None:
        self._owner = owner
        self._writeback = writeback
        self._written = 0  # of the current file
        self._started = 0  # of those, bytes whose write-back has been started
        self._check_only = root is None
        # Directory descriptors by name (-1 when only checking).
        self._dirs: dict[str, int] = {"": -1 if root is None else os.open(root, OPEN_DIR)}
        self._header = bytearray()
        self._file: int | None = None
        self._file_name = ""
        self._left = 0  # data bytes of the current member still to come
        self._pad = 0  # then padding to the next block
        self._ended = False  # the end-of-archive block was read
        self.names: set[str] = set()
        self.files: set[str] = set()  # of the names, the regular files
        self.cpu_seconds = 0.0

    def feed(self, data: memoryview) -> None:
        started = time.thread_time()
        try:
            self._feed(data)
        finally:
            self.cpu_seconds += time.thread_time() - started

    def _feed(self, data: memoryview) -> None:
        pos = 0
        size = len(data)
        while pos < size:
            if self._left:
                take = min(self._left, size - pos)
                self._write(data[pos : pos + take])
                pos += take
                self._left -= take
                if not self._left:
                    self._close_file()
                continue
            if self._pad:
                take = min(self._pad, size - pos)
                pos += take
                self._pad -= take
                continue
            if self._ended:
                return  # what follows the end-of-archive blocks is not read (as GNU tar)
            take = min(BLOCK - len(self._header), size - pos)
            self._header += data[pos : pos + take]
            pos += take
            if len(self._header) == BLOCK:
                header = bytes(self._header)
                self._header.clear()
                self._member(header)

    def _member(self, header: bytes) -> None:
        if header == bytes(BLOCK):
            self._ended = True
            return
        if not _checksum_ok(header):
            raise BackupError("physical backup archive is damaged: a header's checksum is wrong")
        raw = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar":
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                raw = prefix + b"/" + raw
        try:
            name = raw.decode()
        except UnicodeDecodeError as error:
            raise BackupError(
                f"physical backup archive: member name {raw!r} is not UTF-8"
            ) from error
        rel = PurePosixPath(name)
        if rel.is_absolute() or ".." in rel.parts or not rel.parts or "\0" in name:
            raise BackupError(f"physical backup archive: unsafe member path {name!r}")
        key = rel.as_posix()
        if key in self.names:
            raise BackupError(f"physical backup archive: {key} appears twice")
        self.names.add(key)
        kind = header[156:157]
        mode = _octal(header[100:108], "mode", key)
        size = _octal(header[124:136], "size", key)
        if kind == DIRECTORY:
            self._directory(rel.parts, mode & DIR_MODE_MASK | 0o700)
            self._pad = size  # a directory has no data; skipped should a size be given
            self._pad += (-size) % BLOCK
            return
        if kind not in REGULAR:
            raise BackupError(
                f"physical backup archive: {key} is not a file or directory "
                "(tablespaces are not supported)"
            )
        parent = self._directory(rel.parts[:-1], 0o700)
        if key in self._dirs:
            raise BackupError(f"physical backup archive: {key} is both a file and a directory")
        self.files.add(key)
        if not self._check_only:
            fd = os.open(rel.parts[-1], CREATE_FILE, mode & FILE_MODE_MASK | 0o600, dir_fd=parent)
            if self._owner is not None:
                os.fchown(fd, *self._owner)
            self._file = fd
        self._file_name = key
        self._written = self._started = 0
        self._left, self._pad = size, (-size) % BLOCK
        if not size:
            self._close_file()

    def _directory(self, parts: tuple[str, ...], mode: int) -> int:
        """The descriptor of directory ``parts`` (made, with missing parents, if needed)."""
        key = "/".join(parts)
        fd = self._dirs.get(key)
        if fd is not None:
            return fd
        parent = self._directory(parts[:-1], 0o700)
        if key in self.files:
            raise BackupError(f"physical backup archive: {key} is both a file and a directory")
        if self._check_only:
            self._dirs[key] = -1
            return -1
        try:
            os.mkdir(parts[-1], mode, dir_fd=parent)
            made = True
        except FileExistsError:
            made = False  # only a directory this extraction made can be here: opened below
        try:
            fd = os.open(parts[-1], OPEN_DIR, dir_fd=parent)
        except OSError as error:
            raise BackupError(
                f"physical backup archive: {key} is both a file and a directory"
            ) from error
        if made:
            os.fchmod(fd, mode)  # the umask had its say in mkdir
            if self._owner is not None:
                os.fchown(fd, *self._owner)
        self._dirs[key] = fd
        return fd

    def _write(self, data: memoryview) -> None:
        if self._file is None:
            return  # only checking
        self._written += len(data)
        while data:
            data = data[os.write(self._file, data) :]
        if self._writeback and self._written - self._started >= WRITEBACK_BYTES:
            clibs.start_writeback(self._file, self._started, self._written - self._started)
            self._started = self._written

    def _close_file(self) -> None:
        if self._file is not None:
            if self._writeback and self._written > self._started:
                clibs.start_writeback(self._file, self._started, 0)
            os.close(self._file)
            self._file = None

    def finish(self) -> None:
        """The archive must not stop inside a header or a member's data."""
        if self._left or self._header:
            raise BackupError("physical backup archive is truncated (it ends inside a member)")

    def close(self) -> None:
        self._close_file()
        for fd in self._dirs.values():
            if fd >= 0:
                os.close(fd)
        self._dirs.clear()
