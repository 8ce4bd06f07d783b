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

from components.containers import CONFIG_DIR
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
