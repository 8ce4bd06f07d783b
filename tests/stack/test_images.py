"""The local postgres image behaves as the official one's entrypoint does, started as
root (chown, then drop to postgres with gosu) and as the postgres user (the program's
way): *_FILE secrets, POSTGRES_INITDB_ARGS, /docker-entrypoint-initdb.d, a UTF-8 cluster."""

from __future__ import annotations

import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.docker.engine import DockerCli
from tests.stack.images import LocalImages

pytestmark = pytest.mark.stack
READY_TIMEOUT_S = 120


@pytest.fixture
def container_name(docker_cli: DockerCli) -> Iterator[str]:
    name = f"ragtest-{secrets.token_hex(3)}-pg-entrypoint"
    try:
        yield name
    finally:
        docker_cli.call("rm", "-f", "-v", name, timeout=60)


@pytest.mark.parametrize("user", ["0:0", "postgres"])
def test_postgres_entrypoint_initializes_from_files_and_initdb_scripts(
    docker_cli: DockerCli, local_images: LocalImages, container_name: str, tmp_path: Path, user: str
) -> None:
    (tmp_path / "password").write_text("s3cret-from-a-file\n")
    initdb = tmp_path / "initdb.d"
    initdb.mkdir()
    (initdb / "01-table.sql").write_text("create table made_by_initdb (id int);\n")
    for path in (tmp_path, initdb, tmp_path / "password", initdb / "01-table.sql"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    docker_cli.run(
        "run", "-d", "--name", container_name, "--user", user, "--network", "none",
        "--env", "POSTGRES_USER=rag", "--env", "POSTGRES_DB=rag_feedback",
        "--env", "POSTGRES_PASSWORD_FILE=/run/secrets/password",
        "--env", "POSTGRES_INITDB_ARGS=--data-checksums --auth-host=scram-sha-256",
        "--mount",
        f"type=bind,source={tmp_path / 'password'},target=/run/secrets/password,readonly",
        "--mount", f"type=bind,source={initdb},target=/docker-entrypoint-initdb.d,readonly",
        local_images.recipe("postgres"),
    )  # fmt: skip
    deadline = time.monotonic() + READY_TIMEOUT_S
    query = (
        "select current_setting('server_encoding'), current_setting('data_checksums'), "
        "current_setting('listen_addresses'), to_regclass('made_by_initdb') is not null"
    )
    while True:
        done = docker_cli.call(
            "exec", "--env", "PGPASSWORD=s3cret-from-a-file", container_name,
            "psql", "-h", "127.0.0.1", "-U", "rag", "-d", "rag_feedback",
            "-At", "-c", query, "--set", "ON_ERROR_STOP=1",
            timeout=30,
        )  # fmt: skip
        if done.returncode == 0:
            break
        logs = docker_cli.call("logs", container_name).stderr.decode(errors="replace")
        assert time.monotonic() < deadline, logs[-3000:]
        time.sleep(1)
    # Over TCP with scram (POSTGRES_INITDB_ARGS): the password is the file's.
    assert done.stdout.decode().strip() == "UTF8|on|*|t"
    # As root the entrypoint dropped to postgres (gosu); the server never runs as root.
    assert docker_cli.run("exec", container_name, "stat", "-c", "%U", "/proc/1") == "postgres"
    data_dir = "/var/lib/postgresql/data"
    owner = docker_cli.run("exec", container_name, "stat", "-c", "%u:%g %a", data_dir)
    assert owner == "999:999 700"


@pytest.mark.parametrize("user", ["0:0", "redis"])
def test_redis_entrypoint_runs_the_server_as_redis_in_data(
    docker_cli: DockerCli, local_images: LocalImages, container_name: str, user: str
) -> None:
    docker_cli.run(
        "run", "-d", "--name", container_name, "--user", user, "--network", "none",
        local_images.recipe("redis"), "--appendonly", "yes",
    )  # fmt: skip
    deadline = time.monotonic() + READY_TIMEOUT_S
    while docker_cli.call("exec", container_name, "redis-cli", "ping").stdout.strip() != b"PONG":
        assert time.monotonic() < deadline, docker_cli.call("logs", container_name).stdout
        time.sleep(0.5)
    # A flag first means redis-server; as root it dropped to redis (999:1000) in /data.
    assert docker_cli.run("exec", container_name, "stat", "-c", "%u:%g", "/proc/1") == "999:1000"
    working_dir = docker_cli.run("exec", container_name, "redis-cli", "config", "get", "dir")
    assert working_dir.split() == ["dir", "/data"]
    owners = docker_cli.run("exec", container_name, "sh", "-c", "stat -c %u:%g /data/*")
    assert set(owners.split()) == {"999:1000"}, owners


def test_the_demo_api_stops_on_docker_stop_instead_of_being_killed(
    docker_cli: DockerCli, local_images: LocalImages, container_name: str
) -> None:
    """As PID 1 the api gets SIGTERM with no default action: it must exit by itself, or
    every restore-stack.sh stop and host shutdown waits the grace period and kills it."""
    docker_cli.run(
        "run", "-d", "--name", container_name, "--network", "none", local_images.app()
    )  # fmt: skip
    deadline = time.monotonic() + READY_TIMEOUT_S
    health = "http://127.0.0.1:8000/health"
    probe = ["python", "-c", f"import urllib.request; urllib.request.urlopen('{health}')"]
    while docker_cli.call("exec", container_name, *probe).returncode != 0:
        assert time.monotonic() < deadline, docker_cli.call("logs", container_name).stderr
        time.sleep(0.5)
    docker_cli.run("stop", "--time", "60", container_name, timeout=120)
    state = docker_cli.inspect("container", container_name)["State"]
    # Killed after the grace period would be 137 (SIGKILL).
    assert state["ExitCode"] == 0, state
