"""Off-host copies: push each verified backup folder to an rclone remote (SFTP or
S3-compatible), prove the remote copy, prune it with the local policy, pull it back.

Only encrypted artifacts and the manifest leave the host (the verification record stays).
Remote layout: ``<remote>/<id>/`` holds the artifacts, then ``manifest.json`` (uploaded
last: a folder without it is incomplete), then ``offsite-verified.json`` once the copy was
read back and matched the manifest.

Why download-and-hash: neither of rclone's sftp nor s3 backends can give a SHA-256 (S3
stores MD5 ETags; sftp hashes need a shell on the target, and the target is SFTP-only
with ``ForceCommand internal-sftp``), and a hash computed by the target only proves what
the target says. ``rclone cat`` streams every byte back through SHA-256 here instead: the
copy is proven readable, complete and identical to what the manifest records.

Credentials never reach argv or the environment: rclone reads them from its config file
(``--rclone-config``), which the deployment delivers as a secret file.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag_backup import offsite_pitr, offsite_wal, ops, wal
from rag_backup.crypto import AGE_MAGIC, GPG_FIRST_BYTES
from rag_backup.errors import BackupError, BadArgument
from rag_backup.metrics import read_samples, write_atomic
from rag_backup.procs import Proc, last_lines
from rag_backup.progress import Progress, human_bytes, log
from rag_backup.store import (
    ID_PATTERN,
    MANIFEST,
    BackupEntry,
    BackupStore,
    fsync_dir,
)
from rag_backup.streams import CHUNK, file_sha256

MARKER = "offsite-verified.json"
# In a pulled local folder (never pushed: push sends the manifest's artifacts only): the
# folder came from the target, so this host did not make it.
PULLED = "offsite-pulled.json"
METRICS_FILE = "rag_backup_offsite.prom"
LAST_SUCCESS = "rag_backup_offsite_last_success_timestamp_seconds"
LAST_RUN = "rag_backup_offsite_last_run_timestamp_seconds"
LAST_RUN_SUCCESS = "rag_backup_offsite_last_run_success"
ENV_CONFIG = "RAG_BACKUP_OFFSITE_RCLONE_CONFIG"
ENV_REMOTE = "RAG_BACKUP_OFFSITE_REMOTE"
# A manifest (with Chroma's file list) is small; anything larger is not one of ours.
MANIFEST_MAX_BYTES = 64 << 20
_REMOTE = re.compile(r"^[A-Za-z0-9_-]+:(?!.*(^|/)\.\.(/|$))[A-Za-z0-9._/-]*$")
_ARTIFACT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
RCLONE_TIMEOUT_S = 6 * 3600


# --------------------------------------------------------------------------- rclone


@dataclass(frozen=True)
class Target:
    """An rclone remote (``name:path``) and the config file that defines it."""

    rclone_config: Path
    remote: str

    def validate(self) -> None:
        if not _REMOTE.match(self.remote):
            raise BackupError(
                f"--remote / {ENV_REMOTE}: {self.remote!r} is not valid; expected "
                "<rclone remote>:<path>, e.g. offsite:rag-prod (letters, digits, . _ - /, no ..)"
            )
        if not self.rclone_config.is_file() or not os.access(self.rclone_config, os.R_OK):
            raise BackupError(
                f"--rclone-config / {ENV_CONFIG}: {self.rclone_config} is not a readable file"
            )

    def path(self, *parts: str) -> str:
        base = self.remote.rstrip("/")
        sep = "" if base.endswith(":") else "/"
        return base + sep + "/".join(parts) if parts else base


class Rclone:
    """rclone with only the given config: no RCLONE_*/AWS_* settings from the
    environment can add or change a remote; caches go to a private temp dir."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._tmp = tempfile.TemporaryDirectory(prefix="rag-rclone-")
        keep = {"PATH", "TMPDIR", "LANG", "LC_ALL", "SSL_CERT_FILE", "SSL_CERT_DIR"}
        self.env = {k: v for k, v in os.environ.items() if k in keep}
        self.env["HOME"] = self._tmp.name

    def close(self) -> None:
        self._tmp.cleanup()

    def argv(self, *args: str) -> list[str]:
        return [
            "rclone",
            "--config",
            str(self.target.rclone_config),
            "--cache-dir",
            f"{self._tmp.name}/cache",
            "--retries",
            "3",
            "--low-level-retries",
            "5",
            *args,
        ]

    def run(self, what: str, *args: str, input_bytes: bytes | None = None) -> bytes:
        proc = Proc(
            f"rclone {what}",
            self.argv(*args),
            stdin=subprocess.PIPE if input_bytes is not None else subprocess.DEVNULL,
            env=self.env,
        )
        try:
            try:
                out, _ = proc.popen.communicate(input_bytes, timeout=RCLONE_TIMEOUT_S)
            except subprocess.TimeoutExpired as error:
                raise BackupError(
                    f"rclone {what} did not finish within {RCLONE_TIMEOUT_S}s"
                ) from error
            code = proc.wait()
            if code != 0:
                raise RcloneFailed(
                    code, f"rclone {what} failed (exit {code}): {last_lines(proc.stderr_text())}"
                )
            return out
        finally:
            proc.close()

    @staticmethod
    def _json(data: bytes, what: str) -> list[dict[str, Any]]:
        try:
            parsed = json.loads(data)
        except ValueError as error:
            raise BackupError(f"rclone {what}: unreadable listing: {error}") from error
        if not isinstance(parsed, list):
            raise BackupError(f"rclone {what}: unreadable listing")
        return [item for item in parsed if isinstance(item, dict)]

    def list_dirs(self) -> list[str]:
        try:
            data = self.run("lsjson", "lsjson", "--dirs-only", self.target.path())
        except RcloneFailed as error:
            if error.code == 3:  # directory not found: nothing pushed yet
                return []
            raise
        return sorted(str(item.get("Name")) for item in self._json(data, "lsjson"))

    def list_files(self, backup_id: str) -> dict[str, int]:
        try:
            data = self.run("lsjson", "lsjson", "--files-only", self.target.path(backup_id))
        except RcloneFailed as error:
            if error.code == 3:
                return {}
            raise
        files = {}
        for item in self._json(data, "lsjson"):
            size = item.get("Size")
            if isinstance(size, int):
                files[str(item.get("Name"))] = size
        return files

    @contextlib.contextmanager
    def cat(self, remote_path: str) -> Iterator[Proc]:
        proc = Proc("rclone cat", self.argv("cat", remote_path), env=self.env)
        try:
            yield proc
        finally:
            proc.close()

    def read_small(self, remote_path: str, limit: int) -> bytes:
        with self.cat(remote_path) as proc:
            data = proc.stdout.read(limit + 1)
            if len(data) > limit:
                raise BackupError(f"{remote_path}: larger than {human_bytes(limit)}; refused")
            code = proc.wait(RCLONE_TIMEOUT_S)
            if code != 0:
                raise RcloneFailed(
                    code,
                    f"rclone cat {remote_path} failed (exit {code}): "
                    f"{last_lines(proc.stderr_text())}",
                )
        return data

    def stream_sha256(self, remote_path: str, limit: int) -> tuple[int, str]:
        """Size and SHA-256 of the remote file's bytes, reading at most ``limit`` + 1."""
        digest = hashlib.sha256()
        size = 0
        with self.cat(remote_path) as proc:
            while size <= limit:
                chunk = proc.stdout.read(CHUNK)
                if not chunk:
                    break
                digest.update(chunk)
                size += len(chunk)
            if size > limit:
                return size, ""
            code = proc.wait(RCLONE_TIMEOUT_S)
            if code != 0:
                raise RcloneFailed(
                    code,
                    f"rclone cat {remote_path} failed (exit {code}): "
                    f"{last_lines(proc.stderr_text())}",
                )
        return size, digest.hexdigest()

    def upload(self, local: Path, remote_path: str) -> None:
        # --ignore-times: always send; a copy that failed verification may have the same
        # size and time as the good file.
        self.run("copyto", "copyto", "--ignore-times", str(local), remote_path)

    def download(self, remote_path: str, local: Path) -> None:
        self.run("copyto", "copyto", "--ignore-times", remote_path, str(local))

    def write(self, remote_path: str, data: bytes) -> None:
        self.run("rcat", "rcat", remote_path, input_bytes=data)

    def delete_backup(self, backup_id: str) -> None:
        # The manifest first: a half-deleted folder never looks like a complete backup.
        self.run("deletefile", "deletefile", self.target.path(backup_id, MANIFEST))
        self.run("purge", "purge", self.target.path(backup_id))


class RcloneFailed(BackupError):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


# --------------------------------------------------------------------------- manifests


def manifest_artifacts(manifest: Any, backup_id: str) -> list[dict[str, Any]]:
    """The artifacts of an untrusted manifest (name, size, sha256), checked; raises
    BackupError naming what is wrong."""
    where = f"remote backup {backup_id}: {MANIFEST}"
    if not isinstance(manifest, dict):
        raise BackupError(f"{where} is not a JSON object")
    if manifest.get("id") != backup_id:
        raise BackupError(f"{where} names id {manifest.get('id')!r}, not its folder's")
    created = manifest.get("created_unix")
    if isinstance(created, bool) or not isinstance(created, int | float):
        raise BackupError(f"{where}: created_unix is not a number")
    components = manifest.get("components")
    if not isinstance(components, dict) or not components:
        raise BackupError(f"{where}: no components")
    artifacts: list[dict[str, Any]] = []
    for name, component in components.items():
        listed = component.get("artifacts") if isinstance(component, dict) else None
        if not isinstance(listed, list) or not listed:
            raise BackupError(f"{where}: component {name!r} lists no artifacts")
        for artifact in listed:
            if not isinstance(artifact, dict):
                raise BackupError(f"{where}: component {name!r}: an artifact is not an object")
            file_name, size, sha = (
                artifact.get("name"),
                artifact.get("size"),
                artifact.get("sha256"),
            )
            if (
                not isinstance(file_name, str)
                or not _ARTIFACT_NAME.match(file_name)
                or file_name in (MANIFEST, MARKER)
            ):
                raise BackupError(f"{where}: artifact name {file_name!r} is not a plain file name")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise BackupError(f"{where}: {file_name}: size {size!r} is not a byte count")
            if not isinstance(sha, str) or not _SHA256.match(sha):
                raise BackupError(f"{where}: {file_name}: sha256 is not 64 hex digits")
            if any(a["name"] == file_name for a in artifacts):
                raise BackupError(f"{where}: artifact {file_name} is listed twice")
            artifacts.append({"name": file_name, "size": size, "sha256": sha})
    return artifacts


def local_artifacts(entry: BackupEntry) -> list[dict[str, Any]]:
    return manifest_artifacts(entry.manifest, entry.backup_id)


def check_not_plaintext(entry: BackupEntry) -> None:
    """Nothing plaintext leaves: every artifact must start like ciphertext of the
    manifest's method (the cheap header check of verify, without the key)."""
    method = entry.manifest.get("encryption", {}).get("method")
    if method not in ("gpg", "age"):
        raise BackupError(f"backup {entry.backup_id}: encryption {method!r} unknown; not copied")
    for artifact in local_artifacts(entry):
        with open(entry.path / artifact["name"], "rb") as handle:
            head = handle.read(512)
        clear = [what for magic, what in ops.CLEAR_HEADERS.items() if head.startswith(magic)]
        ok = (
            head.startswith(AGE_MAGIC)
            if method == "age"
            else bool(head) and head[0] in GPG_FIRST_BYTES
        )
        if clear or head[257:262] == b"ustar" or not ok:
            raise BackupError(
                f"backup {entry.backup_id}: {artifact['name']} does not look like {method} "
                "ciphertext; refusing to copy it off the host"
            )


# --------------------------------------------------------------------------- remote state


@dataclass(frozen=True)
class RemoteBackup:
    backup_id: str
    manifest: dict[str, Any] | None  # None: incomplete (no manifest) or unreadable
    manifest_sha256: str
    marker: dict[str, Any] | None
    problem: str = ""

    @property
    def verified_ok(self) -> bool:
        return bool(
            self.manifest is not None
            and self.marker
            and self.marker.get("ok") is True
            and self.marker.get("manifest_sha256") == self.manifest_sha256
        )

    def as_entry(self) -> BackupEntry:
        assert self.manifest is not None
        return BackupEntry(
            backup_id=self.backup_id,
            path=Path(self.backup_id),
            manifest=self.manifest,
            verification={"ok": True} if self.verified_ok else None,
        )


def _read_json_remote(rclone: Rclone, remote_path: str, limit: int) -> tuple[bytes, Any]:
    data = rclone.read_small(remote_path, limit)
    try:
        return data, json.loads(data)
    except (ValueError, RecursionError) as error:
        raise BackupError(f"{remote_path}: not valid JSON: {error}") from error


def remote_backup(rclone: Rclone, backup_id: str) -> RemoteBackup:
    files = rclone.list_files(backup_id)
    if MANIFEST not in files:
        return RemoteBackup(backup_id, None, "", None, "incomplete: no manifest")
    try:
        raw, manifest = _read_json_remote(
            rclone, rclone.target.path(backup_id, MANIFEST), MANIFEST_MAX_BYTES
        )
        manifest_artifacts(manifest, backup_id)
    except BackupError as error:
        return RemoteBackup(backup_id, None, "", None, str(error))
    marker = None
    if MARKER in files:
        try:
            _, marker = _read_json_remote(rclone, rclone.target.path(backup_id, MARKER), 1 << 16)
        except BackupError:
            marker = None
    return RemoteBackup(
        backup_id,
        manifest,
        hashlib.sha256(raw).hexdigest(),
        marker if isinstance(marker, dict) else None,
    )


def remote_backups(rclone: Rclone) -> list[RemoteBackup]:
    """Every backup folder on the remote, oldest id first (other names are ignored)."""
    return [remote_backup(rclone, name) for name in rclone.list_dirs() if ID_PATTERN.match(name)]


# --------------------------------------------------------------------------- verify


def verify_remote(
    rclone: Rclone, backup_id: str, expected_manifest_sha256: str | None = None
) -> RemoteBackup:
    """Read the remote copy back: manifest (equal to the local one when given), every
    artifact's size and SHA-256. Records the outcome in the remote marker; raises on any
    mismatch."""
    remote = remote_backup(rclone, backup_id)
    try:
        if remote.manifest is None:
            raise BackupError(f"remote backup {backup_id}: {remote.problem}")
        if expected_manifest_sha256 and remote.manifest_sha256 != expected_manifest_sha256:
            raise BackupError(
                f"remote backup {backup_id}: {MANIFEST} differs from the local manifest"
            )
        sizes = rclone.list_files(backup_id)
        problems = []
        for artifact in manifest_artifacts(remote.manifest, backup_id):
            name, expected = artifact["name"], artifact["size"]
            listed = sizes.get(name)
            if listed is None:
                problems.append(f"{name}: missing")
                continue
            if listed != expected:
                problems.append(f"{name}: {listed} bytes, the manifest records {expected}")
                continue
            started = time.monotonic()
            size, digest = rclone.stream_sha256(rclone.target.path(backup_id, name), expected)
            if size != expected:
                problems.append(f"{name}: read {size} bytes, the manifest records {expected}")
            elif digest != artifact["sha256"]:
                problems.append(f"{name}: corrupted: SHA-256 does not match the manifest")
            else:
                log(
                    f"offsite: {backup_id}/{name} ok ({human_bytes(size)} read back in "
                    f"{time.monotonic() - started:.1f}s)"
                )
        if problems:
            raise BackupError(
                f"remote copy of {backup_id} failed verification: {'; '.join(problems)}"
            )
    except BackupError as error:
        _write_marker(rclone, backup_id, False, remote.manifest_sha256, str(error))
        raise
    _write_marker(rclone, backup_id, True, remote.manifest_sha256, "size and SHA-256 match")
    return remote_backup(rclone, backup_id)


def _write_marker(
    rclone: Rclone, backup_id: str, ok: bool, manifest_sha: str, message: str
) -> None:
    if not manifest_sha:
        return  # nothing to mark: no usable manifest
    record = {
        "ok": ok,
        "manifest_sha256": manifest_sha,
        "message": message,
        "checked_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    try:
        rclone.write(rclone.target.path(backup_id, MARKER), json.dumps(record).encode())
    except BackupError as error:
        if ok:
            raise
        log(f"warning: cannot record the failed check on the remote: {error}")


# --------------------------------------------------------------------------- push


def push_backup(rclone: Rclone, entry: BackupEntry) -> None:
    check_not_plaintext(entry)
    artifacts = local_artifacts(entry)
    total = sum(a["size"] for a in artifacts)
    log(f"offsite: copying {entry.backup_id} ({human_bytes(total)}) to {rclone.target.remote}")
    # A stale marker must not vouch for what is about to be replaced.
    if MARKER in rclone.list_files(entry.backup_id):
        rclone.run("deletefile", "deletefile", rclone.target.path(entry.backup_id, MARKER))
    for artifact in artifacts:
        rclone.upload(
            entry.path / artifact["name"], rclone.target.path(entry.backup_id, artifact["name"])
        )
    rclone.upload(entry.path / MANIFEST, rclone.target.path(entry.backup_id, MANIFEST))
    _, local_sha = file_sha256(entry.path / MANIFEST)
    verify_remote(rclone, entry.backup_id, local_sha)
    log(f"offsite: {entry.backup_id} copied and verified")


def push(target: Target, store: BackupStore, backup_id: str | None = None) -> list[str]:
    """Copy every locally verified backup that has no verified remote copy (or only
    ``backup_id``), each read back and checked. Returns the ids copied; when it returns,
    every locally verified backup (the newest included) has a verified remote copy.
    Raises after trying all when any copy failed."""
    with store.lock("offsite push"):
        entries = store.entries() if backup_id is None else [store.get(backup_id)]
        verified = [e for e in entries if e.verified_ok]
        for entry in entries:
            if not entry.verified_ok:
                log(f"offsite: skipping {entry.backup_id}: not verified locally (run verify)")
        if not verified:
            raise BackupError(
                f"no locally verified backup to copy off-host in {store.root}; "
                "run `rag-backup verify` first"
            )
        rclone = Rclone(target)
        try:
            remote = {r.backup_id: r for r in remote_backups(rclone)}
            pushed, errors = [], []
            for entry in verified:
                _, local_sha = file_sha256(entry.path / MANIFEST)
                have = remote.get(entry.backup_id)
                if have is not None and have.verified_ok and have.manifest_sha256 == local_sha:
                    continue
                try:
                    push_backup(rclone, entry)
                    pushed.append(entry.backup_id)
                except BackupError as error:
                    errors.append(f"{entry.backup_id}: {error}")
                    log(f"offsite: FAILED {entry.backup_id}: {error}")
        finally:
            rclone.close()
        if not entries[-1].verified_ok:
            errors.append(
                f"the newest backup {entries[-1].backup_id} is not verified locally; not "
                "copied (run `rag-backup verify`)"
            )
        if errors:
            raise BackupError("off-host copy failed: " + "; ".join(errors))
        return pushed


# --------------------------------------------------------------------------- prune


def prune_remote(
    target: Target,
    policy: ops.RetentionPolicy,
    dry_run: bool,
    now: float | None = None,
    store: BackupStore | None = None,
) -> list[str]:
    """Apply the local retention policy to the remote copies, and keep every copy of the
    last ``policy.daily`` days besides: a rebuilt host's first backup (of a still empty
    stack) must not push the old host's last backup of the same day out of its daily
    slot. Nothing is deleted unless a kept remote copy is verified; incomplete or
    unreadable folders are left alone. Then the off-host WAL archived before the oldest
    kept base backup (offsite_wal.prune_wal; ``store``: this host's record of it)."""
    now = time.time() if now is None else now
    rclone = Rclone(target)
    try:
        remote = remote_backups(rclone)
        for r in remote:
            if r.manifest is None:
                log(f"offsite: leaving {r.backup_id} alone ({r.problem})")
        complete = [r for r in remote if r.manifest is not None]
        kept = ops.select_kept([r.as_entry() for r in complete], policy)
        recent = now - policy.daily * 86400
        for r in complete:
            if r.as_entry().created_unix >= recent:
                kept.setdefault(r.backup_id, []).append(f"within the last {policy.daily} days")
        if not any(r.verified_ok for r in complete if r.backup_id in kept):
            if len(kept) < len(complete):
                log("offsite: no kept remote copy is verified; deleting nothing")
            return []
        removed = []
        for r in complete:
            if r.backup_id in kept:
                log(f"offsite: keep   {r.backup_id} ({', '.join(kept[r.backup_id])})")
                continue
            log(f"offsite: {'would delete' if dry_run else 'delete'} {r.backup_id}")
            if not dry_run:
                rclone.delete_backup(r.backup_id)
            removed.append(r.backup_id)
        horizon = offsite_wal.oldest_kept_base_backup(
            [r.as_entry() for r in complete if r.backup_id in kept]
        )
        if horizon is not None:
            offsite_wal.prune_wal(rclone, horizon, dry_run, store)
        return removed
    finally:
        rclone.close()


# --------------------------------------------------------------------------- pull


def pull(target: Target, store: BackupStore, backup_id: str | None, with_wal: bool = False) -> str:
    """Download a remote backup (default: the newest verified one) into the store as a
    complete backup folder, checked against its manifest before it appears there.
    ``with_wal``: also the off-host WAL archived since it, for a point-in-time restore
    (offsite_wal.alongside: fetched and checked before, installed after the backup)."""
    rclone = Rclone(target)
    try:
        remote = remote_backups(rclone)
        if backup_id not in (None, "latest"):
            chosen = next((r for r in remote if r.backup_id == backup_id), None)
            if chosen is None:
                raise BackupError(f"backup {backup_id} not found on {target.remote}")
        else:
            chosen = newest_not_made_here(remote, store, target)
        if chosen.manifest is None:
            raise BackupError(f"remote backup {chosen.backup_id}: {chosen.problem}")
        wal_pull = offsite_wal.alongside(rclone, store, chosen.manifest, with_wal)
        return _pull_into(rclone, store, chosen, wal_pull)
    finally:
        rclone.close()


def pull_for_pitr(
    target: Target, store: BackupStore, backup_id: str | None, target_time: float | None
) -> str:
    """A point-in-time recovery on a new host (offsite_pitr): resolve ``target_time`` (None:
    the end of the off-host WAL) against the off-host copies -- refused with the ranges
    before anything is downloaded -- then pull the base backup it starts from and only the
    WAL it needs into BACKUP_DIR/offsite-pitr. ``store``: the stack's own BACKUP_DIR (its
    own backups are never the ones pulled)."""
    rclone = Rclone(target)
    try:
        plan = offsite_pitr.plan_remote(
            rclone, remote_backups(rclone), store, target_time, backup_id
        )
        log(
            f"offsite: recoverable {plan.window.describe()} off-host; pulling it with "
            f"{len(plan.segments)} WAL segment(s) into {store.root / offsite_pitr.PULL_DIR}"
        )
        assert plan.backup.manifest is not None
        landing = offsite_pitr.pull_store(store)
        planned = offsite_pitr.wal_plan(plan)
        wal_pull = offsite_wal.alongside(rclone, landing, plan.backup.manifest, True, planned)
        return _pull_into(rclone, landing, plan.backup, wal_pull)
    finally:
        rclone.close()


def _pull_into(
    rclone: Rclone,
    store: BackupStore,
    chosen: RemoteBackup,
    wal_pull: contextlib.AbstractContextManager[None],
) -> str:
    with store.lock("offsite pull"), wal_pull:
        final = store.root / chosen.backup_id
        if _pulled_before(final, chosen):
            log(f"offsite: {chosen.backup_id} was pulled into {final} before; not again")
            return chosen.backup_id
        if final.exists():
            raise BackupError(
                f"{final} already exists; restore from it, or move it away to pull again"
            )
        tmp = store.temp_dir_for(chosen.backup_id)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=0o700)
        try:
            _download_checked(rclone, chosen, tmp)
            record = {"remote": rclone.target.remote, "manifest_sha256": chosen.manifest_sha256}
            (tmp / PULLED).write_text(json.dumps(record))
            fsync_dir(tmp)
            os.rename(tmp, final)
            fsync_dir(store.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log(f"offsite: pulled {chosen.backup_id} into {final}")
    return chosen.backup_id


def made_here(store: BackupStore, backup_id: str) -> bool:
    """A complete local backup folder that was not pulled: this host made it."""
    folder = store.root / backup_id
    return (folder / MANIFEST).is_file() and not (folder / PULLED).is_file()


def newest_not_made_here(
    remote: list[RemoteBackup], store: BackupStore, target: Target
) -> RemoteBackup:
    """The newest verified remote copy this host did not make itself. On a rebuilt host
    the scheduler's first run has already backed up the new, empty stores and copied
    that off-host too: "latest" is then the lost host's newest copy, not that one."""
    verified = [r for r in remote if r.verified_ok]
    usable = [r for r in verified if not made_here(store, r.backup_id)]
    for r in verified:
        if r not in usable:
            log(f"offsite: passing over {r.backup_id}: this host made it ({store.root})")
    if not usable:
        if verified:
            raise BackupError(
                f"every verified backup on {target.remote} was made on this host and is in "
                f"{store.root}: restore it from there (restore-stack.sh), or name an ID"
            )
        raise BackupError(f"no verified backup on {target.remote}")
    return max(usable, key=lambda r: (r.as_entry().created_unix, r.backup_id))


def _pulled_before(final: Path, chosen: RemoteBackup) -> bool:
    """``final`` is this remote copy, pulled by an earlier run (a retried restore)."""
    if not (final / PULLED).is_file() or not (final / MANIFEST).is_file():
        return False
    _, local_sha = file_sha256(final / MANIFEST)
    return local_sha == chosen.manifest_sha256


def _download_checked(rclone: Rclone, chosen: RemoteBackup, tmp: Path) -> None:
    assert chosen.manifest is not None
    backup_id = chosen.backup_id
    for artifact in manifest_artifacts(chosen.manifest, backup_id):
        path = tmp / artifact["name"]
        log(f"offsite: downloading {backup_id}/{artifact['name']}")
        rclone.download(rclone.target.path(backup_id, artifact["name"]), path)
        size, digest = file_sha256(path)
        if size != artifact["size"] or digest != artifact["sha256"]:
            raise BackupError(
                f"remote backup {backup_id}: {artifact['name']} does not match the manifest "
                f"({size} bytes, the manifest records {artifact['size']}; or SHA-256 differs)"
            )
    rclone.download(rclone.target.path(backup_id, MANIFEST), tmp / MANIFEST)
    _, digest = file_sha256(tmp / MANIFEST)
    if digest != chosen.manifest_sha256:
        raise BackupError(f"remote backup {backup_id}: {MANIFEST} changed while pulling")


def list_remote(target: Target) -> list[str]:
    rclone = Rclone(target)
    try:
        lines = [f"{'ID':<20} {'SIZE':>10}  OFF-HOST COPY"]
        for r in reversed(remote_backups(rclone)):
            if r.manifest is None:
                lines.append(f"{r.backup_id:<20} {'-':>10}  {r.problem}")
                continue
            size = sum(a["size"] for a in manifest_artifacts(r.manifest, r.backup_id))
            if r.verified_ok:
                state = f"verified ({r.marker.get('checked_at', '?') if r.marker else '?'})"
            elif r.marker:
                state = f"FAILED: {r.marker.get('message', '?')}"
            else:
                state = "unverified"
            lines.append(f"{r.backup_id:<20} {human_bytes(size):>10}  {state}")
        return lines
    finally:
        rclone.close()


# --------------------------------------------------------------------------- metrics


def write_metrics(directory: Path, *, success: bool, run_timestamp: float) -> None:
    """On failure the last success stays (the staleness alert keeps counting); a target
    that never succeeded reports 0, so the alert fires."""
    path = directory / METRICS_FILE
    previous = read_samples(path).get((LAST_SUCCESS, None))
    last = run_timestamp if success else (previous if previous is not None else 0.0)
    lines = [
        f"# HELP {LAST_SUCCESS} Unix time the newest local backup was last proven copied "
        "off-host (read back, size and SHA-256 match the manifest).",
        f"# TYPE {LAST_SUCCESS} gauge",
        f"{LAST_SUCCESS} {last:.0f}",
        f"# HELP {LAST_RUN} Unix time the last off-host copy/verify run ended.",
        f"# TYPE {LAST_RUN} gauge",
        f"{LAST_RUN} {run_timestamp:.0f}",
        f"# HELP {LAST_RUN_SUCCESS} 1 if the last off-host copy/verify run succeeded, else 0.",
        f"# TYPE {LAST_RUN_SUCCESS} gauge",
        f"{LAST_RUN_SUCCESS} {1 if success else 0}",
    ]
    write_atomic(path, "\n".join(lines) + "\n")


def _record(metrics_dir: Path | None, success: bool) -> None:
    if metrics_dir is None:
        return
    try:
        write_metrics(metrics_dir, success=success, run_timestamp=time.time())
    except OSError as error:
        log(f"warning: cannot write metrics to {metrics_dir}: {error.strerror}")


# --------------------------------------------------------------------------- CLI


def scheduled_steps() -> list[list[str]]:
    """What the scheduler runs after each backup and prune: only with a target set."""
    if os.environ.get(ENV_REMOTE):
        return [["offsite", "push"], ["offsite", "prune"]]
    return []


def scheduled_wal_steps() -> list[list[str]]:
    """What the scheduler runs after each wal-archive cycle: only with a target set."""
    if os.environ.get(ENV_REMOTE):
        return [["offsite", "wal-push", "--quiet"]]
    return []


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def add_offsite_parser(
    sub: Any,
    add_common: Callable[[argparse.ArgumentParser], None],
    add_metrics: Callable[[argparse.ArgumentParser], None],
    keep_option: Callable[[str], Callable[[str], int]],
    add_target: Callable[[argparse.ArgumentParser, str], None],
) -> None:
    offsite = sub.add_parser(
        "offsite",
        help="copy backups off the host, verify, prune and pull them back",
        description="Off-host copies through rclone (SFTP, S3-compatible). Only the "
        "encrypted artifacts and the manifest leave the host.",
    )
    actions = offsite.add_subparsers(dest="offsite_command", required=True, metavar="ACTION")
    helps = {
        "push": "copy every verified local backup without a verified remote copy, read each "
        "copy back (size, SHA-256)",
        "verify": "read a remote copy back and check it against its manifest (default: the "
        "newest local backup's, else the newest remote one)",
        "prune": "delete remote copies outside the retention policy (never the only verified one)",
        "pull": "download a remote backup (default: the newest verified one this host did "
        "not make) into BACKUP_DIR, checked, for the normal restore",
        "list": "list the remote copies",
        "wal-push": "copy the archived WAL segments not yet off-host, read each back (size, "
        "SHA-256), then the remote WAL index (the scheduler runs it after each wal-archive)",
        "wal-verify": "read back every WAL segment this host copied off-host; a mismatch is "
        "uploaded again by the next wal-push",
    }
    for action, text in helps.items():
        parser = actions.add_parser(action, help=text, description=text)
        add_common(parser)
        parser.add_argument(
            "--rclone-config",
            type=Path,
            default=_env_path(ENV_CONFIG),
            help=f"rclone config file defining the remote, with its credentials (env {ENV_CONFIG})",
        )
        parser.add_argument(
            "--remote",
            default=os.environ.get(ENV_REMOTE),
            help=f"rclone remote and path, e.g. offsite:rag-prod (env {ENV_REMOTE})",
        )
        if action in ("push", "verify", "pull"):
            parser.add_argument("backup_id", nargs="?", metavar="ID", help="backup id")
        if action in ("push", "verify", "wal-push", "wal-verify"):
            add_metrics(parser)
        if action == "pull":
            parser.add_argument(
                "--with-wal",
                action="store_true",
                help="also the off-host WAL archived since the backup, checked, into "
                "BACKUP_DIR/wal, for restore --pg-mode physical --target-time/--target latest "
                "(BACKUP_DIR must not hold another cluster's WAL archive: use a fresh one)",
            )
            add_target(
                parser,
                "point-in-time recovery on a new host: resolve the time against the off-host "
                "copies first, then pull the base backup it starts from and only the WAL it "
                f"needs into BACKUP_DIR/{offsite_pitr.PULL_DIR} (for restore-stack.sh "
                f"--backups-subdir {offsite_pitr.PULL_DIR}); ID, when given, is that base backup",
            )
        if action == "prune":
            for period, default in (("daily", "7"), ("weekly", "4"), ("monthly", "6")):
                env = f"RAG_BACKUP_KEEP_{period.upper()}"
                # A string default goes through ``type``: a bad environment value gets the
                # clear error naming the variable, not a traceback while building the parser.
                parser.add_argument(
                    f"--keep-{period}",
                    type=keep_option(f"--keep-{period} / {env}"),
                    default=os.environ.get(env, default),
                )
            parser.add_argument("--dry-run", action="store_true")


def _target(args: argparse.Namespace) -> Target:
    if not args.remote:
        raise BackupError(f"--remote / {ENV_REMOTE} is required (no off-host target configured)")
    if args.rclone_config is None:
        raise BackupError(f"--rclone-config / {ENV_CONFIG} is required")
    target = Target(args.rclone_config, args.remote)
    target.validate()
    return target


def _store(args: argparse.Namespace, required: bool) -> BackupStore | None:
    if args.backup_dir is None:
        if required:
            raise BackupError("BACKUP_DIR / --backup-dir is required")
        return None
    return BackupStore(args.backup_dir)


def cmd_offsite(args: argparse.Namespace, progress: Progress) -> int:
    target = _target(args)
    action = args.offsite_command
    if action == "list":
        for line in list_remote(target):
            print(line)
        return 0
    if action == "prune":
        policy = ops.RetentionPolicy(args.keep_daily, args.keep_weekly, args.keep_monthly)
        removed = prune_remote(target, policy, args.dry_run, store=_store(args, required=False))
        print(f"{'would delete' if args.dry_run else 'deleted'} {len(removed)} remote backup(s)")
        return 0
    if action == "pull":
        store = _store(args, required=True)
        assert store is not None
        if args.target_time is not None and args.target is not None:
            raise BadArgument("--target-time and --target latest exclude each other; give one")
        if args.target_time is not None or args.target is not None:
            print(pull_for_pitr(target, store, args.backup_id, args.target_time))
            return 0
        print(pull(target, store, args.backup_id, with_wal=args.with_wal))
        return 0
    if action in ("wal-push", "wal-verify"):
        store = _store(args, required=True)
        assert store is not None
        return _cmd_wal(args, target, store)
    if action == "push":
        store = _store(args, required=True)
        assert store is not None
        ok = False
        try:
            pushed = push(target, store, args.backup_id)
            ok = True
        finally:
            # Pushing one older backup by id says nothing about the newest one.
            if not ok or args.backup_id in (None, "latest"):
                _record(args.metrics_dir, ok)
        print(f"copied {len(pushed)} backup(s) off-host; newest verified there")
        return 0
    return _cmd_verify(args, target)


def _cmd_wal(args: argparse.Namespace, target: Target, store: BackupStore) -> int:
    rclone = Rclone(target)
    ok, covered = False, None
    try:
        if args.offsite_command == "wal-verify":
            count = offsite_wal.verify_wal(rclone, store)
            ok = True
            print(f"{count} off-host WAL segment(s) read back and verified")
            return 0
        result = offsite_wal.push_wal(rclone, store)
        ok, covered = True, result.covered_until
        until = wal.describe_time(covered) if covered is not None else "-"
        print(f"copied {len(result.pushed)} WAL segment(s) off-host; complete there up to {until}")
        return 0
    finally:
        rclone.close()
        if args.metrics_dir is not None and (args.offsite_command == "wal-push" or not ok):
            try:
                offsite_wal.write_metrics(
                    args.metrics_dir, success=ok, run_timestamp=time.time(), covered_until=covered
                )
            except OSError as error:
                log(f"warning: cannot write metrics to {args.metrics_dir}: {error.strerror}")


def _cmd_verify(args: argparse.Namespace, target: Target) -> int:
    store = _store(args, required=False)
    newest_local: BackupEntry | None = None
    if store is not None and store.root.is_dir():
        local = [e for e in store.entries() if e.verified_ok]
        newest_local = local[-1] if local else None
    backup_id = args.backup_id
    if backup_id in (None, "latest") and newest_local is not None:
        backup_id = newest_local.backup_id
    rclone = Rclone(target)
    ok = False
    try:
        if backup_id in (None, "latest"):
            complete = [r for r in remote_backups(rclone) if r.manifest is not None]
            if not complete:
                raise BackupError(f"no complete backup on {target.remote}")
            backup_id = complete[-1].backup_id
        assert backup_id is not None
        expected = None
        if store is not None and (store.root / backup_id / MANIFEST).is_file():
            _, expected = file_sha256(store.root / backup_id / MANIFEST)
        verify_remote(rclone, backup_id, expected)
        ok = True
    finally:
        rclone.close()
        # Only a check of the newest local backup's copy says the off-host copy is fresh.
        if newest_local is not None and backup_id == newest_local.backup_id:
            _record(args.metrics_dir, ok)
        elif not ok:
            _record(args.metrics_dir, False)
    print(f"remote copy of {backup_id} verified")
    return 0
