"""Off-host copies to a real sshd (SFTP-only, chrooted) through Debian's rclone: push and
read back, a corrupted remote copy caught, remote retention, and the "VPS is gone" path
(pull onto a new host, then the normal restore) against real PostgreSQL and Redis."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from rag_backup.metrics import read_samples
from rag_backup.offsite import LAST_RUN_SUCCESS, LAST_SUCCESS, MARKER, METRICS_FILE
from tests.backup.conftest import Stack
from tests.backup.helpers import (
    DATABASE,
    chroma_rows,
    live_tree,
    pg_snapshot,
    redis_snapshot,
    run_cli,
    tree_snapshot,
)
from tests.offsite.conftest import Target, a_new_host, rclone_env

pytestmark = pytest.mark.integration


def _backup(stack: Stack) -> str:
    result = run_cli(["backup", "--verify"], stack.env)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def _offsite(stack: Stack, target: Target, *args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(["offsite", *args], {**stack.env, **target.env()})


def _metrics(stack: Stack) -> dict[tuple[str, str | None], float]:
    return read_samples(stack.metrics_dir / METRICS_FILE)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _artifacts(backup: Path) -> list[str]:
    manifest = json.loads((backup / "manifest.json").read_text())
    return [a["name"] for c in manifest["components"].values() for a in c["artifacts"]]


def test_push_copies_every_artifact_reads_it_back_and_sets_the_metric(
    stack: Stack, sftp_target: Target
) -> None:
    backup_id = _backup(stack)
    before = time.time()
    result = _offsite(stack, sftp_target, "push")
    assert result.returncode == 0, result.stderr
    assert sftp_target.files is not None
    local, remote = stack.backup_dir / backup_id, sftp_target.files / backup_id
    # Exactly the encrypted artifacts and the manifest left the host, byte for byte; the
    # host's own verification record did not.
    for name in [*_artifacts(local), "manifest.json"]:
        assert _sha256(remote / name) == _sha256(local / name), name
    assert not (remote / "verification.json").exists()
    marker = json.loads((remote / MARKER).read_text())
    assert marker["ok"] is True
    assert marker["manifest_sha256"] == _sha256(local / "manifest.json")
    samples = _metrics(stack)
    assert samples[(LAST_SUCCESS, None)] >= int(before)
    assert samples[(LAST_RUN_SUCCESS, None)] == 1
    # Each read back byte for byte: the read-back log lines name every artifact.
    for name in _artifacts(local):
        assert f"{backup_id}/{name} ok" in result.stderr

    # A second push has nothing to do (the remote copy is verified) and stays green.
    again = _offsite(stack, sftp_target, "push")
    assert again.returncode == 0, again.stderr
    assert "copied 0 backup(s)" in again.stdout


def test_the_sftp_target_offers_no_remote_sha256(stack: Stack, sftp_target: Target) -> None:
    """Why verification downloads: the SFTP-only target runs no hash command for rclone."""
    backup_id = _backup(stack)
    assert _offsite(stack, sftp_target, "push").returncode == 0
    name = _artifacts(stack.backup_dir / backup_id)[0]
    hashsum = subprocess.run(
        [
            "rclone",
            "--config",
            str(sftp_target.rclone_config),
            "hashsum",
            "sha256",
            f"{sftp_target.remote}/{backup_id}/{name}",
        ],
        env=rclone_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    # rclone answers with an empty hash (or an error): there is nothing to compare.
    assert not re.search(r"\b[0-9a-f]{64}\b", hashsum.stdout), hashsum.stdout


def test_a_corrupted_remote_copy_is_detected_and_repaired_by_the_next_push(
    stack: Stack, sftp_target: Target
) -> None:
    backup_id = _backup(stack)
    assert _offsite(stack, sftp_target, "push").returncode == 0
    good = _metrics(stack)[(LAST_SUCCESS, None)]
    assert sftp_target.files is not None
    remote = sftp_target.files / backup_id
    name = _artifacts(stack.backup_dir / backup_id)[0]
    data = bytearray((remote / name).read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size: only the hash can tell
    (remote / name).write_bytes(bytes(data))
    time.sleep(1.1)  # a success would now write a later timestamp

    verify = _offsite(stack, sftp_target, "verify")
    assert verify.returncode == 1
    assert f"{name}: corrupted: SHA-256 does not match the manifest" in verify.stderr
    samples = _metrics(stack)
    assert samples[(LAST_SUCCESS, None)] == good
    assert samples[(LAST_RUN_SUCCESS, None)] == 0
    assert json.loads((remote / MARKER).read_text())["ok"] is False
    listing = _offsite(stack, sftp_target, "list")
    assert "FAILED" in listing.stdout

    repaired = _offsite(stack, sftp_target, "push")
    assert repaired.returncode == 0, repaired.stderr
    assert _sha256(remote / name) == _sha256(stack.backup_dir / backup_id / name)
    assert _metrics(stack)[(LAST_SUCCESS, None)] > good
    assert _offsite(stack, sftp_target, "verify").returncode == 0


def test_a_truncated_remote_manifest_is_not_a_backup(stack: Stack, sftp_target: Target) -> None:
    backup_id = _backup(stack)
    assert _offsite(stack, sftp_target, "push").returncode == 0
    assert sftp_target.files is not None
    (sftp_target.files / backup_id / "manifest.json").write_text('{"id": "x"')
    verify = _offsite(stack, sftp_target, "verify", backup_id)
    assert verify.returncode == 1
    assert "not valid JSON" in verify.stderr


def _clone_backup(stack: Stack, source: str, when: dt.datetime) -> str:
    backup_id = when.strftime("%Y%m%dT%H%M%SZ")
    target = stack.backup_dir / backup_id
    shutil.copytree(stack.backup_dir / source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.update(id=backup_id, created_unix=when.timestamp(), created_at=when.isoformat())
    (target / "manifest.json").write_text(json.dumps(manifest))
    return backup_id


def test_remote_retention_follows_the_policy_and_keeps_a_verified_copy(
    stack: Stack, sftp_target: Target
) -> None:
    source = _backup(stack)
    start = dt.datetime(2025, 3, 1, 3, 0, tzinfo=dt.UTC)
    ids = [_clone_backup(stack, source, start + dt.timedelta(days=d)) for d in range(5)]
    shutil.rmtree(stack.backup_dir / source)
    assert _offsite(stack, sftp_target, "push").returncode == 0
    assert sftp_target.files is not None
    assert sorted(p.name for p in sftp_target.files.iterdir()) == ids

    # No kept copy verified (every marker failed): nothing is deleted.
    for backup_id in ids:
        (sftp_target.files / backup_id / MARKER).write_text('{"ok": false}')
    policy = ["--keep-daily", "2", "--keep-weekly", "0", "--keep-monthly", "0"]
    refused = _offsite(stack, sftp_target, "prune", *policy)
    assert refused.returncode == 0, refused.stderr
    assert "deleting nothing" in refused.stderr
    assert sorted(p.name for p in sftp_target.files.iterdir()) == ids

    # Only the oldest copy verified: the policy keeps the 2 newest, and the only verified
    # copy stays too.
    good = {"ok": True, "manifest_sha256": _sha256(stack.backup_dir / ids[0] / "manifest.json")}
    (sftp_target.files / ids[0] / MARKER).write_text(json.dumps(good))
    dry = _offsite(stack, sftp_target, "prune", *policy, "--dry-run")
    assert "would delete 2 remote backup(s)" in dry.stdout
    assert sorted(p.name for p in sftp_target.files.iterdir()) == ids
    pruned = _offsite(stack, sftp_target, "prune", *policy)
    assert pruned.returncode == 0, pruned.stderr
    assert sorted(p.name for p in sftp_target.files.iterdir()) == [ids[0], ids[3], ids[4]]


def test_the_vps_is_gone_pull_onto_a_new_host_and_restore(
    stack: Stack, sftp_target: Target, tmp_path: Path
) -> None:
    # Host A: data that differs from a fresh seed, backed up and copied off-host.
    stack.pg.psql("INSERT INTO feedback (question) VALUES ('only on host A')", database=DATABASE)
    stack.redis.client().set("only-on-host-a", "1")  # type: ignore[attr-defined]
    (stack.chroma_dir / "host-a.bin").write_bytes(b"A")
    backup_id = _backup(stack)
    assert _offsite(stack, sftp_target, "push").returncode == 0
    pg_a, redis_a = pg_snapshot(stack.pg), redis_snapshot(stack.redis)
    chroma_a, rows_a = tree_snapshot(stack.chroma_dir), chroma_rows(stack.chroma_dir)
    with a_new_host(stack, tmp_path) as new:
        assert pg_snapshot(new.pg) != pg_a
        env_b = {**new.env, "RAG_BACKUP_KEY_FILE": str(stack.key_file)}
        pulled = run_cli(["offsite", "pull"], {**env_b, **sftp_target.env()})
        assert pulled.returncode == 0, pulled.stderr
        assert pulled.stdout.strip() == backup_id
        assert not list(new.backup_dir.glob(".tmp-*"))
        verify = run_cli(["verify", backup_id], env_b)
        assert verify.returncode == 0, verify.stderr

        new.redis.stop()
        restore = run_cli(["restore", backup_id, "--yes", *new.restore_args()], env_b)
        assert restore.returncode == 0, restore.stderr
        assert pg_snapshot(new.pg) == pg_a
        assert live_tree(new.chroma_dir) == chroma_a
        assert chroma_rows(new.chroma_dir) == rows_a
        new.start_redis()
        assert redis_snapshot(new.redis) == redis_a


def test_pull_refuses_a_remote_copy_that_does_not_match_its_manifest(
    stack: Stack, sftp_target: Target, tmp_path: Path
) -> None:
    backup_id = _backup(stack)
    assert _offsite(stack, sftp_target, "push").returncode == 0
    assert sftp_target.files is not None
    name = _artifacts(stack.backup_dir / backup_id)[-1]
    with open(sftp_target.files / backup_id / name, "ab") as handle:
        handle.write(b"x")
    landing = tmp_path / "landing"
    pulled = run_cli(
        ["offsite", "pull", backup_id, "--backup-dir", str(landing)],
        {**stack.env, **sftp_target.env()},
    )
    assert pulled.returncode == 1
    assert f"{name} does not match the manifest" in pulled.stderr
    assert not (landing / backup_id).exists()
    assert not list(landing.glob(".tmp-*"))


def test_a_rebuilt_hosts_first_backup_does_not_push_out_the_last_good_copy(
    stack: Stack, sftp_target: Target
) -> None:
    """The old host's last backup and, the same day, the new host's first backup of its
    still empty stack: the daily slot alone would keep only the newer, empty one."""
    last_good = _backup(stack)
    assert _offsite(stack, sftp_target, "push").returncode == 0
    time.sleep(1.1)  # a distinct backup id
    shutil.rmtree(stack.backup_dir / last_good)  # the new host does not have it
    first_on_new_host = _backup(stack)
    assert _offsite(stack, sftp_target, "push").returncode == 0
    policy = ["--keep-daily", "1", "--keep-weekly", "1", "--keep-monthly", "1"]
    pruned = _offsite(stack, sftp_target, "prune", *policy)
    assert pruned.returncode == 0, pruned.stderr
    assert sftp_target.files is not None
    assert sorted(p.name for p in sftp_target.files.iterdir()) == sorted(
        [last_good, first_on_new_host]
    )


def test_an_unverified_newest_backup_is_not_copied_and_fails_the_run(
    stack: Stack, sftp_target: Target
) -> None:
    older = _backup(stack)
    time.sleep(1.1)
    newest = run_cli(["backup"], stack.env)  # not verified
    assert newest.returncode == 0, newest.stderr
    result = _offsite(stack, sftp_target, "push")
    assert result.returncode == 1
    assert f"the newest backup {newest.stdout.strip()} is not verified locally" in result.stderr
    assert sftp_target.files is not None
    assert sorted(p.name for p in sftp_target.files.iterdir()) == [older]
    samples = _metrics(stack)
    assert samples[(LAST_RUN_SUCCESS, None)] == 0
    assert samples[(LAST_SUCCESS, None)] == 0
