"""Point-in-time recovery on a new host from the off-host copy ("the VPS is gone, and the
last good moment was 16:59"): ``offsite pull --target-time ISO | --target latest``.

The target is resolved against the off-host copies alone -- the remote manifests and the
remote WAL index of each backup's cluster (offsite_wal), with the same rules as a local
restore (pitr.window_of: the newest base backup that ended before the time and whose WAL
chain reaches it without a gap) -- and a time outside what is off-host is refused with the
ranges, exit code 2, before anything is downloaded. Then the chosen base backup and only the
WAL recovery to the target needs (from the backup's start segment to the archive cycle at or
after the target; ``latest``: the whole chain) are pulled, each checked, into
``BACKUP_DIR/offsite-pitr`` (PULL_DIR): a backup store of its own, never the stack's own
backups or WAL archive (a new host's archive holds its fresh cluster's WAL under the same
segment names). Nothing already there is overwritten: a backup folder pulled before is used
again when its manifest is the same, a segment already there when its bytes are, and
anything else there that differs is refused. ``scripts/restore-stack.sh --backups-subdir
offsite-pitr --id ID --target-time ISO`` then resolves, verifies and restores from there
(scripts/offsite-restore.sh runs both)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from rag_backup import offsite_wal, pitr, wal
from rag_backup.errors import BackupError
from rag_backup.progress import log
from rag_backup.store import BackupStore

if TYPE_CHECKING:  # offsite imports this module
    from rag_backup.offsite import Rclone, RemoteBackup

# The store the pulls for a point-in-time recovery land in, inside BACKUP_DIR (one literal:
# restore-stack.sh --backups-subdir names it, offsite-restore.sh passes it).
PULL_DIR = "offsite-pitr"


@dataclass(frozen=True)
class RemotePlan:
    backup: RemoteBackup
    system: str  # the cluster (system identifier) whose off-host WAL it needs
    index: dict[str, Any]  # that lineage's remote index, checked
    window: pitr.Window
    segments: tuple[str, ...]  # what recovery to the target needs, oldest first
    until: float | None  # the archive cycle they reach


def pull_store(store: BackupStore) -> BackupStore:
    return BackupStore(store.root / PULL_DIR)


def _wanted_segments(
    window: pitr.Window, index: dict[str, Any], target: float | None
) -> tuple[tuple[str, ...], float | None]:
    """The window's chain up to the segment that closes the first archive cycle at or after
    ``target`` (that cycle's marker commit is stamped after it: recovery finds a commit past
    the target there and stops), and that cycle's time; None: the whole chain, to the
    window's end."""
    if target is None:
        return window.segments, window.end
    for at, last in pitr.reached_cycles(window.entry, index, window.segments):
        if at >= target:
            return tuple(n for n in window.segments if pitr.segment_number(n) <= last), at
    return window.segments, window.end


def wal_plan(plan: RemotePlan) -> offsite_wal.WalPlan:
    """What offsite_wal pulls: the needed segments, and the local index says the pulled WAL
    is complete up to the cycle they reach (not the remote archive's end)."""
    index = dict(plan.index)
    if plan.until is not None:
        index["covered_until"] = plan.until
    return offsite_wal.WalPlan(plan.system, index, list(plan.segments))


def plan_remote(
    rclone: Rclone,
    remote: list[RemoteBackup],
    store: BackupStore,
    target_time: float | None,
    backup_id: str | None,
) -> RemotePlan:
    """The off-host base backup to recover from to ``target_time`` (None: the end of its
    cluster's off-host WAL): ``backup_id`` when given, else the newest verified off-host
    copy with a physical base backup that this host did not make (``store`` is the stack's
    own BACKUP_DIR: a new host's own backups are of its empty stores) whose off-host WAL
    reaches the target. Raises pitr.TargetOutOfRange (exit code 2) with the ranges."""
    from rag_backup.offsite import made_here

    where = f"off-host ({rclone.target.remote})"
    if backup_id not in (None, "latest"):
        chosen = [r for r in remote if r.backup_id == backup_id]
        if not chosen or chosen[0].manifest is None:
            problem = chosen[0].problem if chosen else "not found"
            raise BackupError(f"backup {backup_id} {where}: {problem}; nothing was pulled")
        if "physical" not in chosen[0].as_entry().pg_forms:
            raise BackupError(
                f"{pitr.ARGUMENT}: backup {backup_id} has no physical base backup of "
                "PostgreSQL; a point-in-time recovery starts from one; nothing was pulled"
            )
        candidates = chosen
    else:
        physical = [r for r in remote if r.verified_ok and "physical" in r.as_entry().pg_forms]
        candidates = [r for r in physical if not made_here(store, r.backup_id)]
        for r in physical:
            if r not in candidates:
                log(f"offsite: passing over {r.backup_id}: this host made it ({store.root})")
    if not candidates:
        raise pitr.TargetOutOfRange(
            f"{pitr.ARGUMENT}: no verified base backup {where} that this host did not make; "
            "nothing was pulled"
        )
    candidates.sort(key=lambda r: (r.as_entry().created_unix, r.backup_id), reverse=True)
    lineages = offsite_wal.remote_lineages(rclone)
    indexes: dict[str, dict[str, Any] | None] = {}
    windows: list[tuple[RemoteBackup, str, pitr.Window]] = []
    for backup in candidates:
        assert backup.manifest is not None
        entry = backup.as_entry()
        system = offsite_wal.backup_lineage(backup.manifest)
        if system is None and len(lineages) == 1:
            system = lineages[0]  # made before backups recorded their cluster
        if system is not None and system not in indexes:
            indexes[system] = (
                offsite_wal.read_remote_index(rclone, system) if system in lineages else None
            )
        index = indexes.get(system) if system is not None else None
        if system is None or index is None:
            problem = f"no off-host WAL of its cluster ({system or 'unknown'})"
            windows.append((backup, system or "", pitr.Window(entry, 0.0, None, (), problem)))
            continue
        windows.append((backup, system, pitr.window_of(entry, index)))
    # latest: the end of the newest candidate's cluster's off-host WAL, never silently an
    # earlier point an older backup still reaches (as pitr.plan).
    wanted = target_time
    if wanted is None:
        newest = indexes.get(windows[0][1]) if windows[0][1] else None
        wanted = newest.get("covered_until") if newest else None
    for backup, system, window in windows:
        if wanted is not None and window.covers(wanted):
            index = indexes[system]
            assert index is not None
            segments, until = _wanted_segments(window, index, target_time)
            return RemotePlan(backup, system, index, window, segments, until)
    value = (
        "--target latest (the end of the off-host WAL"
        + (f", {wal.describe_time(wanted)})" if wanted is not None else ": none)")
        if target_time is None
        else f"--target-time {wal.describe_time(target_time)}"
    )
    ranges = "; ".join(w.describe() for _, _, w in windows[:3])
    more = f" (and {len(windows) - 3} older)" if len(windows) > 3 else ""
    raise pitr.TargetOutOfRange(
        f"{value} is outside what is archived {where}: expected a time in {ranges}{more}; "
        "nothing was pulled or changed"
    )
