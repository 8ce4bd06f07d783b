"""Continuous WAL archiving and point-in-time recovery on a real PostgreSQL 15 (issue 14
items 1 and 2): pg_receivewal over a replication slot, every segment compressed and
encrypted at rest, and a physical restore to a time between two marker rows."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re

import pytest

from tests.backup.conftest import Stack
from tests.backup.helpers import DATABASE, markers_around_a_time, run_cli
from tests.tooling import require_tool

pytestmark = pytest.mark.integration


def _iso(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat()


def test_wal_archive_then_restore_to_a_time_between_two_markers(stack: Stack) -> None:
    require_tool("pg_receivewal")
    require_tool("pg_basebackup")
    first = run_cli(["wal-archive"], stack.env)  # creates the slot: no gap from here on
    assert first.returncode == 0, first.stderr
    backup = run_cli(["backup", "--pg-physical", "--components", "postgres"], stack.env)
    assert backup.returncode == 0, backup.stderr

    between = markers_around_a_time(stack.pg)
    # A write load across several segments: none may be lost.
    for _ in range(3):
        stack.pg.psql(
            "INSERT INTO feedback (question) SELECT repeat('x', 2000) "
            "FROM generate_series(1, 4000)",
            database=DATABASE,
        )
        stack.pg.psql("SELECT pg_switch_wal()")
    archived = run_cli(["wal-archive"], stack.env)
    assert archived.returncode == 0, archived.stderr

    wal = stack.backup_dir / "wal"
    index = json.loads((wal / "index.json").read_text())
    names = sorted(index["segments"])
    assert len(names) >= 4, names
    # Consecutive: no segment lost between the first and the last.
    numbers = [int(n[8:], 16) for n in names]
    assert numbers == list(range(numbers[0], numbers[0] + len(numbers)))
    for record in index["segments"].values():
        data = (wal / record["file"]).read_bytes()
        assert len(data) == record["size"]
        assert hashlib.sha256(data).hexdigest() == record["sha256"]
        # What a restore decrypting in process identifies the segment by (with its MDC).
        assert hashlib.sha256(data[: 64 * 1024]).hexdigest() == record["head_sha256"]
        assert data[:1] != b"\xd1" and b"feedback" not in data  # ciphertext, not WAL
    spool = stack.backup_dir / ".wal-spool"
    assert [p.name for p in spool.iterdir() if p.stat().st_size > 0] == []  # no plaintext left
    assert index["covered_until"] > between

    # The drill recovers the base backup to a random time between the two cycles after it:
    # the earlier cycle's marker transaction is committed there, the later one's absent.
    stack.pg.psql("INSERT INTO markers VALUES ('later')", database=DATABASE)
    assert run_cli(["wal-archive"], stack.env).returncode == 0
    index = json.loads((wal / "index.json").read_text())
    drill = run_cli(["drill", backup.stdout.strip()], stack.env)
    assert drill.returncode == 0, drill.stderr
    assert "drill: postgres point-in-time recovery to" in drill.stderr
    # Only the segments the operator's plan stages: from the backup's start to the window's end.
    assert re.search(r"ok \(\d+ WAL segment\(s\) of .* \.\. .* \(base backup ", drill.stderr)
    # The check bites: with the earlier marker pointing at the later transaction, the
    # recovered copy does not have it.
    tampered = json.loads(json.dumps(index))
    tampered["cycles"][-2]["xid"] = tampered["cycles"][-1]["xid"]
    (wal / "index.json").write_text(json.dumps(tampered))
    bad = run_cli(["drill", backup.stdout.strip()], stack.env)
    (wal / "index.json").write_text(json.dumps(index))
    assert bad.returncode == 1
    assert "postgres (PITR): the marker of" in bad.stderr, bad.stderr
    # The drill resolves its target as the operator's restore does (pitr.plan): with the
    # segment the last cycle closed lost from the archive, a time in the drill's window is
    # out of the archived range, and the drill fails with that range (not PostgreSQL's
    # "recovery ended before the target").
    gap = json.loads(json.dumps(index))
    lost = sorted(gap["segments"])[-1]
    del gap["segments"][lost]
    (wal / "index.json").write_text(json.dumps(gap))
    outside = run_cli(["drill", backup.stdout.strip()], stack.env)
    (wal / "index.json").write_text(json.dumps(index))
    assert outside.returncode == 1
    assert "is outside what is archived: expected a time in" in outside.stderr, outside.stderr
    assert f"(base backup {backup.stdout.strip()})" in outside.stderr
    # The index is untrusted too: a malformed head_sha256 is named with its value.
    malformed = json.loads(json.dumps(index))
    last = sorted(malformed["segments"])[-1]  # one the drill replays (see the gap above)
    malformed["segments"][last]["head_sha256"] = "not hex"
    (wal / "index.json").write_text(json.dumps(malformed))
    refused = run_cli(["drill", backup.stdout.strip()], stack.env)
    (wal / "index.json").write_text(json.dumps(index))
    assert refused.returncode == 1
    assert "head_sha256 'not hex' is not 64 lowercase hex digits" in refused.stderr
    # The failed drill is the backup's last verification record, and a PITR passes over such
    # a backup; the failure was the tampering's (the index is intact again): drop the record.
    (stack.backup_dir / backup.stdout.strip() / "verification.json").unlink()

    # Outside the archived range: refused with the range, nothing touched.
    stack.pg.shutdown()
    physical = ["--components", "postgres", "--pg-mode", "physical"]
    physical += ["--pg-data-dir", str(stack.pg.data_dir), "--yes"]
    too_late = run_cli(["restore", *physical, "--target-time", "2030-01-01T00:00:00Z"], stack.env)
    assert too_late.returncode == 2  # a bad argument, refused before anything is touched
    assert "is outside what is archived" in too_late.stderr
    assert ".. " in too_late.stderr and "nothing was changed" in too_late.stderr

    restored = run_cli(["restore", *physical, "--target-time", _iso(between)], stack.env)
    assert restored.returncode == 0, restored.stderr
    stack.pg.start_again()
    rows = stack.pg.psql("SELECT name FROM markers ORDER BY name", database=DATABASE)
    assert rows.split() == ["before"]

    # To the end of the archive: every marker and the load.
    stack.pg.shutdown()
    kept = stack.pg.data_dir.parent / f"{stack.pg.data_dir.name}.pre-restore-"
    for path in stack.pg.data_dir.parent.glob(kept.name + "*"):
        path.rename(path.with_name(path.name + ".old"))
    latest = run_cli(["restore", *physical, "--target", "latest"], stack.env)
    assert latest.returncode == 0, latest.stderr
    stack.pg.start_again()
    rows = stack.pg.psql("SELECT name FROM markers ORDER BY name", database=DATABASE)
    assert rows.split() == ["after", "before", "later"]

    # Retention: once the older base backup is pruned, the WAL archived before the newer one
    # started serves no restore and goes too; the newer backup's own WAL would stay.
    newer = run_cli(["backup", "--pg-physical", "--components", "postgres"], stack.env)
    assert newer.returncode == 0, newer.stderr
    before = set(index["segments"])
    pruned = run_cli(
        ["prune", "--keep-daily", "1", "--keep-weekly", "0", "--keep-monthly", "0"], stack.env
    )
    assert pruned.returncode == 0, pruned.stderr
    assert "archived segment(s) older than the oldest base backup" in pruned.stderr
    after = json.loads((wal / "index.json").read_text())["segments"]
    assert set(after) < before
    assert not [p for p in wal.glob("*.zst.gpg") if p.name[:24] not in after]
