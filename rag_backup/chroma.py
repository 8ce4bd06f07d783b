"""Chroma directory: chroma.sqlite3 through SQLite's online backup API (into memory, so no
plaintext copy hits the disk) while its write lock is held, so Chroma's writers wait and the
index files are copied with no writer running; every file is hashed into the manifest."""

from __future__ import annotations

import hashlib
import io
import os
import sqlite3
import stat
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from rag_backup.errors import BackupError
from rag_backup.procs import Proc
from rag_backup.streams import CHUNK

SQLITE_NAME = "chroma.sqlite3"
SQLITE_SIDE_FILES = {f"{SQLITE_NAME}-wal", f"{SQLITE_NAME}-shm", f"{SQLITE_NAME}-journal"}


@dataclass(frozen=True)
class FileRecord:
    path: str
    size: int
    sha256: str

    def to_json(self) -> dict[str, object]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


class _HashingReader(io.RawIOBase):
    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.size = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self.digest.update(data)
        self.size += len(data)
        return data


# Top-level entries rag-backup's restore keeps in the Chroma directory (the previous contents,
# a staged or failed restore): not Chroma's data, never backed up.
RESTORE_ENTRY_PREFIX = ".rag-"


def _walk(root: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root:
            dirnames[:] = [d for d in dirnames if not d.startswith(RESTORE_ENTRY_PREFIX)]
            filenames = [f for f in filenames if not f.startswith(RESTORE_ENTRY_PREFIX)]
        dirnames.sort()
        for name in sorted(filenames):
            found.append(Path(dirpath) / name)
        for name in dirnames:
            found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: str(p.relative_to(root)))


def snapshot_feeder(
    chroma_dir: Path, records: list[FileRecord], busy_timeout_s: float
) -> Callable[[IO[bytes]], None]:
    """A feeder writing a tar of a consistent snapshot of ``chroma_dir``; fills ``records``."""

    def feed(out: IO[bytes]) -> None:
        sqlite_path = chroma_dir / SQLITE_NAME
        lock_conn: sqlite3.Connection | None = None
        if sqlite_path.exists():
            lock_conn = sqlite3.connect(sqlite_path, timeout=busy_timeout_s, isolation_level=None)
        try:
            if lock_conn is not None:
                try:
                    # Chroma's writers commit to SQLite before they touch the index files; the
                    # write lock makes them wait while we copy.
                    lock_conn.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError as error:
                    raise BackupError(
                        f"CHROMA_DIR: cannot lock {sqlite_path} within {busy_timeout_s:.0f}s "
                        f"({error}); a writer holds it"
                    ) from error
            with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
                if lock_conn is not None:
                    # The locking connection has a write transaction open, which the backup
                    # API refuses to read from; a second connection reads the same state.
                    reader = sqlite3.connect(sqlite_path, timeout=busy_timeout_s)
                    memory = sqlite3.connect(":memory:")
                    try:
                        reader.backup(memory)
                    finally:
                        reader.close()
                    data = memory.serialize()
                    memory.close()
                    info = tarfile.TarInfo(SQLITE_NAME)
                    info.size = len(data)
                    info.mode = 0o644
                    info.mtime = int(sqlite_path.stat().st_mtime)
                    tar.addfile(info, io.BytesIO(data))
                    records.append(
                        FileRecord(SQLITE_NAME, len(data), hashlib.sha256(data).hexdigest())
                    )
                    del data
                for path in _walk(chroma_dir):
                    rel = path.relative_to(chroma_dir).as_posix()
                    if rel == SQLITE_NAME or rel in SQLITE_SIDE_FILES:
                        continue
                    st = path.lstat()
                    if stat.S_ISDIR(st.st_mode):
                        tar.addfile(tar.gettarinfo(str(path), arcname=rel))
                        continue
                    if not stat.S_ISREG(st.st_mode):
                        raise BackupError(f"CHROMA_DIR: {rel} is not a regular file or directory")
                    info = tar.gettarinfo(str(path), arcname=rel)
                    with open(path, "rb") as handle:
                        hashing = _HashingReader(handle)
                        tar.addfile(info, hashing)
                    after = path.stat()
                    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                        raise BackupError(
                            f"CHROMA_DIR: {rel} changed while it was copied; a writer is running "
                            "(stop the api during the backup)"
                        )
                    records.append(FileRecord(rel, hashing.size, hashing.digest.hexdigest()))
        finally:
            if lock_conn is not None:
                if lock_conn.in_transaction:
                    lock_conn.execute("ROLLBACK")
                lock_conn.close()

    return feed


def _safe_relative(name: str) -> PurePosixPath:
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise BackupError(f"chroma archive: unsafe member path {name!r}")
    return rel


def read_archive(
    stream: IO[bytes],
    expected: list[dict[str, object]],
    target: Path | None,
    *,
    hash_files: bool = True,
) -> None:
    """Read the tar stream, check every file's name and size (and SHA-256 unless
    ``hash_files`` is off, for a caller that checks the hash of the whole archive) against
    ``expected`` (the manifest's list), and extract into ``target`` when given (which must
    exist and be empty)."""
    wanted = {str(item["path"]): item for item in expected}
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                rel = _safe_relative(member.name)
                dest = target / rel if target is not None else None
                if member.isdir():
                    if dest is not None:
                        dest.mkdir(parents=True, exist_ok=True)
                    continue
                if not member.isfile():
                    raise BackupError(f"chroma archive: unexpected member type for {member.name}")
                source = tar.extractfile(member)
                assert source is not None
                digest = hashlib.sha256()
                size = 0
                out = None
                if dest is not None:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    out = open(dest, "xb")  # noqa: SIM115
                try:
                    while True:
                        chunk = source.read(CHUNK)
                        if not chunk:
                            break
                        if hash_files:
                            digest.update(chunk)
                        size += len(chunk)
                        if out is not None:
                            out.write(chunk)
                finally:
                    if out is not None:
                        out.close()
                        os.chmod(dest, member.mode & 0o777)  # type: ignore[arg-type]
                        os.utime(dest, (member.mtime, member.mtime))  # type: ignore[arg-type]
                record = wanted.get(member.name)
                if record is None:
                    raise BackupError(f"chroma archive: {member.name} is not in the manifest")
                if size != record["size"] or (
                    hash_files and digest.hexdigest() != record["sha256"]
                ):
                    raise BackupError(f"chroma archive: {member.name} does not match its checksum")
                seen.add(member.name)
    except tarfile.TarError as error:
        raise BackupError(f"chroma archive is damaged: {error}") from error
    missing = sorted(set(wanted) - seen)
    if missing:
        raise BackupError(f"chroma archive lacks {len(missing)} file(s), e.g. {missing[0]}")


def extract_with_tar(stream: IO[bytes], expected: list[dict[str, object]], target: Path) -> None:
    """Extract with GNU tar (C: far less CPU than tarfile), then check the tree against the
    manifest: exactly its files, each of its size, only regular files and directories.
    For a caller that checks the SHA-256 of the whole (authenticated) archive, which covers
    every file's content."""
    tar = Proc(
        "tar -x (chroma)",
        ["tar", "-x", "-f", "-", "-C", str(target), "--no-same-owner", "--no-overwrite-dir"],
        stdin=stream,
        stdout=subprocess.DEVNULL,
    )
    try:
        tar.check(timeout=86400)
    except BackupError as error:
        raise BackupError(f"chroma archive is damaged: {error}") from error
    finally:
        tar.close()
    wanted = {str(item["path"]): int(item["size"]) for item in expected}  # type: ignore[call-overload]
    found: dict[str, int] = {}
    for dirpath, dirnames, filenames in os.walk(target):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = path.relative_to(target).as_posix()
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode):
                continue
            if not stat.S_ISREG(st.st_mode):
                raise BackupError(f"chroma archive: unexpected member type for {rel}")
            found[rel] = st.st_size
    extra = sorted(set(found) - set(wanted))
    if extra:
        raise BackupError(f"chroma archive: {extra[0]} is not in the manifest")
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise BackupError(f"chroma archive lacks {len(missing)} file(s), e.g. {missing[0]}")
    for rel, size in found.items():
        if size != wanted[rel]:
            raise BackupError(f"chroma archive: {rel} does not match its checksum (size)")


def sqlite_integrity(path: Path) -> str:
    if not path.exists():
        return "ok"
    # immutable: a restored copy has no writer, and no -wal/-shm files get created beside it.
    conn = sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True)
    try:
        rows = conn.execute("PRAGMA integrity_check").fetchall()
    except sqlite3.DatabaseError as error:
        return str(error)
    finally:
        conn.close()
    return "ok" if rows == [("ok",)] else "; ".join(str(r[0]) for r in rows[:3])
