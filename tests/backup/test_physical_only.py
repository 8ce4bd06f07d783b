"""Backups with the base backup alone (``--pg-physical --no-pg-logical``), against real
servers: backup, verify, wipe, physical restore, identical data; a logical restore of such a
backup is refused before anything is touched; drill proves what is there; prune keeps the
newest backup that has the portable logical dump."""

from __future__ import annotations

import datetime as dt
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
LOGICAL = "postgres.dump.zst.gpg"
PHYSICAL_ONLY = ["backup", "--pg-physical", "--no-pg-logical"]


def _physical_args(stack: Stack) -> list[str]:
    return ["--pg-mode", "physical", "--pg-data-dir", str(stack.pg.data_dir)]


def _list_line(env: dict[str, str], backup_id: str) -> str:
    listing = run_cli(["list"], env)
    assert listing.returncode == 0, listing.stderr
    lines = [line for line in listing.stdout.splitlines() if line.startswith(backup_id)]
    assert len(lines) == 1, listing.stdout
    return lines[0]


def test_physical_only_backup_verify_wipe_restore_gives_identical_data(stack: Stack) -> None:
    require_tool("pg_basebackup")
    pg_before = pg_snapshot(stack.pg)
    redis_before = redis_snapshot(stack.redis)
    chroma_before = tree_snapshot(stack.chroma_dir)

    backup = run_cli(PHYSICAL_ONLY, stack.env)
    assert backup.returncode == 0, backup.stderr
    backup_id = backup.stdout.strip()
    directory = stack.backup_dir / backup_id
    manifest = json.loads((directory / "manifest.json").read_text())
    postgres = manifest["components"]["postgres"]
    assert [a["kind"] for a in postgres["artifacts"]] == ["pg_basebackup_tar"]
    assert postgres["forms"] == ["physical"]
    assert (directory / PHYSICAL).is_file()
    assert not (directory / LOGICAL).exists()
    assert "pg: physical " in _list_line(stack.env, backup_id)

    verify = run_cli(["verify", backup_id], stack.env)
    assert verify.returncode == 0, verify.stderr
    assert "postgres: ok" in verify.stderr

    stack.pg.psql(f"DROP DATABASE {DATABASE}")
    stack.redis.client().flushall()  # type: ignore[attr-defined]
    stack.redis.stop()
    shutil.rmtree(stack.chroma_dir)
    stack.pg.shutdown()

    restore = run_cli(
        ["restore", backup_id, "--yes", *stack.restore_args(), *_physical_args(stack)], stack.env
    )
    assert restore.returncode == 0, restore.stderr
    stack.pg.start_again()
    assert pg_snapshot(stack.pg) == pg_before
    assert tree_snapshot(stack.chroma_dir) == chroma_before
    assert chroma_rows(stack.chroma_dir)
    stack.start_redis()
    assert redis_snapshot(stack.redis) == redis_before


def test_both_forms_are_listed_and_no_pg_logical_needs_pg_physical(stack: Stack) -> None:
    require_tool("pg_basebackup")
    both = run_cli(["backup", "--pg-physical", "--components", "postgres"], stack.env)
    assert both.returncode == 0, both.stderr
    assert "pg: logical+physical " in _list_line(stack.env, both.stdout.strip())
    logical = run_cli(["backup", "--components", "postgres,chroma"], stack.env)
    assert logical.returncode == 0, logical.stderr
    assert "pg: logical " in _list_line(stack.env, logical.stdout.strip())

    entries_before = sorted(p.name for p in stack.backup_dir.iterdir())
    for args, extra in (
        (["backup", "--no-pg-logical"], {}),
        (["backup"], {"RAG_BACKUP_PG_LOGICAL": "0"}),
    ):
        refused = run_cli(args, {**stack.env, **extra})
        assert refused.returncode != 0
        last = refused.stderr.strip().splitlines()[-1]
        assert "--no-pg-logical" in last and "--pg-physical" in last, refused.stderr
        assert "must contain PostgreSQL" in last
    assert sorted(p.name for p in stack.backup_dir.iterdir()) == entries_before
    # Without postgres in --components there is nothing to refuse.
    chroma_only = run_cli(["backup", "--components", "chroma", "--no-pg-logical"], stack.env)
    assert chroma_only.returncode == 0, chroma_only.stderr


@pytest.fixture(scope="module")
def physical_only_backup(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Stack, str]]:
    stack_gen = make_stack(tmp_path_factory.mktemp("physical-only"))
    stack = next(stack_gen)
    try:
        require_tool("pg_basebackup")
        result = run_cli(PHYSICAL_ONLY, stack.env)
        assert result.returncode == 0, result.stderr
        stack.redis.stop()  # as for any restore
        yield stack, result.stdout.strip()
    finally:
        stack_gen.close()


def test_logical_restore_of_a_physical_only_backup_is_refused_untouched(
    physical_only_backup: tuple[Stack, str],
) -> None:
    stack, backup_id = physical_only_backup
    pg_before = pg_snapshot(stack.pg)
    databases_before = stack.pg.psql("SELECT datname FROM pg_database ORDER BY 1")
    redis_before = tree_snapshot(stack.redis_data)
    chroma_before = tree_snapshot(stack.chroma_dir)
    backups_before = tree_snapshot(stack.backup_dir)
    for mode in ([], ["--pg-mode", "logical"]):
        refused = run_cli(["restore", backup_id, "--yes", *stack.restore_args(), *mode], stack.env)
        assert refused.returncode != 0
        last = refused.stderr.strip().splitlines()[-1]
        assert "has no logical PostgreSQL dump" in last, refused.stderr
        assert "--pg-mode physical" in last
    assert pg_snapshot(stack.pg) == pg_before
    assert stack.pg.psql("SELECT datname FROM pg_database ORDER BY 1") == databases_before
    assert tree_snapshot(stack.redis_data) == redis_before
    assert tree_snapshot(stack.chroma_dir) == chroma_before
    assert tree_snapshot(stack.backup_dir) == backups_before


def test_drill_of_a_physical_only_backup_proves_the_base_backup(
    physical_only_backup: tuple[Stack, str], tmp_path: Path
) -> None:
    stack, backup_id = physical_only_backup
    backups = tmp_path / "backups"
    shutil.copytree(stack.backup_dir, backups)
    env = {**stack.env, "BACKUP_DIR": str(backups)}
    drill = run_cli(["drill", backup_id], env)
    assert drill.returncode == 0, drill.stderr
    assert "drill: postgres physical ok" in drill.stderr
    assert "drill: postgres ok" not in drill.stderr  # there is no dump to drill
    assert "drill: redis ok" in drill.stderr and "drill: chroma ok" in drill.stderr
    assert "verified (drill" in _list_line(env, backup_id)

    # The drill really counted the restored copy's rows.
    manifest_path = backups / backup_id / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    postgres = manifest["components"]["postgres"]
    postgres["row_counts"]["public.feedback"] += 3
    postgres["physical"]["row_counts_after"]["public.feedback"] += 3
    manifest_path.write_text(json.dumps(manifest))
    wrong = run_cli(["drill", backup_id], env)
    assert wrong.returncode != 0
    assert "postgres (physical): row counts differ" in wrong.stderr


def _copy_as(source: Path, backups: Path, when: dt.datetime) -> str:
    """A copy of ``source`` dated ``when``, unverified (so only the retention decides)."""
    backup_id = when.strftime("%Y%m%dT%H%M%SZ")
    target = backups / backup_id
    shutil.copytree(source, target)
    (target / "verification.json").unlink(missing_ok=True)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["id"] = backup_id
    manifest["created_unix"] = when.timestamp()
    manifest["created_at"] = when.isoformat()
    (target / "manifest.json").write_text(json.dumps(manifest))
    return backup_id


def _kept(backups: Path) -> list[str]:
    return sorted(p.name for p in backups.iterdir() if not p.name.startswith("."))


def test_prune_keeps_the_newest_backup_with_a_logical_dump(
    physical_only_backup: tuple[Stack, str], tmp_path: Path
) -> None:
    stack, physical_id = physical_only_backup
    # A backup with the logical dump, of postgres only (Redis is stopped here).
    with_dump = run_cli(["backup", "--components", "postgres"], stack.env)
    assert with_dump.returncode == 0, with_dump.stderr
    logical_source = stack.backup_dir / with_dump.stdout.strip()
    physical_source = stack.backup_dir / physical_id

    backups = tmp_path / "backups"
    backups.mkdir()
    start = dt.datetime(2025, 3, 1, 3, 0, tzinfo=dt.UTC)
    older_dump = _copy_as(logical_source, backups, start)  # Saturday: weekly dump
    newest_dump = _copy_as(logical_source, backups, start + dt.timedelta(days=1))
    daily = [
        _copy_as(physical_source, backups, start + dt.timedelta(days=day)) for day in range(2, 9)
    ]
    env = {**stack.env, "BACKUP_DIR": str(backups)}

    pruned = run_cli(
        ["prune", "--keep-daily", "3", "--keep-weekly", "0", "--keep-monthly", "0"], env
    )
    assert pruned.returncode == 0, pruned.stderr
    # The retention alone keeps the last three (physical-only) days; the newest backup
    # with a logical dump stays too, the older one goes.
    assert _kept(backups) == sorted([newest_dump, *daily[-3:]])
    assert older_dump not in _kept(backups)
    assert f"keep   {newest_dump} (newest with a logical dump)" in pruned.stderr
