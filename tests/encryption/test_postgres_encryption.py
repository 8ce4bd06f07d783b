"""A real PostgreSQL 15 per stack, initialised like the image's entrypoint, started with the
program's server command and pg_hba.conf, migrated twice with the program's migration SQL
run exactly as its migrate container runs it. Staging's cluster is fresh; prod's is
adopted compose data (COMPOSE_SCHEMA: the app's tables owned by the bootstrap superuser, an
app role that already exists as a superuser). Then each client logs in over TCP with scram
as its own role, from its own declared env and pgpass file, and may do only what it needs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    generated_password,
    map_argv,
    other_stack,
    run_as_postgres,
    uploaded_files,
    write_files,
)
from tests.pulumi_harness import ProgramRun, container_env
from tests.tooling import require_tool

pytestmark = pytest.mark.integration

MIGRATION_RUNS = 2
SECRET_TEXT = "a user's feedback comment, encrypted at rest"


@pytest.fixture(scope="module", params=STACKS)
def postgres(
    request: pytest.FixtureRequest, runs: dict[str, ProgramRun]
) -> Iterator[PostgresUnderTest]:
    server = start_postgres_from_program(runs[request.param], adopted=request.param == "prod")
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


@dataclass(frozen=True)
class Client:
    """A client container's PostgreSQL login as it declares it: role and password file."""

    user: str
    database: str
    passfile_line: str  # its pgpass line, host and port mapped to the test server


def declared_client(run: ProgramRun, service: str, postgres: PostgresUnderTest) -> Client:
    env = container_env(run, service)
    pgpass = uploaded_files(run, service)[env["PGPASSFILE"].removeprefix(CONFIG_DIR + "/")]
    host, port, rest = pgpass.split(":", 2)
    # The file names exactly the address the client connects to.
    assert (host, port) == (env["PGHOST"], env["PGPORT"]), pgpass
    return Client(env["PGUSER"], env["PGDATABASE"], f"127.0.0.1:{postgres.port}:{rest}")


def login(postgres: PostgresUnderTest, client: Client, tmp_path: Path) -> psycopg.Connection:
    passfile = _pgpass(tmp_path, client.passfile_line)
    conn = psycopg.connect(
        host="127.0.0.1",
        port=postgres.port,
        user=client.user,
        dbname=client.database,
        passfile=str(passfile),
        sslmode="disable",
        connect_timeout=10,
    )
    conn.autocommit = True
    return conn


def _superuser_password(run: ProgramRun) -> str:
    env = container_env(run, "postgres")
    password_file = env["POSTGRES_PASSWORD_FILE"]
    assert password_file.startswith(CONFIG_DIR + "/"), password_file
    return uploaded_files(run, "postgres")[password_file.removeprefix(CONFIG_DIR + "/")]


def _data_key(run: ProgramRun) -> str:
    key_file = container_env(run, "api")["DATA_ENCRYPTION_KEY_FILE"]
    assert key_file.startswith(CONFIG_DIR + "/"), key_file
    return uploaded_files(run, "api")[key_file.removeprefix(CONFIG_DIR + "/")]


def _role(conn: psycopg.Connection) -> tuple[Any, ...]:
    row = conn.execute(
        "SELECT rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls, "
        "array(SELECT b.rolname FROM pg_auth_members m JOIN pg_roles b ON b.oid = m.roleid "
        "      WHERE m.member = r.oid ORDER BY 1) "
        "FROM pg_roles r WHERE rolname = current_user"
    ).fetchone()
    assert row is not None
    return tuple(row)


def test_migration_succeeds_twice(migration_runs: list[subprocess.CompletedProcess[str]]) -> None:
    for number, result in enumerate(migration_runs, start=1):
        assert result.returncode == 0, f"run {number}: {result.stderr}"
        assert "ERROR" not in result.stderr, f"run {number}: {result.stderr}"


def test_each_client_logs_in_as_its_own_least_privileged_role(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    run = runs[postgres.stack]
    expected = {
        # (superuser, createdb, createrole, replication, bypassrls, memberships)
        "api": (False, False, False, False, False, []),
        "backup": (False, False, False, True, False, ["pg_read_all_data"]),
    }
    users = set()
    for service, attributes in expected.items():
        client = declared_client(run, service, postgres)
        users.add(client.user)
        with login(postgres, client, tmp_path) as conn:
            # Adopted data: prod's rag_app existed as a superuser with a dangerous
            # membership; the migration took both away.
            assert _role(conn) == attributes, service
    assert len(users) == 2 and "rag" not in users


def test_the_api_role_cannot_escape_the_database(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    """What one SQL injection in the app could try; each is refused by the server."""
    api = declared_client(runs[postgres.stack], "api", postgres)
    marker = postgres.root / "pwned"
    attempts = {
        f"COPY (SELECT 1) TO PROGRAM 'touch {marker}'": psycopg.errors.InsufficientPrivilege,
        "ALTER SYSTEM SET archive_command = 'id'": psycopg.errors.InsufficientPrivilege,
        "SELECT rolpassword FROM pg_authid": psycopg.errors.InsufficientPrivilege,
        "SELECT pg_read_file('postgresql.conf')": psycopg.errors.InsufficientPrivilege,
        "CREATE DATABASE other": psycopg.errors.InsufficientPrivilege,
        "CREATE ROLE intruder SUPERUSER": psycopg.errors.InsufficientPrivilege,
        "SET ROLE rag": psycopg.errors.InsufficientPrivilege,
        "CREATE EXTENSION IF NOT EXISTS adminpack": psycopg.errors.DatabaseError,
    }
    with login(postgres, api, tmp_path) as conn:
        for statement, error in attempts.items():
            with pytest.raises(error):
                conn.execute(statement)
    assert not marker.exists()


def test_the_api_owns_the_apps_objects_and_keeps_working_on_adopted_data(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    api = declared_client(runs[postgres.stack], "api", postgres)
    with login(postgres, api, tmp_path) as conn:
        # It may create its own schema objects (fresh cluster and adopted alike).
        conn.execute("CREATE TABLE IF NOT EXISTS api_made (id serial PRIMARY KEY, t text)")
        conn.execute("INSERT INTO api_made (t) VALUES ('x')")
        owners: dict[str, str] = dict(
            conn.execute(
                "SELECT c.relname, pg_get_userbyid(c.relowner) FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public'"
            ).fetchall()
        )
        assert set(owners.values()) == {api.user}, owners
        if postgres.stack != "prod":
            return
        # prod: compose's objects, created by the superuser, now belong to the api role:
        # it writes through the serial and identity sequences, the view, the function.
        for table in ("feedback", "notes", "feedback_id_seq", "feedback_comments"):
            assert owners[table] == api.user, table
        conn.execute("INSERT INTO feedback (comment, mood) VALUES ('after', 'bad')")
        conn.execute("INSERT INTO notes (body) VALUES ('after')")
        assert conn.execute("SELECT feedback_count()").fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM feedback_comments").fetchone() == (2,)
        conn.execute("ALTER TABLE feedback ADD COLUMN IF NOT EXISTS rating int")
        # pgcrypto stays the superuser's (an extension), usable but not the api's to alter.
        assert conn.execute(
            "SELECT pg_get_userbyid(extowner) FROM pg_extension WHERE extname = 'pgcrypto'"
        ).fetchone() == ("rag",)


def test_the_superuser_cannot_log_in_over_tcp(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    """Only the migration job (over the socket) is the superuser: not even with the
    stack's right password (nor the one the cluster had before) over the network."""
    for password in (_superuser_password(runs[postgres.stack]), PRE_EXISTING_PASSWORD):
        passfile = _pgpass(tmp_path, _password_line(postgres, "rag", password))
        with pytest.raises(psycopg.OperationalError, match="rejects connection"):
            _connect(postgres, "rag", passfile)


def test_other_stacks_passwords_are_refused(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    other = runs[other_stack(postgres.stack)]
    for service in ("api", "backup"):
        client = declared_client(other, service, postgres)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            login(postgres, client, tmp_path)


def test_monitor_role_reads_the_statistics_and_nothing_else(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    run = runs[postgres.stack]
    env = container_env(run, "postgres-exporter")
    password_file = env["DATA_SOURCE_PASS_FILE"].removeprefix(CONFIG_DIR + "/")
    password = uploaded_files(run, "postgres-exporter")[password_file]
    user = env["DATA_SOURCE_USER"]
    passfile = _pgpass(tmp_path, _password_line(postgres, user, password))
    api = declared_client(run, "api", postgres)
    with login(postgres, api, tmp_path) as api_conn, _connect(postgres, user, passfile) as conn:
        api_conn.execute("SELECT pg_sleep(0)")
        assert _role(conn) == (False, False, False, False, False, ["pg_monitor"])
        # pg_monitor: other roles' activity with their queries, database and bgwriter stats.
        queries = conn.execute(
            "SELECT query FROM pg_stat_activity WHERE usename = %s", (api.user,)
        ).fetchall()
        assert queries and all(q[0] != "<insufficient privilege>" for q in queries)
        assert conn.execute(
            "SELECT count(*) > 0 FROM pg_stat_database WHERE datname = 'rag_feedback'"
        ).fetchone() == (True,)
        conn.execute("SELECT * FROM pg_stat_bgwriter").fetchall()
        conn.execute("SELECT * FROM pg_stat_replication").fetchall()
        conn.rollback()
        if postgres.stack == "prod":
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                conn.execute("SELECT * FROM feedback")


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
    with login(postgres, declared_client(run, "api", postgres), tmp_path) as conn:
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
        conn.execute("CREATE TABLE IF NOT EXISTS secrets (id int PRIMARY KEY, comment bytea)")
        conn.execute("DELETE FROM secrets")
        conn.execute("INSERT INTO secrets VALUES (1, pgp_sym_encrypt(%s, %s))", (SECRET_TEXT, key))
        stored = conn.execute("SELECT comment FROM secrets WHERE id = 1").fetchone()
        assert stored is not None
        assert SECRET_TEXT.encode() not in bytes(stored[0])
        decrypted = conn.execute(
            "SELECT pgp_sym_decrypt(comment, %s) FROM secrets WHERE id = 1", (key,)
        ).fetchone()
        assert decrypted == (SECRET_TEXT,)
        with pytest.raises(psycopg.errors.ExternalRoutineInvocationException, match="Wrong key"):
            conn.execute(
                "SELECT pgp_sym_decrypt(comment, %s) FROM secrets WHERE id = 1", (other_key,)
            )


def test_migration_sql_holds_no_plaintext_password(runs: dict[str, ProgramRun]) -> None:
    for stack in STACKS:
        run = runs[stack]
        sql = uploaded_files(run, "postgres-migrate")["migrate.sql"]
        purposes = ("postgres-password", "postgres-app-password", "postgres-backup-password")
        for purpose in (*purposes, "postgres-monitor-password"):
            password = generated_password(run, purpose)
            assert password not in sql, f"{stack}: {purpose}"
        assert sql.count("PASSWORD 'SCRAM-SHA-256$4096:") == 4, stack


def test_postgres_container_env_names_files_not_passwords(runs: dict[str, ProgramRun]) -> None:
    for stack in STACKS:
        run = runs[stack]
        envs = "\n".join(container_inputs(run, "postgres")["envs"])
        assert _superuser_password(run) not in envs
        assert "POSTGRES_PASSWORD=" not in envs


def _run_tool(
    tool: str, args: list[str], postgres: PostgresUnderTest, client: Client, tmp_path: Path
) -> subprocess.CompletedProcess[str]:
    passfile = _pgpass(tmp_path, client.passfile_line.replace(f":{client.database}:", ":*:", 1))
    return subprocess.run(
        [
            require_tool(tool),
            "-h",
            "127.0.0.1",
            "-p",
            str(postgres.port),
            "-U",
            client.user,
            *args,
            "-w",
        ],
        env={"PATH": os.environ["PATH"], "PGPASSFILE": str(passfile)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def _base_backup(
    postgres: PostgresUnderTest, client: Client, target: Path
) -> subprocess.CompletedProcess[str]:
    args = ["-D", str(target), "-Ft", "-X", "fetch", "--checkpoint=fast"]
    return _run_tool("pg_basebackup", args, postgres, client, target.parent)


def test_the_backup_role_dumps_and_takes_a_base_backup_through_the_programs_pg_hba(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
    tmp_path: Path,
) -> None:
    run = runs[postgres.stack]
    backup = declared_client(run, "backup", postgres)
    with login(postgres, declared_client(run, "api", postgres), tmp_path) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS dumped (v text)")
        conn.execute("INSERT INTO dumped VALUES ('in the dump')")
    dump = _run_tool("pg_dump", ["-d", backup.database, "-Fp"], postgres, backup, tmp_path)
    assert dump.returncode == 0, dump.stderr
    assert "in the dump" in dump.stdout
    result = _base_backup(postgres, backup, tmp_path / "base")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "base" / "base.tar").stat().st_size > 0
    # Neither the api's nor the exporter's role may replicate.
    refused = _base_backup(postgres, declared_client(run, "api", postgres), tmp_path / "api")
    assert refused.returncode != 0
    assert "replication" in refused.stderr, refused.stderr


def test_declared_healthcheck_passes_over_tcp_although_its_user_is_rejected(
    postgres: PostgresUnderTest,
    migration_runs: list[subprocess.CompletedProcess[str]],
    runs: dict[str, ProgramRun],
) -> None:
    """pg_isready does not log in: the superuser's `reject` line in pg_hba.conf must not
    turn the container unhealthy."""
    tests = container_inputs(runs[postgres.stack], "postgres")["healthcheck"]["tests"]
    assert tests[:2] == ["CMD", "pg_isready"] and "127.0.0.1" in tests, tests
    argv = [require_tool("pg_isready"), *tests[2:], "-p", str(postgres.port)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
