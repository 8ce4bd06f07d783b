"""Real PostgreSQL and redis-server instances for tests, on loopback and free ports.

Every launcher returns a handle whose ``stop()`` is idempotent; use them from fixtures with
``try/finally`` (or ``yield``) so a failing test still stops its servers. Start-up is bounded
in time and a server that does not come up is stopped and reported with its log tail.

PostgreSQL refuses to run as root, so when the tests run as root the data directory is made
in a fresh directory under the system temp dir (pytest's ``tmp_path`` is root-only) owned by
the ``postgres`` OS user, and the server runs as that user.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.tooling import require_tool

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_listening(
    port: int, proc: subprocess.Popen[bytes], log: Path, host: str = "127.0.0.1"
) -> None:
    """Return once ``host:port`` accepts connections; fail with the log if ``proc`` dies."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(
        f"server not listening on {host}:{port} after {START_TIMEOUT_S}s:\n{log_tail(log)}"
    )


def log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_process(proc: subprocess.Popen[bytes], signal_number: int) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal_number)
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT_S)


# --------------------------------------------------------------------------- PostgreSQL


@dataclass
class PostgresServer:
    host: str
    port: int
    user: str
    password: str
    password_file: Path  # a libpq PGPASSFILE (mode 0600) for this server
    data_dir: Path
    bin_dir: Path
    root_dir: Path
    process: subprocess.Popen[bytes]
    start_args: list[str] = field(default_factory=list, repr=False)
    _stopped: bool = field(default=False, repr=False)

    @property
    def dsn(self) -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname=postgres"

    def env(self, database: str = "postgres") -> dict[str, str]:
        """libpq variables that reach this server (no password in them, only the file)."""
        return {
            "PGHOST": self.host,
            "PGPORT": str(self.port),
            "PGUSER": self.user,
            "PGPASSFILE": str(self.password_file),
            "PGDATABASE": database,
        }

    def psql(self, sql: str, database: str = "postgres") -> str:
        """Run SQL with psql; returns unaligned tuples-only output."""
        result = subprocess.run(
            [str(self.bin_dir / "psql"), "-X", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql],
            env={**os.environ, **self.env(database)},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"psql failed: {result.stderr.strip()}")
        return result.stdout

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            # SIGINT is PostgreSQL's "fast" shutdown.
            stop_process(self.process, 2)
        finally:
            shutil.rmtree(self.root_dir, ignore_errors=True)

    def shutdown(self) -> None:
        """Stop the server (fast shutdown) but keep its data directory, as an operator does
        before a physical restore."""
        stop_process(self.process, 2)

    def start_again(self) -> None:
        """Start the server again on its data directory and port (after ``shutdown``)."""
        if self.process.poll() is None:
            raise RuntimeError("PostgreSQL is still running")
        log = self.root_dir / "postgres.log"
        with open(log, "ab") as log_file:
            self.process = subprocess.Popen(
                self.start_args,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                **_postgres_run_kwargs(),
            )
        wait_listening(self.port, self.process, log)
        _wait_ready(self)


def _postgres_run_kwargs() -> dict[str, Any]:
    if os.geteuid() == 0:
        return {"user": "postgres", "group": "postgres", "extra_groups": []}
    return {}


def start_postgres(
    base_dir: Path | None = None,
    *,
    user: str = "postgres",
    password: str = "test-pg-password",  # noqa: S107 - a throwaway test server
    settings: Mapping[str, str] | None = None,
    initdb_args: Sequence[str] = (),
) -> PostgresServer:
    """Start a throwaway PostgreSQL on 127.0.0.1 with scram password auth.

    ``base_dir`` only holds the password file; the cluster lives in its own temp dir (see the
    module doc). ``settings`` are extra ``-c name=value`` server settings.
    """
    postgres = Path(require_tool("postgres")).resolve()
    bin_dir = postgres.parent
    initdb = require_tool("initdb")
    require_tool("psql")
    root_dir = Path(tempfile.mkdtemp(prefix="rag-test-pg-"))
    os.chmod(root_dir, 0o755)  # noqa: S103 - the postgres user must traverse it
    run_as = _postgres_run_kwargs()
    data_dir = root_dir / "data"
    pwfile = root_dir / "initdb-pw"
    pwfile.write_text(password + "\n")
    if run_as:
        shutil.chown(root_dir, "postgres", "postgres")
        shutil.chown(pwfile, "postgres", "postgres")
    pwfile.chmod(0o600)
    init = subprocess.run(
        [
            initdb,
            "-D",
            str(data_dir),
            "-U",
            user,
            "--auth=scram-sha-256",
            f"--pwfile={pwfile}",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
            *initdb_args,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        **run_as,
    )
    pwfile.unlink()
    if init.returncode != 0:
        shutil.rmtree(root_dir, ignore_errors=True)
        raise RuntimeError(f"initdb failed: {init.stderr.strip()}")

    _allow_replication(data_dir / "pg_hba.conf")
    password_dir = Path(base_dir) if base_dir is not None else root_dir
    password_file = password_dir / f"pgpass-{os.getpid()}-{time.monotonic_ns()}"
    log = root_dir / "postgres.log"
    last_error: Exception | None = None
    for _attempt in range(3):
        port = free_port()
        password_file.write_text(f"127.0.0.1:{port}:*:{user}:{password}\n")
        password_file.chmod(0o600)
        args = [
            str(postgres),
            "-D",
            str(data_dir),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            f"port={port}",
            "-c",
            f"unix_socket_directories={root_dir}",
            "-c",
            "fsync=off",
            "-c",
            "full_page_writes=off",
        ]
        for name, value in (settings or {}).items():
            args += ["-c", f"{name}={value}"]
        with open(log, "ab") as log_file:
            proc = subprocess.Popen(
                args,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                **run_as,
            )
        try:
            wait_listening(port, proc, log)
            server = PostgresServer(
                host="127.0.0.1",
                port=port,
                user=user,
                password=password,
                password_file=password_file,
                data_dir=data_dir,
                bin_dir=bin_dir,
                root_dir=root_dir,
                process=proc,
                start_args=args,
            )
            _wait_ready(server)
            return server
        except Exception as error:  # port race or slow start: try another port
            last_error = error
            stop_process(proc, 2)
    shutil.rmtree(root_dir, ignore_errors=True)
    raise RuntimeError(f"PostgreSQL did not start: {last_error}")


def _allow_replication(hba: Path) -> None:
    """pg_basebackup needs a ``replication`` entry (as the deployed server gets one); recent
    initdb versions write it already, this makes sure of it."""
    lines = hba.read_text().splitlines()
    if not any(
        line.split()[:4] == ["host", "replication", "all", "127.0.0.1/32"]
        for line in lines
        if line.strip()
    ):
        with open(hba, "a") as handle:
            handle.write("host replication all 127.0.0.1/32 scram-sha-256\n")


def _wait_ready(server: PostgresServer) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            server.psql("SELECT 1")
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


# --------------------------------------------------------------------------- Redis


@dataclass(frozen=True)
class RedisTLSFiles:
    """PEM files for a TLS redis-server and its clients (all signed by ``ca_cert``)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls_files(directory: Path, hostname: str = "localhost") -> RedisTLSFiles:
    """A fresh CA plus server and client certificates (server valid for ``hostname`` and
    127.0.0.1), written under ``directory``."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
        path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        path.chmod(0o600)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rag test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(
        common_name: str, usage: x509.ObjectIdentifier
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if usage == ExtendedKeyUsageOID.SERVER_AUTH:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [
                        x509.DNSName(hostname),
                        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                    ]
                ),
                critical=False,
            )
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = issue(hostname, ExtendedKeyUsageOID.SERVER_AUTH)
    client_cert, client_key = issue("rag test client", ExtendedKeyUsageOID.CLIENT_AUTH)
    files = RedisTLSFiles(
        ca_cert=directory / "ca.crt",
        server_cert=directory / "server.crt",
        server_key=directory / "server.key",
        client_cert=directory / "client.crt",
        client_key=directory / "client.key",
    )
    pem = serialization.Encoding.PEM
    files.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    files.server_cert.write_bytes(server_cert.public_bytes(pem))
    files.client_cert.write_bytes(client_cert.public_bytes(pem))
    write_key(files.server_key, server_key)
    write_key(files.client_key, client_key)
    return files


@dataclass
class RedisServer:
    host: str
    port: int  # the TLS port when ``tls`` is set (plain TCP is then off)
    password: str | None
    data_dir: Path
    config_file: Path
    tls: RedisTLSFiles | None
    process: subprocess.Popen[bytes]
    log_file: Path
    _stopped: bool = field(default=False, repr=False)

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        auth = f":{self.password}@" if self.password else ""
        return f"{scheme}://{auth}{self.host}:{self.port}/0"

    @property
    def url_without_password(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/0"

    def client(self, **kwargs: object) -> object:
        """A redis-py client for this server."""
        import redis

        tls_kwargs: dict[str, object] = {}
        if self.tls:
            tls_kwargs = {
                "ssl": True,
                "ssl_ca_certs": str(self.tls.ca_cert),
                "ssl_certfile": str(self.tls.client_cert),
                "ssl_keyfile": str(self.tls.client_key),
            }
        return redis.Redis(
            host=self.host,
            port=self.port,
            password=self.password,
            socket_timeout=30,
            **tls_kwargs,  # type: ignore[arg-type]
            **kwargs,  # type: ignore[arg-type]
        )

    def stop(self) -> None:
        """SIGTERM: redis flushes its AOF (when on) and saves an RDB only if ``save`` points
        are configured (the generated config has none)."""
        if self._stopped:
            return
        self._stopped = True
        stop_process(self.process, 15)


def start_redis(
    data_dir: Path,
    *,
    password: str | None = "test-redis-password",  # noqa: S107 - a throwaway test server
    tls: RedisTLSFiles | None = None,
    extra_args: Sequence[str] = (),
    config_lines: Sequence[str] = (),
) -> RedisServer:
    """Start redis-server on 127.0.0.1 with its data in ``data_dir`` (created if missing).

    The password goes into a generated config file (never on argv). ``config_lines`` are
    appended to that file; ``extra_args`` are passed as ``--name value`` arguments after it,
    e.g. ``["--appendonly", "yes"]``. With ``tls`` the server listens on TLS only and
    requires client certificates.
    """
    redis_server = require_tool("redis-server")
    data_dir.mkdir(parents=True, exist_ok=True)
    log = data_dir.parent / f"{data_dir.name}-redis.log"
    config_file = data_dir.parent / f"{data_dir.name}-redis.conf"
    last_error: Exception | None = None
    for _attempt in range(3):
        port = free_port()
        lines = [
            "bind 127.0.0.1",
            f"dir {data_dir}",
            'save ""',
            "protected-mode yes",
        ]
        if password:
            lines.append(f"requirepass {password}")
        if tls:
            lines += [
                "port 0",
                f"tls-port {port}",
                f"tls-cert-file {tls.server_cert}",
                f"tls-key-file {tls.server_key}",
                f"tls-ca-cert-file {tls.ca_cert}",
                "tls-auth-clients yes",
            ]
        else:
            lines.append(f"port {port}")
        lines += list(config_lines)
        config_file.write_text("\n".join(lines) + "\n")
        config_file.chmod(0o600)
        with open(log, "ab") as log_handle:
            proc = subprocess.Popen(
                [redis_server, str(config_file), *extra_args],
                stdout=log_handle,
                stderr=subprocess.STDOUT,
            )
        try:
            wait_listening(port, proc, log)
            server = RedisServer(
                host="127.0.0.1",
                port=port,
                password=password,
                data_dir=data_dir,
                config_file=config_file,
                tls=tls,
                process=proc,
                log_file=log,
            )
            _wait_loaded(server)
            return server
        except Exception as error:
            last_error = error
            stop_process(proc, 15)
    raise RuntimeError(f"redis-server did not start: {last_error}")


def _wait_loaded(server: RedisServer) -> None:
    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            info = client.info("persistence")  # type: ignore[attr-defined]
            if not info.get("loading"):
                return
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise RuntimeError("redis-server still loading its data")
        time.sleep(0.05)
