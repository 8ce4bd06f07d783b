"""`rag-backup resolve --target-time / --target latest` on a real PostgreSQL 15 and its WAL
archive: the newest usable base backup that ended before the target, and only when the
archive holds every segment from that backup's start up to the target (issue 14 item 2:
what `scripts/restore-stack.sh --target-time` asks before it stops anything)."""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest

from tests.backup.conftest import Stack
from tests.backup.helpers import (
    DATABASE,
    archive_a_cycle_read_past_its_switch,
    run_cli,
    writes_all_along,
)
from tests.tooling import require_tool

pytestmark = pytest.mark.integration


def _iso(unix: float) -> str:
    """To the microsecond and never after ``unix``, as an operator can give it: rounded up,
    the archive's very end (a cycle's time) would lie a fraction of a microsecond past it."""
    moment = dt.datetime.fromtimestamp(unix, dt.UTC)
    if moment.timestamp() > unix:
        moment -= dt.timedelta(microseconds=1)
    return moment.isoformat()


def _ok(args: list[str], stack: Stack) -> str:
    done = run_cli(args, stack.env)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _refused(args: list[str], stack: Stack) -> str:
    done = run_cli(args, stack.env)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == ""  # no id for a script to go on with
    return done.stderr


def _later_moment() -> float:
    """A time strictly between two writes a second apart."""
    time.sleep(1.2)
    moment = time.time()
    time.sleep(1.2)
    return moment


def test_resolve_picks_the_newest_base_backup_whose_archived_wal_reaches_the_target(
    stack: Stack,
) -> None:
    require_tool("pg_receivewal")
    require_tool("pg_basebackup")
    physical = ["backup", "--pg-physical", "--components", "postgres"]
    _ok(["wal-archive"], stack)  # the slot: no gap from here on
    first = _ok(physical, stack).split()[-1]
    manifest = json.loads((stack.backup_dir / first / "manifest.json").read_text())
    start = manifest["components"]["postgres"]["physical"]["wal_start_at_least"]
    assert len(start) == 24 and start.startswith("00000001")

    stack.pg.psql("CREATE TABLE markers (name text)", database=DATABASE)
    after_first = _later_moment()
    stack.pg.psql("INSERT INTO markers VALUES ('b')", database=DATABASE)
    _ok(["wal-archive"], stack)
    second = _ok(physical, stack).split()[-1]
    after_second = _later_moment()
    stack.pg.psql("INSERT INTO markers VALUES ('c')", database=DATABASE)
    _ok(["wal-archive"], stack)
    index_path = stack.backup_dir / "wal" / "index.json"
    index = json.loads(index_path.read_text())

    resolve = ["resolve", "--target-time"]
    assert _ok([*resolve, _iso(after_first)], stack) == first  # the second ended after it
    assert _ok([*resolve, _iso(after_second)], stack) == second
    assert _ok(["resolve", "--target", "latest"], stack) == second
    # An explicit id is checked, not replaced.
    assert _ok(["resolve", first, "--target-time", _iso(after_second)], stack) == first

    # Before every base backup, after the archive, and a backup that cannot reach it: refused
    # (exit 2, nothing printed on stdout), naming the argument, the value and the range.
    early = _refused([*resolve, "2001-02-03T04:05:06Z"], stack)
    assert "--target-time 2001-02-03T04:05:06+00:00 is outside what is archived" in early
    assert f"(base backup {second})" in early and f"(base backup {first})" in early
    covered = dt.datetime.fromtimestamp(index["covered_until"], dt.UTC)
    assert f".. {covered.isoformat(timespec='seconds')} (base backup {second})" in early
    late = _refused([*resolve, "2099-01-01T00:00:00Z"], stack)
    assert "expected a time in" in late and "nothing was changed" in late
    named = _refused(["resolve", second, "--target-time", _iso(after_first)], stack)
    assert f"(base backup {second})" in named and first not in named
    both = _refused(["resolve", "--target", "latest", "--target-time", _iso(after_first)], stack)
    assert "exclude each other" in both
    bad = run_cli([*resolve, "17:00"], stack.env)
    assert bad.returncode == 2 and "--target-time: '17:00' is not an ISO 8601 time" in bad.stderr

    # A segment missing from the archive: no backup reaches the archive's end any more, and
    # "latest" is refused rather than quietly meaning an earlier time; the time before the
    # gap is still reached from the first backup.
    gap = json.loads(json.dumps(index))
    del gap["segments"][max(index["segments"])]
    index_path.write_text(json.dumps(gap))
    latest = _refused(["resolve", "--target", "latest"], stack)
    assert "--target latest (the archive's end, " in latest, latest
    assert f"(base backup {first})" in latest and f"base backup {second}: nothing (" in latest
    assert _ok([*resolve, _iso(after_first)], stack) == first
    assert "is outside what is archived" in _refused([*resolve, _iso(after_second)], stack)
    # A segment under a needed name that was archived before the backup began (another
    # history's, as after a physical restore): not usable either.
    stale = json.loads(json.dumps(index))
    second_manifest = json.loads((stack.backup_dir / second / "manifest.json").read_text())
    second_start = second_manifest["components"]["postgres"]["physical"]["wal_start_at_least"]
    stale["segments"][second_start]["archived_at"] = second_manifest["created_unix"] - 60
    index_path.write_text(json.dumps(stale))
    stale_refused = _refused([*resolve, _iso(after_second)], stack)
    assert f"segment {second_start} is not archived after it began" in stale_refused
    index_path.write_text(json.dumps(index))

    # A base backup whose last verification failed is passed over, and said so.
    (stack.backup_dir / second / "verification.json").write_text(
        json.dumps({"ok": False, "message": "flipped byte", "checked_at": "2099-01-01T00:00:00"})
    )
    assert _ok(["resolve", "--target", "latest"], stack) == first
    refused = _refused([*resolve, _iso(after_first - 3600)], stack)
    assert f"skipped {second} (its last verification failed; name its id" in refused
    (stack.backup_dir / second / "verification.json").unlink()

    # A backup made before the start segment was recorded: the last archive cycle before
    # it started bounds its start.
    old = json.loads(json.dumps(manifest))
    del old["components"]["postgres"]["physical"]["wal_start_at_least"]
    (stack.backup_dir / first / "manifest.json").write_text(json.dumps(old))
    assert _ok([*resolve, _iso(after_first)], stack) == first


def test_restore_recovers_the_resolved_backup_with_only_the_segments_it_needs(
    stack: Stack, tmp_path: Path
) -> None:
    """The restore of the id resolve printed, to the same target: the row written before
    the target is there, the one after it is not; and a target the archive does not reach
    is refused by restore too, before the data directory is touched."""
    require_tool("pg_receivewal")
    _ok(["wal-archive"], stack)
    backup = _ok(["backup", "--pg-physical", "--components", "postgres"], stack).split()[-1]
    stack.pg.psql("CREATE TABLE markers (name text)", database=DATABASE)
    stack.pg.psql("INSERT INTO markers VALUES ('before')", database=DATABASE)
    target = _iso(_later_moment())
    stack.pg.psql("INSERT INTO markers VALUES ('after')", database=DATABASE)
    _ok(["wal-archive"], stack)
    assert _ok(["resolve", "--target-time", target], stack) == backup

    stack.pg.shutdown()
    listing = sorted(p.name for p in stack.pg.data_dir.iterdir())
    restore = ["restore", backup, "--components", "postgres", "--pg-mode", "physical"]
    restore += ["--pg-data-dir", str(stack.pg.data_dir), "--yes"]
    out_of_range = run_cli([*restore, "--target-time", "2099-01-01T00:00:00Z"], stack.env)
    assert out_of_range.returncode == 2, out_of_range.stderr
    assert "is outside what is archived" in out_of_range.stderr
    assert sorted(p.name for p in stack.pg.data_dir.iterdir()) == listing
    done = run_cli([*restore, "--target-time", target], stack.env)
    assert done.returncode == 0, done.stderr
    stack.pg.start_again()
    assert stack.pg.psql("SELECT name FROM markers", database=DATABASE).split() == ["before"]
    # The staged segments went beside the data directory and are gone.
    assert not list(stack.pg.data_dir.parent.glob(".rag-restore-wal-*"))


def test_latest_is_the_archive_end_while_other_sessions_write(stack: Stack) -> None:
    """A live server: another session commits while wal-archive runs, also between a
    cycle's switch and its read of the WAL position (which then lies in a segment that
    cycle did not archive). `--target latest` is still the archive's end, and a restore to
    it holds every commit before that end: the last cycle's marker transaction too."""
    require_tool("pg_receivewal")
    _ok(["wal-archive"], stack)
    backup = _ok(["backup", "--pg-physical", "--components", "postgres"], stack).split()[-1]
    stack.pg.psql("CREATE TABLE markers (name text)", database=DATABASE)
    stack.pg.psql("INSERT INTO markers VALUES ('before the last cycle')", database=DATABASE)
    with writes_all_along(stack.pg):
        last = archive_a_cycle_read_past_its_switch(stack.backup_dir, stack.env)
    index = json.loads((stack.backup_dir / "wal" / "index.json").read_text())
    assert index["covered_until"] == last["at"]

    assert _ok(["resolve", "--target", "latest"], stack) == backup
    assert _ok(["resolve", "--target-time", _iso(last["at"])], stack) == backup
    stack.pg.shutdown()
    restore = ["restore", backup, "--components", "postgres", "--pg-mode", "physical"]
    _ok([*restore, "--pg-data-dir", str(stack.pg.data_dir), "--yes", "--target", "latest"], stack)
    stack.pg.start_again()
    markers = stack.pg.psql("SELECT name FROM markers", database=DATABASE).splitlines()
    assert markers == ["before the last cycle"]
    # The last cycle's marker commit, stamped after its time: replayed, so nothing before
    # the archive's end is missing.
    status = stack.pg.psql(f"SELECT txid_status({int(last['xid'])})", database=DATABASE)
    assert status.strip() == "committed"


def test_after_a_physical_restore_the_new_history_is_archived_and_recoverable(
    stack: Stack,
) -> None:
    """A plain physical restore puts the cluster back at its base backup's WAL position:
    the server writes segment names the archive already holds, from the history since
    undone. wal-archive archives them anyway (the old copies kept aside, not overwritten),
    so a backup taken after the restore can be recovered to a time after it."""
    require_tool("pg_receivewal")
    physical = ["backup", "--pg-physical", "--components", "postgres"]
    _ok(["wal-archive"], stack)
    first = _ok(physical, stack).split()[-1]
    for _ in range(3):  # the history a restore undoes, over several segments
        stack.pg.psql(
            "INSERT INTO feedback (question) SELECT repeat('x', 2000) "
            "FROM generate_series(1, 4000)",
            database=DATABASE,
        )
        _ok(["wal-archive"], stack)
    undone = set(json.loads((stack.backup_dir / "wal" / "index.json").read_text())["segments"])

    stack.pg.shutdown()
    restore = ["restore", first, "--components", "postgres", "--pg-mode", "physical"]
    _ok([*restore, "--pg-data-dir", str(stack.pg.data_dir), "--yes"], stack)
    stack.pg.start_again()
    _ok(["wal-archive"], stack)
    second = _ok(physical, stack).split()[-1]
    stack.pg.psql("CREATE TABLE markers (name text)", database=DATABASE)
    stack.pg.psql("INSERT INTO markers VALUES ('before')", database=DATABASE)
    target = _iso(_later_moment())
    stack.pg.psql("INSERT INTO markers VALUES ('after')", database=DATABASE)
    _ok(["wal-archive"], stack)

    assert _ok(["resolve", "--target-time", target], stack) == second
    # The backup of the undone history does not reach past the restore, even where segment
    # names run on.
    mixed = _refused(["resolve", first, "--target-time", target], stack)
    assert f"(base backup {first})" in mixed
    index = json.loads((stack.backup_dir / "wal" / "index.json").read_text())
    reused = sorted(undone & {r["name"] for r in index.get("superseded", [])})
    assert reused, "the restored cluster wrote no segment name the archive held"
    for name in reused:  # both copies at rest: the new history's and the undone one's
        assert (stack.backup_dir / "wal" / index["segments"][name]["file"]).is_file()
    for record in index["superseded"]:
        assert (stack.backup_dir / "wal" / record["file"]).is_file()

    stack.pg.shutdown()
    restore = ["restore", second, "--components", "postgres", "--pg-mode", "physical"]
    restore += ["--pg-data-dir", str(stack.pg.data_dir), "--yes", "--target-time", target]
    _ok(restore, stack)
    stack.pg.start_again()
    assert stack.pg.psql("SELECT name FROM markers", database=DATABASE).split() == ["before"]
