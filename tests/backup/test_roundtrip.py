"""Seed -> backup -> verify -> wipe -> restore -> identical, against real servers."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time

import pytest

from tests.backup.conftest import Stack
from tests.backup.helpers import (
    DATABASE,
    chroma_rows,
    live_tree,
    pg_snapshot,
    redis_snapshot,
    run_cli,
    tree_snapshot,
)
from tests.tooling import require_tool

pytestmark = pytest.mark.integration


def test_backup_verify_wipe_restore_gives_identical_data(stack: Stack) -> None:
    pg_before = pg_snapshot(stack.pg)
    redis_before = redis_snapshot(stack.redis)
    chroma_before = tree_snapshot(stack.chroma_dir)
    rows_before = chroma_rows(stack.chroma_dir)

    backup = run_cli(["backup"], stack.env)
    assert backup.returncode == 0, backup.stderr
    backup_id = backup.stdout.strip()
    verify = run_cli(["verify", backup_id], stack.env)
    assert verify.returncode == 0, verify.stderr
    listing = run_cli(["list"], stack.env)
    assert backup_id in listing.stdout and "verified" in listing.stdout

    # Wipe everything.
    stack.pg.psql(f"DROP DATABASE {DATABASE}")
    client = stack.redis.client()
    client.flushall()  # type: ignore[attr-defined]
    stack.redis.stop()
    shutil.rmtree(stack.chroma_dir)

    restore = run_cli(["restore", backup_id, "--yes", *stack.restore_args()], stack.env)
    assert restore.returncode == 0, restore.stderr

    assert pg_snapshot(stack.pg) == pg_before
    assert tree_snapshot(stack.chroma_dir) == chroma_before
    assert chroma_rows(stack.chroma_dir) == rows_before
    # The live server runs with appendonly yes: it must load the restored data from the AOF.
    stack.start_redis()
    assert redis_snapshot(stack.redis) == redis_before
    assert (stack.redis_data / "appendonlydir").is_dir()

    # The restored AOF's base file is the restored RDB itself: the live server must keep
    # working on it (new writes, an AOF rewrite that replaces the base, a restart) with
    # nothing lost.
    live = stack.redis.client()
    live.set("written-after-restore", b"1")  # type: ignore[attr-defined]
    live.bgrewriteaof()  # type: ignore[attr-defined]
    deadline = time.monotonic() + 30
    while True:
        persistence = live.info("persistence")  # type: ignore[attr-defined]
        if not (persistence["aof_rewrite_in_progress"] or persistence["aof_rewrite_scheduled"]):
            break
        assert time.monotonic() < deadline, "AOF rewrite did not finish within 30 s"
        time.sleep(0.05)
    assert persistence["aof_last_bgrewrite_status"] == "ok"
    stack.redis.stop()
    stack.start_redis()
    after_rewrite = redis_snapshot(stack.redis)
    assert after_rewrite.pop("0/written-after-restore") == ("string", b"1", False)
    assert after_rewrite == redis_before


def test_restore_over_live_data_keeps_previous_data_for_rollback(stack: Stack) -> None:
    backup = run_cli(["backup"], stack.env)
    assert backup.returncode == 0, backup.stderr
    backup_id = backup.stdout.strip()
    pg_at_backup = pg_snapshot(stack.pg)
    redis_at_backup = redis_snapshot(stack.redis)
    chroma_at_backup = tree_snapshot(stack.chroma_dir)

    # Changes after the backup: the restore must roll them back but keep them aside.
    stack.pg.psql("DELETE FROM feedback WHERE id > 10", database=DATABASE)
    pg_changed = pg_snapshot(stack.pg)
    stack.redis.client().set("added-after-backup", "1")  # type: ignore[attr-defined]
    stack.redis.stop()
    (stack.chroma_dir / "new-after-backup.bin").write_bytes(b"new")
    chroma_changed = tree_snapshot(stack.chroma_dir)

    restore = run_cli(["restore", "--yes", *stack.restore_args()], stack.env)
    assert restore.returncode == 0, restore.stderr

    assert pg_snapshot(stack.pg) == pg_at_backup
    suffix = backup_id.lower()
    assert pg_snapshot(stack.pg, f"{DATABASE}_pre_restore_{suffix}") == pg_changed
    assert live_tree(stack.chroma_dir) == chroma_at_backup
    kept_chroma = stack.chroma_dir / f".rag-pre-restore-{backup_id}"
    assert tree_snapshot(kept_chroma) == chroma_changed
    assert (stack.redis_data / f"rag-pre-restore-{backup_id}" / "appendonlydir").is_dir()
    stack.start_redis()
    assert redis_snapshot(stack.redis) == redis_at_backup


def test_backup_files_are_ciphertext_listed_in_manifest_and_metrics_are_valid(stack: Stack) -> None:
    backup = run_cli(["backup"], stack.env)
    assert backup.returncode == 0, backup.stderr
    directory = stack.backup_dir / backup.stdout.strip()
    manifest = json.loads((directory / "manifest.json").read_text())
    artifacts = [a for c in manifest["components"].values() for a in c["artifacts"]]
    assert sorted(manifest["components"]) == ["chroma", "postgres", "redis"]
    for artifact in artifacts:
        data = (directory / artifact["name"]).read_bytes()
        assert len(data) == artifact["size"]
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
        assert hashlib.sha256(data[: 64 * 1024]).hexdigest() == artifact["head_sha256"]
        for clear in (b"PGDMP", b"REDIS", b"SQLite format 3", b"ustar", b"\x28\xb5\x2f\xfd"):
            assert clear not in data[:4096]
    assert manifest["components"]["postgres"]["row_counts"]["public.feedback"] == 2000
    assert manifest["components"]["postgres"]["row_counts"]['audit."Event Log"'] == 2
    # The key decrypts it with plain gpg, and what comes out is a zstd-compressed pg_dump.
    gpg = require_tool("gpg")
    home = stack.root / "gnupg-check"
    home.mkdir(mode=0o700)
    try:
        decrypted = subprocess.run(
            [
                gpg,
                "--batch",
                "--pinentry-mode",
                "loopback",
                "--passphrase-file",
                str(stack.key_file),
                "--homedir",
                str(home),
                "--decrypt",
                str(directory / "postgres.dump.zst.gpg"),
            ],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    finally:
        subprocess.run(
            [require_tool("gpgconf"), "--homedir", str(home), "--kill", "gpg-agent"],
            capture_output=True,
            timeout=30,
            check=False,
        )
    plain = subprocess.run(
        [require_tool("zstd"), "-d", "-c"],
        input=decrypted,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout
    assert plain.startswith(b"PGDMP")
    # No temporary directory is left and the metrics file is valid for Prometheus.
    assert [p.name for p in stack.backup_dir.iterdir() if p.name.startswith(".tmp-")] == []
    prom = (stack.metrics_dir / "rag_backup.prom").read_text()
    check = subprocess.run(
        [require_tool("promtool"), "check", "metrics"],
        input=prom,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "rag_backup_last_run_success 1" in prom
    for component in ("postgres", "redis", "chroma", "all"):
        assert f'rag_backup_last_success_timestamp_seconds{{component="{component}"}}' in prom
        assert f'rag_backup_size_bytes{{component="{component}"}}' in prom
