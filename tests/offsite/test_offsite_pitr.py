"""Point-in-time recovery on a new host from the off-host copy (issue 14 items 2 and 3,
``offsite pull --target-time / --target latest``, what scripts/offsite-restore.sh runs): a
real PostgreSQL 15 archived by ``wal-archive`` and copied off-host by ``offsite wal-push``
through Debian's rclone to a real chrooted SFTP-only sshd; the host is lost; the new host,
whose own archive and off-host copies already run, resolves the time against the off-host
copies (refused with the ranges before anything is pulled), pulls the base backup and only
the WAL the target needs into BACKUP_DIR/offsite-pitr, never over anything there, and
recovers to a time between two markers, then to the end of the off-host WAL."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from rag_backup.offsite_pitr import PULL_DIR
from tests.backup.conftest import Stack
from tests.backup.helpers import (
    DATABASE,
    archive_a_cycle_read_past_its_switch,
    run_cli,
    writes_all_along,
)
from tests.offsite.conftest import Target, a_new_host
from tests.offsite.test_offsite_sftp import _offsite, _sha256
from tests.offsite.test_offsite_wal import _archive_backup_and_markers, _iso, _load, _ok

pytestmark = pytest.mark.integration


def _index(store: Path) -> dict[str, Any]:
    return dict(json.loads((store / "wal" / "index.json").read_text()))


def _markers(stack: Stack) -> list[str]:
    return stack.pg.psql("SELECT name FROM markers ORDER BY name", database=DATABASE).split()


def _restore(stack: Stack, env: dict[str, str], *target: str) -> None:
    stack.pg.shutdown()
    for kept in stack.pg.data_dir.parent.glob(f"{stack.pg.data_dir.name}.pre-restore-*"):
        kept.rename(kept.with_name(f"{kept.name}.old-{time.monotonic_ns()}"))
    physical = ["--components", "postgres", "--pg-mode", "physical", "--yes"]
    physical += ["--pg-data-dir", str(stack.pg.data_dir)]
    _ok(run_cli(["restore", *physical, *target], env))
    stack.pg.start_again()


def test_the_vps_is_gone_pitr_pulls_only_what_the_target_needs_and_never_overwrites(
    stack: Stack, sftp_target: Target, tmp_path: Path
) -> None:
    backup, between = _archive_backup_and_markers(stack, sftp_target)
    reached = _index(stack.backup_dir)["cycles"][-1]["at"]  # the first cycle after `between`
    # Later: another marker, more WAL and cycles the target `between` does not need; the
    # last cycle while another session writes (its recorded WAL position then lies past its
    # switch, in a segment it did not archive: `latest` must still be the archive's end).
    stack.pg.psql("INSERT INTO markers VALUES ('later')", database=DATABASE)
    _load(stack, 2)
    with writes_all_along(stack.pg):
        last_cycle = archive_a_cycle_read_past_its_switch(stack.backup_dir, stack.env)
    _ok(_offsite(stack, sftp_target, "wal-push"))
    host_a = _index(stack.backup_dir)
    created = json.loads((stack.backup_dir / backup / "manifest.json").read_text())["created_unix"]
    key_file = stack.key_file
    with a_new_host(stack, tmp_path) as new:
        env_b = {**new.env, "RAG_BACKUP_KEY_FILE": str(key_file), **sftp_target.env()}
        # The new host runs: its own archive, and its own (empty) backup copied off-host,
        # newer than the lost host's.
        _ok(run_cli(["wal-archive"], env_b))
        own = _ok(run_cli(["backup", "--verify", "--pg-physical"], env_b)).strip()
        _ok(run_cli(["offsite", "push"], env_b))
        _ok(run_cli(["wal-archive"], env_b))
        _ok(run_cli(["offsite", "wal-push"], env_b))
        own_wal = _index(new.backup_dir)
        landing = new.backup_dir / PULL_DIR

        # Outside what is off-host: refused with the ranges, exit 2, nothing pulled.
        for when in (created - 3600, time.time() + 3600):
            refused = run_cli(["offsite", "pull", "--target-time", _iso(when)], env_b)
            assert refused.returncode == 2, refused.stderr
            assert "is outside what is archived off-host" in refused.stderr, refused.stderr
            assert f"(base backup {backup})" in refused.stderr, refused.stderr
            assert "nothing was pulled" in refused.stderr
            assert not landing.exists()
        assert _index(new.backup_dir) == own_wal  # the new host's archive untouched
        # A segment lost off-host between the backup and the time: the chain does not reach
        # it, so the time is out of range too (the same rules as pitr.plan), nothing pulled.
        assert sftp_target.files is not None
        remote_index = sftp_target.files / "wal" / host_a["system_identifier"] / "index.json"
        intact = remote_index.read_bytes()
        gap = json.loads(intact)
        after_backup = sorted(n for n, s in gap["segments"].items() if s["archived_at"] >= created)
        del gap["segments"][after_backup[1]]
        remote_index.write_text(json.dumps(gap))
        broken = run_cli(["offsite", "pull", "--target-time", _iso(between)], env_b)
        remote_index.write_bytes(intact)
        assert broken.returncode == 2, broken.stderr
        assert "is outside what is archived off-host" in broken.stderr, broken.stderr
        assert not landing.exists()

        # The lost host's backup, and only the WAL up to the first cycle past the target.
        pulled = run_cli(["offsite", "pull", "--target-time", _iso(between)], env_b)
        assert _ok(pulled).strip() == backup
        assert f"passing over {own}: this host made it" in pulled.stderr
        assert own != backup and not (landing / own).exists()
        # Archived from the backup's start through that cycle, before the next one began.
        next_cycle = min(c["at"] for c in host_a["cycles"] if c["at"] > reached)
        needed = sorted(
            n for n, s in host_a["segments"].items() if created <= s["archived_at"] < next_cycle
        )
        local = _index(landing)
        assert sorted(local["segments"]) == needed, (sorted(local["segments"]), needed)
        assert set(host_a["segments"]) - set(needed)  # later WAL exists and was not pulled
        for name in needed:
            item = local["segments"][name]
            assert _sha256(landing / "wal" / item["file"]) == host_a["segments"][name]["sha256"]
        assert local["covered_until"] == pytest.approx(reached)
        assert _index(new.backup_dir) == own_wal

        # What restore-stack.sh --backups-subdir offsite-pitr runs: resolve, then restore.
        env_pitr = {**env_b, "BACKUP_DIR": str(landing)}
        resolved = run_cli(["resolve", "latest", "--target-time", _iso(between)], env_pitr)
        assert _ok(resolved).strip() == backup
        _restore(new, env_pitr, "--target-time", _iso(between))
        assert _markers(new) == ["before"]

        # Never over what is there: a file under a name the next pull needs, not in the
        # index (another copy's), is refused; it and the landing's index stay as they were.
        later = sorted(set(host_a["segments"]) - set(needed))[-1]
        stray = landing / "wal" / host_a["segments"][later]["file"]
        stray.write_bytes(b"not this segment")
        before_index = (landing / "wal" / "index.json").read_bytes()
        blocked = run_cli(["offsite", "pull", "--target", "latest"], env_b)
        assert blocked.returncode == 1
        assert f"{stray} is there and differs from the off-host {later}" in blocked.stderr
        assert stray.read_bytes() == b"not this segment"
        assert (landing / "wal" / "index.json").read_bytes() == before_index
        stray.unlink()

        # The end of the off-host WAL: the same base backup (pulled before: used again),
        # the rest of its WAL added beside what is there, complete up to the lost host's
        # last cycle (what it said was archived and off-host).
        again = run_cli(["offsite", "pull", "--target", "latest"], env_b)
        assert _ok(again).strip() == backup
        assert "was pulled into" in again.stderr
        assert sorted(_index(landing)["segments"]) == sorted(
            n for n, s in host_a["segments"].items() if s["archived_at"] >= created
        )
        assert _index(landing)["covered_until"] == host_a["covered_until"] == last_cycle["at"]
        _restore(new, env_pitr, "--target", "latest")
        assert _markers(new) == ["after", "before", "later"]
        # The last cycle's marker commit (stamped after its time) is replayed: nothing
        # committed before the archive's end is missing.
        status = new.pg.psql(f"SELECT txid_status({int(last_cycle['xid'])})", database=DATABASE)
        assert status.strip() == "committed"
