"""A real redis-server per stack, run with exactly the command and files the program declares
for its Redis container (container paths mapped to temp dirs, a free loopback port), and
real clients using exactly the api's URL, certificates and password file.

Proves mutual TLS with per-stack CAs: the stack's own clients work; no certificate, the
other stack's CA or certificate, plaintext and a wrong password are all refused; the ACL
users can do what they need and no more; the declared healthcheck passes only against its
own stack's server.
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.encryption.conftest import STACKS
from tests.encryption.helpers import (
    CONFIG_DIR,
    TOOL_TIMEOUT_S,
    RedisUnderTest,
    container_inputs,
    env_value,
    generated_password,
    map_argv,
    other_stack,
    redis_url_for_test,
    start_redis_from_program,
    tls_client_pair,
    uploaded_files,
    write_files,
)
from tests.pulumi_harness import ProgramRun
from tests.tooling import require_tool

pytestmark = pytest.mark.integration

LOG_WAIT_S = 3.0


def no_retry() -> Retry:
    # A refused connection must fail at once, not after redis-py's backoff retries.
    return Retry(NoBackoff(), 0)


def wait_for_log(server: RedisUnderTest, offset: int, text: str) -> str:
    """The server's log since ``offset`` once it contains ``text`` (or at the deadline)."""
    deadline = time.monotonic() + LOG_WAIT_S
    while True:
        logged = server.log_since(offset)
        if text in logged or time.monotonic() > deadline:
            return logged
        time.sleep(0.05)


class ApiClient:
    """What the api gets: its files in its own config dir, its REDIS_URL and password file."""

    def __init__(self, run: ProgramRun, config_dir: Path) -> None:
        self.run = run
        self.config_dir = write_files(uploaded_files(run, "api"), config_dir)
        envs = container_inputs(run, "api")["envs"]
        self.url = env_value(envs, "REDIS_URL")
        password_file = env_value(envs, "REDIS_PASSWORD_FILE")
        self.password = Path(self.path(password_file)).read_text()

    def path(self, container_path: str) -> str:
        assert container_path.startswith(CONFIG_DIR + "/"), container_path
        return str(self.config_dir) + container_path[len(CONFIG_DIR) :]

    def url_for(
        self,
        server: RedisUnderTest,
        drop: tuple[str, ...] = (),
        replace: dict[str, str] | None = None,
    ) -> str:
        """The api's URL for ``server``; query options dropped or replaced (redis-py lets
        URL options win over keyword arguments, so changes must go into the URL)."""
        url = redis_url_for_test(self.url, server.port, {CONFIG_DIR: self.config_dir})
        replace = replace or {}
        parts = urlsplit(url)
        query = [(k, replace.get(k, v)) for k, v in parse_qsl(parts.query) if k not in drop]
        assert set(replace) <= {k for k, _ in query}, f"{replace} not all in {url}"
        return urlunsplit(parts._replace(query=urlencode(query, safe="/")))

    def client(self, server: RedisUnderTest, **overrides: object) -> redis.Redis:
        kwargs: dict[str, object] = {"password": self.password, "socket_timeout": 10}
        kwargs.update(overrides)
        return redis.Redis.from_url(self.url_for(server), **kwargs)


@pytest.fixture(scope="module")
def api_clients(
    runs: dict[str, ProgramRun], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, ApiClient]:
    return {
        stack: ApiClient(runs[stack], tmp_path_factory.mktemp(f"api-{stack}") / "etc" / "rag")
        for stack in STACKS
    }


@pytest.fixture(scope="module")
def backup_tls_files(
    runs: dict[str, ProgramRun], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, dict[str, Path]]:
    """The backup client's pair as pulumi-tls issued it, plus the stack's CA, as files."""
    files = {}
    for stack in STACKS:
        directory = tmp_path_factory.mktemp(f"backup-tls-{stack}")
        cert, key = tls_client_pair(runs[stack], "backup")
        ca = uploaded_files(runs[stack], "api")["tls/ca.crt"]
        written = write_files({"ca.crt": ca, "client.crt": cert, "client.key": key}, directory)
        files[stack] = {name: written / name for name in ("ca.crt", "client.crt", "client.key")}
    return files


def _acl_user_client(
    server: RedisUnderTest, tls_files: dict[str, Path], user: str, password: str
) -> redis.Redis:
    return redis.Redis(
        host="127.0.0.1",
        port=server.port,
        username=user,
        password=password,
        ssl=True,
        ssl_ca_certs=str(tls_files["ca.crt"]),
        ssl_certfile=str(tls_files["client.crt"]),
        ssl_keyfile=str(tls_files["client.key"]),
        socket_timeout=10,
    )


@pytest.mark.parametrize("stack", STACKS)
def test_api_client_pings_sets_and_gets_over_mutual_tls(
    stack: str, redis_servers: dict[str, RedisUnderTest], api_clients: dict[str, ApiClient]
) -> None:
    client = api_clients[stack].client(redis_servers[stack])
    assert client.ping() is True
    assert client.acl_whoami() == "app"
    client.set(f"session:{stack}", "value-over-tls")
    assert client.get(f"session:{stack}") == b"value-over-tls"
    # The connection really is TLS with the CA-verified server (not a plaintext fallback).
    connection = client.connection_pool.get_connection()
    try:
        assert connection._sock is not None
        assert isinstance(connection._sock, ssl.SSLSocket)
        assert connection._sock.version() in {"TLSv1.2", "TLSv1.3"}
    finally:
        client.connection_pool.release(connection)


@pytest.mark.parametrize("stack", STACKS)
def test_client_without_certificate_is_refused(
    stack: str, redis_servers: dict[str, RedisUnderTest], api_clients: dict[str, ApiClient]
) -> None:
    api, server = api_clients[stack], redis_servers[stack]
    url = api.url_for(server, drop=("ssl_certfile", "ssl_keyfile"))
    client = redis.Redis.from_url(url, password=api.password, socket_timeout=10, retry=no_retry())
    offset = server.log_offset()
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    reason = "peer did not return a certificate"
    assert reason in wait_for_log(server, offset, reason)


@pytest.mark.parametrize("stack", STACKS)
def test_client_trusting_the_other_stacks_ca_fails_the_handshake(
    stack: str, redis_servers: dict[str, RedisUnderTest], api_clients: dict[str, ApiClient]
) -> None:
    other = api_clients[other_stack(stack)]  # the other stack's CA and its api client pair
    client = redis.Redis.from_url(
        other.url_for(redis_servers[stack]),
        password=other.password,
        socket_timeout=10,
        retry=no_retry(),
    )
    with pytest.raises(redis.exceptions.ConnectionError, match="CERTIFICATE_VERIFY_FAILED"):
        client.ping()


@pytest.mark.parametrize("stack", STACKS)
def test_server_refuses_the_other_stacks_client_certificate(
    stack: str, redis_servers: dict[str, RedisUnderTest], api_clients: dict[str, ApiClient]
) -> None:
    own, other = api_clients[stack], api_clients[other_stack(stack)]
    # Trusts this stack's server, but presents the other stack's client certificate.
    url = own.url_for(
        redis_servers[stack],
        replace={
            "ssl_certfile": other.path("/etc/rag/tls/client.crt"),
            "ssl_keyfile": other.path("/etc/rag/tls/client.key"),
        },
    )
    client = redis.Redis.from_url(url, password=own.password, socket_timeout=10, retry=no_retry())
    server = redis_servers[stack]
    offset = server.log_offset()
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    reason = "certificate verify failed"
    assert reason in wait_for_log(server, offset, reason)


@pytest.mark.parametrize("stack", STACKS)
def test_plaintext_connection_to_the_tls_port_gets_no_answer(
    stack: str, redis_servers: dict[str, RedisUnderTest], api_clients: dict[str, ApiClient]
) -> None:
    server = redis_servers[stack]
    client = redis.Redis(
        host="127.0.0.1",
        port=server.port,
        username="app",
        password=api_clients[stack].password,
        socket_timeout=5,
        retry=no_retry(),
    )
    with pytest.raises(redis.exceptions.ConnectionError):
        client.ping()
    # Byte level: a plaintext PING never gets a Redis reply.
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        try:
            reply = sock.recv(64)
        except (ConnectionResetError, TimeoutError):
            reply = b""
    assert b"PONG" not in reply


@pytest.mark.parametrize("stack", STACKS)
def test_no_plaintext_listener_is_configured(
    stack: str,
    runs: dict[str, ProgramRun],
    redis_servers: dict[str, RedisUnderTest],
    backup_tls_files: dict[str, dict[str, Path]],
) -> None:
    # The test overrides only tls-port and bind; the plaintext port is the program's.
    # Read with the exporter's user: the only one allowed CONFIG GET.
    password = generated_password(runs[stack], "redis-exporter-password")
    client = _acl_user_client(redis_servers[stack], backup_tls_files[stack], "exporter", password)
    assert client.config_get("port") == {"port": "0"}
    assert client.config_get("tls-auth-clients") == {"tls-auth-clients": "yes"}


@pytest.mark.parametrize("stack", STACKS)
def test_wrong_password_is_an_authentication_error(
    stack: str, redis_servers: dict[str, RedisUnderTest], api_clients: dict[str, ApiClient]
) -> None:
    client = api_clients[stack].client(redis_servers[stack], password="not-the-password")
    with pytest.raises(redis.exceptions.AuthenticationError):
        client.ping()
    # The other stack's app password is just as wrong here.
    other_password = api_clients[other_stack(stack)].password
    client = api_clients[stack].client(redis_servers[stack], password=other_password)
    with pytest.raises(redis.exceptions.AuthenticationError):
        client.ping()


@pytest.mark.parametrize("stack", STACKS)
def test_certificate_without_password_may_only_ping(
    stack: str, redis_servers: dict[str, RedisUnderTest], api_clients: dict[str, ApiClient]
) -> None:
    api = api_clients[stack]
    url = api.url_for(redis_servers[stack]).replace("app@", "", 1)
    client = redis.Redis.from_url(url, socket_timeout=10)
    assert client.ping() is True
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.get(f"session:{stack}")


@pytest.mark.parametrize("stack", STACKS)
def test_exporter_user_reads_info_but_cannot_write(
    stack: str,
    runs: dict[str, ProgramRun],
    redis_servers: dict[str, RedisUnderTest],
    backup_tls_files: dict[str, dict[str, Path]],
) -> None:
    password = generated_password(runs[stack], "redis-exporter-password")
    # The exporter's own pair as pulumi-tls issued it.
    cert, key = tls_client_pair(runs[stack], "redis-exporter")
    directory = backup_tls_files[stack]["ca.crt"].parent / "exporter"
    write_files({"client.crt": cert, "client.key": key}, directory)
    tls_files = {
        "ca.crt": backup_tls_files[stack]["ca.crt"],
        "client.crt": directory / "client.crt",
        "client.key": directory / "client.key",
    }
    client = _acl_user_client(redis_servers[stack], tls_files, "exporter", password)
    assert "redis_version" in client.info("server")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.set("exporter-write", "1")
    with pytest.raises(redis.exceptions.NoPermissionError):
        client.get(f"session:{stack}")


@dataclass(frozen=True)
class RdbDump:
    marker: str
    result: subprocess.CompletedProcess[str]
    path: Path


@pytest.fixture(scope="module")
def rdb_dumps(
    runs: dict[str, ProgramRun],
    redis_servers: dict[str, RedisUnderTest],
    api_clients: dict[str, ApiClient],
    backup_tls_files: dict[str, dict[str, Path]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, RdbDump]:
    """``redis-cli --rdb`` as the backup user against each stack, run side by side: a
    replication sync waits out Redis's diskless-sync delay (5 s by default)."""
    redis_cli = require_tool("redis-cli")
    started = {}
    for stack in STACKS:
        server, files = redis_servers[stack], backup_tls_files[stack]
        marker = f"backup-marker-{stack}"
        api_clients[stack].client(server).set(marker, "kept")
        dump = tmp_path_factory.mktemp(f"rdb-{stack}") / "dump.rdb"
        argv = [redis_cli, "--tls", "--cacert", str(files["ca.crt"]), "--cert"]
        argv += [str(files["client.crt"]), "--key", str(files["client.key"])]
        argv += ["-h", "127.0.0.1", "-p", str(server.port), "--user", "backup"]
        argv += ["--rdb", str(dump)]
        # The password only in REDISCLI_AUTH, never on argv.
        env = {
            **os.environ,
            "REDISCLI_AUTH": generated_password(runs[stack], "redis-backup-password"),
        }
        proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        started[stack] = (marker, argv, proc, dump)
    dumps = {}
    for stack, (marker, argv, proc, dump) in started.items():
        try:
            stdout, stderr = proc.communicate(timeout=TOOL_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        result = subprocess.CompletedProcess(argv, proc.returncode, stdout, stderr)
        dumps[stack] = RdbDump(marker, result, dump)
    return dumps


@pytest.mark.parametrize("stack", STACKS)
def test_backup_user_dumps_rdb_with_redis_cli_over_tls(
    stack: str, rdb_dumps: dict[str, RdbDump]
) -> None:
    dump = rdb_dumps[stack]
    assert dump.result.returncode == 0, dump.result.stderr + dump.result.stdout
    content = dump.path.read_bytes()
    assert content.startswith(b"REDIS")
    assert dump.marker.encode() in content
    # Each stack's dump holds its own data only.
    assert rdb_dumps[other_stack(stack)].marker.encode() not in content


def _healthcheck_argv(run: ProgramRun, server: RedisUnderTest) -> list[str]:
    """The Redis container's healthcheck, its files mapped and pointed at ``server``."""
    tests = container_inputs(run, "redis")["healthcheck"]["tests"]
    assert tests[0] == "CMD", tests
    argv = map_argv(tests[1:], server.prefixes)
    port_index = argv.index("-p") + 1
    argv[port_index] = str(server.port)
    argv[0] = require_tool(argv[0])
    return argv


@pytest.mark.parametrize("stack", STACKS)
def test_declared_healthcheck_gets_pong(
    stack: str, runs: dict[str, ProgramRun], redis_servers: dict[str, RedisUnderTest]
) -> None:
    argv = _healthcheck_argv(runs[stack], redis_servers[stack])
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "PONG"


@pytest.mark.parametrize("stack", STACKS)
def test_declared_healthcheck_fails_against_the_other_stacks_server(
    stack: str, runs: dict[str, ProgramRun], redis_servers: dict[str, RedisUnderTest]
) -> None:
    own_server, other_server = redis_servers[stack], redis_servers[other_stack(stack)]
    # This stack's files, the other stack's port.
    argv = _healthcheck_argv(runs[stack], own_server)
    argv[argv.index("-p") + 1] = str(other_server.port)
    result = subprocess.run(
        argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
    )
    assert result.returncode != 0
    assert "PONG" not in result.stdout


def test_declared_healthcheck_fails_while_redis_answers_with_an_error(
    runs: dict[str, ProgramRun],
    api_clients: dict[str, ApiClient],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """A runaway Lua script: after busy-reply-threshold (5 s) Redis answers every client,
    PING included, with BUSY. The service is of no use to its clients, and its
    healthcheck must say so: redis-cli exits 0 on an error reply unless asked not to."""
    stack = "staging"
    server = start_redis_from_program(
        runs[stack], require_tool("redis-server"), tmp_path_factory.mktemp("redis-busy")
    )
    runaway = api_clients[stack].client(server, socket_timeout=60)

    def run_forever() -> None:
        with contextlib.suppress(redis.RedisError):  # ended by SCRIPT KILL
            runaway.eval("while true do end", 0)

    script = threading.Thread(target=run_forever, daemon=True)
    try:
        argv = _healthcheck_argv(runs[stack], server)
        before = subprocess.run(
            argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )
        assert (before.returncode, before.stdout.strip()) == (0, "PONG"), before.stderr
        script.start()
        deadline = time.monotonic() + 30
        while "BUSY" not in (busy := subprocess.run(
            argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S, check=False
        )).stdout + busy.stderr:  # fmt: skip
            assert time.monotonic() < deadline, (busy.returncode, busy.stdout, busy.stderr)
            time.sleep(0.5)
        assert busy.returncode != 0, busy.stdout
    finally:
        killer = api_clients[stack].client(server)
        with contextlib.suppress(redis.RedisError):
            killer.script_kill()
        script.join(timeout=30)
        server.stop()
