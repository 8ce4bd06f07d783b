"""Every alert rule, run by the real ``promtool test rules`` on synthetic series.

For each alert: it is silent just before its ``for`` has elapsed, fires just after with the
expected labels, and stays silent in the healthy scenarios. Annotations are checked apart
(test_rendered_files.py): promtool compares them verbatim, and copying the rendered text
into the expectations would only restate the code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.monitoring_config import (
    ALERTS,
    ALERTS_BY_NAME,
    MonitoringSettings,
    dump_yaml,
    parse_duration,
    render_alert_rules,
)
from tests.monitoring.helpers import run_tool, settings
from tests.tooling import require_tool

pytestmark = pytest.mark.integration

API = 'job="api",instance="rag-staging-api:8000"'
REDIS = 'job="redis-exporter",instance="rag-staging-redis-exporter:9121"'
POSTGRES = 'job="postgres-exporter",instance="rag-staging-postgres-exporter:9187"'
NODE = 'job="node-exporter",instance="rag-staging-node-exporter:9100"'
ALERTMANAGER = 'job="alertmanager",instance="rag-staging-alertmanager:9093"'
NOTIFY_FAILED = "alertmanager_notifications_failed_total"
LAST_BACKUP = "rag_backup_last_success_timestamp_seconds"
SITE_URL = "https://staging.api.example.com/health"
OFFSITE = "rag_backup_offsite_last_success_timestamp_seconds"
HOUR = 3600.0
DAY = 24 * HOUR
# Long scenarios sample every 4 minutes: a wider gap than the 5m lookback would make the
# series blink out between samples and restart every `for`.
SLOW = 240.0
PER_DAY = int(DAY / SLOW)


@dataclass(frozen=True)
class Scenario:
    """Input series and what the alert must do with them.

    ``onset`` is the time (seconds) from which the condition holds; ``None`` means it never
    does and the alert must stay silent at every ``check_at`` time.
    """

    name: str
    series: dict[str, str]
    onset: float | None
    labels: dict[str, str] = field(default_factory=dict)
    interval: float = 60.0
    check_at: tuple[float, ...] = ()
    # MonitoringSettings fields that differ from the production defaults in this scenario.
    overrides: dict[str, Any] = field(default_factory=dict)


def scenarios_for(alert: str) -> list[Scenario]:
    healthy_hour = (10 * 60.0, HOUR)
    table: dict[str, list[Scenario]] = {
        "Watchdog": [Scenario("always", {}, onset=0.0)],
        "TargetDown": [
            Scenario(
                "exporter unreachable",
                {f"up{{{REDIS}}}": "1 1 0x30"},
                onset=120,
                labels={"job": "redis-exporter", "instance": "rag-staging-redis-exporter:9121"},
            ),
            Scenario("all up", {f"up{{{REDIS}}}": "1x60"}, None, check_at=healthy_hour),
        ],
        "APIDown": [
            Scenario("scrape fails", {f"up{{{API}}}": "1 1 0x30"}, onset=120),
            Scenario("target vanished", {f"up{{{API}}}": "1 1 stale"}, onset=120),
            Scenario("api up", {f"up{{{API}}}": "1x60"}, None, check_at=healthy_hour),
        ],
        "RedisDown": [
            Scenario(
                "redis refuses the exporter",
                {f"redis_up{{{REDIS}}}": "1 1 0x30", f"up{{{REDIS}}}": "1x32"},
                onset=120,
            ),
            # Measured on Docker: with Redis stopped, the exporter's scrape outlived the
            # scrape timeout, so up went 0 and redis_up vanished instead of turning 0.
            Scenario(
                "exporter scrape times out, redis_up vanishes",
                {f"redis_up{{{REDIS}}}": "1 1 stale", f"up{{{REDIS}}}": "1 1 0x30"},
                onset=120,
            ),
            Scenario("never scraped", {f"up{{{REDIS}}}": "1x30"}, onset=0),
            Scenario(
                "redis up",
                {f"redis_up{{{REDIS}}}": "1x60", f"up{{{REDIS}}}": "1x60"},
                None,
                check_at=healthy_hour,
            ),
        ],
        "PostgresDown": [
            Scenario(
                "postgres refuses the exporter",
                {f"pg_up{{{POSTGRES}}}": "1 1 0x30", f"up{{{POSTGRES}}}": "1x32"},
                onset=120,
            ),
            Scenario(
                "exporter scrape times out, pg_up vanishes",
                {f"pg_up{{{POSTGRES}}}": "1 1 stale", f"up{{{POSTGRES}}}": "1 1 0x30"},
                onset=120,
            ),
            Scenario(
                "postgres up",
                {f"pg_up{{{POSTGRES}}}": "1x60", f"up{{{POSTGRES}}}": "1x60"},
                None,
                check_at=healthy_hour,
            ),
        ],
        "HighErrorRate": [
            Scenario(
                "10% grouped 5xx",
                {
                    f'http_requests_total{{{API},status="2xx"}}': "0+90x60",
                    f'http_requests_total{{{API},status="5xx"}}': "0+10x60",
                },
                onset=60,
            ),
            Scenario(
                "10% plain 503",
                {
                    f'http_requests_total{{{API},status="200"}}': "0+90x60",
                    f'http_requests_total{{{API},status="503"}}': "0+10x60",
                },
                onset=60,
            ),
            Scenario(
                "1% errors",
                {
                    f'http_requests_total{{{API},status="2xx"}}': "0+99x60",
                    f'http_requests_total{{{API},status="5xx"}}': "0+1x60",
                },
                None,
                check_at=healthy_hour,
            ),
            Scenario(
                "404s are not errors",
                {
                    f'http_requests_total{{{API},status="2xx"}}': "0+50x60",
                    f'http_requests_total{{{API},status="4xx"}}': "0+50x60",
                },
                None,
                check_at=healthy_hour,
            ),
            Scenario(
                "no traffic",
                {f'http_requests_total{{{API},status="2xx"}}': "0x60"},
                None,
                check_at=healthy_hour,
            ),
        ],
        "HighLatency": [
            Scenario("p95 near 10s", _latency_buckets(fast=0, slow=100), onset=60),
            Scenario(
                "p95 under 1s", _latency_buckets(fast=100, slow=0), None, check_at=healthy_hour
            ),
            Scenario("p95 at 4s", _latency_buckets(fast=96, slow=4), None, check_at=healthy_hour),
        ],
        "CacheHitRateLow": [
            Scenario(
                "30% hits",
                {
                    'rag_cache_hits_total{job="api"}': "0+3x90",
                    'rag_cache_misses_total{job="api"}': "0+7x90",
                },
                onset=60,
            ),
            Scenario(
                "80% hits",
                {
                    'rag_cache_hits_total{job="api"}': "0+8x90",
                    'rag_cache_misses_total{job="api"}': "0+2x90",
                },
                None,
                check_at=healthy_hour,
            ),
            Scenario(
                "no lookups",
                {
                    'rag_cache_hits_total{job="api"}': "0x90",
                    'rag_cache_misses_total{job="api"}': "0x90",
                },
                None,
                check_at=healthy_hour,
            ),
        ],
        "LLMErrorsHigh": [
            Scenario("5 errors a minute", {'rag_llm_errors_total{job="api"}': "0+5x60"}, onset=60),
            Scenario(
                "one error every 4 minutes",
                {'rag_llm_errors_total{job="api"}': "0+0.25x60"},
                None,
                check_at=healthy_hour,
            ),
        ],
        "DiskSpaceLow": [
            Scenario(
                "host root 90% full",
                _filesystem(avail="10x30", size="100x30", fstype="ext4", mountpoint="/"),
                onset=0,
                labels={
                    "job": "node-exporter",
                    "instance": "rag-staging-node-exporter:9100",
                    "device": "/dev/sda1",
                    "fstype": "ext4",
                    "mountpoint": "/",
                },
            ),
            Scenario(
                "host root 80% full",
                _filesystem(avail="20x70", size="100x70", fstype="ext4", mountpoint="/"),
                None,
                check_at=healthy_hour,
            ),
            Scenario(
                "a full tmpfs is not the disk",
                _filesystem(avail="1x70", size="100x70", fstype="tmpfs", mountpoint="/run"),
                None,
                check_at=healthy_hour,
            ),
        ],
        "BackupTooOld": [
            # Timestamps are seconds since the test's time 0; the last success stays at 0.
            Scenario(
                "postgres backup stopped succeeding",
                {
                    f'{LAST_BACKUP}{{{NODE},component="postgres"}}': f"0x{2 * PER_DAY}",
                    f'{LAST_BACKUP}{{{NODE},component="redis"}}': (f"0+{SLOW:.0f}x{2 * PER_DAY}"),
                },
                onset=26 * HOUR,
                labels={"component": "postgres"},
                interval=SLOW,
            ),
            Scenario(
                "no backup metrics at all",
                {f"up{{{NODE}}}": "1x30"},
                onset=0,
                labels={"job": "node-exporter"},
            ),
            Scenario(
                "daily backups",
                {
                    f'{LAST_BACKUP}{{{NODE},component="{c}"}}': (
                        "0 " + " ".join(f"{d * DAY:.0f}x{PER_DAY}" for d in range(1, 4))
                    )
                    for c in ("postgres", "redis", "chroma", "all")
                },
                None,
                interval=SLOW,
                check_at=(25 * HOUR, 2 * DAY + 23 * HOUR),
            ),
        ],
        "RestoreDrillFailed": [
            Scenario(
                "last drill failed",
                {
                    f"rag_restore_drill_last_run_success{{{NODE}}}": "1 1 0x30",
                    f"rag_restore_drill_last_success_timestamp_seconds{{{NODE}}}": "0x32",
                },
                onset=120,
            ),
            Scenario(
                "drills stopped running",
                {
                    f"rag_restore_drill_last_run_success{{{NODE}}}": f"1x{9 * PER_DAY}",
                    f"rag_restore_drill_last_success_timestamp_seconds{{{NODE}}}": (
                        f"0x{9 * PER_DAY}"
                    ),
                },
                onset=8 * DAY,
                interval=SLOW,
            ),
            Scenario(
                "weekly drills succeed",
                {
                    f"rag_restore_drill_last_run_success{{{NODE}}}": f"1x{14 * PER_DAY}",
                    # The drill succeeds at day 0 and day 7.
                    f"rag_restore_drill_last_success_timestamp_seconds{{{NODE}}}": (
                        f"0x{7 * PER_DAY - 1} {7 * DAY:.0f}x{7 * PER_DAY}"
                    ),
                },
                None,
                interval=SLOW,
                check_at=(6 * DAY, 13 * DAY),
            ),
        ],
        **_probe_scenarios(),
        **_slo_scenarios(),
        **_backup_job_scenarios(),
        "VolumeFillingUp": _volume_scenarios(),
        "OffsiteBackupStale": [
            Scenario(
                "off-host copies stopped succeeding",
                {f"{OFFSITE}{{{NODE}}}": f"0+{SLOW:.0f}x{PER_DAY} {DAY:.0f}x{2 * PER_DAY}"},
                onset=DAY + 26 * HOUR,
                interval=SLOW,
            ),
            Scenario(
                "daily copies",
                {f"{OFFSITE}{{{NODE}}}": " ".join(f"{d * DAY:.0f}x{PER_DAY}" for d in range(4))},
                None,
                interval=SLOW,
                check_at=(25 * HOUR, 3 * DAY + 23 * HOUR),
            ),
            Scenario(
                "no off-host target on this stack",
                {f"up{{{NODE}}}": "1x60"},
                None,
                check_at=healthy_hour,
            ),
        ],
        "AlertmanagerNotificationsFailing": [
            Scenario(
                "email sends fail",
                {
                    f'{NOTIFY_FAILED}{{{ALERTMANAGER},integration="email"}}': "0+1x60",
                    f'{NOTIFY_FAILED}{{{ALERTMANAGER},integration="webhook"}}': "0x60",
                },
                onset=60,
                labels={"integration": "email"},
            ),
            Scenario(
                "no failures",
                {f'{NOTIFY_FAILED}{{{ALERTMANAGER},integration="email"}}': "0x60"},
                None,
                check_at=healthy_hour,
            ),
        ],
    }
    return table[alert]


SITE = f'job="probe-site",instance="{SITE_URL}"'
PROBE_API = 'job="probe-api",instance="http://rag-staging-api:8000/health"'
PROBE_REDIS = 'job="probe-redis",instance="rag-staging-redis:6379"'
CERT_EXPIRY = "probe_ssl_earliest_cert_expiry"


def _probe_scenarios() -> dict[str, list[Scenario]]:
    healthy_hour = (10 * 60.0, HOUR)
    site_labels = {"job": "probe-site", "instance": SITE_URL}
    redis_labels = {"job": "probe-redis", "instance": "rag-staging-redis:6379"}
    return {
        "SiteDown": [
            Scenario(
                "site answers 500", {f"probe_success{{{SITE}}}": "1 1 0x30"}, 120, site_labels
            ),
            Scenario(
                "api health fails",
                {f"probe_success{{{PROBE_API}}}": "1 1 0x30"},
                120,
                {"job": "probe-api", "instance": "http://rag-staging-api:8000/health"},
            ),
            Scenario(
                "a failing Redis handshake is not the site",
                {f"probe_success{{{PROBE_REDIS}}}": "0x60", f"probe_success{{{SITE}}}": "1x60"},
                None,
                check_at=healthy_hour,
            ),
            Scenario(
                "one failed probe", {f"probe_success{{{SITE}}}": "1 0 1x60"}, None, check_at=(HOUR,)
            ),
        ],
        "SiteSlow": [
            Scenario("3s answers", {f"probe_duration_seconds{{{SITE}}}": "3x60"}, 0, site_labels),
            Scenario(
                "fast answers",
                {f"probe_duration_seconds{{{SITE}}}": "0.3x60"},
                None,
                check_at=healthy_hour,
            ),
            Scenario(
                "a single slow answer",
                {f"probe_duration_seconds{{{SITE}}}": "0.3x10 8 0.3x50"},
                None,
                check_at=(11 * 60.0, 13 * 60.0, HOUR),
            ),
        ],
        "CertificateExpiringSoon": [
            # The value is the expiry as a Unix time; the test clock starts at 0.
            Scenario(
                "Redis certificate 13 days from expiry",
                {f"{CERT_EXPIRY}{{{PROBE_REDIS}}}": f"{13 * DAY:.0f}x60"},
                0,
                redis_labels,
            ),
            Scenario(
                "Redis certificate crosses 14 days left",
                {f"{CERT_EXPIRY}{{{PROBE_REDIS}}}": f"{14 * DAY + 1800:.0f}x90"},
                1800,
                redis_labels,
            ),
            Scenario(
                "public certificate 10 days from expiry",
                {f"{CERT_EXPIRY}{{{SITE}}}": f"{10 * DAY:.0f}x60"},
                0,
                site_labels,
            ),
            Scenario(
                "renewal due (30 days left) but not missed",
                {
                    f"{CERT_EXPIRY}{{{PROBE_REDIS}}}": f"{30 * DAY:.0f}x60",
                    f"{CERT_EXPIRY}{{{SITE}}}": f"{30 * DAY:.0f}x60",
                },
                None,
                check_at=healthy_hour,
            ),
            Scenario(
                "Caddy's internal CA: 8 hours left is normal",
                {f"{CERT_EXPIRY}{{{SITE}}}": f"{8 * HOUR:.0f}x60"},
                None,
                check_at=(HOUR,),
                overrides={"caddy_tls": "internal"},
            ),
            Scenario(
                "Caddy's internal CA: renewal missed",
                {f"{CERT_EXPIRY}{{{SITE}}}": f"{HOUR:.0f}x60"},
                0,
                site_labels,
                overrides={"caddy_tls": "internal"},
            ),
        ],
    }


CADDY = 'job="caddy",instance="rag-staging-caddy:2020",handler="subroute",server="srv0"'


def _caddy_traffic(
    per_minute: int, answered_5xx: int = 0, unreachable: int = 0, slow: int = 0
) -> dict[str, str]:
    """Caddy's counters for ``per_minute`` api requests: ``answered_5xx`` 5xx from the api,
    ``unreachable`` 502s of Caddy itself (no duration sample, as measured on real Caddy),
    ``slow`` answered requests over the 1 s threshold."""
    answered = per_minute - unreachable
    series = {
        f"caddy_http_requests_total{{{CADDY}}}": f"0+{per_minute}x400",
        f'caddy_http_request_duration_seconds_count{{{CADDY},code="200"}}': (
            f"0+{answered - answered_5xx}x400"
        ),
    }
    if answered_5xx:
        series[f'caddy_http_request_duration_seconds_count{{{CADDY},code="500"}}'] = (
            f"0+{answered_5xx}x400"
        )
    if unreachable:
        series[f"caddy_http_request_errors_total{{{CADDY}}}"] = f"0+{unreachable}x400"
    bucket = "caddy_http_request_duration_seconds_bucket"
    for le, count in (("0.5", answered - slow), ("1", answered - slow), ("+Inf", answered)):
        series[f'{bucket}{{{CADDY},code="200",le="{le}"}}'] = f"0+{count}x400"
    return series


def _slo_scenarios() -> dict[str, list[Scenario]]:
    """Budget: 0.5% errors (99.5% availability), 1% slow (99% under 1 s). Fast burn pages
    above 14.4x the budget, slow burn tickets above 6x."""
    normal = (HOUR, 6 * HOUR)
    return {
        "APIErrorBudgetFastBurn": [
            Scenario("10% 5xx from the api", _caddy_traffic(100, answered_5xx=10), 60),
            Scenario("10% 502, api unreachable", _caddy_traffic(100, unreachable=10), 60),
            Scenario(
                "4% errors: slow burn only",
                _caddy_traffic(100, answered_5xx=4),
                None,
                check_at=normal,
            ),
            Scenario(
                "normal 0.2% errors", _caddy_traffic(500, answered_5xx=1), None, check_at=normal
            ),
            Scenario("no traffic", _caddy_traffic(0), None, check_at=normal),
        ],
        "APIErrorBudgetSlowBurn": [
            Scenario("4% errors", _caddy_traffic(100, answered_5xx=4), 60),
            Scenario("4% of 502s", _caddy_traffic(100, unreachable=4), 60),
            Scenario(
                "normal 0.2% errors", _caddy_traffic(500, answered_5xx=1), None, check_at=normal
            ),
        ],
        "APILatencyBudgetFastBurn": [
            Scenario("20% over 1s", _caddy_traffic(100, slow=20), 60),
            Scenario(
                "8% over 1s: slow burn only", _caddy_traffic(100, slow=8), None, check_at=normal
            ),
            Scenario("normal 0.5% over 1s", _caddy_traffic(200, slow=1), None, check_at=normal),
        ],
        "APILatencyBudgetSlowBurn": [
            Scenario("8% over 1s", _caddy_traffic(100, slow=8), 60),
            Scenario("normal 0.5% over 1s", _caddy_traffic(200, slow=1), None, check_at=normal),
        ],
    }


JOB_SUCCESS = "rag_backup_scheduler_job_success"
# rag-backup's store metrics (rag_backup/metrics.py), through the node-exporter textfile.
VERIFY_FAILED = f"rag_backup_newest_verification_failed{{{NODE}}}"


def _backup_job_scenarios() -> dict[str, list[Scenario]]:
    healthy = (10 * 60.0, HOUR)
    # The scheduler's own job="..." label is renamed exported_job by the node-exporter scrape.
    backup_job = f'{JOB_SUCCESS}{{{NODE},exported_job="backup"}}'
    drill_job = f'{JOB_SUCCESS}{{{NODE},exported_job="drill"}}'
    node_labels = {"job": "node-exporter", "instance": "rag-staging-node-exporter:9100"}
    return {
        "BackupJobFailed": [
            Scenario(
                "backup job failed",
                {backup_job: "1 1 0x30", drill_job: "1x32"},
                120,
                {**node_labels, "exported_job": "backup"},
            ),
            Scenario(
                "drill job failed",
                {backup_job: "1x32", drill_job: "1 1 0x30"},
                120,
                {**node_labels, "exported_job": "drill"},
            ),
            Scenario(
                "jobs succeed", {backup_job: "1x60", drill_job: "1x60"}, None, check_at=healthy
            ),
        ],
        "BackupVerificationFailed": [
            Scenario("newest backup failed verification", {VERIFY_FAILED: "0 0 1x30"}, 120),
            Scenario(
                "job failed but the newest backup verifies (BackupJobFailed's case)",
                {VERIFY_FAILED: "0x60", backup_job: "1 1 0x30"},
                None,
                check_at=healthy,
            ),
            Scenario("verified backup", {VERIFY_FAILED: "0x60"}, None, check_at=healthy),
        ],
    }


def _volume_scenarios() -> list[Scenario]:
    """The backups on their own disk (/srv), PostgreSQL and Redis volumes on the host root."""
    on_srv = {"volume_paths": {"backups": "/srv/rag-backups"}}
    default_volumes = "/var/lib/docker/volumes"
    gb = 1e9
    per_sample_10gb_a_day = 10 * gb * SLOW / DAY
    samples = 2 * PER_DAY
    steady = f"{400 * gb:.0f}x{samples}"
    filling = f"{5 * gb:.0f}-{per_sample_10gb_a_day:.0f}x{samples}"
    # 2 GB written once a day at 03:00 with 300 GB free: a step, not a trend to panic over.
    daily_backups = " ".join(f"{(300 - 2 * d) * gb:.0f}x{PER_DAY - 1}" for d in range(3))
    node = {"job": "node-exporter", "instance": "rag-staging-node-exporter:9100"}
    return [
        Scenario(
            "backups disk loses 10 GB a day with 5 GB left",
            {**_filesystem_at("/srv", filling), **_filesystem_at("/", steady)},
            SLOW,
            {**node, "volume": "backups"},
            interval=SLOW,
            overrides=on_srv,
        ),
        Scenario(
            "host root fills: the postgres volume lives there",
            {**_filesystem_at("/", filling)},
            SLOW,
            {**node, "volume": "postgres"},
            interval=SLOW,
            overrides={
                "volume_paths": {"postgres": f"{default_volumes}/rag-staging-postgres-data/_data"}
            },
        ),
        Scenario(
            "host root fills, the backups disk does not (longest mount point wins)",
            {**_filesystem_at("/srv", steady), **_filesystem_at("/", filling)},
            None,
            interval=SLOW,
            check_at=(2 * HOUR, DAY),
            overrides=on_srv,
        ),
        Scenario(
            "daily backups on a roomy disk",
            {**_filesystem_at("/", daily_backups)},
            None,
            interval=SLOW,
            check_at=(2 * HOUR, DAY + 4 * HOUR, 2 * DAY),
        ),
    ]


def _filesystem_at(mountpoint: str, avail: str) -> dict[str, str]:
    labels = f'{NODE},device="/dev/sd{len(mountpoint)}",fstype="ext4",mountpoint="{mountpoint}"'
    return {f"node_filesystem_avail_bytes{{{labels}}}": avail}


def _latency_buckets(fast: int, slow: int) -> dict[str, str]:
    """Per-minute request counts: ``fast`` requests under 1s, ``slow`` between 8s and 10s."""
    metric = "http_request_duration_seconds_bucket"
    total = fast + slow
    return {
        f'{metric}{{{API},le="1"}}': f"0+{fast}x60",
        f'{metric}{{{API},le="8"}}': f"0+{fast}x60",
        f'{metric}{{{API},le="10"}}': f"0+{total}x60",
        f'{metric}{{{API},le="+Inf"}}': f"0+{total}x60",
    }


def _filesystem(avail: str, size: str, fstype: str, mountpoint: str) -> dict[str, str]:
    labels = f'{NODE},device="/dev/sda1",fstype="{fstype}",mountpoint="{mountpoint}"'
    return {
        f"node_filesystem_avail_bytes{{{labels}}}": avail,
        f"node_filesystem_size_bytes{{{labels}}}": size,
    }


def _without_annotations(rules: dict[str, Any]) -> dict[str, Any]:
    return {
        "groups": [
            {
                **group,
                "rules": [
                    {k: v for k, v in r.items() if k != "annotations"} for r in group["rules"]
                ],
            }
            for group in rules["groups"]
        ]
    }


def _eval_times(scenario: Scenario, for_seconds: float) -> tuple[list[float], list[float]]:
    """(times it must be silent, times it must fire)."""
    if scenario.onset is None:
        return list(scenario.check_at), []
    step = scenario.interval
    # Rules are evaluated every `step`: the alert turns active at the first evaluation after
    # onset and fires at the first evaluation at least `for` later.
    fires = [scenario.onset + for_seconds + 2 * step]
    silent = [scenario.onset + for_seconds - step] if for_seconds >= step else []
    return silent, fires


def _promtool_test(
    alert: str, monitoring: MonitoringSettings, scenario: Scenario, tmp_path: Path
) -> tuple[dict[str, Any], Path]:
    rules = tmp_path / "alerts.yml"
    rules.write_text(dump_yaml(_without_annotations(render_alert_rules(monitoring))))
    for_seconds = parse_duration(monitoring.alert_for(alert))
    silent, fires = _eval_times(scenario, for_seconds)
    spec = ALERTS_BY_NAME[alert]
    expected_labels = {"severity": spec.severity, **spec.labels, **scenario.labels}
    checks: list[dict[str, Any]] = [
        {"eval_time": f"{t:.0f}s", "alertname": alert, "exp_alerts": []} for t in silent
    ]
    checks += [
        {
            "eval_time": f"{t:.0f}s",
            "alertname": alert,
            "exp_alerts": [{"exp_labels": expected_labels}],
        }
        for t in fires
    ]
    test = {
        "rule_files": [rules.name],
        "evaluation_interval": f"{scenario.interval:.0f}s",
        "tests": [
            {
                "name": f"{alert}: {scenario.name}",
                "interval": f"{scenario.interval:.0f}s",
                "input_series": [{"series": s, "values": v} for s, v in scenario.series.items()],
                "alert_rule_test": checks,
            }
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    return test, path


CASES = [
    pytest.param(alert.name, scenario, id=f"{alert.name}-{scenario.name.replace(' ', '_')}")
    for alert in ALERTS
    for scenario in scenarios_for(alert.name)
]


@pytest.mark.parametrize(("alert", "scenario"), CASES)
def test_alert_behaviour(alert: str, scenario: Scenario, tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    test, path = _promtool_test(alert, settings(**scenario.overrides), scenario, tmp_path)
    assert test["tests"][0]["alert_rule_test"], "a scenario must check at least one time"
    result = run_tool(promtool, "test", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, f"{alert} / {scenario.name}:\n{result.stdout}{result.stderr}"


def test_every_alert_has_a_firing_and_a_silent_scenario() -> None:
    for alert in ALERTS:
        scenarios = scenarios_for(alert.name)
        assert any(s.onset is not None for s in scenarios), f"{alert.name} never fires in tests"
        if alert.name != "Watchdog":
            assert any(s.onset is None for s in scenarios), f"{alert.name} has no silent case"


def test_custom_metric_names_are_what_the_alerts_read(tmp_path: Path) -> None:
    """Renamed app metrics (stack config) drive the alerts; the defaults then do nothing."""
    promtool = require_tool("promtool")
    from components.monitoring_config import AppMetricNames

    renamed = settings(metrics=AppMetricNames(llm_errors="myapp_llm_failures_total"))
    firing = Scenario("renamed counter", {'myapp_llm_failures_total{job="api"}': "0+5x60"}, 60)
    _, path = _promtool_test("LLMErrorsHigh", renamed, firing, tmp_path)
    result = run_tool(promtool, "test", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr

    default_name = Scenario(
        "old name ignored", {'rag_llm_errors_total{job="api"}': "0+5x60"}, None, check_at=(HOUR,)
    )
    _, path = _promtool_test("LLMErrorsHigh", renamed, default_name, tmp_path)
    result = run_tool(promtool, "test", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_for_override_shortens_only_the_named_alert(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    fast = settings(alert_for_overrides={"RedisDown": "0s"})
    scenario = Scenario("redis refuses", {f"redis_up{{{REDIS}}}": "0x10"}, onset=0)
    _, path = _promtool_test("RedisDown", fast, scenario, tmp_path)
    result = run_tool(promtool, "test", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert fast.alert_for("PostgresDown") == settings().alert_for("PostgresDown")
