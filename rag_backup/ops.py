"""backup, verify, list and prune."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from rag_backup import __version__, chroma, metrics, pg, redis_ops, wal
from rag_backup import physical as physical_mod
from rag_backup.crypto import Cipher, CipherSettings
from rag_backup.errors import BackupError, Interrupted
from rag_backup.pitr import START_FIELD as WAL_START_FIELD
from rag_backup.procs import futures_ended, kill_all_children, stop_children_until, threads_ended
from rag_backup.progress import Progress, human_bytes, log
from rag_backup.store import (
    MANIFEST,
    MANIFEST_FORMAT,
    BackupEntry,
    BackupStore,
    fsync_dir,
    new_backup_id,
    write_json_atomic,
)
from rag_backup.streams import (
    CHUNK,
    IDENTITY_HEAD_BYTES,
    ArtifactRecord,
    DecryptFailed,
    decrypted_stream,
    file_sha256,
    write_encrypted,
)

COMPONENT_ORDER = ("postgres", "redis", "chroma")
ARTIFACT_NAMES = {
    "postgres": "postgres.dump.zst",
    "redis": "redis.rdb.zst",
    "chroma": "chroma.tar.zst",
}
PHYSICAL_ARTIFACT = "postgres.base.tar.zst"
PLAINTEXT_MAGIC = {
    "pg_dump_custom": b"PGDMP",
    "redis_rdb": b"REDIS",
}
# Headers that must never appear at the start of an artifact: it would be plaintext.
CLEAR_HEADERS = {
    b"PGDMP": "pg_dump",
    b"REDIS": "Redis RDB",
    b"SQLite format 3": "SQLite",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"\x1f\x8b": "gzip",
    b"--": "SQL text",
}


@dataclass(frozen=True)
class BackupConfig:
    store: BackupStore
    cipher: CipherSettings
    components: tuple[str, ...]
    postgres: pg.PostgresSettings | None
    redis: redis_ops.RedisSettings | None
    chroma_dir: Path | None
    zstd_level: int
    zstd_threads: int
    chroma_lock_timeout_s: float
    metrics_dir: Path | None
    verify_after: bool
    pg_physical: bool = False  # also a pg_basebackup of the whole cluster
    pg_logical: bool = True  # the portable pg_dump; False only with pg_physical
    pg_physical_zstd_level: int | None = None  # None: zstd_level


def artifact_file_name(component: str, cipher: CipherSettings) -> str:
    suffix = ".gpg" if cipher.method == "gpg" else ".age"
    return ARTIFACT_NAMES[component] + suffix


def _run_threads(*tasks: Callable[[], None]) -> None:
    """Run callables in parallel threads; the first error is raised after all ended."""
    errors: list[BaseException] = []

    def wrap(task: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                task()
            except BaseException as error:
                errors.append(error)
                kill_all_children()

        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in tasks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
        if errors:
            # The others may be between two children: stop each one they start, too.
            stop_children_until(threads_ended(threads))
    if errors:
        first = errors[0]
        if isinstance(first, BackupError):
            raise first
        raise BackupError(str(first)) from first


def _backup_postgres(
    cfg: BackupConfig, tmp: Path, cipher: Cipher, progress: Progress
) -> dict[str, Any]:
    settings = cfg.postgres
    assert settings is not None
    started = time.monotonic()
    if cfg.pg_logical:
        log(f"postgres: dumping database {settings.database}")
    session = pg.open_snapshot(settings)
    records: dict[str, ArtifactRecord] = {}
    counts: dict[str, int] = {}
    physical: dict[str, Any] = {}
    try:
        # Without a dump the snapshot still gives the row counts the base backup is checked
        # against (its copy is consistent at a point after the snapshot).
        producer = pg.start_pg_dump(settings, session.snapshot) if cfg.pg_logical else None

        def count() -> None:
            counts.update(pg.snapshot_row_counts(session))

        def dump() -> None:
            assert producer is not None
            records["logical"] = write_encrypted(
                name=artifact_file_name("postgres", cfg.cipher),
                kind="pg_dump_custom",
                out_path=tmp / artifact_file_name("postgres", cfg.cipher),
                cipher=cipher,
                zstd_level=cfg.zstd_level,
                zstd_threads=cfg.zstd_threads,
                progress=progress,
                producer=producer,
            )

        def base_backup() -> None:
            # Started after the snapshot was exported, so the copy is consistent at a point
            # between the snapshot's row counts and the counts taken after it ended.
            log("postgres: physical base backup of the cluster (pg_basebackup)")
            # The WAL file the server writes now: the backup starts in it or a later one
            # (point-in-time recovery checks the archive holds every segment from there).
            physical[WAL_START_FIELD] = pg.psql_value(
                settings, "SELECT pg_walfile_name(pg_current_wal_lsn())", settings.database
            )
            name = PHYSICAL_ARTIFACT + (".gpg" if cfg.cipher.method == "gpg" else ".age")
            records["physical"] = write_encrypted(
                name=name,
                kind=physical_mod.KIND,
                out_path=tmp / name,
                cipher=cipher,
                zstd_level=cfg.pg_physical_zstd_level or cfg.zstd_level,
                zstd_threads=cfg.zstd_threads,
                progress=progress,
                producer=physical_mod.start_basebackup(settings),
            )
            physical["row_counts_after"] = pg.row_counts(settings, settings.database)
            physical["user"] = pg.psql_value(settings, "SELECT current_user", settings.database)
            # The cluster's lineage: which off-host WAL folder this base backup goes with.
            physical["system_identifier"] = pg.psql_value(
                settings, "SELECT system_identifier FROM pg_control_system()", settings.database
            )

        tasks = (
            [count]
            + ([dump] if cfg.pg_logical else [])
            + ([base_backup] if cfg.pg_physical else [])
        )
        _run_threads(*tasks)
    finally:
        session.session.close()
    forms = [form for form in ("logical", "physical") if form in records]
    result: dict[str, Any] = {
        "database": settings.database,
        "server_version": session.server_version,
        "row_counts": counts,
        "forms": forms,  # informative; pg_forms() derives the forms from the artifacts
    }
    if cfg.pg_physical:
        result["physical"] = physical
    result["artifacts"] = [records[form].to_json() for form in forms]
    result["duration_seconds"] = round(time.monotonic() - started, 3)
    return result


def _backup_redis(
    cfg: BackupConfig, tmp: Path, cipher: Cipher, progress: Progress
) -> dict[str, Any]:
    settings = cfg.redis
    assert settings is not None
    started = time.monotonic()
    log(f"redis: fetching RDB from {settings.describe()}")
    before = redis_ops.remote_keyspace(settings)
    cli = redis_ops.start_rdb_transfer(settings)
    try:
        record = write_encrypted(
            name=artifact_file_name("redis", cfg.cipher),
            kind="redis_rdb",
            out_path=tmp / artifact_file_name("redis", cfg.cipher),
            cipher=cipher,
            zstd_level=cfg.zstd_level,
            zstd_threads=cfg.zstd_threads,
            progress=progress,
            feeder=redis_ops.rdb_feeder(cli),  # type: ignore[arg-type]
        )
    finally:
        cli.close()
    after = redis_ops.remote_keyspace(settings)
    return {
        "artifacts": [record.to_json()],
        "keyspace_before": before,
        "keys_before": redis_ops.total_keys(before),
        "keys_after": redis_ops.total_keys(after),
        "expires_before": sum(db["expires"] for db in before.values()),
        "expires_after": sum(db["expires"] for db in after.values()),
        "duration_seconds": round(time.monotonic() - started, 3),
    }


def _backup_chroma(
    cfg: BackupConfig, tmp: Path, cipher: Cipher, progress: Progress
) -> dict[str, Any]:
    assert cfg.chroma_dir is not None
    started = time.monotonic()
    log(f"chroma: archiving {cfg.chroma_dir}")
    records: list[chroma.FileRecord] = []
    record = write_encrypted(
        name=artifact_file_name("chroma", cfg.cipher),
        kind="tar",
        out_path=tmp / artifact_file_name("chroma", cfg.cipher),
        cipher=cipher,
        zstd_level=cfg.zstd_level,
        zstd_threads=cfg.zstd_threads,
        progress=progress,
        feeder=chroma.snapshot_feeder(cfg.chroma_dir, records, cfg.chroma_lock_timeout_s),
    )
    return {
        "artifacts": [record.to_json()],
        "files": [r.to_json() for r in records],
        "duration_seconds": round(time.monotonic() - started, 3),
    }


COMPONENT_BACKUPS: dict[str, Callable[[BackupConfig, Path, Cipher, Progress], dict[str, Any]]] = {
    "postgres": _backup_postgres,
    "redis": _backup_redis,
    "chroma": _backup_chroma,
}


def run_backup(cfg: BackupConfig, progress: Progress) -> BackupEntry:
    started_wall = time.time()
    started = time.monotonic()
    store = cfg.store
    durations: dict[str, float] = {}
    sizes: dict[str, int] = {}
    success = False
    try:
        with store.lock("backup"):
            for name in store.remove_stale_temporaries():
                log(f"removed {name} left by an interrupted backup")
            backup_id = store.unique_id(new_backup_id(dt.datetime.now(dt.UTC)))
            tmp = store.temp_dir_for(backup_id)
            tmp.mkdir(mode=0o700)
            try:
                components = _run_components(cfg, tmp, progress)
                manifest = {
                    "format": MANIFEST_FORMAT,
                    "id": backup_id,
                    "tool": f"rag-backup {__version__}",
                    "created_at": dt.datetime.fromtimestamp(started_wall, dt.UTC).isoformat(
                        timespec="seconds"
                    ),
                    "created_unix": started_wall,
                    "encryption": Cipher(cfg.cipher).describe(),
                    "compression": {"method": "zstd", "level": cfg.zstd_level},
                    "components": components,
                }
                write_json_atomic(tmp / MANIFEST, manifest)
                fsync_dir(tmp)
                final = store.root / backup_id
                os.rename(tmp, final)
                fsync_dir(store.root)
            except BaseException:
                kill_all_children()
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            for name, component in components.items():
                durations[name] = float(component["duration_seconds"])
                sizes[name] = sum(int(a["size"]) for a in component["artifacts"])
            durations["all"] = round(time.monotonic() - started, 3)
            sizes["all"] = sum(sizes.values())
            entry = store.get(backup_id)
            log(
                f"backup {backup_id} complete: {human_bytes(sizes['all'])} in "
                f"{durations['all']:.1f}s"
            )
            success = True
    finally:
        if cfg.metrics_dir is not None:
            _write_metrics_safely(cfg.metrics_dir, success, durations, sizes)
    if cfg.verify_after:
        verify_backup(store, entry, cfg.cipher, progress)
    return entry


def _write_metrics_safely(
    directory: Path, success: bool, durations: dict[str, float], sizes: dict[str, int]
) -> None:
    try:
        metrics.write_backup_metrics(
            directory, success=success, run_timestamp=time.time(), durations=durations, sizes=sizes
        )
    except OSError as error:
        log(f"warning: cannot write metrics to {directory}: {error.strerror}")


def _run_components(cfg: BackupConfig, tmp: Path, progress: Progress) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with Cipher(cfg.cipher) as cipher, ThreadPoolExecutor(max_workers=len(cfg.components)) as pool:
        futures: dict[str, Future[dict[str, Any]]] = {
            name: pool.submit(COMPONENT_BACKUPS[name], cfg, tmp, cipher, progress)
            for name in cfg.components
        }
        errors = []
        try:
            for name, future in futures.items():
                try:
                    results[name] = future.result()
                    log(f"{name}: done in {results[name]['duration_seconds']:.1f}s")
                except Interrupted:
                    raise  # no component's failure: the whole backup stops
                except BackupError as error:
                    errors.append(f"{name}: {error}")
                    # No point finishing the others.
                    stop_children_until(futures_ended(futures.values()))
        except BaseException:
            stop_children_until(futures_ended(futures.values()))
            raise
        if errors:
            raise BackupError("backup failed: " + "; ".join(errors))
    return {name: results[name] for name in COMPONENT_ORDER if name in results}


# --------------------------------------------------------------------------- verify


def check_ciphertext(
    entry: BackupEntry,
    component: str,
    artifact: dict[str, Any],
    cipher: Cipher,
    *,
    full_hash: bool = True,
) -> Path:
    """Checks of one artifact: present, size, SHA-256, and really ciphertext. Without
    ``full_hash`` the SHA-256 is left to the caller, who must check it while decrypting
    (``decrypted_stream(..., expected=...)``) before using anything decrypted."""
    name = str(artifact["name"])
    path = entry.path / name
    label = f"{component} ({name})"
    if not path.is_file():
        raise BackupError(f"{label}: missing: the manifest lists it but the file is not there")
    expected = int(artifact["size"])
    if full_hash:
        size, digest = file_sha256(path)
    else:
        size, digest = path.stat().st_size, None
    if size < expected:
        raise BackupError(f"{label}: truncated: {size} bytes, the manifest records {expected}")
    if size > expected:
        raise BackupError(f"{label}: corrupted: {size} bytes, the manifest records {expected}")
    if digest is not None and digest != artifact["sha256"]:
        raise BackupError(f"{label}: corrupted: SHA-256 does not match the manifest")
    with open(path, "rb") as handle:
        head = handle.read(IDENTITY_HEAD_BYTES)
    for magic, what in CLEAR_HEADERS.items():
        if head.startswith(magic):
            raise BackupError(f"{label}: not encrypted: starts with a plaintext {what} header")
    if head[257:262] == b"ustar":
        raise BackupError(f"{label}: not encrypted: it is a plaintext tar archive")
    if not cipher.looks_encrypted(head):
        raise BackupError(f"{label}: not {cipher.settings.method} ciphertext")
    # What a restore identifies the file by (streams.ExpectedCiphertext): verify passes no
    # backup whose restore would refuse it.
    recorded_head = artifact.get("head_sha256")
    if digest is not None and recorded_head and hashlib.sha256(head).hexdigest() != recorded_head:
        raise BackupError(
            f"{label}: corrupted: head_sha256 (of its first {IDENTITY_HEAD_BYTES} bytes) does "
            "not match the manifest, though its whole SHA-256 does (the manifest contradicts "
            "itself)"
        )
    return path


def consume_plaintext(kind: str, stream: IO[bytes], component: dict[str, Any]) -> int:
    """Read a decrypted artifact fully, checking its format; returns its size."""
    if kind == "tar":
        counter = _CountingReader(stream)
        chroma.read_archive(counter, component.get("files", []), target=None)  # type: ignore[arg-type]
        while counter.read(CHUNK):
            pass
        return counter.count
    if kind == physical_mod.KIND:
        counter = _CountingReader(stream)
        physical_mod.check_archive(counter)  # type: ignore[arg-type]
        return counter.count
    head = stream.read(len(PLAINTEXT_MAGIC[kind]))
    if head != PLAINTEXT_MAGIC[kind]:
        raise BackupError(f"decrypted data is not a {kind} stream")
    total = len(head)
    while True:
        chunk = stream.read(CHUNK)
        if not chunk:
            return total
        total += len(chunk)


class _CountingReader:
    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.count += len(data)
        return data


def check_encryption_matches(entry: BackupEntry, settings: CipherSettings) -> None:
    method = entry.manifest.get("encryption", {}).get("method")
    if method != settings.method:
        raise BackupError(
            f"backup {entry.backup_id} is encrypted with {method}; run with --encryption {method} "
            "and its key"
        )


def verify_backup(
    store: BackupStore, entry: BackupEntry, settings: CipherSettings, progress: Progress
) -> None:
    check_encryption_matches(entry, settings)
    settings.validate(need_encrypt=False, need_decrypt=True)
    log(f"verifying backup {entry.backup_id}")
    problems: list[str] = []
    with Cipher(settings) as cipher:
        for component_name, component in entry.manifest["components"].items():
            for artifact in component["artifacts"]:
                try:
                    path = check_ciphertext(entry, component_name, artifact, cipher)
                    started = time.monotonic()
                    with decrypted_stream(
                        cipher, path, f"{component_name} ({artifact['name']})"
                    ) as stream:
                        try:
                            size = consume_plaintext(str(artifact["kind"]), stream, component)
                        except BackupError as error:
                            raise BackupError(
                                f"{component_name} ({artifact['name']}): {error}"
                            ) from error
                    log(
                        f"{component_name}: ok ({human_bytes(size)} decrypted in "
                        f"{time.monotonic() - started:.1f}s)"
                    )
                except (DecryptFailed, BackupError) as error:
                    problems.append(str(error))
                    log(f"FAILED {error}")
    if problems:
        message = "; ".join(problems)
        store.record_verification(entry, False, message, "verify")
        raise BackupError(f"backup {entry.backup_id} failed verification: {message}")
    store.record_verification(
        entry, True, "all artifacts decrypt and match their checksums", "verify"
    )
    log(f"backup {entry.backup_id} verified")


# --------------------------------------------------------------------------- list


def verification_label(entry: BackupEntry) -> str:
    if entry.verification is None:
        return "unverified"
    state = "verified" if entry.verification.get("ok") else "FAILED"
    how = entry.verification.get("how", "verify")
    return f"{state} ({how} {entry.verification.get('checked_at', '?')})"


def pg_form_label(entry: BackupEntry) -> str:
    """``pg: logical``, ``pg: physical``, ``pg: logical+physical`` or ``pg: -``."""
    return "pg: " + ("+".join(entry.pg_forms) or "-")


def list_backups(store: BackupStore) -> list[str]:
    lines = [
        f"{'ID':<20} {'CREATED (UTC)':<25} {'SIZE':>10}  {'COMPONENTS':<22} "
        f"{'POSTGRES FORM':<21} VERIFICATION"
    ]
    for entry in reversed(store.entries()):
        components = ",".join(entry.manifest["components"])
        flag = "  SUSPECT: dated in the future, never used as latest" if entry.future else ""
        lines.append(
            f"{entry.backup_id:<20} {entry.manifest.get('created_at', '?')!s:<25} "
            f"{human_bytes(entry.total_size):>10}  {components:<22} "
            f"{pg_form_label(entry):<21} {verification_label(entry)}{flag}"
        )
    for bad in store.malformed:
        lines.append(f"{bad.backup_id:<20} MALFORMED, skipped: {bad.problem}")
    return lines


# --------------------------------------------------------------------------- prune


@dataclass(frozen=True)
class RetentionPolicy:
    daily: int = 7
    weekly: int = 4
    monthly: int = 6


def select_kept(entries: list[BackupEntry], policy: RetentionPolicy) -> dict[str, list[str]]:
    """backup id -> reasons to keep it. The newest backup of each of the last N days, ISO
    weeks and months that have backups is kept; so are, whatever the policy (even all 0),
    the newest backup and the newest verified backup, and the newest backup with a logical
    (portable) PostgreSQL dump: with physical-only daily backups the retention alone could
    drop the last portable copy. A backup dated in the future (``entry.future``) is suspect:
    it is kept, and it counts for nothing (no period, not the newest)."""
    reasons: dict[str, list[str]] = {}
    for entry in entries:
        if entry.future:
            reasons[entry.backup_id] = ["dated in the future: suspect, left for the operator"]
    current = [entry for entry in entries if not entry.future]
    newest_first = sorted(current, key=lambda e: (e.created_unix, e.backup_id), reverse=True)
    buckets: tuple[tuple[str, int, Callable[[dt.datetime], tuple[int, ...]]], ...] = (
        ("daily", policy.daily, lambda t: (t.year, t.month, t.day)),
        ("weekly", policy.weekly, lambda t: tuple(t.isocalendar()[:2])),
        ("monthly", policy.monthly, lambda t: (t.year, t.month)),
    )
    for label, count, period_of in buckets:
        seen: list[tuple[int, ...]] = []
        for entry in newest_first:
            if len(seen) >= count:
                break
            period = period_of(dt.datetime.fromtimestamp(entry.created_unix, dt.UTC))
            if period not in seen:
                seen.append(period)
                reasons.setdefault(entry.backup_id, []).append(label)
    if newest_first:
        reasons.setdefault(newest_first[0].backup_id, []).append("newest")
    for entry in newest_first:
        if entry.verified_ok:
            reasons.setdefault(entry.backup_id, []).append("newest verified")
            break
    for entry in newest_first:
        if entry.has_pg_logical:
            reasons.setdefault(entry.backup_id, []).append("newest with a logical dump")
            break
    return reasons


def prune(store: BackupStore, policy: RetentionPolicy, dry_run: bool) -> list[str]:
    with store.lock("prune"):
        entries = store.entries()
        kept = select_kept(entries, policy)
        removed = []
        for entry in entries:
            if entry.backup_id in kept:
                log(f"keep   {entry.backup_id} ({', '.join(kept[entry.backup_id])})")
                continue
            log(f"{'would delete' if dry_run else 'delete'} {entry.backup_id}")
            if not dry_run:
                # Rename first so a half-deleted backup never looks complete.
                doomed = store.root / f".tmp-deleting-{entry.backup_id}"
                os.rename(entry.path, doomed)
                shutil.rmtree(doomed)
            removed.append(entry.backup_id)
        _prune_wal(store, [e for e in entries if e.backup_id not in removed], dry_run)
        return removed


def _prune_wal(store: BackupStore, kept: list[BackupEntry], dry_run: bool) -> None:
    """Archived WAL older than the oldest kept base backup serves no restore; without any
    kept base backup nothing is deleted."""
    starts = [e.created_unix for e in kept if not e.future and "physical" in e.pg_forms]
    if not starts:
        return
    gone = wal.prune_segments(store, min(starts), dry_run)
    if gone:
        verb = "would delete" if dry_run else "deleted"
        log(f"wal: {verb} {len(gone)} archived segment(s) older than the oldest base backup")
