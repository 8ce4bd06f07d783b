"""restore (check every store, stage every store, swap in order keeping an undo stack: all or
nothing) and drill (restore into throwaway instances, check, time it). The per-store steps
are the strategies in ``rag_backup.stores``."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rag_backup import metrics, pitr
from rag_backup.crypto import Cipher
from rag_backup.errors import BackupError, Interrupted
from rag_backup.ops import check_ciphertext, check_encryption_matches
from rag_backup.procs import futures_ended, kill_all_children, stop_children_until
from rag_backup.progress import Progress, log
from rag_backup.store import BackupEntry
from rag_backup.stores import (
    RESTORE_STORES,
    DrillConfig,
    DrillContext,
    RedisTarget,
    RestoreConfig,
    StoreRestore,
    SwapRollbackFailed,
    drills_for,
)

__all__ = ["DrillConfig", "RedisTarget", "RestoreConfig", "run_drill", "run_restore"]

# Nice value of the short staging chains (Redis, Chroma) while PostgreSQL's longer chain
# runs: on a CPU-bound restore the longest chain then gets the cores first and its I/O-bound
# tail (WAL replay, fsync) overlaps the others' work instead of following it.
SHORT_CHAIN_NICE = 10
# Work directories and the files in them: this user's only (the drill's user can read the
# backup passphrase; nothing it stages may be readable by others).
PRIVATE_UMASK = 0o077


def select_components(entry: BackupEntry, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    available = tuple(entry.manifest["components"])
    if requested is None:
        return tuple(name for name in RESTORE_STORES if name in available)
    missing = [c for c in requested if c not in available]
    if missing:
        raise BackupError(
            f"backup {entry.backup_id} has no {', '.join(missing)} component "
            f"(it has: {', '.join(available) or 'none'})"
        )
    return tuple(name for name in RESTORE_STORES if name in requested)


def _check_all_ciphertext(
    entry: BackupEntry, wanted: list[tuple[str, str]], cipher: Cipher
) -> None:
    """Presence, size and ciphertext header of every (component, kind) artifact that will be
    used; the SHA-256 is checked while each one is decrypted into its staging area."""
    for component, kind in wanted:
        for item in entry.manifest["components"][component]["artifacts"]:
            if item.get("kind") == kind:
                check_ciphertext(entry, component, item, cipher, full_hash=False)


def _confirm(message: str, assume_yes: bool) -> None:
    if assume_yes:
        return
    if not sys.stdin.isatty():
        raise BackupError("restore needs confirmation: run it in a terminal or pass --yes")
    print(message, file=sys.stderr)
    answer = input("Type 'restore' to continue: ")
    if answer.strip() != "restore":
        raise BackupError("restore cancelled; nothing was changed")


def _timed(
    timings: dict[str, float], name: str, task: Callable[[], None], *, nice: int = 0
) -> Callable[[], None]:
    def run() -> None:
        if nice:
            # Linux: the nice value is per thread and inherited by the children it starts.
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        started = time.monotonic()
        try:
            task()
        finally:
            timings[name] = time.monotonic() - started

    return run


def _run_parallel(tasks: list[Callable[[], None]]) -> None:
    errors: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, len(tasks))) as pool:
        futures = [pool.submit(task) for task in tasks]
        try:
            for future in futures:
                try:
                    future.result()
                except Interrupted:
                    raise
                except (BackupError, OSError) as error:
                    errors.append(str(error))
                    stop_children_until(futures_ended(futures))
        except BaseException:
            # Each worker may start another child after a first kill: stop those too
            # before the caller cleans up after them.
            stop_children_until(futures_ended(futures))
            raise
    if errors:
        raise BackupError("; ".join(errors))


def _log_timings(timings: dict[str, float]) -> None:
    log("timings: " + ", ".join(f"{name} {seconds:.2f}s" for name, seconds in timings.items()))


# --------------------------------------------------------------------------- restore


def run_restore(cfg: RestoreConfig, progress: Progress) -> list[str]:
    """All or nothing across stores. Returns the lines describing what was kept for rollback;
    on a failure after the first swap, every completed swap is undone and the error says
    what state every store is in."""
    if cfg.pitr and cfg.backup_id in (None, "latest"):
        entry = pitr.plan(cfg.store, cfg.pg_target_time).entry
    else:
        entry = cfg.store.get(cfg.backup_id)
    check_encryption_matches(entry, cfg.cipher)
    cfg.cipher.validate(need_encrypt=False, need_decrypt=True)
    components = select_components(entry, cfg.components)
    if cfg.pitr and (cfg.pg_mode != "physical" or "postgres" not in components):
        raise BackupError(
            "--target-time / --target is a point-in-time recovery of PostgreSQL: it needs "
            "--pg-mode physical and the postgres component"
        )
    stores = [RESTORE_STORES[name](cfg, entry) for name in components]
    started = time.monotonic()
    timings: dict[str, float] = {}
    previous_umask = os.umask(PRIVATE_UMASK)
    try:
        # Every precondition of every store, before anything is staged or swapped.
        for store in stores:
            store.check()
        with cfg.store.lock("restore", read_only_ok=True), Cipher(cfg.cipher) as cipher:
            log(f"checking backup {entry.backup_id} before touching anything")
            _check_all_ciphertext(entry, [(s.name, s.kind) for s in stores], cipher)
            _confirm(
                f"Restore backup {entry.backup_id} ({', '.join(components)}) over the live "
                "data? The current data is kept aside for rollback.",
                cfg.assume_yes,
            )
            timings["checks"] = time.monotonic() - started
            try:
                _stage_all(stores, cipher, progress, timings)
                log("backup fully decrypted, staged and checked; swapping it in")
                kept = _swap_all(stores, entry, timings)
            finally:
                for store in stores:
                    store.discard()
        timings["total"] = time.monotonic() - started
        _log_timings(timings)
        return kept
    finally:
        os.umask(previous_umask)


def _stage_all(
    stores: list[StoreRestore], cipher: Cipher, progress: Progress, timings: dict[str, float]
) -> None:
    staging_started = time.monotonic()
    has_postgres = any(store.name == "postgres" for store in stores)
    tasks = []
    for store in stores:
        nice = SHORT_CHAIN_NICE if has_postgres and store.name != "postgres" else 0

        def stage(store: StoreRestore = store) -> None:
            store.stage(cipher, progress)

        tasks.append(_timed(timings, f"stage {store.name}", stage, nice=nice))
    try:
        _run_parallel(tasks)
    except BaseException:
        kill_all_children()
        raise
    timings["staging (parallel)"] = time.monotonic() - staging_started
    for store in stores:
        timings.update({f"{store.name}: {phase}": s for phase, s in store.phases.items()})


def _swap_all(
    stores: list[StoreRestore], entry: BackupEntry, timings: dict[str, float]
) -> list[str]:
    kept: list[str] = []
    done: list[StoreRestore] = []  # the undo stack
    for store in stores:
        started = time.monotonic()
        try:
            kept.append(store.swap())
        except BaseException as error:
            # The failed store undid its own partial swap; undo the completed ones.
            if isinstance(error, SwapRollbackFailed):
                report = [str(error)]
            else:
                report = [f"{store.name}: swap failed ({error}); its previous data is in place"]
            report += _undo_all(done)
            untouched = [s.name for s in stores[stores.index(store) + 1 :]]
            if untouched:
                report.append(f"{', '.join(untouched)}: not touched")
            raise BackupError(
                f"restore of backup {entry.backup_id} failed while swapping {store.name}; "
                + "; ".join(report)
            ) from error
        finally:
            timings[f"swap {store.name}"] = time.monotonic() - started
        done.append(store)
    return kept


def _undo_all(done: list[StoreRestore]) -> list[str]:
    lines = []
    for store in reversed(done):
        try:
            lines.append(store.undo() + " (undone)")
        except BaseException as error:
            lines.append(
                f"{store.name}: UNDO FAILED ({error}): the RESTORED data is live and the previous "
                "data is in the kept location named above; fix by hand"
            )
    return lines


# --------------------------------------------------------------------------- drill


def run_drill(cfg: DrillConfig, progress: Progress) -> float:
    """Returns the measured restore time (RTO) in seconds."""
    success = False
    duration: float | None = None
    entry: BackupEntry | None = None
    previous_umask = os.umask(PRIVATE_UMASK)
    try:
        entry = cfg.store.get(cfg.backup_id)
        check_encryption_matches(entry, cfg.cipher)
        cfg.cipher.validate(need_encrypt=False, need_decrypt=True)
        log(f"drill: restoring backup {entry.backup_id} into throwaway instances")
        started = time.monotonic()
        drills = drills_for(entry, cfg.store)
        # Both 0700: the work dir is this process's; each private PostgreSQL gets its own
        # directory beside it, owned by the postgres user when we are root.
        work = Path(tempfile.mkdtemp(prefix="rag-drill-", dir=cfg.work_dir))
        server_root = Path(cfg.work_dir) if cfg.work_dir else Path(tempfile.gettempdir())
        try:
            with Cipher(cfg.cipher) as cipher:
                wanted = [
                    (item_component, str(item["kind"]))
                    for item_component, component in entry.manifest["components"].items()
                    for item in component["artifacts"]
                ]
                _check_all_ciphertext(entry, wanted, cipher)
                ctx = DrillContext(cfg, entry, cipher, work, server_root, progress)
                tasks = [_bind(drill, ctx) for _, drill in drills]
                try:
                    _run_parallel(tasks)
                except BaseException:
                    kill_all_children()
                    raise
        finally:
            shutil.rmtree(work, ignore_errors=True)
        duration = time.monotonic() - started
        success = True
        cfg.store.record_verification(entry, True, f"restore drill ok in {duration:.1f}s", "drill")
        log(f"drill: backup {entry.backup_id} restored and checked in {duration:.1f}s (RTO)")
        return duration
    except BackupError as error:
        if entry is not None:
            cfg.store.record_verification(entry, False, str(error), "drill")
        raise BackupError(f"drill failed: {error}") from error
    finally:
        os.umask(previous_umask)
        if cfg.metrics_dir is not None:
            try:
                metrics.write_drill_metrics(
                    cfg.metrics_dir, success=success, run_timestamp=time.time(), duration_s=duration
                )
            except OSError as error:
                log(f"warning: cannot write metrics to {cfg.metrics_dir}: {error.strerror}")


def _bind(drill: Callable[[DrillContext], None], ctx: DrillContext) -> Callable[[], None]:
    def run() -> None:
        drill(ctx)

    return run
