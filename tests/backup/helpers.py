"""Seeding and snapshotting the three data stores, and running the CLI as a process."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from tests.servers import PostgresServer, RedisServer

REPO = Path(__file__).resolve().parents[2]
DATABASE = "rag_feedback"
CLI_TIMEOUT_S = 180


def run_cli(
    args: list[str], env: dict[str, str], timeout: float = CLI_TIMEOUT_S
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rag_backup", *args],
        cwd=REPO,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def start_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "rag_backup", *args],
        cwd=REPO,
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        stdin=subprocess.DEVNULL,
    )


def seed_postgres(server: PostgresServer, rows: int = 2000) -> None:
    server.psql(f"CREATE DATABASE {DATABASE}")
    server.psql(
        f"""
        CREATE TABLE feedback (
            id serial PRIMARY KEY, question text NOT NULL, answer text, rating int,
            created_at timestamptz NOT NULL DEFAULT '2025-01-01T00:00:00Z'
        );
        CREATE INDEX feedback_rating ON feedback (rating);
        CREATE TABLE chunks (id bigint PRIMARY KEY, doc text, embedding float8[], raw bytea);
        CREATE SCHEMA audit;
        CREATE TABLE audit."Event Log" (id int, note text);
        INSERT INTO feedback (question, answer, rating)
          SELECT 'question ' || g, repeat('answer ' || g, 3), g % 5
          FROM generate_series(1, {rows}) g;
        INSERT INTO chunks
          SELECT g, 'doc-' || g, ARRAY[g * 0.5, g * 0.25, -g], decode(md5(g::text), 'hex')
          FROM generate_series(1, {rows // 2}) g;
        INSERT INTO audit."Event Log" VALUES (1, 'quoted names survive'), (2, NULL);
        """,  # noqa: S608 - fixed test SQL
        database=DATABASE,
    )


def pg_snapshot(server: PostgresServer, database: str = DATABASE) -> dict[str, str]:
    """Every user table's full content, ordered, as text (independent of rag_backup)."""
    tables = [
        t
        for t in server.psql(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema') ORDER BY 1",
            database=database,
        ).splitlines()
        if t
    ]
    return {
        table: server.psql(f"SELECT t::text FROM {table} t ORDER BY t::text", database=database)  # noqa: S608
        for table in tables
    }


def seed_redis(server: RedisServer, keys: int = 300) -> None:
    client: Any = server.client()
    for i in range(keys):
        client.set(f"cache:{i}", f"value-{i}" * 3)
    client.hset("session:1", mapping={"user": "ann", "turns": "3"})
    client.rpush("queue", *[f"job-{i}" for i in range(20)])
    client.sadd("tags", "a", "b", "c")
    client.zadd("scores", {"x": 1.5, "y": 2.5})
    client.set("binary", bytes(range(256)))
    client.set("long-lived", "ttl", ex=86400)
    client.select(3)
    client.set("other-db", "db3")


def redis_snapshot(server: RedisServer) -> dict[str, Any]:
    client: Any = server.client()
    result: dict[str, Any] = {}
    for db in (0, 3):
        client.select(db)
        for key in sorted(client.keys("*")):
            kind = client.type(key).decode()
            value: Any
            if kind == "string":
                value = client.get(key)
            elif kind == "hash":
                value = sorted(client.hgetall(key).items())
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "set":
                value = sorted(client.smembers(key))
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            else:
                value = kind
            result[f"{db}/{key.decode(errors='replace')}"] = (kind, value, client.ttl(key) > 0)
    client.select(0)
    return result


def seed_chroma(directory: Path, rows: int = 500) -> None:
    directory.mkdir(parents=True)
    conn = sqlite3.connect(directory / "chroma.sqlite3")
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE embeddings (id INTEGER PRIMARY KEY, doc TEXT, vector BLOB)")
    rng = random.Random(7)
    conn.executemany(
        "INSERT INTO embeddings VALUES (?, ?, ?)",
        [(i, f"chunk {i}", rng.randbytes(64)) for i in range(rows)],
    )
    conn.commit()
    conn.close()
    for segment in ("3f1c-segment", "9a7e-segment"):
        seg = directory / segment
        seg.mkdir()
        (seg / "data_level0.bin").write_bytes(rng.randbytes(40_000))
        (seg / "header.bin").write_bytes(rng.randbytes(100))
        (seg / "link_lists.bin").write_bytes(b"")
        (seg / "index_metadata.pickle").write_bytes(rng.randbytes(500))


def tree_snapshot(directory: Path) -> dict[str, str]:
    """relative path -> sha256 of every file (directories as 'dir')."""
    if not directory.exists():
        return {}
    result = {}
    for path in sorted(directory.rglob("*")):
        rel = str(path.relative_to(directory))
        if path.is_dir():
            result[rel] = "dir"
        else:
            result[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def live_tree(directory: Path) -> dict[str, str]:
    """``tree_snapshot`` without rag-backup's own top-level ``.rag-*`` entries (the previous
    contents a restore keeps inside the Chroma directory, a mount point)."""
    return {
        rel: digest
        for rel, digest in tree_snapshot(directory).items()
        if not rel.split("/")[0].startswith(".rag-")
    }


def chroma_rows(directory: Path) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(directory / "chroma.sqlite3")
    try:
        return conn.execute("SELECT * FROM embeddings ORDER BY id").fetchall()
    finally:
        conn.close()


def markers_around_a_time(server: PostgresServer, database: str = DATABASE) -> float:
    """Marker rows 'before' and 'after' committed 1.5 s either side of the returned time:
    a point-in-time restore to it must bring back 'before' and not 'after'."""
    server.psql("CREATE TABLE markers (name text)", database=database)
    server.psql("INSERT INTO markers VALUES ('before')", database=database)
    time.sleep(1.5)
    between = time.time()
    time.sleep(1.5)
    server.psql("INSERT INTO markers VALUES ('after')", database=database)
    return between


@contextlib.contextmanager
def writes_all_along(server: PostgresServer, database: str = DATABASE) -> Iterator[None]:
    """Another session commits a row every few milliseconds for the block, as the app's
    users write while wal-archive runs (WAL is written at any moment of a cycle)."""
    stop = threading.Event()
    failed: list[BaseException] = []

    def write() -> None:
        try:
            with psycopg.connect(
                server.dsn, password=server.password, dbname=database, autocommit=True
            ) as conn:
                while not stop.is_set():
                    conn.execute("INSERT INTO feedback (question) VALUES ('during a cycle')")
                    stop.wait(0.005)
        except BaseException as error:  # re-raised in the test's thread
            failed.append(error)

    writer = threading.Thread(target=write, name="pg-writer")
    writer.start()
    try:
        yield
    finally:
        stop.set()
        writer.join(timeout=30)
    if failed:
        raise failed[0]


def archive_a_cycle_read_past_its_switch(
    backup_dir: Path, env: dict[str, str], tries: int = 5
) -> dict[str, Any]:
    """Run wal-archive (under writes_all_along) until a cycle's recorded WAL position lies
    past its switch point (another session committed between its pg_switch_wal() and its
    read of pg_current_wal_lsn(): the position is then inside a segment that cycle did not
    archive); returns that cycle, the archive's last."""
    segment_size = 16 * 1024 * 1024
    for _ in range(tries):
        done = run_cli(["wal-archive"], env)
        assert done.returncode == 0, done.stderr
        cycle: dict[str, Any] = json.loads((backup_dir / "wal" / "index.json").read_text())[
            "cycles"
        ][-1]
        high, low = (int(part, 16) for part in cycle["end_lsn"].split("/"))
        if ((high << 32) | low) % segment_size:
            return cycle
    raise AssertionError(f"no wal-archive cycle of {tries} read its position past the switch")
