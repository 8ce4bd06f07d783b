"""The restore strategy of each store, registered by component name the way ``ops`` registers
the backup side (``COMPONENT_BACKUPS``). Every store has the same steps:

- ``check``: every precondition of staging *and* swapping (target exists or can be made,
  writable, owners, not a mount point where a rename is needed, free space for staging, no
  leftover of an earlier restore, the server stopped); touches nothing.
- ``stage``: decrypt, extract and prove the backup beside the live data (same filesystem).
- ``swap``: put the staged data live, keeping the previous data; a failure inside it undoes
  its own partial work before it raises.
- ``undo``: put the previous data back after a completed swap (a later store failed).
- ``discard``: remove what staging left (never live or kept data).
- ``drill``: restore into a throwaway instance and check (``DRILLS``).

so that ``restore.run_restore`` is one loop: check every store, stage every store, swap in
order keeping an undo stack."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rag_backup import chroma, pg, physical, pitr, redis_ops, wal
from rag_backup.crypto import Cipher, CipherSettings
from rag_backup.errors import BackupError
from rag_backup.localpg import LocalPostgres, find_server_bin_dir
from rag_backup.manifest import CHROMA_KIND, PG_LOGICAL_KIND, PG_PHYSICAL_KIND, REDIS_KIND
from rag_backup.pitr import backup_end_time
from rag_backup.progress import Progress, log
from rag_backup.store import BackupEntry, BackupStore, _writable_dir
from rag_backup.streams import (
    ExpectedCiphertext,
    Sink,
    copy_stream,
    decrypt_into,
    decrypted_stream,
)

MAX_PG_NAME = 63
# Top-level names rag-backup itself puts into a live directory it swaps by contents (the
# Chroma volume, the Redis data dir): never live data, never backed up.
RESTORE_PREFIX = chroma.RESTORE_ENTRY_PREFIX
# Headroom asked for beyond the known sizes when checking free space for staging.
FREE_SPACE_MARGIN = 16 * 1024 * 1024


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
    # Point-in-time recovery (physical only): a Unix time, or latest = all archived WAL.
    pg_target_time: float | None = None
    pg_target_latest: bool = False

    @property
    def pitr(self) -> bool:
        return self.pg_target_time is not None or self.pg_target_latest


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


# --------------------------------------------------------------------------- shared steps


def artifact(entry: BackupEntry, component: str, kind: str) -> dict[str, Any]:
    for item in entry.manifest["components"][component]["artifacts"]:
        if item.get("kind") == kind:
            return dict(item)
    if kind == PG_PHYSICAL_KIND:
        raise BackupError(
            f"backup {entry.backup_id} has no {kind} artifact for {component} "
            "(it was taken without --pg-physical); use --pg-mode logical"
        )
    if kind == PG_LOGICAL_KIND:
        raise BackupError(no_logical_message(entry))
    raise BackupError(f"backup {entry.backup_id} has no {kind} artifact for {component}")


def no_logical_message(entry: BackupEntry) -> str:
    return (
        f"backup {entry.backup_id} has no logical PostgreSQL dump (it was taken with "
        "--pg-physical --no-pg-logical: base backup only); restore it with --pg-mode "
        "physical --pg-data-dir <data dir of the stopped PostgreSQL>, or pick a backup "
        "with a logical dump (`rag-backup list` shows 'pg: logical'); nothing was changed"
    )


def _artifact_source(
    entry: BackupEntry, item: dict[str, Any], component: str
) -> tuple[Path, ExpectedCiphertext, str]:
    """An artifact's file, what the manifest says it is, and its name in messages."""
    expected = ExpectedCiphertext.of(item)
    return entry.path / str(item["name"]), expected, f"{component} ({item['name']})"


@contextmanager
def checked_plaintext(
    cipher: Cipher,
    entry: BackupEntry,
    item: dict[str, Any],
    component: str,
    cpu: dict[str, float] | None = None,
) -> Iterator[IO[bytes]]:
    """The plaintext of one artifact; its ciphertext's size and SHA-256 are checked in the
    same pass (a mismatch raises when the block ends: whatever was written from the stream
    must be discarded then; callers write only into staging areas). ``cpu``: see
    decrypted_stream."""
    path, expected, name = _artifact_source(entry, item, component)
    with decrypted_stream(cipher, path, name, expected, cpu) as stream:
        yield stream


def checked_plaintext_into(
    cipher: Cipher,
    entry: BackupEntry,
    item: dict[str, Any],
    component: str,
    cpu: dict[str, float] | None = None,
) -> Callable[[Sink], None]:
    """checked_plaintext for a consumer that takes pieces (streams.decrypt_into): the same
    checks, raised when the call returns."""
    path, expected, name = _artifact_source(entry, item, component)
    return lambda sink: decrypt_into(cipher, path, name, sink, expected, cpu)


def decrypt_to_file(
    cipher: Cipher, entry: BackupEntry, component: str, kind: str, target: Path, progress: Progress
) -> None:
    item = artifact(entry, component, kind)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with checked_plaintext(cipher, entry, item, component) as stream, open(fd, "wb") as out:
        copy_stream(stream, out, f"{component}: decrypted", progress)
        out.flush()
        os.fsync(out.fileno())


def extract_chroma(cipher: Cipher, entry: BackupEntry, target: Path) -> None:
    item = artifact(entry, "chroma", CHROMA_KIND)
    files = entry.manifest["components"]["chroma"].get("files", [])
    with checked_plaintext(cipher, entry, item, "chroma") as stream:
        # The ciphertext's SHA-256 covers every byte of the archive, so the files are not
        # hashed again here; names and sizes are still checked against the manifest.
        chroma.extract_with_tar(stream, files, target)
    problem = chroma.sqlite_integrity(target / chroma.SQLITE_NAME)
    if problem != "ok":
        raise BackupError(f"chroma: restored {chroma.SQLITE_NAME} fails integrity_check: {problem}")


def suffix(entry: BackupEntry) -> str:
    return entry.backup_id.lower().replace("-", "_")


def require_free_space(path: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(path).free
    if free < needed + FREE_SPACE_MARGIN:
        raise BackupError(
            f"{what}: {path} has {free // 2**20} MiB free; staging needs at least "
            f"{(needed + FREE_SPACE_MARGIN) // 2**20} MiB; nothing was changed"
        )


def require_writable(path: Path, option: str) -> None:
    if not _writable_dir(path):
        raise BackupError(f"{option}: {path} is not writable by this user; nothing was changed")


def move_entries(source: Path, target: Path, names: list[str]) -> list[str]:
    """Rename ``source/name`` to ``target/name`` for each name; returns those moved. On a
    failure the ones already moved go back before it raises."""
    moved: list[str] = []
    try:
        for name in names:
            os.rename(source / name, target / name)
            moved.append(name)
    except BaseException:
        for name in reversed(moved):
            os.rename(target / name, source / name)
        raise
    return moved


class SwapRollbackFailed(BackupError):
    """A swap failed and putting the previous data back failed too: the message says where
    each copy is."""


def rollback(store: str, where: str, action: Callable[[], None]) -> None:
    """Run a failed swap's rollback; if that fails too, say where the data is."""
    try:
        action()
    except BaseException as error:
        raise SwapRollbackFailed(
            f"{store}: the swap failed and putting the previous data back failed too "
            f"({error}): {where}; fix by hand"
        ) from error


def live_entries(directory: Path, names: tuple[str, ...] | None = None) -> list[str]:
    """The live entries of a directory swapped by contents (rag-backup's own excluded)."""
    found = sorted(p.name for p in directory.iterdir() if not p.name.startswith(RESTORE_PREFIX))
    return [n for n in found if n in names] if names is not None else found


# --------------------------------------------------------------------------- drill


@dataclass
class DrillContext:
    cfg: DrillConfig
    entry: BackupEntry
    cipher: Cipher
    work: Path  # 0700, this process's own files (dump, RDB, Chroma tree)
    server_root: Path  # where private PostgreSQL servers get their own 0700 directories
    progress: Progress
    timings: dict[str, float] = field(default_factory=dict)


def drill_postgres_logical(ctx: DrillContext) -> None:
    component = ctx.entry.manifest["components"]["postgres"]
    bin_dir = find_server_bin_dir(ctx.cfg.pg_bin_dir)
    dump_file = ctx.work / "postgres.dump"
    server = LocalPostgres(bin_dir, ctx.server_root, ctx.cfg.jobs)
    try:
        decrypt_to_file(ctx.cipher, ctx.entry, "postgres", PG_LOGICAL_KIND, dump_file, ctx.progress)
        database = str(component["database"])
        if database != "postgres":
            pg.create_database(server.settings, "postgres", database)
        settings = pg.PostgresSettings(database, server.settings.libpq_env, ctx.cfg.jobs, bin_dir)
        pg.restore_dump(settings, dump_file, database, keep_owners=False, jobs=ctx.cfg.jobs)
        counts = pg.row_counts(settings, database)
        pg.check_counts(component["row_counts"], counts, "postgres")
        log(f"drill: postgres ok ({len(counts)} tables, {sum(counts.values())} rows)")
    finally:
        server.stop()


def drill_postgres_physical(ctx: DrillContext) -> None:
    component = ctx.entry.manifest["components"]["postgres"]
    bin_dir = find_server_bin_dir(ctx.cfg.pg_bin_dir)
    root = Path(tempfile.mkdtemp(prefix="rag-drill-pgdata-", dir=ctx.server_root))
    try:
        data = root / "data"
        data.mkdir(mode=0o700)
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root; the copy must belong to the postgres user.
            shutil.chown(root, "postgres", "postgres")
            shutil.chown(data, "postgres", "postgres")
        item = artifact(ctx.entry, "postgres", PG_PHYSICAL_KIND)
        physical.extract_base_backup(
            checked_plaintext_into(ctx.cipher, ctx.entry, item, "postgres"), data
        )
        counts = physical.check_cluster(
            data,
            bin_dir,
            component,
            ctx.server_root,
            ctx.cfg.jobs,
            durable=False,
            where="postgres (physical)",
        )
        log(f"drill: postgres physical ok ({len(counts)} tables, {sum(counts.values())} rows)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _drill_pitr_plan(
    store: BackupStore, entry: BackupEntry
) -> tuple[dict[str, Any], dict[str, Any], float, pitr.Plan] | None:
    """Two archive cycles after the base backup (in the WAL history it belongs to), a random
    time between them, and the operator's plan to that time (pitr.plan, as ``restore
    --target-time`` and restore-stack.sh's resolve make it: range check, the segments it
    needs). The archive must reach its last cycle of that history from the backup: a gap
    anywhere fails the drill with the archived range (pitr.TargetOutOfRange), as the
    operator's restore to such a time would be refused. None: no two such cycles."""
    index = wal.read_index(store)
    history_end = pitr.next_history(entry, index)
    window = [c for c in wal.drill_window(store, backup_end_time(entry)) if c["at"] < history_end]
    if len(window) < 2:
        return None
    pitr.plan(store, float(window[-1]["at"]), entry.backup_id)  # the whole window reachable
    # Not a secret: any time in the window will do, a different one each drill.
    pick = random.randrange(len(window) - 1)  # noqa: S311
    before, after = window[pick], window[pick + 1]
    share = random.uniform(0.25, 0.75)  # noqa: S311
    target = before["at"] + (after["at"] - before["at"]) * share
    return before, after, target, pitr.plan(store, target, entry.backup_id)


def drill_postgres_pitr(ctx: DrillContext) -> None:
    """Point-in-time recovery of the base backup to a random time between two WAL archive
    cycles after it, resolved and staged through the operator's path (_drill_pitr_plan): the
    earlier cycle's marker transaction must be committed in the recovered copy, the later
    one's must not exist."""
    entry, component = ctx.entry, ctx.entry.manifest["components"]["postgres"]
    planned = _drill_pitr_plan(ctx.cfg.store, entry)
    if planned is None:
        log(
            "drill: postgres point-in-time recovery skipped: the WAL archive follows another "
            "history (the cluster was restored) before two cycles after this backup"
        )
        return
    before, after, target, plan = planned
    bin_dir = find_server_bin_dir(ctx.cfg.pg_bin_dir)
    root = Path(tempfile.mkdtemp(prefix="rag-drill-pitr-", dir=ctx.server_root))
    try:
        data, segments = root / "data", root / "wal"
        for directory in (data, segments):
            directory.mkdir(mode=0o700)
        if os.geteuid() == 0:
            for path in (root, data, segments):
                shutil.chown(path, "postgres", "postgres")
        item = artifact(entry, "postgres", PG_PHYSICAL_KIND)
        physical.extract_base_backup(
            checked_plaintext_into(ctx.cipher, entry, item, "postgres"), data
        )
        wal.stage_segments(
            ctx.cfg.store,
            ctx.cipher,
            wal.backup_start_segment(data),
            segments,
            ctx.progress,
            ctx.cfg.jobs,
            only=frozenset(plan.segments),
        )
        if os.geteuid() == 0:
            for path in segments.iterdir():
                shutil.chown(path, "postgres", "postgres")

        def status_of(settings: pg.PostgresSettings, xid: int) -> str:
            try:
                return pg.psql_value(settings, f"SELECT txid_status({int(xid)})", "postgres")
            except BackupError:
                return "absent"  # "transaction ID ... is in the future": never replayed

        def markers(settings: pg.PostgresSettings) -> None:
            status = status_of(settings, before["xid"])
            if status != "committed":
                raise BackupError(
                    f"postgres (PITR): the marker of {wal.describe_time(before['at'])} is "
                    f"{status or 'missing'} after recovery to {wal.describe_time(target)}"
                )
            if status_of(settings, after["xid"]) == "committed":
                raise BackupError(
                    f"postgres (PITR): recovery to {wal.describe_time(target)} went past the "
                    f"marker of {wal.describe_time(after['at'])}"
                )

        physical.check_pitr_cluster(
            data,
            bin_dir,
            component,
            ctx.server_root,
            ctx.cfg.jobs,
            (
                f"restore_command=cp {segments}/%f %p",
                "recovery_target_action=promote",
                f"recovery_target_time={wal.recovery_time(target)}",
            ),
            probe=markers,
        )
        log(
            f"drill: postgres point-in-time recovery to {wal.describe_time(target)} ok "
            f"({len(plan.segments)} WAL segment(s) of {plan.window.describe()})"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


def drill_redis(ctx: DrillContext) -> None:
    component = ctx.entry.manifest["components"]["redis"]
    data = ctx.work / "redis"
    data.mkdir(mode=0o700)
    decrypt_to_file(ctx.cipher, ctx.entry, "redis", REDIS_KIND, data / "dump.rdb", ctx.progress)
    redis_ops.check_rdb_file(data / "dump.rdb")
    server = redis_ops.LocalRedis(
        ctx.cfg.redis_server_cmd,
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
        raise BackupError(f"redis: {keys} keys loaded; the backup saw {component['keys_before']}")
    log(f"drill: redis ok ({keys} keys)")


def drill_chroma(ctx: DrillContext) -> None:
    component = ctx.entry.manifest["components"]["chroma"]
    target = ctx.work / "chroma"
    target.mkdir(mode=0o700)
    extract_chroma(ctx.cipher, ctx.entry, target)
    log(f"drill: chroma ok ({len(component.get('files', []))} files, integrity_check ok)")


class StoreRestore:
    """One store's restore; see the module docstring for the steps."""

    name = ""

    def __init__(self, cfg: RestoreConfig, entry: BackupEntry) -> None:
        self.cfg = cfg
        self.entry = entry
        self.component: dict[str, Any] = entry.manifest["components"][self.name]
        # Steps of stage() (wall seconds) and CPU seconds of its processes ("cpu ...") where
        # a store measures them: the restore's timings line shows them.
        self.phases: dict[str, float] = {}

    kind = ""

    def check(self) -> None:
        raise NotImplementedError

    def stage(self, cipher: Cipher, progress: Progress) -> None:
        raise NotImplementedError

    def swap(self) -> str:
        raise NotImplementedError

    def undo(self) -> str:
        raise NotImplementedError

    def discard(self) -> None:
        raise NotImplementedError

    @staticmethod
    def drill(ctx: DrillContext) -> None:
        raise NotImplementedError

    def ciphertext_size(self) -> int:
        return int(artifact(self.entry, self.name, self.kind)["size"])


# --------------------------------------------------------------------------- postgres


class PostgresLogicalRestore(StoreRestore):
    """The dump into a fresh database beside the live one (PostgreSQL running); swapped by
    renaming the databases."""

    name = "postgres"
    kind = PG_LOGICAL_KIND
    drill = staticmethod(drill_postgres_logical)

    def __init__(self, cfg: RestoreConfig, entry: BackupEntry) -> None:
        super().__init__(cfg, entry)
        self.file_dir: Path | None = None
        self.new_db: str | None = None
        self.had_old = False

    @property
    def settings(self) -> pg.PostgresSettings:
        assert self.cfg.postgres is not None
        return self.cfg.postgres

    def _names(self) -> tuple[str, str, str]:
        target = self.settings.database
        return (
            f"{target}_restore_{suffix(self.entry)}",
            f"{target}_pre_restore_{suffix(self.entry)}",
            f"{target}_failed_restore_{suffix(self.entry)}",
        )

    def _staging_root(self) -> Path:
        """Where the dump is decrypted: never a read-only BACKUP_DIR."""
        cfg = self.cfg
        if cfg.staging_dir is not None:
            return cfg.staging_dir
        if cfg.store.state_dir is not None:
            cfg.store.state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            return cfg.store.state_dir
        return cfg.store.root if cfg.store.writable() else Path(tempfile.gettempdir())

    def check(self) -> None:
        if not self.entry.has_pg_logical:
            raise BackupError(no_logical_message(self.entry))
        if self.cfg.postgres is None:
            raise BackupError(
                "restoring postgres needs PGDATABASE / --pg-database and libpq settings"
            )
        target = self.settings.database
        for name in self._names():
            if len(name) > MAX_PG_NAME:
                raise BackupError(f"--pg-database: {target!r} is too long for {name!r}")
        root = self._staging_root()
        require_writable(root, "--staging-dir / RAG_BACKUP_STATE_DIR")
        require_free_space(root, self.ciphertext_size(), "postgres staging")
        maintenance = self.cfg.maintenance_db
        new_db, old_name, _ = self._names()
        for name in (new_db, old_name):
            if pg.database_exists(self.settings, maintenance, name):
                raise BackupError(
                    f"database {name} already exists (an earlier restore?); drop or rename it "
                    "first; nothing was changed"
                )
        allowed = pg.psql_value(
            self.settings,
            "SELECT rolsuper OR rolcreatedb FROM pg_roles WHERE rolname = current_user",
            maintenance,
        )
        if allowed != "t":
            raise BackupError(
                "PGUSER: the restore role can neither create nor rename databases (needs "
                "CREATEDB and ownership of the live database, or SUPERUSER); nothing was changed"
            )

    def stage(self, cipher: Cipher, progress: Progress) -> None:
        settings, maintenance = self.settings, self.cfg.maintenance_db
        self.file_dir = Path(
            tempfile.mkdtemp(prefix=f".restore-{self.entry.backup_id}-", dir=self._staging_root())
        )
        new_db = self._names()[0]
        dump_file = self.file_dir / "postgres.dump"
        decrypt_to_file(cipher, self.entry, self.name, self.kind, dump_file, progress)
        if pg.database_exists(settings, maintenance, new_db):
            raise BackupError(f"database {new_db} already exists (an earlier restore?); drop it")
        pg.create_database(settings, maintenance, new_db)
        self.new_db = new_db
        log(f"postgres: restoring into new database {new_db}")
        pg.restore_dump(settings, dump_file, new_db, keep_owners=True, jobs=settings.jobs)
        dump_file.unlink()
        expected = self.component["row_counts"]
        pg.check_counts(expected, pg.row_counts(settings, new_db), "postgres")
        log(f"postgres: {len(expected)} tables restored, row counts match")

    def swap(self) -> str:
        settings, maintenance = self.settings, self.cfg.maintenance_db
        assert self.new_db is not None
        target = settings.database
        _, old_name, failed_name = self._names()
        self.had_old = pg.database_exists(settings, maintenance, target)
        if self.had_old:
            pg.rename_database(settings, maintenance, target, old_name)
        try:
            pg.rename_database(settings, maintenance, self.new_db, target)
        except BaseException:
            if self.had_old:
                rollback(
                    "postgres",
                    f"the previous database is {old_name}",
                    lambda: pg.rename_database(settings, maintenance, old_name, target),
                )
            raise
        self.new_db = None  # it is the live database now; never drop it
        try:
            # The data was counted before the swap; a rename cannot change it, so here it is
            # enough that the renamed database answers with the same tables.
            tables = json.loads(pg.psql_value(settings, pg.TABLES_SQL, target))
            if sorted(tables) != sorted(self.component["row_counts"]):
                raise BackupError(
                    f"postgres: {target} does not show the restored tables after the swap"
                )
        except BaseException:

            def back() -> None:
                pg.rename_database(settings, maintenance, target, failed_name)
                if self.had_old:
                    pg.rename_database(settings, maintenance, old_name, target)

            rollback("postgres", f"the previous database is {old_name}", back)
            raise
        log(f"postgres: database {target} restored")
        if self.had_old:
            return f"postgres: previous data kept as database {old_name} (drop it when satisfied)"
        return f"postgres: database {target} created (there was none before)"

    def undo(self) -> str:
        settings, maintenance = self.settings, self.cfg.maintenance_db
        target = settings.database
        _, old_name, failed_name = self._names()
        pg.rename_database(settings, maintenance, target, failed_name)
        if self.had_old:
            pg.rename_database(settings, maintenance, old_name, target)
            return f"postgres: database {target} is the previous one (restored: {failed_name})"
        return (
            f"postgres: there was no database {target} before; the restored copy is {failed_name}"
        )

    def discard(self) -> None:
        if self.file_dir is not None:
            shutil.rmtree(self.file_dir, ignore_errors=True)
            self.file_dir = None
        if self.new_db is not None:
            try:
                if pg.database_exists(self.settings, self.cfg.maintenance_db, self.new_db):
                    pg.drop_database(self.settings, self.cfg.maintenance_db, self.new_db)
            except BackupError as error:
                log(f"warning: could not drop staging database {self.new_db}: {error}")
            self.new_db = None


class PostgresPhysicalRestore(StoreRestore):
    """The base backup into a new data directory beside the live one (PostgreSQL stopped),
    proven by a private server (WAL replay, fsync, row counts); swapped by renames."""

    name = "postgres"
    kind = PG_PHYSICAL_KIND
    drill = staticmethod(drill_postgres_physical)

    def __init__(self, cfg: RestoreConfig, entry: BackupEntry) -> None:
        super().__init__(cfg, entry)
        self.staged: Path | None = None
        self.had_old = False
        self.pitr_plan: pitr.Plan | None = None

    @property
    def target(self) -> physical.PhysicalTarget:
        if self.cfg.pg_physical is None:
            raise BackupError(
                "--pg-mode physical needs --pg-data-dir / RAG_BACKUP_PG_DATA_DIR (the data "
                "directory of the stopped PostgreSQL)"
            )
        return self.cfg.pg_physical

    def check(self) -> None:
        target = self.target
        artifact(self.entry, self.name, self.kind)
        if self.cfg.pitr:
            self._check_pitr_range()
        physical.check_target(target, self.entry.backup_id, self.component)
        require_writable(target.data_dir.parent, "--pg-data-dir / RAG_BACKUP_PG_DATA_DIR (parent)")
        require_free_space(target.data_dir.parent, self.ciphertext_size(), "postgres (physical)")

    def stage(self, cipher: Cipher, progress: Progress) -> None:
        target = self.target
        data = target.staged_dir(self.entry.backup_id)
        owner = target.owner_path().stat()
        data.mkdir(mode=0o700)
        self.staged = data
        if os.geteuid() == 0:
            os.chown(data, owner.st_uid, owner.st_gid)
        log(f"postgres: extracting the base backup into {data}")
        item = artifact(self.entry, self.name, self.kind)
        phases = self.phases
        started = time.monotonic()
        cpu: dict[str, float] = {}
        extracted: dict[str, float] = {}
        jobs = self.cfg.postgres.jobs if self.cfg.postgres else 2
        prestage = (
            WalPrestage(self.cfg.store, cipher, data, progress, jobs, self._only())
            if self.cfg.pitr
            else None
        )
        try:
            physical.extract_base_backup(
                checked_plaintext_into(cipher, self.entry, item, self.name, cpu),
                data,
                durable=True,
                phases=extracted,
            )
        except BaseException:
            if prestage is not None:
                prestage.discard()
            raise
        fsync = extracted.pop("fsync", 0.0)
        phases["extract (read+hash | decrypt | zstd -d + write)"] = (
            time.monotonic() - started - fsync
        )
        phases.update({f"cpu {stage}": seconds for stage, seconds in cpu.items()})
        phases.update(extracted)
        phases["fsync"] = fsync
        if self.cfg.pitr:
            self._recover_to_target(cipher, data, progress, jobs, prestage)
            return
        log("postgres: starting a private server on the copy to replay its WAL and count rows")
        counts = physical.check_cluster(
            data,
            target.bin_dir,
            self.component,
            Path(tempfile.gettempdir()),
            jobs,
            durable=True,
            where="postgres (physical)",
            phases=phases,
        )
        log(f"postgres: physical copy consistent, {len(counts)} tables, row counts match")

    def _check_pitr_range(self) -> None:
        # The archive reaches the target from this base backup, without a gap (pitr.py).
        self.pitr_plan = pitr.plan(self.cfg.store, self.cfg.pg_target_time, self.entry.backup_id)

    def _only(self) -> frozenset[str] | None:
        """The segments the PITR plan needs (None: every one from the start segment)."""
        return frozenset(self.pitr_plan.segments) if self.pitr_plan else None

    def _recover_to_target(
        self,
        cipher: Cipher,
        data: Path,
        progress: Progress,
        jobs: int,
        prestage: WalPrestage | None,
    ) -> None:
        started = time.monotonic()
        try:
            start = wal.backup_start_segment(data)  # now from the authenticated copy
        except BaseException:
            if prestage is not None:
                prestage.discard()
            raise
        early = prestage.finish(start) if prestage is not None else None
        if early is not None:
            segments, count = early
        else:
            segments = wal_staging_dir(data)
        try:
            if early is None:
                count = wal.stage_segments(
                    self.cfg.store, cipher, start, segments, progress, jobs, only=self._only()
                )
            self.phases["WAL segments decrypted (after extraction)"] = time.monotonic() - started
            if os.geteuid() == 0:
                owner = data.stat()
                os.chown(segments, owner.st_uid, owner.st_gid)
                for item in segments.iterdir():
                    os.chown(item, owner.st_uid, owner.st_gid)
            recovery = [f"restore_command=cp {segments}/%f %p", "recovery_target_action=promote"]
            if self.cfg.pg_target_time is not None:
                when = wal.describe_time(self.cfg.pg_target_time)
                recovery.append(
                    f"recovery_target_time={wal.recovery_time(self.cfg.pg_target_time)}"
                )
                goal = f"to {when}"
            else:
                goal = "to the end of the archived WAL"
            log(f"postgres: recovering {goal} with {count} archived WAL segment(s)")
            started = time.monotonic()
            counts = physical.check_pitr_cluster(
                data,
                self.target.bin_dir,
                self.component,
                Path(tempfile.gettempdir()),
                jobs,
                tuple(recovery),
            )
            self.phases["recovery to target + row counts + shutdown"] = time.monotonic() - started
            log(f"postgres: recovered {goal}: {len(counts)} tables, {sum(counts.values())} rows")
        finally:
            shutil.rmtree(segments, ignore_errors=True)

    def swap(self) -> str:
        assert self.staged is not None
        target = self.target
        self.had_old = target.data_dir.exists()
        kept = physical.swap_in(target, self.staged, self.entry.backup_id)
        self.staged = None  # it is the live data directory now; never remove it
        log(f"postgres: data directory {target.data_dir} restored; start PostgreSQL")
        return kept

    def undo(self) -> str:
        target = self.target
        data = target.data_dir
        failed = data.parent / f"{data.name}.failed-restore-{self.entry.backup_id}"
        os.rename(data, failed)
        if self.had_old:
            os.rename(target.kept_dir(self.entry.backup_id), data)
            return f"postgres: data directory {data} is the previous one again (restored: {failed})"
        return f"postgres: no data directory {data} before; the restored copy is {failed}"

    def discard(self) -> None:
        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)
            self.staged = None


def wal_staging_dir(data: Path) -> Path:
    """Beside the staged copy (the data volume): the segments may be many 16 MiB files,
    more than a small /tmp holds."""
    return Path(tempfile.mkdtemp(prefix=".rag-restore-wal-", dir=data.parent))


class WalPrestage:
    """Point-in-time restore: decrypts the archived WAL while the base backup is still being
    extracted (the two are independent; otherwise the segments wait for the whole
    extraction). The start segment is read from the copy's backup_label as soon as tar has
    written it (pg_basebackup puts it first). That file is not authenticated yet, so it is
    opened without following a symlink or blocking on a FIFO, and it only chooses which of
    our own archived segments (each checked against the WAL index) get decrypted: after
    extraction ``finish`` compares it with the authenticated copy's and the caller stages
    again on any difference."""

    def __init__(
        self,
        store: BackupStore,
        cipher: Cipher,
        data: Path,
        progress: Progress,
        jobs: int,
        only: frozenset[str] | None,
    ) -> None:
        self.segments = wal_staging_dir(data)
        self._args = (store, cipher, data, progress, jobs)
        self._only = only
        self._extracted = threading.Event()
        self._start: str | None = None
        self._count = 0
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="wal-prestage", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        store, cipher, data, progress, jobs = self._args
        try:
            while not self._extracted.is_set():
                start = physical.start_segment_early(data)
                if start is None:
                    self._extracted.wait(0.02)
                    continue
                self._start = start
                self._count = wal.stage_segments(
                    store, cipher, start, self.segments, progress, jobs, only=self._only
                )
                return
        except BaseException as error:
            self._error = error

    def finish(self, start: str) -> tuple[Path, int] | None:
        """The staged segments and their count if they were staged from ``start`` (the
        authenticated backup_label's); otherwise None, and nothing of them is kept."""
        self._extracted.set()
        self._thread.join()
        if self._error is None and self._start == start:
            return self.segments, self._count
        if self._error is not None:
            log(f"postgres: WAL staged during extraction is not used ({self._error})")
        self.discard()
        return None

    def discard(self) -> None:
        self._extracted.set()
        self._thread.join()
        shutil.rmtree(self.segments, ignore_errors=True)


# --------------------------------------------------------------------------- redis


class RedisRestore(StoreRestore):
    """The RDB, and a multi-part AOF built on it, staged in ``<data>/.rag-restore-<id>``
    (same filesystem) and proven by a private redis-server with AOF on; swapped by moving
    ``dump.rdb`` and ``appendonlydir`` (Redis stopped)."""

    name = "redis"
    kind = REDIS_KIND
    drill = staticmethod(drill_redis)

    def __init__(self, cfg: RestoreConfig, entry: BackupEntry) -> None:
        super().__init__(cfg, entry)
        self.staged: Path | None = None
        self.keys: int | None = None
        self.moved: list[str] = []

    @property
    def target(self) -> RedisTarget:
        if self.cfg.redis is None:
            raise BackupError("restoring redis needs --redis-data-dir / REDIS_DATA_DIR")
        return self.cfg.redis

    def _paths(self) -> tuple[Path, Path, Path]:
        data = self.target.data_dir
        backup_id = self.entry.backup_id
        return (
            data / f"{RESTORE_PREFIX}restore-{backup_id}",
            data / f"rag-pre-restore-{backup_id}",
            data / f"{RESTORE_PREFIX}failed-restore-{backup_id}",
        )

    def _names(self) -> tuple[str, str]:
        return (self.target.dbfilename, self.target.appenddirname)

    def check(self) -> None:
        target = self.target
        option = "--redis-data-dir / REDIS_DATA_DIR"
        if not target.data_dir.is_dir():
            raise BackupError(f"{option}: {target.data_dir} is not a directory")
        for path in self._paths():
            if path.exists():
                raise BackupError(f"{path} already exists; move it away first; nothing was changed")
        require_writable(target.data_dir, option)
        if os.geteuid() != 0:
            for name in self._names():
                path = target.data_dir / name
                if path.is_dir() and not os.access(path, os.W_OK):
                    raise BackupError(
                        f"{option}: {path} belongs to another user and cannot be moved aside; "
                        "run the restore as its owner or as root; nothing was changed"
                    )
        require_free_space(target.data_dir, self.ciphertext_size(), "redis staging")
        if target.live is not None and redis_ops.remote_answers(target.live):
            raise BackupError(
                f"redis at {target.live.describe()} is still running; stop it before "
                "restoring (see docs/backup.md); nothing was changed"
            )

    def stage(self, cipher: Cipher, progress: Progress) -> None:
        target = self.target
        staged = self._paths()[0]
        staged.mkdir(mode=0o700)
        self.staged = staged
        rdb = staged / target.dbfilename
        decrypt_to_file(cipher, self.entry, self.name, self.kind, rdb, progress)
        redis_ops.check_rdb_file(rdb)
        self.keys = self._stage_aof(staged)
        log("redis: RDB staged and checked, AOF built on it and loaded in the staging dir")

    def _stage_aof(self, staging: Path) -> int:
        """In the staging dir: build the multi-part AOF directory with the RDB as its base (a
        server with ``appendonly yes`` ignores a bare RDB), then prove it by loading it once
        with AOF on, as the live server will, and checking the key count."""
        target = self.target
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
        if not redis_ops.keys_within_backup_range(self.component, from_aof):
            raise BackupError(
                f"redis: the restored AOF loads {from_aof} keys; the backup saw "
                f"{self.component['keys_before']}"
            )
        return from_aof

    def swap(self) -> str:
        assert self.staged is not None
        data = self.target.data_dir
        _, keep, _ = self._paths()
        keep.mkdir(mode=0o700)
        self.moved = []
        try:
            self.moved = move_entries(data, keep, live_entries(data, self._names()))
            # Staged and checked already (RDB checked, AOF built on it and loaded with AOF
            # on, in the staging directory); a rename does not change the files.
            move_entries(self.staged, data, list(self._names()))
        except BaseException:

            def back() -> None:
                move_entries(keep, data, self.moved)
                keep.rmdir()

            rollback("redis", f"the previous files are in {keep}", back)
            raise
        shutil.rmtree(self.staged, ignore_errors=True)
        self.staged = None
        log(f"redis: {self.keys} keys restored into {data}; AOF built on the RDB")
        return f"redis: previous {', '.join(self.moved) or 'data (none)'} kept in {keep}"

    def undo(self) -> str:
        data = self.target.data_dir
        _, keep, failed = self._paths()
        failed.mkdir(mode=0o700)
        move_entries(data, failed, live_entries(data, self._names()))
        move_entries(keep, data, self.moved)
        keep.rmdir()
        return f"redis: previous data back in {data} (restored copy: {failed})"

    def discard(self) -> None:
        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)
            self.staged = None


# --------------------------------------------------------------------------- chroma


class ChromaRestore(StoreRestore):
    """Chroma's directory is a volume's mount point (in the api and in the restore job) and
    cannot be renamed (EBUSY): the backup is staged in ``<dir>/.rag-restore-<id>`` (the same
    filesystem) and the directory's *contents* are swapped: the live entries move into
    ``<dir>/.rag-pre-restore-<id>``, the staged ones into ``<dir>``. Entries named
    ``.rag-*`` are rag-backup's own and are never backed up."""

    name = "chroma"
    kind = CHROMA_KIND
    drill = staticmethod(drill_chroma)

    def __init__(self, cfg: RestoreConfig, entry: BackupEntry) -> None:
        super().__init__(cfg, entry)
        self.staged: Path | None = None
        self.moved: list[str] = []
        self.created_dir = False

    @property
    def target(self) -> Path:
        if self.cfg.chroma_dir is None:
            raise BackupError("restoring chroma needs CHROMA_DIR / --chroma-dir")
        return self.cfg.chroma_dir

    def _paths(self) -> tuple[Path, Path, Path]:
        target, backup_id = self.target, self.entry.backup_id
        return (
            target / f"{RESTORE_PREFIX}restore-{backup_id}",
            target / f"{RESTORE_PREFIX}pre-restore-{backup_id}",
            target / f"{RESTORE_PREFIX}failed-restore-{backup_id}",
        )

    def check(self) -> None:
        target = self.target
        option = "CHROMA_DIR / --chroma-dir"
        if not target.exists():
            if not target.parent.is_dir():
                raise BackupError(f"{option}: parent of {target} does not exist")
            require_writable(target.parent, option)
            space_on = target.parent
        else:
            if not target.is_dir():
                raise BackupError(f"{option}: {target} is not a directory")
            for path in self._paths():
                if path.exists():
                    raise BackupError(
                        f"{path} already exists (an earlier restore?); move it away first; "
                        "nothing was changed"
                    )
            require_writable(target, option)
            if os.geteuid() != 0:
                for name in live_entries(target):
                    path = target / name
                    if path.is_dir() and not os.access(path, os.W_OK):
                        raise BackupError(
                            f"{option}: {path} belongs to another user and cannot be moved "
                            "aside; run the restore as its owner or as root; nothing was changed"
                        )
            space_on = target
        files = self.component.get("files", [])
        require_free_space(space_on, sum(int(f["size"]) for f in files), "chroma staging")

    def stage(self, cipher: Cipher, progress: Progress) -> None:
        target = self.target
        if not target.exists():
            target.mkdir()
            target.chmod(0o755)  # as a volume's root; the restore's umask is 077
            self.created_dir = True
        staged = self._paths()[0]
        staged.mkdir(mode=0o700)
        self.staged = staged
        extract_chroma(cipher, self.entry, staged)
        log("chroma: files staged, checksums and integrity_check ok")

    def swap(self) -> str:
        assert self.staged is not None
        target = self.target
        _, keep, failed = self._paths()
        keep.mkdir(mode=0o700)
        self.moved = []
        try:
            self.moved = move_entries(target, keep, live_entries(target))
            move_entries(self.staged, target, sorted(p.name for p in self.staged.iterdir()))
            problem = chroma.sqlite_integrity(target / chroma.SQLITE_NAME)
            if problem != "ok":
                raise BackupError(f"chroma: integrity_check failed after the swap: {problem}")
        except BaseException:

            def back() -> None:
                restored = live_entries(target)
                if restored:
                    failed.mkdir(mode=0o700, exist_ok=True)
                    move_entries(target, failed, restored)
                move_entries(keep, target, self.moved)
                keep.rmdir()

            rollback("chroma", f"the previous contents are in {keep}", back)
            raise
        os.rmdir(self.staged)
        self.staged = None
        log(f"chroma: {target} restored")
        if self.moved:
            return f"chroma: previous contents kept in {keep}"
        keep.rmdir()
        return f"chroma: {target} restored (it was empty before)"

    def undo(self) -> str:
        target = self.target
        _, keep, failed = self._paths()
        failed.mkdir(mode=0o700, exist_ok=True)
        move_entries(target, failed, live_entries(target))
        if keep.exists():
            move_entries(keep, target, self.moved)
            keep.rmdir()
        return f"chroma: previous contents back in {target} (restored copy: {failed})"

    def discard(self) -> None:
        if self.staged is not None:
            shutil.rmtree(self.staged, ignore_errors=True)
            self.staged = None
        if self.created_dir:
            with contextlib.suppress(OSError):
                self.target.rmdir()  # only if still empty: nothing was swapped in


def make_postgres(cfg: RestoreConfig, entry: BackupEntry) -> StoreRestore:
    if cfg.pg_mode == "physical":
        return PostgresPhysicalRestore(cfg, entry)
    return PostgresLogicalRestore(cfg, entry)


# Swapped in this order (and undone in the reverse one).
RESTORE_STORES: dict[str, Callable[[RestoreConfig, BackupEntry], StoreRestore]] = {
    "postgres": make_postgres,
    "redis": RedisRestore,
    "chroma": ChromaRestore,
}


# Every artifact there is gets drilled: with both PostgreSQL forms, the base backup (the
# fast restore) and the portable dump (the fallback).
DRILL_STORES: tuple[type[StoreRestore], ...] = (
    PostgresLogicalRestore,
    PostgresPhysicalRestore,
    RedisRestore,
    ChromaRestore,
)


def drills_for(
    entry: BackupEntry, store: BackupStore | None = None
) -> list[tuple[str, Callable[[DrillContext], None]]]:
    """Every artifact's drill; with a WAL archive of at least two cycles after a base
    backup, also a point-in-time recovery into that window."""
    pitr: list[tuple[str, Callable[[DrillContext], None]]] = []
    if (
        store is not None
        and "physical" in entry.pg_forms
        and len(wal.drill_window(store, backup_end_time(entry))) >= 2
    ):
        pitr = [("postgres (PITR)", drill_postgres_pitr)]
    present = {
        (name, item.get("kind"))
        for name, component in entry.manifest["components"].items()
        for item in component["artifacts"]
    }
    return [
        (f"{store.name} ({store.kind})", store.drill)
        for store in DRILL_STORES
        if (store.name, store.kind) in present
    ] + pitr


def timed(timings: dict[str, float], name: str, task: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        started = time.monotonic()
        try:
            task()
        finally:
            timings[name] = time.monotonic() - started

    return run
