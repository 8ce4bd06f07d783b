"""Reading single files of an untrusted tree: a staged copy of a backup, possibly while tar
still writes it, before anything in it is authenticated. A symlink is never followed, a
FIFO never blocks the reader, only a regular file is read, and only a bounded prefix."""

from __future__ import annotations

import os
import stat
from pathlib import Path


def open_regular(name: str, dir_fd: int) -> int | None:
    """Read-only, non-blocking (a FIFO would otherwise block), not following a symlink;
    None unless it is still a regular file."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError:
        return None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    return fd


def read_head(directory: Path, name: str, max_bytes: int) -> str | None:
    """At most ``max_bytes`` of ``directory/name`` as ASCII text (anything else replaced);
    None while there is no such regular file."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fd = open_regular(name, dir_fd)
    finally:
        os.close(dir_fd)
    if fd is None:
        return None
    with os.fdopen(fd, "rb") as handle:
        return handle.read(max_bytes).decode("ascii", errors="replace")
