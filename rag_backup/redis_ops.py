"""Redis: RDB over the replication protocol with redis-cli (TLS capable, password in
REDISCLI_AUTH); for a restore, a Redis 7 multi-part AOF directory built on the RDB (so a
server with ``appendonly yes`` starts with it), proven by a private redis-server on a unix
socket loading it with AOF on."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from rag_backup.errors import BackupError
from rag_backup.procs import Proc, base_env, last_lines, run
from rag_backup.streams import CHUNK

RDB_EOF_MARK_SIZE = 40
# Redis 7's default AOF file name; the multi-part AOF files in ``appenddirname`` are named
# after it: <name>.<seq>.base.rdb, <name>.<seq>.incr.aof and <name>.manifest.
AOF_FILENAME = "appendonly.aof"
_KEYSPACE_LINE = re.compile(r"^db(\d+):keys=(\d+),expires=(\d+)")


@dataclass(frozen=True)
class RedisSettings:
    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None = field(repr=False)
    ca_file: Path | None
    cert_file: Path | None
    key_file: Path | None
    cli: str = "redis-cli"

    @staticmethod
    def from_url(
        url: str,
        *,
        password_file: Path | None,
        ca_file: Path | None,
        cert_file: Path | None,
        key_file: Path | None,
    ) -> RedisSettings:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("redis", "rediss") or not parsed.hostname:
            raise BackupError(
                "REDIS_URL / --redis-url: expected redis://host:port or rediss://host:port "
                f"(got scheme {parsed.scheme!r})"
            )
        try:
            port = parsed.port or 6379
        except ValueError as error:
            raise BackupError("REDIS_URL / --redis-url: the port is not a number") from error
        password = urllib.parse.unquote(parsed.password) if parsed.password else None
        if password_file is not None:
            try:
                password = password_file.read_text().strip()
            except OSError as error:
                raise BackupError(
                    f"--redis-password-file / REDIS_PASSWORD_FILE: cannot read {password_file}"
                ) from error
        for option, path in (
            ("--redis-ca-file / REDIS_TLS_CA_FILE", ca_file),
            ("--redis-cert-file / REDIS_TLS_CERT_FILE", cert_file),
            ("--redis-key-file / REDIS_TLS_KEY_FILE", key_file),
        ):
            if path is not None and not path.is_file():
                raise BackupError(f"{option}: {path} is not a readable file")
        username = urllib.parse.unquote(parsed.username) if parsed.username else None
        return RedisSettings(
            host=parsed.hostname,
            port=port,
            tls=parsed.scheme == "rediss",
            username=username or None,
            password=password,
            ca_file=ca_file,
            cert_file=cert_file,
            key_file=key_file,
        )

    def describe(self) -> str:
        return f"{'rediss' if self.tls else 'redis'}://{self.host}:{self.port}"

    def cli_argv(self) -> list[str]:
        argv = [self.cli, "-h", self.host, "-p", str(self.port), "--no-auth-warning"]
        if self.tls:
            argv.append("--tls")
            if self.ca_file:
                argv += ["--cacert", str(self.ca_file)]
            if self.cert_file:
                argv += ["--cert", str(self.cert_file)]
            if self.key_file:
                argv += ["--key", str(self.key_file)]
        if self.username:
            argv += ["--user", self.username]
        return argv

    def env(self) -> dict[str, str]:
        # redis-cli reads the password from REDISCLI_AUTH: never on argv.
        extra = {"REDISCLI_AUTH": self.password} if self.password else {}
        env = base_env(extra)
        if not self.password:
            env.pop("REDISCLI_AUTH", None)
        return env


def parse_keyspace(info: str) -> dict[str, dict[str, int]]:
    result = {}
    for line in info.splitlines():
        match = _KEYSPACE_LINE.match(line.strip())
        if match:
            result[match[1]] = {"keys": int(match[2]), "expires": int(match[3])}
    return result


def total_keys(keyspace: dict[str, dict[str, int]]) -> int:
    return sum(db["keys"] for db in keyspace.values())


def remote_keyspace(settings: RedisSettings) -> dict[str, dict[str, int]]:
    out = run(
        "redis-cli INFO", [*settings.cli_argv(), "INFO", "keyspace"], env=settings.env(), timeout=60
    )
    if out.startswith(("ERR", "NOAUTH", "WRONGPASS")) or "# Keyspace" not in out:
        raise BackupError(f"redis at {settings.describe()} refused INFO: {last_lines(out, 1)}")
    return parse_keyspace(out)


# How long "is the live server still running?" waits for its name to resolve. A stopped
# container's name is forwarded by Docker's DNS to the host's resolver; one that does not
# answer (a sandbox, a DNS outage: the moments restores happen) held the check 30-40 s.
RESOLVE_TIMEOUT_S = 5.0


def resolves(host: str, port: int, timeout: float = RESOLVE_TIMEOUT_S) -> bool:
    """Whether ``host`` has an address within ``timeout`` (getaddrinfo has no timeout of
    its own: it runs in a daemon thread that is left behind when it hangs)."""
    found: list[bool] = []

    def lookup() -> None:
        try:
            found.append(bool(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)))
        except OSError:
            found.append(False)

    thread = threading.Thread(target=lookup, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(found and found[0])


def remote_answers(settings: RedisSettings) -> bool:
    if not resolves(settings.host, settings.port):
        return False  # no address (yet): nothing there can be running
    try:
        result = subprocess.run(
            [*settings.cli_argv(), "PING"],
            env=settings.env(),
            capture_output=True,
            timeout=30,
            check=False,
        )
    except subprocess.TimeoutExpired:
        # No answer in 30 s (e.g. a stopped container's name, on a host whose resolver
        # does not answer, takes 40 s to fail): not a server that is running.
        return False
    return result.returncode == 0 and bool(result.stdout.strip())


def start_rdb_transfer(settings: RedisSettings) -> Proc:
    return Proc("redis-cli --rdb", [*settings.cli_argv(), "--rdb", "-"], env=settings.env())


def rdb_feeder(cli: Proc) -> object:
    """Copy redis-cli's RDB to the compressor, dropping the 40-byte EOF mark that a diskless
    transfer appends (redis-cli can only truncate it from a file, not from stdout)."""

    def feed(out: IO[bytes]) -> None:
        tail = b""
        total = 0
        while True:
            chunk = cli.stdout.read(CHUNK)
            if not chunk:
                break
            total += len(chunk)
            data = tail + chunk
            if len(data) > RDB_EOF_MARK_SIZE:
                out.write(data[:-RDB_EOF_MARK_SIZE])
                tail = data[-RDB_EOF_MARK_SIZE:]
            else:
                tail = data
        cli.check(timeout=600)
        match = re.search(r"after (\d+) bytes", cli.stderr_text())
        if not match:
            raise BackupError(
                f"redis-cli --rdb did not confirm the transfer: {last_lines(cli.stderr_text())}"
            )
        rdb_size = int(match[1])
        if total == rdb_size + RDB_EOF_MARK_SIZE:
            return
        if total == rdb_size:
            out.write(tail)
            return
        raise BackupError(
            f"redis-cli --rdb sent {total} bytes but reported an RDB of {rdb_size} bytes"
        )

    return feed


class LocalRedis:
    """A private redis-server on a unix socket (no TCP) over a given data directory."""

    def __init__(
        self,
        server_cmd: str,
        data_dir: Path,
        *,
        dbfilename: str,
        appenddirname: str,
        appendonly: bool,
        timeout_s: float = 600,
    ) -> None:
        self._sock_dir = Path(tempfile.mkdtemp(prefix="rag-redis-"))
        self.socket = self._sock_dir / "redis.sock"
        self.data_dir = data_dir
        argv = [
            server_cmd,
            "--port",
            "0",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
            "--dir",
            str(data_dir),
            "--dbfilename",
            dbfilename,
            "--appenddirname",
            appenddirname,
            "--appendfilename",
            AOF_FILENAME,
            "--appendonly",
            "yes" if appendonly else "no",
            "--save",
            "",
            "--daemonize",
            "no",
            "--protected-mode",
            "yes",
        ]
        self.proc = Proc("redis-server (restore)", argv, stdout=subprocess.DEVNULL)
        try:
            self._wait_loaded(timeout_s)
        except BaseException:
            self.stop()
            raise

    def cli(self, *args: str, timeout: float = 120) -> str:
        env = base_env()
        env.pop("REDISCLI_AUTH", None)
        return run(
            "redis-cli", ["redis-cli", "-s", str(self.socket), *args], env=env, timeout=timeout
        )

    def info(self, section: str) -> dict[str, str]:
        values = {}
        for line in self.cli("INFO", section).splitlines():
            if ":" in line and not line.startswith("#"):
                key, _, value = line.strip().partition(":")
                values[key] = value
        return values

    def _wait_loaded(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.popen.poll() is not None:
                raise BackupError(
                    f"redis-server could not load the data: {last_lines(self.proc.stderr_text())}"
                )
            if self.socket.exists():
                try:
                    if self.info("persistence").get("loading") == "0":
                        return
                except BackupError:
                    pass
            time.sleep(0.05)
        raise BackupError(f"redis-server did not finish loading within {timeout_s:.0f}s")

    def keyspace(self) -> dict[str, dict[str, int]]:
        return parse_keyspace(self.cli("INFO", "keyspace"))

    def stop(self) -> None:
        if self.proc.popen.poll() is None:
            # SHUTDOWN closes the connection (an error for redis-cli); the wait is what counts.
            with contextlib.suppress(BackupError):
                self.cli("SHUTDOWN", "NOSAVE", timeout=60)
            try:
                self.proc.wait(timeout=60)
            except BackupError:
                self.proc.kill()
        self.proc.close()
        shutil.rmtree(self._sock_dir, ignore_errors=True)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_aof_dir(rdb: Path, aof_dir: Path, appendfilename: str = AOF_FILENAME) -> None:
    """Make ``aof_dir`` a Redis 7 multi-part AOF whose base is the RDB itself (hard-linked,
    no copy): the base file, an empty incr file and the manifest, as Redis writes them after
    an AOF rewrite with ``aof-use-rdb-preamble yes``. A server with ``appendonly yes`` loads
    the RDB from there; without it, it would ignore a restored ``dump.rdb`` and start empty.
    Everything is fsynced. The caller proves the result by loading it with AOF on."""
    base = f"{appendfilename}.1.base.rdb"
    incr = f"{appendfilename}.1.incr.aof"
    aof_dir.mkdir(mode=0o755)
    os.link(rdb, aof_dir / base)
    with open(aof_dir / incr, "xb") as handle:
        os.fsync(handle.fileno())
    manifest = f"file {base} seq 1 type b\nfile {incr} seq 1 type i\n"
    with open(aof_dir / f"{appendfilename}.manifest", "x", encoding="ascii") as handle:
        handle.write(manifest)
        handle.flush()
        os.fsync(handle.fileno())
    _fsync_path(aof_dir)
    _fsync_path(aof_dir.parent)


def check_rdb_file(path: Path, checker: str = "redis-check-rdb") -> None:
    with open(path, "rb") as handle:
        if handle.read(5) != b"REDIS":
            raise BackupError(f"{path.name}: not an RDB file (no REDIS header)")
    if shutil.which(checker):
        out = run("redis-check-rdb", [checker, str(path)], timeout=3600)
        if "RDB looks OK" not in out:
            raise BackupError(f"redis-check-rdb rejected {path.name}: {last_lines(out, 2)}")


def keys_within_backup_range(component: dict[str, object], restored: int) -> bool:
    """The RDB was taken between two INFO keyspace readings; keys with a TTL may expire."""
    before = int(component["keys_before"])  # type: ignore[call-overload]
    after = int(component["keys_after"])  # type: ignore[call-overload]
    expiring = max(int(component["expires_before"]), int(component["expires_after"]))  # type: ignore[call-overload]
    return min(before, after) - expiring <= restored <= max(before, after)
