"""Progress lines on stderr for long steps: at most one line per task every few seconds."""

from __future__ import annotations

import sys
import threading
import time

_quiet = False


def set_quiet(quiet: bool) -> None:
    global _quiet
    _quiet = quiet


def log(message: str) -> None:
    """A progress/status line on stderr (errors are printed by the CLI, never silenced)."""
    if not _quiet:
        print(f"rag-backup: {message}", file=sys.stderr, flush=True)


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(count) < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"


class ProgressTask:
    def __init__(self, owner: Progress, label: str) -> None:
        self._owner = owner
        self._label = label
        self._started = time.monotonic()
        self._last = self._started

    def update(self, done_bytes: int) -> None:
        now = time.monotonic()
        if self._owner.enabled and now - self._last >= self._owner.interval_s:
            self._last = now
            rate = done_bytes / max(now - self._started, 1e-6)
            log(f"{self._label} {human_bytes(done_bytes)} ({human_bytes(rate)}/s)")

    def done(self, done_bytes: int) -> None:
        if self._owner.enabled and self._owner.verbose_done:
            elapsed = time.monotonic() - self._started
            log(f"{self._label} {human_bytes(done_bytes)} in {elapsed:.1f}s")


class Progress:
    def __init__(self, enabled: bool = True, interval_s: float = 5.0) -> None:
        self.enabled = enabled
        self.interval_s = interval_s
        self.verbose_done = True
        self._lock = threading.Lock()

    def task(self, label: str) -> ProgressTask:
        return ProgressTask(self, label)
