"""Retention, argument errors and --help, age encryption."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.backup.conftest import Stack, make_stack
from tests.backup.helpers import run_cli
from tests.tooling import require_tool


@pytest.fixture(scope="module")
def one_backup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    stack_gen = make_stack(tmp_path_factory.mktemp("prune"))
    stack = next(stack_gen)
    try:
        result = run_cli(["backup", "--components", "postgres,chroma"], stack.env)
        assert result.returncode == 0, result.stderr
        yield stack, stack.backup_dir / result.stdout.strip()
    finally:
        stack_gen.close()


def _copy_as(source: Path, backups: Path, when: dt.datetime) -> str:
    backup_id = when.strftime("%Y%m%dT%H%M%SZ")
    target = backups / backup_id
    shutil.copytree(source, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["id"] = backup_id
    manifest["created_unix"] = when.timestamp()
    manifest["created_at"] = when.isoformat()
    (target / "manifest.json").write_text(json.dumps(manifest))
    return backup_id


@pytest.mark.integration
def test_prune_keeps_7_daily_4_weekly_6_monthly_and_newest_verified(
    one_backup: tuple[Stack, Path], tmp_path: Path
) -> None:
    stack, source = one_backup
    backups = tmp_path / "backups"
    backups.mkdir()
    start = dt.datetime(2025, 1, 1, 2, 0, tzinfo=dt.UTC)
    for day in range(181):  # 2025-01-01 .. 2025-06-30, one a day at 02:00
        _copy_as(source, backups, start + dt.timedelta(days=day))
    _copy_as(source, backups, dt.datetime(2025, 6, 30, 14, 0, tzinfo=dt.UTC))
    env = {**stack.env, "BACKUP_DIR": str(backups)}
    assert run_cli(["verify", "20250110T020000Z"], env).returncode == 0

    dry = run_cli(["prune", "--dry-run"], env)
    assert dry.returncode == 0, dry.stderr
    assert len(list(backups.iterdir())) == 182 + 1  # + the lock file

    pruned = run_cli(["prune"], env)
    assert pruned.returncode == 0, pruned.stderr
    kept = sorted(p.name for p in backups.iterdir() if not p.name.startswith("."))
    # 2025-06-30 is a Monday (ISO week 27); the Sundays before close weeks 26, 25, 24.
    assert kept == [
        "20250110T020000Z",  # the newest verified backup
        "20250131T020000Z",  # monthly: January
        "20250228T020000Z",  # monthly: February
        "20250331T020000Z",  # monthly: March
        "20250430T020000Z",  # monthly: April
        "20250531T020000Z",  # monthly: May
        "20250615T020000Z",  # weekly: week 24
        "20250622T020000Z",  # weekly: week 25
        "20250624T020000Z",  # daily
        "20250625T020000Z",
        "20250626T020000Z",
        "20250627T020000Z",
        "20250628T020000Z",
        "20250629T020000Z",  # daily + weekly: week 26
        "20250630T140000Z",  # daily + weekly + monthly; the 02:00 one of that day goes
    ]
    custom = run_cli(
        ["prune", "--keep-daily", "1", "--keep-weekly", "0", "--keep-monthly", "0"], env
    )
    assert custom.returncode == 0, custom.stderr
    kept = sorted(p.name for p in backups.iterdir() if not p.name.startswith("."))
    assert kept == ["20250110T020000Z", "20250630T140000Z"]


@pytest.mark.integration
def test_age_encrypted_backup_verifies_and_names_a_wrong_identity(
    one_backup: tuple[Stack, Path], tmp_path: Path
) -> None:
    stack, _ = one_backup
    age_keygen = require_tool("age-keygen")
    require_tool("age")
    identities = []
    for name in ("right", "wrong"):
        path = tmp_path / f"{name}.agekey"
        subprocess.run([age_keygen, "-o", str(path)], capture_output=True, check=True, timeout=30)
        identities.append(path)
    recipients = tmp_path / "recipients.txt"
    recipients.write_text(
        subprocess.run(
            [age_keygen, "-y", str(identities[0])],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
    )
    env = {
        **stack.env,
        "BACKUP_DIR": str(tmp_path / "age-backups"),
        "RAG_BACKUP_ENCRYPTION": "age",
        "RAG_BACKUP_AGE_RECIPIENTS_FILE": str(recipients),
        "RAG_BACKUP_AGE_IDENTITY_FILE": str(identities[0]),
    }
    backup = run_cli(["backup", "--components", "chroma"], env)
    assert backup.returncode == 0, backup.stderr
    artifact = tmp_path / "age-backups" / backup.stdout.strip() / "chroma.tar.zst.age"
    assert artifact.read_bytes().startswith(b"age-encryption.org/v1\n")
    assert run_cli(["verify"], env).returncode == 0
    wrong = run_cli(["verify"], {**env, "RAG_BACKUP_AGE_IDENTITY_FILE": str(identities[1])})
    assert wrong.returncode != 0
    assert "wrong key" in wrong.stderr


@pytest.mark.parametrize(
    "command", ["backup", "verify", "list", "resolve", "restore", "drill", "prune", "wal-archive"]
)
def test_every_subcommand_has_help(command: str) -> None:
    result = run_cli([command, "--help"], {})
    assert result.returncode == 0
    assert f"rag-backup {command}" in result.stdout


def test_bad_input_is_named_before_anything_is_touched(tmp_path: Path) -> None:
    backups = tmp_path / "backups"
    key = tmp_path / "key"
    key.write_text("k\n")
    base = {
        "BACKUP_DIR": str(backups),
        "RAG_BACKUP_KEY_FILE": str(key),
        "PGDATABASE": "",
        "REDIS_URL": "",
        "CHROMA_DIR": "",
    }
    cases = [
        (["backup"], {"BACKUP_DIR": ""}, "BACKUP_DIR / --backup-dir is required"),
        (
            ["backup"],
            {"RAG_BACKUP_KEY_FILE": str(tmp_path / "nope")},
            f"--key-file / RAG_BACKUP_KEY_FILE: {tmp_path / 'nope'} is not a readable file",
        ),
        (["backup", "--components", "chroma"], {}, "CHROMA_DIR / --chroma-dir is required"),
        (["backup", "--components", "postgres"], {}, "PGDATABASE / --pg-database is required"),
        (
            ["backup", "--components", "redis"],
            {"REDIS_URL": "http://x"},
            "REDIS_URL / --redis-url: expected redis://",
        ),
        (
            [
                "backup",
                "--components",
                "chroma",
                "--chroma-dir",
                str(tmp_path),
                "--zstd-level",
                "40",
            ],
            {},
            "--zstd-level: 40 is out of range",
        ),
        (["verify", "yesterday"], {}, "backup id 'yesterday' is not valid"),
    ]
    for args, extra, message in cases:
        result = run_cli(args, {**base, **extra})
        assert result.returncode != 0, args
        last = result.stderr.strip().splitlines()[-1]
        assert last.startswith("rag-backup: error:"), result.stderr
        assert message in last, (args, result.stderr)
    bad_components = run_cli(["backup", "--components", "mysql"], base)
    assert bad_components.returncode != 0
    assert "--components / RAG_BACKUP_COMPONENTS: 'mysql'" in bad_components.stderr
    assert not backups.exists()
