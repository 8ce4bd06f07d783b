"""Continuous off-host copies of the WAL archive on real things: a real PostgreSQL 15 under
a write load archived by ``wal-archive`` (pg_receivewal over a slot, zstd + gpg), copied by
``offsite wal-push`` through Debian's rclone to a real chrooted SFTP-only sshd on loopback
(and moto's S3): no segment lost off-host, nothing uploaded twice, a crash mid-upload
repaired, a corrupted remote segment caught, remote WAL retention, and a point-in-time
restore on a new host from the pulled off-host copy to a time between two markers."""

from __future__ import annotations

import datetime as dt
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from rag_backup.metrics import read_samples
from rag_backup.offsite_wal import ARCHIVED_UNTIL, LAST_RUN_SUCCESS, LAST_SUCCESS, METRICS_FILE
from tests.backup.conftest import Stack
from tests.backup.helpers import DATABASE, markers_around_a_time, run_cli
from tests.offsite.conftest import Target, a_new_host
from tests.offsite.test_offsite_s3 import _rclone
from tests.offsite.test_offsite_sftp import _offsite, _sha256
from tests.tooling import require_tool

pytestmark = pytest.mark.integration


def _iso(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat()


def _ok(result: Any) -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    return str(result.stdout)


def _local_index(stack: Stack) -> dict[str, Any]:
    return dict(json.loads((stack.backup_dir / "wal" / "index.json").read_text()))


def _remote_wal(target: Target) -> Path:
    """The lineage folder on the SFTP target (one cluster: one folder)."""
    assert target.files is not None
    (lineage,) = (target.files / "wal").iterdir()
    return lineage


def _load(stack: Stack, rounds: int) -> None:
    """A write load across several segments: none may be lost on the way off-host."""
    for _ in range(rounds):
        stack.pg.psql(
            "INSERT INTO feedback (question) SELECT repeat(md5(random()::text), 60) "
            "FROM generate_series(1, 3000)",
            database=DATABASE,
        )
        stack.pg.psql("SELECT pg_switch_wal()")


def _segno(name: str) -> int:
    return int(name[8:16], 16) * 256 + int(name[16:24], 16)


def _wal_metrics(stack: Stack) -> dict[tuple[str, str | None], float]:
    return read_samples(stack.metrics_dir / METRICS_FILE)


def _archive_backup_and_markers(stack: Stack, target: Target) -> tuple[str, float]:
    """Host A: archiving on, a base backup copied off-host, marker 'before', a time,
    marker 'after', a write load, then one cycle and its off-host copy. Returns the
    backup id and the time between the markers."""
    require_tool("pg_receivewal")
    _ok(run_cli(["wal-archive"], stack.env))  # the slot first: no gap from here on
    backup = _ok(
        run_cli(["backup", "--verify", "--pg-physical", "--components", "postgres"], stack.env)
    ).strip()
    _ok(_offsite(stack, target, "push"))
    between = markers_around_a_time(stack.pg)
    _load(stack, 3)
    _ok(run_cli(["wal-archive"], stack.env))
    return backup, between


def test_every_archived_segment_goes_off_host_once_and_a_crash_mid_upload_is_repaired(
    stack: Stack, sftp_target: Target
) -> None:
    _archive_backup_and_markers(stack, sftp_target)
    before = time.time()
    pushed = _offsite(stack, sftp_target, "wal-push")
    _ok(pushed)
    index = _local_index(stack)
    names = sorted(index["segments"])
    assert len(names) >= 4, names
    assert [_segno(n) for n in names] == list(range(_segno(names[0]), _segno(names[-1]) + 1))
    remote = _remote_wal(sftp_target)
    assert remote.name == index["system_identifier"]
    # Every local segment is off-host byte for byte: ciphertext, as at rest locally.
    for name in names:
        local = stack.backup_dir / "wal" / index["segments"][name]["file"]
        copy = remote / local.name
        assert _sha256(copy) == _sha256(local), name
        assert copy.read_bytes()[:1] in (b"\x8c", b"\x8d", b"\x8e", b"\xc3")
    remote_index = json.loads((remote / "index.json").read_text())
    assert sorted(remote_index["segments"]) == names
    assert remote_index["covered_until"] == index["covered_until"]
    samples = _wal_metrics(stack)
    assert samples[(ARCHIVED_UNTIL, None)] == pytest.approx(index["covered_until"], abs=0.01)
    assert samples[(LAST_SUCCESS, None)] >= int(before)
    assert samples[(LAST_RUN_SUCCESS, None)] == 1

    # Nothing proven is uploaded again: a second run copies nothing, the files stay.
    mtimes = {p.name: p.stat().st_mtime_ns for p in remote.iterdir() if p.name != "index.json"}
    assert "copied 0 WAL segment(s)" in _ok(_offsite(stack, sftp_target, "wal-push"))
    assert {p: (remote / p).stat().st_mtime_ns for p in mtimes} == mtimes

    # A crash mid-upload: the last segment half-written on the target and not recorded
    # as proven. The next run uploads it again and reads it back whole.
    record_path = stack.backup_dir / "wal" / "offsite.json"
    record = json.loads(record_path.read_text())
    last = names[-1]
    del record["segments"][f"{index['system_identifier']}/{last}"]
    record_path.write_text(json.dumps(record))
    half = remote / index["segments"][last]["file"]
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    repaired = _ok(_offsite(stack, sftp_target, "wal-push"))
    assert "copied 1 WAL segment(s)" in repaired
    assert _sha256(half) == _sha256(stack.backup_dir / "wal" / half.name)

    # More load: only the new segments go.
    _load(stack, 1)
    _ok(run_cli(["wal-archive"], stack.env))
    new = sorted(set(_local_index(stack)["segments"]) - set(names))
    assert new
    assert f"copied {len(new)} WAL segment(s)" in _ok(_offsite(stack, sftp_target, "wal-push"))


def test_a_corrupted_remote_segment_is_detected_by_verify_and_pull_and_repaired(
    stack: Stack, sftp_target: Target, tmp_path: Path
) -> None:
    backup, _ = _archive_backup_and_markers(stack, sftp_target)
    _ok(_offsite(stack, sftp_target, "wal-push"))
    remote = _remote_wal(sftp_target)
    index = _local_index(stack)
    victim = sorted(index["segments"])[-2]
    path = remote / index["segments"][victim]["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit, same size: only the hash can tell
    path.write_bytes(bytes(data))

    landing = tmp_path / "landing"
    pulled = run_cli(
        ["offsite", "pull", backup, "--with-wal", "--backup-dir", str(landing)],
        {**stack.env, **sftp_target.env()},
    )
    assert pulled.returncode == 1
    assert f"off-host WAL {victim} is corrupted" in pulled.stderr
    # Nothing appeared: neither the base backup nor any WAL, nor a temp folder.
    assert not [p for p in landing.iterdir() if p.is_dir()]

    verify = _offsite(stack, sftp_target, "wal-verify")
    assert verify.returncode == 1
    assert f"{victim}: corrupted or missing off-host" in verify.stderr
    assert _wal_metrics(stack)[(LAST_RUN_SUCCESS, None)] == 0
    assert "copied 1 WAL segment(s)" in _ok(_offsite(stack, sftp_target, "wal-push"))
    assert _sha256(path) == _sha256(stack.backup_dir / "wal" / path.name)
    _ok(_offsite(stack, sftp_target, "wal-verify"))


def test_the_vps_is_gone_pitr_from_the_off_host_copy_to_a_time_between_two_markers(
    stack: Stack, sftp_target: Target, tmp_path: Path
) -> None:
    backup, between = _archive_backup_and_markers(stack, sftp_target)
    _ok(_offsite(stack, sftp_target, "wal-push"))
    covered = _local_index(stack)["covered_until"]
    with a_new_host(stack, tmp_path) as new:
        env_b = {**new.env, "RAG_BACKUP_KEY_FILE": str(stack.key_file)}
        # The new host's own archive already runs: the pull refuses to mix it in.
        _ok(run_cli(["wal-archive"], env_b))
        mixed = run_cli(["offsite", "pull", "--with-wal"], {**env_b, **sftp_target.env()})
        assert mixed.returncode == 1
        assert "holds the WAL archive of another cluster" in mixed.stderr
        assert not (new.backup_dir / backup).exists()

        landing = new.backup_dir / "offsite-pitr"
        env_pitr = {**env_b, "BACKUP_DIR": str(landing)}
        pulled = run_cli(["offsite", "pull", "--with-wal"], {**env_pitr, **sftp_target.env()})
        assert _ok(pulled).strip() == backup
        assert json.loads((landing / "wal" / "index.json").read_text())["covered_until"] == covered

        physical = ["--components", "postgres", "--pg-mode", "physical", "--yes"]
        physical += ["--pg-data-dir", str(new.pg.data_dir)]
        new.pg.shutdown()
        _ok(run_cli(["restore", *physical, "--target-time", _iso(between)], env_pitr))
        new.pg.start_again()
        rows = new.pg.psql("SELECT name FROM markers ORDER BY name", database=DATABASE)
        assert rows.split() == ["before"]

        new.pg.shutdown()
        for kept in new.pg.data_dir.parent.glob(f"{new.pg.data_dir.name}.pre-restore-*"):
            kept.rename(kept.with_name(kept.name + ".old"))
        _ok(run_cli(["restore", *physical, "--target", "latest"], env_pitr))
        new.pg.start_again()
        rows = new.pg.psql("SELECT name FROM markers ORDER BY name", database=DATABASE)
        assert rows.split() == ["after", "before"]


def test_remote_wal_retention_keeps_what_the_kept_base_backup_needs(
    stack: Stack, sftp_target: Target, tmp_path: Path
) -> None:
    older, _ = _archive_backup_and_markers(stack, sftp_target)
    time.sleep(1.1)  # a distinct backup id
    newer = _ok(
        run_cli(["backup", "--verify", "--pg-physical", "--components", "postgres"], stack.env)
    ).strip()
    _load(stack, 2)
    _ok(run_cli(["wal-archive"], stack.env))
    _ok(_offsite(stack, sftp_target, "push"))
    _ok(_offsite(stack, sftp_target, "wal-push"))
    index = _local_index(stack)
    newer_start = json.loads((stack.backup_dir / newer / "manifest.json").read_text())[
        "created_unix"
    ]
    needed = sorted(n for n, s in index["segments"].items() if s["archived_at"] >= newer_start)
    older_only = sorted(set(index["segments"]) - set(needed))
    assert needed and older_only
    remote = _remote_wal(sftp_target)

    policy = ["--keep-daily", "0", "--keep-weekly", "0", "--keep-monthly", "0"]
    dry = _ok(_offsite(stack, sftp_target, "prune", *policy, "--dry-run"))
    assert "would delete 1 remote backup(s)" in dry
    assert len([p for p in remote.iterdir() if p.name != "index.json"]) == len(index["segments"])

    _ok(_offsite(stack, sftp_target, "prune", *policy))
    assert not (sftp_target.files / older).exists()  # type: ignore[operator]
    files = sorted(p.name[:24] for p in remote.iterdir() if p.name != "index.json")
    assert files == needed  # every segment the kept base backup needs, nothing older
    assert sorted(json.loads((remote / "index.json").read_text())["segments"]) == needed
    # Pruned off-host is not pushed again (the local archive still has them).
    assert "copied 0 WAL segment(s)" in _ok(_offsite(stack, sftp_target, "wal-push"))
    # And the kept backup's WAL still pulls complete.
    landing = tmp_path / "landing"
    pulled = run_cli(
        ["offsite", "pull", "--with-wal", "--backup-dir", str(landing)],
        {**stack.env, **sftp_target.env()},
    )
    assert _ok(pulled).strip() == newer
    assert sorted(json.loads((landing / "wal" / "index.json").read_text())["segments"]) == needed


def test_s3_wal_push_and_pull(stack: Stack, s3_target: Target, tmp_path: Path) -> None:
    backup, _ = _archive_backup_and_markers(stack, s3_target)
    _ok(_offsite(stack, s3_target, "wal-push"))
    index = _local_index(stack)
    system = index["system_identifier"]
    for name, item in index["segments"].items():
        remote = _rclone(s3_target, "cat", f"{s3_target.remote}/wal/{system}/{item['file']}")
        assert remote == (stack.backup_dir / "wal" / item["file"]).read_bytes(), name
    landing = tmp_path / "landing"
    pulled = run_cli(
        ["offsite", "pull", backup, "--with-wal", "--backup-dir", str(landing)],
        {**stack.env, **s3_target.env()},
    )
    _ok(pulled)
    pulled_index = json.loads((landing / "wal" / "index.json").read_text())
    assert pulled_index["covered_until"] == index["covered_until"]
    for name, item in pulled_index["segments"].items():
        assert _sha256(landing / "wal" / item["file"]) == index["segments"][name]["sha256"]


def test_a_segment_the_target_refuses_is_not_recorded_and_holds_covered_until_back(
    stack: Stack, sftp_target: Target
) -> None:
    _archive_backup_and_markers(stack, sftp_target)
    index = _local_index(stack)
    names = sorted(index["segments"])
    blocked = names[1]
    assert sftp_target.files is not None
    lineage = sftp_target.files / "wal" / index["system_identifier"]
    # The target cannot store this one file (a directory is in its place).
    (lineage / index["segments"][blocked]["file"] / "x").mkdir(parents=True)
    # And one the index lists is missing locally (never taken as "pruned meanwhile").
    missing = names[2]
    local = stack.backup_dir / "wal" / index["segments"][missing]["file"]
    kept = local.rename(stack.root / local.name)
    failed = _offsite(stack, sftp_target, "wal-push")
    assert failed.returncode == 1
    assert f"off-host WAL copy failed: {blocked}:" in failed.stderr
    assert f"{missing}: listed in index.json as {local.name}, which is missing" in failed.stderr
    remote_index = json.loads((lineage / "index.json").read_text())
    assert sorted(remote_index["segments"]) == [n for n in names if n not in (blocked, missing)]
    assert remote_index["covered_until"] is None  # not every segment is off-host
    samples = _wal_metrics(stack)
    assert samples[(LAST_RUN_SUCCESS, None)] == 0
    assert samples[(ARCHIVED_UNTIL, None)] == 0

    shutil.rmtree(lineage / index["segments"][blocked]["file"])
    kept.rename(local)
    assert "copied 2 WAL segment(s)" in _ok(_offsite(stack, sftp_target, "wal-push"))
    remote_index = json.loads((lineage / "index.json").read_text())
    assert sorted(remote_index["segments"]) == names
    assert remote_index["covered_until"] == index["covered_until"]
    assert _wal_metrics(stack)[(ARCHIVED_UNTIL, None)] == pytest.approx(index["covered_until"])


def test_a_later_history_reusing_a_segment_name_never_overwrites_the_off_host_copy(
    stack: Stack, sftp_target: Target
) -> None:
    """A physical restore without a new timeline: the archive holds a new segment under a
    name already copied off-host (the archiver keeps the earlier one aside locally). The
    off-host copy, which the earlier history's base backups need, is set aside there too."""
    _archive_backup_and_markers(stack, sftp_target)
    _ok(_offsite(stack, sftp_target, "wal-push"))
    index = _local_index(stack)
    names = sorted(index["segments"])
    reused, other = names[1], names[2]
    wal_dir = stack.backup_dir / "wal"
    earlier = index["segments"][reused]
    old_bytes = (wal_dir / earlier["file"]).read_bytes()
    # The later history's segment under the same name (ciphertext of other bytes).
    (wal_dir / earlier["file"]).write_bytes(
        (wal_dir / index["segments"][other]["file"]).read_bytes()
    )
    index["segments"][reused] = {
        **index["segments"][other],
        "file": earlier["file"],
        "archived_at": time.time(),
    }
    (wal_dir / "index.json").write_text(json.dumps(index))

    assert "copied 1 WAL segment(s)" in _ok(_offsite(stack, sftp_target, "wal-push"))
    remote = _remote_wal(sftp_target)
    aside = remote / f"{earlier['file']}.superseded-{int(earlier['archived_at'])}"
    assert aside.read_bytes() == old_bytes
    assert _sha256(remote / earlier["file"]) == index["segments"][reused]["sha256"]
    remote_index = json.loads((remote / "index.json").read_text())
    assert remote_index["segments"][reused]["sha256"] == index["segments"][reused]["sha256"]
    assert [a["file"] for a in remote_index["superseded"]] == [aside.name]
    assert "copied 0 WAL segment(s)" in _ok(_offsite(stack, sftp_target, "wal-push"))
