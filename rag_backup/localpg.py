"""A throwaway PostgreSQL cluster for restore drills: a temp data dir, trust auth on a
private unix socket only (no TCP), run as the ``postgres`` OS user when we are root."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from rag_backup.errors import BackupError
from rag_backup.pg import PostgresSettings, psql_value
from rag_backup.procs import Proc, run

DEFAULT_BIN_DIRS = ("/usr/lib/postgresql/15/bin",)


def find_server_bin_dir(explicit: Path | None) -> Path:
    candidates = [explicit] if explicit else []
    which = shutil.which("postgres")
    if which:
        candidates.append(Path(which).resolve().parent)
    candidates += [Path(d) for d in DEFAULT_BIN_DIRS]
    for directory in candidates:
        if directory and (directory / "postgres").is_file() and (directory / "initdb").is_file():
            return directory
    raise BackupError(
        "--pg-bin-dir: no PostgreSQL server binaries (postgres, initdb) found on PATH or in "
        "/usr/lib/postgresql/15/bin"
    )


def _run_as() -> dict[str, Any]:
    if os.geteuid() == 0:
        return {"user": "postgres", "group": "postgres", "extra_groups": []}
    return {}


class LocalPostgres:
    def __init__(self, bin_dir: Path, work_dir: Path, jobs: int) -> None:
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="rag-drill-pg-", dir=work_dir))
        self.proc: Proc | None = None
        run_as = _run_as()
        if run_as:
            shutil.chown(self.root, "postgres", "postgres")
        self.root.chmod(0o700)
        self.data_dir = self.root / "data"
        self.port = 5432
        try:
            run(
                "initdb",
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(self.data_dir),
                    "-U",
                    "postgres",
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C",
                    "--no-sync",
                ],
                timeout=300,
                **run_as,
            )
            self.proc = Proc(
                "postgres (drill)",
                [
                    str(bin_dir / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-c",
                    "listen_addresses=",
                    "-c",
                    f"unix_socket_directories={self.root}",
                    "-c",
                    f"port={self.port}",
                    # A throwaway instance: durability is not needed, restore speed is.
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                    "-c",
                    f"max_parallel_maintenance_workers={max(1, jobs)}",
                ],
                stdout=subprocess.DEVNULL,
                **run_as,
            )
            self.settings = PostgresSettings(
                database="postgres",
                libpq_env={
                    "PGHOST": str(self.root),
                    "PGPORT": str(self.port),
                    "PGUSER": "postgres",
                },
                jobs=jobs,
                bin_dir=None,
            )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc is not None
            if self.proc.popen.poll() is not None:
                raise BackupError(f"drill postgres exited: {self.proc.stderr_text()[-500:]}")
            try:
                psql_value(self.settings, "SELECT 1", "postgres")
                return
            except BackupError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.popen.poll() is None:
                self.proc.popen.send_signal(2)  # fast shutdown
                try:
                    self.proc.wait(timeout=60)
                except BackupError:
                    self.proc.kill()
            self.proc.close()
            self.proc = None
        shutil.rmtree(self.root, ignore_errors=True)
