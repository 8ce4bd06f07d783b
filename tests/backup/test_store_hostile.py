"""The backup directory as an operator finds it at 3 a.m.: mounted read-only (another host,
prod's backups seen from staging), with a malformed manifest.json, with a backup stamped in
the future by a skewed clock, or with retention set to keep nothing (issue 10 items 1, 3,
10, 11)."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from rag_backup.metrics import read_samples
from tests.backup.conftest import Stack, make_stack
from tests.backup.helpers import chroma_rows, run_cli
from tests.backup.mounts import read_only_bind

pytestmark = pytest.mark.integration
# The documented textfile (docs/backup.md, Metrics) the alerts read.
STORE_FILE = "rag_backup_store.prom"


@pytest.fixture(scope="module")
def one_backup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Path]]:
    stack_gen = make_stack(tmp_path_factory.mktemp("hostile"))
    stack = next(stack_gen)
    try:
        result = run_cli(["backup", "--components", "postgres,chroma"], stack.env)
        assert result.returncode == 0, result.stderr
        yield stack, stack.backup_dir / result.stdout.strip()
    finally:
        stack_gen.close()


def _copy_as(source: Path, backups: Path, when: dt.datetime, **changes: Any) -> str:
    backup_id = when.strftime("%Y%m%dT%H%M%SZ")
    target = backups / backup_id
    shutil.copytree(source, target)
    (target / "verification.json").unlink(missing_ok=True)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.update(id=backup_id, created_unix=when.timestamp(), created_at=when.isoformat())
    manifest.update(changes)
    (target / "manifest.json").write_text(json.dumps(manifest))
    return backup_id


def _manifest(backup: Path) -> dict[str, Any]:
    return dict(json.loads((backup / "manifest.json").read_text()))


def _kept(backups: Path) -> list[str]:
    return sorted(p.name for p in backups.iterdir() if not p.name.startswith("."))


def _no_traceback(result: Any) -> None:
    assert "Traceback" not in result.stderr, result.stderr


# --------------------------------------------------------------------------- item 3


def test_resolve_prints_the_one_id_latest_stands_for(
    one_backup: tuple[Stack, Path], tmp_path: Path
) -> None:
    stack, source = one_backup
    backups = tmp_path / "backups"
    backups.mkdir()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    older = _copy_as(source, backups, now - dt.timedelta(days=2))
    newer = _copy_as(source, backups, now - dt.timedelta(days=1))
    env = {**stack.env, "BACKUP_DIR": str(backups)}
    for args in (["resolve"], ["resolve", "latest"]):
        result = run_cli(args, env)
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"{newer}\n"
    exact = run_cli(["resolve", older], env)
    assert (exact.returncode, exact.stdout) == (0, f"{older}\n")
    missing = run_cli(["resolve", "20200101T000000Z"], env)
    assert missing.returncode == 1
    assert "backup 20200101T000000Z not found" in missing.stderr


# --------------------------------------------------------------------------- item 1


def test_verify_list_drill_restore_work_on_a_read_only_backup_dir(
    one_backup: tuple[Stack, Path], tmp_path: Path
) -> None:
    stack, source = one_backup
    backups = tmp_path / "backups"
    backups.mkdir()
    backup_id = _copy_as(source, backups, dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    before = sorted(str(p.relative_to(backups)) for p in backups.rglob("*"))
    state = tmp_path / "state"
    with read_only_bind(backups, tmp_path / "ro-backups") as mounted:
        env = {**stack.env, "BACKUP_DIR": str(mounted), "RAG_BACKUP_METRICS_DIR": ""}

        # Without a state dir: the result is printed, not recorded, and that is said.
        plain = run_cli(["verify", backup_id], env)
        assert plain.returncode == 0, plain.stderr
        assert "is read-only and no --state-dir / RAG_BACKUP_STATE_DIR is set" in plain.stderr

        env["RAG_BACKUP_STATE_DIR"] = str(state)
        verified = run_cli(["verify", backup_id], env)
        assert verified.returncode == 0, verified.stderr
        record = json.loads((state / "verifications" / f"{backup_id}.json").read_text())
        assert record["ok"] is True and record["how"] == "verify"
        listed = run_cli(["list"], env)
        assert listed.returncode == 0, listed.stderr
        assert f"{backup_id}" in listed.stdout and "verified (verify" in listed.stdout

        drill = run_cli(["drill", backup_id], env)
        assert drill.returncode == 0, drill.stderr
        assert "drill ok" in drill.stdout

        live_chroma = tmp_path / "live-chroma"
        chroma_args = ["--components", "chroma", "--chroma-dir", str(live_chroma), "--yes"]
        restored = run_cli(["restore", backup_id, *chroma_args], env)
        assert restored.returncode == 0, restored.stderr
        assert "has no .lock; taking the restore lock in" in restored.stderr
        assert chroma_rows(live_chroma) == chroma_rows(stack.chroma_dir)

        # As prod's backup dir usually is: with the host's lock file. The restore locks it
        # through a read-only descriptor (the host's backup/prune then wait for it).
        (backups / ".lock").write_text("")
        before.append(".lock")
        again = tmp_path / "live-chroma-2"
        chroma_args = ["--components", "chroma", "--chroma-dir", str(again), "--yes"]
        restored = run_cli(["restore", backup_id, *chroma_args], env)
        assert restored.returncode == 0, restored.stderr
        assert "taking the restore lock" not in restored.stderr
        assert chroma_rows(again) == chroma_rows(stack.chroma_dir)
    # Nothing was written into the backup directory.
    assert sorted(str(p.relative_to(backups)) for p in backups.rglob("*")) == sorted(before)


# --------------------------------------------------------------------------- item 11

MALFORMED: dict[str, Any] = {
    "empty object": {},
    "created_unix text": {"created_unix": "x"},
    "created_unix 1e20": {"created_unix": 1e20},
    "created_unix NaN": {"created_unix": float("nan")},
    "created_unix true": {"created_unix": True},
    "component without artifacts": {"components": {"chroma": {"files": []}}},
    "artifact path traversal": "../../../../etc/passwd",
    "database name with SQL": {"database": 'x"; DROP DATABASE rag_feedback; --'},
    "unknown component": {"components": {"mysql": {"artifacts": []}}},
    "components a list": {"components": []},
    "size negative": "size",
    "head_sha256 upper case": "head_sha256",
    "not an object": [1, 2],
}


def _write_malformed(source: Path, backups: Path, index: int, how: Any) -> str:
    when = dt.datetime(2025, 3, 1, tzinfo=dt.UTC) + dt.timedelta(days=index)
    backup_id = _copy_as(source, backups, when)
    path = backups / backup_id / "manifest.json"
    manifest = json.loads(path.read_text())
    if how == "../../../../etc/passwd":
        manifest["components"]["chroma"]["artifacts"][0]["name"] = how
    elif how == "size":
        manifest["components"]["chroma"]["artifacts"][0]["size"] = -1
    elif how == "head_sha256":
        artifact = manifest["components"]["chroma"]["artifacts"][0]
        artifact["head_sha256"] = artifact["head_sha256"].upper()
    elif isinstance(how, dict) and "database" in how:
        manifest["components"]["postgres"]["database"] = how["database"]
    elif isinstance(how, dict) and how:
        manifest.update(how)
    else:
        manifest = how
    path.write_text(json.dumps(manifest))  # json.dumps writes NaN as the bare token NaN
    return backup_id


def test_malformed_manifests_are_skipped_with_a_warning_and_counted(
    one_backup: tuple[Stack, Path], tmp_path: Path
) -> None:
    stack, source = one_backup
    backups = tmp_path / "backups"
    backups.mkdir()
    good = _copy_as(source, backups, dt.datetime.now(dt.UTC) - dt.timedelta(hours=1))
    bad = [_write_malformed(source, backups, i, how) for i, how in enumerate(MALFORMED.values())]
    broken_json = backups / "20250101T000000Z"
    broken_json.mkdir()
    (broken_json / "manifest.json").write_text('{"created_unix": ')
    bad.append(broken_json.name)
    metrics_dir = tmp_path / "textfile"
    metrics_dir.mkdir()
    env = {**stack.env, "BACKUP_DIR": str(backups), "RAG_BACKUP_METRICS_DIR": str(metrics_dir)}
    live_chroma = tmp_path / "live-chroma"
    commands = [
        ["list"],
        ["prune", "--dry-run"],
        ["verify"],
        ["drill"],
        ["restore", "--components", "chroma", "--chroma-dir", str(live_chroma), "--yes"],
    ]
    for args in commands:
        result = run_cli(args, env)
        assert result.returncode == 0, (args, result.stderr)
        _no_traceback(result)
        for backup_id in bad:
            assert f"warning: skipping backup folder {backups / backup_id}:" in result.stderr
        samples = read_samples(metrics_dir / STORE_FILE)
        assert samples[("rag_backup_malformed_backups", None)] == len(bad), args
    assert chroma_rows(live_chroma) == chroma_rows(stack.chroma_dir)
    listed = run_cli(["list"], env).stdout
    assert good in listed and all(f"{b}" in listed for b in bad)
    assert "MALFORMED" in listed
    # prune never deletes what it cannot read: the operator decides.
    assert _kept(backups) == sorted([good, *bad])
    # Asked for by id: one clear line naming the folder and the problem.
    traversal = bad[list(MALFORMED).index("artifact path traversal")]
    result = run_cli(["verify", traversal], env)
    assert result.returncode == 1
    _no_traceback(result)
    assert f"backup folder {backups / traversal}: malformed manifest.json" in result.stderr
    assert "is not a plain artifact file name" in result.stderr
    upper = bad[list(MALFORMED).index("head_sha256 upper case")]
    result = run_cli(["restore", upper, "--components", "chroma", "--yes"], env)
    assert result.returncode == 1
    _no_traceback(result)
    assert "artifacts[0].head_sha256 is not 64 lowercase hex digits" in result.stderr


# --------------------------------------------------------------------------- item 10


def test_prune_with_every_keep_0_keeps_the_newest_and_the_newest_verified(
    one_backup: tuple[Stack, Path], tmp_path: Path
) -> None:
    stack, source = one_backup
    backups = tmp_path / "backups"
    backups.mkdir()
    start = dt.datetime(2025, 5, 1, 2, 0, tzinfo=dt.UTC)
    # Chroma only: no "newest with a logical dump" keeps anything here.
    chroma_only = {"components": {"chroma": _manifest(source)["components"]["chroma"]}}
    ids = [_copy_as(source, backups, start + timedelta(days=d), **chroma_only) for d in range(5)]
    env = {**stack.env, "BACKUP_DIR": str(backups)}
    zero = ["prune", "--keep-daily", "0", "--keep-weekly", "0", "--keep-monthly", "0"]
    result = run_cli(zero, env)
    assert result.returncode == 0, result.stderr
    assert _kept(backups) == [ids[-1]]  # nothing verified: the newest stays

    more = [
        _copy_as(source, backups, start + timedelta(days=d), **chroma_only) for d in range(5, 8)
    ]
    assert run_cli(["verify", more[0]], env).returncode == 0
    result = run_cli(zero, env)
    assert result.returncode == 0, result.stderr
    assert _kept(backups) == [more[0], more[-1]]


def test_a_backup_stamped_in_2030_is_suspect_never_latest_never_a_reason_to_prune(
    one_backup: tuple[Stack, Path], tmp_path: Path
) -> None:
    stack, source = one_backup
    backups = tmp_path / "backups"
    backups.mkdir()
    now = dt.datetime.now(dt.UTC).replace(microsecond=0)
    real = [_copy_as(source, backups, now - dt.timedelta(days=d, hours=1)) for d in (3, 2, 1)]
    future = _copy_as(source, backups, dt.datetime(2030, 1, 1, 3, 0, tzinfo=dt.UTC))
    metrics_dir = tmp_path / "textfile"
    metrics_dir.mkdir()
    env = {**stack.env, "BACKUP_DIR": str(backups), "RAG_BACKUP_METRICS_DIR": str(metrics_dir)}

    resolved = run_cli(["resolve"], env)
    assert resolved.stdout == f"{real[-1]}\n", resolved.stderr
    verified = run_cli(["verify"], env)
    assert verified.returncode == 0, verified.stderr
    assert f"{real[-1]} verified" in verified.stdout
    listed = run_cli(["list"], env)
    line = next(x for x in listed.stdout.splitlines() if x.startswith(future))
    assert "SUSPECT: dated in the future" in line
    assert read_samples(metrics_dir / STORE_FILE)[("rag_backup_future_backups", None)] == 1

    pruned = run_cli(
        ["prune", "--keep-daily", "1", "--keep-weekly", "0", "--keep-monthly", "0"], env
    )
    assert pruned.returncode == 0, pruned.stderr
    # The real newest stays (daily, newest, newest verified); the 2030 one is left for the
    # operator, flagged; it made no real backup go.
    assert _kept(backups) == sorted([real[-1], future])
    assert f"keep   {future} (dated in the future" in pruned.stderr
    assert time.time() < dt.datetime(2030, 1, 1, tzinfo=dt.UTC).timestamp()
