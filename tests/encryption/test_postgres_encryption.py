"""A real PostgreSQL 15 per stack, initialised like the image's entrypoint, started with the
program's server command, migrated twice with the program's migration SQL run exactly as
its migrate container runs it. Then the stack's clients log in over TCP with scram and
pgcrypto encrypts with the stack's data key.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.encryption.conftest import (
    PRE_EXISTING_PASSWORD,
    STACKS,
    start_postgres_from_program,
)
from tests.encryption.helpers import (
    CONFIG_DIR,
    PostgresUnderTest,
    container_inputs,
    env_value,
    generated_password,
    map_argv,
    other_stack,
    run_as_postgres,
    uploaded_files,
    write_files,
)
from tests.pulumi_harness import ProgramRun
from tests.tooling import require_tool

pytestmark = pytest.mark.integration

MIGRATION_RUNS = 2
SECRET_TEXT = "a user's feedback comment, encrypted at rest"


@pytest.fixture(scope="module", params=STACKS)
def postgres(
    request: pytest.FixtureRequest, runs: dict[str, ProgramRun]
) -> Iterator[PostgresUnderTest]:
    server = start_postgres_from_program(runs[request.param])
    try:
        yield server
    finally:
        server.stop()


def _socket_dir_of_migration(run: ProgramRun) -> str:
    """The migrate container's ``-h``, checked to be the socket volume PostgreSQL shares."""
    command = container_inputs(run, "postgres-migrate")["command"]
    socket_dir = command[command.index("-h") + 1]
    migrate_mounts = {
        m["target"]: m["source"] for m in container_inputs(run, "postgres-migrate")["mounts"]
    }
    server_mounts = {m["target"]: m["source"] for m in container_inputs(run, "postgres")["mounts"]}
    assert socket_dir in migrate_mounts, f"{socket_dir} is not mounted in the migrate container"
    assert server_mounts.get(socket_dir) == migrate_mounts[socket_dir], (
        f"{socket_dir} is not the PostgreSQL container's socket volume"
    )
    return str(socket_dir)


@pytest.fixture(scope="module")
def migration_runs(
    postgres: PostgresUnderTest, runs: dict[str, ProgramRun]
) -> list[subprocess.CompletedProcess[str]]:
    """The migrate container's command, as the postgres user, run twice (every deploy runs
    it; the second run is what an already-migrated database sees)."""
    run = runs[postgres.stack]
    config_dir = write_files(uploaded_files(run, "postgres-migrate"), postgres.root / "migrate")
    if run_as_postgres():
        for path in [config_dir, *config_dir.rglob("*")]:
            shutil.chown(path, "postgres", "postgres")
    prefixes = {CONFIG_DIR: config_dir, _socket_dir_of_migration(run): postgres.socket_dir}
    command = map_argv(container_inputs(run, "postgres-migrate")["command"], prefixes)
    assert command[0] == "psql", command
    command[0] = require_tool("psql")
    return [postgres.run_as_postgres(command) for _ in range(MIGRATION_RUNS)]


def _pgpass(directory: Path, line: str) -> Path:
    path = directory / f"pgpass-{len(list(directory.glob('pgpass-*')))}"
    path.write_text(line)
    path.chmod(0o600)  # libpq ignores a password file others can read
    return path


def _connect(postgres: PostgresUnderTest, user: str, passfile: Path) -> psycopg.Connection:
    return psycopg.connect(
        host="127.0.0.1",
        port=postgres.port,
        user=user,
        dbname="rag_feedback",
        passfile=str(passfile),
        sslmode="disable",
        connect_timeout=10,
    )


def _password_line(postgres: PostgresUnderTest, user: str, password: str) -> str:
    return f"127.0.0.1:{postgres.port}:rag_feedback:{user}:{password}\n"


def _stack_postgres_password(run: ProgramRun) -> str:
    env = container_inputs(run, "postgres")["envs"]
    password_file = env_value(env, "POSTGRES_PASSWORD_FILE")
    assert password_file.startswith(CONFIG_DIR + "/"), password_file
    return uploaded_files(run, "postgres")[password_file.removeprefix(CONFIG_DIR + "/")]


def _data_key(run: ProgramRun) -> str:
    env = container_inputs(run, "api")["envs"]
    key_file = env_value(env, "DATA_ENCRYPTION_KEY_FILE")
    assert key_file.startswith(CONFIG_DIR + "/"), key_file
    return uploaded_files(run, "api")[key_file.removeprefix(CONFIG_DIR + "/")]


def test_migration_succeeds_twice(migration_runs: list[subprocess.CompletedProcess[str]]) -> None:
    for number, result in enumerate(migration_runs, start=1):
        assert result.returncode == 0, f"run {number}: {result.stderr}"
        assert "ERROR" not in result.stderr, f"run {number}: {result.stderr}"


def test_app_role_logs_in_over_scram_with_the_stacks_password(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    run = runs[postgres.stack]
    password = _stack_postgres_password(run)
    with _connect(
        postgres, "rag", _pgpass(tmp_path, _password_line(postgres, "rag", password))
    ) as conn:
        row = conn.execute(
            "SELECT current_user, rolpassword LIKE 'SCRAM-SHA-256$%' "
            "FROM pg_authid WHERE rolname = current_user"
        ).fetchone()
    assert row == ("rag", True)
    # The password the cluster had before no longer works: the migration replaced it.
    stale = _pgpass(tmp_path, _password_line(postgres, "rag", PRE_EXISTING_PASSWORD))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _connect(postgres, "rag", stale)


def test_api_pgpass_file_logs_in(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    run = runs[postgres.stack]
    api_env = container_inputs(run, "api")["envs"]
    pgpass_path = env_value(api_env, "PGPASSFILE").removeprefix(CONFIG_DIR + "/")
    host, port, rest = uploaded_files(run, "api")[pgpass_path].split(":", 2)
    # The api's file, as it is, apart from the address it names.
    assert (host, port) == (env_value(api_env, "PGHOST"), env_value(api_env, "PGPORT"))
    passfile = _pgpass(tmp_path, f"127.0.0.1:{postgres.port}:{rest}")
    with _connect(postgres, env_value(api_env, "PGUSER"), passfile) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (
            env_value(api_env, "PGDATABASE"),
        )


def test_other_stacks_password_is_refused(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    other_password = _stack_postgres_password(runs[other_stack(postgres.stack)])
    passfile = _pgpass(tmp_path, _password_line(postgres, "rag", other_password))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        _connect(postgres, "rag", passfile)


def test_monitor_role_logs_in_and_only_monitors(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    password = generated_password(runs[postgres.stack], "postgres-monitor-password")
    passfile = _pgpass(tmp_path, _password_line(postgres, "rag_monitor", password))
    with _connect(postgres, "rag_monitor", passfile) as conn:
        row = conn.execute(
            "SELECT pg_has_role(current_user, 'pg_monitor', 'member'), rolsuper "
            "FROM pg_roles WHERE rolname = current_user"
        ).fetchone()
    assert row == (True, False)


def test_password_encryption_is_scram(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    password = _stack_postgres_password(runs[postgres.stack])
    passfile = _pgpass(tmp_path, _password_line(postgres, "rag", password))
    with _connect(postgres, "rag", passfile) as conn:
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)


def test_pgcrypto_round_trips_with_the_stacks_data_key(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    run = runs[postgres.stack]
    key = _data_key(run)
    other_key = _data_key(runs[other_stack(postgres.stack)])
    assert key != other_key
    passfile = _pgpass(tmp_path, _password_line(postgres, "rag", _stack_postgres_password(run)))
    with _connect(postgres, "rag", passfile) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_extension WHERE extname = 'pgcrypto'"
        ).fetchone() == (1,)
        conn.execute("CREATE TEMP TABLE feedback (id int PRIMARY KEY, comment bytea)")
        conn.execute("INSERT INTO feedback VALUES (1, pgp_sym_encrypt(%s, %s))", (SECRET_TEXT, key))
        stored = conn.execute("SELECT comment FROM feedback WHERE id = 1").fetchone()
        assert stored is not None
        assert SECRET_TEXT.encode() not in bytes(stored[0])
        decrypted = conn.execute(
            "SELECT pgp_sym_decrypt(comment, %s) FROM feedback WHERE id = 1", (key,)
        ).fetchone()
        assert decrypted == (SECRET_TEXT,)
        with pytest.raises(psycopg.errors.ExternalRoutineInvocationException, match="Wrong key"):
            conn.execute(
                "SELECT pgp_sym_decrypt(comment, %s) FROM feedback WHERE id = 1", (other_key,)
            )


def test_migration_sql_holds_no_plaintext_password(runs: dict[str, ProgramRun]) -> None:
    for stack in STACKS:
        run = runs[stack]
        sql = uploaded_files(run, "postgres-migrate")["migrate.sql"]
        for purpose in ("postgres-password", "postgres-monitor-password"):
            assert generated_password(run, purpose) not in sql, f"{stack}: {purpose}"


def test_postgres_container_env_names_files_not_passwords(runs: dict[str, ProgramRun]) -> None:
    for stack in STACKS:
        run = runs[stack]
        envs = "\n".join(container_inputs(run, "postgres")["envs"])
        assert _stack_postgres_password(run) not in envs
        assert "POSTGRES_PASSWORD=" not in envs


def _base_backup(
    postgres: PostgresUnderTest, user: str, password: str, target: Path
) -> subprocess.CompletedProcess[str]:
    passfile = _pgpass(target.parent, f"127.0.0.1:{postgres.port}:*:{user}:{password}\n")
    return subprocess.run(
        [
            require_tool("pg_basebackup"),
            "-h",
            "127.0.0.1",
            "-p",
            str(postgres.port),
            "-U",
            user,
            "-D",
            str(target),
            "-Ft",
            "-X",
            "fetch",
            "--checkpoint=fast",
            "-w",
        ],
        env={"PATH": os.environ["PATH"], "PGPASSFILE": str(passfile)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_program_pg_hba_lets_the_backup_role_take_a_base_backup(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    """The physical backup's replication connection, through the program's pg_hba.conf."""
    run = runs[postgres.stack]
    result = _base_backup(postgres, "rag", _stack_postgres_password(run), tmp_path / "base")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "base" / "base.tar").stat().st_size > 0
    # The monitoring role may not replicate.
    monitor = generated_password(run, "postgres-monitor-password")
    refused = _base_backup(postgres, "rag_monitor", monitor, tmp_path / "monitor")
    assert refused.returncode != 0
