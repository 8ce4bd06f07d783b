"""Command line: argparse subcommands; settings from options, else the environment.
Any failure ends with one line ``rag-backup: error: ...`` on stderr and exit code 1."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

from rag_backup import __version__, metrics, offsite, ops, pitr, redis_ops, wal
from rag_backup.crypto import CipherSettings
from rag_backup.errors import BackupError, BadArgument, Interrupted
from rag_backup.localpg import find_server_bin_dir
from rag_backup.pg import PostgresSettings
from rag_backup.physical import PhysicalTarget
from rag_backup.procs import kill_all_children
from rag_backup.progress import Progress, set_quiet
from rag_backup.restore import DrillConfig, RedisTarget, RestoreConfig, run_drill, run_restore
from rag_backup.store import BackupStore

LIBPQ_VARS = (
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGPASSFILE",
    "PGPASSWORD",
    "PGSSLMODE",
    "PGSSLROOTCERT",
    "PGSSLCERT",
    "PGSSLKEY",
    "PGCONNECT_TIMEOUT",
    "PGSERVICE",
    "PGSERVICEFILE",
)
ALL_COMPONENTS = ("postgres", "redis", "chroma")
RETENTION_DEFAULTS = {"daily": 7, "weekly": 4, "monthly": 6}
RETENTION_ENV = {period: f"RAG_BACKUP_KEEP_{period.upper()}" for period in RETENTION_DEFAULTS}


def _env_path(name: str) -> Path | None:
    value = os.environ.get(name)
    return Path(value) if value else None


def _env_flag(name: str, default: bool = False) -> bool:
    value = os.environ.get(name, "").strip().lower()
    if value == "":
        return default
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise BackupError(f"{name}: {value!r} is not a yes/no value; expected 1/0, true/false")


def _positive_int(option: str) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{option}: {text!r} is not a whole number") from None
        if value < 0:
            raise argparse.ArgumentTypeError(f"{option}: {text!r} must not be negative")
        return value

    return parse


def _choice(option: str, allowed: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in allowed:
            raise argparse.ArgumentTypeError(
                f"{option}: {text!r} is not one of {', '.join(allowed)}"
            )
        return text

    return parse


def _utc_time(option: str) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            when = dt.datetime.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{option}: {text!r} is not an ISO 8601 time, e.g. 2026-11-30T17:00:00Z"
            ) from None
        if when.tzinfo is None:
            raise argparse.ArgumentTypeError(
                f"{option}: {text!r} has no time zone; add Z or +HH:MM"
            )
        return when.timestamp()

    return parse


def _components(option: str) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        names = tuple(part.strip() for part in text.split(",") if part.strip())
        unknown = [n for n in names if n not in ALL_COMPONENTS]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"{option}: {text!r}; expected a comma list of {', '.join(ALL_COMPONENTS)}"
            )
        return names

    return parse


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backup-dir",
        type=Path,
        default=_env_path("BACKUP_DIR"),
        help="where backups live (env BACKUP_DIR)",
    )
    parser.add_argument(
        "--encryption",
        type=_choice("--encryption / RAG_BACKUP_ENCRYPTION", ("gpg", "age")),
        metavar="{gpg,age}",
        default=os.environ.get("RAG_BACKUP_ENCRYPTION", "gpg"),
        help="gpg (symmetric AES-256, passphrase file) or age (env RAG_BACKUP_ENCRYPTION)",
    )
    parser.add_argument(
        "--key-file",
        type=Path,
        default=_env_path("RAG_BACKUP_KEY_FILE"),
        help="gpg passphrase file (env RAG_BACKUP_KEY_FILE)",
    )
    parser.add_argument(
        "--age-recipients-file",
        type=Path,
        default=_env_path("RAG_BACKUP_AGE_RECIPIENTS_FILE"),
        help="age recipients file, for backup (env RAG_BACKUP_AGE_RECIPIENTS_FILE)",
    )
    parser.add_argument(
        "--age-identity-file",
        type=Path,
        default=_env_path("RAG_BACKUP_AGE_IDENTITY_FILE"),
        help="age identity file, for verify/restore/drill (env RAG_BACKUP_AGE_IDENTITY_FILE)",
    )
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=_env_path("RAG_BACKUP_STATE_DIR"),
        help="writable directory for what must be written when BACKUP_DIR is read-only: "
        "verification records, the restore lock, restore staging (env RAG_BACKUP_STATE_DIR; "
        "default: none, such records are then skipped with a note)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines")


def _add_metrics(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics-dir",
        type=Path,
        default=_env_path("RAG_BACKUP_METRICS_DIR"),
        help="node_exporter textfile directory for metrics (env RAG_BACKUP_METRICS_DIR)",
    )


def _add_pg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--pg-database",
        default=os.environ.get("PGDATABASE"),
        help="database to back up / restore (env PGDATABASE; host, port, user and password "
        "come from the libpq variables PGHOST, PGPORT, PGUSER, PGPASSFILE/PGPASSWORD)",
    )
    parser.add_argument(
        "--pg-jobs",
        type=_positive_int("--pg-jobs"),
        default=os.cpu_count() or 2,
        help="parallel pg_restore jobs (default: CPU count)",
    )


def _add_redis(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url",
        default=os.environ.get("REDIS_URL"),
        help="redis:// or rediss:// URL (env REDIS_URL)",
    )
    parser.add_argument(
        "--redis-password-file",
        type=Path,
        default=_env_path("REDIS_PASSWORD_FILE"),
        help="file with the Redis password, overrides one in the URL (env REDIS_PASSWORD_FILE)",
    )
    parser.add_argument(
        "--redis-ca-file",
        type=Path,
        default=_env_path("REDIS_TLS_CA_FILE"),
        help="CA certificate for rediss:// (env REDIS_TLS_CA_FILE)",
    )
    parser.add_argument(
        "--redis-cert-file",
        type=Path,
        default=_env_path("REDIS_TLS_CERT_FILE"),
        help="client certificate (env REDIS_TLS_CERT_FILE)",
    )
    parser.add_argument(
        "--redis-key-file",
        type=Path,
        default=_env_path("REDIS_TLS_KEY_FILE"),
        help="client key (env REDIS_TLS_KEY_FILE)",
    )


def _add_chroma(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--chroma-dir",
        type=Path,
        default=_env_path("CHROMA_DIR"),
        help="Chroma persist directory (env CHROMA_DIR)",
    )


def _add_target(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument(
        "--target-time",
        type=_utc_time("--target-time"),
        default=None,
        metavar="ISO-TIME",
        help=f"{what} (ISO 8601 with a zone, e.g. 2026-11-30T17:00:00Z): the newest base "
        "backup that ended before it and whose WAL, archived by wal-archive, reaches it; "
        "a time outside the archive is refused with the archived range (exit code 2)",
    )
    parser.add_argument(
        "--target",
        choices=("latest",),
        default=None,
        help="'latest': the end of the archived WAL (point-in-time recovery)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rag-backup",
        description="Encrypted, verified backups of PostgreSQL, Redis and the Chroma directory.",
    )
    parser.add_argument("--version", action="version", version=f"rag-backup {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    backup = sub.add_parser(
        "backup",
        help="take a backup",
        description="Dump, compress (zstd), encrypt and checksum every component.",
    )
    _add_common(backup)
    _add_metrics(backup)
    _add_pg(backup)
    _add_redis(backup)
    _add_chroma(backup)
    backup.add_argument(
        "--components",
        type=_components("--components / RAG_BACKUP_COMPONENTS"),
        default=os.environ.get("RAG_BACKUP_COMPONENTS", ",".join(ALL_COMPONENTS)),
        help="comma list (default postgres,redis,chroma; env RAG_BACKUP_COMPONENTS)",
    )
    backup.add_argument(
        "--zstd-level", type=_positive_int("--zstd-level"), default=3, help="zstd level (default 3)"
    )
    backup.add_argument(
        "--zstd-threads",
        type=_positive_int("--zstd-threads"),
        default=0,
        help="zstd threads (default 0 = one per core)",
    )
    backup.add_argument(
        "--chroma-lock-timeout",
        type=float,
        default=60.0,
        help="seconds to wait for Chroma's SQLite write lock (default 60)",
    )
    backup.add_argument("--verify", action="store_true", help="run verify on the new backup")
    backup.add_argument(
        "--pg-physical",
        action="store_true",
        default=None,
        help="also take a physical base backup (pg_basebackup) of the whole cluster, for a "
        "restore at copy speed; needs a replication connection (pg_hba 'replication' line, "
        "a role with REPLICATION); the logical dump is taken too unless --no-pg-logical "
        "(env RAG_BACKUP_PG_PHYSICAL=1)",
    )
    backup.add_argument(
        "--pg-logical",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="take the portable logical dump (pg_dump) of the database (default on); "
        "--no-pg-logical only with --pg-physical: the backup then holds the base backup "
        "alone, e.g. daily, with the portable dump on a weekly backup "
        "(env RAG_BACKUP_PG_LOGICAL=0/1)",
    )
    backup.add_argument(
        "--pg-physical-zstd-level",
        type=_positive_int("--pg-physical-zstd-level"),
        default=None,
        help="zstd level of the base backup (default: --zstd-level)",
    )

    verify = sub.add_parser(
        "verify",
        help="decrypt and check a backup without restoring",
        description="Check sizes, SHA-256, that every artifact is ciphertext, "
        "and decrypt+decompress+parse every artifact.",
    )
    verify.add_argument("backup_id", nargs="?", metavar="ID", help="backup id (default: newest)")
    _add_common(verify)
    _add_metrics(verify)

    resolve = sub.add_parser(
        "resolve",
        help="print the id a backup reference stands for",
        description="Print the one backup id that ID ('latest' by default: the newest "
        "well-formed backup not dated in the future) stands for, so a script resolves it once "
        "and passes that exact id to verify and restore.",
    )
    resolve.add_argument("backup_id", nargs="?", metavar="ID", default="latest")
    _add_target(resolve, "the base backup a point-in-time recovery to this time starts from")
    _add_common(resolve)

    list_parser = sub.add_parser(
        "list", help="list backups", description="List backups, newest first."
    )
    _add_common(list_parser)
    _add_metrics(list_parser)

    restore = sub.add_parser(
        "restore",
        help="restore a backup over the live data",
        description="Verify and stage the whole backup beside the targets, then swap it in, "
        "keeping the previous data for rollback. Redis must be stopped first.",
    )
    restore.add_argument("backup_id", nargs="?", metavar="ID", help="backup id (default: newest)")
    _add_common(restore)
    _add_metrics(restore)
    _add_pg(restore)
    _add_redis(restore)
    _add_chroma(restore)
    restore.add_argument(
        "--components",
        type=_components("--components"),
        default=None,
        help="comma list (default: every component in the backup)",
    )
    restore.add_argument(
        "--pg-maintenance-db",
        default="postgres",
        help="database to connect to for CREATE/RENAME DATABASE (default postgres)",
    )
    restore.add_argument(
        "--redis-data-dir",
        type=Path,
        default=_env_path("REDIS_DATA_DIR"),
        help="data dir of the (stopped) redis server (env REDIS_DATA_DIR)",
    )
    restore.add_argument("--redis-dbfilename", default="dump.rdb", help="default dump.rdb")
    restore.add_argument(
        "--redis-appenddirname", default="appendonlydir", help="default appendonlydir"
    )
    restore.add_argument(
        "--redis-server-cmd",
        default="redis-server",
        help="redis-server binary that loads the restored AOF to check it",
    )
    restore.add_argument(
        "--staging-dir",
        type=Path,
        default=None,
        help="where the PostgreSQL dump is staged (default: --state-dir, else BACKUP_DIR "
        "when writable, else the temp dir)",
    )
    restore.add_argument(
        "--pg-mode",
        type=_choice("--pg-mode / RAG_BACKUP_PG_MODE", ("logical", "physical")),
        metavar="{logical,physical}",
        default=os.environ.get("RAG_BACKUP_PG_MODE", "logical"),
        help="logical (default): the dump into a fresh database beside the live one, with "
        "PostgreSQL running (not for a backup taken with --no-pg-logical); physical: the "
        "base backup (backup taken with --pg-physical) "
        "into a new data directory swapped with --pg-data-dir, PostgreSQL stopped "
        "(env RAG_BACKUP_PG_MODE)",
    )
    restore.add_argument(
        "--pg-data-dir",
        type=Path,
        default=_env_path("RAG_BACKUP_PG_DATA_DIR"),
        help="--pg-mode physical: data directory of the stopped PostgreSQL; it is renamed to "
        "<dir>.pre-restore-<id> (env RAG_BACKUP_PG_DATA_DIR)",
    )
    restore.add_argument(
        "--pg-bin-dir",
        type=Path,
        default=_env_path("RAG_BACKUP_PG_BIN_DIR"),
        help="--pg-mode physical: PostgreSQL server binaries of the same major version "
        "(default: PATH, /usr/lib/postgresql/15/bin)",
    )
    _add_target(restore, "--pg-mode physical: point-in-time recovery to this time")
    restore.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    wal_archive = sub.add_parser(
        "wal-archive",
        help="archive PostgreSQL's WAL (one cycle) for point-in-time recovery",
        description="Close the current WAL segment, receive everything up to it with "
        "pg_receivewal over a replication slot, compress and encrypt each segment into "
        "BACKUP_DIR/wal. Run it every minute (the scheduler does): that is the RPO.",
    )
    _add_common(wal_archive)
    _add_metrics(wal_archive)
    _add_pg(wal_archive)
    wal_archive.add_argument(
        "--slot",
        default=os.environ.get("RAG_BACKUP_WAL_SLOT", "rag_backup_wal"),
        help="replication slot (created if missing; env RAG_BACKUP_WAL_SLOT)",
    )
    wal_archive.add_argument(
        "--spool-dir",
        type=Path,
        default=_env_path("RAG_BACKUP_WAL_SPOOL_DIR"),
        help="private directory for segments being received (env RAG_BACKUP_WAL_SPOOL_DIR; "
        "default: <state-dir>/wal-spool, else BACKUP_DIR/.wal-spool)",
    )

    drill = sub.add_parser(
        "drill",
        help="restore into throwaway instances and check",
        description="Restore into a throwaway PostgreSQL, redis-server and temp dir, check row "
        "counts, key count and SQLite integrity, and time it (RTO).",
    )
    drill.add_argument("backup_id", nargs="?", metavar="ID", help="backup id (default: newest)")
    _add_common(drill)
    _add_metrics(drill)
    drill.add_argument(
        "--pg-bin-dir",
        type=Path,
        default=_env_path("RAG_BACKUP_PG_BIN_DIR"),
        help="PostgreSQL server binaries (default: PATH, /usr/lib/postgresql/15/bin)",
    )
    drill.add_argument("--redis-server-cmd", default="redis-server", help="redis-server binary")
    drill.add_argument("--work-dir", type=Path, default=None, help="temp dir parent")
    drill.add_argument(
        "--jobs",
        type=_positive_int("--jobs"),
        default=os.cpu_count() or 2,
        help="parallel pg_restore jobs",
    )

    prune = sub.add_parser(
        "prune",
        help="delete backups outside the retention policy",
        description="Keep the newest backup of each of the last N days, weeks "
        "and months; never delete the newest verified backup.",
    )
    _add_common(prune)
    _add_metrics(prune)
    for period, default in RETENTION_DEFAULTS.items():
        # A string default goes through ``type`` too: a bad environment value gets the same
        # clear error (naming the variable) as a bad option, not a traceback.
        prune.add_argument(
            f"--keep-{period}",
            type=_positive_int(f"--keep-{period} / {RETENTION_ENV[period]}"),
            default=os.environ.get(RETENTION_ENV[period], str(default)),
        )
    prune.add_argument("--dry-run", action="store_true", help="only say what would be deleted")
    offsite.add_offsite_parser(sub, _add_common, _add_metrics, _positive_int, _add_target)
    return parser


def environment_problems() -> list[str]:
    """Every environment setting the scheduled commands (backup, prune, drill) read, checked
    up front: the scheduler refuses to start on a bad one instead of failing each night."""
    problems = []
    checks: list[tuple[str, Callable[[str], object]]] = [
        *[(RETENTION_ENV[p], _positive_int(RETENTION_ENV[p])) for p in RETENTION_DEFAULTS],
        ("RAG_BACKUP_ENCRYPTION", _choice("RAG_BACKUP_ENCRYPTION", ("gpg", "age"))),
        ("RAG_BACKUP_COMPONENTS", _components("RAG_BACKUP_COMPONENTS")),
        ("RAG_BACKUP_PG_MODE", _choice("RAG_BACKUP_PG_MODE", ("logical", "physical"))),
    ]
    for name, parse in checks:
        if name in os.environ:
            try:
                parse(os.environ[name])
            except argparse.ArgumentTypeError as error:
                problems.append(str(error))
    for flag in ("RAG_BACKUP_PG_PHYSICAL", "RAG_BACKUP_PG_LOGICAL"):
        try:
            _env_flag(flag)
        except BackupError as error:
            problems.append(str(error))
    return problems


def _store(args: argparse.Namespace) -> BackupStore:
    if args.backup_dir is None:
        raise BackupError("BACKUP_DIR / --backup-dir is required")
    store = BackupStore(args.backup_dir, state_dir=args.state_dir)
    args.opened_store = store  # main() writes the store metrics from its last scan
    return store


def _cipher(args: argparse.Namespace) -> CipherSettings:
    return CipherSettings(
        method=args.encryption,
        key_file=args.key_file,
        age_recipients_file=args.age_recipients_file,
        age_identity_file=args.age_identity_file,
    )


def _pg(args: argparse.Namespace, required: bool) -> PostgresSettings | None:
    if not args.pg_database:
        if required:
            raise BackupError("PGDATABASE / --pg-database is required for the postgres component")
        return None
    libpq = {name: os.environ[name] for name in LIBPQ_VARS if name in os.environ}
    return PostgresSettings(database=args.pg_database, libpq_env=libpq, jobs=max(1, args.pg_jobs))


def _redis(args: argparse.Namespace, required: bool) -> redis_ops.RedisSettings | None:
    if not args.redis_url:
        if required:
            raise BackupError("REDIS_URL / --redis-url is required for the redis component")
        return None
    return redis_ops.RedisSettings.from_url(
        args.redis_url,
        password_file=args.redis_password_file,
        ca_file=args.redis_ca_file,
        cert_file=args.redis_cert_file,
        key_file=args.redis_key_file,
    )


def _cmd_backup(args: argparse.Namespace, progress: Progress) -> int:
    store = _store(args)
    cipher = _cipher(args)
    cipher.validate(need_encrypt=True, need_decrypt=args.verify)
    components = tuple(args.components)
    chroma_dir = args.chroma_dir
    if "chroma" in components:
        if chroma_dir is None:
            raise BackupError("CHROMA_DIR / --chroma-dir is required for the chroma component")
        if not chroma_dir.is_dir():
            raise BackupError(f"CHROMA_DIR / --chroma-dir: {chroma_dir} is not a directory")
    if not 1 <= args.zstd_level <= 19:
        raise BackupError(f"--zstd-level: {args.zstd_level} is out of range; expected 1..19")
    level = args.pg_physical_zstd_level
    if level is not None and not 1 <= level <= 19:
        raise BackupError(f"--pg-physical-zstd-level: {level} is out of range; expected 1..19")
    pg_physical = bool(args.pg_physical) or _env_flag("RAG_BACKUP_PG_PHYSICAL")
    if pg_physical and "postgres" not in components:
        raise BackupError("--pg-physical needs the postgres component in --components")
    pg_logical = (
        args.pg_logical
        if args.pg_logical is not None
        else _env_flag("RAG_BACKUP_PG_LOGICAL", default=True)
    )
    if not pg_logical and "postgres" in components and not pg_physical:
        raise BackupError(
            "--no-pg-logical (RAG_BACKUP_PG_LOGICAL=0) needs --pg-physical "
            "(RAG_BACKUP_PG_PHYSICAL=1): a backup must contain PostgreSQL in some form; "
            "add --pg-physical, or leave postgres out of --components"
        )
    cfg = ops.BackupConfig(
        store=store,
        cipher=cipher,
        components=components,
        postgres=_pg(args, "postgres" in components),
        redis=_redis(args, "redis" in components),
        chroma_dir=chroma_dir,
        zstd_level=args.zstd_level,
        zstd_threads=args.zstd_threads,
        chroma_lock_timeout_s=args.chroma_lock_timeout,
        metrics_dir=args.metrics_dir,
        verify_after=args.verify,
        pg_physical=pg_physical,
        pg_logical=pg_logical,
        pg_physical_zstd_level=args.pg_physical_zstd_level,
    )
    entry = ops.run_backup(cfg, progress)
    print(entry.backup_id)
    return 0


def _cmd_verify(args: argparse.Namespace, progress: Progress) -> int:
    store = _store(args)
    entry = store.get(args.backup_id)
    ops.verify_backup(store, entry, _cipher(args), progress)
    print(f"{entry.backup_id} verified")
    return 0


def _cmd_resolve(args: argparse.Namespace, progress: Progress) -> int:
    if _pitr_requested(args):
        found = pitr.plan(_store(args), args.target_time, args.backup_id)
        print(f"rag-backup: recoverable {found.window.describe()}", file=sys.stderr)
        print(found.entry.backup_id)
        return 0
    print(_store(args).get(args.backup_id).backup_id)
    return 0


def _pitr_requested(args: argparse.Namespace) -> bool:
    if args.target_time is not None and args.target is not None:
        raise BadArgument("--target-time and --target latest exclude each other; give one")
    return args.target_time is not None or args.target is not None


def _cmd_list(args: argparse.Namespace, progress: Progress) -> int:
    for line in ops.list_backups(_store(args)):
        print(line)
    return 0


def _cmd_restore(args: argparse.Namespace, progress: Progress) -> int:
    _pitr_requested(args)
    store = _store(args)
    redis_target = None
    if args.redis_data_dir is not None:
        redis_target = RedisTarget(
            data_dir=args.redis_data_dir,
            dbfilename=args.redis_dbfilename,
            appenddirname=args.redis_appenddirname,
            server_cmd=args.redis_server_cmd,
            live=_redis(args, required=False),
        )
    pg_target = None
    if args.pg_mode == "physical" and args.pg_data_dir is not None:
        pg_target = PhysicalTarget(
            data_dir=args.pg_data_dir.absolute(), bin_dir=find_server_bin_dir(args.pg_bin_dir)
        )
    cfg = RestoreConfig(
        store=store,
        cipher=_cipher(args),
        backup_id=args.backup_id,
        components=args.components,
        postgres=_pg(args, required=False),
        maintenance_db=args.pg_maintenance_db,
        redis=redis_target,
        chroma_dir=args.chroma_dir,
        staging_dir=args.staging_dir,
        assume_yes=args.yes,
        pg_mode=args.pg_mode,
        pg_physical=pg_target,
        pg_target_time=args.target_time,
        pg_target_latest=args.target == "latest",
    )
    for line in run_restore(cfg, progress):
        print(line)
    return 0


def _cmd_wal_archive(args: argparse.Namespace, progress: Progress) -> int:
    store = _store(args)
    cipher = _cipher(args)
    cipher.validate(need_encrypt=True, need_decrypt=False)
    postgres = _pg(args, required=True)
    assert postgres is not None
    spool = args.spool_dir or (
        args.state_dir / "wal-spool" if args.state_dir else store.root / ".wal-spool"
    )
    cfg = wal.WalArchiveConfig(
        store=store,
        cipher=cipher,
        postgres=postgres,
        slot=args.slot,
        spool=spool,
        metrics_dir=args.metrics_dir,
    )
    for name in wal.archive_once(cfg, progress):
        print(name)
    return 0


def _cmd_drill(args: argparse.Namespace, progress: Progress) -> int:
    cfg = DrillConfig(
        store=_store(args),
        cipher=_cipher(args),
        backup_id=args.backup_id,
        pg_bin_dir=args.pg_bin_dir,
        redis_server_cmd=args.redis_server_cmd,
        work_dir=args.work_dir,
        jobs=max(1, args.jobs),
        metrics_dir=args.metrics_dir,
    )
    rto = run_drill(cfg, progress)
    print(f"drill ok: restore time {rto:.2f}s")
    return 0


def _cmd_prune(args: argparse.Namespace, progress: Progress) -> int:
    policy = ops.RetentionPolicy(args.keep_daily, args.keep_weekly, args.keep_monthly)
    removed = ops.prune(_store(args), policy, args.dry_run)
    print(f"{'would delete' if args.dry_run else 'deleted'} {len(removed)} backup(s)")
    return 0


COMMANDS = {
    "backup": _cmd_backup,
    "verify": _cmd_verify,
    "list": _cmd_list,
    "resolve": _cmd_resolve,
    "restore": _cmd_restore,
    "drill": _cmd_drill,
    "wal-archive": _cmd_wal_archive,
    "prune": _cmd_prune,
    "offsite": offsite.cmd_offsite,
}


def _on_signal(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(f"interrupted by signal {signal.Signals(signum).name}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    progress = Progress(enabled=not args.quiet)
    set_quiet(args.quiet)
    previous = {sig: signal.signal(sig, _on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return COMMANDS[args.command](args, progress)
    except BackupError as error:
        kill_all_children()
        print(f"rag-backup: error: {error}", file=sys.stderr)
        return 2 if isinstance(error, BadArgument) else 1
    except OSError as error:
        kill_all_children()
        print(f"rag-backup: error: {error}", file=sys.stderr)
        return 1
    finally:
        _write_store_metrics(args)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# Commands that write a verification record, so the store metrics follow them.
RECORDS_VERIFICATION = ("backup", "verify")


def _write_store_metrics(args: argparse.Namespace) -> None:
    store: BackupStore | None = getattr(args, "opened_store", None)
    directory: Path | None = getattr(args, "metrics_dir", None)
    if directory is None:
        return
    try:
        backup_dir: Path | None = getattr(args, "backup_dir", None)
        unscanned = store is None or not store.scanned
        if args.command in RECORDS_VERIFICATION and unscanned and backup_dir is not None:
            # backup --verify and verify of one id do not scan the folder, but their result
            # is what rag_backup_newest_verification_failed reports.
            store = BackupStore(backup_dir, state_dir=getattr(args, "state_dir", None))
            store.entries()
        if store is None or not store.scanned:
            return
        metrics.write_store_metrics(
            directory,
            malformed=len(store.malformed),
            future=store.future_count,
            newest_verification_failed=store.newest_verification_failed(),
        )
    except OSError as error:
        print(f"rag-backup: warning: cannot write metrics to {directory}: {error}", file=sys.stderr)
