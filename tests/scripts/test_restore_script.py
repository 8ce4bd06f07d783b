"""scripts/restore-stack.sh against a stand-in `docker` that records every call: the
order that keeps data safe and the refusals, in milliseconds. The procedure itself is
proven on a real engine with the program's own stacks in tests/stack/test_stacks.py."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.tooling import require_tool

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "restore-stack.sh"

FAKE_DOCKER = r"""#!/usr/bin/env bash
echo "$*" >> "$DOCKER_LOG"
case "$1 $*" in
  *"-m rag_backup resolve"*) echo 20261124T030000Z ;;
  *"inspect --format {{.Config.Image}}"*) echo personal-rag/backup:abc ;;
  *"/workspace/data/chroma"*) echo rag-S-chroma-data ;;
  *'eq .Destination "/data"'*) echo rag-S-redis-data ;;
  *'eq .Destination "/backups"'*) echo rag-S-backups ;;
  *"{{range .Config.Env}}"*postgres) echo "PGDATA=$FAKE_PGDATA" ;;
  *'eq .Destination "/var/lib/postgresql/data"'*) echo rag-S-postgres-data ;;
  *"{{range .Config.Env}}"*)
    echo PGHOST=rag-S-postgres
    echo RAG_BACKUP_KEY_FILE=/etc/rag/secrets/backup_passphrase
    echo BACKUP_DIR=/backups ;;
  *"{{.Config.User}}"*) echo 1000:1000 ;;
  *"{{.State.Health.Status}}"*) echo healthy ;;
  *"{{.State.ExitCode}}"*) echo 0 ;;
  *"-c %u:%g"*) echo 999:1000 ;;
esac
if [ -n "${FAIL_ON:-}" ] && [[ "$*" == *"$FAIL_ON"* ]]; then exit "${FAIL_CODE:-1}"; fi
exit 0
"""


def run_script(
    tmp_path: Path,
    *args: str,
    stdin: str = "",
    fail_on: str = "",
    pgdata: str = "/var/lib/postgresql/data/pgdata",
    fail_code: int = 1,
) -> tuple[int, list[str], str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    docker = bin_dir / "docker"
    docker.write_text(FAKE_DOCKER)
    docker.chmod(0o755)
    log = tmp_path / "docker.log"
    log.write_text("")
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "DOCKER_LOG": str(log),
        "FAIL_ON": fail_on,
        "FAKE_PGDATA": pgdata,
        "FAIL_CODE": str(fail_code),
    }
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


def index(calls: list[str], needle: str) -> int:
    return next(i for i, c in enumerate(calls) if needle in c)


@pytest.mark.integration
def test_script_passes_shellcheck() -> None:
    shellcheck = require_tool("shellcheck")
    scripts = [*sorted((REPO / "scripts").glob("**/*.sh")), REPO / ".ci" / "run"]
    for script in scripts:
        # -x: follow `source`d files (their paths are relative to the repository).
        subprocess.run([shellcheck, "-x", str(script)], check=True, cwd=REPO)


def test_verify_first_then_stop_then_restore_then_start(tmp_path: Path) -> None:
    code, calls, err = run_script(tmp_path, "staging", "--yes")
    assert code == 0, err
    verify = index(calls, "-m rag_backup verify")
    stop = index(calls, "stop rag-staging-api rag-staging-backup rag-staging-redis")
    restore = index(calls, "-m rag_backup restore")
    start_redis = index(calls, "start rag-staging-redis")
    assert verify < stop < restore < start_redis
    assert "--yes" in calls[restore]
    # Physical PostgreSQL restore: the server is stopped too, its cluster swapped.
    assert "rag-staging-postgres" in calls[stop]
    assert "--pg-mode physical --pg-data-dir /pg/pgdata" in calls[restore]
    assert "source=rag-S-postgres-data,target=/pg" in calls[restore]
    assert index(calls, "start rag-staging-postgres") < index(calls, "start rag-staging-api")
    # The stack's own roles and passwords again before any client connects.
    migrate = index(calls, "start --attach rag-staging-postgres-migrate")
    assert (
        index(calls, "start rag-staging-postgres")
        < migrate
        < index(calls, "start rag-staging-redis")
    )
    # Ownership goes back to the services' users before they start again.
    chown = index(calls, "chown -R 999:1000 /redis-data")
    assert restore < chown < start_redis


def test_unconfirmed_restore_changes_nothing(tmp_path: Path) -> None:
    code, calls, err = run_script(tmp_path, "staging", stdin="prod\n")
    assert code == 1 and "not confirmed" in err
    assert not any(c.startswith(("stop", "start")) for c in calls)
    assert not any("-m rag_backup restore" in c for c in calls)


def test_failed_verification_stops_before_touching_the_stack(tmp_path: Path) -> None:
    code, calls, _ = run_script(tmp_path, "staging", "--yes", fail_on="rag_backup verify")
    assert code != 0
    assert not any(c.startswith("stop") for c in calls)


def test_prod_never_takes_another_stacks_data(tmp_path: Path) -> None:
    code, calls, err = run_script(tmp_path, "prod", "--from", "staging", "--yes")
    assert code == 2 and "refusing" in err
    assert calls == []


def test_staging_from_prod_reads_prods_backups_and_key_read_only(tmp_path: Path) -> None:
    code, calls, err = run_script(tmp_path, "staging", "--from", "prod", "--yes")
    assert code == 0, err
    restore = calls[index(calls, "-m rag_backup restore")]
    # Only prod's passphrase reaches the job: copied alone into a throwaway volume.
    copy = calls[index(calls, "source=rag-prod-backup-config,target=/from,readonly")]
    assert "cp /from/secrets/backup_passphrase /to/secrets/" in copy
    assert "rag-prod-backup-config" not in restore
    assert "rag-staging-restore-key-" in restore and "target=/source-keys,readonly" in restore
    assert any(c.startswith("volume rm -f rag-staging-restore-key-") for c in calls)
    assert "target=/backups,readonly" in restore
    assert "RAG_BACKUP_KEY_FILE=/source-keys/secrets/backup_passphrase" in restore
    assert "RAG_BACKUP_KEY_FILE=/etc/rag" not in restore
    assert "--network rag-staging-backend" in restore


def test_adopted_cluster_at_the_volume_root_is_restored_logically(tmp_path: Path) -> None:
    code, calls, err = run_script(tmp_path, "staging", "--yes", pgdata="/var/lib/postgresql/data")
    assert code == 0, err
    stop = calls[index(calls, "stop rag-staging-api")]
    assert "postgres" not in stop  # the running server takes the logical dump
    restore = calls[index(calls, "-m rag_backup restore")]
    assert "--pg-mode logical" in restore and "target=/pg" not in restore
    assert not any(c.startswith("start rag-staging-postgres") for c in calls)


def test_logical_flag_keeps_postgres_running(tmp_path: Path) -> None:
    code, calls, err = run_script(tmp_path, "staging", "--yes", "--logical")
    assert code == 0, err
    assert "--pg-mode logical" in calls[index(calls, "-m rag_backup restore")]


def test_key_volume_replaces_the_stacks_key_for_old_backups(tmp_path: Path) -> None:
    code, calls, err = run_script(tmp_path, "prod", "--key-volume", "rag-prod-old-keys", "--yes")
    assert code == 0, err
    for step in ("-m rag_backup verify", "-m rag_backup restore"):
        call = calls[index(calls, step)]
        assert "source=rag-prod-old-keys,target=/source-keys,readonly" in call
        assert "source=rag-prod-backup-config,target=/source-keys" not in call


def test_components_are_passed_to_the_restore(tmp_path: Path) -> None:
    code, calls, err = run_script(tmp_path, "staging", "--components", "redis,chroma", "--yes")
    assert code == 0, err
    assert "--components redis,chroma" in calls[index(calls, "-m rag_backup restore")]


def test_a_failed_restore_brings_the_stopped_services_back(tmp_path: Path) -> None:
    code, calls, err = run_script(tmp_path, "staging", "--yes", fail_on="rag_backup restore")
    assert code == 1 and "restore of 20261124T030000Z failed" in err
    assert "rag-staging-redis: healthy" in err  # each service's state after bringing it back
    restore = index(calls, "-m rag_backup restore")
    restarted = {c.split()[1] for c in calls[restore:] if c.startswith("start ")}
    assert restarted == {
        "rag-staging-api",
        "rag-staging-backup",
        "rag-staging-redis",
        "rag-staging-postgres",
    }
    assert not any("chown" in c for c in calls[restore:])


TARGET = "2026-11-30T16:59:00Z"


def test_target_time_restores_postgres_only_and_leaves_redis_running(tmp_path: Path) -> None:
    code, calls, err = run_script(tmp_path, "staging", "--target-time", TARGET, "--yes")
    assert code == 0, err
    resolve = index(calls, "-m rag_backup resolve")
    assert calls[resolve].endswith(f"resolve latest --target-time {TARGET}")
    assert resolve < index(calls, "-m rag_backup verify") < index(calls, "stop ")
    restore = calls[index(calls, "-m rag_backup restore")]
    assert f"restore 20261124T030000Z --components postgres --target-time {TARGET}" in restore
    assert "--pg-mode physical" in restore
    stop = calls[index(calls, "stop ")]
    assert "rag-staging-postgres" in stop and "rag-staging-redis" not in stop
    assert not any("chown -R 999:1000" in c for c in calls)  # Redis/Chroma not touched


def test_target_time_with_redis_warns_that_it_comes_from_the_base_backup(tmp_path: Path) -> None:
    args = ("--target", "latest", "--components", "postgres,redis", "--yes")
    code, calls, err = run_script(tmp_path, "staging", *args)
    assert code == 0, err
    assert "warning: Redis and Chroma have no log to replay" in err
    assert "rag-staging-redis" in calls[index(calls, "stop ")]
    assert (
        "--components postgres,redis --target latest"
        in calls[index(calls, "-m rag_backup restore")]
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--logical",), "cannot be combined with --logical"),
        (("--from", "prod"), "cannot be combined with --from prod"),
        (("--components", "redis"), "needs postgres in --components"),
    ],
)
def test_target_time_refuses_what_it_cannot_mean_before_any_docker_call(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    code, calls, err = run_script(tmp_path, "staging", "--target-time", TARGET, *args, "--yes")
    assert (code, calls) == (2, []), err
    assert message in err


def test_a_target_outside_the_archive_exits_2_before_anything_stops(tmp_path: Path) -> None:
    args = ("staging", "--target-time", TARGET, "--yes")
    code, calls, err = run_script(tmp_path, *args, fail_on="rag_backup resolve", fail_code=2)
    assert code == 2, err
    assert "nothing was stopped" in err
    assert not any(c.startswith(("stop", "start")) or "rag_backup verify" in c for c in calls)


@pytest.mark.parametrize("subdir", ["../etc", "/backups", "a/b", "Offsite"])
def test_backups_subdir_must_be_one_folder_name(tmp_path: Path, subdir: str) -> None:
    code, calls, err = run_script(tmp_path, "staging", "--backups-subdir", subdir, "--yes")
    assert (code, calls) == (2, []), err
    assert "--backups-subdir" in err or "usage:" in err


def test_backups_subdir_is_the_store_every_rag_backup_step_reads(tmp_path: Path) -> None:
    code, calls, err = run_script(tmp_path, "staging", "--backups-subdir", "offsite-pitr", "--yes")
    assert code == 0, err
    steps = [c for c in calls if " -m rag_backup " in c]
    assert [c.split(" -m rag_backup ")[1].split()[0] for c in steps] == [
        "resolve",
        "verify",
        "restore",
    ]
    for call in steps:
        assert "--env BACKUP_DIR=/backups/offsite-pitr" in call
        assert "--env BACKUP_DIR=/backups " not in call
