"""One stack's monitoring configuration as plain data: Prometheus, alert rules, Alertmanager.

Everything here is pure: ``MonitoringSettings`` (frozen) in, dicts out, dumped with PyYAML.
No Pulumi import, so the files can be rendered and linted in a PR (``monitoring_render``)
and the exact same data is what the ``Monitoring`` component uploads.

Alertmanager never expands environment variables in its config, so the SMTP password is
never in these files: ``smtp_auth_password_file`` points to a secret file mounted into the
container (Alertmanager >= 0.27 trims its trailing newline; 0.25 supports the key but sends
the file's bytes as they are).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml

from components.images import image

# --- Images and healthchecks -------------------------------------------------------------
# Exact tags and digests live in components/images.py (docs/monitoring.md explains the
# choices). The prom/* and postgres-exporter images are busybox-based: wget exists, curl
# does not. redis_exporter's default image is FROM scratch (no shell, no wget), so the
# -alpine variant is pinned for its healthcheck.
MONITORING_IMAGES: Mapping[str, str] = MappingProxyType(
    {
        service: image(service)
        for service in (
            "prometheus",
            "alertmanager",
            "node-exporter",
            "redis-exporter",
            "postgres-exporter",
            "blackbox-exporter",
        )
    }
)

# In-network ports of the monitoring services (common naming brief).
SERVICE_PORTS: Mapping[str, int] = MappingProxyType(
    {
        "api": 8000,
        "prometheus": 9090,
        "alertmanager": 9093,
        "node-exporter": 9100,
        "redis-exporter": 9121,
        "postgres-exporter": 9187,
        "blackbox-exporter": 9115,
        # Caddy's Prometheus metrics listener (plain HTTP, never published on the host).
        "caddy-metrics": 2020,
    }
)

# The path each healthcheck fetches: a cheap endpoint that answers 200 when the process serves.
HEALTHCHECK_PATHS: Mapping[str, str] = MappingProxyType(
    {
        "prometheus": "/-/healthy",
        "alertmanager": "/-/healthy",
        "node-exporter": "/",
        "redis-exporter": "/health",
        "postgres-exporter": "/",
        "blackbox-exporter": "/-/healthy",
    }
)


def healthcheck_test(service: str, port: int | None = None) -> list[str]:
    """Docker healthcheck ``test`` for ``service``: busybox/GNU wget, exit 0 only on HTTP 2xx.

    ``port`` defaults to the in-network port; tests pass a free loopback port.
    """
    if service not in HEALTHCHECK_PATHS:
        raise MonitoringConfigError(
            [
                f"healthcheck service {service!r} is unknown; expected one of "
                f"{', '.join(HEALTHCHECK_PATHS)}"
            ]
        )
    listen_port = SERVICE_PORTS[service] if port is None else port
    url = f"http://127.0.0.1:{listen_port}{HEALTHCHECK_PATHS[service]}"
    return ["CMD", "wget", "-q", "-O", "/dev/null", url]


HEALTHCHECK_TESTS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {service: tuple(healthcheck_test(service)) for service in HEALTHCHECK_PATHS}
)

# --- Scrape jobs ---------------------------------------------------------------------------
# Job names are the service names; alert expressions select on them.
JOB_API = "api"
JOB_PROMETHEUS = "prometheus"
JOB_ALERTMANAGER = "alertmanager"
JOB_NODE = "node-exporter"
JOB_REDIS = "redis-exporter"
JOB_POSTGRES = "postgres-exporter"
JOB_BLACKBOX = "blackbox-exporter"
JOB_CADDY = "caddy"
SCRAPE_JOBS: tuple[str, ...] = (
    JOB_PROMETHEUS,
    JOB_ALERTMANAGER,
    JOB_API,
    JOB_NODE,
    JOB_REDIS,
    JOB_POSTGRES,
    JOB_BLACKBOX,
    JOB_CADDY,
)
# job -> (service, port key): where the job's /metrics lives on the stack network.
_JOB_ENDPOINTS: Mapping[str, tuple[str, str]] = MappingProxyType(
    {job: (job, job) for job in SCRAPE_JOBS} | {JOB_CADDY: ("caddy", "caddy-metrics")}
)

# Blackbox probes: job -> module. Each job scrapes blackbox_exporter's /probe for one target.
PROBE_SITE = "probe-site"  # https://<domain>/health through Caddy, as a user reaches it
PROBE_API = "probe-api"  # the api's /health directly: tells Caddy from the api apart
PROBE_REDIS = "probe-redis"  # TLS handshake with Redis, presenting the probe's client cert
PROBE_MODULES: Mapping[str, str] = MappingProxyType(
    {PROBE_SITE: "https_site", PROBE_API: "http_api", PROBE_REDIS: "tls_redis"}
)
HTTP_PROBES = (PROBE_SITE, PROBE_API)
CADDY_HTTPS_PORT = 443
PROBE_TIMEOUT = "5s"
# Files of the probe's Redis client identity, under ``probe_tls_dir``.
PROBE_TLS_FILES: Mapping[str, str] = MappingProxyType(
    {"ca_file": "ca.crt", "cert_file": "client.crt", "key_file": "client.key"}
)

RUNBOOKS_PATH = "docs/runbooks.md"
DEFAULT_SMTP_PASSWORD_FILE = "/etc/alertmanager/secrets/smtp_password"  # noqa: S105 (a path)
DEFAULT_PROBE_TLS_DIR = "/etc/blackbox/tls"
DOCKER_VOLUMES_DIR = "/var/lib/docker/volumes"
ALERT_RULES_FILE = "alerts.yml"
PROMETHEUS_FILE = "prometheus.yml"
ALERTMANAGER_FILE = "alertmanager.yml"
BLACKBOX_FILE = "blackbox.yml"


def default_targets(stack: str) -> dict[str, str]:
    """Scrape targets on the stack's Docker network: ``rag-<stack>-<service>:<port>``."""
    return {
        job: f"rag-{stack}-{service}:{SERVICE_PORTS[port]}"
        for job, (service, port) in _JOB_ENDPOINTS.items()
    }


def default_probe_targets(stack: str, redis_port: int | None = None) -> dict[str, str]:
    """What each probe checks. The site probe dials Caddy by its container name and sends
    the public name as SNI and Host (blackbox module), so it needs no public DNS. Redis is
    probed when its port is given (it lives with the clients, service_files.REDIS_PORT)."""
    targets = {
        PROBE_SITE: f"https://rag-{stack}-caddy:{CADDY_HTTPS_PORT}/health",
        PROBE_API: f"http://rag-{stack}-api:{SERVICE_PORTS['api']}/health",
    }
    if redis_port is not None:
        targets[PROBE_REDIS] = f"rag-{stack}-redis:{redis_port}"
    return targets


# Volumes whose filesystem is watched for filling up: name -> Docker volume suffix.
WATCHED_VOLUMES: Mapping[str, str] = MappingProxyType(
    {"backups": "backups", "postgres": "postgres-data", "redis": "redis-data"}
)


def default_volume_paths(stack: str) -> dict[str, str]:
    """Host paths of the watched volumes under Docker's default data root."""
    return {
        volume: f"{DOCKER_VOLUMES_DIR}/rag-{stack}-{suffix}/_data"
        for volume, suffix in WATCHED_VOLUMES.items()
    }


# --- Alerts ---------------------------------------------------------------------------------
# page: mailed at once (someone acts now); ticket: collected into one digest mail a day.
SEVERITY_PAGE = "page"
SEVERITY_TICKET = "ticket"
SEVERITY_NONE = "none"


@dataclass(frozen=True)
class AlertSpec:
    """The fixed part of an alert; its expression is built from settings by ``_expression``."""

    name: str
    group: str
    severity: str
    for_duration: str
    summary: str
    description: str
    labels: Mapping[str, str] = field(default_factory=dict)


# --- SLOs -----------------------------------------------------------------------------------
# Prometheus client's default histogram buckets, which Caddy uses for
# caddy_http_request_duration_seconds: a latency threshold must be one of them, or the
# "requests under the threshold" count does not exist.
CADDY_DURATION_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0
)  # fmt: skip


@dataclass(frozen=True)
class BurnWindow:
    """One multiwindow burn-rate alert (SRE workbook, ch. 5): the budget burns ``factor``
    times too fast over both the long and the short window."""

    name: str  # "fast" / "slow"
    long: str
    short: str
    factor: float
    severity: str
    for_duration: str


BURN_WINDOWS: tuple[BurnWindow, ...] = (
    # 2% of a 30-day budget in 1 hour.
    BurnWindow("fast", "1h", "5m", 14.4, SEVERITY_PAGE, "2m"),
    # 5% of a 30-day budget in 6 hours.
    BurnWindow("slow", "6h", "30m", 6.0, SEVERITY_TICKET, "15m"),
)


@dataclass(frozen=True)
class SloKind:
    """An SLO of the api, measured at Caddy (what users get, 502s of a dead api included)."""

    name: str  # label value slo="..."
    alert_prefix: str
    what: str


SLO_KINDS: tuple[SloKind, ...] = (
    SloKind("availability", "APIErrorBudget", "requests answered without a 5xx"),
    SloKind("latency", "APILatencyBudget", "requests answered under the latency threshold"),
)


def burn_alert_name(kind: SloKind, window: BurnWindow) -> str:
    return f"{kind.alert_prefix}{window.name.title()}Burn"


def _burn_alert_specs() -> tuple[AlertSpec, ...]:
    specs = []
    for kind in SLO_KINDS:
        for window in BURN_WINDOWS:
            specs.append(
                AlertSpec(
                    burn_alert_name(kind, window),
                    "slo",
                    window.severity,
                    window.for_duration,
                    f"The api burns its {kind.name} error budget {window.factor:g}x too fast",
                    f"Over the last {window.long} and {window.short} the share of bad requests "
                    f"(not {kind.what}) is above {window.factor:g} times the error budget "
                    "of the SLO: at this pace the 30-day budget is gone in "
                    f"{30 / window.factor:.1f} days.",
                    labels={"slo": kind.name, "burn": window.name},
                )
            )
    return tuple(specs)


ALERTS: tuple[AlertSpec, ...] = (
    AlertSpec(
        "Watchdog",
        "meta",
        SEVERITY_NONE,
        "0s",
        "Always firing: proves the alerting pipeline works",
        "Fires all the time. If the heartbeat receiver stops hearing it, Prometheus, "
        "Alertmanager or the host is down.",
    ),
    AlertSpec(
        "TargetDown",
        "availability",
        SEVERITY_TICKET,
        "5m",
        "Scrape target {{ $labels.job }} ({{ $labels.instance }}) is down",
        "Prometheus could not scrape {{ $labels.instance }} (job {{ $labels.job }}) for 5 minutes.",
    ),
    AlertSpec(
        "APIDown",
        "availability",
        SEVERITY_PAGE,
        "2m",
        "The RAG API is down",
        "The api's /metrics endpoint has not been scraped successfully for 2 minutes "
        "(target unreachable, failing, or missing).",
    ),
    AlertSpec(
        "RedisDown",
        "availability",
        SEVERITY_PAGE,
        "1m",
        "Redis is down",
        "redis_up is 0 or missing for 1 minute: Redis refused the exporter, or the exporter "
        "itself could not be scraped in time.",
    ),
    AlertSpec(
        "PostgresDown",
        "availability",
        SEVERITY_PAGE,
        "1m",
        "PostgreSQL is down",
        "pg_up is 0 or missing for 1 minute: PostgreSQL refused the exporter, or the exporter "
        "itself could not be scraped in time.",
    ),
    AlertSpec(
        "HighErrorRate",
        "application",
        SEVERITY_PAGE,
        "5m",
        "{{ $value | humanizePercentage }} of API requests fail with 5xx",
        "The share of HTTP 5xx responses of the api over 5 minutes is "
        "{{ $value | humanizePercentage }}.",
    ),
    AlertSpec(
        "HighLatency",
        "application",
        SEVERITY_TICKET,
        "10m",
        "API p95 latency is {{ $value | humanizeDuration }}",
        "The 95th percentile of API request duration over 5 minutes is "
        "{{ $value | humanizeDuration }}.",
    ),
    AlertSpec(
        "CacheHitRateLow",
        "application",
        SEVERITY_TICKET,
        "30m",
        "Cache hit rate is {{ $value | humanizePercentage }}",
        "Fewer than half of the cache lookups over 15 minutes were hits.",
    ),
    AlertSpec(
        "LLMErrorsHigh",
        "application",
        SEVERITY_TICKET,
        "10m",
        'LLM calls fail {{ $value | printf "%.1f" }} times a minute',
        "The api's LLM error counter grew faster than the threshold over 5 minutes.",
    ),
    AlertSpec(
        "DiskSpaceLow",
        "resources",
        SEVERITY_TICKET,
        "10m",
        'Host disk {{ $labels.mountpoint }} is {{ $value | printf "%.0f" }}% full',
        "Filesystem {{ $labels.device }} mounted at {{ $labels.mountpoint }} on the host "
        "is more than the threshold full.",
    ),
    AlertSpec(
        "BackupTooOld",
        "backups",
        SEVERITY_TICKET,
        "15m",
        "No recent successful backup ({{ $labels.component }})",
        "The last successful backup is older than the allowed age, or no backup metrics "
        "exist at all (backup never ran, or the textfile collector does not see them).",
    ),
    AlertSpec(
        "RestoreDrillFailed",
        "backups",
        SEVERITY_TICKET,
        "5m",
        "The restore drill failed or has not succeeded recently",
        "The last restore drill reported failure, or the last successful drill is older "
        "than the allowed age.",
    ),
    AlertSpec(
        "OffsiteBackupStale",
        "backups",
        SEVERITY_TICKET,
        "15m",
        "No backup proven copied off the host recently",
        "The newest backup has not been copied off the host and read back (size and SHA-256 "
        "against its manifest) within the allowed age: losing the host would lose it.",
    ),
    AlertSpec(
        "AlertmanagerNotificationsFailing",
        "meta",
        SEVERITY_PAGE,
        "10m",
        "Alertmanager fails to send {{ $labels.integration }} notifications",
        "Notifications through {{ $labels.integration }} have been failing for 10 minutes; "
        "check the Alertmanager log (SMTP credentials, smarthost reachability).",
    ),
    AlertSpec(
        "SiteDown",
        "probes",
        SEVERITY_PAGE,
        "2m",
        "{{ $labels.instance }} does not answer",
        "The blackbox probe {{ $labels.job }} of {{ $labels.instance }} has failed for 2 "
        "minutes (no 2xx over HTTPS, TLS error, timeout). Component alerts it explains "
        "(APIDown, HighErrorRate, SLO burns, SiteSlow) are inhibited meanwhile; see them in "
        "the Prometheus UI.",
    ),
    AlertSpec(
        "SiteSlow",
        "probes",
        SEVERITY_TICKET,
        "10m",
        '{{ $labels.instance }} answers in {{ $value | printf "%.2f" }}s',
        "The probe of {{ $labels.instance }} took longer than the threshold on average over "
        "5 minutes.",
    ),
    AlertSpec(
        "CertificateExpiringSoon",
        "probes",
        SEVERITY_PAGE,
        "10m",
        "The certificate of {{ $labels.instance }} expires in {{ $value | humanizeDuration }}",
        "The earliest expiry of the certificates presented by {{ $labels.instance }} is closer "
        "than the threshold, which is below the renewal window: the renewal that should have "
        "happened did not (Caddy's ACME renewal, or a `pulumi up` for the Redis certificates).",
    ),
    *_burn_alert_specs(),
    AlertSpec(
        "BackupJobFailed",
        "backups",
        SEVERITY_TICKET,
        "5m",
        "The scheduled {{ $labels.exported_job }} job failed",
        "rag_backup_scheduler_job_success is 0: the last scheduled run of the "
        "{{ $labels.exported_job }} job failed (any step: backup, verify, prune, drill). It "
        "is retried at its next slot.",
    ),
    AlertSpec(
        "BackupVerificationFailed",
        "backups",
        SEVERITY_TICKET,
        "5m",
        "The newest backup exists but failed verification",
        "The newest backup's last verification failed (rag_backup_newest_verification_failed "
        "from rag-backup's store metrics): an artifact does not decrypt or its checksum does "
        "not match. A backup that does not verify is not a backup.",
    ),
    AlertSpec(
        "VolumeFillingUp",
        "capacity",
        SEVERITY_PAGE,
        "1h",
        "The {{ $labels.volume }} volume's filesystem fills up within a day",
        "At the pace of the last day, the filesystem holding the {{ $labels.volume }} "
        "volume runs out of space within 24 hours (predict_linear).",
    ),
)
ALERTS_BY_NAME: Mapping[str, AlertSpec] = MappingProxyType({a.name: a for a in ALERTS})


# --- Settings -------------------------------------------------------------------------------
class MonitoringConfigError(ValueError):
    """Settings are invalid; the message lists each problem (field, value, expected)."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid monitoring settings ({len(problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class AppMetricNames:
    """Names of the api's own metrics that alerts read (documented in docs/monitoring.md)."""

    cache_hits: str = "rag_cache_hits_total"
    cache_misses: str = "rag_cache_misses_total"
    llm_errors: str = "rag_llm_errors_total"
    http_requests: str = "http_requests_total"
    http_request_duration: str = "http_request_duration_seconds"  # histogram base name
    http_status_label: str = "status"


@dataclass(frozen=True)
class AlertThresholds:
    error_rate_ratio: float = 0.05
    latency_p95_seconds: float = 5.0
    cache_hit_ratio_min: float = 0.5
    llm_errors_per_minute: float = 1.0
    disk_used_percent: float = 85.0
    backup_max_age: str = "26h"
    restore_drill_max_age: str = "8d"
    # Below every renewal window (Redis leaves: due 30 days before expiry at `pulumi up`;
    # Caddy's ACME certificates: renewed 30 days before), so a missed renewal pages with
    # two weeks left.
    cert_expiry_days: float = 14.0
    # Caddy's own CA (caddyTls internal) issues 12-hour leaves renewed about 4 hours before.
    internal_cert_expiry_hours: float = 2.0
    site_slow_seconds: float = 2.0
    volume_fill_lookback: str = "1d"
    volume_fill_horizon: str = "1d"


@dataclass(frozen=True)
class SloObjectives:
    """The api's SLOs (stack config: sloAvailability, sloLatency, sloLatencyThreshold)."""

    availability_percent: float = 99.5
    latency_percent: float = 99.0
    latency_threshold_seconds: float = 1.0


def slo_problems(slo: SloObjectives) -> dict[str, str]:
    """field -> what is expected, for each bad SLO value (shared with the stack config)."""
    problems: dict[str, str] = {}
    fastest = max(w.factor for w in BURN_WINDOWS)
    # Below this objective the fastest burn threshold exceeds 100% bad requests: never fires.
    floor = 100 * (1 - 1 / fastest)
    for name, value in (
        ("availability_percent", slo.availability_percent),
        ("latency_percent", slo.latency_percent),
    ):
        if not floor < value < 100:
            problems[name] = (
                f"a percentage above {floor:.2f} and below 100 (the {fastest:g}x burn rate of "
                "the error budget must stay under 100% bad requests)"
            )
    if slo.latency_threshold_seconds not in CADDY_DURATION_BUCKETS:
        problems["latency_threshold_seconds"] = "seconds, one of Caddy's histogram buckets: " + (
            ", ".join(_num(b) for b in CADDY_DURATION_BUCKETS)
        )
    return problems


@dataclass(frozen=True)
class MonitoringSettings:
    stack: str
    alert_email: str
    smtp_smarthost: str  # host:port
    smtp_from: str
    smtp_username: str
    smtp_require_tls: bool = True
    smtp_password_file: str = DEFAULT_SMTP_PASSWORD_FILE
    heartbeat_url: str | None = None
    heartbeat_interval: str = "5m"
    scrape_interval: str = "15s"
    scrape_timeout: str = "10s"
    evaluation_interval: str = "15s"
    group_wait: str = "30s"
    group_interval: str = "5m"
    repeat_interval: str = "4h"
    page_repeat_interval: str = "1h"
    metrics: AppMetricNames = field(default_factory=AppMetricNames)
    thresholds: AlertThresholds = field(default_factory=AlertThresholds)
    # job -> host:port; None means the Docker names of default_targets(stack). A job left out
    # is not scraped (its alerts then see it as missing).
    targets: Mapping[str, str] | None = None
    # host:port Prometheus sends alerts to; None means the alertmanager target.
    alertmanager_address: str | None = None
    rule_file: str = ALERT_RULES_FILE  # relative paths resolve next to prometheus.yml
    runbook_base_url: str = RUNBOOKS_PATH
    # alert name -> `for` duration; only tests and benchmarks shorten alerts, explicitly.
    alert_for_overrides: Mapping[str, str] = field(default_factory=dict)
    # The public name Caddy serves; None: no site probe (tests of other parts).
    domain: str | None = None
    caddy_tls: str = "acme"  # "internal": Caddy's own CA, its short-lived certificates
    # Where the blackbox container finds the probe's Redis CA, client cert and key.
    probe_tls_dir: str = DEFAULT_PROBE_TLS_DIR
    # probe job -> target; None means default_probe_targets(stack). A job left out is
    # not probed.
    probe_targets: Mapping[str, str] | None = None
    # watched volume -> host path of its data; None means default_volume_paths(stack).
    volume_paths: Mapping[str, str] | None = None
    slo: SloObjectives = field(default_factory=SloObjectives)
    # Tickets: one digest mail per stack, at most once a day.
    digest_group_wait: str = "30m"
    digest_interval: str = "24h"

    def __post_init__(self) -> None:
        targets = default_targets(self.stack) if self.targets is None else dict(self.targets)
        object.__setattr__(self, "targets", MappingProxyType(targets))
        probes = (
            default_probe_targets(self.stack)
            if self.probe_targets is None
            else dict(self.probe_targets)
        )
        if self.domain is None:
            probes.pop(PROBE_SITE, None)
        object.__setattr__(self, "probe_targets", MappingProxyType(probes))
        volumes = (
            default_volume_paths(self.stack) if self.volume_paths is None else self.volume_paths
        )
        object.__setattr__(self, "volume_paths", MappingProxyType(dict(volumes)))
        object.__setattr__(
            self, "alert_for_overrides", MappingProxyType(dict(self.alert_for_overrides))
        )
        problems = _validate(self)
        if problems:
            raise MonitoringConfigError(problems)

    @property
    def scrape_targets(self) -> Mapping[str, str]:
        assert self.targets is not None  # set in __post_init__
        return self.targets

    @property
    def alertmanager_target(self) -> str:
        return self.alertmanager_address or self.scrape_targets[JOB_ALERTMANAGER]

    @property
    def probes(self) -> Mapping[str, str]:
        assert self.probe_targets is not None  # set in __post_init__
        return self.probe_targets

    @property
    def watched_volumes(self) -> Mapping[str, str]:
        assert self.volume_paths is not None  # set in __post_init__
        return self.volume_paths

    def alert_for(self, alert: str) -> str:
        return self.alert_for_overrides.get(alert, ALERTS_BY_NAME[alert].for_duration)


_STACK = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")
_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")
_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:]+\]):(?P<port>[0-9]{1,5})$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_URL = re.compile(r"^https?://[^\s\"'{}]+$")
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?"
_DOMAIN = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*")
_NAME = re.compile(r"^[a-z][a-z0-9_-]*$")
_DURATION = re.compile(
    r"^(?:(?P<y>\d+)y)?(?:(?P<w>\d+)w)?(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?"
    r"(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?(?:(?P<ms>\d+)ms)?$"
)
_DURATION_UNITS = {
    "y": 365 * 86400.0,
    "w": 7 * 86400.0,
    "d": 86400.0,
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 0.001,
}


def parse_duration(text: str) -> float:
    """Seconds in a Prometheus duration such as ``1h30m``, ``15s`` or ``0s``."""
    match = _DURATION.match(text) if text else None
    if match is None or not any(match.groupdict().values()):
        raise ValueError(f"{text!r} is not a Prometheus duration (e.g. 30s, 5m, 1h30m)")
    return sum(_DURATION_UNITS[u] * int(v) for u, v in match.groupdict().items() if v)


def _validate(s: MonitoringSettings) -> list[str]:
    problems: list[str] = []

    def bad(name: str, value: object, expected: str) -> None:
        problems.append(f"{name} = {value!r} is invalid; expected {expected}")

    if not _STACK.match(s.stack):
        bad("stack", s.stack, "lowercase letters, digits and dashes, e.g. staging")
    if not _EMAIL.match(s.alert_email):
        bad("alert_email", s.alert_email, "an email address, e.g. you@example.com")
    if not _EMAIL.match(s.smtp_from):
        bad("smtp_from", s.smtp_from, "an email address, e.g. alerts@example.com")
    _check_host_port(s.smtp_smarthost, "smtp_smarthost", bad)
    if not s.smtp_username:
        bad("smtp_username", s.smtp_username, "the SMTP login name")
    if not s.smtp_password_file.startswith("/"):
        bad("smtp_password_file", s.smtp_password_file, "an absolute path in the container")
    if s.heartbeat_url is not None and not _URL.match(s.heartbeat_url):
        bad("heartbeat_url", s.heartbeat_url, "an http(s) URL without spaces or quotes")

    durations = {
        "heartbeat_interval": s.heartbeat_interval,
        "scrape_interval": s.scrape_interval,
        "scrape_timeout": s.scrape_timeout,
        "evaluation_interval": s.evaluation_interval,
        "group_wait": s.group_wait,
        "group_interval": s.group_interval,
        "repeat_interval": s.repeat_interval,
        "page_repeat_interval": s.page_repeat_interval,
        "thresholds.backup_max_age": s.thresholds.backup_max_age,
        "thresholds.restore_drill_max_age": s.thresholds.restore_drill_max_age,
        "thresholds.volume_fill_lookback": s.thresholds.volume_fill_lookback,
        "thresholds.volume_fill_horizon": s.thresholds.volume_fill_horizon,
        "digest_group_wait": s.digest_group_wait,
        "digest_interval": s.digest_interval,
    }
    seconds: dict[str, float] = {}
    for name, text in durations.items():
        try:
            seconds[name] = parse_duration(text)
        except ValueError:
            bad(name, text, "a Prometheus duration such as 15s, 5m or 1h")
    if seconds.get("scrape_timeout", 0) > seconds.get("scrape_interval", float("inf")):
        bad("scrape_timeout", s.scrape_timeout, f"at most scrape_interval ({s.scrape_interval})")
    for name in ("scrape_interval", "evaluation_interval", "group_interval", "repeat_interval"):
        if seconds.get(name) == 0:
            bad(name, durations[name], "a duration greater than 0s")

    for alert, text in s.alert_for_overrides.items():
        if alert not in ALERTS_BY_NAME:
            bad(f"alert_for_overrides[{alert!r}]", text, f"an alert in {', '.join(ALERTS_BY_NAME)}")
            continue
        try:
            parse_duration(text)
        except ValueError:
            bad(f"alert_for_overrides[{alert!r}]", text, "a Prometheus duration such as 1m")

    for name in ("cache_hits", "cache_misses", "llm_errors", "http_requests"):
        value = getattr(s.metrics, name)
        if not _METRIC_NAME.match(value):
            bad(f"metrics.{name}", value, "a Prometheus metric name, e.g. rag_cache_hits_total")
    if not _METRIC_NAME.match(s.metrics.http_request_duration):
        bad(
            "metrics.http_request_duration",
            s.metrics.http_request_duration,
            "a histogram's base metric name, e.g. http_request_duration_seconds",
        )
    if not _LABEL_NAME.match(s.metrics.http_status_label):
        bad("metrics.http_status_label", s.metrics.http_status_label, "a label name")

    t = s.thresholds
    if not 0 < t.error_rate_ratio < 1:
        bad("thresholds.error_rate_ratio", t.error_rate_ratio, "a ratio between 0 and 1")
    if not 0 < t.cache_hit_ratio_min < 1:
        bad("thresholds.cache_hit_ratio_min", t.cache_hit_ratio_min, "a ratio between 0 and 1")
    if not 0 < t.disk_used_percent < 100:
        bad("thresholds.disk_used_percent", t.disk_used_percent, "a percentage between 0 and 100")
    if t.latency_p95_seconds <= 0:
        bad("thresholds.latency_p95_seconds", t.latency_p95_seconds, "seconds greater than 0")
    if t.llm_errors_per_minute <= 0:
        bad("thresholds.llm_errors_per_minute", t.llm_errors_per_minute, "a rate greater than 0")
    for name in ("cert_expiry_days", "internal_cert_expiry_hours", "site_slow_seconds"):
        if getattr(t, name) <= 0:
            bad(f"thresholds.{name}", getattr(t, name), "a number greater than 0")
    for name, expected in slo_problems(s.slo).items():
        bad(f"slo.{name}", getattr(s.slo, name), expected)
    if s.domain is not None and not _DOMAIN.fullmatch(s.domain):
        bad("domain", s.domain, "a DNS name, e.g. api.example.com")
    if s.caddy_tls not in ("acme", "internal"):
        bad("caddy_tls", s.caddy_tls, "acme or internal")
    if not s.probe_tls_dir.startswith("/"):
        bad("probe_tls_dir", s.probe_tls_dir, "an absolute path in the container")
    for job, target in s.probes.items():
        if job not in PROBE_MODULES:
            bad(f"probe_targets[{job!r}]", target, f"a probe in {', '.join(PROBE_MODULES)}")
        elif job == PROBE_REDIS:
            _check_host_port(target, f"probe_targets[{job!r}]", bad)
        elif not _URL.match(target):
            bad(f"probe_targets[{job!r}]", target, "an http(s) URL")
    for volume, path in s.watched_volumes.items():
        if (
            not _NAME.fullmatch(volume)
            or not path.startswith("/")
            or any(c in path for c in '"\\\n')
        ):
            bad(f"volume_paths[{volume!r}]", path, "an absolute host path for a named volume")

    assert s.targets is not None
    for job, address in s.targets.items():
        if job not in SCRAPE_JOBS:
            bad(f"targets[{job!r}]", address, f"a job in {', '.join(SCRAPE_JOBS)}")
        else:
            _check_host_port(address, f"targets[{job!r}]", bad)
    if s.alertmanager_address is not None:
        _check_host_port(s.alertmanager_address, "alertmanager_address", bad)
    elif JOB_ALERTMANAGER not in s.targets:
        bad("alertmanager_address", None, "host:port when targets has no 'alertmanager' job")
    if not s.rule_file or "\n" in s.rule_file:
        bad("rule_file", s.rule_file, "a file path")
    if not s.runbook_base_url or any(c.isspace() for c in s.runbook_base_url):
        bad("runbook_base_url", s.runbook_base_url, "a URL or path without spaces")
    return problems


def _check_host_port(value: str, name: str, bad: Any) -> None:
    match = _HOST_PORT.match(value)
    if match is None or not 1 <= int(match["port"]) <= 65535:
        bad(name, value, "host:port with a port from 1 to 65535, e.g. smtp.example.com:587")


# --- Renderers --------------------------------------------------------------------------------
def render_prometheus_config(settings: MonitoringSettings) -> dict[str, Any]:
    """prometheus.yml: scrape every target and probe, evaluate the rules, alert."""
    scrape_configs: list[dict[str, Any]] = [
        {
            "job_name": job,
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [settings.scrape_targets[job]]}],
        }
        for job in SCRAPE_JOBS
        if job in settings.scrape_targets
    ]
    if JOB_BLACKBOX in settings.scrape_targets:
        scrape_configs += [
            _probe_job(settings, job, target) for job, target in settings.probes.items()
        ]
    return {
        "global": {
            "scrape_interval": settings.scrape_interval,
            "scrape_timeout": settings.scrape_timeout,
            "evaluation_interval": settings.evaluation_interval,
            # Attached to every alert sent to Alertmanager, so notifications name the stack.
            "external_labels": {"stack": settings.stack},
        },
        "alerting": {
            "alertmanagers": [
                {"static_configs": [{"targets": [settings.alertmanager_target]}]},
            ]
        },
        "rule_files": [settings.rule_file],
        "scrape_configs": scrape_configs,
    }


def probe_instance(settings: MonitoringSettings, job: str) -> str:
    """The ``instance`` label of a probe: what a user would call it (the public URL)."""
    if job == PROBE_SITE and settings.domain is not None:
        return f"https://{settings.domain}/health"
    return settings.probes[job]


def _probe_job(settings: MonitoringSettings, job: str, target: str) -> dict[str, Any]:
    """The blackbox exporter pattern: the target travels as ?target=, the scrape goes to
    the exporter, and the instance label names what was probed."""
    return {
        "job_name": job,
        "metrics_path": "/probe",
        "params": {"module": [PROBE_MODULES[job]]},
        "static_configs": [{"targets": [target]}],
        "relabel_configs": [
            {"source_labels": ["__address__"], "target_label": "__param_target"},
            {"target_label": "instance", "replacement": probe_instance(settings, job)},
            {"target_label": "__address__", "replacement": settings.scrape_targets[JOB_BLACKBOX]},
        ],
    }


def render_blackbox_config(settings: MonitoringSettings) -> dict[str, Any]:
    """blackbox.yml: one module per probe job."""
    tls_files = {key: f"{settings.probe_tls_dir}/{name}" for key, name in PROBE_TLS_FILES.items()}
    redis_host = settings.probes.get(PROBE_REDIS, "").rpartition(":")[0] or None
    site_tls: dict[str, Any] = {}
    site_headers: dict[str, str] = {}
    if settings.domain is not None:
        # Caddy is dialled by container name; SNI, certificate name and Host are the public
        # name, so Caddy serves (and the probe checks) the very site users reach.
        site_tls["server_name"] = settings.domain
        site_headers["Host"] = settings.domain
    if settings.caddy_tls == "internal":
        # Caddy's own CA is not in the probe's trust store; expiry is still measured.
        site_tls["insecure_skip_verify"] = True
    site: dict[str, Any] = {
        "preferred_ip_protocol": "ip4",
        "valid_status_codes": [],  # 2xx
        "fail_if_not_ssl": True,
        "tls_config": site_tls,
    }
    if site_headers:
        site["headers"] = site_headers
    redis_tls: dict[str, Any] = dict(tls_files)
    if redis_host:
        redis_tls["server_name"] = redis_host
    return {
        "modules": {
            PROBE_MODULES[PROBE_SITE]: {
                "prober": "http",
                "timeout": PROBE_TIMEOUT,
                "http": site,
            },
            PROBE_MODULES[PROBE_API]: {
                "prober": "http",
                "timeout": PROBE_TIMEOUT,
                "http": {"preferred_ip_protocol": "ip4", "valid_status_codes": []},
            },
            PROBE_MODULES[PROBE_REDIS]: {
                "prober": "tcp",
                "timeout": PROBE_TIMEOUT,
                # Mutual TLS: Redis serves only a client with a certificate of the stack's
                # CA, so the probe presents its own. Under TLS 1.3 the client's side of the
                # handshake ends before Redis checks that certificate, so the probe also
                # waits for an answer: PING is the one command the ACL's passwordless
                # default user may run.
                "tcp": {
                    "preferred_ip_protocol": "ip4",
                    "tls": True,
                    "tls_config": redis_tls,
                    "query_response": [{"send": "PING"}, {"expect": "^[+]PONG"}],
                },
            },
        }
    }


def _num(value: float) -> str:
    """A threshold in PromQL: no trailing .0 noise, full precision."""
    return repr(int(value)) if float(value).is_integer() else repr(float(value))


def _up_or_missing(metric: str, job: str) -> str:
    # absent(x == 1) is true when the value is 0 AND when the series is gone: the exporter
    # could not be scraped (its scrape ran past scrape_timeout, so Prometheus marked redis_up
    # stale) or it is not configured. `metric == 0` alone never fires in those cases.
    return f'absent({metric}{{job="{job}"}} == 1)'


def _expression(name: str, s: MonitoringSettings) -> str:
    m, t = s.metrics, s.thresholds
    api = f'job="{JOB_API}"'
    node = f'job="{JOB_NODE}"'
    fs = f'{node},fstype!~"tmpfs|ramfs|devtmpfs|overlay|squashfs"'
    expressions = {
        "Watchdog": "vector(1)",
        "TargetDown": "up == 0",
        "APIDown": _up_or_missing("up", JOB_API),
        "RedisDown": _up_or_missing("redis_up", JOB_REDIS),
        "PostgresDown": _up_or_missing("pg_up", JOB_POSTGRES),
        "HighErrorRate": (
            f'sum(rate({m.http_requests}{{{api},{m.http_status_label}=~"5.."}}[5m]))'
            f" / sum(rate({m.http_requests}{{{api}}}[5m])) > {_num(t.error_rate_ratio)}"
        ),
        "HighLatency": (
            "histogram_quantile(0.95, sum by (le) "
            f"(rate({m.http_request_duration}_bucket{{{api}}}[5m])))"
            f" > {_num(t.latency_p95_seconds)}"
        ),
        "CacheHitRateLow": (
            f"sum(rate({m.cache_hits}[15m]))"
            f" / (sum(rate({m.cache_hits}[15m])) + sum(rate({m.cache_misses}[15m])))"
            f" < {_num(t.cache_hit_ratio_min)}"
        ),
        "LLMErrorsHigh": (f"sum(rate({m.llm_errors}[5m])) * 60 > {_num(t.llm_errors_per_minute)}"),
        "DiskSpaceLow": (
            f"100 * (1 - node_filesystem_avail_bytes{{{fs}}} / node_filesystem_size_bytes{{{fs}}})"
            f" > {_num(t.disk_used_percent)}"
        ),
        "BackupTooOld": (
            "time() - max by (component) "
            f"(rag_backup_last_success_timestamp_seconds{{{node}}})"
            f" > {_num(parse_duration(t.backup_max_age))}"
            f" or absent(rag_backup_last_success_timestamp_seconds{{{node}}})"
        ),
        "RestoreDrillFailed": (
            f"max(rag_restore_drill_last_run_success{{{node}}}) == 0"
            f" or time() - max(rag_restore_drill_last_success_timestamp_seconds{{{node}}})"
            f" > {_num(parse_duration(t.restore_drill_max_age))}"
        ),
        # No series (no off-host target on this stack) is no alert; a target that never
        # succeeded reports 0.
        "OffsiteBackupStale": (
            "time() - max(rag_backup_offsite_last_success_timestamp_seconds"
            f"{{{node}}}) > {_num(parse_duration(t.backup_max_age))}"
        ),
        "AlertmanagerNotificationsFailing": (
            "sum by (integration) "
            f'(rate(alertmanager_notifications_failed_total{{job="{JOB_ALERTMANAGER}"}}[5m]))'
            " > 0"
        ),
        "SiteDown": f'probe_success{{job=~"{"|".join(HTTP_PROBES)}"}} == 0',
        "SiteSlow": (
            f'avg_over_time(probe_duration_seconds{{job="{PROBE_SITE}"}}[5m])'
            f" > {_num(t.site_slow_seconds)}"
        ),
        "CertificateExpiringSoon": (
            f'probe_ssl_earliest_cert_expiry{{job="{PROBE_SITE}"}} - time()'
            f" < {_num(site_cert_threshold_seconds(s))}"
            f' or probe_ssl_earliest_cert_expiry{{job="{PROBE_REDIS}"}} - time()'
            f" < {_num(t.cert_expiry_days * 86400)}"
        ),
        "BackupJobFailed": f"rag_backup_scheduler_job_success{{{node}}} == 0",
        "BackupVerificationFailed": f"max(rag_backup_newest_verification_failed{{{node}}}) == 1",
        "VolumeFillingUp": _volume_filling_expression(s),
    }
    for kind in SLO_KINDS:
        for window in BURN_WINDOWS:
            expressions[burn_alert_name(kind, window)] = burn_rate_expression(s, kind, window)
    return expressions[name]


def site_cert_threshold_seconds(s: MonitoringSettings) -> float:
    if s.caddy_tls == "internal":
        return s.thresholds.internal_cert_expiry_hours * 3600
    return s.thresholds.cert_expiry_days * 86400


# Caddy instruments the top-level handlers of each server's routes. The generated site has
# a host matcher, so its whole chain (encode, reverse_proxy) is one `subroute`: one sample
# per api request. The metrics listener's own handler is "metrics". Measured on real Caddy
# with the generated Caddyfile (tests/monitoring/test_slo_on_real_caddy.py).
_CADDY_API = f'job="{JOB_CADDY}",handler="subroute"'


def slo_bad_ratio(s: MonitoringSettings, kind: SloKind, window: str) -> str:
    """PromQL: the share of bad requests over ``window`` for the SLO ``kind``.

    Measured on real Caddy: when the api cannot be reached, reverse_proxy counts the 502
    in caddy_http_request_errors_total and requests_total only (no duration sample), so
    availability adds those errors to the 5xx answers the api sent itself.
    """
    count = "caddy_http_request_duration_seconds_count"
    total = f"sum(rate(caddy_http_requests_total{{{_CADDY_API}}}[{window}]))"
    if kind.name == "availability":
        errors = f"sum(rate(caddy_http_request_errors_total{{{_CADDY_API}}}[{window}]))"
        answered_5xx = f'sum(rate({count}{{{_CADDY_API},code=~"5.."}}[{window}]))'
        # A counter that never moved does not exist yet: count it as 0.
        return f"((({errors}) or vector(0)) + (({answered_5xx}) or vector(0))) / {total}"
    threshold = _num(s.slo.latency_threshold_seconds)
    # Measured: Caddy's text format says le="1", its OpenMetrics format (which Prometheus
    # asks for) le="1.0"; match both spellings of a whole-second bucket.
    le = f'le=~"{threshold}(\\\\.0)?"' if "." not in threshold else f'le="{threshold}"'
    fast = f"sum(rate(caddy_http_request_duration_seconds_bucket{{{_CADDY_API},{le}}}[{window}]))"
    answered = f"sum(rate({count}{{{_CADDY_API}}}[{window}]))"
    return f"(1 - {fast} / {answered})"


def slo_objective_percent(s: MonitoringSettings, kind: SloKind) -> float:
    return s.slo.availability_percent if kind.name == "availability" else s.slo.latency_percent


def burn_rate_expression(s: MonitoringSettings, kind: SloKind, window: BurnWindow) -> str:
    """Multiwindow burn rate: bad ratio above factor x budget over both windows."""
    budget = 1 - slo_objective_percent(s, kind) / 100
    limit = _num(round(window.factor * budget, 12))
    return (
        f"({slo_bad_ratio(s, kind, window.long)} > {limit})"
        f" and ({slo_bad_ratio(s, kind, window.short)} > {limit})"
    )


def _mountpoint_candidates(path: str) -> list[str]:
    """Every mount point that can hold ``path``, longest first: /a/b/c, /a/b, /a, /."""
    parts = [p for p in path.split("/") if p]
    return ["/" + "/".join(parts[:i]) for i in range(len(parts), 0, -1)] + ["/"]


def _volume_filling_expression(s: MonitoringSettings) -> str:
    """Free space of the filesystem holding each watched volume, a day ahead.

    node_exporter knows mount points, not directories: the filesystem holding a volume is
    the longest mount point that is a prefix of its path. Each candidate's prediction has
    its mount labels removed, so ``or`` keeps the first (longest) one that exists.
    """
    t = s.thresholds
    horizon = _num(parse_duration(t.volume_fill_horizon))
    fs = f'job="{JOB_NODE}",fstype!~"tmpfs|ramfs|devtmpfs|overlay|squashfs"'
    per_volume = []
    for volume, path in s.watched_volumes.items():
        candidates = " or ".join(
            "max without (device, fstype, mountpoint) (predict_linear(node_filesystem_avail_bytes"
            f'{{{fs},mountpoint="{mount}"}}[{t.volume_fill_lookback}], {horizon}))'
            for mount in _mountpoint_candidates(path)
        )
        per_volume.append(f'label_replace({candidates}, "volume", "{volume}", "", "")')
    if not per_volume:
        return "vector(1) < 0"  # nothing watched: never fires
    return "(" + " or ".join(per_volume) + ") < 0"


def runbook_url(settings: MonitoringSettings, alert: str) -> str:
    """Link to the alert's section of docs/runbooks.md (heading ``## <Alert>``)."""
    return f"{settings.runbook_base_url}#{alert.lower()}"


# --- WAL archiving alerts (issue 14): rag-backup wal-archive's rag_backup_wal.prom and
# offsite wal-push's rag_backup_offsite_wal.prom. Self-contained: the spec, expressions and
# rules of these alerts live here alone.
WAL_ARCHIVE_MAX_LAG_SECONDS = 300  # PostgreSQL's RPO target; a cycle runs every minute
WAL_ALERTS: tuple[AlertSpec, ...] = (
    AlertSpec(
        "WalArchiveLagging",
        "backups",
        SEVERITY_PAGE,
        "1m",
        "PostgreSQL WAL archived only up to {{ $value | humanizeDuration }} ago",
        "Commits newer than this are not yet archived, encrypted, at rest: the recovery point "
        "is older than the 5-minute target (archiver stopped, failing or slow).",
    ),
    AlertSpec(
        "WalArchiveFailing",
        "backups",
        SEVERITY_TICKET,
        "3m",
        "PostgreSQL WAL archiving fails",
        "Every rag-backup wal-archive cycle for 3 minutes failed (rag_backup_wal_last_run_success "
        "== 0): no new WAL reaches the archive, and the replication slot holds it on the server.",
    ),
    AlertSpec(
        "OffsiteWalLagging",
        "backups",
        SEVERITY_TICKET,
        "5m",
        "PostgreSQL WAL proven off-host only up to {{ $value | humanizeDuration }} ago",
        "Commits newer than this are not yet copied off the host and read back (size and "
        "SHA-256): losing the host now would lose them (off-host target unreachable, failing, "
        "or WAL archiving itself stopped).",
    ),
)
# Off-host WAL: a copy every minute after each cycle; twice the local RPO target before a
# ticket (a short outage of the target is not one).
OFFSITE_WAL_MAX_LAG_SECONDS = 2 * WAL_ARCHIVE_MAX_LAG_SECONDS


def _wal_expression(name: str) -> str:
    node = f'job="{JOB_NODE}"'
    return {
        "WalArchiveLagging": (
            f"time() - max(rag_backup_wal_archived_until_timestamp_seconds{{{node}}})"
            f" > {WAL_ARCHIVE_MAX_LAG_SECONDS}"
        ),
        "WalArchiveFailing": f"max(rag_backup_wal_last_run_success{{{node}}}) == 0",
        # No series (no off-host target) is no alert; a target never reached reports 0.
        "OffsiteWalLagging": (
            "time() - max(rag_backup_offsite_wal_archived_until_timestamp_seconds"
            f"{{{node}}}) > {OFFSITE_WAL_MAX_LAG_SECONDS}"
        ),
    }[name]


def wal_archive_alert_rules(settings: MonitoringSettings) -> list[dict[str, Any]]:
    """The WAL archiving alerts' rules (group ``backups``), in render_alert_rules' shape."""
    return [
        {
            "alert": alert.name,
            "expr": _wal_expression(alert.name),
            "for": alert.for_duration,
            "labels": {"severity": alert.severity},
            "annotations": {
                "summary": alert.summary,
                "description": alert.description,
                "runbook_url": runbook_url(settings, alert.name),
            },
        }
        for alert in WAL_ALERTS
    ]


def render_alert_rules(settings: MonitoringSettings) -> dict[str, Any]:
    """alerts.yml: one rule group per topic, every rule with severity, summary, runbook."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for alert in ALERTS:
        rule = {
            "alert": alert.name,
            "expr": _expression(alert.name, settings),
            "for": settings.alert_for(alert.name),
            "labels": {"severity": alert.severity, **alert.labels},
            "annotations": {
                "summary": alert.summary,
                "description": alert.description,
                "runbook_url": runbook_url(settings, alert.name),
            },
        }
        groups.setdefault(alert.group, []).append(rule)
    groups.setdefault("backups", []).extend(wal_archive_alert_rules(settings))
    return {"groups": [{"name": f"rag-{name}", "rules": rules} for name, rules in groups.items()]}


PAGE_RECEIVER = "email"
DIGEST_RECEIVER = "ticket-digest"
HEARTBEAT_RECEIVER = "heartbeat"
NULL_RECEIVER = "null"
# Alerts that a failing site probe explains: one page for "the site is down", not five.
EXPLAINED_BY_SITE_DOWN: tuple[str, ...] = (
    "APIDown",
    "HighErrorRate",
    "HighLatency",
    "SiteSlow",
    *(burn_alert_name(kind, window) for kind in SLO_KINDS for window in BURN_WINDOWS),
)


def email_subject(settings: MonitoringSettings) -> str:
    """Subject header: the stack first, then Alertmanager's own default subject (Go template)."""
    return f'[{settings.stack}] {{{{ template "email.default.subject" . }}}}'


def digest_subject(settings: MonitoringSettings) -> str:
    return f'[{settings.stack}] ticket digest {{{{ template "email.default.subject" . }}}}'


def _email(settings: MonitoringSettings, subject: str) -> dict[str, Any]:
    return {"to": settings.alert_email, "send_resolved": True, "headers": {"Subject": subject}}


def render_alertmanager_config(settings: MonitoringSettings) -> dict[str, Any]:
    """alertmanager.yml: pages mailed at once, tickets in a daily digest, Watchdog to the
    heartbeat (or nowhere), SiteDown inhibiting what it explains."""
    if settings.heartbeat_url:
        heartbeat: dict[str, Any] = {
            "name": HEARTBEAT_RECEIVER,
            "webhook_configs": [{"url": settings.heartbeat_url, "send_resolved": False}],
        }
    else:
        # A receiver without integrations: Watchdog is dropped instead of mailed every 5m.
        heartbeat = {"name": NULL_RECEIVER}
    same_stack = ["stack"]
    return {
        "global": {
            "smtp_smarthost": settings.smtp_smarthost,
            "smtp_from": settings.smtp_from,
            "smtp_auth_username": settings.smtp_username,
            # The password lives only in this file (a secret upload); never in the config.
            "smtp_auth_password_file": settings.smtp_password_file,
            "smtp_require_tls": settings.smtp_require_tls,
        },
        "route": {
            # Anything without a known severity is paged: better a mail too many.
            "receiver": PAGE_RECEIVER,
            "group_by": ["alertname", "severity"],
            "group_wait": settings.group_wait,
            "group_interval": settings.group_interval,
            "repeat_interval": settings.repeat_interval,
            "routes": [
                {
                    "receiver": heartbeat["name"],
                    "matchers": ['alertname="Watchdog"'],
                    "group_wait": "0s",
                    "group_interval": settings.heartbeat_interval,
                    "repeat_interval": settings.heartbeat_interval,
                },
                {
                    "receiver": PAGE_RECEIVER,
                    "matchers": [f'severity="{SEVERITY_PAGE}"'],
                    "repeat_interval": settings.page_repeat_interval,
                },
                {
                    # Every open ticket of the stack in one group: one mail, at most daily.
                    "receiver": DIGEST_RECEIVER,
                    "matchers": [f'severity="{SEVERITY_TICKET}"'],
                    "group_by": ["stack"],
                    "group_wait": settings.digest_group_wait,
                    "group_interval": settings.digest_interval,
                    "repeat_interval": settings.digest_interval,
                },
            ],
        },
        "inhibit_rules": [
            {
                # A paging twin (e.g. the fast burn's page) mutes the ticket of the same alert.
                "source_matchers": [f'severity="{SEVERITY_PAGE}"'],
                "target_matchers": [f'severity="{SEVERITY_TICKET}"'],
                "equal": ["alertname", *same_stack],
            },
            {
                "source_matchers": ['burn="fast"'],
                "target_matchers": ['burn="slow"'],
                "equal": ["slo", *same_stack],
            },
            {
                "source_matchers": ['alertname="SiteDown"'],
                "target_matchers": [f'alertname=~"{"|".join(EXPLAINED_BY_SITE_DOWN)}"'],
                "equal": same_stack,
            },
            {
                "source_matchers": ['alertname="SiteDown"'],
                "target_matchers": ['alertname="TargetDown"', f'job="{JOB_API}"'],
                "equal": same_stack,
            },
            {
                # The verification failure is the job failure: one ticket.
                "source_matchers": ['alertname="BackupVerificationFailed"'],
                "target_matchers": ['alertname="BackupJobFailed"', 'exported_job="backup"'],
                "equal": same_stack,
            },
        ],
        "receivers": [
            {"name": PAGE_RECEIVER, "email_configs": [_email(settings, email_subject(settings))]},
            {
                "name": DIGEST_RECEIVER,
                "email_configs": [_email(settings, digest_subject(settings))],
            },
            heartbeat,
        ],
    }


def dump_yaml(data: Mapping[str, Any]) -> str:
    """YAML text of ``data``, keys in the order they were built."""
    return yaml.safe_dump(dict(data), sort_keys=False, default_flow_style=False, width=1000)


def render_all(settings: MonitoringSettings) -> dict[str, str]:
    """File name -> YAML text of every monitoring file for one stack."""
    return {
        PROMETHEUS_FILE: dump_yaml(render_prometheus_config(settings)),
        ALERT_RULES_FILE: dump_yaml(render_alert_rules(settings)),
        ALERTMANAGER_FILE: dump_yaml(render_alertmanager_config(settings)),
        BLACKBOX_FILE: dump_yaml(render_blackbox_config(settings)),
    }
