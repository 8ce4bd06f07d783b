"""restore (stage + check everything, then swap each component, keeping the old data) and
drill (restore into throwaway instances, check, time it)."""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rag_backup import chroma, metrics, pg, physical, redis_ops
from rag_backup.crypto import Cipher, CipherSettings
from rag_backup.errors import BackupError
from rag_backup.localpg import LocalPostgres, find_server_bin_dir, run_as_owner_of
from rag_backup.ops import check_ciphertext, check_encryption_matches
from rag_backup.procs import kill_all_children
from rag_backup.progress import Progress, log
from rag_backup.store import PG_LOGICAL_KIND, BackupEntry, BackupStore
from rag_backup.streams import ExpectedCiphertext, copy_stream, decrypted_stream

MAX_PG_NAME = 63


@dataclass(frozen=True)
class RedisTarget:
    data_dir: Path
    dbfilename: str
    appenddirname: str
    server_cmd: str
    live: redis_ops.RedisSettings | None  # to refuse while the live server still answers


@dataclass(frozen=True)
class RestoreConfig:
    store: BackupStore
    cipher: CipherSettings
    backup_id: str | None
    components: tuple[str, ...] | None  # None: all in the backup
    postgres: pg.PostgresSettings | None
    maintenance_db: str
    redis: RedisTarget | None
    chroma_dir: Path | None
    staging_dir: Path | None
    assume_yes: bool
    pg_mode: str = "logical"  # or "physical": the base backup into a stopped cluster's dir
    pg_physical: physical.PhysicalTarget | None = None  # required for pg_mode physical


# The artifact each component restores from by default (PostgreSQL: the portable dump).
PORTABLE_KIND = {"postgres": PG_LOGICAL_KIND, "redis": "redis_rdb", "chroma": "tar"}


def _artifact(entry: BackupEntry, component: str, kind: str | None = None) -> dict[str, Any]:
    """The component's artifact of ``kind`` (default: its portable one)."""
    wanted = kind or PORTABLE_KIND[component]
    artifacts = entry.manifest["components"][component]["artifacts"]
    for artifact in artifacts:
        if artifact.get("kind") == wanted:
            return dict(artifact)
    if wanted == physical.KIND:
        raise BackupError(
            f"backup {entry.backup_id} has no {wanted} artifact for {component} "
            "(it was taken without --pg-physical); use --pg-mode logical"
        )
    if wanted == PG_LOGICAL_KIND:
        raise BackupError(_no_logical_message(entry))
    raise BackupError(f"backup {entry.backup_id} has no {wanted} artifact for {component}")


def _no_logical_message(entry: BackupEntry) -> str:
    return (
        f"backup {entry.backup_id} has no logical PostgreSQL dump (it was taken with "
        "--pg-physical --no-pg-logical: base backup only); restore it with --pg-mode "
        "physical --pg-data-dir <data dir of the stopped PostgreSQL>, or pick a backup "
        "with a logical dump (`rag-backup list` shows 'pg: logical'); nothing was changed"
    )


def has_physical(entry: BackupEntry) -> bool:
    return "physical" in entry.pg_forms


@contextmanager
def _checked_plaintext(
    cipher: Cipher, entry: BackupEntry, artifact: dict[str, Any], component: str
) -> Iterator[IO[bytes]]:
    """The plaintext of one artifact; its ciphertext's size and SHA-256 are checked in the
    same pass (a mismatch raises when the block ends: whatever was written from the stream
    must be discarded then; callers write only into staging areas)."""
    path = entry.path / str(artifact["name"])
    expected = ExpectedCiphertext(int(artifact["size"]), str(artifact["sha256"]))
    with decrypted_stream(cipher, path, f"{component} ({artifact['name']})", expected) as stream:
        yield stream


def _decrypt_to_file(
    cipher: Cipher, entry: BackupEntry, component: str, target: Path, progress: Progress
) -> None:
    artifact = _artifact(entry, component)
    with (
        _checked_plaintext(cipher, entry, artifact, component) as stream,
        open(target, "xb") as out,
    ):
        copy_stream(stream, out, f"{component}: decrypted", progress)
        out.flush()
        os.fsync(out.fileno())


def _extract_chroma(cipher: Cipher, entry: BackupEntry, target: Path) -> None:
    artifact = _artifact(entry, "chroma")
    files = entry.manifest["components"]["chroma"].get("files", [])
    with _checked_plaintext(cipher, entry, artifact, "chroma") as stream:
        # The ciphertext's SHA-256 covers every byte of the archive, so the files are not
        # hashed again here; names and sizes are still checked against the manifest.
        chroma.extract_with_tar(stream, files, target)
    problem = chroma.sqlite_integrity(target / chroma.SQLITE_NAME)
    if problem != "ok":
        raise BackupError(f"chroma: restored {chroma.SQLITE_NAME} fails integrity_check: {problem}")


def select_components(entry: BackupEntry, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    available = tuple(entry.manifest["components"])
    if requested is None:
        return available
    missing = [c for c in requested if c not in available]
    if missing:
        raise BackupError(
            f"backup {entry.backup_id} has no {', '.join(missing)} component "
            f"(it has: {', '.join(available) or 'none'})"
        )
    return requested


def _check_all_ciphertext(
    entry: BackupEntry, components: tuple[str, ...], cipher: Cipher, kinds: set[str] | None = None
) -> None:
    """Presence, size and ciphertext header of every artifact that will be used (``kinds``:
    None = all); the SHA-256 is checked while each one is decrypted into its staging area."""
    for component in components:
        for artifact in entry.manifest["components"][component]["artifacts"]:
            if kinds is None or artifact.get("kind") in kinds:
                check_ciphertext(entry, component, artifact, cipher, full_hash=False)


def _confirm(message: str, assume_yes: bool) -> None:
    if assume_yes:
        return
    if not sys.stdin.isatty():
        raise BackupError("restore needs confirmation: run it in a terminal or pass --yes")
    print(message, file=sys.stderr)
    answer = input("Type 'restore' to continue: ")
    if answer.strip() != "restore":
        raise BackupError("restore cancelled; nothing was changed")


# --------------------------------------------------------------------------- restore


@dataclass
class _Staged:
    pg_new_db: str | None = None
    redis_dir: Path | None = None
    chroma_dir: Path | None = None
    pg_file_dir: Path | None = None
    pg_data_dir: Path | None = None  # physical: the extracted, checked cluster
    redis_keys: int | None = None
    timings: dict[str, float] = field(default_factory=dict)


# Nice value of the short staging chains (Redis, Chroma) while PostgreSQL's longer chain
# runs: on a CPU-bound restore the longest chain then gets the cores first and its I/O-bound
# tail (WAL replay, fsync) overlaps the others' work instead of following it.
SHORT_CHAIN_NICE = 10


def _timed(
    timings: dict[str, float], name: str, task: Callable[[], None], *, nice: int = 0
) -> Callable[[], None]:
    def run() -> None:
        if nice:
            # Linux: the nice value is per thread and inherited by the children it starts.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        started = time.monotonic()
        try:
            task()
        finally:
            timings[name] = time.monotonic() - started

    return run


def _log_timings(timings: dict[str, float]) -> None:
    log("timings: " + ", ".join(f"{name} {seconds:.2f}s" for name, seconds in timings.items()))


def _suffix(entry: BackupEntry) -> str:
    return entry.backup_id.lower().replace("-", "_")


def run_restore(cfg: RestoreConfig, progress: Progress) -> list[str]:
    """Returns the lines describing what was kept for rollback."""
    entry = cfg.store.get(cfg.backup_id)
    check_encryption_matches(entry, cfg.cipher)
    cfg.cipher.validate(need_encrypt=False, need_decrypt=True)
    components = select_components(entry, cfg.components)
    _check_targets(cfg, entry, components)
    started = time.monotonic()
    with cfg.store.lock("restore", read_only_ok=True), Cipher(cfg.cipher) as cipher:
        log(f"checking backup {entry.backup_id} before touching anything")
        pg_kind = physical.KIND if cfg.pg_mode == "physical" else PG_LOGICAL_KIND
        _check_all_ciphertext(entry, components, cipher, {pg_kind, "redis_rdb", "tar"})
        _confirm(
            f"Restore backup {entry.backup_id} ({', '.join(components)}) over the live data? "
            "The current data is kept aside for rollback.",
            cfg.assume_yes,
        )
        staged = _Staged()
        staging_started = time.monotonic()
        staged.timings["checks"] = staging_started - started
        try:
            _stage_all(cfg, entry, components, cipher, staged, progress)
        except BaseException:
            kill_all_children()
            _discard_staged(cfg, staged)
            raise
        staged.timings["staging (parallel)"] = time.monotonic() - staging_started
        log("backup fully decrypted, staged and checked; swapping it in")
        kept: list[str] = []
        try:
            if "postgres" in components:
                swap_pg = _swap_postgres_physical if cfg.pg_mode == "physical" else _swap_postgres
                kept.append(_timed_call(staged, "swap postgres", swap_pg, cfg, entry))
            if "redis" in components:
                kept.append(_timed_call(staged, "swap redis", _swap_redis, cfg, entry))
            if "chroma" in components:
                kept.append(_timed_call(staged, "swap chroma", _swap_chroma, cfg, entry))
        finally:
            _discard_staged(cfg, staged)
        staged.timings["total"] = time.monotonic() - started
        _log_timings(staged.timings)
        return kept


def _staging_root(cfg: RestoreConfig) -> Path:
    """Where the PostgreSQL dump is decrypted: never a read-only BACKUP_DIR."""
    if cfg.staging_dir is not None:
        return cfg.staging_dir
    if cfg.store.state_dir is not None:
        cfg.store.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return cfg.store.state_dir
    return cfg.store.root if cfg.store.writable() else Path(tempfile.gettempdir())


def _timed_call(
    staged: _Staged,
    name: str,
    swap: Callable[[RestoreConfig, BackupEntry, _Staged], str],
    cfg: RestoreConfig,
    entry: BackupEntry,
) -> str:
    started = time.monotonic()
    try:
        return swap(cfg, entry, staged)
    finally:
        staged.timings[name] = time.monotonic() - started


def _check_targets(cfg: RestoreConfig, entry: BackupEntry, components: tuple[str, ...]) -> None:
    if "postgres" in components and cfg.pg_mode == "physical":
        if cfg.pg_physical is None:
            raise BackupError(
                "--pg-mode physical needs --pg-data-dir / RAG_BACKUP_PG_DATA_DIR (the data "
                "directory of the stopped PostgreSQL)"
            )
        _artifact(entry, "postgres", physical.KIND)
        physical.check_target(
            cfg.pg_physical, entry.backup_id, entry.manifest["components"]["postgres"]
        )
    elif "postgres" in components:
        if not entry.has_pg_logical:
            raise BackupError(_no_logical_message(entry))
        if cfg.postgres is None:
            raise BackupError(
                "restoring postgres needs PGDATABASE / --pg-database and libpq settings"
            )
        new_name = f"{cfg.postgres.database}_pre_restore_{_suffix(entry)}"
        if len(new_name) > MAX_PG_NAME:
            raise BackupError(
                f"--pg-database: {cfg.postgres.database!r} is too long for {new_name!r}"
            )
    if "redis" in components:
        if cfg.redis is None:
            raise BackupError("restoring redis needs --redis-data-dir / REDIS_DATA_DIR")
        if not cfg.redis.data_dir.is_dir():
            raise BackupError(f"--redis-data-dir: {cfg.redis.data_dir} is not a directory")
        keep = cfg.redis.data_dir / f"rag-pre-restore-{entry.backup_id}"
        if keep.exists():
            raise BackupError(f"{keep} already exists; move it away first; nothing was changed")
        if cfg.redis.live is not None and redis_ops.remote_answers(cfg.redis.live):
            raise BackupError(
                f"redis at {cfg.redis.live.describe()} is still running; stop it before "
                "restoring (see docs/backup.md); nothing was changed"
            )
    if "chroma" in components:
        if cfg.chroma_dir is None:
            raise BackupError("restoring chroma needs CHROMA_DIR / --chroma-dir")
        if not cfg.chroma_dir.parent.is_dir():
            raise BackupError(f"CHROMA_DIR: parent of {cfg.chroma_dir} does not exist")


def _stage_all(
    cfg: RestoreConfig,
    entry: BackupEntry,
    components: tuple[str, ...],
    cipher: Cipher,
    staged: _Staged,
    progress: Progress,
) -> None:
    suffix = _suffix(entry)
    tasks: list[Callable[[], None]] = []
    short_chain_nice = SHORT_CHAIN_NICE if "postgres" in components else 0
    if "postgres" in components and cfg.pg_mode == "physical":
        assert cfg.pg_physical is not None
        pg_target = cfg.pg_physical
        staged.pg_data_dir = pg_target.staged_dir(entry.backup_id)
        tasks.append(
            _timed(
                staged.timings,
                "stage postgres (physical)",
                lambda: _stage_pg_physical(cfg, entry, cipher, pg_target, staged),
            )
        )
    elif "postgres" in components:
        assert cfg.postgres is not None
        pg_settings = cfg.postgres
        staging_root = _staging_root(cfg)
        staged.pg_file_dir = Path(
            tempfile.mkdtemp(prefix=f".restore-{entry.backup_id}-", dir=staging_root)
        )
        staged.pg_new_db = f"{pg_settings.database}_restore_{suffix}"

        def stage_pg() -> None:
            assert staged.pg_file_dir is not None and staged.pg_new_db is not None
            dump_file = staged.pg_file_dir / "postgres.dump"
            _decrypt_to_file(cipher, entry, "postgres", dump_file, progress)
            if pg.database_exists(pg_settings, cfg.maintenance_db, staged.pg_new_db):
                raise BackupError(
                    f"database {staged.pg_new_db} already exists (an earlier restore?); "
                    "drop it first"
                )
            pg.create_database(pg_settings, cfg.maintenance_db, staged.pg_new_db)
            log(f"postgres: restoring into new database {staged.pg_new_db}")
            pg.restore_dump(
                pg_settings, dump_file, staged.pg_new_db, keep_owners=True, jobs=pg_settings.jobs
            )
            dump_file.unlink()
            expected = entry.manifest["components"]["postgres"]["row_counts"]
            pg.check_counts(expected, pg.row_counts(pg_settings, staged.pg_new_db), "postgres")
            log(f"postgres: {len(expected)} tables restored, row counts match")

        tasks.append(_timed(staged.timings, "stage postgres (logical)", stage_pg))
    if "redis" in components:
        assert cfg.redis is not None
        redis_target = cfg.redis
        staged.redis_dir = redis_target.data_dir / f".rag-restore-{entry.backup_id}"

        def stage_redis() -> None:
            assert staged.redis_dir is not None
            staged.redis_dir.mkdir(mode=0o700)
            rdb = staged.redis_dir / redis_target.dbfilename
            _decrypt_to_file(cipher, entry, "redis", rdb, progress)
            redis_ops.check_rdb_file(rdb)
            staged.redis_keys = _stage_redis_aof(
                redis_target, staged.redis_dir, entry.manifest["components"]["redis"]
            )
            log("redis: RDB staged and checked, AOF built on it and loaded in the staging dir")

        tasks.append(_timed(staged.timings, "stage redis", stage_redis, nice=short_chain_nice))
    if "chroma" in components:
        assert cfg.chroma_dir is not None
        target = cfg.chroma_dir
        staged.chroma_dir = target.parent / f".{target.name}.rag-restore-{entry.backup_id}"

        def stage_chroma() -> None:
            assert staged.chroma_dir is not None
            staged.chroma_dir.mkdir(mode=0o755)
            _extract_chroma(cipher, entry, staged.chroma_dir)
            log("chroma: files staged, checksums and integrity_check ok")

        tasks.append(_timed(staged.timings, "stage chroma", stage_chroma, nice=short_chain_nice))
    _run_parallel(tasks)


def _stage_redis_aof(target: RedisTarget, staging: Path, component: dict[str, Any]) -> int:
    """In the staging dir: build the multi-part AOF directory with the RDB as its base (a
    server with ``appendonly yes`` ignores a bare RDB), then prove it by loading it once with
    AOF on, as the live server will, and checking the key count. Returns the key count."""
    redis_ops.build_aof_dir(staging / target.dbfilename, staging / target.appenddirname)
    check = redis_ops.LocalRedis(
        target.server_cmd,
        staging,
        dbfilename=target.dbfilename,
        appenddirname=target.appenddirname,
        appendonly=True,
    )
    try:
        from_aof = redis_ops.total_keys(check.keyspace())
    finally:
        check.stop()
    if not redis_ops.keys_within_backup_range(component, from_aof):
        raise BackupError(
            f"redis: the restored AOF loads {from_aof} keys; the backup saw "
            f"{component['keys_before']}"
        )
    return from_aof


def _stage_pg_physical(
    cfg: RestoreConfig,
    entry: BackupEntry,
    cipher: Cipher,
    target: physical.PhysicalTarget,
    staged: _Staged,
) -> None:
    assert staged.pg_data_dir is not None
    data = staged.pg_data_dir
    component = entry.manifest["components"]["postgres"]
    owner = target.owner_path().stat()
    data.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(data, owner.st_uid, owner.st_gid)
    log(f"postgres: extracting the base backup into {data}")
    started = time.monotonic()
    artifact = _artifact(entry, "postgres", physical.KIND)
    with _checked_plaintext(cipher, entry, artifact, "postgres") as stream:
        physical.extract_with_tar(stream, data, run_as_owner_of(data))
    staged.timings["postgres extract (in stage)"] = time.monotonic() - started
    log("postgres: starting a private server on the copy to replay its WAL and count rows")
    work = Path(tempfile.mkdtemp(prefix="rag-restore-pg-"))
    try:
        work.chmod(0o711)
        counts = physical.check_cluster(
            data,
            target.bin_dir,
            component,
            work,
            cfg.postgres.jobs if cfg.postgres else 2,
            durable=True,
            where="postgres (physical)",
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"postgres: physical copy consistent, {len(counts)} tables, row counts match")


def _run_parallel(tasks: list[Callable[[], None]]) -> None:
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, len(tasks))) as pool:
        futures = [pool.submit(task) for task in tasks]
        for future in futures:
            try:
                future.result()
            except BackupError as error:
                errors.append(str(error))
                kill_all_children()
    if errors:
        raise BackupError("; ".join(errors))


def _discard_staged(cfg: RestoreConfig, staged: _Staged) -> None:
    if staged.pg_data_dir is not None:
        shutil.rmtree(staged.pg_data_dir, ignore_errors=True)
    if staged.pg_file_dir is not None:
        shutil.rmtree(staged.pg_file_dir, ignore_errors=True)
    if staged.pg_new_db and cfg.postgres is not None:
        try:
            if pg.database_exists(cfg.postgres, cfg.maintenance_db, staged.pg_new_db):
                pg.drop_database(cfg.postgres, cfg.maintenance_db, staged.pg_new_db)
        except BackupError as error:
            log(f"warning: could not drop staging database {staged.pg_new_db}: {error}")
    if staged.redis_dir is not None:
        shutil.rmtree(staged.redis_dir, ignore_errors=True)
    if staged.chroma_dir is not None:
        shutil.rmtree(staged.chroma_dir, ignore_errors=True)


def _swap_postgres(cfg: RestoreConfig, entry: BackupEntry, staged: _Staged) -> str:
    settings = cfg.postgres
    assert settings is not None and staged.pg_new_db is not None
    target = settings.database
    old_name = f"{target}_pre_restore_{_suffix(entry)}"
    had_old = pg.database_exists(settings, cfg.maintenance_db, target)
    if had_old:
        if pg.database_exists(settings, cfg.maintenance_db, old_name):
            raise BackupError(f"database {old_name} already exists; drop or rename it first")
        pg.rename_database(settings, cfg.maintenance_db, target, old_name)
    try:
        pg.rename_database(settings, cfg.maintenance_db, staged.pg_new_db, target)
    except BackupError:
        if had_old:
            pg.rename_database(settings, cfg.maintenance_db, old_name, target)
        raise
    staged.pg_new_db = None  # it is the live database now; never drop it
    expected = entry.manifest["components"]["postgres"]["row_counts"]
    try:
        # The data was counted before the swap; a rename cannot change it, so here it is
        # enough that the renamed database answers with the same tables.
        tables = json.loads(pg.psql_value(settings, pg.TABLES_SQL, target))
        if sorted(tables) != sorted(expected):
            raise BackupError(
                f"postgres: {target} does not show the restored tables after the swap"
            )
    except BackupError:
        if had_old:
            pg.rename_database(
                settings, cfg.maintenance_db, target, f"{target}_failed_restore_{_suffix(entry)}"
            )
            pg.rename_database(settings, cfg.maintenance_db, old_name, target)
        raise
    log(f"postgres: database {target} restored")
    if had_old:
        return f"postgres: previous data kept as database {old_name} (drop it when satisfied)"
    return f"postgres: database {target} created (there was none before)"


def _swap_postgres_physical(cfg: RestoreConfig, entry: BackupEntry, staged: _Staged) -> str:
    assert cfg.pg_physical is not None and staged.pg_data_dir is not None
    kept = physical.swap_in(cfg.pg_physical, staged.pg_data_dir, entry.backup_id)
    staged.pg_data_dir = None  # it is the live data directory now; never remove it
    log(f"postgres: data directory {cfg.pg_physical.data_dir} restored; start PostgreSQL")
    return kept


def _swap_redis(cfg: RestoreConfig, entry: BackupEntry, staged: _Staged) -> str:
    target = cfg.redis
    assert target is not None and staged.redis_dir is not None
    data = target.data_dir
    keep = data / f"rag-pre-restore-{entry.backup_id}"
    if keep.exists():
        raise BackupError(f"{keep} already exists; move it away first")
    keep.mkdir(mode=0o700)
    moved: list[str] = []
    for name in (target.dbfilename, target.appenddirname):
        if (data / name).exists():
            os.rename(data / name, keep / name)
            moved.append(name)

    def rollback() -> None:
        for name in (target.dbfilename, target.appenddirname):
            path = data / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for name in moved:
            os.rename(keep / name, data / name)
        keep.rmdir()

    try:
        # Staged and checked already (RDB checked, AOF built on it and loaded with AOF on,
        # in the staging directory); a rename does not change the files.
        for name in (target.dbfilename, target.appenddirname):
            os.rename(staged.redis_dir / name, data / name)
    except BaseException:
        rollback()
        raise
    log(f"redis: {staged.redis_keys} keys restored into {data}; AOF built on the RDB")
    return f"redis: previous {', '.join(moved) or 'data (none)'} kept in {keep}"


def _swap_chroma(cfg: RestoreConfig, entry: BackupEntry, staged: _Staged) -> str:
    target = cfg.chroma_dir
    assert target is not None and staged.chroma_dir is not None
    keep = target.parent / f"{target.name}.pre-restore-{entry.backup_id}"
    had_old = target.exists()
    if had_old:
        if keep.exists():
            raise BackupError(f"{keep} already exists; move it away first")
        os.rename(target, keep)
    os.rename(staged.chroma_dir, target)
    staged.chroma_dir = None
    problem = chroma.sqlite_integrity(target / chroma.SQLITE_NAME)
    if problem != "ok":
        os.rename(target, target.parent / f"{target.name}.failed-restore-{entry.backup_id}")
        if had_old:
            os.rename(keep, target)
        raise BackupError(f"chroma: integrity_check failed after the swap: {problem}")
    log(f"chroma: {target} restored")
    if had_old:
        return f"chroma: previous directory kept as {keep}"
    return f"chroma: {target} created (there was none before)"


# --------------------------------------------------------------------------- drill


@dataclass(frozen=True)
class DrillConfig:
    store: BackupStore
    cipher: CipherSettings
    backup_id: str | None
    pg_bin_dir: Path | None
    redis_server_cmd: str
    work_dir: Path | None
    jobs: int
    metrics_dir: Path | None


def run_drill(cfg: DrillConfig, progress: Progress) -> float:
    """Returns the measured restore time (RTO) in seconds."""
    success = False
    duration: float | None = None
    entry: BackupEntry | None = None
    try:
        entry = cfg.store.get(cfg.backup_id)
        check_encryption_matches(entry, cfg.cipher)
        cfg.cipher.validate(need_encrypt=False, need_decrypt=True)
        components = tuple(entry.manifest["components"])
        log(f"drill: restoring backup {entry.backup_id} into throwaway instances")
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="rag-drill-", dir=cfg.work_dir))
        work.chmod(0o711)  # the postgres user must reach its data dir inside
        try:
            with Cipher(cfg.cipher) as cipher:
                _check_all_ciphertext(entry, components, cipher)
                # Every artifact there is gets proven: with both PostgreSQL forms, the base
                # backup (the fast restore) and the portable dump (the fallback).
                tasks = [
                    _drill_task(name, cfg, entry, cipher, work, progress)
                    for name in components
                    if name != "postgres" or entry.has_pg_logical
                ]
                if has_physical(entry):
                    tasks.append(_drill_physical_task(cfg, entry, cipher, work))
                try:
                    _run_parallel(tasks)
                except BaseException:
                    kill_all_children()
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        duration = time.monotonic() - started
        success = True
        cfg.store.record_verification(entry, True, f"restore drill ok in {duration:.1f}s", "drill")
        log(f"drill: backup {entry.backup_id} restored and checked in {duration:.1f}s (RTO)")
        return duration
    except BackupError as error:
        if entry is not None:
            cfg.store.record_verification(entry, False, str(error), "drill")
        raise BackupError(f"drill failed: {error}") from error
    finally:
        if cfg.metrics_dir is not None:
            try:
                metrics.write_drill_metrics(
                    cfg.metrics_dir, success=success, run_timestamp=time.time(), duration_s=duration
                )
            except OSError as error:
                log(f"warning: cannot write metrics to {cfg.metrics_dir}: {error.strerror}")


def _drill_physical_task(
    cfg: DrillConfig, entry: BackupEntry, cipher: Cipher, work: Path
) -> Callable[[], None]:
    component = entry.manifest["components"]["postgres"]

    def drill_postgres_physical() -> None:
        bin_dir = find_server_bin_dir(cfg.pg_bin_dir)
        root = Path(tempfile.mkdtemp(prefix="rag-drill-pgdata-", dir=work))
        data = root / "data"
        data.mkdir(mode=0o700)
        artifact = _artifact(entry, "postgres", physical.KIND)
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root; the copy must belong to the postgres user.
            shutil.chown(root, "postgres", "postgres")
            shutil.chown(data, "postgres", "postgres")
        with _checked_plaintext(cipher, entry, artifact, "postgres") as stream:
            physical.extract_with_tar(stream, data, run_as_owner_of(data))
        counts = physical.check_cluster(
            data, bin_dir, component, work, cfg.jobs, durable=False, where="postgres (physical)"
        )
        log(f"drill: postgres physical ok ({len(counts)} tables, {sum(counts.values())} rows)")

    return drill_postgres_physical


def _drill_task(
    name: str, cfg: DrillConfig, entry: BackupEntry, cipher: Cipher, work: Path, progress: Progress
) -> Callable[[], None]:
    component = entry.manifest["components"][name]

    def drill_postgres() -> None:
        bin_dir = find_server_bin_dir(cfg.pg_bin_dir)
        dump_file = work / "postgres.dump"
        server = LocalPostgres(bin_dir, work, cfg.jobs)
        try:
            _decrypt_to_file(cipher, entry, "postgres", dump_file, progress)
            database = str(component["database"])
            if database != "postgres":
                pg.create_database(server.settings, "postgres", database)
            settings = pg.PostgresSettings(database, server.settings.libpq_env, cfg.jobs, bin_dir)
            pg.restore_dump(settings, dump_file, database, keep_owners=False, jobs=cfg.jobs)
            counts = pg.row_counts(settings, database)
            pg.check_counts(component["row_counts"], counts, "postgres")
            log(f"drill: postgres ok ({len(counts)} tables, {sum(counts.values())} rows)")
        finally:
            server.stop()

    def drill_redis() -> None:
        data = work / "redis"
        data.mkdir()
        _decrypt_to_file(cipher, entry, "redis", data / "dump.rdb", progress)
        redis_ops.check_rdb_file(data / "dump.rdb")
        server = redis_ops.LocalRedis(
            cfg.redis_server_cmd,
            data,
            dbfilename="dump.rdb",
            appenddirname="appendonlydir",
            appendonly=False,
        )
        try:
            keys = redis_ops.total_keys(server.keyspace())
        finally:
            server.stop()
        if not redis_ops.keys_within_backup_range(component, keys):
            raise BackupError(
                f"redis: {keys} keys loaded; the backup saw {component['keys_before']}"
            )
        log(f"drill: redis ok ({keys} keys)")

    def drill_chroma() -> None:
        target = work / "chroma"
        target.mkdir()
        _extract_chroma(cipher, entry, target)
        log(f"drill: chroma ok ({len(component.get('files', []))} files, integrity_check ok)")

    return {"postgres": drill_postgres, "redis": drill_redis, "chroma": drill_chroma}[name]
