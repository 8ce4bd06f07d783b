"""Physical PostgreSQL backups (pg_basebackup) against a real server: backup, wipe, physical
restore into the stopped cluster's data directory, identical data; damaged artifacts and a
running server leave the live data directory byte-identical; drill proves both artifacts."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backup.conftest import Stack, make_stack
from tests.backup.helpers import (
    DATABASE,
    chroma_rows,
    pg_snapshot,
    redis_snapshot,
    run_cli,
    tree_snapshot,
)
from tests.tooling import require_tool

pytestmark = pytest.mark.integration

PHYSICAL = "postgres.base.tar.zst.gpg"


def _physical_args(stack: Stack) -> list[str]:
    return ["--pg-mode", "physical", "--pg-data-dir", str(stack.pg.data_dir)]


def test_physical_backup_wipe_restore_gives_identical_data(stack: Stack) -> None:
    require_tool("pg_basebackup")
    pg_before = pg_snapshot(stack.pg)
    redis_before = redis_snapshot(stack.redis)
    chroma_before = tree_snapshot(stack.chroma_dir)

    backup = run_cli(["backup", "--pg-physical"], stack.env)
    assert backup.returncode == 0, backup.stderr
    backup_id = backup.stdout.strip()
    manifest = json.loads((stack.backup_dir / backup_id / "manifest.json").read_text())
    kinds = [a["kind"] for a in manifest["components"]["postgres"]["artifacts"]]
    assert kinds == ["pg_dump_custom", "pg_basebackup_tar"]
    head = (stack.backup_dir / backup_id / PHYSICAL).read_bytes()[:512]
    assert b"PG_VERSION" not in head and b"ustar" not in head
    verify = run_cli(["verify", backup_id], stack.env)
    assert verify.returncode == 0, verify.stderr

    # Wipe: the database is dropped and another one changed after the backup.
    stack.pg.psql(f"DROP DATABASE {DATABASE}")
    stack.pg.psql("CREATE TABLE after_backup (x int)")
    stack.redis.client().flushall()  # type: ignore[attr-defined]
    stack.redis.stop()
    shutil.rmtree(stack.chroma_dir)
    stack.pg.shutdown()  # the operator stops PostgreSQL for a physical restore

    restore = run_cli(
        ["restore", backup_id, "--yes", *stack.restore_args(), *_physical_args(stack)], stack.env
    )
    assert restore.returncode == 0, restore.stderr
    kept = stack.pg.data_dir.parent / f"{stack.pg.data_dir.name}.pre-restore-{backup_id}"
    assert str(kept) in restore.stdout
    assert (kept / "PG_VERSION").is_file()  # the previous cluster is kept for rollback
    assert not (stack.pg.data_dir.parent / f"{stack.pg.data_dir.name}.restore-{backup_id}").exists()
    assert stack.pg.data_dir.stat().st_uid == kept.stat().st_uid  # owner kept

    stack.pg.start_again()
    assert pg_snapshot(stack.pg) == pg_before
    # The whole cluster is the backup's: the table made after the backup is gone.
    assert stack.pg.psql("SELECT count(*) FROM pg_tables WHERE tablename = 'after_backup'") == "0\n"
    assert tree_snapshot(stack.chroma_dir) == chroma_before
    assert chroma_rows(stack.chroma_dir)
    stack.start_redis()
    assert redis_snapshot(stack.redis) == redis_before


@pytest.fixture(scope="module")
def physical_backup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    stack_gen = make_stack(tmp_path_factory.mktemp("physical"))
    stack = next(stack_gen)
    try:
        require_tool("pg_basebackup")
        result = run_cli(["backup", "--pg-physical"], stack.env)
        assert result.returncode == 0, result.stderr
        stack.redis.stop()
        yield stack, result.stdout.strip()
    finally:
        stack_gen.close()


def _copy_backups(stack: Stack, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    backups = tmp_path / "backups"
    shutil.copytree(stack.backup_dir, backups)
    return backups, {**stack.env, "BACKUP_DIR": str(backups)}


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _siblings(stack: Stack) -> list[str]:
    return sorted(p.name for p in stack.pg.data_dir.parent.iterdir())


def test_corrupted_physical_artifact_leaves_live_data_dir_identical(
    physical_backup: tuple[Stack, str], tmp_path: Path
) -> None:
    stack, backup_id = physical_backup
    backups, env = _copy_backups(stack, tmp_path)
    _flip_middle_byte(backups / backup_id / PHYSICAL)
    stack.pg.shutdown()
    try:
        data_before = tree_snapshot(stack.pg.data_dir)
        siblings_before = _siblings(stack)
        restore = run_cli(
            ["restore", backup_id, "--yes", "--components", "postgres", *_physical_args(stack)],
            env,
        )
        assert restore.returncode != 0
        assert "corrupted: SHA-256 does not match" in restore.stderr
        assert tree_snapshot(stack.pg.data_dir) == data_before
        assert _siblings(stack) == siblings_before  # the staging copy was removed
    finally:
        stack.pg.start_again()


def test_physical_restore_refuses_a_running_server_and_a_backup_without_base_backup(
    physical_backup: tuple[Stack, str], tmp_path: Path
) -> None:
    stack, backup_id = physical_backup
    pg_before = pg_snapshot(stack.pg)
    running = run_cli(
        ["restore", backup_id, "--yes", "--components", "postgres", *_physical_args(stack)],
        stack.env,
    )
    assert running.returncode != 0
    assert "PostgreSQL is running" in running.stderr
    assert "--pg-data-dir" in running.stderr

    logical_only = run_cli(["backup", "--components", "postgres"], stack.env)
    assert logical_only.returncode == 0, logical_only.stderr
    stack.pg.shutdown()
    try:
        data_before = tree_snapshot(stack.pg.data_dir)
        refused = run_cli(
            [
                "restore",
                logical_only.stdout.strip(),
                "--yes",
                "--components",
                "postgres",
                *_physical_args(stack),
            ],
            stack.env,
        )
        assert refused.returncode != 0
        assert "no pg_basebackup_tar artifact" in refused.stderr
        assert "--pg-mode logical" in refused.stderr
        assert tree_snapshot(stack.pg.data_dir) == data_before
    finally:
        stack.pg.start_again()
    assert pg_snapshot(stack.pg) == pg_before


def test_drill_checks_the_physical_artifact_and_fails_when_it_is_damaged(
    physical_backup: tuple[Stack, str], tmp_path: Path
) -> None:
    stack, backup_id = physical_backup
    backups, env = _copy_backups(stack, tmp_path)
    good = run_cli(["drill", backup_id], env)
    assert good.returncode == 0, good.stderr
    assert "drill: postgres physical ok" in good.stderr
    assert "drill: postgres ok" in good.stderr  # the portable dump is proven too

    # A base backup whose manifest counts disagree with its content: the drill's private
    # server really counted the rows of the restored copy.
    manifest_path = backups / backup_id / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    physical = manifest["components"]["postgres"]["physical"]
    physical["row_counts_after"]["public.feedback"] += 5
    manifest["components"]["postgres"]["row_counts"]["public.feedback"] += 5
    manifest_path.write_text(json.dumps(manifest))
    wrong_counts = run_cli(["drill", backup_id], env)
    assert wrong_counts.returncode != 0
    assert "postgres (physical): row counts differ" in wrong_counts.stderr

    _flip_middle_byte(backups / backup_id / PHYSICAL)
    damaged = run_cli(["drill", backup_id], env)
    assert damaged.returncode != 0
    assert "corrupted: SHA-256 does not match" in damaged.stderr
