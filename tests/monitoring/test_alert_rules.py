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
    expected_labels = {"severity": ALERTS_BY_NAME[alert].severity, **scenario.labels}
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
    test, path = _promtool_test(alert, settings(), scenario, tmp_path)
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
