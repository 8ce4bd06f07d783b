"""The Backups component under mocks: volumes, network, schedule, keys, metrics path."""

from __future__ import annotations

import pytest

from tests.pulumi_harness import (
    ProgramRun,
    container_env,
    is_secret,
    run_program,
    stack_config,
)

STACKS = ("staging", "prod")


@pytest.fixture(scope="module")
def runs() -> dict[str, ProgramRun]:
    return {stack: run_program(stack) for stack in STACKS}


def mounts(run: ProgramRun, container: str) -> dict[str, dict]:
    return {m["target"]: m for m in run.containers[container].inputs["mounts"]}


def test_backup_job_reads_data_and_writes_only_its_own_volumes(
    runs: dict[str, ProgramRun],
) -> None:
    for stack, run in runs.items():
        name = f"rag-{stack}-backup"
        m = mounts(run, name)
        assert m["/backups"]["source"] == f"rag-{stack}-backups"
        assert not m["/backups"].get("readOnly")
        chroma = m["/workspace/data/chroma"]
        assert chroma["source"] == f"rag-{stack}-chroma-data"
        # Chroma is writable only for SQLite's snapshot lock; nothing else of the stack.
        writable = {t for t, mount in m.items() if not mount.get("readOnly")}
        assert writable == {"/backups", "/scratch", "/textfile", "/workspace/data/chroma"}
        sources = {mount["source"] for mount in m.values()}
        assert not any("postgres" in s or "redis" in s for s in sources)
        nets = {n["name"] for n in run.containers[name].inputs["networksAdvanced"]}
        assert nets == {f"rag-{stack}-backend"}
        assert not run.containers[name].inputs.get("ports")


def test_schedule_and_retention_come_from_config() -> None:
    run = run_program(
        "staging",
        stack_config(
            "staging",
            backupTime="01:15",
            drillWeekday="wed",
            drillTime="02:45",
            backupKeepDaily="3",
        ),
    )
    e = container_env(run, "backup")
    assert (e["RAG_BACKUP_TIME"], e["RAG_DRILL_WEEKDAY"], e["RAG_DRILL_TIME"]) == (
        "01:15",
        "wed",
        "02:45",
    )
    assert e["RAG_BACKUP_KEEP_DAILY"] == "3"


def test_default_schedule_is_daily_at_three(runs: dict[str, ProgramRun]) -> None:
    assert container_env(runs["prod"], "backup")["RAG_BACKUP_TIME"] == "03:00"


def test_keys_are_secret_files_distinct_per_stack(runs: dict[str, ProgramRun]) -> None:
    passphrases = {}
    for stack, run in runs.items():
        init = run.containers[f"rag-{stack}-backup-config-init"]
        assert is_secret(init.raw_inputs["uploads"])
        files = {u["file"]: u["content"] for u in init.inputs["uploads"]}
        passphrase = files["/incoming/secrets/backup_passphrase"]
        key_file = container_env(run, "backup")["RAG_BACKUP_KEY_FILE"]
        assert key_file == "/etc/rag/secrets/backup_passphrase"
        exported, secret = run.exports["backupPassphrase"]
        assert secret and exported == passphrase
        passphrases[stack] = passphrase
    assert passphrases["staging"] != passphrases["prod"]


def test_metrics_land_where_node_exporter_reads_them(runs: dict[str, ProgramRun]) -> None:
    for stack, run in runs.items():
        backup_dir = container_env(run, "backup")["RAG_BACKUP_METRICS_DIR"]
        backup_volume = mounts(run, f"rag-{stack}-backup")[backup_dir]["source"]
        node = run.containers[f"rag-{stack}-node-exporter"].inputs
        flag = next(c for c in node["command"] if c.startswith("--collector.textfile.directory="))
        node_dir = flag.split("=", 1)[1]
        node_mount = mounts(run, f"rag-{stack}-node-exporter")[node_dir]
        assert node_mount["source"] == backup_volume
        assert node_mount["readOnly"] is True


def test_backup_host_path_replaces_the_volume() -> None:
    run = run_program("prod", stack_config("prod", backupHostPath="/srv/rag-backups"))
    m = mounts(run, "rag-prod-backup")["/backups"]
    assert m["type"] == "bind" and m["source"] == "/srv/rag-backups"
    assert "rag-prod-backups" not in run.volumes
    assert run.exports["backupsLocation"][0] == "/srv/rag-backups"


def test_backup_image_is_built_locally_not_pushed(runs: dict[str, ProgramRun]) -> None:
    for run in runs.values():
        (image,) = [r for r in run.of_type("docker:index/image:Image") if "backup" in r.name]
        assert image.inputs["skipPush"] is True
        assert image.inputs["build"]["dockerfile"].endswith("docker/backup/Dockerfile")


def test_physical_base_backups_are_on_by_default_and_configurable(
    runs: dict[str, ProgramRun],
) -> None:
    assert container_env(runs["prod"], "backup")["RAG_BACKUP_PG_PHYSICAL"] == "1"
    off = run_program("prod", stack_config("prod", backupPgPhysical="false"))
    assert container_env(off, "backup")["RAG_BACKUP_PG_PHYSICAL"] == "0"


def test_portable_dump_weekday_follows_config(runs: dict[str, ProgramRun]) -> None:
    assert container_env(runs["prod"], "backup")["RAG_BACKUP_PG_LOGICAL_WEEKDAY"] == "sun"
    daily = run_program("prod", stack_config("prod", backupPgLogicalWeekday="daily"))
    assert "RAG_BACKUP_PG_LOGICAL_WEEKDAY" not in container_env(daily, "backup")
    logical_only = run_program("prod", stack_config("prod", backupPgPhysical="false"))
    # Without base backups every backup must carry the logical dump.
    assert "RAG_BACKUP_PG_LOGICAL_WEEKDAY" not in container_env(logical_only, "backup")


def test_wal_archiving_is_on_for_both_stacks_with_its_spool_off_the_backups(
    runs: dict[str, ProgramRun],
) -> None:
    for stack, run in runs.items():
        env = container_env(run, "backup")
        assert env["RAG_BACKUP_WAL_ARCHIVE"] == "1", stack
        assert env["RAG_BACKUP_PG_PHYSICAL"] == "1", stack  # PITR replays onto a base backup
        # Plaintext WAL is received into the scratch volume, never the kept/copied backups.
        spool = env["RAG_BACKUP_WAL_SPOOL_DIR"]
        m = mounts(run, f"rag-{stack}-backup")
        (holder,) = [t for t in m if spool.startswith(f"{t}/")]
        assert m[holder]["source"] == f"rag-{stack}-backup-scratch"
        # The server it archives from keeps WAL for the slot, but never without bound.
        command = run.containers[f"rag-{stack}-postgres"].inputs["command"]
        settings = dict(
            command[i + 1].split("=", 1) for i, arg in enumerate(command) if arg == "-c"
        )
        assert settings["wal_level"] == "replica"
        assert settings["max_slot_wal_keep_size"].endswith("GB")


def test_wal_archiving_is_off_without_physical_base_backups() -> None:
    run = run_program("staging", stack_config("staging", backupPgPhysical="false"))
    env = container_env(run, "backup")
    assert env["RAG_BACKUP_WAL_ARCHIVE"] == "0"
    assert "RAG_BACKUP_WAL_SPOOL_DIR" not in env
