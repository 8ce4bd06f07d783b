"""Stack configuration: read once, validated, frozen.

``parse_stack_config`` is pure (strings in, dataclasses out) so every rule is testable
without Pulumi; ``load_stack_config`` only gathers the raw values from the engine.
All problems are collected and raised together in one ``ConfigError`` before any
resource is registered. Messages name the key, show the bad value (never a secret's)
and say what is expected.
"""

from __future__ import annotations

import difflib
import getpass
import json
import os
import posixpath
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi

from components.monitoring_config import (
    PageTimings,
    SloObjectives,
    page_timing_problems,
    slo_problems,
)

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

_FIRST_UNPRIVILEGED_PORT = 1024
# The app's uid/gid: not root, and within the 16-bit ids images and volumes use.
_MIN_ID, _MAX_ID = 1, 65534
# Host paths a bind mount may never be, nor be under.
SYSTEM_DIRECTORIES = (
    "/etc",
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib64",
    "/var/lib/docker",
    "/root",
    "/boot",
    "/proc",
    "/sys",
    "/dev",
    "/run",
)
_HEARTBEAT_URL = re.compile(
    r"(?P<scheme>https?)://(?P<host>[A-Za-z0-9.-]+)(?::[0-9]{1,5})?"
    r"(?P<rest>[/?][A-Za-z0-9._~!$&()*+,;=:@%/?-]*)?"
)
PROJECT_DIR = Path(__file__).resolve().parent.parent
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
    # An image built on the Docker host itself (the demo app, `up.sh --demo`), run by its
    # content digest (Docker's image id): no registry involved.
    local_image_id: str | None = None


@dataclass(frozen=True)
class OffsiteSettings:
    """Where each backup is copied off the host (``offsiteTarget``), read by rclone."""

    kind: str  # "sftp" or "s3"
    path: str  # sftp: relative to the login directory (or absolute); s3: bucket/prefix
    host: str = ""  # sftp
    port: int = 22  # sftp
    user: str = ""  # sftp
    ssh_key: Secret | None = None  # sftp: private key (OpenSSH)
    known_hosts: str = ""  # sftp: the target's host key line(s), pinned
    s3_endpoint: str | None = None  # s3: None = AWS
    s3_region: str | None = None
    s3_access_key_id: Secret | None = None
    s3_secret_access_key: Secret | None = None


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
    # None: backups stay on the host (and the job keeps no egress).
    offsite: OffsiteSettings | None = None


@dataclass(frozen=True)
class MetricNames:
    cache_hits: str
    cache_misses: str
    llm_errors: str


@dataclass(frozen=True)
class SshTarget:
    """The Docker host as ``docker:host = ssh://user@host:port`` names it."""

    user: str
    host: str
    port: int


@dataclass(frozen=True)
class HostFirewallSettings:
    """``hostFirewall``: ``managed`` (pulumi up applies scripts/host-firewall.sh for the
    backend bridge) or ``external`` (the host's firewall is managed elsewhere)."""

    managed: bool = True
    ssh: SshTarget | None = None  # None: the Docker engine runs on this machine
    ssh_key_file: str = "~/.ssh/id_ed25519"
    known_hosts_file: str = "~/.ssh/known_hosts"


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
    host_firewall: HostFirewallSettings = field(default_factory=HostFirewallSettings)
    page_timings: PageTimings = field(default_factory=PageTimings)

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
    "localImageId": (None, False),
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
    "heartbeatAllowHttp": ("false", False),
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
    "offsiteTarget": (None, False),
    "offsiteSshKey": (None, True),
    "offsiteSshKnownHosts": (None, False),
    "offsiteS3Endpoint": (None, False),
    "offsiteS3Region": (None, False),
    "offsiteS3AccessKeyId": (None, True),
    "offsiteS3SecretAccessKey": (None, True),
    "cacheHitsMetric": ("rag_cache_hits_total", False),
    "cacheMissesMetric": ("rag_cache_misses_total", False),
    "llmErrorsMetric": ("rag_llm_errors_total", False),
    "sloAvailability": ("99.5", False),
    "sloLatency": ("99", False),
    "sloLatencyThreshold": ("1", False),
    "alertGroupWait": (PageTimings.group_wait, False),
    "alertGroupInterval": (PageTimings.group_interval, False),
    "hostFirewall": ("managed", False),
    "hostSshKeyFile": ("~/.ssh/id_ed25519", False),
    "hostSshKnownHostsFile": ("~/.ssh/known_hosts", False),
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
        if value is None or not pattern.fullmatch(value):
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
    if stack not in (PROD, STAGING) and not _EPHEMERAL_STACK.fullmatch(stack):
        c.problems.append(
            f"stack name {stack!r} is unknown; expected 'prod', 'staging' or 'ephemeral-<suffix>' "
            "(lowercase letters, digits, dashes)"
        )


def _parse_smtp(c: _Collector) -> SmtpSettings:
    host, port = "", 0
    raw = c.get("smtpHost")
    match = re.fullmatch(r"(?P<host>[^:\s]+):(?P<port>[0-9]{1,5})", raw or "")
    if match and _HOSTNAME.fullmatch(match["host"]) and 1 <= int(match["port"]) <= 65535:
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


def _stack_ports(stack: str, raw: Mapping[str, str]) -> dict[str, int]:
    """The host ports ``stack`` publishes per its raw config (what can be told; a bad
    value is that stack's own problem, reported when it is deployed)."""
    ports: dict[str, int] = {}
    offset_text = raw.get("portOffset")
    offset = int(offset_text) if offset_text and offset_text.isdigit() else None
    for key in PROD_PORTS:
        explicit = raw.get(key)
        if explicit and explicit.isdigit():
            ports[key] = int(explicit)
        elif stack == PROD:
            ports[key] = PROD_PORTS[key]
        elif offset is not None:
            ports[key] = _NON_PROD_BASE_PORTS[key] + offset
    return ports


def _parse_ports(
    stack: str, c: _Collector, other_stacks: Mapping[str, Mapping[str, str]]
) -> PortSettings:
    is_prod = stack == PROD
    offset: int | None = None
    if is_prod:
        if c.get("portOffset") is not None:
            c.fail(
                "portOffset",
                c.get("portOffset"),
                "no portOffset on prod (prod publishes 80/443 and 9090/9093; "
                "set httpPort/httpsPort/prometheusPort/alertmanagerPort to move one)",
            )
    else:
        offset = c.integer("portOffset", 0, 50000)
        if offset == 0:
            c.fail("portOffset", "0", "a non-zero offset for every stack but prod, e.g. 10000")
    ports: dict[str, int] = {}
    # The key the user set for each port: its own key, or portOffset when derived.
    source: dict[str, str] = {}
    for key in PROD_PORTS:
        explicit = c.integer(key, 1, 65535)
        if explicit is not None:
            ports[key], source[key] = explicit, key
        elif is_prod:
            ports[key], source[key] = PROD_PORTS[key], key
        elif offset is not None:
            ports[key], source[key] = _NON_PROD_BASE_PORTS[key] + offset, "portOffset"
            if ports[key] > 65535:
                c.fail("portOffset", str(offset), f"an offset that keeps {key} at most 65535")
        else:
            c.fail("portOffset", None, f"a port offset for stack {stack!r} (or set {key} directly)")

    def refuse(key: str, port: int, expected: str) -> None:
        set_by = source[key]
        value = c.get(set_by) if set_by == "portOffset" else str(port)
        derived = f" (it makes {key} {port})" if set_by == "portOffset" else ""
        c.fail(set_by, value, expected + derived)

    seen: dict[int, str] = {}
    for key, port in ports.items():
        if port in seen:
            refuse(key, port, f"a port not already used by {PROJECT}:{seen[port]} in this stack")
        seen.setdefault(port, key)
        # Binding below 1024 needs root on the host side: only prod's Caddy on 80/443.
        public = is_prod and (key, port) in (("httpPort", 80), ("httpsPort", 443))
        if port < _FIRST_UNPRIVILEGED_PORT and not public:
            refuse(
                key,
                port,
                f"a port from {_FIRST_UNPRIVILEGED_PORT} to 65535 (only prod's "
                "httpPort 80 and httpsPort 443 may be privileged)",
            )
        # prod's defaults, when its stack file is not at hand to say otherwise.
        if not is_prod and PROD not in other_stacks and port in PROD_PORTS.values():
            refuse(key, port, "a port prod does not publish (80, 443, 9090, 9093 are prod's)")
        for other, other_raw in sorted(other_stacks.items()):
            taken = {p: k for k, p in _stack_ports(other, other_raw).items()}
            if other != stack and port in taken:
                refuse(
                    key,
                    port,
                    f"a port stack {other!r} does not publish "
                    f"({PROJECT}:{taken[port]} of {other} is {port})",
                )
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
    if digest is not None and not _DIGEST.fullmatch(digest):
        c.fail("imageDigest", digest, "sha256: followed by 64 lowercase hex digits")
        digest = None
    build_context = c.get("buildContext")
    if build_context is not None and not (Path(build_context) / "Dockerfile.prod").is_file():
        c.fail("buildContext", build_context, "an existing directory containing Dockerfile.prod")
    local_image_id = c.get("localImageId")
    if local_image_id is not None and not _DIGEST.match(local_image_id):
        c.fail("localImageId", local_image_id, "sha256: followed by 64 lowercase hex digits")
        local_image_id = None
    if local_image_id is not None and build_context is not None:
        c.fail("localImageId", local_image_id, "no buildContext at the same time (one image)")
    username = c.get("ghcrUsername")
    token = c.secret("ghcrToken", required=build_context is not None)
    return ImageSettings(
        repository=repository,
        tag=tag,
        digest=digest,
        build_context=build_context,
        ghcr_username=username,
        ghcr_token=token,
        local_image_id=local_image_id,
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
        offsite=_parse_offsite(c),
    )


_OFFSITE_SFTP = re.compile(
    r"^sftp://(?P<user>[A-Za-z0-9._-]+)@(?P<host>[A-Za-z0-9.-]+)(:(?P<port>[0-9]{1,5}))?"
    r"/(?P<path>[A-Za-z0-9._/-]*)$"
)
_OFFSITE_S3 = re.compile(r"^s3://(?P<path>[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/[A-Za-z0-9._/-]*)?)$")
_LOOPBACK_HTTP = re.compile(r"^http://(127\.0\.0\.1|localhost|\[::1\])(:[0-9]{1,5})?/?$")
_HTTPS_URL = re.compile(r"^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?/?$")
_REGION = re.compile(r"^[a-z0-9-]{1,40}$")
_KNOWN_HOSTS_LINE = re.compile(
    r"^(\S+) (ssh-ed25519|ecdsa-sha2-nistp\d+|ssh-rsa) [A-Za-z0-9+/=]+( .*)?$"
)


def _parse_offsite(c: _Collector) -> OffsiteSettings | None:
    """``offsiteTarget``: sftp://user@host[:port]/path or s3://bucket[/prefix]; unset =
    no off-host copy. Each stack's copies go under <path>/<stack>."""
    raw = c.get("offsiteTarget")
    if raw is None:
        return None
    path_ok = "no '..' segment"
    sftp, s3 = _OFFSITE_SFTP.match(raw), _OFFSITE_S3.match(raw)
    expected = "sftp://user@host[:port]/path or s3://bucket[/prefix] (letters, digits, . _ - /)"
    if (sftp is None and s3 is None) or ".." in raw.split("/"):
        c.fail("offsiteTarget", raw, f"{expected}, {path_ok}")
        return None
    if sftp is not None:
        port = int(sftp["port"] or 22)
        if not 1 <= port <= 65535 or not _HOSTNAME.match(sftp["host"]):
            c.fail("offsiteTarget", raw, expected)
        known = c.get("offsiteSshKnownHosts") or ""
        lines = [line for line in known.splitlines() if line.strip()]
        if not lines or not all(_KNOWN_HOSTS_LINE.match(line) for line in lines):
            c.fail(
                "offsiteSshKnownHosts",
                c.get("offsiteSshKnownHosts"),
                "the target's host key line(s) in known_hosts format, e.g. the output of "
                f"`ssh-keyscan -p {port} {sftp['host']}` (checked, never trusted on first use)",
            )
        ssh_key = c.secret("offsiteSshKey", required=True)
        return OffsiteSettings(
            kind="sftp",
            path=sftp["path"],
            host=sftp["host"],
            port=port,
            user=sftp["user"],
            ssh_key=ssh_key,
            known_hosts="\n".join(lines) + "\n",
        )
    assert s3 is not None
    endpoint = c.get("offsiteS3Endpoint")
    if endpoint is not None and not (_HTTPS_URL.match(endpoint) or _LOOPBACK_HTTP.match(endpoint)):
        c.fail("offsiteS3Endpoint", endpoint, "an https:// URL of the S3-compatible service")
        endpoint = None
    region = c.get("offsiteS3Region")
    if region is not None and not _REGION.match(region):
        c.fail("offsiteS3Region", region, "a region name, e.g. eu-central-1")
        region = None
    return OffsiteSettings(
        kind="s3",
        path=s3["path"],
        s3_endpoint=endpoint,
        s3_region=region,
        s3_access_key_id=c.secret("offsiteS3AccessKeyId", required=True),
        s3_secret_access_key=c.secret("offsiteS3SecretAccessKey", required=True),
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
    expected = (
        "an absolute path on the Docker host, without '..', outside the system "
        f"directories ({', '.join(SYSTEM_DIRECTORIES)}), not /"
    )
    segments = value.split("/")
    if (
        not value.startswith("/")
        or any(not ch.isprintable() for ch in value)
        or ".." in segments
        or "." in segments
    ):
        c.fail(key, value, expected)
        return None
    normal = posixpath.normpath("/" + value.lstrip("/"))
    if normal == "/" or any(
        normal == system or normal.startswith(system + "/") for system in SYSTEM_DIRECTORIES
    ):
        c.fail(key, value, expected)
        return None
    if must_exist and not Path(value).is_dir():
        c.fail(key, value, "an existing directory on the Docker host")
        return None
    return value


_SSH_HOST = re.compile(
    r"^ssh://(?:(?P<user>[a-z_][a-z0-9_.-]{0,31})@)?(?P<host>[A-Za-z0-9.-]+|\[[0-9a-fA-F:]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?/?"
)


def _parse_host_firewall(c: _Collector, docker_host: str | None) -> HostFirewallSettings:
    mode = c.get("hostFirewall")
    if mode not in ("managed", "external"):
        c.fail(
            "hostFirewall",
            mode,
            "managed (pulumi up applies scripts/host-firewall.sh) or external (the host's "
            "firewall is managed elsewhere)",
        )
        return HostFirewallSettings(managed=False)
    files = {}
    for key in ("hostSshKeyFile", "hostSshKnownHostsFile"):
        value = c.get(key) or ""
        if not (value.startswith("/") or value.startswith("~/")):
            c.fail(key, value, "a path on the machine running Pulumi (/... or ~/...)")
        files[key] = value
    settings = HostFirewallSettings(
        managed=mode == "managed",
        ssh_key_file=files["hostSshKeyFile"],
        known_hosts_file=files["hostSshKnownHostsFile"],
    )
    if mode == "external" or docker_host is None or docker_host.startswith("unix://"):
        return settings
    match = _SSH_HOST.fullmatch(docker_host)
    if not match:
        c.problems.append(
            f"docker:host = {docker_host!r} cannot be reached to apply the host firewall; "
            "expected ssh://user@host[:port] (or unix://), or set "
            f"{PROJECT}:hostFirewall external when the host's firewall is managed elsewhere"
        )
        return settings
    port = int(match["port"] or 22)
    if not 1 <= port <= 65535:
        c.problems.append(f"docker:host = {docker_host!r} has port {port}; expected 1-65535")
    user = match["user"] or getpass.getuser()  # what the ssh client would use
    return HostFirewallSettings(
        managed=True,
        ssh=SshTarget(user=user, host=match["host"].strip("[]"), port=port),
        ssh_key_file=settings.ssh_key_file,
        known_hosts_file=settings.known_hosts_file,
    )


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    duplicates = sorted({k for k in keys if keys.count(k) > 1})
    if duplicates:
        raise ValueError(f"duplicate key(s) {', '.join(duplicates)}")
    return dict(pairs)


def _parse_adopt_volumes(stack: str, c: _Collector) -> dict[str, str]:
    raw = c.get("adoptVolumes")
    if raw is None:
        return {}
    expected = (
        "a map from " + "/".join(ADOPTABLE_VOLUMES) + " (each at most once) to existing "
        'Docker volume names, e.g. {"postgres": "rag_postgres_data"}'
    )
    try:
        parsed = json.loads(raw, object_pairs_hook=_refuse_duplicate_keys)
    except ValueError as error:  # JSONDecodeError is one
        c.fail("adoptVolumes", raw, f"{expected} ({error})")
        return {}
    if not isinstance(parsed, dict):
        c.fail("adoptVolumes", raw, expected)
        return {}
    result: dict[str, str] = {}
    for role, name in parsed.items():
        if role not in ADOPTABLE_VOLUMES or not isinstance(name, str):
            c.fail("adoptVolumes", raw, expected)
        elif not _VOLUME_NAME.fullmatch(name):
            c.fail(f"adoptVolumes.{role}", name, "a Docker volume name")
        elif name.startswith("rag-") and not name.startswith(f"rag-{stack}-"):
            # rag-<stack>-... volumes belong to that stack: adopting one would run this
            # stack on another stack's data.
            c.fail(
                f"adoptVolumes.{role}",
                name,
                f"a volume that is not another stack's (rag-<stack>-... names are managed "
                f"by that stack; this stack is {stack!r})",
            )
        else:
            result[role] = name
    roles_by_name: dict[str, list[str]] = {}
    for role, name in result.items():
        roles_by_name.setdefault(name, []).append(role)
    for name, roles in roles_by_name.items():
        if len(roles) > 1:
            c.fail(
                "adoptVolumes",
                raw,
                f"one volume per role (volume {name!r} is given to {' and '.join(roles)})",
            )
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


_PAGE_TIMING_KEYS = {"group_wait": "alertGroupWait", "group_interval": "alertGroupInterval"}


def _parse_page_timings(c: _Collector) -> PageTimings:
    """Alertmanager's timings for mailed alerts; the checks are the monitoring's own."""
    timings = PageTimings(**{name: c.get(key) or "" for name, key in _PAGE_TIMING_KEYS.items()})
    for name, expected in page_timing_problems(timings).items():
        c.fail(_PAGE_TIMING_KEYS[name], c.get(_PAGE_TIMING_KEYS[name]), expected)
    return timings


def _parse_api_user(c: _Collector) -> str:
    """uid or uid:gid, never root: the api and the backup job run as it, and the
    volume-init step chowns to it."""
    value = c.get("apiUser")
    expected = (
        f"uid or uid:gid with ids from {_MIN_ID} to {_MAX_ID} (never 0, root), e.g. 1000:1000"
    )
    match = re.fullmatch(r"([0-9]{1,10})(?::([0-9]{1,10}))?", value or "")
    ids = [int(part) for part in match.groups() if part is not None] if match else []
    if not ids or not all(_MIN_ID <= i <= _MAX_ID for i in ids):
        c.fail("apiUser", value, expected)
        return ""
    assert value is not None
    return value


def _parse_heartbeat_url(c: _Collector) -> str | None:
    """An https URL Alertmanager can take as it is: no quotes, braces, spaces or control
    characters; plain http only with heartbeatAllowHttp (the request carries no secret,
    but an on-path attacker could fake the receiver's silence)."""
    allow_http = c.boolean("heartbeatAllowHttp")
    value = c.get("heartbeatUrl")
    if value is None:
        return None
    schemes = "https" + (" or http" if allow_http else "")
    match = _HEARTBEAT_URL.fullmatch(value)
    if match is None or not _HOSTNAME.fullmatch(match["host"]):
        c.fail(
            "heartbeatUrl",
            value,
            f"an {schemes} URL with a DNS name or IPv4 host and no quotes, braces, "
            "spaces or backslashes, e.g. https://hc-ping.com/<uuid>",
        )
        return None
    if match["scheme"] == "http" and not allow_http:
        c.fail(
            "heartbeatUrl",
            value,
            "an https:// URL (set heartbeatAllowHttp=true to allow plain http)",
        )
        return None
    return value


def parse_stack_config(
    stack: str,
    raw: Mapping[str, str],
    secret_keys: frozenset[str] | set[str] = frozenset(),
    docker_host: str | None = None,
    other_stacks: Mapping[str, Mapping[str, str]] | None = None,
) -> StackConfig:
    """Validate ``raw`` (key -> string, as Pulumi stores config) for ``stack``.

    ``secret_keys`` are the keys Pulumi holds encrypted. ``docker_host`` is the
    ``docker:host`` setting: host paths are only checked for existence when the
    engine is local, because a remote host's paths cannot be seen from here.
    ``other_stacks``: the raw config of the stacks sharing the host, whose ports this
    stack may not take; by default the project's committed Pulumi.<stack>.yaml files.
    """
    if other_stacks is None:
        other_stacks = read_other_stacks(stack)
    c = _Collector(raw, secret_keys)
    _check_stack_name(stack, c)
    for key in sorted(set(raw) - KNOWN_KEYS):
        close = difflib.get_close_matches(key, KNOWN_KEYS, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        c.problems.append(f"{PROJECT}:{key} is not a known setting{hint}")

    domain = c.text("domain", _HOSTNAME, "a DNS name, e.g. api.example.com")
    alert_email = c.text("alertEmail", _EMAIL, "an email address, e.g. you@example.com")
    smtp = _parse_smtp(c)
    ports = _parse_ports(stack, c, other_stacks)

    log_level = (c.get("logLevel") or "").upper()
    if log_level not in _LOG_LEVELS:
        c.fail("logLevel", c.get("logLevel"), f"one of {', '.join(_LOG_LEVELS)}")
    queries = c.integer("sessionQueriesPerHour", 1, 100000) or 0
    api_user = _parse_api_user(c)

    caddy_tls = c.get("caddyTls") or ("acme" if stack == PROD else "internal")
    if caddy_tls not in ("acme", "internal"):
        c.fail("caddyTls", caddy_tls, "acme (public certificates) or internal (Caddy's own CA)")

    heartbeat = _parse_heartbeat_url(c)

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
        adopt_volumes=_parse_adopt_volumes(stack, c),
        docs_host_path=_host_path(c, "docsHostPath", must_exist=local_engine),
        mds_host_path=_host_path(c, "mdsHostPath", must_exist=local_engine),
        slo=_parse_slo(c),
        host_firewall=_parse_host_firewall(c, docker_host),
        page_timings=_parse_page_timings(c),
    )
    if c.problems:
        raise ConfigError(c.problems)
    return config


def read_other_stacks(stack: str, project_dir: Path = PROJECT_DIR) -> dict[str, dict[str, str]]:
    """Raw config of the stacks that share the host with ``stack``, from the project's
    committed Pulumi.<stack>.yaml files: prod and staging see each other, an ephemeral
    stack sees both. A missing or unreadable file contributes nothing."""
    import yaml

    others = {}
    for other in (PROD, STAGING):
        path = project_dir / f"Pulumi.{other}.yaml"
        if other == stack or not path.is_file():
            continue
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:
            continue
        config = document.get("config") if isinstance(document, dict) else None
        if isinstance(config, dict):
            prefix = f"{PROJECT}:"
            others[other] = {
                k[len(prefix) :]: str(v)
                for k, v in config.items()
                if isinstance(k, str) and k.startswith(prefix) and not isinstance(v, dict)
            }
    return others


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
    # The provider's own precedence: docker:host, else DOCKER_HOST (the workflows set it).
    docker_host = everything.get("docker:host") or os.environ.get("DOCKER_HOST") or None
    return parse_stack_config(pulumi.get_stack(), raw, secret_keys, docker_host)
