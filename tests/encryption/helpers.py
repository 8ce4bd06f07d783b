"""What the encryption tests take from a mocked program run, and how they place it on disk.

Everything comes from the program's declarations: the files a service's config-init
container uploads, the service's command, healthcheck and environment, and the state the
mocked tls/random providers returned. Only container paths are mapped to temp dirs and
ports to free loopback ports; the content is used exactly as declared.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from tests.pulumi_harness import ProgramRun, container_inputs, uploaded_files
from tests.servers import free_port, stop_process, wait_listening

CONFIG_DIR = "/etc/rag"  # where the program's services find their files
START_TIMEOUT_S = 20.0
TOOL_TIMEOUT_S = 30.0


def other_stack(stack: str) -> str:
    return {"staging": "prod", "prod": "staging"}[stack]


def resource_state(run: ProgramRun, typ: str, name: str) -> dict[str, Any]:
    found = [r for r in run.of_type(typ) if r.name == name]
    if len(found) != 1:
        raise KeyError(f"expected one {typ} named {name!r}, found {len(found)}")
    return found[0].state


def generated_password(run: ProgramRun, purpose: str) -> str:
    """The plaintext the mocked pulumi-random produced for ``rag-<stack>-<purpose>``."""
    state = resource_state(
        run, "random:index/randomPassword:RandomPassword", f"rag-{run.stack}-{purpose}"
    )
    return str(state["result"])


def tls_client_pair(run: ProgramRun, client: str) -> tuple[str, str]:
    """(cert PEM, key PEM) of a Redis TLS client as the mocked pulumi-tls issued them."""
    prefix = f"rag-{run.stack}-redis-tls-client-{client}"
    cert = resource_state(run, "tls:index/locallySignedCert:LocallySignedCert", f"{prefix}-cert")
    key = resource_state(run, "tls:index/privateKey:PrivateKey", f"{prefix}-key")
    return str(cert["certPem"]), str(key["privateKeyPem"])


def write_files(files: Mapping[str, str], config_dir: Path) -> Path:
    """Write ``files`` under ``config_dir`` (the stand-in for CONFIG_DIR); keys 0600."""
    for path, content in files.items():
        target = config_dir / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content, encoding="utf-8")
        target.chmod(0o600 if path.endswith(".key") or "secret" in path else 0o644)
    return config_dir


def map_path(value: str, prefixes: Mapping[str, Path]) -> str:
    """``value`` with a leading container directory (a key of ``prefixes``) replaced."""
    for container_dir, host_dir in prefixes.items():
        if value == container_dir or value.startswith(container_dir + "/"):
            return str(host_dir) + value[len(container_dir) :]
    return value


def map_conf_paths(conf: str, prefixes: Mapping[str, Path]) -> str:
    """A redis.conf with every path argument's container directory replaced; nothing else."""
    lines = []
    for line in conf.splitlines():
        tokens = line.split(" ")
        lines.append(" ".join(map_path(token, prefixes) for token in tokens))
    return "\n".join(lines) + "\n"


def map_argv(argv: Sequence[str], prefixes: Mapping[str, Path]) -> list[str]:
    return [map_path(arg, prefixes) for arg in argv]


def redis_url_for_test(url: str, port: int, prefixes: Mapping[str, Path]) -> str:
    """The api's REDIS_URL pointed at 127.0.0.1:``port`` with its file paths mapped."""
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
    query = [(k, map_path(v, prefixes)) for k, v in parse_qsl(parts.query)]
    return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, safe="/"), ""))


def env_value(envs: Sequence[str], name: str) -> str:
    for entry in envs:
        key, _, value = entry.partition("=")
        if key == name:
            return value
    raise KeyError(f"container env has no {name}")


# --------------------------------------------------------------------------- Redis


@dataclass
class RedisUnderTest:
    """A real redis-server started from one stack's declared command and files."""

    stack: str
    port: int
    config_dir: Path  # stand-in for the Redis container's /etc/rag
    data_dir: Path  # stand-in for /data
    argv: list[str]
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def prefixes(self) -> dict[str, Path]:
        return {CONFIG_DIR: self.config_dir, "/data": self.data_dir}

    def log_offset(self) -> int:
        return self.log.stat().st_size

    def log_since(self, offset: int) -> str:
        with open(self.log, "rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")

    def stop(self) -> None:
        stop_process(self.process, 15)


def start_redis_from_program(
    run: ProgramRun,
    redis_server: str,
    root: Path,
    attempts: int = 3,
    observer_acl: str | None = None,
) -> RedisUnderTest:
    """redis-server with the program's command and files; only paths, port, bind mapped.
    ``observer_acl``: one extra ACL line (a test-only user that reads ACL LOG), appended
    after the program's users, which stay exactly as declared."""
    config_dir = write_files(uploaded_files(run, "redis"), root / "etc" / "rag")
    if observer_acl is not None:
        with open(config_dir / "users.acl", "a") as acl:
            acl.write(observer_acl.rstrip("\n") + "\n")
    data_dir = root / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    prefixes = {CONFIG_DIR: config_dir, "/data": data_dir}
    conf = config_dir / "redis.conf"
    conf.write_text(map_conf_paths(conf.read_text(), prefixes))
    command = container_inputs(run, "redis")["command"]
    if command[0] != "redis-server":
        raise AssertionError(f"the Redis container does not run redis-server: {command}")
    log = root / "redis.log"
    last_error: Exception | None = None
    for _attempt in range(attempts):
        port = free_port()
        # Later arguments override the file: loopback and a free port, nothing else.
        argv = [redis_server, *map_argv(command[1:], prefixes)]
        argv += ["--tls-port", str(port), "--bind", "127.0.0.1"]
        with open(log, "wb") as log_file:  # one attempt's log only
            proc = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, cwd=root)
        try:
            wait_listening(port, proc, log)
            return RedisUnderTest(run.stack, port, config_dir, data_dir, argv, proc, log)
        except RuntimeError as error:  # a port race: try another
            last_error = error
            stop_process(proc, 15)
    raise RuntimeError(f"redis-server for {run.stack} did not start: {last_error}")


# --------------------------------------------------------------------------- PostgreSQL


def run_as_postgres() -> dict[str, Any]:
    """subprocess kwargs: PostgreSQL refuses to run as root."""
    if os.geteuid() == 0:
        return {"user": "postgres", "group": "postgres", "extra_groups": []}
    return {}


@dataclass
class PostgresUnderTest:
    """A real PostgreSQL initialised like the image's entrypoint and started with the
    program's server command."""

    stack: str
    port: int
    root: Path  # owned by the postgres OS user; holds data, socket, files
    bin_dir: Path
    socket_dir: Path
    process: subprocess.Popen[bytes]
    log: Path
    argv: list[str] = field(default_factory=list)

    def stop(self) -> None:
        try:
            stop_process(self.process, 2)  # SIGINT: fast shutdown
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def postgres_env(self) -> dict[str, str]:
        return {
            "PATH": f"{self.bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "PGPORT": str(self.port),
            "HOME": str(self.root),
            "PSQLRC": "/dev/null",
        }

    def run_as_postgres(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        """``argv`` as the postgres OS user (like the program's migrate container)."""
        return subprocess.run(
            list(argv),
            env=self.postgres_env(),
            capture_output=True,
            text=True,
            timeout=TOOL_TIMEOUT_S,
            check=False,
            cwd=self.root,
            **run_as_postgres(),
        )
