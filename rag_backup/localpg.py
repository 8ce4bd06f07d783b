"""A throwaway PostgreSQL cluster for restore drills: a temp data dir, trust auth on a
private unix socket only (no TCP), run as the ``postgres`` OS user when we are root."""

from __future__ import annotations

import functools
import grp
import os
import pwd
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from rag_backup.errors import BackupError
from rag_backup.pg import PostgresSettings, psql_value
from rag_backup.procs import Proc, last_lines, run
from rag_backup.untrusted_files import read_head

DEFAULT_BIN_DIRS = ("/usr/lib/postgresql/15/bin",)
# A staged physical backup is hostile input: its postgresql.conf, postgresql.auto.conf and
# signal files were written by whoever controlled the backed-up server (ALTER SYSTEM, COPY
# ... TO a file). The private server that checks it reads our own config files, not the
# copy's postgresql.conf; the copy's postgresql.auto.conf is held aside while it runs; the
# signal files are removed at extraction (physical.extract_base_backup); and every setting
# that can run a command, load a library or write outside is forced on the command line
# (the command line wins over both config files).
NEUTRALISED_SETTINGS = (
    "restore_command=",
    "archive_command=",
    "archive_library=",
    "archive_mode=off",
    "archive_cleanup_command=",
    "recovery_end_command=",
    "primary_conninfo=",
    "primary_slot_name=",
    "shared_preload_libraries=",
    "session_preload_libraries=",
    "local_preload_libraries=",
    "dynamic_library_path=$libdir",
    "jit=off",
    "jit_provider=llvmjit",
    "ssl=off",
    "ssl_passphrase_command=",
    "ssl_passphrase_command_supports_reload=off",
    "ssl_cert_file=",
    "ssl_key_file=",
    "ssl_ca_file=",
    "ssl_crl_file=",
    "ssl_crl_dir=",
    "krb_server_keyfile=",
    "external_pid_file=",
    "logging_collector=off",
    "log_destination=stderr",
    "unix_socket_group=",
    "unix_socket_permissions=0700",
)
# recovery_init_sync_method (syncfs) exists from this major version on.
SYNCFS_SINCE_MAJOR = 14
# Held aside (renamed) while the private server runs on a staged copy.
AUTO_CONF = "postgresql.auto.conf"
AUTO_CONF_HELD = "postgresql.auto.conf.rag-held"
# postmaster.pid: its 8th line is the postmaster's status (PostgreSQL 10+), "ready" once it
# accepts connections. A staged copy's own lock file is removed at extraction
# (physical.LOCK_FILE), so the status read is the private server's.
PID_FILE = "postmaster.pid"
PID_FILE_STATUS_LINE = 7
PID_FILE_MAX_BYTES = 4096
READY_STATUS = "ready"
# Start-up: the status is read every READY_POLL_S (a file read, no process started); only
# without one (no pid file yet, an older server, a pid file this user cannot read) is a
# connection tried instead, every READY_CONNECT_INTERVAL_S (each a psql process taking CPU
# from the starting server).
READY_POLL_S = 0.01
READY_CONNECT_INTERVAL_S = 0.1


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


def run_as_owner_of(path: Path) -> dict[str, Any]:
    """subprocess arguments to run as the owner of ``path`` (PostgreSQL refuses root)."""
    if os.geteuid() != 0:
        return {}
    st = path.stat()
    return {"user": st.st_uid, "group": st.st_gid, "extra_groups": []}


@functools.cache
def server_major_version(bin_dir: Path) -> int:
    """The major version of ``bin_dir``'s postgres (asked once per process)."""
    out = run("postgres --version", [str(bin_dir / "postgres"), "--version"], timeout=60)
    match = re.search(r"(\d+)(?:\.\d+)?", out)
    if not match:
        raise BackupError(f"cannot read the version of {bin_dir / 'postgres'}: {out.strip()}")
    return int(match[1])


class LocalPostgres:
    """A private postgres on a unix socket only. Either a fresh cluster made with initdb in
    a temp dir under ``work_dir`` (``data_dir`` None), or an existing data directory (a
    staged physical backup), with trust auth from a private pg_hba.conf and settings that
    keep it from touching anything outside (no TCP, no archiving, no SSL files)."""

    def __init__(
        self,
        bin_dir: Path,
        work_dir: Path,
        jobs: int,
        *,
        data_dir: Path | None = None,
        user: str = "postgres",
        durable: bool = False,
        recovery: tuple[str, ...] = (),
    ) -> None:
        """``recovery``: our own settings for a point-in-time recovery of the staged copy
        (restore_command from our decrypted WAL, the target), applied after the neutralised
        ones (on the command line the last value wins)."""
        self.bin_dir = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="rag-drill-pg-", dir=work_dir))
        self.proc: Proc | None = None
        run_as = _run_as() if data_dir is None else run_as_owner_of(data_dir)
        if run_as:
            os.chown(self.root, _uid(run_as["user"]), _gid(run_as["group"]))
        self.root.chmod(0o700)
        self.data_dir = data_dir if data_dir is not None else self.root / "data"
        self.port = 5432
        self._held_auto_conf = False
        try:
            extra: list[str] = []
            if data_dir is None:
                run(
                    "initdb",
                    [
                        str(bin_dir / "initdb"),
                        "-D",
                        str(self.data_dir),
                        "-U",
                        user,
                        "--auth=trust",
                        "--encoding=UTF8",
                        "--locale=C",
                        "--no-sync",
                    ],
                    timeout=300,
                    **run_as,
                )
            else:
                own = {
                    "pg_hba.conf": "local all all trust\n",
                    "pg_ident.conf": "",
                    "postgresql.conf": "# rag-backup: settings are on the command line\n",
                }
                for name, text in own.items():
                    path = self.root / name
                    path.write_text(text)
                    path.chmod(0o600)
                    if run_as:
                        os.chown(path, _uid(run_as["user"]), _gid(run_as["group"]))
                if (data_dir / AUTO_CONF).exists():
                    os.rename(data_dir / AUTO_CONF, data_dir / AUTO_CONF_HELD)
                    self._held_auto_conf = True
                extra = [
                    f"config_file={self.root / 'postgresql.conf'}",
                    f"hba_file={self.root / 'pg_hba.conf'}",
                    f"ident_file={self.root / 'pg_ident.conf'}",
                    *NEUTRALISED_SETTINGS,
                    *recovery,
                ]
            settings = [
                "listen_addresses=",
                f"unix_socket_directories={self.root}",
                f"port={self.port}",
                f"max_parallel_maintenance_workers={max(1, jobs)}",
                *extra,
            ]
            if not durable:
                # A throwaway instance: durability is not needed, restore speed is.
                settings += ["fsync=off", "synchronous_commit=off", "full_page_writes=off"]
            elif data_dir is not None and server_major_version(bin_dir) >= SYNCFS_SINCE_MAJOR:
                # The staged copy was synced as a whole after extraction (physical.sync_tree);
                # the start-up sync of a copy that was not shut down cleanly is then one
                # syncfs instead of an fsync per file (each a cache flush: ~1 s here).
                settings += ["recovery_init_sync_method=syncfs"]
            argv = [str(bin_dir / "postgres"), "-D", str(self.data_dir)]
            for setting in settings:
                argv += ["-c", setting]
            self.proc = Proc("postgres (private)", argv, stdout=subprocess.DEVNULL, **run_as)
            self.settings = PostgresSettings(
                database="postgres",
                libpq_env={
                    "PGHOST": str(self.root),
                    "PGPORT": str(self.port),
                    "PGUSER": user,
                    "PGSSLMODE": "disable",
                },
                jobs=jobs,
                bin_dir=None,
            )
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout_s: float = 600) -> None:
        """Until the server's status is ready, or a connection succeeds."""
        deadline = time.monotonic() + timeout_s
        tried_at = time.monotonic()  # the server has only just been started
        while True:
            assert self.proc is not None
            if self.proc.popen.poll() is not None:
                raise BackupError(
                    f"private postgres exited: {last_lines(self.proc.stderr_text(), 4)}"
                )
            status = _pid_file_status(self.data_dir)
            if status == READY_STATUS:
                return
            if status is None and time.monotonic() - tried_at >= READY_CONNECT_INTERVAL_S:
                try:
                    psql_value(self.settings, "SELECT 1", "postgres")
                    return
                except BackupError as error:
                    if "does not exist" in str(error) and "role" in str(error):
                        raise
                tried_at = time.monotonic()
            if time.monotonic() > deadline:
                raise BackupError(
                    f"private postgres not ready after {timeout_s:.0f}s (status {status})"
                )
            time.sleep(READY_POLL_S)

    def stop(self) -> None:
        """Fast shutdown (a clean shutdown checkpoint), then remove the private files."""
        if self.proc is not None:
            if self.proc.popen.poll() is None:
                self.proc.popen.send_signal(2)  # fast shutdown
                try:
                    self.proc.wait(timeout=600)
                except BackupError:
                    self.proc.kill()
            self.proc.close()
            self.proc = None
        if self._held_auto_conf:
            # The copy's own settings go back with it (the live server will read them).
            os.replace(self.data_dir / AUTO_CONF_HELD, self.data_dir / AUTO_CONF)
            self._held_auto_conf = False
        shutil.rmtree(self.root, ignore_errors=True)

    def stop_checked(self) -> None:
        """Shut down and require a clean exit: the data dir is then consistent on disk."""
        assert self.proc is not None
        self.proc.popen.send_signal(2)
        code = self.proc.wait(timeout=600)
        if code != 0:
            raise BackupError(
                f"private postgres did not shut down cleanly (exit {code}): "
                f"{last_lines(self.proc.stderr_text())}"
            )
        self.stop()


def _pid_file_status(data_dir: Path) -> str | None:
    """The status line of ``data_dir``'s postmaster.pid, None while there is none. The data
    directory is a staged copy of an untrusted backup (untrusted_files.read_head): its own
    lock file was removed at extraction, so "ready" is the private server's word, and a
    status that is wrong anyway fails the first query after the wait."""
    text = read_head(data_dir, PID_FILE, PID_FILE_MAX_BYTES)
    lines = text.splitlines() if text is not None else []
    return lines[PID_FILE_STATUS_LINE].strip() if len(lines) > PID_FILE_STATUS_LINE else None


def _uid(user: str | int) -> int:
    return user if isinstance(user, int) else pwd.getpwnam(user).pw_uid


def _gid(group: str | int) -> int:
    return group if isinstance(group, int) else grp.getgrnam(group).gr_gid
