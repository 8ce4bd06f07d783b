"""Each fault is reported with its own message and leaves the live data byte-identical."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.backup.conftest import Stack, make_stack
from tests.backup.helpers import DATABASE, pg_snapshot, run_cli, tree_snapshot

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def backed_up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, str]]:
    stack_gen = make_stack(tmp_path_factory.mktemp("faults"))
    stack = next(stack_gen)
    try:
        result = run_cli(["backup"], stack.env)
        assert result.returncode == 0, result.stderr
        # Restores run against a stopped redis-server, as the documented procedure says.
        stack.redis.stop()
        yield stack, result.stdout.strip()
    finally:
        stack_gen.close()


def _copy_backups(stack: Stack, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    backups = tmp_path / "backups"
    shutil.copytree(stack.backup_dir, backups)
    return backups, {**stack.env, "BACKUP_DIR": str(backups)}


def _live(stack: Stack) -> tuple[object, ...]:
    return (
        pg_snapshot(stack.pg),
        tree_snapshot(stack.chroma_dir),
        tree_snapshot(stack.redis_data),
        sorted(p.name for p in stack.root.iterdir()),
        stack.pg.psql("SELECT datname FROM pg_database ORDER BY 1"),
    )


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rewrite_manifest_hash(path: Path) -> None:
    """Tamper with the ciphertext and fix up the manifest: only decryption can notice."""
    import hashlib

    _flip_middle_byte(path)
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for component in manifest["components"].values():
        for artifact in component["artifacts"]:
            if artifact["name"] == path.name:
                artifact["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
                artifact["head_sha256"] = _head_sha256(path)
    manifest_path.write_text(json.dumps(manifest))


def _plaintext(path: Path) -> None:
    import hashlib

    path.write_bytes(b"PGDMP" + b"\0" * 1000)
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for component in manifest["components"].values():
        for artifact in component["artifacts"]:
            if artifact["name"] == path.name:
                artifact["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
                artifact["head_sha256"] = _head_sha256(path)
                artifact["size"] = 1005
    manifest_path.write_text(json.dumps(manifest))


def _head_sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()[: 64 * 1024]).hexdigest()


def _rewrite_head_hash(path: Path) -> None:
    """A manifest whose head_sha256 disagrees with its own (matching) SHA-256."""
    manifest_path = path.parent / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for component in manifest["components"].values():
        for artifact in component["artifacts"]:
            if artifact["name"] == path.name:
                artifact["head_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))


FAULTS: dict[str, tuple[str, Callable[[Path], None], str]] = {
    "corrupted": ("chroma.tar.zst.gpg", _flip_middle_byte, "corrupted: SHA-256 does not match"),
    "truncated": ("postgres.dump.zst.gpg", _truncate, "truncated:"),
    "missing": ("redis.rdb.zst.gpg", lambda p: p.unlink(), "missing:"),
    "tampered": ("redis.rdb.zst.gpg", _rewrite_manifest_hash, "corrupted"),
    "plaintext": ("postgres.dump.zst.gpg", _plaintext, "not encrypted"),
    "head": ("redis.rdb.zst.gpg", _rewrite_head_hash, "of its first 65536 bytes"),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_damaged_backup_is_refused_and_live_data_untouched(
    backed_up: tuple[Stack, str], tmp_path: Path, fault: str
) -> None:
    stack, backup_id = backed_up
    backups, env = _copy_backups(stack, tmp_path)
    artifact, damage, message = FAULTS[fault]
    damage(backups / backup_id / artifact)
    live_before = _live(stack)

    verify = run_cli(["verify", backup_id], env)
    assert verify.returncode != 0
    assert message in verify.stderr
    assert verify.stderr.strip().splitlines()[-1].startswith("rag-backup: error:")
    restore = run_cli(["restore", backup_id, "--yes", *stack.restore_args()], env)
    assert restore.returncode != 0
    assert message in restore.stderr
    assert _live(stack) == live_before
    listing = run_cli(["list"], env)
    assert "FAILED" in listing.stdout


def test_wrong_key_is_named_and_live_data_untouched(
    backed_up: tuple[Stack, str], tmp_path: Path
) -> None:
    stack, backup_id = backed_up
    _, env = _copy_backups(stack, tmp_path)
    wrong = tmp_path / "wrong.key"
    wrong.write_text("not the passphrase\n")
    env["RAG_BACKUP_KEY_FILE"] = str(wrong)
    live_before = _live(stack)
    verify = run_cli(["verify", backup_id], env)
    assert verify.returncode != 0
    assert "wrong key" in verify.stderr
    restore = run_cli(["restore", backup_id, "--yes", *stack.restore_args()], env)
    assert restore.returncode != 0
    assert "wrong key" in restore.stderr
    assert _live(stack) == live_before


def test_restoring_a_component_the_backup_lacks_is_refused(
    backed_up: tuple[Stack, str], tmp_path: Path
) -> None:
    stack, _ = backed_up
    env = {**stack.env, "BACKUP_DIR": str(tmp_path / "partial")}
    backup = run_cli(["backup", "--components", "postgres,chroma"], env)
    assert backup.returncode == 0, backup.stderr
    live_before = _live(stack)
    restore = run_cli(
        ["restore", "--yes", "--components", "redis,postgres", *stack.restore_args()], env
    )
    assert restore.returncode != 0
    assert "has no redis component" in restore.stderr
    assert _live(stack) == live_before


def test_restore_without_yes_and_without_a_terminal_changes_nothing(
    backed_up: tuple[Stack, str], tmp_path: Path
) -> None:
    stack, backup_id = backed_up
    _, env = _copy_backups(stack, tmp_path)
    live_before = _live(stack)
    restore = run_cli(["restore", backup_id, *stack.restore_args()], env)
    assert restore.returncode != 0
    assert "--yes" in restore.stderr
    assert _live(stack) == live_before


def test_drill_passes_on_good_backup_and_fails_on_corrupted(
    backed_up: tuple[Stack, str], tmp_path: Path
) -> None:
    stack, backup_id = backed_up
    backups, env = _copy_backups(stack, tmp_path)
    metrics = tmp_path / "textfile"
    metrics.mkdir()
    env["RAG_BACKUP_METRICS_DIR"] = str(metrics)
    good = run_cli(["drill", backup_id], env)
    assert good.returncode == 0, good.stderr
    prom = (metrics / "rag_restore_drill.prom").read_text()
    assert "rag_restore_drill_last_run_success 1" in prom
    success_line = next(
        line
        for line in prom.splitlines()
        if line.startswith("rag_restore_drill_last_success_timestamp_seconds ")
    )
    assert "rag_restore_drill_duration_seconds " in prom

    # Corrupt the compressed content behind a valid ciphertext hash: only a full restore
    # attempt can notice -- and the drill must.
    _rewrite_manifest_hash(backups / backup_id / "postgres.dump.zst.gpg")
    bad = run_cli(["drill", backup_id], env)
    assert bad.returncode != 0
    assert "drill failed" in bad.stderr
    prom = (metrics / "rag_restore_drill.prom").read_text()
    assert "rag_restore_drill_last_run_success 0" in prom
    assert success_line in prom.splitlines()  # the last success is remembered
    assert list(tmp_path.glob("rag-drill-*")) == []
    assert DATABASE in stack.pg.psql("SELECT datname FROM pg_database")


def test_chroma_archive_not_matching_its_manifest_list_is_refused(
    backed_up: tuple[Stack, str], tmp_path: Path
) -> None:
    """The restore no longer hashes each Chroma file (the ciphertext's SHA-256 covers the
    archive), but the extracted tree must still be exactly the manifest's files and sizes."""
    stack, backup_id = backed_up
    backups, env = _copy_backups(stack, tmp_path)
    manifest_path = backups / backup_id / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["components"]["chroma"]["files"].append(
        {"path": "ghost/data_level0.bin", "size": 1, "sha256": "0" * 64}
    )
    manifest_path.write_text(json.dumps(manifest))
    live_before = _live(stack)
    restore = run_cli(["restore", backup_id, "--yes", *stack.restore_args()], env)
    assert restore.returncode != 0
    assert "chroma archive lacks 1 file(s), e.g. ghost/data_level0.bin" in restore.stderr
    assert _live(stack) == live_before

    manifest["components"]["chroma"]["files"].pop()
    manifest["components"]["chroma"]["files"][-1]["size"] += 1
    manifest_path.write_text(json.dumps(manifest))
    wrong_size = run_cli(["restore", backup_id, "--yes", *stack.restore_args()], env)
    assert wrong_size.returncode != 0
    assert "does not match its checksum (size)" in wrong_size.stderr
    assert _live(stack) == live_before
