"""Child processes: argv lists (never shell strings), stderr kept in temp files so pipes
cannot deadlock, and a registry so an interrupt can stop every child before cleaning up."""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, wait
from typing import IO, Any

from rag_backup.errors import BackupError

_live: set[subprocess.Popen[bytes]] = set()
_live_lock = threading.Lock()


class Proc:
    """A started child with a name for messages and its stderr captured to a temp file."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        *,
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
        stdout: int | IO[bytes] | None = subprocess.PIPE,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> None:
        self.name = name
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
        try:
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                list(argv),
                stdin=stdin,
                stdout=stdout,
                stderr=self._stderr,
                env=dict(env) if env is not None else None,
                **kwargs,
            )
        except OSError as error:
            self._stderr.close()
            raise BackupError(f"cannot run {argv[0]} for {name}: {error.strerror}") from error
        # CPU seconds (user + system) the child used, once it has exited and been waited
        # for; None where the kernel does not tell (for the restore's phase breakdown).
        self.cpu_seconds: float | None = None
        with _live_lock:
            _live.add(self.popen)
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                enlarge_pipe(stream.fileno())

    @property
    def stdout(self) -> IO[bytes]:
        assert self.popen.stdout is not None
        return self.popen.stdout

    @property
    def stdin(self) -> IO[bytes]:
        assert self.popen.stdin is not None
        return self.popen.stdin

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def wait(self, timeout: float | None = None) -> int:
        remaining = timeout
        if self.popen.returncode is None and self.cpu_seconds is None:
            exited, self.cpu_seconds = _cpu_at_exit(self.popen.pid, timeout)
            if not exited:
                remaining = 0  # the whole timeout has passed already
        try:
            code = self.popen.wait(timeout=remaining)
        except subprocess.TimeoutExpired as error:
            assert timeout is not None
            self.kill()
            raise BackupError(f"{self.name} did not finish within {timeout:.0f}s") from error
        with _live_lock:
            _live.discard(self.popen)
        return code

    def check(self, timeout: float | None = None) -> None:
        code = self.wait(timeout)
        if code != 0:
            raise BackupError(f"{self.name} failed (exit {code}): {last_lines(self.stderr_text())}")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        with _live_lock:
            _live.discard(self.popen)

    def close(self) -> None:
        self.kill()
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()
        self._stderr.close()


PIPE_SIZE = 1 << 20


def _cpu_at_exit(pid: int, timeout: float | None) -> tuple[bool, float | None]:
    """Wait until ``pid`` has exited without reaping it (it stays a zombie, so its
    /proc/<pid>/stat still holds its CPU times), then read them. Returns (exited, seconds);
    (True, None) when this is not possible (no pidfd, already reaped): the caller then
    waits as usual."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return True, None
    try:
        if not select.select([pidfd], [], [], timeout)[0]:
            return False, None
        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            # Fields after "(comm)": state is field 3, utime 14, stime 15 (clock ticks).
            fields = handle.read().rsplit(")", 1)[1].split()
        return True, (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return True, None
    finally:
        os.close(pidfd)


def enlarge_pipe(fd: int) -> None:
    """1 MiB pipe buffers instead of 64 KiB: far fewer context switches between the
    stages of a pipeline (the system's pipe-max-size permitting)."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def last_lines(text: str, count: int = 3) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return " | ".join(lines[-count:]) if lines else "(no message)"


def kill_all_children() -> None:
    """Stop every child still running (used on interrupt and on failure)."""
    with _live_lock:
        children = list(_live)
    for child in children:
        if child.poll() is None:
            with contextlib.suppress(OSError):
                child.kill()
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=10)


# How often stop_children_until kills again while the workers have not ended.
STOP_POLL_S = 0.1


def stop_children_until(workers_ended: Callable[[float], bool]) -> None:
    """Kill every child, again every STOP_POLL_S, until ``workers_ended(timeout)`` says the
    worker threads that start them have ended. One kill is not enough: a worker between two
    steps starts its next child just after it (a pg_dump then waits on a lock, or copies a
    whole database, while the interrupted process waits for it)."""
    while True:
        kill_all_children()
        if workers_ended(STOP_POLL_S):
            return


def threads_ended(threads: Sequence[threading.Thread]) -> Callable[[float], bool]:
    """For stop_children_until: whether every thread has ended, waiting at most ``timeout``."""

    def ended(timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in threads)

    return ended


def futures_ended(futures: Iterable[Future[Any]]) -> Callable[[float], bool]:
    """For stop_children_until: whether every future is done, waiting at most ``timeout``."""
    pending = list(futures)
    return lambda timeout: not wait(pending, timeout=timeout).not_done


def run(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    input_bytes: bytes | None = None,
    timeout: float = 600,
    **kwargs: Any,
) -> str:
    """Run to completion; returns stdout as text; raises BackupError with stderr's tail.

    The child is registered like a Proc's, so a failure or an interrupt elsewhere stops it
    (subprocess.run's child, run from a worker thread, would be out of reach)."""
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.PIPE if input_bytes is not None else None,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env) if env is not None else None,
            **kwargs,
        )
    except FileNotFoundError as error:
        raise BackupError(
            f"cannot run {argv[0]} for {name}: not installed or not on PATH"
        ) from error
    with _live_lock:
        _live.add(popen)
    with popen:  # its exit closes the pipes and waits for the child
        try:
            stdout, stderr = popen.communicate(input_bytes, timeout=timeout)
        except subprocess.TimeoutExpired as error:
            popen.kill()
            raise BackupError(f"{name} did not finish within {timeout:.0f}s") from error
        except BaseException:
            popen.kill()
            raise
        finally:
            with _live_lock:
                _live.discard(popen)
    if popen.returncode != 0:
        message = last_lines(stderr.decode(errors="replace"))
        raise BackupError(f"{name} failed (exit {popen.returncode}): {message}")
    return stdout.decode(errors="replace")


def base_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if extra:
        env.update(extra)
    return env
