"""The backup container's entrypoint logic, outside Docker: the scheduler runs the real
rag-backup against real PostgreSQL, Redis (TLS, appendonly) and a Chroma-like directory."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from rag_backup.metrics import BACKUP_FILE, DRILL_FILE, read_samples
from rag_backup.schedule import SCHEDULER_FILE, WEEKDAYS
from tests.backup.conftest import Stack, make_stack
from tests.tooling import require_tool

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    yield from make_stack(tmp_path)


def run_scheduler_once(
    stack: Stack, extra_env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **stack.env,
        "PYTHONPATH": str(REPO),
        "RAG_BACKUP_TIME": "00:00",
        "RAG_DRILL_WEEKDAY": "mon",
        "RAG_DRILL_TIME": "00:00",
        **(extra_env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "rag_backup.schedule", "--once"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def metric(path: Path, name: str, component: str | None = None) -> float | None:
    return read_samples(path).get((name, component))


def test_first_start_backs_up_verifies_prunes_and_drills(stack: Stack) -> None:
    result = run_scheduler_once(stack)
    assert result.returncode == 0, result.stdout + result.stderr
    for step in ("backup --verify", "prune", "drill"):
        assert f"running rag-backup {step}" in result.stdout
    backups = [p for p in stack.backup_dir.iterdir() if not p.name.startswith(".")]
    assert len(backups) == 1
    metrics = stack.metrics_dir
    assert metric(metrics / BACKUP_FILE, "rag_backup_last_run_success") == 1
    assert metric(metrics / BACKUP_FILE, "rag_backup_last_success_timestamp_seconds", "all")
    assert metric(metrics / DRILL_FILE, "rag_restore_drill_last_run_success") == 1
    scheduler = (metrics / SCHEDULER_FILE).read_text()
    assert 'rag_backup_scheduler_job_success{job="backup"} 1' in scheduler
    assert 'rag_backup_scheduler_job_success{job="drill"} 1' in scheduler
    # node_exporter's textfile collector parses these: promtool must accept them.
    promtool = require_tool("promtool")
    for prom_file in sorted(metrics.glob("*.prom")):
        check = subprocess.run(
            [promtool, "check", "metrics"],
            input=prom_file.read_text(),
            capture_output=True,
            text=True,
            check=False,
        )
        assert check.returncode == 0, (prom_file.name, check.stdout, check.stderr)
    # Nothing is due any more: a second start does not back up again.
    again = run_scheduler_once(stack)
    assert again.returncode == 0 and "running rag-backup" not in again.stdout
    assert len([p for p in stack.backup_dir.iterdir() if not p.name.startswith(".")]) == 1


def test_a_failed_run_shows_up_as_a_metric(stack: Stack) -> None:
    stack.redis.stop()  # the backup cannot reach Redis
    result = run_scheduler_once(stack)
    assert result.returncode == 1
    assert metric(stack.metrics_dir / BACKUP_FILE, "rag_backup_last_run_success") == 0
    scheduler = (stack.metrics_dir / SCHEDULER_FILE).read_text()
    assert 'rag_backup_scheduler_job_success{job="backup"} 0' in scheduler
    assert not [p for p in stack.backup_dir.iterdir() if not p.name.startswith(".")]


def test_physical_daily_backup_without_the_dump_off_its_weekday(stack: Stack) -> None:
    """Physical daily, logical weekly: on any other weekday the scheduled backup holds the
    base backup alone, verifies, and the drill proves it."""
    require_tool("pg_basebackup")
    today = dt.datetime.now(dt.UTC).weekday()
    other_day = WEEKDAYS[(today + 3) % 7]
    result = run_scheduler_once(
        stack, {"RAG_BACKUP_PG_PHYSICAL": "1", "RAG_BACKUP_PG_LOGICAL_WEEKDAY": other_day}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "running rag-backup backup --verify --no-pg-logical" in result.stdout
    assert "drill: postgres physical ok" in result.stderr
    backups = [p for p in stack.backup_dir.iterdir() if not p.name.startswith(".")]
    assert len(backups) == 1
    manifest = json.loads((backups[0] / "manifest.json").read_text())
    kinds = [a["kind"] for a in manifest["components"]["postgres"]["artifacts"]]
    assert kinds == ["pg_basebackup_tar"]
    assert metric(stack.metrics_dir / DRILL_FILE, "rag_restore_drill_last_run_success") == 1


def test_wal_archiving_runs_before_the_first_backup_and_reports(stack: Stack) -> None:
    """RAG_BACKUP_WAL_ARCHIVE=1: a wal-archive cycle runs first (the slot exists before the
    base backup: no gap), then every minute in its own thread; its metrics are valid."""
    require_tool("pg_receivewal")
    result = run_scheduler_once(
        stack, {"RAG_BACKUP_PG_PHYSICAL": "1", "RAG_BACKUP_WAL_ARCHIVE": "1"}
    )
    assert result.returncode == 0, result.stdout + result.stderr
    index = json.loads((stack.backup_dir / "wal" / "index.json").read_text())
    assert index["covered_until"] > 0
    wal_metrics = stack.metrics_dir / "rag_backup_wal.prom"
    assert metric(wal_metrics, "rag_backup_wal_last_run_success") == 1
    assert metric(wal_metrics, "rag_backup_wal_archived_until_timestamp_seconds")
    check = subprocess.run(
        [require_tool("promtool"), "check", "metrics"],
        input=wal_metrics.read_text(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
