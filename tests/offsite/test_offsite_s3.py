"""The same off-host copy to an S3-compatible server (moto's, on loopback) through
Debian's rclone with the rendered S3 config: push, read back, a corrupted object caught,
remote retention, pull."""

from __future__ import annotations

import datetime as dt
import json
import subprocess

import pytest

from rag_backup.metrics import read_samples
from rag_backup.offsite import LAST_RUN_SUCCESS, LAST_SUCCESS, MARKER, METRICS_FILE
from tests.backup.conftest import Stack
from tests.backup.helpers import run_cli
from tests.offsite.conftest import Target, rclone_env
from tests.offsite.test_offsite_sftp import _artifacts, _backup, _clone_backup, _offsite, _sha256

pytestmark = pytest.mark.integration


def _rclone(target: Target, *args: str) -> bytes:
    result = subprocess.run(
        ["rclone", "--config", str(target.rclone_config), *args],
        env=rclone_env(),
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout


def _remote_ids(target: Target) -> list[str]:
    listing = json.loads(_rclone(target, "lsjson", "--dirs-only", target.remote))
    return sorted(item["Name"] for item in listing)


def test_s3_push_verify_corruption_retention_and_pull(stack: Stack, s3_target: Target) -> None:
    source = _backup(stack)
    pushed = _offsite(stack, s3_target, "push")
    assert pushed.returncode == 0, pushed.stderr
    local = stack.backup_dir / source
    name = _artifacts(local)[0]
    remote_bytes = _rclone(s3_target, "cat", f"{s3_target.remote}/{source}/{name}")
    assert remote_bytes == (local / name).read_bytes()
    good = read_samples(stack.metrics_dir / METRICS_FILE)[(LAST_SUCCESS, None)]
    assert good > 0

    # One flipped bit in the object: verify reads it back and fails; the metric stays.
    flipped = bytearray(remote_bytes)
    flipped[-1] ^= 0x80
    tampered = stack.root / "tampered"
    tampered.write_bytes(bytes(flipped))
    _rclone(s3_target, "copyto", str(tampered), f"{s3_target.remote}/{source}/{name}")
    verify = _offsite(stack, s3_target, "verify")
    assert verify.returncode == 1
    assert f"{name}: corrupted: SHA-256 does not match the manifest" in verify.stderr
    samples = read_samples(stack.metrics_dir / METRICS_FILE)
    assert samples[(LAST_SUCCESS, None)] == good
    assert samples[(LAST_RUN_SUCCESS, None)] == 0
    repaired = _offsite(stack, s3_target, "push")
    assert repaired.returncode == 0, repaired.stderr
    assert (
        _rclone(s3_target, "cat", f"{s3_target.remote}/{source}/{name}")
        == (local / name).read_bytes()
    )

    # Retention: 4 more daily copies, keep 2 daily.
    start = dt.datetime(2025, 3, 1, 3, 0, tzinfo=dt.UTC)
    ids = [_clone_backup(stack, source, start + dt.timedelta(days=d)) for d in range(4)]
    assert _offsite(stack, s3_target, "push").returncode == 0
    assert _remote_ids(s3_target) == sorted([*ids, source])
    policy = ["--keep-daily", "2", "--keep-weekly", "0", "--keep-monthly", "0"]
    pruned = _offsite(stack, s3_target, "prune", *policy)
    assert pruned.returncode == 0, pruned.stderr
    # The clones are dated 2025; the real backup is today's, so it and the newest clone stay.
    assert _remote_ids(s3_target) == sorted([ids[-1], source])
    marker = json.loads(_rclone(s3_target, "cat", f"{s3_target.remote}/{source}/{MARKER}"))
    assert marker["ok"] is True

    landing = stack.root / "new-host-backups"
    pulled = run_cli(
        ["offsite", "pull", "--backup-dir", str(landing)], {**stack.env, **s3_target.env()}
    )
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == source
    for artifact in [*_artifacts(local), "manifest.json"]:
        assert _sha256(landing / source / artifact) == _sha256(local / artifact)
    verify_pulled = run_cli(["verify", source, "--backup-dir", str(landing)], stack.env)
    assert verify_pulled.returncode == 0, verify_pulled.stderr
