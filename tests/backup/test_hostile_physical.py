"""Nothing in a backup may execute (issue 10 item 6): a physical backup's own
postgresql.auto.conf and recovery.signal were written by whoever controlled the backed-up
server. Reproduced as in the issue: ALTER SYSTEM SET restore_command plus a recovery.signal
written with COPY, then a physical backup, then drill and restore must not run it. And a
malicious postgresql.auto.conf (settings that write outside or load code) is not honoured
by the private server that checks the copy. Also item 7: the drill's and the restore's work
directories are 0700 and their files 0600."""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest

from rag_backup import pg, physical
from tests.backup.conftest import Stack
from tests.backup.helpers import DATABASE, run_cli
from tests.tooling import require_tool

pytestmark = pytest.mark.integration


def _plant(stack: Stack, pwn: Path) -> None:
    """What an attacker with SQL superuser on the live server can leave in its data dir."""
    pwn.mkdir(mode=0o777)
    pwn.chmod(0o777)  # the server user (postgres when the tests run as root) writes here
    command = f"id > {pwn}/PWNED_%f; false"
    stack.pg.psql(f"ALTER SYSTEM SET restore_command = '{command}'")
    stack.pg.psql(f"ALTER SYSTEM SET recovery_end_command = 'id > {pwn}/PWNED_END'")
    stack.pg.psql(f"ALTER SYSTEM SET archive_cleanup_command = 'id > {pwn}/PWNED_CLEANUP'")
    # Settings that write outside the copy or load code when the copy starts.
    stack.pg.psql(f"ALTER SYSTEM SET external_pid_file = '{pwn}/PWNED_PID'")
    stack.pg.psql("ALTER SYSTEM SET logging_collector = on")
    stack.pg.psql(f"ALTER SYSTEM SET log_directory = '{pwn}'")
    stack.pg.psql("ALTER SYSTEM SET session_preload_libraries = 'nonexistent_evil_library'")
    stack.pg.psql(f"COPY (SELECT 1 WHERE false) TO '{stack.pg.data_dir}/recovery.signal'")
    assert (stack.pg.data_dir / "recovery.signal").exists()


@pytest.fixture
def planted(stack: Stack, request: pytest.FixtureRequest) -> tuple[Stack, str, Path]:
    require_tool("pg_basebackup")
    # Where the server user can write (pytest's tmp dirs are private to root).
    parent = Path(tempfile.mkdtemp(prefix="rag-test-pwn-"))
    parent.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(parent, ignore_errors=True))
    pwn = parent / "pwn"
    _plant(stack, pwn)
    backup = run_cli(["backup", "--pg-physical", "--components", "postgres"], stack.env)
    assert backup.returncode == 0, backup.stderr
    return stack, backup.stdout.strip(), pwn


def test_drill_runs_nothing_from_a_physical_backup(planted: tuple[Stack, str, Path]) -> None:
    stack, backup_id, pwn = planted
    drill = run_cli(["drill", backup_id], stack.env)
    assert sorted(p.name for p in pwn.iterdir()) == [], drill.stderr
    assert drill.returncode == 0, drill.stderr
    assert "drill ok" in drill.stdout


def test_physical_restore_runs_nothing_from_the_backup(
    planted: tuple[Stack, str, Path],
) -> None:
    stack, backup_id, pwn = planted
    stack.pg.shutdown()
    (stack.pg.data_dir / "recovery.signal").unlink()  # the live cluster is the operator's
    restore = run_cli(
        ["restore", backup_id, "--components", "postgres", "--yes", *_physical(stack)],
        stack.env,
    )
    assert sorted(p.name for p in pwn.iterdir()) == [], restore.stderr
    assert restore.returncode == 0, restore.stderr
    # The restored cluster has no signal file, and its own settings back in place.
    assert not (stack.pg.data_dir / "recovery.signal").exists()
    auto_conf = (stack.pg.data_dir / "postgresql.auto.conf").read_text()
    assert "restore_command" in auto_conf


def _physical(stack: Stack) -> list[str]:
    return ["--pg-mode", "physical", "--pg-data-dir", str(stack.pg.data_dir)]


def _modes(root: Path) -> dict[str, int]:
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            st = path.lstat()
            if stat.S_ISDIR(st.st_mode) or stat.S_ISREG(st.st_mode):
                found[str(path)] = stat.S_IMODE(st.st_mode)
    found[str(root)] = stat.S_IMODE(root.stat().st_mode)
    return found


def test_drill_and_restore_work_files_are_private(
    stack: Stack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> None:
    """While the drill and the restore run (observed when pg_restore starts), everything they
    staged in their work directories is 0700 / 0600."""
    backup = run_cli(["backup", "--components", "postgres,redis"], stack.env)
    assert backup.returncode == 0, backup.stderr
    backup_id = backup.stdout.strip()
    # As the scratch volume: a directory every user may traverse (the private PostgreSQL
    # servers, run as the postgres user, get their own 0700 directories in it).
    work = Path(tempfile.mkdtemp(prefix="rag-test-work-"))
    work.chmod(0o755)
    request.addfinalizer(lambda: shutil.rmtree(work, ignore_errors=True))
    state = tmp_path / "state"
    seen: dict[str, int] = {}
    real_restore_dump = pg.restore_dump

    def observing(*args: Any, **kwargs: Any) -> None:
        for root in (work, state):
            if root.exists():
                for child in root.iterdir():
                    seen.update(_modes(child))
        real_restore_dump(*args, **kwargs)

    monkeypatch.setattr(pg, "restore_dump", observing)
    for name, value in {**stack.env, "RAG_BACKUP_STATE_DIR": str(state)}.items():
        monkeypatch.setenv(name, value)
    from rag_backup import cli

    assert cli.main(["drill", backup_id, "--work-dir", str(work), "--quiet"]) == 0
    stack.redis.stop()
    redis_args = stack.restore_args()
    code = cli.main(
        ["restore", backup_id, "--components", "postgres,redis", "--yes", "--quiet", *redis_args]
    )
    assert code == 0
    loose = {p: oct(m) for p, m in seen.items() if m & 0o077}
    assert loose == {}
    staged_dump = [p for p in seen if p.endswith("postgres.dump")]
    assert len(staged_dump) == 2, sorted(seen)  # the drill's and the restore's
    assert stack.pg.psql("SELECT count(*) FROM feedback", database=DATABASE).strip() == "2000"
    assert physical.SIGNAL_FILES  # the physical copies are covered by the tests above
