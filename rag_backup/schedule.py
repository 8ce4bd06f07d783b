"""The backup container's scheduler: daily backup (+ verify, + prune), weekly drill.

The environment decides the PostgreSQL form of the daily backup (rag-backup reads
``RAG_BACKUP_PG_PHYSICAL`` / ``RAG_BACKUP_PG_LOGICAL`` itself). With
``RAG_BACKUP_PG_PHYSICAL=1`` and ``RAG_BACKUP_PG_LOGICAL_WEEKDAY`` set (e.g. ``sun``), the
daily backup is physical only (``--no-pg-logical``) except on that weekday (UTC), when it
also keeps the portable logical dump (``--pg-logical``).

``python -m rag_backup.schedule`` runs forever; ``--once`` runs what is due now and
exits (the tests run that against real servers); ``--check`` is the healthcheck.

Missed runs are caught up: on start, and after any sleep, a backup is due when the
newest successful one is older than the last scheduled time (e.g. the host was down at
03:00). Every run's outcome reaches Prometheus: rag-backup writes its own metrics on
success and failure, and the scheduler adds a heartbeat and its next planned runs, so a
scheduler that died or a job that never started shows up as a metric too.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rag_backup.cli import environment_problems
from rag_backup.metrics import BACKUP_FILE, DRILL_FILE, read_samples, write_atomic
from rag_backup.offsite import scheduled_steps as offsite_steps
from rag_backup.offsite import scheduled_wal_steps as offsite_wal_steps

SCHEDULER_FILE = "rag_backup_scheduler.prom"
# Written by its own thread every HEARTBEAT_SECONDS, also while a long job runs.
HEARTBEAT_FILE = "rag_backup_scheduler_heartbeat.prom"
HEARTBEAT_SECONDS = 30
# The scheduler's own record of attempts (node_exporter reads only *.prom): a job that
# crashes before writing its metrics is still not retried in a loop.
STATE_FILE = ".rag_backup_scheduler_state.json"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
# A heartbeat older than this fails the container's healthcheck.
HEARTBEAT_MAX_AGE_SECONDS = 180
WAL_INTERVAL_SECONDS = 60


class ScheduleError(ValueError):
    pass


@dataclass(frozen=True)
class Schedule:
    backup_time: dt.time
    drill_weekday: int  # Monday = 0
    drill_time: dt.time
    # None: every backup keeps the logical dump; else only on this weekday (Monday = 0),
    # and only when the backup is physical (pg_physical).
    pg_logical_weekday: int | None = None
    pg_physical: bool = False
    # Continuous WAL archiving (rag-backup wal-archive every WAL_INTERVAL_SECONDS, in its own
    # thread so a long nightly backup does not delay it): RPO of PostgreSQL = that interval.
    wal_archive: bool = False

    @classmethod
    def parse(
        cls,
        backup_time: str,
        drill_weekday: str,
        drill_time: str,
        *,
        pg_logical_weekday: str = "",
        pg_physical: str = "",
        wal_archive: str = "",
    ) -> Schedule:
        def hhmm(option: str, text: str) -> dt.time:
            try:
                hours, minutes = (int(p) for p in text.split(":"))
                return dt.time(hours, minutes)
            except ValueError:
                raise ScheduleError(f"{option} = {text!r}; expected HH:MM, e.g. 03:00") from None

        day = drill_weekday.lower()
        if day not in WEEKDAYS:
            raise ScheduleError(
                f"RAG_DRILL_WEEKDAY = {drill_weekday!r}; expected one of {', '.join(WEEKDAYS)}"
            )
        logical_day = pg_logical_weekday.strip().lower()
        if logical_day and logical_day not in WEEKDAYS:
            raise ScheduleError(
                f"RAG_BACKUP_PG_LOGICAL_WEEKDAY = {pg_logical_weekday!r}; expected one of "
                f"{', '.join(WEEKDAYS)}, or unset (every backup keeps the logical dump)"
            )
        physical = pg_physical.strip().lower()
        if physical not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
            raise ScheduleError(
                f"RAG_BACKUP_PG_PHYSICAL = {pg_physical!r}; expected 1/0, true/false"
            )
        wal = wal_archive.strip().lower()
        if wal not in ("", "0", "false", "no", "off", "1", "true", "yes", "on"):
            raise ScheduleError(
                f"RAG_BACKUP_WAL_ARCHIVE = {wal_archive!r}; expected 1/0, true/false"
            )
        return cls(
            hhmm("RAG_BACKUP_TIME", backup_time),
            WEEKDAYS.index(day),
            hhmm("RAG_DRILL_TIME", drill_time),
            WEEKDAYS.index(logical_day) if logical_day else None,
            physical in ("1", "true", "yes", "on"),
            wal in ("1", "true", "yes", "on"),
        )

    def backup_args(self, now: dt.datetime) -> list[str]:
        """The daily backup's rag-backup arguments at ``now`` (UTC weekday decides)."""
        args = ["backup", "--verify"]
        if self.pg_physical and self.pg_logical_weekday is not None:
            weekday = now.astimezone(dt.UTC).weekday()
            args.append("--pg-logical" if weekday == self.pg_logical_weekday else "--no-pg-logical")
        return args

    def last_backup_slot(self, now: dt.datetime) -> dt.datetime:
        slot = now.replace(
            hour=self.backup_time.hour, minute=self.backup_time.minute, second=0, microsecond=0
        )
        return slot if slot <= now else slot - dt.timedelta(days=1)

    def last_drill_slot(self, now: dt.datetime) -> dt.datetime:
        slot = now.replace(
            hour=self.drill_time.hour, minute=self.drill_time.minute, second=0, microsecond=0
        )
        slot -= dt.timedelta(days=(slot.weekday() - self.drill_weekday) % 7)
        return slot if slot <= now else slot - dt.timedelta(days=7)

    def next_backup(self, now: dt.datetime) -> dt.datetime:
        return self.last_backup_slot(now) + dt.timedelta(days=1)

    def next_drill(self, now: dt.datetime) -> dt.datetime:
        return self.last_drill_slot(now) + dt.timedelta(days=7)


def due_jobs(
    schedule: Schedule,
    now: dt.datetime,
    last_backup_attempt: float | None,
    last_drill_attempt: float | None,
) -> list[str]:
    """What should run now: a job is due when it has not been attempted since its last slot."""
    jobs = []
    if (
        last_backup_attempt is None
        or last_backup_attempt < schedule.last_backup_slot(now).timestamp()
    ):
        jobs.append("backup")
    if last_drill_attempt is None or last_drill_attempt < schedule.last_drill_slot(now).timestamp():
        jobs.append("drill")
    return jobs


def _last_attempt(metrics_dir: Path, file: str, metric: str) -> float | None:
    return read_samples(metrics_dir / file).get((metric, None))


def run_job(
    job: str,
    runner: Callable[[Sequence[str]], int],
    backup_args: Sequence[str] = ("backup", "--verify"),
) -> bool:
    """backup = backup --verify (``backup_args``), then prune, then the off-host copy
    and its prune when a target is set; drill = drill. True when all steps passed."""
    steps = [list(backup_args), ["prune"], *offsite_steps()] if job == "backup" else [["drill"]]
    for step in steps:
        print(f"rag-backup-schedule: running rag-backup {' '.join(step)}", flush=True)
        code = runner(step)
        if code != 0:
            print(f"rag-backup-schedule: rag-backup {step[0]} failed (exit {code})", flush=True)
            return False
    return True


def _subprocess_runner(args: Sequence[str]) -> int:
    return subprocess.run([sys.executable, "-m", "rag_backup", *args], check=False).returncode


def write_scheduler_metrics(
    metrics_dir: Path, now: dt.datetime, schedule: Schedule, results: dict[str, bool]
) -> None:
    lines = [
        "# HELP rag_backup_next_run_timestamp_seconds Next planned run per job.",
        "# TYPE rag_backup_next_run_timestamp_seconds gauge",
        f'rag_backup_next_run_timestamp_seconds{{job="backup"}} '
        f"{schedule.next_backup(now).timestamp():.0f}",
        f'rag_backup_next_run_timestamp_seconds{{job="drill"}} '
        f"{schedule.next_drill(now).timestamp():.0f}",
    ]
    if results:
        lines += [
            "# HELP rag_backup_scheduler_job_success Outcome of the job's last scheduled run.",
            "# TYPE rag_backup_scheduler_job_success gauge",
        ]
        lines += [
            f'rag_backup_scheduler_job_success{{job="{j}"}} {int(ok)}' for j, ok in results.items()
        ]
    write_atomic(metrics_dir / SCHEDULER_FILE, "\n".join(lines) + "\n")


def _read_state(metrics_dir: Path) -> dict[str, dict[str, float]]:
    try:
        data = json.loads((metrics_dir / STATE_FILE).read_text())
        return {"attempts": dict(data["attempts"]), "success": dict(data["success"])}
    except (OSError, ValueError, KeyError, TypeError):
        return {"attempts": {}, "success": {}}


def _latest(*values: float | None) -> float | None:
    present = [v for v in values if v is not None]
    return max(present) if present else None


def run_pending(
    schedule: Schedule,
    metrics_dir: Path,
    now: dt.datetime,
    runner: Callable[[Sequence[str]], int] = _subprocess_runner,
) -> dict[str, bool]:
    """Run every due job once; record the outcome. Returns job -> success of this call."""
    state = _read_state(metrics_dir)
    attempts, success = state["attempts"], state["success"]
    last_backup = _latest(
        _last_attempt(metrics_dir, BACKUP_FILE, "rag_backup_last_run_timestamp_seconds"),
        attempts.get("backup"),
    )
    last_drill = _latest(
        _last_attempt(metrics_dir, DRILL_FILE, "rag_restore_drill_last_run_timestamp_seconds"),
        attempts.get("drill"),
    )
    results = {}
    for job in due_jobs(schedule, now, last_backup, last_drill):
        # Recorded before the run: a job that crashes is not retried until its next slot.
        attempts[job] = now.timestamp()
        write_atomic(metrics_dir / STATE_FILE, json.dumps(state))
        results[job] = run_job(job, runner, schedule.backup_args(now))
        success[job] = float(results[job])
        write_atomic(metrics_dir / STATE_FILE, json.dumps(state))
    write_scheduler_metrics(
        metrics_dir, now, schedule, {job: bool(ok) for job, ok in success.items()}
    )
    return results


def write_heartbeat(metrics_dir: Path, now: float) -> None:
    write_atomic(
        metrics_dir / HEARTBEAT_FILE,
        "# HELP rag_backup_scheduler_heartbeat_timestamp_seconds The scheduler is alive.\n"
        "# TYPE rag_backup_scheduler_heartbeat_timestamp_seconds gauge\n"
        f"rag_backup_scheduler_heartbeat_timestamp_seconds {now:.0f}\n",
    )


def check_heartbeat(metrics_dir: Path, now: float) -> bool:
    beat = read_samples(metrics_dir / HEARTBEAT_FILE).get(
        ("rag_backup_scheduler_heartbeat_timestamp_seconds", None)
    )
    return beat is not None and now - beat <= HEARTBEAT_MAX_AGE_SECONDS


def _beat_forever(metrics_dir: Path) -> None:
    while True:
        try:
            write_heartbeat(metrics_dir, time.time())
        except OSError as exc:  # a full disk must not kill the scheduler; health shows it
            print(f"rag-backup-schedule: heartbeat not written: {exc}", flush=True)
        time.sleep(HEARTBEAT_SECONDS)


def run_wal_archive(runner: Callable[[Sequence[str]], int] = _subprocess_runner) -> bool:
    """One WAL cycle: wal-archive, then (with a target) the off-host copy of the new
    segments, also after a failed cycle (it catches up on what is already at rest)."""
    ok = True
    for step in [["wal-archive", "--quiet"], *offsite_wal_steps()]:
        code = runner(step)
        if code != 0:
            name = " ".join(s for s in step if not s.startswith("--"))
            print(f"rag-backup-schedule: rag-backup {name} failed (exit {code})", flush=True)
            ok = False
    return ok


def _wal_forever() -> None:
    while True:
        run_wal_archive()  # its own metrics (rag_backup_wal.prom, _offsite_wal.prom) report
        time.sleep(WAL_INTERVAL_SECONDS)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="rag-backup-schedule",
        description="Run rag-backup on a schedule: daily backup+verify+prune, weekly drill (UTC).",
    )
    parser.add_argument("--backup-time", default=os.environ.get("RAG_BACKUP_TIME", "03:00"))
    parser.add_argument("--drill-weekday", default=os.environ.get("RAG_DRILL_WEEKDAY", "sun"))
    parser.add_argument("--drill-time", default=os.environ.get("RAG_DRILL_TIME", "04:30"))
    parser.add_argument(
        "--pg-logical-weekday",
        default=os.environ.get("RAG_BACKUP_PG_LOGICAL_WEEKDAY", ""),
        help="with RAG_BACKUP_PG_PHYSICAL=1: the only weekday (UTC) whose backup keeps the "
        "logical dump (env RAG_BACKUP_PG_LOGICAL_WEEKDAY; default: every backup)",
    )
    parser.add_argument(
        "--metrics-dir",
        type=Path,
        default=Path(os.environ["RAG_BACKUP_METRICS_DIR"])
        if os.environ.get("RAG_BACKUP_METRICS_DIR")
        else None,
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="run what is due now, then exit")
    mode.add_argument("--check", action="store_true", help="healthcheck: is the loop alive?")
    args = parser.parse_args(argv)
    if args.metrics_dir is None:
        parser.error("--metrics-dir (or RAG_BACKUP_METRICS_DIR) is required")
    if args.check:
        return 0 if check_heartbeat(args.metrics_dir, time.time()) else 1
    try:
        schedule = Schedule.parse(
            args.backup_time,
            args.drill_weekday,
            args.drill_time,
            pg_logical_weekday=args.pg_logical_weekday,
            pg_physical=os.environ.get("RAG_BACKUP_PG_PHYSICAL", ""),
            wal_archive=os.environ.get("RAG_BACKUP_WAL_ARCHIVE", ""),
        )
    except ScheduleError as exc:
        print(f"rag-backup-schedule: error: {exc}", file=sys.stderr)
        return 2
    # The settings rag-backup itself reads, checked before the first job: a typo gives one
    # clear line at start, not a failed job (and a traceback) every night.
    problems = environment_problems()
    if problems:
        for problem in problems:
            print(f"rag-backup-schedule: error: {problem}", file=sys.stderr)
        return 2
    if args.once:
        # WAL first: the slot then exists before the base backup (no gap).
        wal_ok = run_wal_archive() if schedule.wal_archive else True
        results = run_pending(schedule, args.metrics_dir, _now())
        return 0 if wal_ok and all(results.values()) else 1
    threading.Thread(target=_beat_forever, args=(args.metrics_dir,), daemon=True).start()
    if schedule.wal_archive:
        threading.Thread(target=_wal_forever, daemon=True).start()
    while True:
        run_pending(schedule, args.metrics_dir, _now())
        time.sleep(60)  # slots are whole minutes


if __name__ == "__main__":
    sys.exit(main())
