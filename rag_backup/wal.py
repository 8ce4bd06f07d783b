"""Continuous WAL archiving for point-in-time recovery (issue 14 items 1 and 2).

Why ``pg_receivewal`` with a replication slot, in the backup container, rather than
``archive_command``: ``archive_command`` runs a shell command inside the PostgreSQL
container as the server's user, which would need the backup passphrase there and a writable
mount of the backup volume (the hardened PostgreSQL container has neither). pg_receivewal
uses the replication connection the base backups already use; the slot makes the server keep
every segment until it has been received, so there is no gap even when the archiver was
down (the price: WAL piles up on the server while it is down, which the lag metric shows).

One archiving cycle (``rag-backup wal-archive``; the scheduler runs it every minute):
``pg_switch_wal()`` closes the current segment (so a commit is archived within one cycle:
RPO = the cycle), pg_receivewal receives up to that point (``--endpos``) into a private
0700 spool and exits; every complete segment is compressed and encrypted with the stack's
key into ``BACKUP_DIR/wal/<segment>.zst.gpg`` (temp file, fsync, rename) and its plaintext
removed at once; ``wal/index.json`` records each segment's size and SHA-256 and the time up
to which the archive is complete (``covered_until``: the switch time of the last complete
cycle); then the slot is advanced to that point, releasing the WAL now at rest on the server.
Plaintext WAL exists only in the spool, for the length of one cycle."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import re
import time
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag_backup import clibs, metrics, pg
from rag_backup.crypto import Cipher, CipherSettings
from rag_backup.errors import BackupError
from rag_backup.manifest import ARTIFACT_NAME
from rag_backup.procs import run
from rag_backup.progress import Progress, log
from rag_backup.store import BackupStore, write_json_atomic
from rag_backup.streams import ExpectedCiphertext, copy_stream, decrypted_stream, write_encrypted

WAL_DIR = "wal"
INDEX = "index.json"
LOCK = ".lock"
KIND = "wal_segment"
SEGMENT = re.compile(r"[0-9A-F]{24}")
SEGMENT_SIZE = 16 * 1024 * 1024  # the server default (initdb --wal-segsize)
DEFAULT_SLOT = "rag_backup_wal"
METRICS_FILE = "rag_backup_wal.prom"
SUPERSEDED = ".superseded-"  # + the Unix time it was archived


@dataclass(frozen=True)
class WalArchiveConfig:
    store: BackupStore
    cipher: CipherSettings
    postgres: pg.PostgresSettings
    slot: str
    spool: Path
    metrics_dir: Path | None
    zstd_level: int = 3


def wal_dir(store: BackupStore) -> Path:
    return store.root / WAL_DIR


def read_index(store: BackupStore) -> dict[str, Any]:
    try:
        data = json.loads((wal_dir(store) / INDEX).read_text())
    except (OSError, ValueError):
        return {"segments": {}, "covered_until": None}
    if not isinstance(data, dict) or not isinstance(data.get("segments"), dict):
        raise BackupError(f"{wal_dir(store) / INDEX} is malformed; not using the WAL archive")
    return data


def segment_file(name: str, cipher: CipherSettings) -> str:
    return f"{name}.zst.{'gpg' if cipher.method == 'gpg' else 'age'}"


@contextlib.contextmanager
def _archive_lock(directory: Path) -> Iterator[None]:
    handle = open(directory / LOCK, "a+")  # noqa: SIM115 - held for the with-block
    try:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise BackupError(f"another wal-archive run holds {directory / LOCK}") from error
        yield
    finally:
        handle.close()


# Public for offsite_wal, which installs pulled WAL under the same lock.
archive_lock = _archive_lock


def _receivewal(cfg: WalArchiveConfig, *extra: str, timeout: float = 600) -> None:
    settings = cfg.postgres
    run(
        "pg_receivewal",
        [
            settings.tool("pg_receivewal"),
            f"--directory={cfg.spool}",
            f"--slot={cfg.slot}",
            "--no-password",
            *extra,
        ],
        env=settings.env(),
        timeout=timeout,
    )


def archive_once(cfg: WalArchiveConfig, progress: Progress) -> list[str]:
    """One cycle; returns the segments archived."""
    target = wal_dir(cfg.store)
    cfg.store.ensure()
    target.mkdir(mode=0o700, exist_ok=True)
    cfg.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
    cfg.spool.chmod(0o700)
    archived: list[str] = []
    success = False
    try:
        with _archive_lock(target), Cipher(cfg.cipher) as cipher:
            database = cfg.postgres.database
            _start_history_if_new_slot(cfg, target, database)
            _receivewal(cfg, "--create-slot", "--if-not-exists", timeout=120)
            switched_at = time.time()
            # A commit stamped just after ``switched_at`` (txid_current() assigns an xid):
            # recovery to any time up to ``covered_until`` then finds a later commit and
            # reaches its target even on an idle database; its xid is the cycle's marker
            # (the drill checks it is committed in a copy recovered past it, absent before).
            marker = int(pg.psql_value(cfg.postgres, "SELECT txid_current()", database))
            # The cluster's lineage (new at each initdb, kept by a physical restore): off-host
            # copies keep each lineage apart, since a new cluster reuses segment names.
            system = pg.psql_value(
                cfg.postgres, "SELECT system_identifier FROM pg_control_system()", database
            ).strip()
            pg.psql_value(cfg.postgres, "SELECT pg_switch_wal()", database)
            end_lsn = pg.psql_value(cfg.postgres, "SELECT pg_current_wal_lsn()", database)
            # pg_receivewal stops only once it receives WAL *past* --endpos; right after a
            # switch there is none until the next background record (~15 s on an idle
            # server), so commit one now: the cycle then takes well under a second.
            pg.psql_value(cfg.postgres, "SELECT txid_current()", database)
            _receivewal(cfg, f"--endpos={end_lsn}", "--no-loop")
            index = read_index(cfg.store)
            for path in sorted(cfg.spool.iterdir()):
                if SEGMENT.fullmatch(path.name) and path.stat().st_size == SEGMENT_SIZE:
                    _archive_segment(cfg, cipher, path, index, progress, system)
                    archived.append(path.name)
                elif path.name.endswith(".partial"):
                    # Beyond --endpos nothing was received; the slot resends from there.
                    path.unlink()
            index["covered_until"] = switched_at
            index["system_identifier"] = system
            index["end_lsn"] = end_lsn
            cycles = index.setdefault("cycles", [])
            cycles.append({"at": switched_at, "xid": marker, "end_lsn": end_lsn})
            write_json_atomic(target / INDEX, index)
            # Release the WAL now at rest from the slot. pg_receivewal exits at --endpos
            # before its first status report, so without this the server would keep (and
            # resend) every segment since the slot was made, up to max_slot_wal_keep_size.
            # Never backwards; REPLICATION suffices.
            advance = (
                f"SELECT pg_replication_slot_advance({pg.quote_literal(cfg.slot)}, "
                f"{pg.quote_literal(end_lsn)}::pg_lsn)"
            )
            pg.psql_value(cfg.postgres, advance, database)
            success = True
    finally:
        if cfg.metrics_dir is not None:
            _write_metrics(cfg, success)
    log(f"wal: {len(archived)} segment(s) archived, archive complete up to {end_lsn}")
    return archived


def _start_history_if_new_slot(cfg: WalArchiveConfig, target: Path, database: str) -> None:
    """A missing slot means a WAL history the archive has not followed: the first run, or
    a cluster restored or replaced since (a base backup copies no slots). Its segments may
    carry names the archive already holds from before; ``history_started`` (written before
    the slot is made) tells them from segments the slot resends after a crash, and
    ``histories`` (every such start) where one base backup's WAL chain ends (``pitr``)."""
    slot = pg.quote_literal(cfg.slot)
    query = f"SELECT count(*) FROM pg_replication_slots WHERE slot_name = {slot}"  # noqa: S608
    exists = pg.psql_value(cfg.postgres, query, database)
    if exists == "0":
        index = read_index(cfg.store)
        index["history_started"] = time.time()
        index.setdefault("histories", []).append(index["history_started"])
        write_json_atomic(target / INDEX, index)


def _archive_segment(
    cfg: WalArchiveConfig,
    cipher: Cipher,
    path: Path,
    index: dict[str, Any],
    progress: Progress,
    system: str,
) -> None:
    name = path.name
    out = wal_dir(cfg.store) / segment_file(name, cfg.cipher)
    previous = index["segments"].get(name)
    if previous is not None and out.exists():
        archived_at = float(previous.get("archived_at", 0))
        if archived_at >= float(index.get("history_started", 0)):
            path.unlink()  # resent by the slot after a crash: the archived copy stands
            return
        # Another history's segment under this name: kept aside (it serves only backups of
        # that history, which point-in-time recovery then refuses past it), never overwritten.
        aside = out.with_name(f"{out.name}{SUPERSEDED}{int(archived_at)}")
        os.rename(out, aside)
        index.setdefault("superseded", []).append({**previous, "file": aside.name, "name": name})
        log(f"wal: {name} of an earlier history kept as {aside.name}")
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.unlink(missing_ok=True)

    def feed(sink: Any) -> None:
        with open(path, "rb") as source:
            while chunk := source.read(1 << 20):
                sink.write(chunk)

    record = write_encrypted(
        name=out.name,
        kind=KIND,
        out_path=tmp,
        cipher=cipher,
        zstd_level=cfg.zstd_level,
        zstd_threads=1,
        progress=progress,
        feeder=feed,
    )
    os.rename(tmp, out)
    index["segments"][name] = {
        "file": out.name,
        "size": record.size,
        "sha256": record.sha256,
        "head_sha256": record.head_sha256,
        "archived_at": time.time(),
        "system_identifier": system,
    }
    path.unlink()


def _write_metrics(cfg: WalArchiveConfig, success: bool) -> None:
    assert cfg.metrics_dir is not None
    path = cfg.metrics_dir / METRICS_FILE
    previous = metrics.read_samples(path)
    now = time.time()
    last_success = (
        now if success else previous.get(("rag_backup_wal_last_success_timestamp_seconds", None))
    )
    index = read_index(cfg.store) if success else {}
    covered = index.get("covered_until")
    lines = [
        "# HELP rag_backup_wal_last_run_success 1 if the last WAL archiving cycle succeeded.",
        "# TYPE rag_backup_wal_last_run_success gauge",
        f"rag_backup_wal_last_run_success {1 if success else 0}",
        "# HELP rag_backup_wal_last_success_timestamp_seconds Unix time of the last successful "
        "WAL archiving cycle.",
        "# TYPE rag_backup_wal_last_success_timestamp_seconds gauge",
    ]
    if last_success is not None:
        lines.append(f"rag_backup_wal_last_success_timestamp_seconds {last_success}")
    lines += [
        "# HELP rag_backup_wal_archived_until_timestamp_seconds Every commit before this Unix "
        "time is archived, encrypted, at rest.",
        "# TYPE rag_backup_wal_archived_until_timestamp_seconds gauge",
    ]
    if covered is not None:
        lines.append(f"rag_backup_wal_archived_until_timestamp_seconds {covered}")
    try:
        metrics.write_atomic(path, "\n".join(lines) + "\n")
    except OSError as error:
        log(f"warning: cannot write metrics to {cfg.metrics_dir}: {error.strerror}")


def prune_segments(store: BackupStore, oldest_base_backup_start: float, dry_run: bool) -> list[str]:
    """Delete archived segments no kept base backup can use: those archived before the
    oldest kept base backup started (all their WAL precedes it). Returns their names."""
    target = wal_dir(store)
    if not (target / INDEX).exists():
        return []
    with _archive_lock(target):
        index = read_index(store)
        doomed = [
            name
            for name, record in sorted(index["segments"].items())
            if float(record.get("archived_at", 0)) < oldest_base_backup_start
        ]
        if dry_run or not doomed:
            return doomed
        files = [str(index["segments"].pop(name).get("file", "")) for name in doomed]
        # Earlier histories' segments go by the same rule.
        superseded = [r for r in index.get("superseded", []) if isinstance(r, dict)]
        old = [r for r in superseded if float(r.get("archived_at", 0)) < oldest_base_backup_start]
        index["superseded"] = [r for r in superseded if r not in old]
        files += [str(r.get("file", "")) for r in old]
        index["cycles"] = [
            c for c in index.get("cycles", []) if float(c.get("at", 0)) >= oldest_base_backup_start
        ]
        # The index first: a crash between the two leaves a stray file, never a listed
        # segment that is gone.
        write_json_atomic(target / INDEX, index)
        for file in files:
            if ARTIFACT_NAME.fullmatch(file):
                (target / file).unlink(missing_ok=True)
        return doomed


# --------------------------------------------------------------------------- PITR


def backup_start_segment(data_dir: Path) -> str:
    """The WAL file a base backup starts in, from its backup_label."""
    label = (data_dir / "backup_label").read_text()
    match = re.search(r"START WAL LOCATION: \S+ \(file ([0-9A-F]{24})\)", label)
    if not match:
        raise BackupError("base backup: backup_label has no START WAL LOCATION")
    return match[1]


def archived_range(store: BackupStore) -> tuple[dict[str, Any], float | None]:
    index = read_index(store)
    covered = index.get("covered_until")
    return index, float(covered) if isinstance(covered, int | float) else None


def stage_segments(
    store: BackupStore,
    cipher: Cipher,
    start: str,
    target: Path,
    progress: Progress,
    jobs: int = 2,
    only: Collection[str] | None = None,
) -> int:
    """Decrypt every archived segment from ``start`` (same timeline; of those, ``only`` the
    named ones when given) into ``target``, checking each one against the index (size and
    SHA-256, or size, head_sha256 and the MDC: streams.ExpectedCiphertext). Returns how many.

    ``jobs`` segments at a time: each has a fixed cost (the passphrase's key derivation,
    and with gpg two processes to start) that is large against a 16 MiB segment's."""
    index = read_index(store)
    names = [n for n in sorted(index["segments"]) if n[:8] == start[:8] and n >= start]
    if only is not None:
        names = [n for n in names if n in only]

    def stage(name: str) -> None:
        record = index["segments"][name]
        path = wal_dir(store) / str(record["file"])
        expected = ExpectedCiphertext.of(record)
        fd = os.open(target / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with (
            decrypted_stream(cipher, path, f"wal {name}", expected) as stream,
            open(fd, "wb") as out,
        ):
            copy_stream(stream, out, f"wal {name}", progress)
            out.flush()
            # Written out now rather than by the restore's sync of the whole filesystem
            # (the segments are staged beside the copy, on its filesystem).
            clibs.start_writeback(out.fileno())

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for _ in pool.map(stage, names):
            pass  # re-raises the first failure; the caller discards ``target``
    return len(names)


def drill_window(store: BackupStore, backup_end: float) -> list[dict[str, Any]]:
    """The archive cycles after ``backup_end``, oldest first (each: at, xid, end_lsn)."""
    if not (wal_dir(store) / INDEX).exists():
        return []
    cycles = read_index(store).get("cycles", [])
    return [
        c
        for c in cycles
        if isinstance(c, dict)
        and isinstance(c.get("at"), int | float)
        and isinstance(c.get("xid"), int)
        and c["at"] > backup_end
    ]


def recovery_time(unix: float) -> str:
    """For recovery_target_time: microseconds kept (a truncated time would drop commits)."""
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat(timespec="microseconds")


def describe_time(unix: float) -> str:
    return dt.datetime.fromtimestamp(unix, dt.UTC).isoformat(timespec="seconds")
