"""A real probing pipeline on loopback, for the probe end-to-end test and the benchmark.

redis-server (TLS only, client certificates required) whose server certificate expires in
a chosen number of days, and an HTTPS "site" whose status the test switches (200/500), are
probed by the real prometheus-blackbox-exporter running the rendered blackbox.yml with the
probe's own client certificate. node_exporter's textfile collector reads the backup
scheduler's metrics, written by the scheduler's own function. Prometheus and Alertmanager
run the rendered files and mail an aiosmtpd sink that requires AUTH.

Docker names are replaced by 127.0.0.1 ports through ``targets`` and ``probe_targets``;
nothing else in the rendered files changes.
"""

from __future__ import annotations

import datetime as dt
import http.server
import ipaddress
import logging
import secrets
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from components.monitoring_config import (
    JOB_ALERTMANAGER,
    JOB_BLACKBOX,
    JOB_NODE,
    JOB_PROMETHEUS,
    PROBE_REDIS,
    PROBE_SITE,
    PROBE_TLS_FILES,
    MonitoringSettings,
    render_all,
)
from tests.monitoring.live import (
    LiveMonitoring,
    Process,
    SmtpSink,
    alerting_processes,
    start_pipeline,
)
from tests.servers import free_port
from tests.tooling import require_tool

DOMAIN = "staging.api.example.com"
SITE_CERT_DAYS = 60


# --------------------------------------------------------------------------- certificates


@dataclass(frozen=True)
class ProbeCerts:
    ca: Path
    redis_cert: Path
    redis_key: Path
    site_cert: Path
    site_key: Path
    probe_dir: Path  # ca.crt, client.crt, client.key as the blackbox container gets them
    # A second Redis server pair expiring in ``spare_days``, to swap in (benchmark).
    spare_redis_cert: Path
    spare_redis_key: Path


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def make_probe_certs(directory: Path, redis_days: float, spare_days: float = 5) -> ProbeCerts:
    """A CA; a Redis server certificate valid ``redis_days`` more days (and a spare one
    valid ``spare_days``); the probe's client certificate; the site's certificate for
    DOMAIN (valid SITE_CERT_DAYS)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "probe test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def issue(
        name: str, days: float, usage: x509.ObjectIdentifier, sans: Sequence[x509.GeneralName]
    ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    loopback = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    server = ExtendedKeyUsageOID.SERVER_AUTH
    redis_cert, redis_key = issue("rag-staging-redis", redis_days, server, loopback)
    spare_cert, spare_key = issue("rag-staging-redis", spare_days, server, loopback)
    site_cert, site_key = issue(DOMAIN, SITE_CERT_DAYS, server, [x509.DNSName(DOMAIN)])
    client_cert, client_key = issue(
        "rag-staging-blackbox-exporter", 90, ExtendedKeyUsageOID.CLIENT_AUTH, []
    )

    def pem(cert: x509.Certificate) -> bytes:
        return cert.public_bytes(serialization.Encoding.PEM)

    probe_dir = directory / "probe"
    probe_dir.mkdir(exist_ok=True)
    (probe_dir / PROBE_TLS_FILES["ca_file"]).write_bytes(pem(ca))
    (probe_dir / PROBE_TLS_FILES["cert_file"]).write_bytes(pem(client_cert))
    _write_key(probe_dir / PROBE_TLS_FILES["key_file"], client_key)
    paths = ProbeCerts(
        ca=directory / "ca.crt",
        redis_cert=directory / "redis.crt",
        redis_key=directory / "redis.key",
        site_cert=directory / "site.crt",
        site_key=directory / "site.key",
        probe_dir=probe_dir,
        spare_redis_cert=directory / "redis-spare.crt",
        spare_redis_key=directory / "redis-spare.key",
    )
    paths.spare_redis_cert.write_bytes(pem(spare_cert))
    _write_key(paths.spare_redis_key, spare_key)
    paths.ca.write_bytes(pem(ca))
    paths.redis_cert.write_bytes(pem(redis_cert))
    _write_key(paths.redis_key, redis_key)
    paths.site_cert.write_bytes(pem(site_cert))
    _write_key(paths.site_key, site_key)
    return paths


# --------------------------------------------------------------------------- the site


class Site:
    """An HTTPS server answering GET /health with ``status`` (switchable)."""

    def __init__(self, port: int, certs: ProbeCerts) -> None:
        self.status = 200
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = b"ok\n" if site.status < 400 else b"failing\n"
                self.send_response(site.status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request: object, client_address: object) -> None:
                pass  # a probe cut off at shutdown is not news

        self.server = Server(("127.0.0.1", port), Handler)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(certs.site_cert, certs.site_key)
        self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --------------------------------------------------------------------------- the pipeline


@dataclass
class ProbePipeline:
    live: LiveMonitoring  # processes, sink, queries, mail waits
    site: Site
    textfile_dir: Path
    ports: dict[str, int]
    certs: ProbeCerts

    def swap_redis_certificates(self) -> None:
        """Exchange Redis's server pair with the spare one and restart Redis: what a
        missed (or a done) renewal looks like to the probe."""
        c = self.certs
        for live, spare in ((c.redis_cert, c.spare_redis_cert), (c.redis_key, c.spare_redis_key)):
            held = live.read_bytes()
            live.write_bytes(spare.read_bytes())
            spare.write_bytes(held)
        self.live.stop_redis()
        self.live.start_redis()

    def close(self) -> None:
        self.live.close()
        self.site.close()


PORT_NAMES = ("redis", "site", "blackbox", "node", "prometheus", "alertmanager", "smtp")


def start_probe_pipeline(
    root: Path,
    redis_cert_days: float,
    make_settings: Callable[[dict[str, int], str, Path], MonitoringSettings],
    spare_redis_cert_days: float = 5,
) -> ProbePipeline:
    """Start everything under ``root``; ``make_settings(ports, smtp_password_file,
    probe_tls_dir)`` builds the settings the files are rendered from."""
    binaries = {
        "redis": require_tool("redis-server"),
        "blackbox": require_tool("prometheus-blackbox-exporter"),
        "node": require_tool("prometheus-node-exporter"),
        "prometheus": require_tool("prometheus"),
        "alertmanager": require_tool("prometheus-alertmanager"),
    }
    root.mkdir(parents=True, exist_ok=True)
    ports: dict[str, int] = {}
    while len(set(ports.values())) < len(PORT_NAMES):
        ports = {name: free_port() for name in PORT_NAMES}
    secrets_dir = root / "secrets"
    secrets_dir.mkdir(mode=0o700, exist_ok=True)
    smtp_password = secrets.token_urlsafe(18)
    password_file = secrets_dir / "smtp_password"
    password_file.write_text(smtp_password)
    password_file.chmod(0o600)

    certs = make_probe_certs(root / "tls", redis_cert_days, spare_redis_cert_days)
    monitoring = make_settings(ports, str(password_file), certs.probe_dir)
    config_dir = root / "config"
    config_dir.mkdir(exist_ok=True)
    for name, text in render_all(monitoring).items():
        (config_dir / name).write_text(text)
    textfile_dir = root / "textfile"
    textfile_dir.mkdir(exist_ok=True)

    redis_conf = root / "redis.conf"
    redis_conf.write_text(
        "\n".join(
            [
                "bind 127.0.0.1",
                "port 0",
                f"tls-port {ports['redis']}",
                f"tls-cert-file {certs.redis_cert}",
                f"tls-key-file {certs.redis_key}",
                f"tls-ca-cert-file {certs.ca}",
                "tls-auth-clients yes",
                'save ""',
                "appendonly no",
                f"dir {root}",
            ]
        )
        + "\n"
    )
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    processes = {
        "redis": Process("redis-server", [binaries["redis"], str(redis_conf)], logs / "redis.log"),
        "blackbox": Process(
            "blackbox_exporter",
            [
                binaries["blackbox"],
                f"--config.file={config_dir / 'blackbox.yml'}",
                f"--web.listen-address=127.0.0.1:{ports['blackbox']}",
            ],
            logs / "blackbox.log",
        ),
        "node": Process(
            "node_exporter",
            [
                binaries["node"],
                "--collector.disable-defaults",
                "--collector.textfile",
                f"--collector.textfile.directory={textfile_dir}",
                f"--web.listen-address=127.0.0.1:{ports['node']}",
            ],
            logs / "node.log",
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
    site = Site(ports["site"], certs)
    pipeline = ProbePipeline(
        live=live, site=site, textfile_dir=textfile_dir, ports=ports, certs=certs
    )
    logging.getLogger("mail.log").setLevel(logging.ERROR)
    try:
        start_pipeline(
            live,
            {
                "blackbox": f"http://127.0.0.1:{ports['blackbox']}/-/healthy",
                "node": f"http://127.0.0.1:{ports['node']}/metrics",
                "alertmanager": f"http://127.0.0.1:{ports['alertmanager']}/-/ready",
                "prometheus": f"http://127.0.0.1:{ports['prometheus']}/-/ready",
            },
        )
        return pipeline
    except BaseException:
        pipeline.close()
        raise


def pipeline_targets(ports: dict[str, int]) -> dict[str, str]:
    return {
        JOB_PROMETHEUS: f"127.0.0.1:{ports['prometheus']}",
        JOB_ALERTMANAGER: f"127.0.0.1:{ports['alertmanager']}",
        JOB_BLACKBOX: f"127.0.0.1:{ports['blackbox']}",
        JOB_NODE: f"127.0.0.1:{ports['node']}",
    }


def pipeline_probe_targets(ports: dict[str, int]) -> dict[str, str]:
    return {
        PROBE_SITE: f"https://127.0.0.1:{ports['site']}/health",
        PROBE_REDIS: f"127.0.0.1:{ports['redis']}",
    }
