"""Fixtures: both stacks' program runs, and real servers started from what they declare."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from components.containers import CONFIG_DIR
from tests.encryption.helpers import (
    START_TIMEOUT_S,
    TOOL_TIMEOUT_S,
    PostgresUnderTest,
    RedisUnderTest,
    container_inputs,
    map_argv,
    run_as_postgres,
    start_redis_from_program,
    uploaded_files,
    write_files,
)
from tests.pulumi_harness import ProgramRun, run_program
from tests.servers import free_port, log_tail, stop_process, wait_listening
from tests.tooling import require_tool

STACKS = ("staging", "prod")
# A password the cluster had before the program manages it (an adopted compose volume):
# only the migration's verifier can make the stack's password work.
PRE_EXISTING_PASSWORD = "password-from-before-the-migration"
# What a docker compose deployment left behind: the app's objects owned by the bootstrap
# superuser (serial and identity sequences, a view, a function, an enum), rows in them,
# and an app role that exists with far too much (superuser, a dangerous membership).
COMPOSE_SCHEMA = """
CREATE TYPE mood AS ENUM ('good', 'bad');
CREATE TABLE feedback (id serial PRIMARY KEY, comment text NOT NULL, mood mood);
CREATE TABLE notes (id int GENERATED ALWAYS AS IDENTITY PRIMARY KEY, body text);
INSERT INTO feedback (comment, mood) VALUES ('written before the migration', 'good');
CREATE VIEW feedback_comments AS SELECT id, comment FROM feedback;
CREATE FUNCTION feedback_count() RETURNS bigint LANGUAGE sql AS 'SELECT count(*) FROM feedback';
CREATE ROLE rag_app LOGIN SUPERUSER CREATEDB CREATEROLE;
GRANT pg_execute_server_program TO rag_app;
"""


@pytest.fixture(scope="module")
def runs() -> dict[str, ProgramRun]:
    return {stack: run_program(stack) for stack in STACKS}


@pytest.fixture(scope="module")
def redis_servers(
    runs: dict[str, ProgramRun], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RedisUnderTest]]:
    """One real redis-server per stack, each from its own stack's command and files."""
    redis_server = require_tool("redis-server")
    servers: dict[str, RedisUnderTest] = {}
    try:
        for stack in STACKS:
            root = tmp_path_factory.mktemp(f"redis-{stack}")
            servers[stack] = start_redis_from_program(runs[stack], redis_server, root)
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def start_postgres_from_program(run: ProgramRun, adopted: bool = False) -> PostgresUnderTest:
    """Initialise a cluster as the postgres image's entrypoint does (superuser ``rag`` from
    POSTGRES_USER, database from POSTGRES_DB, local trust, host scram) and start it with the
    program's server command. Only directories, port and listen address are the test's.
    ``adopted``: the cluster also holds what a compose deployment left (COMPOSE_SCHEMA)."""
    postgres_bin = Path(require_tool("postgres")).resolve()
    initdb = require_tool("initdb")
    require_tool("psql")
    pg_isready = require_tool("pg_isready")
    env = dict(entry.partition("=")[::2] for entry in container_inputs(run, "postgres")["envs"])
    superuser, database = env["POSTGRES_USER"], env["POSTGRES_DB"]
    as_postgres = run_as_postgres()

    # pytest's tmp dirs are root-only; the postgres OS user needs its own.
    root = Path(tempfile.mkdtemp(prefix=f"rag-enc-pg-{run.stack}-"))
    root.chmod(0o755)
    data_dir, socket_dir = root / "data", root / "socket"
    socket_dir.mkdir()
    old_password_file = root / "old-password"
    old_password_file.write_text(PRE_EXISTING_PASSWORD + "\n")
    old_password_file.chmod(0o600)
    if as_postgres:
        for path in (root, socket_dir, old_password_file):
            shutil.chown(path, "postgres", "postgres")
    proc: subprocess.Popen[bytes] | None = None
    try:
        init = subprocess.run(
            [
                initdb,
                "-D",
                str(data_dir),
                "-U",
                superuser,
                f"--pwfile={old_password_file}",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
                "--no-sync",
            ],
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
            check=False,
            **as_postgres,
        )
        if init.returncode != 0:
            raise RuntimeError(f"initdb failed: {init.stderr.strip()}")
        # The program's own files (pg_hba.conf via hba_file), as the container gets them.
        config_dir = write_files(uploaded_files(run, "postgres"), root / "etc-rag")
        if as_postgres:
            for path in [config_dir, *config_dir.rglob("*")]:
                shutil.chown(path, "postgres", "postgres")
        # An older cluster's setting: only the program's server command makes it scram.
        with open(data_dir / "postgresql.conf", "a") as conf:
            conf.write("password_encryption = md5\n")

        command = container_inputs(run, "postgres")["command"]
        if command[0] != "postgres":
            raise AssertionError(f"the PostgreSQL container does not run postgres: {command}")
        log = root / "postgres.log"
        port = free_port()
        server_args = [arg.replace(f"{CONFIG_DIR}/", f"{config_dir}/") for arg in command[1:]]
        assert any(arg.startswith(f"hba_file={config_dir}/") for arg in server_args), command
        argv = [str(postgres_bin), *server_args, "-D", str(data_dir)]
        argv += ["-c", "listen_addresses=127.0.0.1", "-c", f"port={port}"]
        argv += ["-c", f"unix_socket_directories={socket_dir}", "-c", "fsync=off"]
        with open(log, "ab") as log_file:
            proc = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=root, **as_postgres
            )
        wait_listening(port, proc, log)
        server = PostgresUnderTest(
            run.stack, port, root, postgres_bin.parent, socket_dir, proc, log, argv
        )
        # The program's healthcheck, pointed at this server's socket.
        healthcheck = container_inputs(run, "postgres")["healthcheck"]["tests"]
        assert healthcheck[:2] == ["CMD", "pg_isready"], healthcheck
        deadline = time.monotonic() + START_TIMEOUT_S
        while server.run_as_postgres(
            [pg_isready, *healthcheck[2:], "-h", str(socket_dir)]
        ).returncode:
            if time.monotonic() > deadline:
                raise RuntimeError(f"PostgreSQL not ready:\n{log_tail(log)}")
            time.sleep(0.1)
        created = server.run_as_postgres(
            [
                *("psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", str(socket_dir)),
                *("-U", superuser, "-d", "postgres", "-c", f'CREATE DATABASE "{database}"'),
            ]
        )
        if created.returncode != 0:
            raise RuntimeError(f"createdb failed: {created.stderr.strip()}")
        if adopted:
            schema = server.run_as_postgres(
                [
                    *("psql", "-X", "-v", "ON_ERROR_STOP=1", "-h", str(socket_dir)),
                    *("-U", superuser, "-d", database, "-c", COMPOSE_SCHEMA),
                ]
            )
            if schema.returncode != 0:
                raise RuntimeError(f"compose schema failed: {schema.stderr.strip()}")
        return server
    except BaseException:
        if proc is not None:
            stop_process(proc, 2)
        shutil.rmtree(root, ignore_errors=True)
        raise


@pytest.fixture(scope="module", params=STACKS)
def migrated_postgres(
    request: pytest.FixtureRequest, runs: dict[str, ProgramRun]
) -> Iterator[PostgresUnderTest]:
    run = runs[request.param]
    server = start_postgres_from_program(run, adopted=request.param == "prod")
    try:
        config_dir = write_files(uploaded_files(run, "postgres-migrate"), server.root / "migrate")
        if run_as_postgres():
            for path in [config_dir, *config_dir.rglob("*")]:
                shutil.chown(path, "postgres", "postgres")
        command = container_inputs(run, "postgres-migrate")["command"]
        socket_dir = command[command.index("-h") + 1]
        argv = map_argv(command, {CONFIG_DIR: config_dir, socket_dir: server.socket_dir})
        argv[0] = require_tool("psql")
        result = server.run_as_postgres(argv)
        assert result.returncode == 0, result.stderr
        yield server
    finally:
        server.stop()
