"""The backup directory: one sub-directory per complete backup (named by its id), in-progress
backups under ``.tmp-<id>`` (renamed only when complete), a lock file, verification records.

The directory may be read-only (an off-host mount, prod's backups seen from staging):
verify, list, drill and restore never need to write into it. What they must write goes to
the state directory (``--state-dir`` / ``RAG_BACKUP_STATE_DIR``) or, without one, is
skipped with a note on stderr."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag_backup.errors import BackupError
from rag_backup.manifest import PG_LOGICAL_KIND, PG_PHYSICAL_KIND, manifest_problem
from rag_backup.progress import log

MANIFEST = "manifest.json"
VERIFICATION = "verification.json"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
ID_PATTERN = re.compile(r"^\d{8}T\d{6}Z(-\d+)?$")
MANIFEST_FORMAT = 1
# A backup dated further ahead than this is suspect (clock skew, a forged manifest): it is
# listed and flagged, but never "latest" and never the reason prune deletes another one.
FUTURE_TOLERANCE_S = 3600.0
# In the state directory: verification records of backups in a read-only BACKUP_DIR, and
# the restore lock when BACKUP_DIR has no lock file it could share.
STATE_VERIFICATIONS = "verifications"
STATE_LOCK = "restore.lock"
__all__ = ["PG_LOGICAL_KIND", "PG_PHYSICAL_KIND"]


def pg_forms(manifest: dict[str, Any]) -> tuple[str, ...]:
    """The PostgreSQL forms a backup holds, from its artifacts: ("logical",),
    ("physical",), ("logical", "physical") or () when it has no postgres component."""
    postgres = manifest.get("components", {}).get("postgres")
    if not postgres:
        return ()
    kinds = {artifact.get("kind") for artifact in postgres.get("artifacts", [])}
    return tuple(
        form
        for form, kind in (("logical", PG_LOGICAL_KIND), ("physical", PG_PHYSICAL_KIND))
        if kind in kinds
    )


def new_backup_id(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class BackupEntry:
    backup_id: str
    path: Path
    manifest: dict[str, Any]
    verification: dict[str, Any] | None
    future: bool = False  # dated more than FUTURE_TOLERANCE_S ahead of the clock: suspect

    @property
    def created_unix(self) -> float:
        return float(self.manifest["created_unix"])

    @property
    def total_size(self) -> int:
        return sum(
            int(artifact["size"])
            for component in self.manifest["components"].values()
            for artifact in component["artifacts"]
        )

    @property
    def pg_forms(self) -> tuple[str, ...]:
        return pg_forms(self.manifest)

    @property
    def has_pg_logical(self) -> bool:
        return "logical" in self.pg_forms

    @property
    def verified_ok(self) -> bool:
        return bool(self.verification and self.verification.get("ok"))


@dataclass(frozen=True)
class Malformed:
    """A backup folder whose manifest cannot be used; skipped by every command."""

    backup_id: str
    problem: str


def _writable_dir(path: Path) -> bool:
    """Really writable: ``os.access`` is true for root on a read-only mount."""
    if not os.access(path, os.W_OK):
        return False
    try:
        probe = tempfile.NamedTemporaryFile(dir=path, prefix=".rag-write-probe-")  # noqa: SIM115
    except OSError:
        return False
    probe.close()
    return True


class BackupStore:
    def __init__(self, root: Path, state_dir: Path | None = None, now: float | None = None) -> None:
        self.root = root
        self.state_dir = state_dir
        self._now = now
        self.malformed: list[Malformed] = []  # filled by entries()
        self.future_count = 0
        self.newest: BackupEntry | None = None  # newest not dated in the future, by entries()
        self.scanned = False  # entries() looked at every folder

    def now(self) -> float:
        return self._now if self._now is not None else time.time()

    def ensure(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BackupError(
                f"BACKUP_DIR / --backup-dir: cannot create {self.root}: {error.strerror}"
            ) from error
        if not _writable_dir(self.root):
            raise BackupError(f"BACKUP_DIR / --backup-dir: {self.root} is not writable")

    def writable(self) -> bool:
        return self.root.is_dir() and _writable_dir(self.root)

    def _state(self) -> Path | None:
        """The state directory, created on demand; None when none is configured."""
        if self.state_dir is None:
            return None
        try:
            self.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as error:
            raise BackupError(
                f"--state-dir / RAG_BACKUP_STATE_DIR: cannot create {self.state_dir}: "
                f"{error.strerror}"
            ) from error
        if not _writable_dir(self.state_dir):
            raise BackupError(
                f"--state-dir / RAG_BACKUP_STATE_DIR: {self.state_dir} is not writable"
            )
        return self.state_dir

    @contextlib.contextmanager
    def lock(self, purpose: str, *, read_only_ok: bool = False) -> Iterator[None]:
        """Exclusive, non-blocking lock; a second backup/prune/restore fails at once.
        ``read_only_ok`` (restore): on a read-only BACKUP_DIR the existing lock file is
        locked through a read-only descriptor (flock needs no write access), so the host's
        backup/prune still cannot delete the backup being restored; without a lock file
        there, the lock is taken in the state directory."""
        path = self.root / LOCK_FILE
        if not read_only_ok or self.writable():
            self.ensure()
            mode = "a+"
        elif path.is_file():
            mode = "r"
        else:
            state = self._state() or Path(tempfile.gettempdir())
            log(
                f"note: {self.root} is read-only and has no {LOCK_FILE}; taking the {purpose} "
                f"lock in {state}"
            )
            path, mode = state / STATE_LOCK, "a+"
        handle = open(path, mode)  # noqa: SIM115 - held for the with-block
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as error:
                handle.seek(0)
                holder = handle.read().strip() or "unknown"
                raise BackupError(
                    f"another rag-backup run holds the lock {path} ({holder}); "
                    f"not starting {purpose} concurrently"
                ) from error
            if mode == "a+":
                handle.seek(0)
                handle.truncate()
                handle.write(f"pid {os.getpid()} {purpose}\n")
                handle.flush()
            yield
        finally:
            handle.close()

    def remove_stale_temporaries(self) -> list[str]:
        """Remove ``.tmp-*`` left by an interrupted backup. Call only while holding the lock."""
        removed = []
        for entry in sorted(self.root.iterdir()):
            if entry.name.startswith(TMP_PREFIX) and entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry.name)
        return removed

    def temp_dir_for(self, backup_id: str) -> Path:
        return self.root / f"{TMP_PREFIX}{backup_id}"

    def unique_id(self, base: str) -> str:
        candidate, counter = base, 1
        while (self.root / candidate).exists() or self.temp_dir_for(candidate).exists():
            counter += 1
            candidate = f"{base}-{counter}"
        return candidate

    def _entry(self, path: Path) -> BackupEntry | Malformed | None:
        """The backup in ``path``; None without a manifest (not a complete backup)."""
        if not (path / MANIFEST).exists():
            return None
        manifest, problem = self._read_manifest(path / MANIFEST)
        if manifest is None:
            return Malformed(path.name, problem)
        return BackupEntry(
            backup_id=path.name,
            path=path,
            manifest=manifest,
            verification=self._verification(path),
            future=float(manifest["created_unix"]) > self.now() + FUTURE_TOLERANCE_S,
        )

    def entries(self) -> list[BackupEntry]:
        """Complete backups, oldest first. Directories without a manifest are not backups;
        those with a malformed one are skipped with a warning and kept in ``malformed``."""
        self.malformed = []
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            if not (path.is_dir() and ID_PATTERN.match(path.name)):
                continue
            entry = self._entry(path)
            if isinstance(entry, Malformed):
                log(f"warning: skipping backup folder {path}: {entry.problem}")
                self.malformed.append(entry)
            elif entry is not None:
                if entry.future:
                    log(
                        f"warning: backup {entry.backup_id} is dated "
                        f"{entry.manifest.get('created_at', entry.created_unix)}, more than "
                        f"{FUTURE_TOLERANCE_S / 3600:.0f} h ahead of this clock: suspect; it is "
                        "never taken as the newest and never makes prune delete another"
                    )
                found.append(entry)
        found.sort(key=lambda entry: (entry.created_unix, entry.backup_id))
        self.future_count = sum(1 for entry in found if entry.future)
        self.newest = next((entry for entry in reversed(found) if not entry.future), None)
        self.scanned = True
        return found

    def newest_verification_failed(self) -> bool:
        """The newest backup's latest verification record (read now: a verify may have run
        since the scan) says it failed. Never verified is not failed: BackupTooOld and the
        job's own success cover a backup that was never checked."""
        if self.newest is None:
            return False
        record = self._verification(self.newest.path)
        return record is not None and not record.get("ok")

    def get(self, backup_id: str | None) -> BackupEntry:
        """The backup with ``backup_id``, or the newest one (not dated in the future) when
        it is None or 'latest'."""
        if backup_id not in (None, "latest"):
            assert backup_id is not None
            if not ID_PATTERN.match(backup_id):
                raise BackupError(
                    f"backup id {backup_id!r} is not valid; expected e.g. 20250131T020000Z "
                    "(see `rag-backup list`)"
                )
            path = self.root / backup_id
            if not path.is_dir():
                raise BackupError(f"backup {backup_id} not found in {self.root}")
            entry = self._entry(path)
            if entry is None:
                raise BackupError(
                    f"backup {backup_id}: {MANIFEST} is missing; not a complete backup"
                )
            if isinstance(entry, Malformed):
                self.malformed = [entry]
                raise BackupError(
                    f"backup folder {path}: malformed {MANIFEST}: {entry.problem}; not using it"
                )
            return entry
        entries = self.entries()
        current = [entry for entry in entries if not entry.future]
        if not current:
            future = [entry.backup_id for entry in entries if entry.future]
            suffix = f" (only backups dated in the future: {', '.join(future)})" if future else ""
            raise BackupError(f"no usable backups in {self.root}{suffix}")
        return current[-1]

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            with open(path) as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    @staticmethod
    def _read_manifest(path: Path) -> tuple[dict[str, Any] | None, str]:
        try:
            with open(path) as handle:
                data = json.load(handle)
        except OSError as error:
            return None, f"cannot read {MANIFEST}: {error.strerror}"
        except (ValueError, RecursionError) as error:
            return None, f"{MANIFEST} is not valid JSON: {error}"
        problem = manifest_problem(data)
        if problem:
            return None, problem
        return data, ""

    def _state_verification_path(self, backup_id: str) -> Path | None:
        if self.state_dir is None:
            return None
        return self.state_dir / STATE_VERIFICATIONS / f"{backup_id}.json"

    def _verification(self, path: Path) -> dict[str, Any] | None:
        """The latest record: beside the backup, or in the state directory."""
        records = [self._read_json(path / VERIFICATION)]
        state = self._state_verification_path(path.name)
        if state is not None:
            records.append(self._read_json(state))
        found = [r for r in records if r is not None]
        if not found:
            return None
        return max(found, key=lambda r: str(r.get("checked_at", "")))

    def record_verification(self, entry: BackupEntry, ok: bool, message: str, how: str) -> None:
        """Beside the backup (prune reads it there); on a read-only BACKUP_DIR in the
        state directory; without one the result is only printed."""
        record = {
            "ok": ok,
            "message": message,
            "how": how,
            "checked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        }
        if _writable_dir(entry.path):
            write_json_atomic(entry.path / VERIFICATION, record)
            return
        state_path = self._state_verification_path(entry.backup_id)
        if state_path is None:
            log(
                f"note: {entry.path} is read-only and no --state-dir / RAG_BACKUP_STATE_DIR is "
                f"set: the {how} result is not recorded"
            )
            return
        self._state()
        state_path.parent.mkdir(mode=0o700, exist_ok=True)
        write_json_atomic(state_path, record)
        log(f"note: {entry.path} is read-only; {how} result recorded in {state_path}")
