"""A real monitoring pipeline on loopback, for the end-to-end test and the latency benchmark.

redis-server (TLS, client certificates, password) <- prometheus-redis-exporter (the same TLS
flags the container uses) <- Prometheus running the rendered prometheus.yml and alerts.yml
-> Alertmanager running the rendered alertmanager.yml -> an aiosmtpd sink that requires
AUTH and checks the password Alertmanager read from its password file.

The Docker names of the stack are replaced by 127.0.0.1 ports through ``targets``; nothing
else in the rendered files changes. Every process is started here and stopped in ``close``.
"""

from __future__ import annotations

import email
import email.policy
import json
import logging
import os
import secrets
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from components.monitoring_config import (
    JOB_ALERTMANAGER,
    JOB_PROMETHEUS,
    JOB_REDIS,
    MonitoringSettings,
    render_all,
)
from tests.servers import free_port, log_tail, make_tls_files
from tests.tooling import require_tool

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
SMTP_USERNAME = "alerts@example.com"


def _http_get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (loopback)
            return int(response.status), response.read()
    except urllib.error.HTTPError as error:
        return int(error.code), b""


# --------------------------------------------------------------------------- SMTP sink


@dataclass(frozen=True)
class ReceivedMail:
    subject: str
    recipients: tuple[str, ...]
    login: str
    password: str
    received_at: float  # time.monotonic()
    body: str


@dataclass
class SmtpSink:
    """Handler for aiosmtpd: accepts mail only from a client that authenticated."""

    username: str
    password: str
    messages: list[ReceivedMail] = field(default_factory=list)
    failed_logins: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        if not isinstance(auth_data, LoginPassword):
            return AuthResult(success=False, handled=False)
        login = auth_data.login.decode(errors="replace")
        ok = login == self.username and secrets.compare_digest(
            auth_data.password, self.password.encode()
        )
        if not ok:
            with self.lock:
                self.failed_logins.append(f"{mechanism} as {login!r}")
        return AuthResult(success=ok, auth_data=auth_data)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.content
        raw = content if isinstance(content, bytes) else str(content).encode()
        message = email.message_from_bytes(raw, policy=email.policy.default)
        body_part = message.get_body(preferencelist=("plain", "html"))
        auth = session.auth_data if isinstance(session.auth_data, LoginPassword) else None
        mail = ReceivedMail(
            subject=str(message["Subject"]),
            recipients=tuple(envelope.rcpt_tos),
            login=auth.login.decode() if auth else "",
            password=auth.password.decode() if auth else "",
            received_at=time.monotonic(),
            body=body_part.get_content() if body_part is not None else "",
        )
        with self.lock:
            self.messages.append(mail)
        return "250 OK"

    def snapshot(self) -> list[ReceivedMail]:
        with self.lock:
            return list(self.messages)


class _StandardLoginSMTP(SMTP):
    """aiosmtpd with the AUTH LOGIN prompts real servers send (Postfix, Gmail).

    aiosmtpd's defaults ("User Name\\0", "Password\\0") are not recognised by Alertmanager's
    LOGIN client, which then aborts the exchange and retries forever.
    """

    AuthLoginUsernameChallenge = "Username:"
    AuthLoginPasswordChallenge = "Password:"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        with warnings.catch_warnings():
            # AUTH without TLS is deliberate: loopback only, as Alertmanager's require_tls off.
            warnings.simplefilter("ignore", UserWarning)
            super().__init__(*args, **kwargs)


class SinkController(Controller):
    def factory(self) -> SMTP:
        return _StandardLoginSMTP(self.handler, **self.SMTP_kwargs)


# --------------------------------------------------------------------------- processes


@dataclass
class Process:
    name: str
    args: list[str]
    log: Path
    extra_env: dict[str, str] = field(default_factory=dict)  # never secrets
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **self.extra_env}
        with open(self.log, "ab") as log:
            self.popen = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT, env=env)

    def stop(self) -> None:
        proc = self.popen
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT_S)

    def check_running(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            code = None if self.popen is None else self.popen.returncode
            raise RuntimeError(f"{self.name} is not running (exit {code}):\n{log_tail(self.log)}")


def wait_until(
    condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.1
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


def _http_ok(url: str) -> bool:
    try:
        return _http_get(url, timeout=1.0)[0] == 200
    except OSError:
        return False


# --------------------------------------------------------------------------- the pipeline


@dataclass
class LiveMonitoring:
    """Everything running; use ``start_live_monitoring`` and always ``close()``."""

    root: Path
    settings: MonitoringSettings
    sink: SmtpSink
    smtp_password: str
    processes: dict[str, Process]
    ports: dict[str, int]
    controller: SinkController | None = None

    # ---- control
    def stop_redis(self) -> None:
        self.processes["redis"].stop()

    def start_redis(self) -> None:
        redis = self.processes["redis"]
        redis.start()
        wait_until(
            lambda: _port_open(self.ports["redis"]), START_TIMEOUT_S, "redis-server to listen"
        )

    def close(self) -> None:
        for process in reversed(list(self.processes.values())):
            process.stop()
        if self.controller is not None:
            self.controller.stop()
            self.controller = None

    # ---- observation
    def query(self, promql: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.ports['prometheus']}/api/v1/query?" + urllib.parse.urlencode(
            {"query": promql}
        )
        status, body = _http_get(url)
        if status != 200:
            return []
        return list(json.loads(body)["data"]["result"])

    def wait_quiet(self, alert: str, quiet_for: float, timeout: float) -> None:
        """Wait until ``alert`` has been neither pending nor firing for ``quiet_for`` seconds."""
        deadline = time.monotonic() + timeout
        quiet_since: float | None = None
        while time.monotonic() < deadline:
            active = self.query(f'ALERTS{{alertname="{alert}"}}')
            now = time.monotonic()
            quiet_since = None if active else (quiet_since or now)
            if quiet_since is not None and now - quiet_since >= quiet_for:
                return
            time.sleep(0.2)
        raise TimeoutError(f"{alert} kept firing for {timeout:.0f}s on a healthy pipeline")

    def log(self, name: str) -> str:
        return log_tail(self.processes[name].log)

    def wait_for_mail(
        self, predicate: Callable[[ReceivedMail], bool], timeout: float, what: str
    ) -> ReceivedMail:
        """The first received mail matching ``predicate``; on timeout the error carries the
        Alertmanager log, what the sink saw and Prometheus's alert state."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for mail in self.sink.snapshot():
                if predicate(mail):
                    return mail
            for name in ("prometheus", "alertmanager"):
                self.processes[name].check_running()
            time.sleep(0.05)
        subjects = [m.subject for m in self.sink.snapshot()]
        raise AssertionError(
            f"no {what} email within {timeout:.0f}s.\n"
            f"mails received: {subjects}\nfailed SMTP logins: {self.sink.failed_logins}\n"
            f"ALERTS in Prometheus: {self.query('ALERTS')}\n"
            f"--- Alertmanager log ---\n{self.log('alertmanager')}"
        )


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def pipeline_targets(ports: dict[str, int]) -> dict[str, str]:
    """The jobs the live pipeline runs, on loopback ports."""
    return {
        JOB_PROMETHEUS: f"127.0.0.1:{ports['prometheus']}",
        JOB_ALERTMANAGER: f"127.0.0.1:{ports['alertmanager']}",
        JOB_REDIS: f"127.0.0.1:{ports['redis-exporter']}",
    }


def allocate_ports() -> dict[str, int]:
    names = ("redis", "redis-exporter", "prometheus", "alertmanager", "smtp")
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(names):
        ports = {name: free_port() for name in names}
    return ports


def alerting_processes(
    binaries: dict[str, str], config_dir: Path, root: Path, ports: dict[str, int]
) -> dict[str, Process]:
    """Prometheus and Alertmanager on loopback with the rendered files in ``config_dir``
    (logs in ``root/logs``): the part every live pipeline shares."""
    logs = root / "logs"
    return {
        "alertmanager": Process(
            "alertmanager",
            [
                binaries["alertmanager"],
                f"--config.file={config_dir / 'alertmanager.yml'}",
                f"--storage.path={root / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{ports['alertmanager']}",
                "--cluster.listen-address=",
                "--log.level=debug",
            ],
            logs / "alertmanager.log",
        ),
        "prometheus": Process(
            "prometheus",
            [
                binaries["prometheus"],
                f"--config.file={config_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={root / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{ports['prometheus']}",
            ],
            logs / "prometheus.log",
        ),
    }


def start_live_monitoring(
    root: Path, make_settings: Callable[[dict[str, int], str], MonitoringSettings]
) -> LiveMonitoring:
    """Start the pipeline under ``root``. ``make_settings(ports, password_file)`` builds the
    settings the files are rendered from (the test decides intervals and overrides)."""
    binaries = {
        "redis": require_tool("redis-server"),
        "redis-exporter": require_tool("prometheus-redis-exporter"),
        "prometheus": require_tool("prometheus"),
        "alertmanager": require_tool("prometheus-alertmanager"),
    }
    root.mkdir(parents=True, exist_ok=True)
    ports = allocate_ports()
    secrets_dir = root / "secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)

    # SMTP password file, as the Monitoring component uploads it: no trailing newline,
    # because Alertmanager before 0.27 sends the file's bytes untrimmed.
    smtp_password = secrets.token_urlsafe(18)
    smtp_password_file = secrets_dir / "smtp_password"
    smtp_password_file.write_text(smtp_password)
    smtp_password_file.chmod(0o600)

    monitoring = make_settings(ports, str(smtp_password_file))
    config_dir = root / "config"
    config_dir.mkdir(exist_ok=True)
    for name, text in render_all(monitoring).items():
        (config_dir / name).write_text(text)

    # Redis over TLS only, client certificates required, with a password: as on the stack.
    tls = make_tls_files(root / "tls")
    redis_password = secrets.token_urlsafe(18)
    redis_conf = secrets_dir / "redis.conf"
    redis_conf.write_text(
        "\n".join(
            [
                "bind 127.0.0.1",
                "port 0",
                f"tls-port {ports['redis']}",
                f"tls-cert-file {tls.server_cert}",
                f"tls-key-file {tls.server_key}",
                f"tls-ca-cert-file {tls.ca_cert}",
                "tls-auth-clients yes",
                f"requirepass {redis_password}",
                'save ""',
                "appendonly no",
                f"dir {root}",
            ]
        )
        + "\n"
    )
    redis_conf.chmod(0o600)
    redis_url = f"rediss://127.0.0.1:{ports['redis']}"
    # redis_exporter's --redis.password-file is a JSON map of redis URL -> password.
    exporter_passwords = secrets_dir / "redis_passwords.json"
    exporter_passwords.write_text(json.dumps({redis_url: redis_password}))
    exporter_passwords.chmod(0o600)

    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    processes = {
        "redis": Process("redis-server", [binaries["redis"], str(redis_conf)], logs / "redis.log"),
        "redis-exporter": Process(
            "redis_exporter",
            [
                binaries["redis-exporter"],
                f"--redis.addr={redis_url}",
                f"--redis.password-file={exporter_passwords}",
                f"--tls-client-cert-file={tls.client_cert}",
                f"--tls-client-key-file={tls.client_key}",
                f"--tls-ca-cert-file={tls.ca_cert}",
                f"--web.listen-address=127.0.0.1:{ports['redis-exporter']}",
                # Below the scrape timeout, so a hung connection reports redis_up 0.
                "--connection-timeout=500ms",
            ],
            logs / "redis-exporter.log",
        ),
        **alerting_processes(binaries, config_dir, root, ports),
    }
    sink = SmtpSink(username=monitoring.smtp_username, password=smtp_password)
    live = LiveMonitoring(
        root=root,
        settings=monitoring,
        sink=sink,
        smtp_password=smtp_password,
        processes=processes,
        ports=ports,
    )
    # aiosmtpd logs a warning per connection for AUTH without TLS and for its own use of a
    # deprecated attribute; both are expected here and drown the useful output.
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    try:
        start_pipeline(
            live,
            {
                "redis-exporter": f"http://127.0.0.1:{ports['redis-exporter']}/health",
                "alertmanager": f"http://127.0.0.1:{ports['alertmanager']}/-/ready",
                "prometheus": f"http://127.0.0.1:{ports['prometheus']}/-/ready",
            },
        )
        return live
    except BaseException:
        live.close()
        raise


def start_pipeline(live: LiveMonitoring, ready_urls: dict[str, str]) -> None:
    """The SMTP sink, Redis, then each process in ``ready_urls`` order, waited ready."""
    controller = SinkController(
        live.sink,
        hostname="127.0.0.1",
        port=live.ports["smtp"],
        authenticator=live.sink.authenticate,
        auth_required=True,
        auth_require_tls=False,  # loopback only; Alertmanager runs with require_tls off
    )
    controller.start()
    live.controller = controller
    live.start_redis()
    for name, url in ready_urls.items():
        process = live.processes[name]
        process.start()

        def ready(process: Process = process, url: str = url) -> bool:
            process.check_running()
            return _http_ok(url)

        wait_until(ready, START_TIMEOUT_S, f"{name} to be ready")
