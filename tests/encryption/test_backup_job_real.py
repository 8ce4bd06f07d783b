"""The backup job as the program declares it: its environment and files (TLS client cert,
Redis ACL user `backup`, pgpass, passphrase) drive the real rag-backup against the program's
real Redis and PostgreSQL — including the base backup through the program's pg_hba.conf."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from components.backups import SCRATCH_DIR
from components.containers import CONFIG_DIR
from components.service_files import POSTGRES_WAL_SETTINGS
from tests.encryption.helpers import (
    PostgresUnderTest,
    RedisUnderTest,
    container_inputs,
    uploaded_files,
    write_files,
)
from tests.pulumi_harness import ProgramRun
from tests.tooling import require_tool

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def _scratch_path(declared: str, dirs: dict[str, Path]) -> str:
    """A path the job declares on its scratch volume, mapped to this test's scratch dir."""
    assert declared.startswith(f"{SCRATCH_DIR}/"), f"{declared} is not on the scratch volume"
    return str(dirs["scratch"] / declared.removeprefix(f"{SCRATCH_DIR}/"))


def job_environment(
    run: ProgramRun, redis: RedisUnderTest, postgres: PostgresUnderTest, root: Path
) -> dict[str, str]:
    """The backup container's env with only paths and addresses mapped to this machine."""
    stack = run.stack
    declared = dict(e.split("=", 1) for e in container_inputs(run, "backup")["envs"])
    files = uploaded_files(run, "backup")
    pgpass_name = declared["PGPASSFILE"].removeprefix(CONFIG_DIR + "/")
    host, port, rest = files[pgpass_name].split(":", 2)
    assert (host, port) == (declared["PGHOST"], declared["PGPORT"])
    files[pgpass_name] = f"127.0.0.1:{postgres.port}:{rest}"
    config_dir = write_files(files, root / "etc" / "rag")
    dirs = {name: root / name for name in ("backups", "textfile", "scratch", "chroma")}
    for directory in dirs.values():
        directory.mkdir()
    with sqlite3.connect(dirs["chroma"] / "chroma.sqlite3") as db:
        db.execute("CREATE TABLE embeddings (id INTEGER PRIMARY KEY, vector BLOB)")
        db.execute("INSERT INTO embeddings (vector) VALUES (x'00112233')")
    mapped = {
        key: value.replace(f"{CONFIG_DIR}/", f"{config_dir}/").replace(
            f"rag-{stack}-redis:6379", f"127.0.0.1:{redis.port}"
        )
        for key, value in declared.items()
    }
    mapped.update(
        PGHOST="127.0.0.1",
        PGPORT=str(postgres.port),
        BACKUP_DIR=str(dirs["backups"]),
        RAG_BACKUP_METRICS_DIR=str(dirs["textfile"]),
        TMPDIR=str(dirs["scratch"]),
        RAG_BACKUP_WAL_SPOOL_DIR=_scratch_path(declared["RAG_BACKUP_WAL_SPOOL_DIR"], dirs),
        CHROMA_DIR=str(dirs["chroma"]),
        RAG_BACKUP_PG_BIN_DIR=str(Path(require_tool("postgres")).resolve().parent),
    )
    assert mapped["REDIS_URL"].startswith(f"rediss://backup@127.0.0.1:{redis.port}/0")
    return {**mapped, "PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "HOME": str(root)}


def test_backup_job_backs_up_and_verifies_with_its_declared_settings(
    migrated_postgres: PostgresUnderTest,
    redis_servers: dict[str, RedisUnderTest],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    stack = migrated_postgres.stack
    run = runs[stack]
    env = job_environment(run, redis_servers[stack], migrated_postgres, tmp_path)
    assert env["RAG_BACKUP_PG_PHYSICAL"] == "1"  # the deployed default
    result = subprocess.run(
        [sys.executable, "-m", "rag_backup", "backup", "--verify"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (backup,) = [p for p in Path(env["BACKUP_DIR"]).iterdir() if not p.name.startswith(".")]
    manifest = json.loads((backup / "manifest.json").read_text())
    artifacts = json.dumps(manifest)
    # Every store, and the base backup taken over replication through the program's pg_hba.
    for expected in ("redis", "chroma", "postgres.dump", "postgres.base"):
        assert expected in artifacts, expected


def _job(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rag_backup", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_wal_archiving_works_as_the_backup_role_through_the_programs_pg_hba(
    migrated_postgres: PostgresUnderTest,
    redis_servers: dict[str, RedisUnderTest],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    """The deployed job archives WAL (rag-backup wal-archive, as the scheduler runs it) as
    rag_backup with only what the program's migration granted: its slot, pg_switch_wal().
    The server runs with the program's WAL settings (a slot's WAL retention is capped)."""
    stack = migrated_postgres.stack
    env = job_environment(runs[stack], redis_servers[stack], migrated_postgres, tmp_path)
    assert env["RAG_BACKUP_WAL_ARCHIVE"] == "1"  # the deployed default
    assert env["PGUSER"] == "rag_backup"
    first = _job(env, "wal-archive")
    assert first.returncode == 0, first.stderr[-3000:]
    psql = [require_tool("psql"), "-X", "-At", "-h", str(migrated_postgres.socket_dir)]
    psql += ["-U", "rag", "-d", "rag_feedback", "-c"]
    write = migrated_postgres.run_as_postgres(
        [
            *psql,
            "CREATE TABLE IF NOT EXISTS wal_marker (v text); INSERT INTO wal_marker "
            "SELECT repeat('x', 1000) FROM generate_series(1, 20000)",
        ]
    )
    assert write.returncode == 0, write.stderr
    second = _job(env, "wal-archive")
    assert second.returncode == 0, second.stderr[-3000:]
    wal_dir = Path(env["BACKUP_DIR"]) / "wal"
    index = json.loads((wal_dir / "index.json").read_text())
    assert len(index["segments"]) >= 2, index  # each cycle closes at least one segment
    for record in index["segments"].values():
        # At rest only encrypted: an OpenPGP packet (tag bit set), never a WAL page header.
        assert record["file"].endswith(".zst.gpg"), record
        assert (wal_dir / record["file"]).read_bytes()[0] & 0x80, record
    spool = Path(env["RAG_BACKUP_WAL_SPOOL_DIR"])
    assert not [p for p in spool.iterdir() if p.is_file()], "plaintext WAL left in the spool"
    slot = migrated_postgres.run_as_postgres(
        [
            *psql,
            "SELECT slot_type || ' ' || wal_status FROM pg_replication_slots "
            "WHERE slot_name = 'rag_backup_wal'",
        ]
    )
    assert slot.stdout.strip() == "physical reserved", slot.stdout + slot.stderr
    # A live archiver holds no WAL on the server beyond what it has not yet archived.
    released_sql = (
        f"SELECT restart_lsn >= '{index['end_lsn']}'::pg_lsn "  # noqa: S608 - an LSN we read
        "FROM pg_replication_slots WHERE slot_name = 'rag_backup_wal'"
    )
    released = migrated_postgres.run_as_postgres([*psql, released_sql])
    assert released.stdout.strip() == "t", released.stdout + released.stderr
    cap = migrated_postgres.run_as_postgres([*psql, "SHOW max_slot_wal_keep_size"])
    expected_cap = POSTGRES_WAL_SETTINGS["max_slot_wal_keep_size"]
    assert cap.stdout.strip() == expected_cap, cap.stdout + cap.stderr
    metrics = (Path(env["RAG_BACKUP_METRICS_DIR"]) / "rag_backup_wal.prom").read_text()
    assert "rag_backup_wal_last_run_success 1" in metrics
