"""The exporters as the program declares them, against the program's real Redis and
PostgreSQL: Debian's redis_exporter and postgres_exporter with the program's flags,
environment and files (paths and addresses mapped to loopback) must report the service up.
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from components.containers import CONFIG_DIR
from tests.encryption.helpers import (
    PostgresUnderTest,
    RedisUnderTest,
    container_inputs,
    map_argv,
    other_stack,
    uploaded_files,
    write_files,
)
from tests.pulumi_harness import ProgramRun
from tests.servers import free_port, stop_process
from tests.tooling import require_tool

pytestmark = pytest.mark.integration
STACKS = ("staging", "prod")


def scrape_until(url: str, metric: str, proc: subprocess.Popen[bytes], log: Path) -> float:
    """Value of ``metric`` from the exporter at ``url`` (waits for the first scrape)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"exporter exited: {log.read_text()[-2000:]}")
        try:
            text = urllib.request.urlopen(url, timeout=5).read().decode()  # noqa: S310
        except OSError:
            time.sleep(0.3)
            continue
        for line in text.splitlines():
            if line.startswith(metric + " ") or line.startswith(metric + "{"):
                return float(line.rsplit(" ", 1)[1])
        time.sleep(0.3)
    raise AssertionError(f"{metric} never appeared at {url}: {log.read_text()[-2000:]}")


def start_exporter(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)


def redis_exporter_argv(
    run: ProgramRun, target: RedisUnderTest, root: Path, listen: str
) -> list[str]:
    """The program's redis_exporter command with its files written under ``root`` and the
    address (and the password file's key, which must match it) pointed at ``target``."""
    stack = run.stack
    files = uploaded_files(run, "redis-exporter")
    program_uri = f"rediss://rag-{stack}-redis:6379"
    test_uri = f"rediss://127.0.0.1:{target.port}"
    password_map = json.loads(files["secrets/redis_password.json"])
    assert list(password_map) == [program_uri]
    files["secrets/redis_password.json"] = json.dumps({test_uri: password_map[program_uri]})
    config_dir = write_files(files, root / "etc" / "rag")
    # Flags carry paths after "=": map the config directory wherever it appears.
    command = [
        c.replace(program_uri, test_uri).replace(f"{CONFIG_DIR}/", f"{config_dir}/")
        for c in container_inputs(run, "redis-exporter")["command"]
    ]
    assert f"--redis.addr={test_uri}" in command
    return [require_tool("prometheus-redis-exporter"), *command, f"--web.listen-address={listen}"]


@pytest.mark.parametrize("stack", STACKS)
def test_redis_exporter_reports_redis_up_over_mutual_tls(
    stack: str,
    runs: dict[str, ProgramRun],
    redis_servers: dict[str, RedisUnderTest],
    tmp_path: Path,
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    argv = redis_exporter_argv(runs[stack], redis_servers[stack], tmp_path, listen)
    log = tmp_path / "exporter.log"
    proc = start_exporter(argv, {"PATH": "/usr/bin:/bin"}, log)
    try:
        assert scrape_until(f"http://{listen}/metrics", "redis_up", proc, log) == 1
        # It really reads server state (INFO) with its read-only ACL user.
        assert scrape_until(f"http://{listen}/metrics", "redis_connected_clients", proc, log) >= 1
    finally:
        stop_process(proc, 15)


def test_redis_exporter_cannot_scrape_the_other_stack(
    runs: dict[str, ProgramRun], redis_servers: dict[str, RedisUnderTest], tmp_path: Path
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    # staging's exporter (its CA, cert and password) against prod's server.
    argv = redis_exporter_argv(
        runs["staging"], redis_servers[other_stack("staging")], tmp_path, listen
    )
    log = tmp_path / "exporter.log"
    proc = start_exporter(argv, {"PATH": "/usr/bin:/bin"}, log)
    try:
        assert scrape_until(f"http://{listen}/metrics", "redis_up", proc, log) == 0
    finally:
        stop_process(proc, 15)


def test_postgres_exporter_logs_in_as_the_monitor_role(
    migrated_postgres: PostgresUnderTest, runs: dict[str, ProgramRun], tmp_path: Path
) -> None:
    run = runs[migrated_postgres.stack]
    config_dir = write_files(uploaded_files(run, "postgres-exporter"), tmp_path / "etc" / "rag")
    env = dict(e.split("=", 1) for e in container_inputs(run, "postgres-exporter")["envs"])
    uri = env["DATA_SOURCE_URI"].replace(
        f"rag-{run.stack}-postgres:5432", f"127.0.0.1:{migrated_postgres.port}"
    )
    assert uri != env["DATA_SOURCE_URI"]
    exporter_env = {
        "PATH": "/usr/bin:/bin",
        "DATA_SOURCE_URI": uri,
        "DATA_SOURCE_USER": env["DATA_SOURCE_USER"],
        "DATA_SOURCE_PASS_FILE": map_argv([env["DATA_SOURCE_PASS_FILE"]], {CONFIG_DIR: config_dir})[
            0
        ],
    }
    listen = f"127.0.0.1:{free_port()}"
    argv = [require_tool("prometheus-postgres-exporter"), f"--web.listen-address={listen}"]
    log = tmp_path / "pg-exporter.log"
    proc = start_exporter(argv, exporter_env, log)
    try:
        assert scrape_until(f"http://{listen}/metrics", "pg_up", proc, log) == 1
    finally:
        stop_process(proc, 15)
