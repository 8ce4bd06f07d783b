"""Physical PostgreSQL backup: ``pg_basebackup`` as one tar on stdout (WAL fetched into it,
``backup_manifest`` included), and its restore: extract into a fresh data directory beside
the live one, start a private postgres on it (it replays the WAL and fsyncs the directory),
check the row counts, shut it down cleanly, then swap directories while the live server is
stopped."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import stat
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rag_backup import pg, untar
from rag_backup.errors import BackupError
from rag_backup.localpg import LocalPostgres, server_major_version
from rag_backup.procs import Proc
from rag_backup.progress import log
from rag_backup.streams import CHUNK
from rag_backup.untrusted_files import open_regular, read_head

KIND = "pg_basebackup_tar"
# Files that make a server start archive recovery or standby mode (and run restore_command):
# a base backup needs neither (its WAL is in the archive); an attacker could have written one.
SIGNAL_FILES = ("recovery.signal", "standby.signal")
# A running server's lock file: never in a base backup (pg_basebackup leaves it out). One in
# the archive could stop the private server from starting, or claim it is ready before it
# is (its status line is how the restore knows, localpg.LocalPostgres).
LOCK_FILE = "postmaster.pid"
# Files every base backup of a cluster holds; verify checks they are in the archive.
REQUIRED_MEMBERS = ("PG_VERSION", "global/pg_control", "backup_label", "backup_manifest")
# PITR: whether the private server has left recovery is asked (a psql process) every
# RECOVERY_ASK_INTERVAL_S, and sooner (RECOVERY_RETRY_S after the last time) once its
# recovery.signal is gone, which is looked at every RECOVERY_POLL_S.
RECOVERY_ASK_INTERVAL_S = 0.2
RECOVERY_RETRY_S = 0.03
RECOVERY_POLL_S = 0.01


def start_basebackup(settings: pg.PostgresSettings) -> Proc:
    """The whole cluster as one tar on stdout. ``-X fetch`` puts the WAL needed to make the
    copy consistent into the same tar (streaming WAL cannot go to stdout)."""
    return Proc(
        "pg_basebackup",
        [
            settings.tool("pg_basebackup"),
            "--pgdata=-",
            "--format=tar",
            "--wal-method=fetch",
            "--checkpoint=fast",
            "--no-password",
        ],
        env=settings.env(),
    )


def _require_members(files: set[str]) -> None:
    missing = [name for name in REQUIRED_MEMBERS if name not in files]
    if missing:
        raise BackupError(f"physical backup archive lacks {', '.join(missing)}")


def check_archive(stream: IO[bytes]) -> None:
    """Read the base backup tar through, writing nothing: the checks a restore's extraction
    makes (untar.py), so ``verify`` passes no archive a restore would refuse."""
    extractor = untar.TarExtractor(None, None)
    try:
        while chunk := stream.read(CHUNK):
            extractor.feed(memoryview(chunk))
        extractor.finish()
    finally:
        extractor.close()
    _require_members(extractor.files)


def _regular_files(root: Path) -> Iterator[tuple[str, str, int, int]]:
    """(directory, name, size, directory fd) of every regular file under ``root``. The tree
    was written by an untrusted archive: walked by directory file descriptors without
    following symbolic links (os.fwalk), so a symlink put in anywhere leads nowhere."""
    for directory, _, files, dir_fd in os.fwalk(root, follow_symlinks=False):
        for name in files:
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode):
                yield directory, name, info.st_size, dir_fd


def sync_tree(root: Path) -> None:
    """Make the extracted copy durable before a server runs on it: one syncfs of its
    filesystem (the copy has no symlinks, so nothing of it lies elsewhere). An fsync per
    file costs a journal commit or a cache flush each here: ~1 s for a base backup's
    ~1000 files against ~0.05 s. Per-file fsync where syncfs is missing."""
    try:
        syncfs = ctypes.CDLL(None, use_errno=True).syncfs
    except (OSError, AttributeError):
        fsync_tree(root)
        return
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if syncfs(fd) != 0:
            error = ctypes.get_errno()
            raise BackupError(f"syncing {root} failed: {os.strerror(error)}")
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every regular file and directory under ``root``."""
    for _, name, _, dir_fd in _regular_files(root):
        fd = open_regular(name, dir_fd)
        if fd is not None:
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    for _, _, _, dir_fd in os.fwalk(root, follow_symlinks=False):
        os.fsync(dir_fd)


def extract_base_backup(
    decrypt_into: Callable[[Callable[[memoryview], None]], None],
    target: Path,
    *,
    durable: bool = False,
    phases: dict[str, float] | None = None,
) -> None:
    """Extract the base backup into ``target`` (an empty directory) as ``decrypt_into``
    hands over its plaintext (streams.decrypt_into: a thread of the pipeline writes the
    files, untar.py). Files and directories get ``target``'s owner. ``durable``: the copy
    will go live, so the write-back of each file starts as it is written (the disk writes
    while the CPUs decrypt and decompress, as PostgreSQL's own pre-sync does) and the copy
    is synced at the end.
    ``phases`` gets the CPU seconds spent writing the files and the fsync's wall time."""
    info = target.stat()
    owner = (info.st_uid, info.st_gid) if os.geteuid() == 0 else None
    extractor = untar.TarExtractor(target, owner, writeback=durable)
    try:
        decrypt_into(extractor.feed)
        extractor.finish()
    finally:
        extractor.close()
    if phases is not None:
        phases["cpu untar"] = extractor.cpu_seconds
    _require_members(extractor.files)
    for name in (*SIGNAL_FILES, LOCK_FILE):
        if (target / name).exists():
            log(f"physical backup: removing {name} found in the backup (never honoured)")
            (target / name).unlink()
    if durable:
        started = time.monotonic()
        sync_tree(target)
        if phases is not None:
            phases["fsync"] = time.monotonic() - started


# backup_label's line naming the WAL file a base backup starts in.
START_WAL_LINE = re.compile(r"START WAL LOCATION: \S+ \(file ([0-9A-F]{24})\)")
BACKUP_LABEL_MAX_BYTES = 64 * 1024


def start_segment_early(data_dir: Path) -> str | None:
    """The start segment from a backup_label that tar may still be writing (None until it
    is complete enough). The file is not authenticated yet: a symlink is not followed, a
    FIFO or anything not a regular file is not read, and at most 64 KiB are read."""
    text = read_head(data_dir, "backup_label", BACKUP_LABEL_MAX_BYTES)
    if text is None:
        return None
    match = START_WAL_LINE.search(text)
    return match[1] if match else None


def chown_tree(root: Path, uid: int, gid: int) -> None:
    os.chown(root, uid, gid)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def counts_within(
    before: Mapping[str, int], after: Mapping[str, int], actual: Mapping[str, int], where: str
) -> None:
    """The base backup is consistent at a point between the logical snapshot (``before``)
    and the count taken after pg_basebackup ended (``after``): every table's count must lie
    between the two (equal to both when nothing was written meanwhile)."""
    if set(actual) != set(before) or set(before) != set(after):
        raise BackupError(
            f"{where}: tables differ from the backup: expected {sorted(before)}, "
            f"got {sorted(actual)}"
        )
    diffs = []
    for table in sorted(actual):
        low, high = sorted((int(before[table]), int(after[table])))
        if not low <= int(actual[table]) <= high:
            expected = str(low) if low == high else f"{low}..{high}"
            diffs.append(f"{table}: expected {expected}, got {actual[table]}")
    if diffs:
        raise BackupError(f"{where}: row counts differ from the backup: " + "; ".join(diffs[:5]))


@dataclass(frozen=True)
class PhysicalTarget:
    """The live data directory of a stopped PostgreSQL and the server binaries."""

    data_dir: Path
    bin_dir: Path

    def staged_dir(self, backup_id: str) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.restore-{backup_id}"

    def kept_dir(self, backup_id: str) -> Path:
        return self.data_dir.parent / f"{self.data_dir.name}.pre-restore-{backup_id}"

    def owner_path(self) -> Path:
        return self.data_dir if self.data_dir.exists() else self.data_dir.parent


def check_target(target: PhysicalTarget, backup_id: str, component: Mapping[str, Any]) -> None:
    """Everything that can be checked before touching data; raises with the option named."""
    data = target.data_dir
    option = "--pg-data-dir / RAG_BACKUP_PG_DATA_DIR"
    if not data.parent.is_dir():
        raise BackupError(f"{option}: parent of {data} does not exist")
    if data.exists():
        if not data.is_dir():
            raise BackupError(f"{option}: {data} is not a directory")
        if os.path.ismount(data):
            raise BackupError(
                f"{option}: {data} is a mount point and cannot be swapped by a rename; "
                "keep the data directory in a subdirectory of the volume (e.g. PGDATA="
                "/var/lib/postgresql/data/pgdata)"
            )
        if not (data / "PG_VERSION").is_file():
            raise BackupError(
                f"{option}: {data} is not a PostgreSQL data directory (no PG_VERSION); "
                "refusing to replace it"
            )
        if (data / "postmaster.pid").exists():
            raise BackupError(
                f"{option}: PostgreSQL is running on {data} (postmaster.pid exists); stop it "
                "before a physical restore (or use --pg-mode logical); nothing was changed"
            )
        if os.stat(data).st_dev != os.stat(data.parent).st_dev:
            raise BackupError(f"{option}: {data} is on another filesystem than its parent")
    for path in (target.staged_dir(backup_id), target.kept_dir(backup_id)):
        if path.exists():
            raise BackupError(f"{path} already exists (an earlier restore?); move it away first")
    if os.geteuid() != 0 and target.owner_path().stat().st_uid != os.geteuid():
        raise BackupError(
            f"{option}: {target.owner_path()} belongs to another user; run the restore as its "
            "owner (the postgres user) or as root"
        )
    if os.geteuid() == 0 and target.owner_path().stat().st_uid == 0:
        raise BackupError(
            f"{option}: {target.owner_path()} belongs to root; PostgreSQL cannot run on it "
            "(chown it to the postgres user first)"
        )
    version = str(component.get("server_version", ""))
    backup_major = int(version.split(".")[0]) if version.split(".")[0].isdigit() else None
    server_major = server_major_version(target.bin_dir)
    if backup_major is not None and backup_major != server_major:
        raise BackupError(
            f"--pg-bin-dir: the backup is of PostgreSQL {backup_major}, the binaries in "
            f"{target.bin_dir} are {server_major}; a physical backup needs the same major version"
        )


def check_cluster(
    data_dir: Path,
    bin_dir: Path,
    component: Mapping[str, Any],
    work_dir: Path,
    jobs: int,
    *,
    durable: bool,
    where: str,
    phases: dict[str, float] | None = None,
) -> dict[str, int]:
    """Start a private postgres on the extracted copy (WAL replay), compare row counts with
    the manifest, shut it down cleanly. ``durable``: fsync on, so PostgreSQL syncs the whole
    directory during recovery (for a copy that will go live). ``phases`` gets the wall time
    of each step."""
    physical = component["physical"]
    started = time.monotonic()
    server = LocalPostgres(
        bin_dir, work_dir, jobs, data_dir=data_dir, user=str(physical["user"]), durable=durable
    )
    try:
        database = str(component["database"])
        settings = pg.PostgresSettings(database, server.settings.libpq_env, jobs, None)
        ready = time.monotonic()
        counts = pg.row_counts(settings, database)
        counted = time.monotonic()
        counts_within(component["row_counts"], physical["row_counts_after"], counts, where)
        server.stop_checked()
        stopped = time.monotonic()
        synced = ", directory fsynced" if durable else ""
        log(
            f"{where}: private server ready (WAL replayed{synced})"
            f" in {ready - started:.2f}s, rows counted in {counted - ready:.2f}s, "
            f"shut down in {stopped - counted:.2f}s"
        )
        if phases is not None:
            phases["server start + WAL replay"] = ready - started
            phases["row counts"] = counted - ready
            phases["shutdown"] = stopped - counted
    finally:
        server.stop()
    return counts


def check_pitr_cluster(
    data_dir: Path,
    bin_dir: Path,
    component: Mapping[str, Any],
    work_dir: Path,
    jobs: int,
    recovery: tuple[str, ...],
    timeout_s: float = 3600,
    probe: Callable[[pg.PostgresSettings], None] | None = None,
) -> dict[str, int]:
    """Start a private postgres on the extracted copy in archive recovery (``recovery``:
    restore_command and target), wait until it has reached the target and promoted, count
    the rows (they are the target time's, not the backup's), shut it down cleanly."""
    (data_dir / "recovery.signal").touch()
    server = LocalPostgres(
        bin_dir,
        work_dir,
        jobs,
        data_dir=data_dir,
        user=str(component["physical"]["user"]),
        durable=True,
        recovery=recovery,
    )
    try:
        database = str(component["database"])
        deadline = time.monotonic() + timeout_s
        while pg.psql_value(server.settings, "SELECT pg_is_in_recovery()", "postgres") != "f":
            _until_recovery_may_have_ended(data_dir, deadline)
        settings = pg.PostgresSettings(database, server.settings.libpq_env, jobs, None)
        counts = pg.row_counts(settings, database)
        if probe is not None:
            probe(settings)
        server.stop_checked()
    finally:
        server.stop()
    if (data_dir / "recovery.signal").exists():
        raise BackupError("postgres (PITR): the server did not leave recovery")
    return counts


def _until_recovery_may_have_ended(data_dir: Path, deadline: float) -> None:
    """Returns when it is worth asking the server again whether it left recovery: once its
    recovery.signal is gone (it removes the file as archive recovery ends; a stat, no
    process) or after RECOVERY_ASK_INTERVAL_S in any case."""
    asked_at = time.monotonic()
    while True:
        waited = time.monotonic() - asked_at
        if waited >= RECOVERY_ASK_INTERVAL_S or (
            waited >= RECOVERY_RETRY_S and not (data_dir / "recovery.signal").exists()
        ):
            return
        if time.monotonic() > deadline:
            raise BackupError("postgres (PITR): recovery did not finish in time")
        time.sleep(RECOVERY_POLL_S)


def swap_in(target: PhysicalTarget, staged: Path, backup_id: str) -> str:
    """Rename live -> <data>.pre-restore-<id>, staged -> live (the server must be stopped)."""
    data = target.data_dir
    kept = target.kept_dir(backup_id)
    had_old = data.exists()
    if had_old:
        if (data / "postmaster.pid").exists():
            raise BackupError(
                f"PostgreSQL was started on {data} during the restore; nothing was swapped"
            )
        os.rename(data, kept)
    try:
        os.rename(staged, data)
    except OSError:
        if had_old:
            os.rename(kept, data)
        raise
    if had_old:
        return f"postgres: previous data directory kept as {kept} (remove it when satisfied)"
    return f"postgres: data directory {data} created (there was none before)"


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
