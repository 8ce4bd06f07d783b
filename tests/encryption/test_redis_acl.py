"""Each Redis ACL user may run only the commands its client uses, proven on a real
redis-server started from the program's own redis.conf, ACL file and TLS certificates:

- the backup user: what ``redis-cli --rdb`` and INFO need (the real redis-cli dumps);
- the exporter: what Debian's prometheus-redis-exporter runs (it reports redis_up 1 and
  its usual metrics, and the server's ACL LOG records no command it was refused);
- the app: everything but @admin and @dangerous;
- FLUSHALL and CONFIG SET are refused for every user the file declares.
"""

from __future__ import annotations

import os
import re
import subprocess
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis

from tests.encryption.conftest import STACKS
from tests.encryption.helpers import (
    TOOL_TIMEOUT_S,
    RedisUnderTest,
    generated_password,
    start_redis_from_program,
    tls_client_pair,
    uploaded_files,
    write_files,
)
from tests.encryption.test_exporters_real import redis_exporter_argv, scrape_until, start_exporter
from tests.pulumi_harness import ProgramRun
from tests.servers import free_port, stop_process
from tests.tooling import require_tool

pytestmark = pytest.mark.integration

OBSERVER = "acl-observer"
# Commands that wipe, reconfigure, stop or stall the server: no declared user may run one.
ADMIN_COMMANDS = (
    ("FLUSHALL",),
    ("CONFIG", "SET", "appendonly", "no"),
    ("SHUTDOWN",),
    ("CLIENT", "PAUSE", "60000"),
    ("CLIENT", "KILL", "ID", "999999"),
    ("ACL", "SETUSER", "intruder", "on", ">pw", "+@all"),
)
OBSERVER_PASSWORD = "observer-password-for-tests-only"
# Client certificate each ACL user's client presents (pulumi-tls client names).
TLS_CLIENT = {"app": "api", "exporter": "redis-exporter", "backup": "backup"}
# What redis_exporter reports on every scrape when it may run what it needs.
EXPORTER_METRICS = (
    "redis_up",
    "redis_connected_clients",
    "redis_memory_used_bytes",
    "redis_commands_processed_total",
    "redis_db_keys",
    "redis_config_maxmemory",
    "redis_slowlog_length",
    "redis_uptime_in_seconds",
)


@pytest.fixture(scope="module")
def observed(
    runs: dict[str, ProgramRun], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, RedisUnderTest]]:
    """Per stack, the program's redis-server plus one test-only user that reads ACL LOG."""
    observer = f"user {OBSERVER} on >{OBSERVER_PASSWORD} ~* &* +@all"
    servers: dict[str, RedisUnderTest] = {}
    try:
        for stack in STACKS:
            root = tmp_path_factory.mktemp(f"redis-acl-{stack}")
            servers[stack] = start_redis_from_program(
                runs[stack], require_tool("redis-server"), root, observer_acl=observer
            )
        yield servers
    finally:
        for server in servers.values():
            server.stop()


def declared_users(run: ProgramRun) -> list[str]:
    acl = uploaded_files(run, "redis")["users.acl"]
    return re.findall(r"^user (\S+) ", acl, flags=re.MULTILINE)


def tls_files(run: ProgramRun, client: str, directory: Path) -> dict[str, Path]:
    cert, key = tls_client_pair(run, client)
    ca = uploaded_files(run, "redis")["tls/ca.crt"]
    written = write_files({"ca.crt": ca, "client.crt": cert, "client.key": key}, directory)
    return {name: written / name for name in ("ca.crt", "client.crt", "client.key")}


def connect(
    server: RedisUnderTest, files: dict[str, Path], user: str | None, password: str | None
) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=server.port,
        username=user,
        password=password,
        ssl=True,
        ssl_ca_certs=str(files["ca.crt"]),
        ssl_certfile=str(files["client.crt"]),
        ssl_keyfile=str(files["client.key"]),
        socket_timeout=10,
    )


def user_client(run: ProgramRun, server: RedisUnderTest, user: str, tmp: Path) -> redis.Redis:
    files = tls_files(run, TLS_CLIENT[user], tmp / f"tls-{user}")
    return connect(server, files, user, generated_password(run, f"redis-{user}-password"))


def observer(run: ProgramRun, server: RedisUnderTest, tmp: Path) -> redis.Redis:
    files = tls_files(run, "backup", tmp / "tls-observer")
    return connect(server, files, OBSERVER, OBSERVER_PASSWORD)


def refused_commands(log: Sequence[Mapping[str, Any]], user: str) -> set[str]:
    return {str(entry["object"]) for entry in log if entry["username"] == user}


@pytest.mark.parametrize("stack", STACKS)
def test_flushall_and_config_set_are_refused_for_every_declared_user(
    stack: str, runs: dict[str, ProgramRun], observed: dict[str, RedisUnderTest], tmp_path: Path
) -> None:
    run, server = runs[stack], observed[stack]
    users = declared_users(run)
    assert set(users) == {"default", *TLS_CLIENT}, users
    watch = observer(run, server, tmp_path)
    watch.set("survives", "1")
    for user in users:
        if user == "default":  # passwordless: the certificate alone, no password
            client = connect(server, tls_files(run, "api", tmp_path / "tls-default"), None, None)
        else:
            client = user_client(run, server, user, tmp_path)
        for command in ADMIN_COMMANDS:
            with pytest.raises(redis.exceptions.NoPermissionError):
                client.execute_command(*command)
        client.close()
    assert watch.get("survives") == b"1"
    assert watch.config_get("appendonly") == {"appendonly": "yes"}


@pytest.mark.parametrize("stack", STACKS)
def test_app_user_has_everything_but_admin_and_dangerous(
    stack: str, runs: dict[str, ProgramRun], observed: dict[str, RedisUnderTest], tmp_path: Path
) -> None:
    run, server = runs[stack], observed[stack]
    app = user_client(run, server, "app", tmp_path)
    # What a session/cache store does: strings, TTLs, hashes, lists, sets, scans, pub/sub.
    app.set("session:x", "v", ex=60)
    assert app.get("session:x") == b"v"
    app.hset("h", mapping={"a": "1"})
    app.incr("counter")
    app.lpush("l", "x")
    app.sadd("s", "x")
    assert app.publish("channel", "hi") == 0
    assert list(app.scan_iter("session:*"))
    app.delete("session:x")
    for command in (("KEYS", "*"), ("BGSAVE",), ("ACL", "LIST"), ("MONITOR",), ("FLUSHDB",)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            app.execute_command(*command)
    with pytest.raises(redis.exceptions.NoPermissionError):
        app.execute_command("SYNC")


@pytest.mark.parametrize("stack", STACKS)
def test_backup_user_dumps_with_redis_cli_and_reads_info_only(
    stack: str, runs: dict[str, ProgramRun], observed: dict[str, RedisUnderTest], tmp_path: Path
) -> None:
    run, server = runs[stack], observed[stack]
    watch = observer(run, server, tmp_path)
    watch.set("backup-marker", "kept")
    files = tls_files(run, "backup", tmp_path / "tls-cli")
    dump = tmp_path / "dump.rdb"
    base = [require_tool("redis-cli"), "--tls", "--cacert", str(files["ca.crt"])]
    base += ["--cert", str(files["client.crt"]), "--key", str(files["client.key"])]
    base += ["-h", "127.0.0.1", "-p", str(server.port), "--user", "backup", "--no-auth-warning"]
    env = {**os.environ, "REDISCLI_AUTH": generated_password(run, "redis-backup-password")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*base, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
            check=False,
        )

    rdb = cli("--rdb", str(dump))
    assert rdb.returncode == 0, rdb.stderr + rdb.stdout
    assert dump.read_bytes().startswith(b"REDIS") and b"backup-marker" in dump.read_bytes()
    info = cli("INFO", "keyspace")
    assert info.returncode == 0 and "db0:keys=" in info.stdout, info.stdout + info.stderr
    assert cli("PING").stdout.strip() == "PONG"
    # Not a data client: it cannot read or write keys, nor change the server.
    for args in (("GET", "backup-marker"), ("SET", "k", "v"), ("CONFIG", "GET", "dir")):
        denied = cli(*args)
        assert "NOPERM" in denied.stdout + denied.stderr, (args, denied.stdout)
    assert refused_commands(watch.acl_log(), "backup") >= {"get", "set", "config|get"}
    watch.acl_log_reset()


@pytest.mark.parametrize("stack", STACKS)
def test_redis_exporter_gets_all_it_runs_and_reports_its_usual_metrics(
    stack: str, runs: dict[str, ProgramRun], observed: dict[str, RedisUnderTest], tmp_path: Path
) -> None:
    run, server = runs[stack], observed[stack]
    watch = observer(run, server, tmp_path)
    watch.acl_log_reset()
    listen = f"127.0.0.1:{free_port()}"
    argv = redis_exporter_argv(run, server, tmp_path, listen)
    log = tmp_path / "exporter.log"
    proc = start_exporter(argv, {"PATH": "/usr/bin:/bin"}, log)
    try:
        assert scrape_until(f"http://{listen}/metrics", "redis_up", proc, log) == 1
        # A second full scrape, after the first: every collector has run.
        text = urllib.request.urlopen(f"http://{listen}/metrics", timeout=10).read().decode()
    finally:
        stop_process(proc, 15)
    present = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}
    missing = [m for m in EXPORTER_METRICS if m not in present]
    assert missing == [], missing
    assert 'redis_exporter_last_scrape_error{err=""} 0' in text.splitlines()
    assert refused_commands(watch.acl_log(), "exporter") == set(), watch.acl_log()
    # And it still cannot touch the data.
    exporter = user_client(run, server, "exporter", tmp_path)
    for command in (("SET", "k", "v"), ("GET", "backup-marker"), ("FLUSHDB",)):
        with pytest.raises(redis.exceptions.NoPermissionError):
            exporter.execute_command(*command)
