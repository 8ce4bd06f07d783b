"""A multi-store restore is all or nothing, with Chroma's directory and Redis's data dir as
real mount points, as the volumes are in the api and in the restore job (issue 10 item 2):
a mount point cannot be renamed (EBUSY), so Chroma is restored by swapping its contents;
every precondition of every store is checked before the first swap; a failure in the second
store's swap undoes the first one and the error says what state each store is in."""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from rag_backup import chroma, cli
from tests.backup.conftest import Stack
from tests.backup.helpers import live_tree, redis_snapshot, run_cli, tree_snapshot
from tests.backup.mounts import read_only_bind, tmpfs_mount_point

pytestmark = pytest.mark.integration


def _move_into_mount(directory: Path, mounts: list[Any]) -> None:
    """Make ``directory`` a tmpfs mount point holding what it held."""
    aside = directory.with_name(directory.name + ".before-mount")
    directory.rename(aside)
    mount = tmpfs_mount_point(directory)
    mount.__enter__()
    mounts.append(mount)
    for item in aside.iterdir():
        shutil.move(str(item), directory / item.name)
    aside.rmdir()


@pytest.fixture
def mounted(stack: Stack) -> Iterator[tuple[Stack, str, dict[str, Any]]]:
    """Chroma on a mount point; a backup of redis and chroma; then changes after it; Redis
    stopped and its data dir a mount point too. Yields the backup id and the snapshots."""
    mounts: list[Any] = []
    try:
        _move_into_mount(stack.chroma_dir, mounts)
        backup = run_cli(["backup", "--components", "redis,chroma"], stack.env)
        assert backup.returncode == 0, backup.stderr
        at_backup = {
            "redis": redis_snapshot(stack.redis),
            "chroma": live_tree(stack.chroma_dir),
        }
        client: Any = stack.redis.client()
        client.set("added-after-backup", "1")
        client.delete("cache:1")
        conn = sqlite3.connect(stack.chroma_dir / chroma.SQLITE_NAME)
        conn.execute("DELETE FROM embeddings WHERE id > 100")
        conn.commit()
        conn.close()
        (stack.chroma_dir / "new-after-backup.bin").write_bytes(b"new")
        changed = {"redis": redis_snapshot(stack.redis)}
        stack.redis.stop()
        _move_into_mount(stack.redis_data, mounts)
        changed["chroma"] = tree_snapshot(stack.chroma_dir)
        changed["redis_files"] = tree_snapshot(stack.redis_data)
        yield stack, backup.stdout.strip(), {"at_backup": at_backup, "changed": changed}
    finally:
        for server in stack.redis_servers:
            server.stop()
        for mount in reversed(mounts):
            mount.__exit__(None, None, None)


def _restore_args(stack: Stack, backup_id: str) -> list[str]:
    return ["restore", backup_id, "--components", "redis,chroma", *stack.restore_args(), "--yes"]


def test_restore_into_mount_points_swaps_chroma_by_contents(
    mounted: tuple[Stack, str, dict[str, Any]],
) -> None:
    stack, backup_id, snap = mounted
    assert stack.chroma_dir.is_mount() and stack.redis_data.is_mount()
    result = run_cli(_restore_args(stack, backup_id), stack.env)
    assert result.returncode == 0, result.stderr
    assert stack.chroma_dir.is_mount()
    assert live_tree(stack.chroma_dir) == snap["at_backup"]["chroma"]
    kept = stack.chroma_dir / f".rag-pre-restore-{backup_id}"
    assert str(kept) in result.stdout
    assert tree_snapshot(kept) == snap["changed"]["chroma"]
    stack.start_redis()
    assert redis_snapshot(stack.redis) == snap["at_backup"]["redis"]
    # What the restore keeps inside the volume is never backed up again.
    again = run_cli(["backup", "--components", "chroma"], stack.env)
    assert again.returncode == 0, again.stderr
    assert ".rag-" not in (stack.backup_dir / again.stdout.strip() / "manifest.json").read_text()


def test_a_failed_second_swap_undoes_the_first_and_says_so(
    mounted: tuple[Stack, str, dict[str, Any]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    stack, backup_id, snap = mounted
    for name, value in stack.env.items():
        monkeypatch.setenv(name, value)
    real_integrity = chroma.sqlite_integrity
    calls: list[Path] = []

    def integrity_failing_after_the_swap(path: Path) -> str:
        # The first call checks the staged copy; the second one runs after Chroma's swap,
        # when Redis has been swapped already.
        calls.append(path)
        return real_integrity(path) if len(calls) == 1 else "injected: page 7 is corrupt"

    monkeypatch.setattr(chroma, "sqlite_integrity", integrity_failing_after_the_swap)
    code = cli.main(_restore_args(stack, backup_id))
    err = capsys.readouterr().err
    assert code == 1
    assert len(calls) == 2, err
    last = err.strip().splitlines()[-1]
    assert "failed while swapping chroma" in last
    assert "chroma: swap failed" in last and "its previous data is in place" in last
    assert "redis: previous data back in" in last and "(undone)" in last
    # Every store is as it was before the restore.
    assert live_tree(stack.chroma_dir) == snap["changed"]["chroma"]
    assert live_tree(stack.redis_data) == snap["changed"]["redis_files"]
    stack.start_redis()
    assert redis_snapshot(stack.redis) == snap["changed"]["redis"]


def test_a_read_only_chroma_volume_is_refused_before_redis_is_swapped(
    mounted: tuple[Stack, str, dict[str, Any]],
) -> None:
    stack, backup_id, snap = mounted
    with read_only_bind(stack.chroma_dir, stack.chroma_dir):
        result = run_cli(_restore_args(stack, backup_id), stack.env)
    assert result.returncode == 1
    assert f"CHROMA_DIR / --chroma-dir: {stack.chroma_dir} is not writable" in result.stderr
    assert "nothing was changed" in result.stderr
    assert tree_snapshot(stack.redis_data) == snap["changed"]["redis_files"]
    assert tree_snapshot(stack.chroma_dir) == snap["changed"]["chroma"]
