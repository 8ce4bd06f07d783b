"""Stack configuration: read once, validated, frozen.

``parse_stack_config`` is pure (strings in, dataclasses out) so every rule is testable
without Pulumi; ``load_stack_config`` only gathers the raw values from the engine.
All problems are collected and raised together in one ``ConfigError`` before any
resource is registered. Messages name the key, show the bad value (never a secret's)
and say what is expected.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi

from components.monitoring_config import SloObjectives, slo_problems

PROJECT = "personal-rag"

PROD = "prod"
STAGING = "staging"
# Throwaway stacks (engine tests, experiments) are named ephemeral-<suffix>.
_EPHEMERAL_STACK = re.compile(r"^ephemeral-[a-z0-9][a-z0-9-]{0,30}$")
# Ports prod publishes; no other stack may take them.
PROD_PORTS = {"httpPort": 80, "httpsPort": 443, "prometheusPort": 9090, "alertmanagerPort": 9093}
_NON_PROD_BASE_PORTS = {
    "httpPort": 8080,
    "httpsPort": 8443,
    "prometheusPort": 9090,
    "alertmanagerPort": 9093,
}

_EMAIL = re.compile(r"^[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(\.[A-Za-z0-9-]+)+$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)
_IMAGE_REPO = re.compile(r"^[a-z0-9]+([._-][a-z0-9]+)*(:[0-9]+)?(/[a-z0-9]+([._-][a-z0-9]+)*)+$")
_IMAGE_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_VOLUME_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]+$")
_METRIC_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_HH_MM = re.compile(r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
ADOPTABLE_VOLUMES = ("redis", "postgres", "chroma")


class ConfigError(ValueError):
    """One or more configuration values are wrong; the message lists each of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid stack configuration ({len(problems)} problem(s)):\n{lines}")


class Secret:
    """A secret config value. Its repr never shows the value; Pulumi sees it as secret."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(("Secret", self._value))

    def output(self) -> pulumi.Output[str]:
        return pulumi.Output.secret(self._value)

    def reveal(self) -> str:
        """Plain value, for code that must hand it to a tool through a file."""
        return self._value


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int
    sender: str
    username: str
    password: Secret
    require_tls: bool

    @property
    def smarthost(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class PortSettings:
    """Host ports this stack publishes. Prod's Caddy binds all interfaces; nothing else does."""

    http: int
    https: int
    prometheus: int
    alertmanager: int
    caddy_public: bool


@dataclass(frozen=True)
class AppSettings:
    log_level: str
    session_queries_per_hour: int
    user: str


@dataclass(frozen=True)
class ImageSettings:
    repository: str
    tag: str
    digest: str | None
    build_context: str | None
    ghcr_username: str | None
    ghcr_token: Secret | None


@dataclass(frozen=True)
class BackupSettings:
    time_of_day: str  # HH:MM, host time (UTC in containers)
    drill_weekday: str
    drill_time: str
    keep_daily: int
    keep_weekly: int
    keep_monthly: int
    host_path: str | None
    # Also take a pg_basebackup: restores at copy speed.
    pg_physical: bool = True
    # With physical backups, the portable logical dump is taken on this weekday only
    # (None: in every backup).
    pg_logical_weekday: str | None = "sun"


@dataclass(frozen=True)
class MetricNames:
    cache_hits: str
    cache_misses: str
    llm_errors: str


@dataclass(frozen=True)
class StackConfig:
    stack: str
    domain: str
    alert_email: str
    smtp: SmtpSettings
    ports: PortSettings
    app: AppSettings
    image: ImageSettings
    backup: BackupSettings
    metrics: MetricNames
    caddy_tls: str  # "acme" (public certificates) or "internal" (Caddy's own CA)
    heartbeat_url: str | None
    adopt_volumes: Mapping[str, str] = field(default_factory=dict)
    docs_host_path: str | None = None
    mds_host_path: str | None = None
    slo: SloObjectives = field(default_factory=SloObjectives)

    @property
    def is_prod(self) -> bool:
        return self.stack == PROD

    def resource_name(self, service: str) -> str:
        """Docker object name: every name carries the stack (rag-staging-redis)."""
        return f"rag-{self.stack}-{service}"


# key -> (default, is_secret). A default of _REQUIRED means the key must be set.
_REQUIRED = object()
_KEYS: dict[str, tuple[Any, bool]] = {
    "domain": (_REQUIRED, False),
    "alertEmail": (_REQUIRED, False),
    "smtpHost": (_REQUIRED, False),
    "smtpFrom": (_REQUIRED, False),
    "smtpUsername": (_REQUIRED, False),
    "smtpPassword": (_REQUIRED, True),
    "smtpRequireTls": ("true", False),
    "image": (_REQUIRED, False),
    "imageTag": (_REQUIRED, False),
    "imageDigest": (None, False),
    "buildContext": (None, False),
    "ghcrUsername": (None, False),
    "ghcrToken": (None, True),
    "portOffset": (None, False),
    "httpPort": (None, False),
    "httpsPort": (None, False),
    "prometheusPort": (None, False),
    "alertmanagerPort": (None, False),
    "logLevel": ("INFO", False),
    "sessionQueriesPerHour": ("30", False),
    "apiUser": ("1000:1000", False),
    "caddyTls": (None, False),
    "heartbeatUrl": (None, False),
    "adoptVolumes": (None, False),
    "docsHostPath": (None, False),
    "mdsHostPath": (None, False),
    "backupTime": ("03:00", False),
    "drillWeekday": ("sun", False),
    "drillTime": ("04:30", False),
    "backupKeepDaily": ("7", False),
    "backupKeepWeekly": ("4", False),
    "backupKeepMonthly": ("6", False),
    "backupHostPath": (None, False),
    "backupPgPhysical": ("true", False),
    "backupPgLogicalWeekday": ("sun", False),
    "cacheHitsMetric": ("rag_cache_hits_total", False),
    "cacheMissesMetric": ("rag_cache_misses_total", False),
    "llmErrorsMetric": ("rag_llm_errors_total", False),
    "sloAvailability": ("99.5", False),
    "sloLatency": ("99", False),
    "sloLatencyThreshold": ("1", False),
}
KNOWN_KEYS = frozenset(_KEYS)
SECRET_KEYS = frozenset(k for k, (_, secret) in _KEYS.items() if secret)


class _Collector:
    """Gathers every problem so the user fixes them all in one round."""

    def __init__(self, raw: Mapping[str, str], secret_keys: frozenset[str] | set[str]) -> None:
        self.raw = raw
        self.secret_keys = secret_keys
        self.problems: list[str] = []

    def shown(self, key: str, value: str) -> str:
        return "<secret>" if key in SECRET_KEYS or key in self.secret_keys else repr(value)

    def fail(self, key: str, value: str | None, expected: str) -> None:
        if value is None:
            self.problems.append(f"{PROJECT}:{key} is not set; expected {expected}")
        else:
            self.problems.append(
                f"{PROJECT}:{key} = {self.shown(key, value)} is invalid; expected {expected}"
            )

    def get(self, key: str) -> str | None:
        default, _ = _KEYS[key]
        value = self.raw.get(key)
        if value is None or value == "":
            if default is _REQUIRED:
                return None
            return None if default is None else str(default)
        return value

    def text(self, key: str, pattern: re.Pattern[str], expected: str) -> str:
        value = self.get(key)
        if value is None or not pattern.match(value):
            self.fail(key, value, expected)
            return ""
        return value

    def integer(self, key: str, low: int, high: int) -> int | None:
        value = self.get(key)
        if value is None:
            return None
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or not low <= number <= high:
            self.fail(key, value, f"a whole number from {low} to {high}")
            return None
        return number

    def boolean(self, key: str) -> bool:
        value = self.get(key)
        if value is not None and value.lower() in ("true", "false"):
            return value.lower() == "true"
        self.fail(key, value, "true or false")
        return True

    def secret(self, key: str, required: bool) -> Secret | None:
        value = self.raw.get(key)
        if not value:
            if required:
                self.problems.append(
                    f"{PROJECT}:{key} is not set; expected a secret set with "
                    f"`pulumi config set --secret {key} ...`"
                )
            return None
        if key not in self.secret_keys:
            # The value is in plaintext in the stack file: refuse it, and do not echo it.
            self.problems.append(
                f"{PROJECT}:{key} is stored in plaintext; expected a secret: run "
                f"`pulumi config set --secret {key} ...` (value not shown)"
            )
            return None
        return Secret(value)


def _check_stack_name(stack: str, c: _Collector) -> None:
    if stack not in (PROD, STAGING) and not _EPHEMERAL_STACK.match(stack):
        c.problems.append(
            f"stack name {stack!r} is unknown; expected 'prod', 'staging' or 'ephemeral-<suffix>' "
            "(lowercase letters, digits, dashes)"
        )


def _parse_smtp(c: _Collector) -> SmtpSettings:
    host, port = "", 0
    raw = c.get("smtpHost")
    match = re.match(r"^(?P<host>[^:\s]+):(?P<port>[0-9]{1,5})$", raw or "")
    if match and _HOSTNAME.match(match["host"]) and 1 <= int(match["port"]) <= 65535:
        host, port = match["host"], int(match["port"])
    else:
        c.fail("smtpHost", raw, "host:port, e.g. smtp.example.com:587")
    sender = c.text("smtpFrom", _EMAIL, "an email address, e.g. alerts@example.com")
    username = c.get("smtpUsername")
    if not username:
        c.fail("smtpUsername", username, "the SMTP login name")
    password = c.secret("smtpPassword", required=True)
    return SmtpSettings(
        host=host,
        port=port,
        sender=sender,
        username=username or "",
        password=password or Secret(""),
        require_tls=c.boolean("smtpRequireTls"),
    )


def _parse_ports(stack: str, c: _Collector) -> PortSettings:
    is_prod = stack == PROD
    offset = c.integer("portOffset", 0, 50000)
    if offset is None:
        offset = 0 if is_prod else None
    if not is_prod and offset == 0:
        c.fail("portOffset", "0", "a non-zero offset for every stack but prod, e.g. 10000")
    ports: dict[str, int] = {}
    for key in PROD_PORTS:
        explicit = c.integer(key, 1, 65535)
        if explicit is not None:
            ports[key] = explicit
        elif is_prod:
            ports[key] = PROD_PORTS[key]
        elif offset is not None:
            ports[key] = _NON_PROD_BASE_PORTS[key] + offset
            if ports[key] > 65535:
                c.fail("portOffset", str(offset), f"an offset that keeps {key} at most 65535")
        else:
            c.fail("portOffset", None, f"a port offset for stack {stack!r} (or set {key} directly)")
    seen: dict[int, str] = {}
    for key, port in ports.items():
        if port in seen:
            c.fail(
                key, str(port), f"a port not already used by {PROJECT}:{seen[port]} in this stack"
            )
        seen.setdefault(port, key)
        if not is_prod and port in PROD_PORTS.values():
            c.fail(key, str(port), "a port prod does not publish (80, 443, 9090, 9093 are prod's)")
    return PortSettings(
        http=ports.get("httpPort", 0),
        https=ports.get("httpsPort", 0),
        prometheus=ports.get("prometheusPort", 0),
        alertmanager=ports.get("alertmanagerPort", 0),
        caddy_public=is_prod,
    )


def _parse_image(c: _Collector) -> ImageSettings:
    repository = c.text(
        "image", _IMAGE_REPO, "an image repository without tag, e.g. ghcr.io/owner/rag_personal"
    )
    tag = c.text("imageTag", _IMAGE_TAG, "a Docker tag such as a git SHA, e.g. 3f9c2ab")
    digest = c.get("imageDigest")
    if digest is not None and not _DIGEST.match(digest):
        c.fail("imageDigest", digest, "sha256: followed by 64 lowercase hex digits")
        digest = None
    build_context = c.get("buildContext")
    if build_context is not None and not (Path(build_context) / "Dockerfile.prod").is_file():
        c.fail("buildContext", build_context, "an existing directory containing Dockerfile.prod")
    username = c.get("ghcrUsername")
    token = c.secret("ghcrToken", required=build_context is not None)
    return ImageSettings(
        repository=repository,
        tag=tag,
        digest=digest,
        build_context=build_context,
        ghcr_username=username,
        ghcr_token=token,
    )


def _parse_backup(c: _Collector) -> BackupSettings:
    backup_time = c.text("backupTime", _HH_MM, "a time of day HH:MM, e.g. 03:00")
    weekday = (c.get("drillWeekday") or "").lower()
    if weekday not in _WEEKDAYS:
        c.fail("drillWeekday", c.get("drillWeekday"), f"one of {', '.join(_WEEKDAYS)}")
    drill_time = c.text("drillTime", _HH_MM, "a time of day HH:MM, e.g. 04:30")
    host_path = _host_path(c, "backupHostPath", must_exist=False)
    return BackupSettings(
        time_of_day=backup_time,
        drill_weekday=weekday,
        drill_time=drill_time,
        keep_daily=c.integer("backupKeepDaily", 1, 365) or 7,
        keep_weekly=c.integer("backupKeepWeekly", 0, 520) or 0,
        keep_monthly=c.integer("backupKeepMonthly", 0, 240) or 0,
        host_path=host_path,
        pg_physical=c.boolean("backupPgPhysical"),
        pg_logical_weekday=_logical_weekday(c),
    )


def _logical_weekday(c: _Collector) -> str | None:
    value = (c.get("backupPgLogicalWeekday") or "").lower()
    if value == "daily":
        return None
    if value not in _WEEKDAYS:
        c.fail(
            "backupPgLogicalWeekday",
            c.get("backupPgLogicalWeekday"),
            f"one of {', '.join(_WEEKDAYS)}, or daily",
        )
        return None
    return value


def _host_path(c: _Collector, key: str, must_exist: bool) -> str | None:
    value = c.get(key)
    if value is None:
        return None
    if not value.startswith("/"):
        c.fail(key, value, "an absolute path on the Docker host")
        return None
    if must_exist and not Path(value).is_dir():
        c.fail(key, value, "an existing directory on the Docker host")
        return None
    return value


def _parse_adopt_volumes(c: _Collector) -> dict[str, str]:
    raw = c.get("adoptVolumes")
    if raw is None:
        return {}
    expected = (
        "a map from " + "/".join(ADOPTABLE_VOLUMES) + " to existing Docker volume names, "
        'e.g. {"postgres": "rag_postgres_data"}'
    )
    try:
        parsed = json.loads(raw)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        c.fail("adoptVolumes", raw, expected)
        return {}
    result: dict[str, str] = {}
    for role, name in parsed.items():
        if role not in ADOPTABLE_VOLUMES or not isinstance(name, str):
            c.fail("adoptVolumes", raw, expected)
        elif not _VOLUME_NAME.match(name):
            c.fail(f"adoptVolumes.{role}", name, "a Docker volume name")
        else:
            result[role] = name
    return result


# SloObjectives field -> stack config key.
_SLO_KEYS = {
    "availability_percent": "sloAvailability",
    "latency_percent": "sloLatency",
    "latency_threshold_seconds": "sloLatencyThreshold",
}


def _parse_slo(c: _Collector) -> SloObjectives:
    """The api's SLOs; the checks are the monitoring's own (slo_problems)."""
    numbers: dict[str, float] = {}
    for name, key in _SLO_KEYS.items():
        value = c.get(key) or ""
        try:
            numbers[name] = float(value)
        except ValueError:
            c.fail(key, value, "a number, e.g. 99.5")
    if len(numbers) < len(_SLO_KEYS):
        return SloObjectives()
    slo = SloObjectives(**numbers)
    for name, expected in slo_problems(slo).items():
        c.fail(_SLO_KEYS[name], c.get(_SLO_KEYS[name]), expected)
    return slo


def parse_stack_config(
    stack: str,
    raw: Mapping[str, str],
    secret_keys: frozenset[str] | set[str] = frozenset(),
    docker_host: str | None = None,
) -> StackConfig:
    """Validate ``raw`` (key -> string, as Pulumi stores config) for ``stack``.

    ``secret_keys`` are the keys Pulumi holds encrypted. ``docker_host`` is the
    ``docker:host`` setting: host paths are only checked for existence when the
    engine is local, because a remote host's paths cannot be seen from here.
    """
    c = _Collector(raw, secret_keys)
    _check_stack_name(stack, c)
    for key in sorted(set(raw) - KNOWN_KEYS):
        close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        c.problems.append(f"{PROJECT}:{key} is not a known setting{hint}")

    domain = c.text("domain", _HOSTNAME, "a DNS name, e.g. api.example.com")
    alert_email = c.text("alertEmail", _EMAIL, "an email address, e.g. you@example.com")
    smtp = _parse_smtp(c)
    ports = _parse_ports(stack, c)

    log_level = (c.get("logLevel") or "").upper()
    if log_level not in _LOG_LEVELS:
        c.fail("logLevel", c.get("logLevel"), f"one of {', '.join(_LOG_LEVELS)}")
    queries = c.integer("sessionQueriesPerHour", 1, 100000) or 0
    api_user = c.text("apiUser", re.compile(r"^[0-9]+(:[0-9]+)?$"), "uid:gid, e.g. 1000:1000")

    caddy_tls = c.get("caddyTls") or ("acme" if stack == PROD else "internal")
    if caddy_tls not in ("acme", "internal"):
        c.fail("caddyTls", caddy_tls, "acme (public certificates) or internal (Caddy's own CA)")

    heartbeat = c.get("heartbeatUrl")
    if heartbeat is not None and not re.match(r"^https?://[^\s]+$", heartbeat):
        c.fail("heartbeatUrl", heartbeat, "an http(s) URL")

    local_engine = docker_host is None or docker_host.startswith("unix://")
    metrics = MetricNames(
        cache_hits=c.text("cacheHitsMetric", _METRIC_NAME, "a Prometheus metric name"),
        cache_misses=c.text("cacheMissesMetric", _METRIC_NAME, "a Prometheus metric name"),
        llm_errors=c.text("llmErrorsMetric", _METRIC_NAME, "a Prometheus metric name"),
    )
    config = StackConfig(
        stack=stack,
        domain=domain,
        alert_email=alert_email,
        smtp=smtp,
        ports=ports,
        app=AppSettings(log_level=log_level, session_queries_per_hour=queries, user=api_user),
        image=_parse_image(c),
        backup=_parse_backup(c),
        metrics=metrics,
        caddy_tls=caddy_tls,
        heartbeat_url=heartbeat,
        adopt_volumes=_parse_adopt_volumes(c),
        docs_host_path=_host_path(c, "docsHostPath", must_exist=local_engine),
        mds_host_path=_host_path(c, "mdsHostPath", must_exist=local_engine),
        slo=_parse_slo(c),
    )
    if c.problems:
        raise ConfigError(c.problems)
    return config


def load_stack_config() -> StackConfig:
    """Read this stack's ``personal-rag:*`` config from the engine and validate it."""
    from pulumi.runtime import config as runtime_config

    prefix = f"{PROJECT}:"
    everything: dict[str, Any] = {**runtime_config.get_config_env(), **runtime_config.CONFIG.get()}
    raw = {k[len(prefix) :]: str(v) for k, v in everything.items() if k.startswith(prefix)}
    secret_keys = {
        k[len(prefix) :]
        for k in everything
        if k.startswith(prefix)
        and (runtime_config.is_config_secret(k) or k in runtime_config.get_config_secret_keys_env())
    }
    docker_host = everything.get("docker:host")
    return parse_stack_config(pulumi.get_stack(), raw, secret_keys, docker_host)
