"""PostgreSQL: logical dump (custom format) in an exported snapshot with exact row counts,
restore into a fresh database, and the rename swap that keeps the old one for rollback."""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from rag_backup.errors import BackupError
from rag_backup.procs import Proc, base_env, last_lines, run

SENTINEL = "__rag_backup_end__"
# Every user table, quoted by format(%I) (one row each, column ``name``).
TABLE_NAMES_SQL = """
SELECT format('%I.%I', n.nspname, c.relname) AS name
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind = 'r' AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg_toast%' AND n.nspname NOT LIKE 'pg_temp%'
"""
TABLES_SQL = f"SELECT coalesce(json_agg(name ORDER BY name), '[]') FROM ({TABLE_NAMES_SQL}) t"  # noqa: S608
# The exact row count of every table in one psql run: the first query builds the same
# UNION ALL of count(*) as row_counts_sql from the catalog, \gexec runs it in the same
# session (one process and one connection instead of two; PostgreSQL scans the tables in
# parallel workers under a Parallel Append). The names are quoted identifiers already.
ROW_COUNTS_SCRIPT = f"""
SELECT CASE WHEN count(*) = 0 THEN 'SELECT ''{{}}''::json'
  ELSE 'SELECT json_object_agg(t, n) FROM ('
    || string_agg(format('SELECT %L AS t, count(*) AS n FROM %s', name, name), ' UNION ALL '
                  ORDER BY name)
    || ') s' END
FROM ({TABLE_NAMES_SQL}) t
\\gexec
"""  # noqa: S608 - constants only


@dataclass(frozen=True)
class PostgresSettings:
    database: str
    libpq_env: Mapping[str, str]  # PGHOST, PGPORT, PGUSER, PGPASSFILE/PGPASSWORD, ...
    jobs: int
    bin_dir: Path | None = None

    def tool(self, name: str) -> str:
        return str(self.bin_dir / name) if self.bin_dir else name

    def env(self, database: str | None = None) -> dict[str, str]:
        return base_env({**self.libpq_env, "PGDATABASE": database or self.database})


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def quote_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class PsqlSession:
    """One psql process kept open (for an exported snapshot); queries return one text value."""

    def __init__(self, settings: PostgresSettings, database: str) -> None:
        self.proc = Proc(
            "psql",
            [settings.tool("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1"],
            stdin=subprocess.PIPE,
            env=settings.env(database),
        )

    def query(self, sql: str) -> list[str]:
        stdin, stdout = self.proc.popen.stdin, self.proc.popen.stdout
        assert stdin is not None and stdout is not None
        try:
            stdin.write(f"{sql.strip().rstrip(';')};\n\\echo {SENTINEL}\n".encode())
            stdin.flush()
        except BrokenPipeError as error:
            raise BackupError(f"psql failed: {last_lines(self.proc.stderr_text())}") from error
        lines: list[str] = []
        while True:
            line = stdout.readline()
            if not line:
                self.proc.wait(timeout=30)
                raise BackupError(f"psql failed: {last_lines(self.proc.stderr_text())}")
            text = line.decode().rstrip("\n")
            if text == SENTINEL:
                return lines
            lines.append(text)

    def close(self) -> None:
        stdin = self.proc.popen.stdin
        if stdin is not None and self.proc.popen.poll() is None:
            try:
                stdin.write(b"COMMIT;\n")
                stdin.close()
            except OSError:
                pass
            with contextlib.suppress(BackupError):
                self.proc.wait(timeout=30)
        self.proc.close()


def psql_value(settings: PostgresSettings, sql: str, database: str) -> str:
    out = run(
        "psql",
        [settings.tool("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-c", sql],
        env=settings.env(database),
        timeout=3600,
    )
    return out.strip()


def row_counts_sql(tables: list[str]) -> str:
    if not tables:
        return "SELECT '{}'::json"
    # Table names come from pg_class already quoted by format(%I); literals are escaped.
    parts = [f"SELECT {quote_literal(t)} AS t, count(*) AS n FROM {t}" for t in tables]  # noqa: S608
    return f"SELECT json_object_agg(t, n) FROM ({' UNION ALL '.join(parts)}) s"  # noqa: S608


def row_counts(settings: PostgresSettings, database: str) -> dict[str, int]:
    """Exact row count of every user table (``count(*)``: every row is read)."""
    out = run(
        "psql (row counts)",
        [settings.tool("psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-f", "-"],
        env=settings.env(database),
        input_bytes=ROW_COUNTS_SCRIPT.encode(),
        timeout=3600,
    )
    counts = json.loads(out)
    return {str(k): int(v) for k, v in counts.items()}


@dataclass
class DumpSession:
    """An open snapshot: pg_dump runs in it, row counts are taken in it."""

    session: PsqlSession
    snapshot: str
    server_version: str


def open_snapshot(settings: PostgresSettings) -> DumpSession:
    session = PsqlSession(settings, settings.database)
    try:
        session.query("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot = session.query("SELECT pg_export_snapshot()")[0]
        version = session.query("SHOW server_version")[0]
    except BaseException:
        session.close()
        raise
    return DumpSession(session=session, snapshot=snapshot, server_version=version)


def snapshot_row_counts(dump: DumpSession) -> dict[str, int]:
    tables = json.loads(dump.session.query(TABLES_SQL)[0])
    counts = json.loads(dump.session.query(row_counts_sql(tables))[0] or "{}")
    return {str(k): int(v) for k, v in counts.items()}


def start_pg_dump(settings: PostgresSettings, snapshot: str) -> Proc:
    return Proc(
        "pg_dump",
        [
            settings.tool("pg_dump"),
            "--format=custom",
            "--compress=0",  # zstd -T0 compresses faster and smaller
            f"--snapshot={snapshot}",
            "--no-password",
        ],
        env=settings.env(),
    )


def restore_dump(
    settings: PostgresSettings,
    dump_file: Path,
    database: str,
    *,
    keep_owners: bool,
    jobs: int,
) -> None:
    argv = [
        settings.tool("pg_restore"),
        "--exit-on-error",
        "--no-password",
        f"--jobs={max(1, jobs)}",
        f"--dbname={database}",
    ]
    if not keep_owners:
        argv += ["--no-owner", "--no-privileges"]
    run("pg_restore", [*argv, str(dump_file)], env=settings.env(database), timeout=86400)


def database_exists(settings: PostgresSettings, maintenance_db: str, name: str) -> bool:
    value = psql_value(
        settings,
        f"SELECT count(*) FROM pg_database WHERE datname = {quote_literal(name)}",  # noqa: S608
        maintenance_db,
    )
    return value == "1"


def create_database(settings: PostgresSettings, maintenance_db: str, name: str) -> None:
    psql_value(settings, f"CREATE DATABASE {quote_ident(name)} TEMPLATE template0", maintenance_db)


def drop_database(settings: PostgresSettings, maintenance_db: str, name: str) -> None:
    psql_value(
        settings, f"DROP DATABASE IF EXISTS {quote_ident(name)} WITH (FORCE)", maintenance_db
    )


def rename_database(
    settings: PostgresSettings, maintenance_db: str, old: str, new: str, attempts: int = 20
) -> None:
    """Rename ``old`` to ``new``, terminating sessions on ``old`` first (retrying while
    clients reconnect)."""
    sql = (
        f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "  # noqa: S608
        f"WHERE datname = {quote_literal(old)} AND pid <> pg_backend_pid()"
    )
    last: BackupError | None = None
    for _ in range(attempts):
        try:
            psql_value(settings, sql, maintenance_db)
            psql_value(
                settings,
                f"ALTER DATABASE {quote_ident(old)} RENAME TO {quote_ident(new)}",
                maintenance_db,
            )
            return
        except BackupError as error:
            last = error
            if "being accessed by other users" not in str(error):
                raise
            time.sleep(0.25)
    raise BackupError(f"cannot rename database {old} to {new}: {last}")


def check_counts(expected: Mapping[str, int], actual: Mapping[str, int], where: str) -> None:
    if dict(expected) != dict(actual):
        diffs = []
        for table in sorted(set(expected) | set(actual)):
            if expected.get(table) != actual.get(table):
                diffs.append(f"{table}: expected {expected.get(table)}, got {actual.get(table)}")
        raise BackupError(f"{where}: row counts differ from the backup: " + "; ".join(diffs[:5]))
