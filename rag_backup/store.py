"""The backup directory: one sub-directory per complete backup (named by its id), in-progress
backups under ``.tmp-<id>`` (renamed only when complete), a lock file, verification records."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag_backup.errors import BackupError

MANIFEST = "manifest.json"
VERIFICATION = "verification.json"
TMP_PREFIX = ".tmp-"
LOCK_FILE = ".lock"
ID_PATTERN = re.compile(r"^\d{8}T\d{6}Z(-\d+)?$")
MANIFEST_FORMAT = 1
# Artifact kinds of the two PostgreSQL forms (the manifest's artifact "kind").
PG_LOGICAL_KIND = "pg_dump_custom"
PG_PHYSICAL_KIND = "pg_basebackup_tar"


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


class BackupStore:
    def __init__(self, root: Path) -> None:
        self.root = root

    def ensure(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise BackupError(
                f"BACKUP_DIR / --backup-dir: cannot create {self.root}: {error.strerror}"
            ) from error
        if not os.access(self.root, os.W_OK):
            raise BackupError(f"BACKUP_DIR / --backup-dir: {self.root} is not writable")

    @contextlib.contextmanager
    def lock(self, purpose: str) -> Iterator[None]:
        """Exclusive, non-blocking lock; a second backup/prune/restore fails at once."""
        self.ensure()
        path = self.root / LOCK_FILE
        handle = open(path, "a+")  # noqa: SIM115 - held for the with-block
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

    def entries(self) -> list[BackupEntry]:
        """Complete backups, oldest first. Directories without a manifest are not backups."""
        if not self.root.is_dir():
            return []
        found = []
        for path in sorted(self.root.iterdir()):
            if not (path.is_dir() and ID_PATTERN.match(path.name)):
                continue
            manifest = self._read_json(path / MANIFEST)
            if manifest is None:
                continue
            found.append(
                BackupEntry(
                    backup_id=path.name,
                    path=path,
                    manifest=manifest,
                    verification=self._read_json(path / VERIFICATION),
                )
            )
        found.sort(key=lambda entry: (entry.created_unix, entry.backup_id))
        return found

    def get(self, backup_id: str | None) -> BackupEntry:
        """The backup with ``backup_id``, or the newest one when it is None or 'latest'."""
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
            manifest = self._read_json(path / MANIFEST)
            if manifest is None:
                raise BackupError(
                    f"backup {backup_id}: {MANIFEST} is missing or unreadable; not a complete "
                    "backup"
                )
            return BackupEntry(backup_id, path, manifest, self._read_json(path / VERIFICATION))
        entries = self.entries()
        if not entries:
            raise BackupError(f"no backups in {self.root}")
        return entries[-1]

    @staticmethod
    def _read_json(path: Path) -> dict[str, Any] | None:
        try:
            with open(path) as handle:
                data = json.load(handle)
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def record_verification(self, entry: BackupEntry, ok: bool, message: str, how: str) -> None:
        write_json_atomic(
            entry.path / VERIFICATION,
            {
                "ok": ok,
                "message": message,
                "how": how,
                "checked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            },
        )
