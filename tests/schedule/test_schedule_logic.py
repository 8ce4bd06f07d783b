"""The backup scheduler's decisions: due jobs, catch-up after downtime, no retry storms."""

from __future__ import annotations

import datetime as dt
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

from rag_backup.schedule import (
    SCHEDULER_FILE,
    Schedule,
    ScheduleError,
    check_heartbeat,
    due_jobs,
    main,
    run_pending,
    seconds_to_next_minute,
    write_heartbeat,
)
from tests.tooling import require_tool

UTC = dt.UTC
REPO = Path(__file__).resolve().parents[2]
SCHEDULE = Schedule.parse("03:00", "sun", "04:30")


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_backup_is_due_once_per_day_after_its_time() -> None:
    # 2026-11-25 is a Wednesday.
    done_yesterday = at("2026-11-24T03:05").timestamp()
    done_today = at("2026-11-25T03:01").timestamp()
    recent_drill = at("2026-11-22T04:31").timestamp()
    assert due_jobs(SCHEDULE, at("2026-11-25T02:59"), done_yesterday, recent_drill) == []
    assert due_jobs(SCHEDULE, at("2026-11-25T03:00"), done_yesterday, recent_drill) == ["backup"]
    assert due_jobs(SCHEDULE, at("2026-11-25T23:00"), done_today, recent_drill) == []


def test_missed_backup_is_caught_up_when_the_host_comes_back() -> None:
    # Down from Monday 02:00 to Wednesday 10:00: one catch-up run, not one per missed day.
    last = at("2026-11-23T01:00").timestamp()
    assert due_jobs(SCHEDULE, at("2026-11-25T10:00"), last, None) == ["backup", "drill"]


@pytest.mark.parametrize(
    ("now", "wakes"),
    [
        ("2026-11-25T02:58:59.2", "2026-11-25T02:59:00.5"),
        ("2026-11-25T02:59:00", "2026-11-25T03:00:00.5"),
        ("2026-11-25T02:59:30.7", "2026-11-25T03:00:00.5"),
    ],
)
def test_the_loop_wakes_just_after_each_whole_minute(now: str, wakes: str) -> None:
    """A backup at 03:00 starts within a second of it whatever the loop's phase, not up
    to a minute late (the loop wakes, then due_jobs decides)."""
    start = at(now).timestamp()
    assert start + seconds_to_next_minute(start) == pytest.approx(at(wakes).timestamp())


def test_drill_is_weekly_on_its_day() -> None:
    backup = at("2026-11-29T03:01").timestamp()
    drill_last_week = at("2026-11-22T04:31").timestamp()
    assert due_jobs(SCHEDULE, at("2026-11-29T04:29"), backup, drill_last_week) == []
    assert due_jobs(SCHEDULE, at("2026-11-29T04:30"), backup, drill_last_week) == ["drill"]
    drilled = at("2026-11-29T04:40").timestamp()
    assert "drill" not in due_jobs(SCHEDULE, at("2026-12-02T12:00"), backup, drilled)


def test_without_a_logical_weekday_every_backup_is_the_same() -> None:
    physical = Schedule.parse("03:00", "sun", "04:30", pg_physical="1")
    for day in range(22, 29):  # a whole week, Sunday 2026-11-22 .. Saturday 11-28
        now = at(f"2026-11-{day}T03:00")
        assert SCHEDULE.backup_args(now) == ["backup", "--verify"]
        assert physical.backup_args(now) == ["backup", "--verify"]


def test_logical_dump_only_on_its_weekday_when_physical() -> None:
    weekly = Schedule.parse("03:00", "sun", "04:30", pg_logical_weekday="Sun", pg_physical="1")
    # 2026-11-29 is a Sunday; the rest of that week is physical only.
    assert weekly.backup_args(at("2026-11-29T03:00")) == ["backup", "--verify", "--pg-logical"]
    for day in range(23, 29):
        assert weekly.backup_args(at(f"2026-11-{day}T03:00")) == [
            "backup",
            "--verify",
            "--no-pg-logical",
        ]
    # The weekday is UTC's: Sunday 23:30 in New York is already Monday in UTC.
    new_york = dt.timezone(dt.timedelta(hours=-5))
    late_sunday = dt.datetime(2026, 11, 29, 23, 30, tzinfo=new_york)
    assert weekly.backup_args(late_sunday)[-1] == "--no-pg-logical"
    # Without physical backups the dump is the only PostgreSQL copy: never dropped.
    logical_only = Schedule.parse("03:00", "sun", "04:30", pg_logical_weekday="sun")
    assert logical_only.backup_args(at("2026-11-25T03:00")) == ["backup", "--verify"]


def test_the_daily_job_passes_the_weekday_choice(tmp_path: Path) -> None:
    weekly = Schedule.parse("03:00", "sun", "04:30", pg_logical_weekday="sun", pg_physical="yes")
    calls: list[str] = []

    def runner(args: Sequence[str]) -> int:
        calls.append(" ".join(args))
        return 0

    run_pending(weekly, tmp_path, at("2026-11-25T03:00"), runner)  # a Wednesday
    assert calls[:2] == ["backup --verify --no-pg-logical", "prune"]
    calls.clear()
    run_pending(weekly, tmp_path, at("2026-11-29T04:40"), runner)  # Sunday: backup + drill
    assert calls == ["backup --verify --pg-logical", "prune", "drill"]


@pytest.mark.parametrize(
    ("keywords", "message"),
    [
        ({"pg_logical_weekday": "sunday"}, "RAG_BACKUP_PG_LOGICAL_WEEKDAY = 'sunday'"),
        ({"pg_physical": "maybe"}, "RAG_BACKUP_PG_PHYSICAL = 'maybe'"),
    ],
)
def test_bad_pg_form_settings_are_named(keywords: dict[str, str], message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        Schedule.parse("03:00", "sun", "04:30", **keywords)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("3am", "sun", "04:30"), "RAG_BACKUP_TIME = '3am'"),
        (("03:00", "someday", "04:30"), "RAG_DRILL_WEEKDAY = 'someday'"),
        (("03:00", "sun", "25:00"), "RAG_DRILL_TIME = '25:00'"),
    ],
)
def test_bad_schedule_is_named(args: tuple[str, str, str], message: str) -> None:
    with pytest.raises(ScheduleError, match=message):
        Schedule.parse(*args)


def test_a_crashing_job_is_not_retried_every_minute(tmp_path: Path) -> None:
    calls: list[Sequence[str]] = []

    def crashing(args: Sequence[str]) -> int:
        calls.append(args)
        return 1  # dies before writing any metrics

    now = at("2026-11-25T03:00")
    first = run_pending(SCHEDULE, tmp_path, now, crashing)
    assert first == {"backup": False, "drill": False}
    again = run_pending(SCHEDULE, tmp_path, now + dt.timedelta(minutes=1), crashing)
    assert again == {}
    assert len(calls) == 2  # one backup attempt, one drill attempt
    text = (tmp_path / SCHEDULER_FILE).read_text()
    assert 'rag_backup_scheduler_job_success{job="backup"} 0' in text


def test_backup_runs_verify_then_prune_and_stops_at_a_failure(tmp_path: Path) -> None:
    calls: list[str] = []

    def runner(args: Sequence[str]) -> int:
        calls.append(" ".join(args))
        return 0 if args[0] != "prune" else 3

    results = run_pending(SCHEDULE, tmp_path, at("2026-11-25T03:00"), runner)
    assert calls[:2] == ["backup --verify", "prune"]
    assert results["backup"] is False


def test_healthcheck_follows_the_heartbeat(tmp_path: Path) -> None:
    now = at("2026-11-25T05:00")
    write_heartbeat(tmp_path, now.timestamp())
    assert check_heartbeat(tmp_path, now.timestamp() + 60)
    assert not check_heartbeat(tmp_path, now.timestamp() + 3600)
    assert not check_heartbeat(tmp_path / "missing", now.timestamp())


def test_check_mode_exit_codes(tmp_path: Path) -> None:
    assert main(["--check", "--metrics-dir", str(tmp_path)]) == 1
    write_heartbeat(tmp_path, time.time())
    assert main(["--check", "--metrics-dir", str(tmp_path)]) == 0


def test_the_loop_beats_while_a_long_job_runs(tmp_path: Path) -> None:
    """The healthcheck stays green during a backup longer than its max age."""
    env = {**os.environ, "RAG_BACKUP_METRICS_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    # A stand-in rag_backup that takes long: the scheduler's child is a python -m call.
    fake = tmp_path / "fake"
    (fake / "rag_backup").mkdir(parents=True)
    (fake / "rag_backup" / "__init__.py").write_text("")
    (fake / "rag_backup" / "__main__.py").write_text("import time; time.sleep(30)\n")
    proc = subprocess.Popen(
        [sys.executable, str(REPO / "rag_backup" / "schedule.py")],
        env={**env, "PYTHONPATH": f"{REPO}"},
        cwd=fake,
        start_new_session=True,  # so the sleeping child goes too
    )
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not check_heartbeat(tmp_path, time.time()):
            time.sleep(0.2)
        assert check_heartbeat(tmp_path, time.time())
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)


def test_as_pid_1_the_loop_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    """`docker stop` sends SIGTERM to the container's PID 1, which has no default action
    for it: the scheduler, as PID 1 of its own PID namespace (as in its container) and
    during a job, must still exit at once instead of waiting for Docker's kill."""
    unshare = require_tool("unshare")
    fake = tmp_path / "fake"
    (fake / "rag_backup").mkdir(parents=True)
    (fake / "rag_backup" / "__init__.py").write_text("")
    (fake / "rag_backup" / "__main__.py").write_text("import time; time.sleep(60)\n")
    # Root makes the PID namespace itself; anyone else through a user namespace.
    as_user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
    proc = subprocess.Popen(
        [
            unshare, *as_user, "--pid", "--fork", "--mount-proc",
            sys.executable, str(REPO / "rag_backup" / "schedule.py"),
        ],
        env={**os.environ, "RAG_BACKUP_METRICS_DIR": str(tmp_path), "PYTHONPATH": str(REPO)},
        cwd=fake,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not check_heartbeat(tmp_path, time.time()):  # the loop runs (a job started)
            assert time.monotonic() < deadline and proc.poll() is None, "scheduler not up"
            time.sleep(0.2)
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert len(children) == 1, children
        os.kill(int(children[0]), signal.SIGTERM)  # the namespace's PID 1, from outside
        assert proc.wait(timeout=5) == 128 + signal.SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
