"""rag_backup_newest_verification_failed (BackupVerificationFailed's metric) follows the
newest backup's last verification: real backups, real gpg, a flipped byte."""

from __future__ import annotations

from pathlib import Path

import pytest

from rag_backup.metrics import STORE_FILE, read_samples
from tests.backup.conftest import Stack
from tests.backup.helpers import run_cli

pytestmark = pytest.mark.integration
METRIC = ("rag_backup_newest_verification_failed", None)


def _metric(stack: Stack) -> float:
    return read_samples(Path(stack.env["RAG_BACKUP_METRICS_DIR"]) / STORE_FILE)[METRIC]


def test_a_backup_that_fails_verification_sets_the_metric(stack: Stack) -> None:
    made = run_cli(["backup", "--verify", "--components", "chroma"], stack.env)
    assert made.returncode == 0, made.stderr
    backup_id = made.stdout.strip()
    assert _metric(stack) == 0

    artifact = next((stack.backup_dir / backup_id).glob("chroma*.gpg"))
    data = bytearray(artifact.read_bytes())
    data[len(data) // 2] ^= 0xFF
    artifact.write_bytes(bytes(data))
    checked = run_cli(["verify", backup_id], stack.env)
    assert checked.returncode == 1
    assert _metric(stack) == 1

    # A newer backup that verifies is what a restore would take: the alert clears.
    again = run_cli(["backup", "--verify", "--components", "chroma"], stack.env)
    assert again.returncode == 0, again.stderr
    assert _metric(stack) == 0
