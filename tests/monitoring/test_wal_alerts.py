"""WalArchiveLagging, WalArchiveFailing and OffsiteWalLagging, as rendered into alerts.yml,
run by the real ``promtool test rules`` on series shaped like rag_backup_wal.prom's and
rag_backup_offsite_wal.prom's (node_exporter's textfile collector): each fires when its
condition has held for its ``for``, and stays silent on a healthy archiver, on one failed
cycle, on a short outage of the off-host target, and where WAL archiving or the off-host
target is off (no series)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from components.monitoring_config import WAL_ALERTS, dump_yaml, render_alert_rules
from tests.monitoring.helpers import run_tool, settings
from tests.tooling import require_tool

pytestmark = pytest.mark.integration

NODE = 'job="node-exporter",instance="rag-staging-node-exporter:9100"'
ARCHIVED_UNTIL = f"rag_backup_wal_archived_until_timestamp_seconds{{{NODE}}}"
LAST_RUN = f"rag_backup_wal_last_run_success{{{NODE}}}"
OFFSITE_UNTIL = f"rag_backup_offsite_wal_archived_until_timestamp_seconds{{{NODE}}}"
SEVERITY = {a.name: a.severity for a in WAL_ALERTS}
MINUTE = 60

# (alert, scenario, input series, times (s) it must be silent, times it must fire).
# Samples every minute, like the archiver's cycle. In promtool's notation "0+60x10 600x20"
# is 0, 60, ..., 600 (archived up to "now" for 10 minutes), then stuck at 600.
CASES: list[tuple[str, str, dict[str, str], list[int], list[int]]] = [
    (
        "WalArchiveLagging",
        "archiver stopped at 10 min",  # lag passes 5 min at 15 min, `for` 1m
        {ARCHIVED_UNTIL: "0+60x10 600x30", LAST_RUN: "1x40"},
        [14 * MINUTE, 15 * MINUTE],
        [17 * MINUTE, 30 * MINUTE],
    ),
    (
        "WalArchiveLagging",
        "archiver keeps up",
        {ARCHIVED_UNTIL: "0+60x60", LAST_RUN: "1x60"},
        [5 * MINUTE, 30 * MINUTE, 59 * MINUTE],
        [],
    ),
    (
        "WalArchiveLagging",
        "a slow cycle (4 min behind) is not yet a broken RPO",
        {ARCHIVED_UNTIL: "0+60x10 600x3 840+60x20", LAST_RUN: "1x40"},
        [13 * MINUTE, 14 * MINUTE, 20 * MINUTE],
        [],
    ),
    ("WalArchiveLagging", "archiving off: no series", {}, [10 * MINUTE, 60 * MINUTE], []),
    (
        "WalArchiveFailing",
        "every cycle fails from 6 min",  # `for` 3m
        {LAST_RUN: "1x5 0x30", ARCHIVED_UNTIL: "0+60x5 300x30"},
        [6 * MINUTE, 8 * MINUTE],
        [10 * MINUTE, 30 * MINUTE],
    ),
    (
        "WalArchiveFailing",
        "one failed cycle, then the next succeeds",
        {LAST_RUN: "1x5 0 1x30", ARCHIVED_UNTIL: "0+60x35"},
        [6 * MINUTE, 7 * MINUTE, 10 * MINUTE, 30 * MINUTE],
        [],
    ),
    ("WalArchiveFailing", "archiving off: no series", {}, [10 * MINUTE, 60 * MINUTE], []),
    (
        "OffsiteWalLagging",
        "target unreachable from 10 min",  # lag passes 10 min at 20 min, `for` 5m
        {OFFSITE_UNTIL: "0+60x10 600x40", ARCHIVED_UNTIL: "0+60x50"},
        [15 * MINUTE, 20 * MINUTE, 24 * MINUTE],
        [26 * MINUTE, 45 * MINUTE],
    ),
    (
        "OffsiteWalLagging",
        "copies keep up, one minute behind the local archive",
        {OFFSITE_UNTIL: "0 0+60x60", ARCHIVED_UNTIL: "0+60x60"},
        [5 * MINUTE, 30 * MINUTE, 59 * MINUTE],
        [],
    ),
    (
        "OffsiteWalLagging",
        "a 7-minute outage of the target, then it catches up",
        {OFFSITE_UNTIL: "0+60x10 600x7 1080+60x30", ARCHIVED_UNTIL: "0+60x50"},
        [15 * MINUTE, 17 * MINUTE, 20 * MINUTE, 40 * MINUTE],
        [],
    ),
    (
        "OffsiteWalLagging",
        "the target never worked (0)",  # promtool's clock starts at 0: lag = the time
        {OFFSITE_UNTIL: "0x40", ARCHIVED_UNTIL: "0+60x40"},
        [5 * MINUTE, 15 * MINUTE],
        [17 * MINUTE, 30 * MINUTE],
    ),
    ("OffsiteWalLagging", "no off-host target: no series", {}, [10 * MINUTE, 60 * MINUTE], []),
]


def _rules_without_annotations() -> dict[str, Any]:
    rules = render_alert_rules(settings())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    return rules


@pytest.mark.parametrize(
    ("alert", "scenario", "series", "silent", "fires"),
    CASES,
    ids=[f"{c[0]}-{c[1].split(':')[0].replace(' ', '_')}" for c in CASES],
)
def test_wal_alert(
    alert: str,
    scenario: str,
    series: dict[str, str],
    silent: list[int],
    fires: list[int],
    tmp_path: Path,
) -> None:
    promtool = require_tool("promtool")
    (tmp_path / "alerts.yml").write_text(dump_yaml(_rules_without_annotations()))
    checks: list[dict[str, Any]] = [
        {"eval_time": f"{t}s", "alertname": alert, "exp_alerts": []} for t in silent
    ]
    checks += [
        {
            "eval_time": f"{t}s",
            "alertname": alert,
            "exp_alerts": [{"exp_labels": {"severity": SEVERITY[alert]}}],
        }
        for t in fires
    ]
    test = {
        "rule_files": ["alerts.yml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "name": f"{alert}: {scenario}",
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in series.items()],
                "alert_rule_test": checks,
            }
        ],
    }
    (tmp_path / "test.yml").write_text(yaml.safe_dump(test, sort_keys=False))
    result = run_tool(promtool, "test", "rules", "test.yml", cwd=tmp_path)
    assert result.returncode == 0, f"{alert} / {scenario}:\n{result.stdout}{result.stderr}"


def test_every_wal_alert_fires_and_stays_silent_somewhere() -> None:
    for alert in WAL_ALERTS:
        assert any(c[0] == alert.name and c[4] for c in CASES), f"{alert.name} never fires"
        assert any(c[0] == alert.name and not c[4] for c in CASES), f"{alert.name} never silent"


def test_wal_alerts_are_in_the_backups_group_of_the_rendered_rules() -> None:
    groups = {g["name"]: g["rules"] for g in render_alert_rules(settings())["groups"]}
    names = {r["alert"] for r in groups["rag-backups"]}
    assert {a.name for a in WAL_ALERTS} <= names
