"""Monitoring per stack: Prometheus, Alertmanager (email), node/redis/postgres exporters.

The files (prometheus.yml, alerts.yml, alertmanager.yml) come from the pure renderers in
``monitoring_config``; the SMTP password reaches Alertmanager only as a secret file
(``smtp_auth_password_file``): Alertmanager never expands environment variables.

Networks: Prometheus joins the stack's internal backend (to scrape the api and the
exporters), the frontend (Caddy's metrics listener) and its own ``monitoring`` network,
which is not internal so that the UIs can publish on 127.0.0.1 and Alertmanager can reach
the SMTP server. The exporters stay on the backend only. blackbox_exporter is scraped on
the monitoring network and probes what users reach: Caddy on the frontend, the api and
Redis on the backend. (Caddy itself is declared by AppStack before the monitoring network
exists, so the scrapers join Caddy's network rather than the other way round.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pulumi
import pulumi_docker as docker

from components.app_stack import AppStack
from components.clients import postgres_address, redis_address
from components.config import StackConfig
from components.containers import (
    CONFIG_DIR,
    ConfigFile,
    NetworkAttachment,
    PublishedPort,
    ServiceSpec,
    bind_mount,
    hardened_container,
    stack_volume,
    volume_mount,
)
from components.monitoring_config import (
    ALERT_RULES_FILE,
    ALERTMANAGER_FILE,
    BLACKBOX_FILE,
    HEALTHCHECK_TESTS,
    MONITORING_IMAGES,
    PROBE_TLS_FILES,
    PROMETHEUS_FILE,
    MonitoringSettings,
    render_all,
)
from components.monitoring_render import settings_from_config
from components.redis_tls import RedisTls
from components.service_files import POSTGRES_DB, POSTGRES_MONITOR_USER
from components.stack_secrets import StackSecrets

TEXTFILE_DIR = "/textfile"
# The prom/* images run as nobody.
NOBODY = "65534:65534"


def redis_exporter_password_file(redis_uri: str, password: str) -> str:
    """redis_exporter's --redis.password-file format: JSON, redis URI -> password."""
    return json.dumps({redis_uri: password})


@dataclass(frozen=True)
class MonitoringArgs:
    config: StackConfig
    app: AppStack
    secrets: StackSecrets
    redis_tls: RedisTls


class Monitoring(pulumi.ComponentResource):
    monitoring_network: docker.Network
    textfile_volume: docker.Volume
    settings: MonitoringSettings

    def __init__(
        self, name: str, args: MonitoringArgs, opts: pulumi.ResourceOptions | None = None
    ) -> None:
        super().__init__("personal-rag:index:Monitoring", name, None, opts)
        cfg = args.config
        n = cfg.resource_name
        child = pulumi.ResourceOptions(parent=self)
        self.settings = settings_from_config(cfg)
        files = render_all(self.settings)

        self.monitoring_network = docker.Network(
            n("monitoring"), name=n("monitoring"), driver="bridge", internal=False, opts=child
        )
        backend = NetworkAttachment(args.app.backend_network)
        frontend = NetworkAttachment(args.app.frontend_network)
        monitoring = NetworkAttachment(self.monitoring_network)

        prometheus_data = stack_volume(n("prometheus-data"), self, "metrics", True)
        alertmanager_data = stack_volume(n("alertmanager-data"), self, "alerts", True)
        # Written by the backup job, read by node_exporter's textfile collector.
        self.textfile_volume = stack_volume(n("metrics-textfile"), self, "textfile", False)
        loopback = "127.0.0.1"

        alertmanager = hardened_container(
            n("alertmanager"),
            ServiceSpec(
                service="alertmanager",
                image=MONITORING_IMAGES["alertmanager"],
                command=[
                    f"--config.file={CONFIG_DIR}/{ALERTMANAGER_FILE}",
                    "--storage.path=/alertmanager",
                    "--cluster.listen-address=",  # one instance: no gossip port
                    f"--web.external-url=http://127.0.0.1:{cfg.ports.alertmanager}/",
                ],
                user=NOBODY,
                files_owner=NOBODY,
                networks=[NetworkAttachment(self.monitoring_network, aliases=["alertmanager"])],
                ports=[PublishedPort(9093, cfg.ports.alertmanager, loopback)],
                mounts=[volume_mount(alertmanager_data.name, "/alertmanager")],
                memory_mb=256,
                healthcheck=list(HEALTHCHECK_TESTS["alertmanager"]),
                files=[
                    ConfigFile(ALERTMANAGER_FILE, files[ALERTMANAGER_FILE]),
                    ConfigFile("secrets/smtp_password", cfg.smtp.password.output(), secret=True),
                ],
            ),
            parent=self,
        )

        exporters = self._exporters(args, backend)
        blackbox = self._blackbox(args, files[BLACKBOX_FILE], [monitoring, frontend, backend])
        prometheus = hardened_container(
            n("prometheus"),
            ServiceSpec(
                service="prometheus",
                image=MONITORING_IMAGES["prometheus"],
                command=[
                    f"--config.file={CONFIG_DIR}/{PROMETHEUS_FILE}",
                    "--storage.tsdb.path=/prometheus",
                    "--storage.tsdb.retention.time=30d",
                    f"--web.external-url=http://127.0.0.1:{cfg.ports.prometheus}/",
                ],
                user=NOBODY,
                files_owner=NOBODY,
                networks=[monitoring, backend, frontend],
                ports=[PublishedPort(9090, cfg.ports.prometheus, loopback)],
                mounts=[volume_mount(prometheus_data.name, "/prometheus")],
                memory_mb=1024,
                healthcheck=list(HEALTHCHECK_TESTS["prometheus"]),
                files=[
                    ConfigFile(PROMETHEUS_FILE, files[PROMETHEUS_FILE]),
                    ConfigFile(ALERT_RULES_FILE, files[ALERT_RULES_FILE]),
                ],
            ),
            parent=self,
            depends_on=[alertmanager, *exporters, blackbox],
        )
        self.containers = {
            "prometheus": prometheus,
            "alertmanager": alertmanager,
            "blackbox-exporter": blackbox,
        }
        self.register_outputs(
            {
                "monitoringNetwork": self.monitoring_network.name,
                "textfileVolume": self.textfile_volume.name,
            }
        )

    def _blackbox(
        self, args: MonitoringArgs, config_text: str, networks: list[NetworkAttachment]
    ) -> docker.Container:
        """blackbox_exporter: HTTPS through Caddy, the api's /health, a TLS handshake with
        Redis presenting the probe's own client certificate of the stack's CA."""
        n = args.config.resource_name
        tls = args.redis_tls.clients["blackbox-exporter"]
        return hardened_container(
            n("blackbox-exporter"),
            ServiceSpec(
                service="blackbox-exporter",
                image=MONITORING_IMAGES["blackbox-exporter"],
                command=[f"--config.file={CONFIG_DIR}/{BLACKBOX_FILE}"],
                user=NOBODY,
                files_owner=NOBODY,
                networks=networks,
                memory_mb=64,
                healthcheck=list(HEALTHCHECK_TESTS["blackbox-exporter"]),
                files=[
                    ConfigFile(BLACKBOX_FILE, config_text),
                    ConfigFile(f"tls/{PROBE_TLS_FILES['ca_file']}", args.redis_tls.ca_cert_pem),
                    ConfigFile(f"tls/{PROBE_TLS_FILES['cert_file']}", tls.cert_pem),
                    ConfigFile(f"tls/{PROBE_TLS_FILES['key_file']}", tls.key_pem, secret=True),
                ],
            ),
            parent=self,
        )

    def _exporters(
        self, args: MonitoringArgs, backend: NetworkAttachment
    ) -> list[docker.Container]:
        cfg = args.config
        n = cfg.resource_name
        tls = args.redis_tls.clients["redis-exporter"]
        redis_uri = redis_address(cfg)
        redis_password_file = args.secrets.redis_passwords["exporter"].apply(
            lambda pw: redis_exporter_password_file(redis_uri, pw)
        )
        node = hardened_container(
            n("node-exporter"),
            ServiceSpec(
                service="node-exporter",
                image=MONITORING_IMAGES["node-exporter"],
                command=[
                    "--path.rootfs=/host",
                    f"--collector.textfile.directory={TEXTFILE_DIR}",
                ],
                user=NOBODY,
                networks=[backend],
                # The host's filesystems, read-only, for DiskSpaceLow. As nobody with no
                # capabilities it cannot use anything it sees there (sockets included).
                mounts=[
                    bind_mount("/", "/host", read_only=True),
                    volume_mount(self.textfile_volume.name, TEXTFILE_DIR, read_only=True),
                ],
                memory_mb=128,
                healthcheck=list(HEALTHCHECK_TESTS["node-exporter"]),
            ),
            parent=self,
        )
        redis_exporter = hardened_container(
            n("redis-exporter"),
            ServiceSpec(
                service="redis-exporter",
                image=MONITORING_IMAGES["redis-exporter"],
                command=[
                    f"--redis.addr={redis_uri}",
                    "--redis.user=exporter",
                    f"--redis.password-file={CONFIG_DIR}/secrets/redis_password.json",
                    f"--tls-ca-cert-file={CONFIG_DIR}/tls/ca.crt",
                    f"--tls-client-cert-file={CONFIG_DIR}/tls/client.crt",
                    f"--tls-client-key-file={CONFIG_DIR}/tls/client.key",
                    # Below the 10 s scrape timeout: a hung Redis reads redis_up 0.
                    "--connection-timeout=5s",
                ],
                user=NOBODY,
                files_owner=NOBODY,
                networks=[backend],
                memory_mb=128,
                healthcheck=list(HEALTHCHECK_TESTS["redis-exporter"]),
                files=[
                    ConfigFile("tls/ca.crt", args.redis_tls.ca_cert_pem),
                    ConfigFile("tls/client.crt", tls.cert_pem),
                    ConfigFile("tls/client.key", tls.key_pem, secret=True),
                    ConfigFile(
                        "secrets/redis_password.json",
                        pulumi.Output.secret(redis_password_file),
                        secret=True,
                    ),
                ],
            ),
            parent=self,
            depends_on=[args.app.containers["redis"]],
        )
        postgres_exporter = hardened_container(
            n("postgres-exporter"),
            ServiceSpec(
                service="postgres-exporter",
                image=MONITORING_IMAGES["postgres-exporter"],
                user=NOBODY,
                files_owner=NOBODY,
                env={
                    "DATA_SOURCE_URI": f"{postgres_address(cfg)}/{POSTGRES_DB}?sslmode=disable",
                    "DATA_SOURCE_USER": POSTGRES_MONITOR_USER,
                    "DATA_SOURCE_PASS_FILE": f"{CONFIG_DIR}/secrets/postgres_password",
                },
                networks=[backend],
                memory_mb=128,
                healthcheck=list(HEALTHCHECK_TESTS["postgres-exporter"]),
                files=[
                    ConfigFile(
                        "secrets/postgres_password",
                        args.secrets.postgres_monitor_password,
                        secret=True,
                    ),
                ],
            ),
            parent=self,
            depends_on=[args.app.containers["postgres"]],
        )
        return [node, redis_exporter, postgres_exporter]
