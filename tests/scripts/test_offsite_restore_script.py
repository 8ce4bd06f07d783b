"""scripts/offsite-restore.sh ("the VPS is gone") against the stand-in `docker` of the
restore-script tests: pull inside the stack's backup job, then restore-stack.sh by the
pulled id (never "latest"); bad input refused before any docker call. The pull and the
restore themselves run for real in tests/offsite (real sshd, PostgreSQL, Redis)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from rag_backup.offsite_pitr import PULL_DIR
from tests.scripts.test_restore_script import FAKE_DOCKER, index
from tests.tooling import require_tool

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "offsite-restore.sh"
PULLED = "20261124T030000Z"
# The job answers `offsite pull` with the pulled id on its last stdout line.
FAKE = FAKE_DOCKER.replace(
    'case "$1 $*" in\n',
    f'case "$1 $*" in\n  *"offsite pull"*) echo "{PULLED}" ;;\n',
)


def run(
    tmp_path: Path,
    *args: str,
    stdin: str = "",
    prefix: str | None = None,
    fail_on: str = "",
    fail_code: int = 1,
) -> tuple[int, list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "docker").write_text(FAKE)
    (bin_dir / "docker").chmod(0o755)
    log = tmp_path / "docker.log"
    log.write_text("")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "DOCKER_LOG": str(log),
        "FAIL_ON": fail_on,
        "FAIL_CODE": str(fail_code),
        "FAKE_PGDATA": "/var/lib/postgresql/data/pgdata",
    }
    if prefix is not None:
        env["RAG_NAME_PREFIX"] = prefix
    proc = subprocess.run(
        ["bash", str(SCRIPT), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    return proc.returncode, log.read_text().splitlines(), proc.stderr


@pytest.mark.integration
def test_script_passes_shellcheck() -> None:
    subprocess.run([require_tool("shellcheck"), str(SCRIPT)], check=True)


def test_pull_in_the_backup_job_then_restore_that_id(tmp_path: Path) -> None:
    code, calls, err = run(tmp_path, "prod", "--key-volume", "rag-prod-old-keys", "--yes")
    assert code == 0, err
    pull = index(calls, "exec rag-prod-backup python3 -m rag_backup offsite pull latest")
    verify = index(calls, f"-m rag_backup verify {PULLED}")
    restore = index(calls, f"-m rag_backup restore {PULLED}")
    assert pull < verify < restore
    assert "rag-prod-old-keys" in calls[restore]


def test_an_explicit_id_is_pulled(tmp_path: Path) -> None:
    code, calls, err = run(tmp_path, "staging", "--id", "20261120T030000Z", "--yes")
    assert code == 0, err
    assert any("offsite pull 20261120T030000Z" in c for c in calls)


def test_a_point_in_time_is_pulled_with_its_wal_then_recovered_from_the_pulled_store(
    tmp_path: Path,
) -> None:
    when = "2026-11-30T16:59:00Z"
    code, calls, err = run(tmp_path, "prod", "--target-time", when, "--yes")
    assert code == 0, err
    pull = index(calls, f"-m rag_backup offsite pull latest --target-time {when}")
    resolve = index(calls, f"-m rag_backup resolve {PULLED} --target-time {when}")
    restore = index(calls, f"-m rag_backup restore {PULLED} --components postgres --target-time")
    assert pull < resolve < restore
    # Every rag-backup step of restore-stack.sh reads the store the pull filled, never the
    # stack's own backups or WAL archive.
    for call in (calls[resolve], calls[restore]):
        assert f"--env BACKUP_DIR=/backups/{PULL_DIR}" in call
        assert "--env BACKUP_DIR=/backups " not in call


def test_a_time_outside_the_off_host_copy_stops_before_anything_is_stopped(
    tmp_path: Path,
) -> None:
    # rag-backup offsite pull exits 2 with the off-host ranges (tests/offsite proves it).
    code, calls, err = run(
        tmp_path, "prod", "--target", "latest", "--yes", fail_on="offsite pull", fail_code=2
    )
    assert code == 2
    assert "nothing was stopped or changed" in err
    assert not [c for c in calls if c.startswith(("run ", "stop "))]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("vps",), "unknown stack 'vps'"),
        (("prod", "--id", "../x"), "is not a backup id"),
        (("prod", "--from", "staging"), "usage:"),
        (("prod", "--target", "earliest"), "--target 'earliest': expected latest"),
        (("prod", "--target-time", "x", "--logical"), "cannot be combined with --logical"),
    ],
)
def test_bad_input_is_refused_before_docker(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    code, calls, err = run(tmp_path, *args)
    assert code == 2
    assert message in err
    assert calls == []


def test_a_bad_name_prefix_is_refused_before_docker(tmp_path: Path) -> None:
    code, calls, err = run(tmp_path, "prod", "--yes", prefix="Rag_")
    assert code == 2
    assert "RAG_NAME_PREFIX 'Rag_'" in err
    assert calls == []
