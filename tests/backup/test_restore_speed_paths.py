"""The physical restore's fast paths, on real processes and a real PostgreSQL 15: CPU seconds
of exited children, write-back started while tar extracts and one syncfs at the end (both
walking an untrusted tree without leaving it or blocking on a FIFO), the private server's
start-up sync by syncfs, and the per-phase timings a restore reports."""

from __future__ import annotations

import functools
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

from rag_backup import localpg, physical
from rag_backup.crypto import Cipher, CipherSettings
from rag_backup.errors import BackupError
from rag_backup.localpg import LocalPostgres, find_server_bin_dir
from rag_backup.manifest import PG_PHYSICAL_KIND
from rag_backup.pg import PostgresSettings, psql_value, row_counts
from rag_backup.procs import Proc
from rag_backup.store import BackupStore
from rag_backup.stores import artifact, checked_plaintext_into
from tests.backup.conftest import Stack
from tests.backup.helpers import pg_snapshot, run_cli
from tests.servers import start_postgres
from tests.tooling import require_tool

WALK_TIMEOUT_S = 30
READY_BOUND_S = 60


def test_proc_reports_the_cpu_seconds_of_an_exited_child_and_keeps_its_exit_code() -> None:
    busy = "import sys\nx = 0\nfor i in range(3 * 10**6): x += i\nsys.exit(3)"
    proc = Proc("busy child", [sys.executable, "-c", busy], stdout=subprocess.DEVNULL)
    try:
        assert proc.wait(timeout=120) == 3
    finally:
        proc.close()
    assert proc.cpu_seconds is not None and proc.cpu_seconds >= 0.05

    sleeper = Proc("sleeper", ["sleep", "30"], stdout=subprocess.DEVNULL)
    try:
        with pytest.raises(BackupError, match="sleeper did not finish within 1s"):
            sleeper.wait(timeout=1)
        assert sleeper.popen.poll() is not None  # killed on the timeout
    finally:
        sleeper.close()


def _hostile_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A staged tree as a hostile archive could leave it: a symlinked directory and a
    symlinked file pointing outside, and a FIFO (opening it for reading would block)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"s" * 4096)
    root = tmp_path / "staged"
    (root / "base" / "1").mkdir(parents=True)
    (root / "PG_VERSION").write_text("15\n")
    (root / "base" / "1" / "1259").write_bytes(os.urandom(1 << 20))
    (root / "base" / "escape").symlink_to(outside)
    (root / "link").symlink_to(outside / "secret")
    os.mkfifo(root / "base" / "fifo")
    return root, outside


def _within(seconds: float, action: Callable[[], object]) -> None:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as error:  # reported in the test's thread
            errors.append(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for more than {seconds}s"
    if errors:
        raise errors[0]


def test_sync_walks_only_the_tree_and_never_blocks(tmp_path: Path) -> None:
    root, _ = _hostile_tree(tmp_path)
    found: list[tuple[str, str, int, int]] = []
    _within(WALK_TIMEOUT_S, lambda: found.extend(physical._regular_files(root)))
    assert sorted((Path(d).relative_to(root) / n).as_posix() for d, n, _, _ in found) == [
        "PG_VERSION",
        "base/1/1259",
    ]

    _within(WALK_TIMEOUT_S, lambda: physical.sync_tree(root))
    _within(WALK_TIMEOUT_S, lambda: physical.fsync_tree(root))


@pytest.mark.integration
def test_private_server_on_a_staged_copy_syncs_by_syncfs_only_when_durable(stack: Stack) -> None:
    """The copy that will go live is synced once by syncfs (physical.sync_tree) and the
    private server's start-up sync is one syncfs too; a drill's throwaway copy runs
    without fsync."""
    require_tool("pg_basebackup")
    backup = run_cli(["backup", "--pg-physical", "--no-pg-logical"], stack.env)
    assert backup.returncode == 0, backup.stderr
    entry = BackupStore(stack.backup_dir).get(backup.stdout.strip())
    item = artifact(entry, "postgres", PG_PHYSICAL_KIND)
    bin_dir = find_server_bin_dir(None)
    # The postgres user (tar, the private server) must reach it: not under pytest's 0700 tmp.
    work = Path(tempfile.mkdtemp(prefix="rag-test-sync-"))
    work.chmod(0o755)
    try:
        settings_seen: dict[bool, tuple[str, ...]] = {}
        with Cipher(CipherSettings("gpg", key_file=stack.key_file)) as cipher:
            for durable in (True, False):
                data = work / f"copy-{durable}"
                data.mkdir(mode=0o700)
                if os.geteuid() == 0:
                    shutil.chown(data, "postgres", "postgres")
                phases: dict[str, float] = {}
                physical.extract_base_backup(
                    checked_plaintext_into(cipher, entry, item, "postgres"),
                    data,
                    durable=durable,
                    phases=phases,
                )
                assert ("fsync" in phases) is durable
                server = LocalPostgres(bin_dir, work, 1, data_dir=data, durable=durable)
                try:
                    settings_seen[durable] = tuple(
                        psql_value(server.settings, f"SHOW {name}", "postgres")
                        for name in ("fsync", "recovery_init_sync_method")
                    )
                finally:
                    server.stop()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    assert settings_seen[True] == ("on", "syncfs")
    assert settings_seen[False][0] == "off"


@pytest.mark.integration
def test_physical_restore_reports_each_phase_and_gives_the_backups_data(stack: Stack) -> None:
    require_tool("pg_basebackup")
    before = pg_snapshot(stack.pg)
    backup = run_cli(["backup", "--pg-physical", "--no-pg-logical"], stack.env)
    assert backup.returncode == 0, backup.stderr
    stack.pg.psql("CREATE TABLE after_backup (x int)")
    stack.pg.shutdown()
    physical_args = ["--pg-mode", "physical", "--pg-data-dir", str(stack.pg.data_dir)]
    restore = run_cli(
        ["restore", backup.stdout.strip(), "--yes", "--components", "postgres", *physical_args],
        stack.env,
    )
    assert restore.returncode == 0, restore.stderr
    line = next(x for x in restore.stderr.splitlines() if "timings:" in x)
    steps = dict(re.findall(r"(?:timings: |, )([^,]+?) (\d+\.\d\d)s", line))
    for step in (
        "postgres: extract (read+hash | decrypt | zstd -d + write)",
        "postgres: cpu hash",
        "postgres: cpu decrypt",
        "postgres: cpu decompress",
        "postgres: cpu untar",
        "postgres: fsync",
        "postgres: server start + WAL replay",
        "postgres: row counts",
        "postgres: shutdown",
    ):
        assert step in steps, (step, line)
    stack.pg.start_again()
    assert pg_snapshot(stack.pg) == before


def test_start_segment_is_read_early_only_from_a_complete_regular_backup_label(
    tmp_path: Path,
) -> None:
    """PITR decrypts the WAL while tar still writes the copy, starting from the copy's
    backup_label before it is authenticated: a FIFO must not block, a symlink is not
    followed, a half-written line gives nothing yet."""
    data = tmp_path / "data"
    data.mkdir()
    outside = tmp_path / "label-elsewhere"
    line = "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n"
    outside.write_text(line)
    assert physical.start_segment_early(data) is None  # not written yet
    (data / "backup_label").symlink_to(outside)
    assert physical.start_segment_early(data) is None
    (data / "backup_label").unlink()
    os.mkfifo(data / "backup_label")
    found: list[str | None] = []
    _within(WALK_TIMEOUT_S, lambda: found.append(physical.start_segment_early(data)))
    assert found == [None]
    (data / "backup_label").unlink()
    (data / "backup_label").write_text(line[:50])
    assert physical.start_segment_early(data) is None
    (data / "backup_label").write_text(line)
    assert physical.start_segment_early(data) == "000000010000000000000002"


@pytest.mark.integration
def test_row_counts_are_exact_for_every_table_and_catch_a_missing_or_extra_row(
    tmp_path: Path,
) -> None:
    """The restore's row counts (one psql run: the catalog query builds the count query,
    \\gexec runs it): every user table, names a hostile backup could hold quoted, exact
    counts, an empty database gives {}; one row missing or extra fails the check."""
    server = start_postgres(tmp_path)
    try:
        settings = PostgresSettings("postgres", server.env(), 1)
        assert row_counts(settings, "postgres") == {}
        server.psql(
            """
            CREATE SCHEMA "odd schema";
            CREATE TABLE "odd schema"."we""ird" (x int);
            CREATE TABLE "it's; DROP TABLE plain; --" (x int);
            CREATE TABLE plain (x int);
            INSERT INTO "odd schema"."we""ird" SELECT generate_series(1, 1234);
            INSERT INTO plain SELECT generate_series(1, 100000);
            """
        )
        expected = {
            '"odd schema"."we""ird"': 1234,
            "public.plain": 100000,
            'public."it\'s; DROP TABLE plain; --"': 0,
        }
        counts = row_counts(settings, "postgres")
        assert counts == expected
        physical.counts_within(expected, expected, counts, "test")
        for change, got in (
            ("DELETE FROM plain WHERE x = 7", 99999),
            ("INSERT INTO plain VALUES (7), (8)", 100001),
        ):
            server.psql(change)
            with pytest.raises(BackupError, match=rf"public\.plain: expected 100000, got {got}"):
                physical.counts_within(expected, expected, row_counts(settings, "postgres"), "t")
    finally:
        server.stop()


def test_pid_file_status_is_read_without_following_a_link_or_blocking(tmp_path: Path) -> None:
    """The private server's readiness hint reads the staged copy's postmaster.pid: a FIFO
    must not block, a symlink is not followed, a short file gives nothing."""
    data = tmp_path / "data"
    data.mkdir()
    assert localpg._pid_file_status(data) is None
    outside = tmp_path / "pid-elsewhere"
    outside.write_text("1\n/d\n1\n5432\n/tmp\n\n1 2\nready   \n")
    (data / "postmaster.pid").symlink_to(outside)
    assert localpg._pid_file_status(data) is None
    (data / "postmaster.pid").unlink()
    os.mkfifo(data / "postmaster.pid")
    found: list[str | None] = []
    _within(WALK_TIMEOUT_S, lambda: found.append(localpg._pid_file_status(data)))
    assert found == [None]
    (data / "postmaster.pid").unlink()
    (data / "postmaster.pid").write_text("1\n/d\n1\n5432\n")
    assert localpg._pid_file_status(data) is None
    shutil.copy(outside, data / "postmaster.pid")
    assert localpg._pid_file_status(data) == "ready"


def test_a_lock_file_in_the_archive_is_removed_at_extraction(tmp_path: Path) -> None:
    """pg_basebackup never includes postmaster.pid; one planted in the archive (claiming a
    ready server with a live PID) must not reach the private server, whose own pid file
    says when it is ready."""
    archive = tmp_path / "base.tar"
    with tarfile.open(archive, mode="w") as tar:
        for name in (*physical.REQUIRED_MEMBERS, "postmaster.pid"):
            body = b"1\n/d\n1\n5432\n/tmp\n\n1 2\nready   \n" if name == "postmaster.pid" else b"x"
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
    target = tmp_path / "copy"
    target.mkdir()
    physical.extract_base_backup(lambda sink: sink(memoryview(archive.read_bytes())), target)
    assert not (target / "postmaster.pid").exists()
    assert localpg._pid_file_status(target) is None
    assert (target / "backup_label").read_bytes() == b"x"


@pytest.mark.integration
def test_private_server_is_found_ready_without_its_pid_file_status(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Where the pid file cannot be read (another user, an older server) readiness falls
    back to connecting, as before; with it, no connection is needed to know."""
    bin_dir = find_server_bin_dir(None)
    work = Path(tempfile.mkdtemp(prefix="rag-test-ready-"))
    work.chmod(0o755)  # the postgres user (the server, when the tests run as root) enters
    tried: list[str] = []
    real_psql = localpg.psql_value

    def psql(settings: PostgresSettings, sql: str, database: str) -> str:
        tried.append(sql)
        return real_psql(settings, sql, database)

    monkeypatch.setattr(localpg, "psql_value", psql)
    # Broken readiness fails here within a minute instead of the operator's 600 s.
    bounded = functools.partialmethod(localpg.LocalPostgres._wait_ready, timeout_s=READY_BOUND_S)
    monkeypatch.setattr(localpg.LocalPostgres, "_wait_ready", bounded)
    try:
        for readable in (True, False):
            tried.clear()
            if not readable:
                monkeypatch.setattr(localpg, "_pid_file_status", lambda data_dir: None)
            server = LocalPostgres(bin_dir, work, 1)
            try:
                assert psql_value(server.settings, "SELECT 1", "postgres") == "1"
            finally:
                server.stop()
            assert ("SELECT 1" in tried) is not readable
    finally:
        shutil.rmtree(work, ignore_errors=True)
