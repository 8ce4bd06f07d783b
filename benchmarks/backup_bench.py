"""Benchmark: the plan's backup scripts vs rag-backup, on the same data in the same run.

Generates a reference dataset (default 1 GiB across PostgreSQL and a Chroma-like directory,
plus a Redis dataset of about 5% of that), then times:

  plan backup   pg_dump | gzip > f; gpg f   tar czf; gpg   redis-cli --rdb; gpg  (one by one)
  plan restore  gpg -d | gunzip | psql (fresh db)   gpg -d | tar xzf   gpg -d > dump.rdb
  rag-backup    backup; restore --yes (verify, stage, check, swap, Redis AOF check included)
                in three configurations: A logical dump only (restore --pg-mode logical),
                B --pg-physical (dump + base backup; restore --pg-mode physical), C
                --pg-physical --no-pg-logical (base backup only; restore --pg-mode physical)

and prints times, sizes and ratios. Usage:
  ./venv/bin/python benchmarks/backup_bench.py [--size-mb 1024] [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.servers import RedisServer, start_postgres, start_redis  # noqa: E402

DATABASE = "rag_feedback"
# Shaped like the deployed key (StackSecrets: 64 random characters), which decides gpg's
# stretching per file (rag_backup/crypto.py); generated per run, throwaway data.
PASSPHRASE = secrets.token_urlsafe(48)


def sh_pipeline(
    commands: Sequence[Sequence[str]], env: dict[str, str], stdout_path: Path | None = None
) -> None:
    """Run cmd1 | cmd2 | ... (argv lists, no shell); fail loudly if any step fails."""
    procs: list[subprocess.Popen[bytes]] = []
    previous = None
    out_file = open(stdout_path, "wb") if stdout_path else None  # noqa: SIM115
    try:
        for index, argv in enumerate(commands):
            last = index == len(commands) - 1
            proc = subprocess.Popen(
                list(argv),
                stdin=previous,
                stdout=(out_file if out_file else subprocess.DEVNULL) if last else subprocess.PIPE,
                env=env,
            )
            if previous is not None:
                previous.close()
            previous = proc.stdout
            procs.append(proc)
        for proc in procs:
            if proc.wait() != 0:
                raise SystemExit(f"benchmark step failed: {proc.args!r}")
    finally:
        if out_file:
            out_file.close()


def timed(label: str, func: object, *, settle: bool = True) -> float:
    """Time one step. ``settle``: first write back the page cache the previous step left
    dirty (os.sync, not timed), so no step pays for its predecessor's writes; the plan's
    steps and rag-backup's alike."""
    if settle:
        os.sync()
    started = time.monotonic()
    func()  # type: ignore[operator]
    elapsed = time.monotonic() - started
    print(f"  {label:<34} {elapsed:8.2f} s", flush=True)
    return elapsed


def dir_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def generate_postgres(server_psql: object, mb: int) -> None:
    psql = server_psql
    # About half text (compressible), half embedding bytes (not), like a RAG database.
    text_rows = max(1000, mb * 1024 * 1024 // 2 // 330)
    emb_rows = max(1000, mb * 1024 * 1024 // 2 // 1560)
    psql(f"CREATE DATABASE {DATABASE}")  # type: ignore[operator]
    psql(  # type: ignore[operator]
        f"""
        CREATE TABLE feedback (id bigint PRIMARY KEY, question text, answer text,
                               rating int, created_at timestamptz);
        INSERT INTO feedback
          SELECT g, 'How do I ' || md5(g::text) || '?',
                 'You can ' || md5((g * 7)::text) || ' then ' || md5((g * 13)::text)
                   || ' because the document says ' || md5((g * 31)::text) || '. '
                   || repeat('See section ' || (g % 97) || '. ', 4),
                 g % 5, timestamptz '2025-01-01' + g * interval '1 second'
          FROM generate_series(1, {text_rows}) g;
        CREATE INDEX feedback_created ON feedback (created_at);
        CREATE TABLE chunk_embeddings (id bigint PRIMARY KEY, doc_id int, embedding bytea);
        INSERT INTO chunk_embeddings
          SELECT g, g / 20, (SELECT decode(string_agg(md5(g::text || '-' || i), ''), 'hex')
                             FROM generate_series(1, 96) i)
          FROM generate_series(1, {emb_rows}) g;
        ANALYZE;
        """,  # noqa: S608 - generated benchmark SQL
        database=DATABASE,
    )


def generate_chroma(directory: Path, mb: int) -> None:
    rng = random.Random(42)
    directory.mkdir(parents=True)
    conn = sqlite3.connect(directory / "chroma.sqlite3")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE embeddings (id INTEGER PRIMARY KEY, segment TEXT, vector BLOB)")
    conn.execute("CREATE TABLE documents (id INTEGER PRIMARY KEY, content TEXT)")
    sqlite_bytes = mb * 1024 * 1024 * 6 // 10
    rows = sqlite_bytes // 2 // 1536
    words = [f"word{i}" for i in range(5000)]
    batch_size = 5000
    for start in range(0, rows, batch_size):
        count = min(batch_size, rows - start)
        conn.executemany(
            "INSERT INTO embeddings VALUES (?, ?, ?)",
            [(start + i, "seg-a", rng.randbytes(1536)) for i in range(count)],
        )
        conn.executemany(
            "INSERT INTO documents VALUES (?, ?)",
            [(start + i, " ".join(rng.choices(words, k=220))) for i in range(count)],
        )
    conn.commit()
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    index_bytes = mb * 1024 * 1024 * 4 // 10
    for n, segment in enumerate(("5a1e-hnsw", "77b2-hnsw")):
        seg = directory / segment
        seg.mkdir()
        with open(seg / "data_level0.bin", "wb") as handle:
            remaining = index_bytes // 2
            while remaining > 0:
                chunk = min(remaining, 8 << 20)
                handle.write(rng.randbytes(chunk))
                remaining -= chunk
        (seg / "header.bin").write_bytes(rng.randbytes(100))
        (seg / "length.bin").write_bytes(bytes(4000 * (n + 1)))
        (seg / "link_lists.bin").write_bytes(bytes(20000))


def generate_redis(server: RedisServer, mb: int) -> None:
    client = server.client()
    rng = random.Random(1)
    pipe = client.pipeline(transaction=False)  # type: ignore[attr-defined]
    values = max(1000, mb * 1024 * 1024 // 1024)
    for i in range(values):
        pipe.set(f"cache:answer:{i}", f"cached answer {i} " * 20 + rng.randbytes(400).hex())
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size-mb", type=int, default=1024, help="PostgreSQL + Chroma size (MiB)")
    parser.add_argument("--work-dir", type=Path, default=None)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="rag-backup-bench-", dir=args.work_dir))
    pg = start_postgres(root)
    redis_data = root / "redis-data"
    redis = start_redis(
        redis_data, extra_args=["--appendonly", "yes", "--repl-diskless-sync-delay", "0"]
    )
    servers: list[object] = [pg, redis]
    try:
        pg_mb = args.size_mb * 6 // 10
        chroma_mb = args.size_mb - pg_mb
        print(
            f"generating {args.size_mb} MiB reference data (PostgreSQL ~{pg_mb} MiB of rows, "
            f"Chroma ~{chroma_mb} MiB, Redis ~{args.size_mb // 20} MiB)",
            flush=True,
        )
        generate_postgres(pg.psql, pg_mb)
        chroma_dir = root / "chroma"
        generate_chroma(chroma_dir, chroma_mb)
        generate_redis(redis, max(1, args.size_mb // 20))
        db_size = int(pg.psql(f"SELECT pg_database_size('{DATABASE}')").strip())
        info = redis.client().info("memory")  # type: ignore[attr-defined]
        print(f"  PostgreSQL database: {db_size / 2**20:.0f} MiB (with indexes)")
        print(f"  Chroma directory:    {dir_size(chroma_dir) / 2**20:.0f} MiB")
        print(f"  Redis used memory:   {int(info['used_memory']) / 2**20:.0f} MiB")

        key_file = root / "backup.key"
        key_file.write_text(PASSPHRASE + "\n")
        key_file.chmod(0o600)
        redis_pw = root / "redis.pw"
        redis_pw.write_text(str(redis.password))
        env = {
            **os.environ,
            **pg.env(DATABASE),
            "REDIS_URL": redis.url_without_password,
            "REDIS_PASSWORD_FILE": str(redis_pw),
            "REDISCLI_AUTH": str(redis.password),
            "CHROMA_DIR": str(chroma_dir),
            "BACKUP_DIR": str(root / "rag-backups"),
            "RAG_BACKUP_KEY_FILE": str(key_file),
        }
        gnupg = root / "gnupg"
        gnupg.mkdir(mode=0o700)
        gpg = [
            "gpg",
            "--homedir",
            str(gnupg),
            "--batch",
            "--yes",
            "--pinentry-mode",
            "loopback",
            "--passphrase-file",
            str(key_file),
        ]
        plan = root / "plan"
        plan.mkdir()
        redis_cli = ["redis-cli", "-h", redis.host, "-p", str(redis.port), "--no-auth-warning"]

        print("plan's method (sequential, as the plan's scripts):", flush=True)

        def plan_backup() -> None:
            sh_pipeline([["pg_dump"], ["gzip"]], env, plan / "pg.sql.gz")
            subprocess.run(
                [
                    *gpg,
                    "--symmetric",
                    "--cipher-algo",
                    "AES256",
                    "-o",
                    str(plan / "pg.sql.gz.gpg"),
                    str(plan / "pg.sql.gz"),
                ],
                check=True,
                env=env,
            )
            subprocess.run(
                ["tar", "czf", str(plan / "chroma.tar.gz"), "-C", str(root), "chroma"], check=True
            )
            subprocess.run(
                [
                    *gpg,
                    "--symmetric",
                    "--cipher-algo",
                    "AES256",
                    "-o",
                    str(plan / "chroma.tar.gz.gpg"),
                    str(plan / "chroma.tar.gz"),
                ],
                check=True,
            )
            subprocess.run(
                [*redis_cli, "--rdb", str(plan / "dump.rdb")],
                check=True,
                env=env,
                capture_output=True,
            )
            subprocess.run(
                [
                    *gpg,
                    "--symmetric",
                    "--cipher-algo",
                    "AES256",
                    "-o",
                    str(plan / "dump.rdb.gpg"),
                    str(plan / "dump.rdb"),
                ],
                check=True,
            )
            for name in ("pg.sql.gz", "chroma.tar.gz", "dump.rdb"):
                (plan / name).unlink()  # the plan deletes its plaintext intermediates

        plan_backup_s = timed("backup", plan_backup)
        plan_size = sum(p.stat().st_size for p in plan.iterdir())

        plan_restore_dir = root / "plan-restore"
        plan_restore_dir.mkdir()

        def plan_restore() -> None:
            pg.psql("CREATE DATABASE plan_restore")
            sh_pipeline(
                [
                    [*gpg, "-d", str(plan / "pg.sql.gz.gpg")],
                    ["gunzip"],
                    ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", "plan_restore"],
                ],
                env,
            )
            sh_pipeline(
                [
                    [*gpg, "-d", str(plan / "chroma.tar.gz.gpg")],
                    ["tar", "xzf", "-", "-C", str(plan_restore_dir)],
                ],
                env,
            )
            subprocess.run(
                [*gpg, "-d", "-o", str(plan_restore_dir / "dump.rdb"), str(plan / "dump.rdb.gpg")],
                check=True,
                capture_output=True,
            )

        plan_restore_s = timed("restore", plan_restore)
        pg.psql("DROP DATABASE plan_restore")
        shutil.rmtree(plan_restore_dir)

        print("rag-backup:", flush=True)
        cli = [sys.executable, "-m", "rag_backup"]
        env_ours = {k: v for k, v in env.items() if k != "REDISCLI_AUTH"}

        def run_ours(args: list[str]) -> str:
            """Run the CLI; returns its stdout (the backup id)."""
            result = subprocess.run(
                [*cli, *args], check=False, env=env_ours, cwd=REPO, capture_output=True, text=True
            )
            if result.returncode != 0:
                raise SystemExit(f"rag-backup {args[0]} failed: {result.stderr[-2000:]}")
            return result.stdout.strip()

        def backup_size(backup_id: str) -> int:
            return sum(
                p.stat().st_size
                for p in (root / "rag-backups" / backup_id).iterdir()
                if p.name.endswith((".gpg", ".age"))
            )

        ids: dict[str, str] = {}

        def ours_backup_logical() -> None:
            ids["logical"] = run_ours(["backup", "--quiet"])

        def ours_backup_physical() -> None:
            ids["physical"] = run_ours(["backup", "--quiet", "--pg-physical"])

        def ours_backup_physical_only() -> None:
            ids["physical_only"] = run_ours(
                ["backup", "--quiet", "--pg-physical", "--no-pg-logical"]
            )

        backup_logical_s = timed("backup (logical dump only)", ours_backup_logical)
        backup_physical_s = timed("backup --pg-physical (dump + base)", ours_backup_physical)
        manifest = json.loads(
            (root / "rag-backups" / ids["physical"] / "manifest.json").read_text()
        )
        for artifact in manifest["components"]["postgres"]["artifacts"]:
            print(f"    {artifact['name']:<32} {artifact['size'] / 2**20:8.1f} MiB")
        backup_physical_only_s = timed(
            "backup --no-pg-logical (base only)", ours_backup_physical_only
        )
        size_logical = backup_size(ids["logical"])
        size_physical = backup_size(ids["physical"])
        size_physical_only = backup_size(ids["physical_only"])
        redis.stop()  # the documented restore procedure stops Redis first

        timings: dict[str, str] = {}

        def restore_cmd(backup_id: str, *extra: str) -> list[str]:
            return ["restore", backup_id, "--yes", "--redis-data-dir", str(redis_data), *extra]

        def capture_timings(label: str, stderr: str) -> None:
            lines = [line for line in stderr.splitlines() if "timings:" in line]
            timings[label] = lines[-1].split("timings:", 1)[1].strip() if lines else "?"

        # Physical first: the cluster then holds no _pre_restore_ copy from the logical one.
        pg.shutdown()  # the operator stops PostgreSQL (and Redis) for a physical restore

        def ours_restore_physical() -> None:
            stderr = run_ours_stderr(
                restore_cmd(
                    ids["physical"], "--pg-mode", "physical", "--pg-data-dir", str(pg.data_dir)
                )
            )
            capture_timings("physical", stderr)

        def run_ours_stderr(args: list[str]) -> str:
            result = subprocess.run(
                [*cli, *args],
                check=False,
                env=env_ours,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            if result.returncode != 0:
                raise SystemExit(f"rag-backup {args[0]} failed: {result.stderr[-2000:]}")
            return result.stderr

        restore_physical_s = timed("restore --pg-mode physical (B)", ours_restore_physical)
        pg_start_s = timed("  + start PostgreSQL afterwards", pg.start_again, settle=False)
        restore_physical_total_s = restore_physical_s + pg_start_s

        def ours_restore_physical_only() -> None:
            stderr = run_ours_stderr(
                restore_cmd(
                    ids["physical_only"],
                    "--pg-mode",
                    "physical",
                    "--pg-data-dir",
                    str(pg.data_dir),
                )
            )
            capture_timings("phys-only", stderr)

        # Same starting state as B's restore: one live copy of each store, nothing kept aside
        # (B's rollback copies are removed, untimed).
        for kept in (
            pg.data_dir.parent / f"{pg.data_dir.name}.pre-restore-{ids['physical']}",
            chroma_dir / f".rag-pre-restore-{ids['physical']}",
            redis_data / f"rag-pre-restore-{ids['physical']}",
        ):
            shutil.rmtree(kept)
        pg.shutdown()
        restore_physical_only_s = timed(
            "restore --pg-mode physical (C)", ours_restore_physical_only
        )
        pg_start_only_s = timed("  + start PostgreSQL afterwards", pg.start_again, settle=False)
        restore_physical_only_total_s = restore_physical_only_s + pg_start_only_s

        def ours_restore_logical() -> None:
            capture_timings("logical", run_ours_stderr(restore_cmd(ids["logical"])))

        restore_logical_s = timed("restore (logical, PG running)", ours_restore_logical)

        def ours_drill() -> None:
            run_ours(["drill", "--quiet", ids["physical"]])

        drill_s = timed("drill (both PG artifacts)", ours_drill)

        def ours_drill_physical_only() -> None:
            run_ours(["drill", "--quiet", ids["physical_only"]])

        drill_physical_only_s = timed("drill (C, base backup only)", ours_drill_physical_only)
        print("restore phases (rag-backup's own timings; staging runs in parallel):")
        for label, line in timings.items():
            print(f"  {label:<9}: {line}")

        def ratio_line(what: str, plan_s: float, ours_s: float, target: float) -> str:
            speed_up = plan_s / ours_s
            verdict = "met" if speed_up >= target else "MISSED"
            return (
                f"  {what:<30} plan {plan_s:7.2f} s  rag-backup {ours_s:7.2f} s  "
                f"speed-up {speed_up:5.2f}x (target >= {target:g}x: {verdict})"
            )

        def size_line(what: str, ours: int) -> str:
            ratio = ours / plan_size
            verdict = "met" if ratio <= 1 else "MISSED"
            return (
                f"  {what:<30} plan {plan_size / 2**20:7.1f} MiB rag-backup "
                f"{ours / 2**20:7.1f} MiB ratio {ratio:5.3f} (target <= 1: {verdict})"
            )

        print("results, configuration A (default: logical dump; restore --pg-mode logical):")
        print(ratio_line("backup", plan_backup_s, backup_logical_s, 5))
        print(ratio_line("restore", plan_restore_s, restore_logical_s, 3))
        print(size_line("size", size_logical))
        print(
            "results, configuration B (--pg-physical: dump + base backup; restore "
            "--pg-mode physical, PostgreSQL stopped, time incl. its start):"
        )
        print(ratio_line("backup", plan_backup_s, backup_physical_s, 5))
        print(ratio_line("restore", plan_restore_s, restore_physical_total_s, 3))
        print(size_line("size", size_physical))
        print(f"  drill (B, both PG artifacts + redis + chroma): {drill_s:.2f} s")
        print(
            "results, configuration C (--pg-physical --no-pg-logical: base backup only, the "
            "daily backup when the portable dump is weekly; restore --pg-mode physical, "
            "PostgreSQL stopped, time incl. its start):"
        )
        print(ratio_line("backup", plan_backup_s, backup_physical_only_s, 5))
        print(ratio_line("restore", plan_restore_s, restore_physical_only_total_s, 3))
        print(size_line("size", size_physical_only))
        print(f"  drill (C, base backup + redis + chroma): {drill_physical_only_s:.2f} s")
        return 0
    finally:
        for server in servers:
            server.stop()  # type: ignore[attr-defined]
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
