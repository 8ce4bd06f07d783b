"""A backup interrupted midway, one hitting a full disk, and a second concurrent backup
leave no half backup and never touch older ones."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.backup.conftest import Stack
from tests.backup.helpers import DATABASE, run_cli, start_cli
from tests.tooling import require_tool

pytestmark = pytest.mark.integration


@contextmanager
def table_locked(stack: Stack) -> Iterator[None]:
    """Hold an ACCESS EXCLUSIVE lock so pg_dump (and so the backup) waits mid-run."""
    env = {**os.environ, **stack.pg.env(DATABASE)}
    psql = subprocess.Popen(
        [require_tool("psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert psql.stdin is not None and psql.stdout is not None
    try:
        psql.stdin.write("BEGIN; LOCK TABLE feedback IN ACCESS EXCLUSIVE MODE; \\echo locked\n")
        psql.stdin.flush()
        assert psql.stdout.readline().strip() == "locked"
        yield
    finally:
        try:
            psql.stdin.write("ROLLBACK;\n")
            psql.stdin.close()
        except OSError:
            pass
        psql.wait(timeout=30)


def wait_for_partial_backup(backup_dir: Path, timeout_s: float = 60) -> Path:
    """The .tmp-* dir once the (unblocked) chroma artifact is in it."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for tmp in backup_dir.glob(".tmp-*"):
            if (tmp / "chroma.tar.zst.gpg").exists() and (tmp / "redis.rdb.zst.gpg").exists():
                return tmp
        time.sleep(0.1)
    raise AssertionError("backup never got midway")


def dir_hashes(directory: Path) -> dict[str, str]:
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(directory.iterdir())
        if p.is_file()
    }


def complete_backups(backup_dir: Path) -> list[str]:
    return sorted(p.name for p in backup_dir.iterdir() if (p / "manifest.json").exists())


@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_interrupted_backup_leaves_no_half_backup(stack: Stack, how: str) -> None:
    first = run_cli(["backup"], stack.env)
    assert first.returncode == 0, first.stderr
    older = stack.backup_dir / first.stdout.strip()
    older_files = dir_hashes(older)
    time.sleep(1.1)  # a distinct backup id

    with table_locked(stack):
        proc = start_cli(["backup"], stack.env)
        try:
            partial = wait_for_partial_backup(stack.backup_dir)
            proc.send_signal(getattr(signal, how))
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
        assert proc.returncode != 0
        if how == "SIGTERM":
            assert "interrupted by signal SIGTERM" in stderr
            assert not partial.exists()  # cleaned up on the way out
        else:
            assert partial.exists()  # nothing could clean up after SIGKILL...

    assert complete_backups(stack.backup_dir) == [older.name]
    assert dir_hashes(older) == older_files
    verify = run_cli(["verify", older.name], stack.env)
    assert verify.returncode == 0, verify.stderr
    listing = run_cli(["list"], stack.env)
    assert ".tmp-" not in listing.stdout
    # ...and the next backup removes the leftover and succeeds.
    again = run_cli(["backup"], stack.env)
    assert again.returncode == 0, again.stderr
    assert list(stack.backup_dir.glob(".tmp-*")) == []
    assert len(complete_backups(stack.backup_dir)) == 2


def lock_waiting_row_counts(stack: Stack) -> int:
    """How many sessions wait on the lock in a row count query (rag-backup's count(*))."""
    out = stack.pg.psql(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND query LIKE 'SELECT json_object_agg(t, n) FROM (%'",
        database=DATABASE,
    )
    return int(out.strip())


def test_sigterm_stops_a_step_that_started_after_the_others_blocked(stack: Stack) -> None:
    """`docker stop` while the base backup's row count (a step of its own, started after
    the snapshot's count) waits on a lock: every step stops, not only the first ones."""
    with table_locked(stack):
        proc = start_cli(["backup", "--pg-physical", "--no-pg-logical"], stack.env)
        try:
            # The snapshot's count and, once pg_basebackup has copied the cluster, the
            # base backup's count both wait on the lock.
            deadline = time.monotonic() + 60
            while lock_waiting_row_counts(stack) < 2:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "the base backup's count never started"
                time.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate(timeout=30)
        assert proc.returncode == 1, stderr
        assert "interrupted by signal SIGTERM" in stderr
        assert list(stack.backup_dir.glob(".tmp-*")) == []
    assert complete_backups(stack.backup_dir) == []


def test_second_concurrent_backup_is_refused(stack: Stack) -> None:
    with table_locked(stack):
        proc = start_cli(["backup"], stack.env)
        try:
            wait_for_partial_backup(stack.backup_dir)
            second = run_cli(["backup"], stack.env)
            assert second.returncode != 0
            assert "another rag-backup run holds the lock" in second.stderr
            assert len(list(stack.backup_dir.glob(".tmp-*"))) == 1
        except BaseException:
            proc.kill()
            proc.communicate(timeout=30)
            raise
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr
    assert complete_backups(stack.backup_dir) == [stdout.strip()]
    verify = run_cli(["verify"], stack.env)
    assert verify.returncode == 0, verify.stderr


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=30, check=False)


def test_full_disk_fails_cleanly_and_keeps_older_backup(stack: Stack, small_disk: Path) -> None:
    env = {**stack.env, "BACKUP_DIR": str(small_disk / "backups")}
    first = run_cli(["backup"], env)
    assert first.returncode == 0, first.stderr
    older = small_disk / "backups" / first.stdout.strip()
    older_files = dir_hashes(older)
    time.sleep(1.1)
    second = run_cli(["backup"], env)  # the disk has no room for a second one
    assert second.returncode != 0
    assert "No space left on device" in second.stderr
    assert complete_backups(small_disk / "backups") == [older.name]
    assert list((small_disk / "backups").glob(".tmp-*")) == []
    assert dir_hashes(older) == older_files
    assert run_cli(["verify", older.name], env).returncode == 0
    prom = (stack.metrics_dir / "rag_backup.prom").read_text()
    assert "rag_backup_last_run_success 0" in prom
