"""Benchmark: rag-backup's PostgreSQL backup, restore, RPO and point-in-time restore side by
side with pgBackRest (issue 14 item 4), on the same data, same server, same run.

One PostgreSQL 15 (full_page_writes on) archives its WAL to both at once: rag-backup
(``wal-archive``: pg_receivewal over a slot, zstd + gpg per segment) and pgBackRest
(``archive_command = pgbackrest archive-push``; repo cipher aes-256-cbc, zstd level 3,
process-max 2). Then, timed:

  backup        rag-backup backup --pg-physical --no-pg-logical --components postgres
                pgbackrest backup --type=full
  RPO           a commit, then how long until its WAL is archived, encrypted, at rest:
                rag-backup: one wal-archive cycle (pg_switch_wal, receive, encrypt, fsync);
                pgBackRest: pg_switch_wal() until pg_stat_archiver reports the segment pushed.
                Each sample after a burst of writes. The schedule adds up to one interval
                (rag-backup's cycle every minute; archive_timeout=60 for pgBackRest).
  RPO off-host  a commit, then how long until its WAL is archived, encrypted, at rest AND
                copied off-host and read back (size, SHA-256): one wal-archive cycle, then
                ``offsite wal-push`` to a real chrooted SFTP-only sshd on loopback (rclone),
                as the scheduler runs them. rag-backup only (pgBackRest: no off-host here).
  restore       to a writable server (PostgreSQL started, recovery done, checks included):
                rag-backup restore --pg-mode physical (newest base backup);
                pgbackrest restore --type=immediate --target-action=promote
  PITR restore  both to the same target time between two marker rows, to a writable
                server; each must show the earlier marker and not the later one.

Backups and restores run ``--rounds`` times each, the two tools alternating (the machine is
shared: only ratios from the same interleaved run mean anything); it prints every round,
the medians, the paired ratios (median, min, max; < 1: rag-backup faster) and the median of
each phase of rag-backup's restore (its own timings: the pipeline's CPU per process, fsync,
server start and WAL replay, row counts, ...). Usage:
  ./venv/bin/python benchmarks/pitr_bench.py [--size-mb 256] [--rounds 3] [--rpo-samples 5]
      [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import compileall
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from backup_bench import DATABASE, PASSPHRASE, generate_postgres  # noqa: E402

from rag_backup import wal  # noqa: E402
from rag_backup.crypto import Cipher, CipherSettings  # noqa: E402
from rag_backup.progress import Progress  # noqa: E402
from rag_backup.store import BackupStore  # noqa: E402
from tests.servers import (  # noqa: E402
    PostgresServer,
    free_port,
    start_postgres,
    stop_process,
    wait_listening,
)
from tests.tooling import require_tool  # noqa: E402

STANZA = "bench"
POSTGRES_ONLY = ("--components", "postgres")
WAL_INTERVAL_S = 60  # rag-backup's scheduler cycle; pgBackRest gets archive_timeout = this
# Every restored server, either tool's: archiving off (a restored copy must not push into
# the repository) and fsync on (the test server's fsync=off would spare pgBackRest's replay
# the syncs rag-backup's private recovery server does).
RESTORED_SETTINGS = ("-c", "archive_mode=off", "-c", "fsync=on")
POSTGRES_RUN_AS: dict[str, Any] = (
    {"user": "postgres", "group": "postgres", "extra_groups": []} if os.geteuid() == 0 else {}
)


def timed(label: str, func: Callable[[], object]) -> float:
    os.sync()  # no step pays for the page cache its predecessor left dirty
    started = time.monotonic()
    func()
    elapsed = time.monotonic() - started
    print(f"  {label:<56} {elapsed:8.2f} s", flush=True)
    return elapsed


OURS = "rag-backup"
THEIRS = "pgBackRest"
Step = tuple[str, Callable[[], object]]


def interleaved(
    rounds: int,
    steps: dict[str, Step],
    cleanup: dict[str, Callable[[], None]] | None = None,
) -> dict[str, list[float]]:
    """Each round times every tool's step once, the order alternating between rounds, so
    the shared machine's busy and quiet moments fall on both; ``cleanup`` (untimed) runs
    after each step. Only ratios within the same run mean anything here. Every step starts
    with nothing of an earlier step left to write back (os.sync, untimed): otherwise the
    first restore after the backups paid for their write-back (rag-backup's first round
    ran 1.3-1.5x its others, whichever tool went first)."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for index in range(rounds):
        for name in names if index % 2 == 0 else names[::-1]:
            label, step = steps[name]
            os.sync()
            times[name].append(timed(f"round {index + 1}: {name} {label}", step))
            if cleanup and name in cleanup:
                cleanup[name]()
    return times


def ratio_line(what: str, times: dict[str, list[float]], target: float) -> str:
    """Medians of each tool, and the ratios of the rounds (each round's rag-backup time over
    its pgBackRest time): median, min and max."""
    ours, theirs = times[OURS], times[THEIRS]
    paired = sorted(a / b for a, b in zip(ours, theirs, strict=True))
    value = statistics.median(paired)
    verdict = "met" if value <= target else "MISSED"
    return (
        f"  {what:<26} rag-backup {statistics.median(ours):6.2f} s  pgBackRest "
        f"{statistics.median(theirs):6.2f} s (medians)  ratio median {value:4.2f} "
        f"[min {paired[0]:4.2f}, max {paired[-1]:4.2f}, {len(paired)} rounds] "
        f"(target <= {target:g}: {verdict})"
    )


def restore_timings(output: str) -> dict[str, float]:
    """rag-backup restore's own ``timings:`` line as {step: seconds}."""
    lines = [line for line in output.splitlines() if "timings:" in line]
    if not lines:
        raise SystemExit(f"rag-backup restore printed no timings: {output[-2000:]}")
    steps: dict[str, float] = {}
    for item in lines[-1].split("timings:", 1)[1].split(", "):
        name, _, seconds = item.strip().rpartition(" ")
        steps[name] = float(seconds.rstrip("s"))
    return steps


def print_phases(title: str, rounds: list[dict[str, float]]) -> None:
    """Median of every step over the rounds; the pipeline's stages run at the same time, so
    they are CPU seconds of each process ("cpu ..."), the others wall seconds."""
    print(f"{title} phases, median of {len(rounds)} rounds (its own timings):")
    skip = ("checks", "stage postgres", "staging (parallel)")
    for name in rounds[0]:
        if name in skip or not all(name in r for r in rounds):
            continue
        values = [r[name] for r in rounds]
        unit = "CPU-s" if name.startswith("postgres: cpu") else "s"
        shown = ", ".join(f"{v:.2f}" for v in values)
        print(f"  {name:<50} {statistics.median(values):6.2f} {unit:<5} ({shown})")


def chown_postgres(*paths: Path) -> None:
    if POSTGRES_RUN_AS:
        for path in paths:
            shutil.chown(path, "postgres", "postgres")


def postgres_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    chown_postgres(path)
    return path


def run(argv: list[str], env: dict[str, str], as_postgres: bool = False) -> str:
    result = subprocess.run(
        argv,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO,
        **(POSTGRES_RUN_AS if as_postgres else {}),
    )
    if result.returncode != 0:
        raise SystemExit(f"benchmark step failed: {argv[:4]}...: {result.stderr[-2000:]}")
    return result.stdout + result.stderr


def write_load(pg: PostgresServer, mb: int) -> None:
    """About ``mb`` MiB of WAL: inserts of incompressible-ish rows."""
    rows = max(1, mb * 1024 * 1024 // 1100)
    pg.psql(
        "INSERT INTO load (body) SELECT md5(g::text) || repeat(md5(random()::text), 30) "  # noqa: S608
        f"FROM generate_series(1, {rows}) g",
        database=DATABASE,
    )


def wait_pushed(pg: PostgresServer, segment: str, timeout: float = 300) -> None:
    """Until the server's archiver (pgbackrest archive-push) has stored ``segment``."""
    deadline = time.monotonic() + timeout
    while pg.psql("SELECT last_archived_wal FROM pg_stat_archiver").strip() < segment:
        if time.monotonic() > deadline:
            failed = pg.psql("SELECT last_failed_wal, failed_count FROM pg_stat_archiver")
            raise SystemExit(f"pgbackrest archive-push did not store {segment}: {failed}")
        time.sleep(0.01)


def mark(pg: PostgresServer, name: str) -> None:
    """A committed marker row (names are this script's literals)."""
    pg.psql(f"INSERT INTO markers VALUES ('{name}', now())", database=DATABASE)  # noqa: S608


def wait_writable(port: int, env: dict[str, str], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    argv = [require_tool("psql"), "-X", "-At", "-h", "127.0.0.1", "-p", str(port)]
    argv += ["-d", DATABASE, "-c", "SELECT pg_is_in_recovery()"]
    while time.monotonic() < deadline:
        result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if result.returncode == 0 and result.stdout.strip() == "f":
            return
        time.sleep(0.05)
    raise SystemExit(f"server on port {port} not writable after {timeout:.0f} s")


def markers(port: int, env: dict[str, str]) -> list[str]:
    argv = [require_tool("psql"), "-X", "-At", "-h", "127.0.0.1", "-p", str(port)]
    argv += ["-d", DATABASE, "-c", "SELECT name FROM markers ORDER BY name"]
    return subprocess.run(argv, env=env, capture_output=True, text=True, check=True).stdout.split()


class RestoredServer:
    """A PostgreSQL started on a restored data directory, with the live server's settings
    and RESTORED_SETTINGS."""

    def __init__(self, template: PostgresServer, data_dir: Path, log: Path) -> None:
        self.port = free_port()
        args = list(template.start_args)
        args[args.index("-D") + 1] = str(data_dir)
        args = [a.replace(f"port={template.port}", f"port={self.port}") for a in args]
        args += [*RESTORED_SETTINGS]
        with open(log, "ab") as log_file:
            self.process = subprocess.Popen(
                args, stdout=log_file, stderr=subprocess.STDOUT, **POSTGRES_RUN_AS
            )
        wait_listening(self.port, self.process, log)

    def stop(self) -> None:
        stop_process(self.process, 2)


def pgbackrest_conf(root: Path, pg: PostgresServer, socket_dir: Path) -> Path:
    conf = root / "pgbackrest.conf"
    conf.write_text(
        "\n".join(
            [
                "[global]",
                f"repo1-path={postgres_dir(root / 'pgbr-repo')}",
                "repo1-cipher-type=aes-256-cbc",
                f"repo1-cipher-pass={PASSPHRASE}",
                "repo1-retention-full=2",
                "compress-type=zst",
                "compress-level=3",
                "process-max=2",
                "start-fast=y",
                f"log-path={postgres_dir(root / 'pgbr-log')}",
                f"lock-path={postgres_dir(root / 'pgbr-lock')}",
                f"spool-path={postgres_dir(root / 'pgbr-spool')}",
                "log-level-console=warn",
                "log-level-file=off",
                "",
                f"[{STANZA}]",
                f"pg1-path={pg.data_dir}",
                f"pg1-port={pg.port}",
                f"pg1-socket-path={socket_dir}",
                f"pg1-user={pg.user}",
                "",
            ]
        )
    )
    conf.chmod(0o600)
    chown_postgres(conf)
    return conf


def measure_offsite_rpo(
    pg: PostgresServer, cli: list[str], env: dict[str, str], root: Path, samples: int
) -> list[tuple[float, float]]:
    """RPO to the off-host copy (issue 14 item 4): per sample (after ~16 MiB of writes), a
    committed marker, then wal-archive and offsite wal-push back to back as the scheduler
    runs them, to a real SFTP-only sshd on loopback. Returns (at rest locally, verified
    off-host) seconds after the commit."""
    from tests.offsite.conftest import sftp_server

    print("RPO off-host samples (wal-archive + offsite wal-push to sshd on loopback):")
    with sftp_server(root / "sftp") as target:
        offsite_env = {**env, **target.env()}
        run([*cli, "offsite", "wal-push", "--quiet"], offsite_env)  # untimed: the backlog
        system = json.loads((root / "rag-backups" / "wal" / "index.json").read_text())
        assert target.files is not None
        remote_index = target.files / "wal" / str(system["system_identifier"]) / "index.json"
        results: list[tuple[float, float]] = []
        for sample in range(samples):
            write_load(pg, 16)
            mark(pg, f"offsite-rpo-{sample}")
            committed = time.time()
            run([*cli, "wal-archive", "--quiet"], env)
            at_rest = time.time() - committed
            run([*cli, "offsite", "wal-push", "--quiet"], offsite_env)
            off_host = time.time() - committed
            if json.loads(remote_index.read_text())["covered_until"] < committed:
                raise SystemExit("the off-host WAL index does not cover the commit")
            results.append((at_rest, off_host))
            print(f"  sample {sample}: at rest {at_rest:.2f} s, verified off-host {off_host:.2f} s")
    return results


def print_offsite_rpo(results: list[tuple[float, float]]) -> None:
    at_rest = [r[0] for r in results]
    off_host = [r[1] for r in results]
    print(
        f"  RPO off-host commit -> archived, encrypted, at rest AND verified off-host (SFTP): "
        f"median {statistics.median(off_host):.2f} s, max {max(off_host):.2f} s (at rest alone: "
        f"median {statistics.median(at_rest):.2f} s); worst case with the {WAL_INTERVAL_S} s "
        f"schedule {WAL_INTERVAL_S + max(off_host):.1f} s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=256, help="PostgreSQL data (MiB)")
    parser.add_argument("--rpo-samples", type=int, default=5)
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved runs of each backup and restore"
    )
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()
    pgbackrest = require_tool("pgbackrest")

    root = Path(tempfile.mkdtemp(prefix="rag-pitr-bench-", dir=args.work_dir))
    root.chmod(0o755)  # the postgres user runs pgBackRest in here
    conf = root / "pgbackrest.conf"
    pgbr = [pgbackrest, f"--config={conf}", f"--stanza={STANZA}"]
    pg = start_postgres(
        root,
        settings={
            "full_page_writes": "on",  # as deployed: both tools archive realistic WAL
            "archive_mode": "on",
            "archive_command": " ".join([*pgbr, "archive-push", "%p"]),
            "archive_timeout": str(WAL_INTERVAL_S),
            "max_wal_size": "1GB",
        },
    )
    servers: list[Any] = [pg]
    try:
        socket_dir = pg.root_dir  # start_postgres's unix_socket_directories
        pgbackrest_conf(root, pg, socket_dir)
        pgpass = root / "pgpass-postgres"
        pgpass.write_text(f"127.0.0.1:*:*:{pg.user}:{pg.password}\n")
        pgpass.chmod(0o600)
        chown_postgres(pgpass)
        # pgBackRest connects over the Unix socket: the same password, for its libpq.
        pgbr_env = {**os.environ, "PGPASSFILE": str(pgpass), "PGPASSWORD": pg.password}
        print(f"generating ~{args.size_mb} MiB of PostgreSQL data", flush=True)
        generate_postgres(pg.psql, args.size_mb)
        pg.psql("CREATE TABLE load (id bigserial PRIMARY KEY, body text)", database=DATABASE)
        pg.psql("CREATE TABLE markers (name text, at timestamptz)", database=DATABASE)
        size = int(pg.psql(f"SELECT pg_database_size('{DATABASE}')").strip())
        print(f"  database: {size / 2**20:.0f} MiB (with indexes)")
        print(f"  machine: {os.cpu_count()} cores, shared with other jobs (busy, noisy)")

        key_file = root / "backup.key"
        key_file.write_text(PASSPHRASE + "\n")
        key_file.chmod(0o600)
        env = {
            **os.environ,
            **pg.env(DATABASE),
            "BACKUP_DIR": str(root / "rag-backups"),
            "RAG_BACKUP_KEY_FILE": str(key_file),
            "PYTHONPATH": str(REPO),
        }
        # As the backup image does (docker/backup/Dockerfile): bytecode compiled once, so
        # no call pays for compiling modules (PYTHONDONTWRITEBYTECODE may be set here).
        compileall.compile_dir(REPO / "rag_backup", quiet=1)
        cli = [sys.executable, "-m", "rag_backup"]
        client_env = {**os.environ, "PGPASSFILE": str(pgpass), "PGUSER": pg.user}

        run([*pgbr, "stanza-create"], pgbr_env, as_postgres=True)
        run([*cli, "wal-archive", "--quiet"], env)  # the slot first: no gap from here on
        # Untimed: pgBackRest's archiver catches up on the data generation's WAL first (its
        # backup waits for the archive), so neither backup pays for the generation.
        segment = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())").strip()
        pg.psql("SELECT pg_switch_wal()")
        wait_pushed(pg, segment, timeout=1800)
        run([*cli, "wal-archive", "--quiet"], env)

        print(
            f"base backups (same data; {args.rounds} rounds, the two tools alternating):",
            flush=True,
        )
        ids: dict[str, str] = {}

        def ours_backup() -> None:
            ids["base"] = run(
                [*cli, "backup", "--quiet", "--pg-physical", "--no-pg-logical", *POSTGRES_ONLY],
                env,
            ).split()[0]

        first_segment = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())").strip()
        backups = interleaved(
            args.rounds,
            {
                OURS: ("backup --pg-physical --no-pg-logical", ours_backup),
                THEIRS: (
                    "backup --type=full",
                    lambda: run([*pgbr, "backup", "--type=full"], pgbr_env, as_postgres=True),
                ),
            },
        )
        ours_size = sum(p.stat().st_size for p in (root / "rag-backups" / ids["base"]).iterdir())
        pgbr_labels = sorted(
            d for d in (root / "pgbr-repo" / "backup" / STANZA).iterdir() if d.is_dir()
        )
        pgbr_size = sum(p.stat().st_size for p in pgbr_labels[-1].rglob("*") if p.is_file())
        print(
            f"  sizes: rag-backup {ours_size / 2**20:.1f} MiB, "
            f"pgBackRest {pgbr_size / 2**20:.1f} MiB"
        )

        print(
            f"RPO samples (after ~16 MiB of writes each; worst case adds the "
            f"{WAL_INTERVAL_S} s schedule to both):",
            flush=True,
        )
        ours_rpo: list[float] = []
        pgbr_rpo: list[float] = []
        for sample in range(args.rpo_samples):
            write_load(pg, 16)
            mark(pg, f"rpo-{sample}")
            committed = time.time()
            run([*cli, "wal-archive", "--quiet"], env)
            ours_rpo.append(time.time() - committed)
            index = json.loads((root / "rag-backups" / "wal" / "index.json").read_text())
            assert index["covered_until"] >= committed, "the commit is not archived"

            write_load(pg, 16)
            mark(pg, f"rpo-pgbr-{sample}")
            committed = time.time()
            segment = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())").strip()
            pg.psql("SELECT pg_switch_wal()")
            wait_pushed(pg, segment)
            pgbr_rpo.append(time.time() - committed)
            print(
                f"  sample {sample}: rag-backup {ours_rpo[-1]:.2f} s, "
                f"pgBackRest {pgbr_rpo[-1]:.2f} s"
            )
        offsite_rpo = measure_offsite_rpo(pg, cli, env, root, args.rpo_samples)
        pg.psql("DELETE FROM markers", database=DATABASE)

        # WAL to replay for PITR: a quarter of the database written after the base backups.
        write_load(pg, max(16, args.size_mb // 4))
        mark(pg, "before")
        time.sleep(1.0)
        target = time.time()
        time.sleep(1.0)
        mark(pg, "after")
        write_load(pg, 16)
        run([*cli, "wal-archive", "--quiet"], env)
        segment = pg.psql("SELECT pg_walfile_name(pg_current_wal_lsn())").strip()
        pg.psql("SELECT pg_switch_wal()")
        wait_pushed(pg, segment)
        # Milliseconds: the precision both accept (pgBackRest's --target format).
        target_at = dt.datetime.fromtimestamp(round(target, 3), dt.UTC)
        target_iso = target_at.isoformat(timespec="milliseconds")
        target_pgbr = (
            target_at.strftime("%Y-%m-%d %H:%M:%S.") + f"{target_at.microsecond // 1000:03d}+00"
        )
        pg.shutdown()

        print(
            f"restores to a writable server (PostgreSQL started, recovery done; "
            f"{args.rounds} rounds, the two tools alternating):",
            flush=True,
        )
        restore_root = postgres_dir(root / "restores")
        # What each PITR copy holds: checked after the rounds, read untimed after each one.
        found_markers: list[tuple[str, list[str]]] = []
        restored: list[RestoredServer] = []

        def pgbr_restore(name: str, *target_args: str) -> None:
            data = postgres_dir(restore_root / name)
            run(
                [*pgbr, f"--pg1-path={data}", "restore", *target_args, "--target-action=promote"],
                pgbr_env,
                as_postgres=True,
            )
            server = RestoredServer(pg, data, restore_root / f"{name}.log")
            servers.append(server)
            restored.append(server)
            wait_writable(server.port, client_env)

        def pgbr_cleanup() -> None:
            server = restored.pop()
            if (restore_root / "pgbr-pitr").exists():
                found_markers.append((THEIRS, markers(server.port, client_env)))
            server.stop()
            for name in ("pgbr-full", "pgbr-pitr"):
                shutil.rmtree(restore_root / name, ignore_errors=True)

        pg.start_args += [*RESTORED_SETTINGS]
        physical = ["--components", "postgres", "--pg-mode", "physical", "--yes"]
        physical += ["--pg-data-dir", str(pg.data_dir)]
        phases: dict[str, list[dict[str, float]]] = {"full": [], "pitr": []}

        def ours_restore(label: str, *target_args: str) -> None:
            started = time.monotonic()
            out = run([*cli, "restore", *physical, *target_args], env)
            ran = time.monotonic() - started
            pg.start_again()
            wait_writable(pg.port, client_env)
            steps = restore_timings(out)
            # Outside rag-backup's own timings: the interpreter's start and exit, and the
            # live server's start on the swapped-in copy (what the operator runs next).
            steps["python start + exit"] = ran - steps.get("total", ran)
            steps["live server start (writable)"] = time.monotonic() - started - ran
            phases[label].append(steps)

        def ours_cleanup() -> None:
            if phases["pitr"]:
                found_markers.append((OURS, markers(pg.port, client_env)))
            pg.shutdown()
            for kept in pg.data_dir.parent.glob(f"{pg.data_dir.name}.pre-restore-*"):
                shutil.rmtree(kept)  # the same starting state for every restore

        restores = interleaved(
            args.rounds,
            {
                OURS: (
                    "restore --pg-mode physical",
                    lambda: ours_restore("full", ids["base"]),
                ),
                THEIRS: (
                    "restore --type=immediate",
                    lambda: pgbr_restore("pgbr-full", "--type=immediate"),
                ),
            },
            cleanup={OURS: ours_cleanup, THEIRS: pgbr_cleanup},
        )
        pitrs = interleaved(
            args.rounds,
            {
                OURS: (
                    "restore --target-time (PITR)",
                    lambda: ours_restore("pitr", "--target-time", target_iso),
                ),
                THEIRS: (
                    "restore --type=time (PITR)",
                    lambda: pgbr_restore("pgbr-pitr", "--type=time", f"--target={target_pgbr}"),
                ),
            },
            cleanup={OURS: ours_cleanup, THEIRS: pgbr_cleanup},
        )
        if len(found_markers) != 2 * args.rounds:
            raise SystemExit(f"PITR markers read {len(found_markers)} times, not {2 * args.rounds}")
        for tool, found in found_markers:
            if found != ["before"]:
                raise SystemExit(f"{tool}'s PITR copy has markers {found}, expected ['before']")
        print("  every PITR copy: marker 'before' present, 'after' absent")
        for label, title in (("full", "restore"), ("pitr", "PITR restore")):
            print_phases(f"rag-backup {title}", phases[label])

        print("where rag-backup's PITR staging goes: decrypting the archived WAL again,")
        staged: dict[int, float] = {}
        with Cipher(CipherSettings("gpg", key_file=key_file)) as cipher:
            for jobs in (1, 2):
                target_dir = Path(tempfile.mkdtemp(dir=root))

                def stage(jobs: int = jobs, target_dir: Path = target_dir) -> None:
                    staged[jobs] = wal.stage_segments(
                        BackupStore(root / "rag-backups"),
                        cipher,
                        first_segment,
                        target_dir,
                        Progress(enabled=False),
                        jobs,
                    )

                label = f"{'one at a time' if jobs == 1 else f'{jobs} at a time (as restore does)'}"
                staged_s = timed(f"  segments {label}", stage)
                print(
                    f"    {staged[jobs]} segments, {staged_s / staged[jobs]:.2f} s each on average"
                )
                shutil.rmtree(target_dir)

        print(
            f"results ({size / 2**20:.0f} MiB database, {args.rounds} interleaved rounds; "
            "ratio = rag-backup / pgBackRest, median of the rounds' paired ratios):"
        )
        print(ratio_line("backup (full / base)", backups, 1))
        print(ratio_line("restore to writable", restores, 1))
        print(ratio_line("PITR restore to writable", pitrs, 1.2))
        for name, samples in (("rag-backup", ours_rpo), ("pgBackRest", pgbr_rpo)):
            print(
                f"  RPO {name:<11} commit -> archived, encrypted, at rest: median "
                f"{statistics.median(samples):.2f} s, max {max(samples):.2f} s; worst case "
                f"with the {WAL_INTERVAL_S} s schedule {WAL_INTERVAL_S + max(samples):.1f} s"
            )
        print_offsite_rpo(offsite_rpo)
        return 0
    finally:
        for server in servers:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
