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
SCRAPE_JOBS: tuple[str, ...] = (
    JOB_PROMETHEUS,
    JOB_ALERTMANAGER,
    JOB_API,
    JOB_NODE,
    JOB_REDIS,
    JOB_POSTGRES,
)

RUNBOOKS_PATH = "docs/runbooks.md"
DEFAULT_SMTP_PASSWORD_FILE = "/etc/alertmanager/secrets/smtp_password"  # noqa: S105 (a path)
ALERT_RULES_FILE = "alerts.yml"
PROMETHEUS_FILE = "prometheus.yml"
ALERTMANAGER_FILE = "alertmanager.yml"


def default_targets(stack: str) -> dict[str, str]:
    """Scrape targets on the stack's Docker network: ``rag-<stack>-<service>:<port>``."""
    return {job: f"rag-{stack}-{job}:{SERVICE_PORTS[job]}" for job in SCRAPE_JOBS}


# --- Alerts ---------------------------------------------------------------------------------
SEVERITY_CRITICAL = "critical"
SEVERITY_WARNING = "warning"
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
        SEVERITY_WARNING,
        "5m",
        "Scrape target {{ $labels.job }} ({{ $labels.instance }}) is down",
        "Prometheus could not scrape {{ $labels.instance }} (job {{ $labels.job }}) for 5 minutes.",
    ),
    AlertSpec(
        "APIDown",
        "availability",
        SEVERITY_CRITICAL,
        "2m",
        "The RAG API is down",
        "The api's /metrics endpoint has not been scraped successfully for 2 minutes "
        "(target unreachable, failing, or missing).",
    ),
    AlertSpec(
        "RedisDown",
        "availability",
        SEVERITY_CRITICAL,
        "1m",
        "Redis is down",
        "redis_up is 0 or missing for 1 minute: Redis refused the exporter, or the exporter "
        "itself could not be scraped in time.",
    ),
    AlertSpec(
        "PostgresDown",
        "availability",
        SEVERITY_CRITICAL,
        "1m",
        "PostgreSQL is down",
        "pg_up is 0 or missing for 1 minute: PostgreSQL refused the exporter, or the exporter "
        "itself could not be scraped in time.",
    ),
    AlertSpec(
        "HighErrorRate",
        "application",
        SEVERITY_CRITICAL,
        "5m",
        "{{ $value | humanizePercentage }} of API requests fail with 5xx",
        "The share of HTTP 5xx responses of the api over 5 minutes is "
        "{{ $value | humanizePercentage }}.",
    ),
    AlertSpec(
        "HighLatency",
        "application",
        SEVERITY_WARNING,
        "10m",
        "API p95 latency is {{ $value | humanizeDuration }}",
        "The 95th percentile of API request duration over 5 minutes is "
        "{{ $value | humanizeDuration }}.",
    ),
    AlertSpec(
        "CacheHitRateLow",
        "application",
        SEVERITY_WARNING,
        "30m",
        "Cache hit rate is {{ $value | humanizePercentage }}",
        "Fewer than half of the cache lookups over 15 minutes were hits.",
    ),
    AlertSpec(
        "LLMErrorsHigh",
        "application",
        SEVERITY_WARNING,
        "10m",
        'LLM calls fail {{ $value | printf "%.1f" }} times a minute',
        "The api's LLM error counter grew faster than the threshold over 5 minutes.",
    ),
    AlertSpec(
        "DiskSpaceLow",
        "resources",
        SEVERITY_WARNING,
        "10m",
        'Host disk {{ $labels.mountpoint }} is {{ $value | printf "%.0f" }}% full',
        "Filesystem {{ $labels.device }} mounted at {{ $labels.mountpoint }} on the host "
        "is more than the threshold full.",
    ),
    AlertSpec(
        "BackupTooOld",
        "backups",
        SEVERITY_WARNING,
        "15m",
        "No recent successful backup ({{ $labels.component }})",
        "The last successful backup is older than the allowed age, or no backup metrics "
        "exist at all (backup never ran, or the textfile collector does not see them).",
    ),
    AlertSpec(
        "RestoreDrillFailed",
        "backups",
        SEVERITY_WARNING,
        "5m",
        "The restore drill failed or has not succeeded recently",
        "The last restore drill reported failure, or the last successful drill is older "
        "than the allowed age.",
    ),
    AlertSpec(
        "OffsiteBackupStale",
        "backups",
        SEVERITY_WARNING,
        "15m",
        "No backup proven copied off the host recently",
        "The newest backup has not been copied off the host and read back (size and SHA-256 "
        "against its manifest) within the allowed age: losing the host would lose it.",
    ),
    AlertSpec(
        "AlertmanagerNotificationsFailing",
        "meta",
        SEVERITY_CRITICAL,
        "10m",
        "Alertmanager fails to send {{ $labels.integration }} notifications",
        "Notifications through {{ $labels.integration }} have been failing for 10 minutes; "
        "check the Alertmanager log (SMTP credentials, smarthost reachability).",
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
    critical_repeat_interval: str = "1h"
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

    def __post_init__(self) -> None:
        targets = default_targets(self.stack) if self.targets is None else dict(self.targets)
        object.__setattr__(self, "targets", MappingProxyType(targets))
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

    def alert_for(self, alert: str) -> str:
        return self.alert_for_overrides.get(alert, ALERTS_BY_NAME[alert].for_duration)


_STACK = re.compile(r"^[a-z0-9][a-z0-9-]{0,40}$")
_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)*$")
_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:]+\]):(?P<port>[0-9]{1,5})$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_URL = re.compile(r"^https?://[^\s\"'{}]+$")
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
        "critical_repeat_interval": s.critical_repeat_interval,
        "thresholds.backup_max_age": s.thresholds.backup_max_age,
        "thresholds.restore_drill_max_age": s.thresholds.restore_drill_max_age,
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
    """prometheus.yml: scrape every target, evaluate the rules, send alerts to Alertmanager."""
    scrape_configs = [
        {
            "job_name": job,
            "metrics_path": "/metrics",
            "static_configs": [{"targets": [settings.scrape_targets[job]]}],
        }
        for job in SCRAPE_JOBS
        if job in settings.scrape_targets
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
    }
    return expressions[name]


def runbook_url(settings: MonitoringSettings, alert: str) -> str:
    """Link to the alert's section of docs/runbooks.md (heading ``## <Alert>``)."""
    return f"{settings.runbook_base_url}#{alert.lower()}"


def render_alert_rules(settings: MonitoringSettings) -> dict[str, Any]:
    """alerts.yml: one rule group per topic, every rule with severity, summary, runbook."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for alert in ALERTS:
        rule = {
            "alert": alert.name,
            "expr": _expression(alert.name, settings),
            "for": settings.alert_for(alert.name),
            "labels": {"severity": alert.severity},
            "annotations": {
                "summary": alert.summary,
                "description": alert.description,
                "runbook_url": runbook_url(settings, alert.name),
            },
        }
        groups.setdefault(alert.group, []).append(rule)
    return {"groups": [{"name": f"rag-{name}", "rules": rules} for name, rules in groups.items()]}


EMAIL_RECEIVER = "email"
HEARTBEAT_RECEIVER = "heartbeat"
NULL_RECEIVER = "null"


def email_subject(settings: MonitoringSettings) -> str:
    """Subject header: the stack first, then Alertmanager's own default subject (Go template)."""
    return f'[{settings.stack}] {{{{ template "email.default.subject" . }}}}'


def render_alertmanager_config(settings: MonitoringSettings) -> dict[str, Any]:
    """alertmanager.yml: email for everything, Watchdog to the heartbeat (or nowhere)."""
    if settings.heartbeat_url:
        heartbeat: dict[str, Any] = {
            "name": HEARTBEAT_RECEIVER,
            "webhook_configs": [{"url": settings.heartbeat_url, "send_resolved": False}],
        }
    else:
        # A receiver without integrations: Watchdog is dropped instead of mailed every 5m.
        heartbeat = {"name": NULL_RECEIVER}
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
            "receiver": EMAIL_RECEIVER,
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
                    "receiver": EMAIL_RECEIVER,
                    "matchers": [f'severity="{SEVERITY_CRITICAL}"'],
                    "repeat_interval": settings.critical_repeat_interval,
                },
            ],
        },
        "inhibit_rules": [
            {
                "source_matchers": [f'severity="{SEVERITY_CRITICAL}"'],
                "target_matchers": [f'severity="{SEVERITY_WARNING}"'],
                "equal": ["alertname"],
            }
        ],
        "receivers": [
            {
                "name": EMAIL_RECEIVER,
                "email_configs": [
                    {
                        "to": settings.alert_email,
                        "send_resolved": True,
                        "headers": {"Subject": email_subject(settings)},
                    }
                ],
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
    }
