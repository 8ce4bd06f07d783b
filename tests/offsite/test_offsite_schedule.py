"""The scheduler's daily job with an off-host target: backup, verify, prune, then the
off-host copy and its prune, against the real sshd; a target that fails makes the job fail
and the off-host metric say so (the alert counts from the last success)."""

from __future__ import annotations

import json
import subprocess

import pytest

from rag_backup import offsite_wal
from rag_backup.metrics import read_samples
from rag_backup.offsite import LAST_RUN_SUCCESS, LAST_SUCCESS, MARKER, METRICS_FILE
from tests.backup.conftest import Stack
from tests.offsite.conftest import Target
from tests.schedule.test_schedule_real import run_scheduler_once
from tests.tooling import require_tool

pytestmark = pytest.mark.integration


def test_the_daily_job_copies_the_new_backup_off_host(stack: Stack, sftp_target: Target) -> None:
    result = run_scheduler_once(stack, sftp_target.env())
    assert result.returncode == 0, result.stdout + result.stderr
    steps = [line for line in result.stdout.splitlines() if "running rag-backup" in line]
    assert [s.split("running rag-backup ")[1] for s in steps[:4]] == [
        "backup --verify",
        "prune",
        "offsite push",
        "offsite prune",
    ]
    (backup,) = [p for p in stack.backup_dir.iterdir() if not p.name.startswith(".")]
    assert sftp_target.files is not None
    assert '"ok": true' in (sftp_target.files / backup.name / MARKER).read_text()
    samples = read_samples(stack.metrics_dir / METRICS_FILE)
    assert samples[(LAST_SUCCESS, None)] > 0
    check = subprocess.run(
        [require_tool("promtool"), "check", "metrics"],
        input=(stack.metrics_dir / METRICS_FILE).read_text(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_an_unreachable_target_fails_the_job_and_reports_never_succeeded(
    stack: Stack, sftp_target: Target
) -> None:
    broken = sftp_target.rclone_config.read_text().replace("port = ", "port = 1")
    sftp_target.rclone_config.write_text(broken)
    result = run_scheduler_once(stack, sftp_target.env())
    assert result.returncode == 1
    assert "rag-backup offsite failed" in result.stdout
    samples = read_samples(stack.metrics_dir / METRICS_FILE)
    assert samples[(LAST_RUN_SUCCESS, None)] == 0
    assert samples[(LAST_SUCCESS, None)] == 0  # never: OffsiteBackupStale fires
    # The local backup itself succeeded and stays.
    assert [p for p in stack.backup_dir.iterdir() if not p.name.startswith(".")]


WAL_ON = {"RAG_BACKUP_WAL_ARCHIVE": "1", "RAG_BACKUP_PG_PHYSICAL": "1"}


def test_each_wal_cycle_is_copied_off_host(stack: Stack, sftp_target: Target) -> None:
    require_tool("pg_receivewal")
    result = run_scheduler_once(stack, {**sftp_target.env(), **WAL_ON})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "copied " in result.stdout and "WAL segment(s) off-host" in result.stdout
    index = json.loads((stack.backup_dir / "wal" / "index.json").read_text())
    assert sftp_target.files is not None
    remote = sftp_target.files / "wal" / index["system_identifier"] / "index.json"
    assert json.loads(remote.read_text())["covered_until"] == index["covered_until"]
    samples = read_samples(stack.metrics_dir / offsite_wal.METRICS_FILE)
    assert samples[(offsite_wal.LAST_RUN_SUCCESS, None)] == 1
    assert samples[(offsite_wal.ARCHIVED_UNTIL, None)] == pytest.approx(index["covered_until"])
    check = subprocess.run(
        [require_tool("promtool"), "check", "metrics"],
        input=(stack.metrics_dir / offsite_wal.METRICS_FILE).read_text(),
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_an_unreachable_target_fails_the_wal_copy_and_reports_never_copied(
    stack: Stack, sftp_target: Target
) -> None:
    require_tool("pg_receivewal")
    broken = sftp_target.rclone_config.read_text().replace("port = ", "port = 1")
    sftp_target.rclone_config.write_text(broken)
    result = run_scheduler_once(stack, {**sftp_target.env(), **WAL_ON})
    assert result.returncode == 1
    assert "rag-backup offsite wal-push failed" in result.stdout
    samples = read_samples(stack.metrics_dir / offsite_wal.METRICS_FILE)
    assert samples[(offsite_wal.LAST_RUN_SUCCESS, None)] == 0
    assert samples[(offsite_wal.ARCHIVED_UNTIL, None)] == 0  # OffsiteWalLagging fires
    # The local archive itself succeeded and stays.
    assert json.loads((stack.backup_dir / "wal" / "index.json").read_text())["covered_until"]
