"""Stopping children on an interrupt or a failure, with real child processes: a child a
worker starts after the first kill, and one run to completion by ``run``, are stopped too."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rag_backup import procs
from rag_backup.errors import BackupError
from tests.tooling import require_tool

# Each child sleeps for a duration no test waits for (10 min), distinct per test so it is
# found by its argument: a child still sleeping was not stopped.


def in_thread(target: Callable[[], object]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            target()
        except BaseException as error:
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def running_children(marker: str) -> list[int]:
    """PIDs of this process's live children whose last argument is ``marker``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # ended meanwhile
        # Fields after "(comm)": state, then the parent's PID; a zombie has been stopped.
        if int(stat[1]) == os.getpid() and stat[0] != "Z" and marker.encode() in argv:
            found.append(int(entry.name))
    return found


def wait_for_child(marker: str) -> None:
    deadline = time.monotonic() + 30
    while not running_children(marker):
        assert time.monotonic() < deadline, f"sleep {marker} never started"
        time.sleep(0.02)


def test_a_child_a_worker_starts_after_the_first_kill_is_stopped_too(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    marker = "601"
    first_kill_done = threading.Event()
    real_kill = procs.kill_all_children

    def kill_and_tell() -> None:
        real_kill()
        first_kill_done.set()

    monkeypatch.setattr(procs, "kill_all_children", kill_and_tell)

    def worker() -> None:
        # Between two steps when the interrupt came: its next child starts after the kill.
        first_kill_done.wait(timeout=30)
        procs.Proc("sleep", [require_tool("sleep"), marker]).check()

    thread, errors = in_thread(worker)
    stopper, stop_errors = in_thread(
        lambda: procs.stop_children_until(procs.threads_ended([thread]))
    )
    stopper.join(timeout=30)
    try:
        assert not stopper.is_alive(), "stop_children_until waits on a child it did not stop"
        assert stop_errors == []
        assert not thread.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], BackupError)
        assert "sleep failed (exit -9)" in str(errors[0])
        assert running_children(marker) == []
    finally:
        for pid in running_children(marker):
            os.kill(pid, signal.SIGKILL)


def test_a_child_run_to_completion_is_stopped_by_kill_all_children() -> None:
    marker = "602"
    thread, errors = in_thread(lambda: procs.run("sleep", [require_tool("sleep"), marker]))
    try:
        wait_for_child(marker)
        procs.kill_all_children()
        thread.join(timeout=30)
        assert not thread.is_alive(), "run's child was out of kill_all_children's reach"
        assert len(errors) == 1 and isinstance(errors[0], BackupError)
        assert "sleep failed (exit -9)" in str(errors[0])
    finally:
        for pid in running_children(marker):
            os.kill(pid, signal.SIGKILL)
