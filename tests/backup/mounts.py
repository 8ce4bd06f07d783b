"""Real mounts for the tests that need them (root only): a read-only bind mount (as an
off-host or other stack's backup volume is seen by the restore job) and a tmpfs mount point
(as a Docker volume is, at the api's and the restore job's Chroma directory)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _mount(*args: str) -> None:
    if os.geteuid() != 0:
        pytest.fail("this test needs root (mount) to build a real read-only mount / mount point")
    result = subprocess.run(
        ["mount", *args], capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        pytest.fail(f"mount {' '.join(args)} failed: {result.stderr.strip()}")


def _umount(path: Path) -> None:
    subprocess.run(["umount", "--lazy", str(path)], capture_output=True, timeout=30, check=False)


@contextlib.contextmanager
def read_only_bind(source: Path, target: Path) -> Iterator[Path]:
    """``source`` seen read-only at ``target``: every write there fails with EROFS."""
    target.mkdir(parents=True, exist_ok=True)
    _mount("--bind", str(source), str(target))
    try:
        _mount("-o", "remount,bind,ro", str(target))
        yield target
    finally:
        _umount(target)


@contextlib.contextmanager
def tmpfs_mount_point(target: Path, size: str = "64m") -> Iterator[Path]:
    """A real mount point at ``target`` (renaming it fails with EBUSY, as a volume's)."""
    target.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(target))
    try:
        yield target
    finally:
        _umount(target)
