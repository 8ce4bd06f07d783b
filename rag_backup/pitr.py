"""Which base backup a point-in-time recovery starts from, and whether the WAL archive
covers the way from it to the target (``rag-backup resolve --target-time``, and the same
check inside ``restore``): answered from the manifests and ``wal/index.json`` alone, before
anything is stopped or decrypted.

A base backup can be recovered to time T when every WAL segment from the one it starts in
up to the one the switch of the first archive cycle at or after T closed (closing_segment)
is archived, one after the other on its timeline, and each was archived *after* the backup
started. The last rule catches segments of another history under the same names: after a
physical restore the server writes LSNs (and segment names) the archive already holds from
before it; those older copies were archived before any backup of the restored cluster
began. Conversely a backup's chain ends where the archive began following another history
(``histories`` in the index: wal-archive found its slot gone, as after every restore).

The start segment: the manifest's ``wal_start_at_least`` (the segment of the server's WAL
position read just before pg_basebackup began: the backup's own start is at or after it),
else, for backups made before that was recorded, the segment of the last archive cycle
before the backup began (its switch point precedes the backup's start)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from rag_backup import wal
from rag_backup.errors import BackupError, BadArgument
from rag_backup.store import BackupEntry, BackupStore

# Segments per 4 GiB "log file" (the middle 8 hex digits of a segment name).
SEGMENTS_PER_LOG = 0x1_0000_0000 // wal.SEGMENT_SIZE
ARGUMENT = "--target-time / --target"
START_FIELD = "wal_start_at_least"  # in the postgres component's "physical" record


class TargetOutOfRange(BadArgument):
    """A target the archive cannot reach: refused before anything is touched (exit code 2)."""


@dataclass(frozen=True)
class Window:
    """What one base backup can be recovered to: ``start`` (the backup's end) .. ``end``
    (the last archive cycle its WAL chain reaches), and that chain's segment names."""

    entry: BackupEntry
    start: float
    end: float | None  # None: the chain reaches no archive cycle after the backup
    segments: tuple[str, ...]
    problem: str = ""  # why ``end`` is None

    def covers(self, when: float) -> bool:
        return self.end is not None and self.start <= when <= self.end

    def describe(self) -> str:
        if self.end is None:
            return f"base backup {self.entry.backup_id}: nothing ({self.problem})"
        return (
            f"{wal.describe_time(self.start)} .. {wal.describe_time(self.end)} "
            f"(base backup {self.entry.backup_id})"
        )


@dataclass(frozen=True)
class Plan:
    entry: BackupEntry
    target_time: float | None  # None: the end of the archived WAL
    window: Window

    @property
    def segments(self) -> tuple[str, ...]:
        return self.window.segments


def backup_end_time(entry: BackupEntry) -> float:
    """When the base backup was consistent (start + the postgres component's duration)."""
    duration = entry.manifest["components"]["postgres"].get("duration_seconds", 0)
    return entry.created_unix + (float(duration) if isinstance(duration, int | float) else 0)


def parse_lsn(text: object) -> int | None:
    if not isinstance(text, str) or "/" not in text:
        return None
    high, _, low = text.partition("/")
    try:
        return (int(high, 16) << 32) | int(low, 16)
    except ValueError:
        return None


def segment_name(timeline: int, lsn: int) -> str:
    """The WAL file holding byte ``lsn`` (pg_walfile_name)."""
    number = lsn // wal.SEGMENT_SIZE
    return f"{timeline:08X}{number // SEGMENTS_PER_LOG:08X}{number % SEGMENTS_PER_LOG:08X}"


def segment_number(name: str) -> int:
    return int(name[8:16], 16) * SEGMENTS_PER_LOG + int(name[16:24], 16)


def _cycles(index: dict[str, Any]) -> list[tuple[float, int]]:
    """(time, end LSN) of every well-formed archive cycle, oldest first."""
    found = []
    for cycle in index.get("cycles", []):
        if not isinstance(cycle, dict) or not isinstance(cycle.get("at"), int | float):
            continue
        lsn = parse_lsn(cycle.get("end_lsn"))
        if lsn is not None:
            found.append((float(cycle["at"]), lsn))
    return sorted(found)


def start_segment(entry: BackupEntry, index: dict[str, Any]) -> str | None:
    physical = entry.manifest["components"]["postgres"].get("physical", {})
    recorded = physical.get(START_FIELD) if isinstance(physical, dict) else None
    if isinstance(recorded, str) and wal.SEGMENT.fullmatch(recorded):
        return recorded
    # Older backups: the switch point of the last cycle before the backup began, on the
    # timeline the archive holds (only when it holds one: otherwise it cannot be told).
    before = [lsn for at, lsn in _cycles(index) if at <= entry.created_unix]
    timelines = {name[:8] for name in index["segments"] if wal.SEGMENT.fullmatch(name)}
    if not before or len(timelines) != 1:
        return None
    return segment_name(int(timelines.pop(), 16), before[-1])


def next_history(entry: BackupEntry, index: dict[str, Any]) -> float:
    """When the archive began following another WAL history after this backup was taken
    (wal-archive found its slot gone: the cluster was restored or replaced); infinity if
    it has not. Segments archived from then on are not this backup's WAL."""
    starts = index.get("histories", [])
    later = [
        float(t)
        for t in (starts if isinstance(starts, list) else [])
        if isinstance(t, int | float) and t > entry.created_unix
    ]
    return min(later, default=float("inf"))


def window_of(entry: BackupEntry, index: dict[str, Any]) -> Window:
    start = backup_end_time(entry)
    first = start_segment(entry, index)
    if first is None:
        return Window(entry, start, None, (), "no WAL archived from its start")
    timeline = first[:8]
    history_end = next_history(entry, index)
    segments: dict[str, Any] = index["segments"]
    chain: list[str] = []
    number = segment_number(first)
    while True:
        name = segment_name(int(timeline, 16), number * wal.SEGMENT_SIZE)
        record = segments.get(name)
        archived_at = record.get("archived_at") if isinstance(record, dict) else None
        if not isinstance(archived_at, int | float):
            break
        if not entry.created_unix <= archived_at < history_end:
            break
        chain.append(name)
        number += 1
    if not chain:
        return Window(entry, start, None, (), f"segment {first} is not archived after it began")
    reached = reached_cycles(entry, index, chain)
    if not reached or reached[-1][0] < start:
        return Window(entry, start, None, (), "no archive cycle after it yet")
    # Only what recovery to the window's end needs: up to the segment its last cycle closed.
    end, last = max(reached)
    return Window(entry, start, end, tuple(n for n in chain if segment_number(n) <= last))


def closing_segment(timeline: int, end_lsn: int) -> str:
    """The segment an archive cycle's pg_switch_wal() closed: the one ending at the last
    segment boundary at or before the cycle's ``end_lsn``. That is pg_current_wal_lsn() read
    just *after* the switch: on a live server another session's commit may already lie past
    the switch point, inside a segment the cycle did not receive whole (the next cycle
    archives it), whereas every segment ending at or before ``end_lsn`` it did. The cycle's
    marker commit, stamped after its time, precedes the switch: recovery to the cycle's
    time, or to the end of this segment, needs nothing later."""
    boundary = end_lsn - end_lsn % wal.SEGMENT_SIZE
    return segment_name(timeline, boundary - 1)


def reached_cycles(
    entry: BackupEntry, index: dict[str, Any], chain: Sequence[str]
) -> list[tuple[float, int]]:
    """(time, number of the segment it closed) of every archive cycle ``chain`` (the
    backup's contiguous archived segments, oldest first) reaches, oldest first: the chain
    holds the segment the cycle closed (closing_segment), archived after the cycle (a cycle
    of a later timeline whose LSN falls in this chain's range was not archived by it), in
    the backup's WAL history. The one rule for restore, resolve, the drill and off-host
    pulls: ``--target latest`` (the archive's last cycle) is reached whenever the chain is
    whole."""
    if not chain:
        return []
    timeline = int(chain[0][:8], 16)
    members = set(chain)
    history_end = next_history(entry, index)
    found = []
    for at, lsn in _cycles(index):
        if at >= history_end:
            break
        last = closing_segment(timeline, lsn)
        if last in members and float(index["segments"][last]["archived_at"]) >= at:
            found.append((at, segment_number(last)))
    return found


def plan(store: BackupStore, target_time: float | None, backup_id: str | None = None) -> Plan:
    """The base backup to recover from to ``target_time`` (None: the end of the archive,
    its last cycle): ``backup_id`` when given, else the newest one that ended before it, is
    not dated in the future and has not failed a verification, and whose WAL chain reaches
    it without a gap. Raises ``TargetOutOfRange`` with every candidate's range otherwise."""
    index, covered = wal.archived_range(store)
    if covered is None:
        raise TargetOutOfRange(
            f"{ARGUMENT}: no WAL archive in {wal.wal_dir(store)} (the backup job's wal-archive "
            "makes it every minute); nothing was changed"
        )
    if backup_id not in (None, "latest"):
        entry = store.get(backup_id)
        if "physical" not in entry.pg_forms:
            raise BackupError(
                f"{ARGUMENT}: backup {entry.backup_id} has no physical base backup of "
                "PostgreSQL (taken without --pg-physical); a point-in-time recovery starts "
                "from one; nothing was changed"
            )
        candidates = [entry]
        skipped: list[str] = []
    else:
        physical = [e for e in store.entries() if not e.future and "physical" in e.pg_forms]
        failed = [e for e in physical if e.verification and not e.verification.get("ok")]
        skipped = [
            f"{e.backup_id} (its last verification failed; name its id to use it anyway)"
            for e in failed
        ]
        candidates = [e for e in physical if e not in failed]
        if not candidates:
            raise TargetOutOfRange(
                f"{ARGUMENT}: no usable base backup in {store.root}"
                + (f"; skipped {', '.join(skipped)}" if skipped else "")
                + "; nothing was changed"
            )
    windows = [window_of(entry, index) for entry in reversed(candidates)]  # newest first
    # latest: the end of the archive, never silently an earlier point some older backup
    # still reaches when the newest chain is broken (the operator picks that time then).
    wanted = covered if target_time is None else target_time
    for window in windows:
        if window.covers(wanted):
            return Plan(window.entry, target_time, window)
    value = (
        f"--target latest (the archive's end, {wal.describe_time(covered)})"
        if target_time is None
        else f"--target-time {wal.describe_time(target_time)}"
    )
    ranges = "; ".join(w.describe() for w in windows[:3])
    more = f" (and {len(windows) - 3} older)" if len(windows) > 3 else ""
    note = f"; skipped {', '.join(skipped)}" if skipped else ""
    raise TargetOutOfRange(
        f"{value} is outside what is archived: expected a time in {ranges}{more}{note}; "
        "nothing was changed"
    )
