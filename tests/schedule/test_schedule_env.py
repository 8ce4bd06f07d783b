"""Every environment setting of the backup container is checked when the scheduler starts:
a bad value is one line naming the variable and the value, exit 2, before any job runs, not
a traceback from a job every night (issue 10 item 12). rag-backup itself names the variable
for the settings it reads from the environment too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

BAD_SETTINGS = [
    ("RAG_BACKUP_KEEP_DAILY", "seven"),
    ("RAG_BACKUP_KEEP_WEEKLY", "-1"),
    ("RAG_BACKUP_KEEP_MONTHLY", "6.5"),
    ("RAG_BACKUP_ENCRYPTION", "rot13"),
    ("RAG_BACKUP_COMPONENTS", "postgres,mysql"),
    ("RAG_BACKUP_PG_PHYSICAL", "maybe"),
    ("RAG_BACKUP_PG_LOGICAL", "sometimes"),
    ("RAG_BACKUP_PG_MODE", "hybrid"),
    ("RAG_BACKUP_TIME", "25:00"),
    ("RAG_DRILL_TIME", "4h30"),
    ("RAG_DRILL_WEEKDAY", "funday"),
    ("RAG_BACKUP_PG_LOGICAL_WEEKDAY", "someday"),
    ("RAG_BACKUP_WAL_ARCHIVE", "often"),
]


def _run(module: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize(("name", "value"), BAD_SETTINGS)
def test_scheduler_refuses_to_start_on_a_bad_setting(name: str, value: str, tmp_path: Path) -> None:
    env = {
        "RAG_BACKUP_METRICS_DIR": str(tmp_path),
        "BACKUP_DIR": str(tmp_path / "backups"),
        name: value,
    }
    result = _run("rag_backup.schedule", ["--once"], env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert name in result.stderr and repr(value) in result.stderr, result.stderr
    assert "running rag-backup" not in result.stdout  # no job started
    assert not (tmp_path / "backups").exists()


@pytest.mark.parametrize(
    ("command", "name", "value"),
    [
        ("prune", "RAG_BACKUP_KEEP_DAILY", "seven"),
        ("prune", "RAG_BACKUP_KEEP_MONTHLY", "-3"),
        ("verify", "RAG_BACKUP_ENCRYPTION", "rot13"),
        ("backup", "RAG_BACKUP_COMPONENTS", "postgres,mysql"),
        ("restore", "RAG_BACKUP_PG_MODE", "hybrid"),
    ],
)
def test_rag_backup_names_a_bad_environment_value(
    command: str, name: str, value: str, tmp_path: Path
) -> None:
    result = _run("rag_backup", [command], {"BACKUP_DIR": str(tmp_path), name: value})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert name in last and repr(value) in last, result.stderr
