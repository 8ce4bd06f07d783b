"""Continuous off-host copies of the WAL archive (issue 14 items 3 and 4): after each
``wal-archive`` cycle, ``offsite wal-push`` copies the new encrypted segments to the stack's
off-host target, reads each back (size, SHA-256) and only then lists it in the remote index;
``offsite prune`` deletes remote WAL no kept remote base backup needs; ``offsite pull
--with-wal`` brings a base backup's WAL back, checked, for a point-in-time restore on a new
host.

Remote layout, under the stack's remote (``<path>/<stack>``, beside the backup folders)::

    wal/<system identifier>/<segment>.zst.gpg   the segments, exactly as at rest locally
    wal/<system identifier>/index.json          the segments proven there (name, file, size,
                                                sha256, archived_at), covered_until, cycles

One folder per cluster lineage (PostgreSQL's system identifier: new at each initdb, kept by a
physical restore): a rebuilt host's fresh cluster reuses segment names, and must never
overwrite the old host's WAL that its off-host base backups need. A PITR restore promotes to a
new timeline, so its WAL has new names in the same folder.

What is proven off-host is recorded locally, in ``BACKUP_DIR/wal/offsite.json`` (per remote):
a segment in it is never uploaded again; a crash before it is recorded means one more upload
of the same bytes (same path), nothing else. ``covered_until`` in the remote index is the
local archive's only once every local segment of that lineage is proven off-host: every
commit before it is archived, encrypted, at rest locally AND verified off-host. The remote
index is untrusted when read back (prune of other lineages, pull): every field is checked,
every pulled byte is hashed before it appears locally."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rag_backup import wal
from rag_backup.crypto import AGE_MAGIC, GPG_FIRST_BYTES
from rag_backup.errors import BackupError
from rag_backup.metrics import read_samples, write_atomic
from rag_backup.progress import log
from rag_backup.store import BackupEntry, BackupStore, fsync_dir, write_json_atomic
from rag_backup.streams import file_sha256

if TYPE_CHECKING:  # offsite imports this module
    from rag_backup.offsite import Rclone

REMOTE_DIR = "wal"
REMOTE_INDEX = "index.json"
RECORD = "offsite.json"
LOCK = ".offsite.lock"
LOCK_WAIT_S = 900  # the nightly prune waits for a push (seconds, even after an outage)
METRICS_FILE = "rag_backup_offsite_wal.prom"
LAST_SUCCESS = "rag_backup_offsite_wal_last_success_timestamp_seconds"
LAST_RUN_SUCCESS = "rag_backup_offsite_wal_last_run_success"
ARCHIVED_UNTIL = "rag_backup_offsite_wal_archived_until_timestamp_seconds"
# A compressed, encrypted 16 MiB segment is smaller; anything larger is not one of ours.
SEGMENT_MAX_BYTES = 2 * wal.SEGMENT_SIZE
INDEX_MAX_BYTES = 64 << 20
SYSTEM = re.compile(r"^[0-9]{1,20}$")
_SEGMENT_FILE = re.compile(r"^([0-9A-F]{24})\.zst\.(gpg|age)$")
# A segment of an earlier history of the same cluster under a name a later one reuses (a
# physical restore without a new timeline), kept aside off-host: <file>.superseded-<time>.
SUPERSEDED = wal.SUPERSEDED  # one literal for local and remote set-aside copies
_SUPERSEDED_FILE = re.compile(r"^([0-9A-F]{24})\.zst\.(gpg|age)\.superseded-[0-9]{1,12}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_LSN = re.compile(r"^[0-9A-F]{1,8}/[0-9A-F]{1,8}$")


# --------------------------------------------------------------------------- local state


@dataclass
class Record:
    """What this host proved off-host on ``remote`` (BACKUP_DIR/wal/offsite.json)."""

    remote: str
    # "<system identifier>/<segment>": two lineages may hold the same segment name.
    segments: dict[str, dict[str, Any]] = field(default_factory=dict)
    covered_until: dict[str, float] = field(default_factory=dict)  # per lineage
    pruned_before: float = 0.0  # remote prune horizon: older segments are not pushed again
    superseded: list[dict[str, Any]] = field(default_factory=list)  # set aside off-host

    @classmethod
    def load(cls, store: BackupStore, remote: str) -> Record:
        try:
            data = json.loads((wal.wal_dir(store) / RECORD).read_text())
        except (OSError, ValueError):
            return cls(remote)
        if not isinstance(data, dict) or data.get("remote") != remote:
            return cls(remote)  # another target: everything goes there anew
        segments = data.get("segments")
        covered = data.get("covered_until")
        pruned = data.get("pruned_before")
        aside = data.get("superseded")
        return cls(
            remote,
            dict(segments) if isinstance(segments, dict) else {},
            {str(k): float(v) for k, v in covered.items() if isinstance(v, int | float)}
            if isinstance(covered, dict)
            else {},
            float(pruned) if isinstance(pruned, int | float) else 0.0,
            [a for a in aside if isinstance(a, dict)] if isinstance(aside, list) else [],
        )

    def save(self, store: BackupStore) -> None:
        write_json_atomic(
            wal.wal_dir(store) / RECORD,
            {
                "remote": self.remote,
                "segments": self.segments,
                "covered_until": self.covered_until,
                "pruned_before": self.pruned_before,
                "superseded": self.superseded,
            },
        )


@contextlib.contextmanager
def offsite_lock(store: BackupStore, wait_s: float) -> Iterator[None]:
    """One wal-push or WAL prune at a time (they run in the scheduler's two threads)."""
    directory = wal.wal_dir(store)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    handle = open(directory / LOCK, "a+")  # noqa: SIM115 - held for the with-block
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BackupError(
                        f"another off-host WAL run holds {directory / LOCK}"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        handle.close()


def segment_lineage(index: dict[str, Any], record: dict[str, Any]) -> str:
    """A segment's system identifier (segments archived before it was recorded: the
    archive's)."""
    system = str(record.get("system_identifier") or index.get("system_identifier") or "")
    if not SYSTEM.match(system):
        raise BackupError(
            f"{wal.WAL_DIR}/{wal.INDEX}: no system identifier recorded yet; the next "
            "wal-archive cycle records it"
        )
    return system


def check_ciphertext(path: Path) -> None:
    """Nothing plaintext leaves the host: a WAL file must start like gpg or age output."""
    with open(path, "rb") as handle:
        head = handle.read(len(AGE_MAGIC))
    if not (head.startswith(AGE_MAGIC) or (head and head[0] in GPG_FIRST_BYTES)):
        raise BackupError(f"{path.name} does not look like ciphertext; not copied off the host")


# --------------------------------------------------------------------------- remote


def _not_found(error: BackupError) -> bool:
    """rclone's exit code 3: directory not found (4: file not found)."""
    return getattr(error, "code", None) in (3, 4)


def lineage_path(rclone: Rclone, system: str, *parts: str) -> str:
    return str(rclone.target.path(REMOTE_DIR, system, *parts))


def remote_lineages(rclone: Rclone) -> list[str]:
    try:
        data = rclone.run("lsjson", "lsjson", "--dirs-only", rclone.target.path(REMOTE_DIR))
    except BackupError as error:
        if _not_found(error):  # nothing pushed yet
            return []
        raise
    names = [str(item.get("Name")) for item in rclone._json(data, "lsjson")]
    return sorted(name for name in names if SYSTEM.match(name))


def parse_remote_index(data: bytes, system: str) -> dict[str, Any]:
    """A remote lineage index, every field checked (it is untrusted); raises BackupError
    naming what is wrong."""
    where = f"off-host {REMOTE_DIR}/{system}/{REMOTE_INDEX}"
    try:
        index = json.loads(data)
    except (ValueError, RecursionError) as error:
        raise BackupError(f"{where}: not valid JSON: {error}") from error
    if not isinstance(index, dict) or index.get("system_identifier") != system:
        raise BackupError(f"{where}: not an index of system {system}")
    segments = index.get("segments")
    if not isinstance(segments, dict):
        raise BackupError(f"{where}: no segments")
    checked: dict[str, dict[str, Any]] = {}
    for name, item in segments.items():
        if not isinstance(item, dict) or not wal.SEGMENT.fullmatch(str(name)):
            raise BackupError(f"{where}: {name!r} is not a WAL segment entry")
        checked[name] = _segment_entry(where, name, item, _SEGMENT_FILE)
    aside = index.get("superseded") or []
    if not isinstance(aside, list):
        raise BackupError(f"{where}: superseded is not a list")
    superseded = []
    for item in aside:
        name = item.get("name") if isinstance(item, dict) else None
        if not isinstance(name, str) or not wal.SEGMENT.fullmatch(name):
            raise BackupError(f"{where}: a superseded entry names no WAL segment")
        superseded.append({"name": name, **_segment_entry(where, name, item, _SUPERSEDED_FILE)})
    histories = index.get("histories") or []
    if not isinstance(histories, list) or not all(_is_time(h) for h in histories):
        raise BackupError(f"{where}: histories is not a list of times")
    covered = index.get("covered_until")
    if covered is not None and (isinstance(covered, bool) or not isinstance(covered, int | float)):
        raise BackupError(f"{where}: covered_until is not a time")
    cycles = []
    for cycle in index.get("cycles") or []:
        if not (
            isinstance(cycle, dict)
            and isinstance(cycle.get("at"), int | float)
            and not isinstance(cycle.get("at"), bool)
            and isinstance(cycle.get("xid"), int)
            and not isinstance(cycle.get("xid"), bool)
            and isinstance(cycle.get("end_lsn"), str)
            and _LSN.match(cycle["end_lsn"])
        ):
            raise BackupError(f"{where}: a cycle is not {{at, xid, end_lsn}}")
        cycles.append({"at": float(cycle["at"]), "xid": cycle["xid"], "end_lsn": cycle["end_lsn"]})
    return {
        "system_identifier": system,
        "segments": checked,
        "superseded": superseded,
        "covered_until": float(covered) if covered is not None else None,
        "cycles": cycles,
        "histories": [float(h) for h in histories],
    }


def _is_time(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _segment_entry(
    where: str, name: str, item: dict[str, Any], file_pattern: re.Pattern[str]
) -> dict[str, Any]:
    file, size, sha, at = (item.get(k) for k in ("file", "size", "sha256", "archived_at"))
    match = file_pattern.match(file) if isinstance(file, str) else None
    if match is None or match[1] != name:
        raise BackupError(f"{where}: {name}: file {file!r} is not {name}.zst.gpg/.age")
    if isinstance(size, bool) or not isinstance(size, int) or not 0 < size <= SEGMENT_MAX_BYTES:
        raise BackupError(f"{where}: {name}: size {size!r} is not a segment's")
    if not isinstance(sha, str) or not _SHA256.match(sha):
        raise BackupError(f"{where}: {name}: sha256 is not 64 hex digits")
    if not isinstance(at, int | float) or isinstance(at, bool):
        raise BackupError(f"{where}: {name}: archived_at is not a time")
    return {"file": file, "size": size, "sha256": sha, "archived_at": float(at)}


def read_remote_index(rclone: Rclone, system: str) -> dict[str, Any] | None:
    """The lineage's remote index, checked; None when there is none."""
    try:
        data = rclone.read_small(lineage_path(rclone, system, REMOTE_INDEX), INDEX_MAX_BYTES)
    except BackupError as error:
        if _not_found(error):
            return None
        raise
    return parse_remote_index(data, system)


def _write_remote_index(rclone: Rclone, system: str, index: dict[str, Any]) -> None:
    """Upload, then read back: the index vouches for the segments, so it is proven too."""
    data = json.dumps(index, indent=1, sort_keys=True).encode()
    path = lineage_path(rclone, system, REMOTE_INDEX)
    rclone.write(path, data)
    size, digest = rclone.stream_sha256(path, len(data))
    if size != len(data) or digest != hashlib.sha256(data).hexdigest():
        raise BackupError(f"off-host {REMOTE_DIR}/{system}/{REMOTE_INDEX} did not read back")


# --------------------------------------------------------------------------- push


@dataclass(frozen=True)
class PushResult:
    pushed: list[str]
    covered_until: float | None  # of the current lineage, proven off-host


def push_wal(rclone: Rclone, store: BackupStore) -> PushResult:
    """Copy every locally archived segment not yet proven off-host, read each back, then
    rewrite the remote index of every lineage that changed. Raises after trying all when
    any segment failed (the ones that passed are recorded)."""
    if not (wal.wal_dir(store) / wal.INDEX).exists():
        raise BackupError(f"no WAL archive in {wal.wal_dir(store)} (run rag-backup wal-archive)")
    with offsite_lock(store, LOCK_WAIT_S):
        index = wal.read_index(store)  # written atomically: a consistent snapshot
        record = Record.load(store, rclone.target.remote)
        current = str(index.get("system_identifier") or "")
        pushed: list[str] = []
        errors: list[str] = []
        lineage_complete: dict[str, bool] = {}
        changed: set[str] = set()
        for name, item in sorted(index["segments"].items()):
            system = segment_lineage(index, item)
            lineage_complete.setdefault(system, True)
            key = f"{system}/{name}"
            done = record.segments.get(key) or {}
            proven = (done.get("sha256"), done.get("system_identifier"))
            if proven == (item.get("sha256"), system):
                continue
            if float(item.get("archived_at", 0)) < record.pruned_before:
                continue  # pruned off-host already: no kept base backup needs it
            path = wal.wal_dir(store) / str(item.get("file", ""))
            if not path.is_file() and name not in wal.read_index(store)["segments"]:
                continue  # pruned locally since the snapshot
            try:
                if not wal.ARTIFACT_NAME.fullmatch(path.name) or not path.is_file():
                    raise BackupError(f"listed in {wal.INDEX} as {path.name}, which is missing")
                if done.get("system_identifier") == system:
                    # Another history of this cluster reuses the name: the copy off-host
                    # (which its base backups need) is set aside, never overwritten.
                    aside = _set_aside(rclone, system, done)
                    record.superseded.append({**done, "name": name, "file": aside})
                    del record.segments[key]
                    record.save(store)
                    changed.add(system)
                _push_segment(rclone, system, name, item, path)
            except BackupError as error:
                lineage_complete[system] = False
                errors.append(f"{name}: {error}")
                log(f"offsite: WAL {name} FAILED: {error}")
                continue
            record.segments[key] = {
                "name": name,
                "system_identifier": system,
                "file": path.name,
                "size": int(item["size"]),
                "sha256": str(item["sha256"]),
                "archived_at": float(item.get("archived_at", 0)),
            }
            record.save(store)  # proven: never uploaded again, even after a crash
            pushed.append(name)
            changed.add(system)
        covered = index.get("covered_until")
        complete = current and lineage_complete.get(current, True)
        if (
            complete
            and isinstance(covered, int | float)
            and (record.covered_until.get(current) != covered)
        ):
            record.covered_until[current] = float(covered)
            changed.add(current)
        for system in sorted(changed):
            try:
                _write_remote_index(rclone, system, _lineage_index(record, system, index, current))
            except BackupError as error:
                errors.append(f"index of {system}: {error}")
                record.covered_until.pop(system, None)  # not proven: the next run writes it
        record.save(store)
        if errors:
            raise BackupError("off-host WAL copy failed: " + "; ".join(errors))
        return PushResult(pushed, record.covered_until.get(current))


def _set_aside(rclone: Rclone, system: str, done: dict[str, Any]) -> str:
    aside = f"{done['file']}{SUPERSEDED}{int(float(done.get('archived_at', 0)))}"
    try:
        rclone.run(
            "moveto",
            "moveto",
            lineage_path(rclone, system, str(done["file"])),
            lineage_path(rclone, system, aside),
        )
    except BackupError as error:
        # Moved before a crash, not yet recorded: the aside copy is there.
        listed = rclone.run("lsjson", "lsjson", lineage_path(rclone, system, aside))
        if not _not_found(error) or not rclone._json(listed, "lsjson"):
            raise
    log(f"offsite: WAL {done['file']} of an earlier history kept off-host as {aside}")
    return aside


def _push_segment(rclone: Rclone, system: str, name: str, item: dict[str, Any], path: Path) -> None:
    check_ciphertext(path)
    size, digest = file_sha256(path)
    if size != item.get("size") or digest != item.get("sha256"):
        raise BackupError(f"the local file {path.name} does not match the WAL index; not copied")
    remote_path = lineage_path(rclone, system, path.name)
    rclone.upload(path, remote_path)
    got_size, got_digest = rclone.stream_sha256(remote_path, size)
    if got_size != size or got_digest != digest:
        raise BackupError(f"the off-host copy of {path.name} did not read back identical")


def _lineage_index(
    record: Record, system: str, index: dict[str, Any], current: str
) -> dict[str, Any]:
    segments = {
        str(item["name"]): {k: item[k] for k in ("file", "size", "sha256", "archived_at")}
        for item in record.segments.values()
        if item.get("system_identifier") == system
    }
    cycles = [
        c
        for c in (index.get("cycles", []) if system == current else [])
        if isinstance(c, dict) and float(c.get("at", 0)) >= record.pruned_before
    ]
    histories = index.get("histories", []) if system == current else []
    return {
        "system_identifier": system,
        "segments": segments,
        "superseded": [a for a in record.superseded if a.get("system_identifier") == system],
        "covered_until": record.covered_until.get(system),
        "cycles": cycles,
        "histories": [h for h in histories if _is_time(h)],
    }


# --------------------------------------------------------------------------- verify


def verify_wal(rclone: Rclone, store: BackupStore) -> int:
    """Read every segment this host proved off-host back again; a mismatch is dropped
    from the record (the next push uploads it again) and fails the run. Returns how many."""
    with offsite_lock(store, LOCK_WAIT_S):
        record = Record.load(store, rclone.target.remote)
        problems = []
        for key, item in sorted(record.segments.items()):
            remote_path = lineage_path(rclone, str(item["system_identifier"]), str(item["file"]))
            size, digest = rclone.stream_sha256(remote_path, int(item["size"]))
            if size != item["size"] or digest != item["sha256"]:
                problems.append(f"{item['name']}: corrupted or missing off-host")
                del record.segments[key]
                record.covered_until.pop(str(item["system_identifier"]), None)
        record.save(store)
        if problems:
            raise BackupError(
                "off-host WAL failed verification (the next wal-push uploads it again): "
                + "; ".join(problems)
            )
        return len(record.segments)


# --------------------------------------------------------------------------- prune


def prune_wal(
    rclone: Rclone, horizon: float, dry_run: bool, store: BackupStore | None
) -> list[str]:
    """Delete remote segments archived before ``horizon`` (the start of the oldest kept
    remote base backup: all their WAL precedes it), in every lineage. The index first: a
    crash leaves a stray file, never a listed segment that is gone."""
    removed: list[str] = []
    lock = offsite_lock(store, LOCK_WAIT_S) if store is not None else contextlib.nullcontext()
    with lock:
        record = Record.load(store, rclone.target.remote) if store is not None else None
        for system in remote_lineages(rclone):
            try:
                index = read_remote_index(rclone, system)
            except BackupError as error:
                log(f"offsite: leaving WAL of {system} alone ({error})")
                continue
            if index is None:
                continue
            doomed = sorted(n for n, i in index["segments"].items() if i["archived_at"] < horizon)
            old_aside = [a for a in index["superseded"] if a["archived_at"] < horizon]
            if not doomed and not old_aside:
                continue
            log(
                f"offsite: {'would delete' if dry_run else 'delete'} {len(doomed)} WAL "
                f"segment(s) of system {system} archived before the oldest kept base backup"
            )
            removed += doomed
            if dry_run:
                continue
            files = [index["segments"].pop(name)["file"] for name in doomed]
            files += [a["file"] for a in old_aside]
            index["superseded"] = [a for a in index["superseded"] if a not in old_aside]
            index["cycles"] = [c for c in index["cycles"] if c["at"] >= horizon]
            if record is not None:
                for name in doomed:
                    record.segments.pop(f"{system}/{name}", None)
                gone = {a["file"] for a in old_aside}
                record.superseded = [a for a in record.superseded if a.get("file") not in gone]
                record.pruned_before = max(record.pruned_before, horizon)
                assert store is not None
                record.save(store)
            if index["segments"] or index["superseded"]:
                _write_remote_index(rclone, system, index)
            else:
                rclone.run("deletefile", "deletefile", lineage_path(rclone, system, REMOTE_INDEX))
            _delete_files(rclone, system, files)
    return removed


def _delete_files(rclone: Rclone, system: str, files: list[str]) -> None:
    with tempfile.NamedTemporaryFile("w", prefix="rag-wal-prune-", suffix=".txt") as listing:
        listing.write("\n".join(files) + "\n")
        listing.flush()
        rclone.run(
            "delete", "delete", "--files-from-raw", listing.name, lineage_path(rclone, system)
        )


def oldest_kept_base_backup(kept: list[BackupEntry]) -> float | None:
    starts = [e.created_unix for e in kept if "physical" in e.pg_forms]
    return min(starts) if starts else None


# --------------------------------------------------------------------------- pull


def backup_lineage(manifest: dict[str, Any]) -> str | None:
    physical = manifest.get("components", {}).get("postgres", {}).get("physical")
    system = physical.get("system_identifier") if isinstance(physical, dict) else None
    return str(system) if isinstance(system, str) and SYSTEM.match(system) else None


@dataclass(frozen=True)
class WalPlan:
    system: str
    index: dict[str, Any]
    names: list[str]  # the segments to fetch, oldest first


def plan_wal_pull(rclone: Rclone, store: BackupStore, manifest: dict[str, Any]) -> WalPlan:
    """Which lineage and segments a base backup needs, and that they can land in
    ``store`` without touching another cluster's archive. Raises before anything is written."""
    backup_id = str(manifest.get("id"))
    lineages = remote_lineages(rclone)
    system = backup_lineage(manifest)
    if system is None:
        if len(lineages) != 1:
            raise BackupError(
                f"backup {backup_id} does not record its cluster's system identifier and the "
                f"target holds WAL of {len(lineages)} clusters ({', '.join(lineages) or 'none'})"
            )
        system = lineages[0]
    if system not in lineages:
        raise BackupError(f"no off-host WAL of backup {backup_id}'s cluster (system {system})")
    index = read_remote_index(rclone, system)
    if index is None or index["covered_until"] is None:
        raise BackupError(f"off-host WAL of system {system} has no complete index")
    created = float(manifest["created_unix"])
    names = sorted(n for n, i in index["segments"].items() if i["archived_at"] >= created)
    if not names:
        raise BackupError(f"no off-host WAL archived after backup {backup_id} (system {system})")
    _check_consecutive(names, system)
    plan = WalPlan(system, index, names)
    check_local(store, plan)
    return plan


def check_local(store: BackupStore, plan: WalPlan) -> None:
    """The planned segments can land in ``store``'s WAL archive without overwriting
    anything: it holds no other cluster's WAL, and no planned segment there differs."""
    system, index, names = plan.system, plan.index, plan.names
    local = wal.read_index(store) if (wal.wal_dir(store) / wal.INDEX).exists() else None
    if local is not None:
        others = {
            str(item.get("system_identifier") or local.get("system_identifier"))
            for item in local["segments"].values()
        }
        if local.get("system_identifier"):
            others.add(str(local["system_identifier"]))
        if others - {system}:
            raise BackupError(
                f"{wal.wal_dir(store)} holds the WAL archive of another cluster (this host's "
                f"own?); pull into a fresh --backup-dir, e.g. {store.root}/offsite-pitr"
            )
        for name in names:
            mine = local["segments"].get(name)
            if mine is not None and mine.get("sha256") != index["segments"][name]["sha256"]:
                raise BackupError(f"{name} differs from the one in {wal.wal_dir(store)}")


def _segno(name: str) -> int:
    return int(name[8:16], 16) * 0x100000000 // wal.SEGMENT_SIZE + int(name[16:24], 16)


def _check_consecutive(names: list[str], system: str) -> None:
    """Within each timeline, no segment missing: recovery would stop at a gap."""
    by_timeline: dict[str, list[int]] = {}
    for name in names:
        by_timeline.setdefault(name[:8], []).append(_segno(name))
    for timeline, numbers in by_timeline.items():
        for before, after in itertools.pairwise(numbers):
            if after != before + 1:
                raise BackupError(
                    f"off-host WAL of system {system} has a gap on timeline {timeline} after "
                    f"segment number {before:X}: point-in-time recovery cannot cross it"
                )


@contextlib.contextmanager
def alongside(
    rclone: Rclone,
    store: BackupStore,
    manifest: dict[str, Any],
    with_wal: bool,
    planned: WalPlan | None = None,
) -> Iterator[None]:
    """Around pulling a base backup (``with_wal``; else nothing): plan its WAL (refusing a
    store whose archive is another cluster's) and download every planned segment into a
    private folder beside BACKUP_DIR/wal, each checked against the (validated) remote index,
    before the backup is pulled; once the pull succeeded (also when it found the backup
    already there), move them into BACKUP_DIR/wal and write its index last. A failure
    anywhere leaves BACKUP_DIR/wal as it was; the private folder goes in any case.
    ``planned``: these segments (a point-in-time plan, offsite_pitr), not every one since."""
    if not with_wal:
        yield
        return
    if planned is not None:
        check_local(store, planned)
    plan = planned or plan_wal_pull(rclone, store, manifest)
    store.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-wal-pull-", dir=store.root))
    try:
        _fetch(rclone, store, plan, tmp)
        yield  # the base backup is pulled here
        _install(store, plan, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _fetch(rclone: Rclone, store: BackupStore, plan: WalPlan, tmp: Path) -> None:
    target = wal.wal_dir(store)
    for name in plan.names:
        item = plan.index["segments"][name]
        have = target / item["file"]
        if have.is_file() and file_sha256(have) == (item["size"], item["sha256"]):
            continue
        if os.path.lexists(have):  # not in its index (checked): still never overwritten
            raise BackupError(
                f"{have} is there and differs from the off-host {name}; not overwritten: "
                "move it away, or pull into a fresh --backup-dir; nothing was written"
            )
        path = tmp / item["file"]
        rclone.download(lineage_path(rclone, plan.system, item["file"]), path)
        size, digest = file_sha256(path)
        if size != item["size"] or digest != item["sha256"]:
            raise BackupError(
                f"off-host WAL {name} is corrupted: {size} bytes, SHA-256 {digest[:12]}...; "
                f"the index records {item['size']} bytes, {item['sha256'][:12]}...; "
                "nothing was written"
            )
        check_ciphertext(path)


def _install(store: BackupStore, plan: WalPlan, tmp: Path) -> None:
    target = wal.wal_dir(store)
    target.mkdir(mode=0o700, exist_ok=True)
    with wal.archive_lock(target):
        fetched = 0
        for path in tmp.iterdir():
            os.replace(path, target / path.name)
            fetched += 1
        fsync_dir(target)
        local = wal.read_index(store) if (target / wal.INDEX).exists() else {"segments": {}}
        for name in plan.names:
            local["segments"][name] = {
                **plan.index["segments"][name],
                "system_identifier": plan.system,
            }
        local["system_identifier"] = plan.system
        local["covered_until"] = max(
            float(plan.index["covered_until"]), float(local.get("covered_until") or 0)
        )
        cycles = [c for c in local.get("cycles", []) if isinstance(c, dict)]
        seen = {c.get("at") for c in cycles}
        cycles += [c for c in plan.index["cycles"] if c["at"] not in seen]
        local["cycles"] = sorted(cycles, key=lambda c: float(c.get("at", 0)))
        histories = [h for h in local.get("histories", []) if _is_time(h)]
        local["histories"] = sorted({*histories, *plan.index["histories"]})
        write_json_atomic(target / wal.INDEX, local)
    log(
        f"offsite: {len(plan.names)} WAL segment(s) of system {plan.system} in {target} "
        f"({fetched} downloaded), complete up to {wal.describe_time(plan.index['covered_until'])}"
    )


# --------------------------------------------------------------------------- metrics


def write_metrics(
    directory: Path, *, success: bool, run_timestamp: float, covered_until: float | None
) -> None:
    """A failed run keeps the previous values; a target that never succeeded reports 0,
    so OffsiteWalLagging fires."""
    path = directory / METRICS_FILE
    previous = read_samples(path)
    last = run_timestamp if success else previous.get((LAST_SUCCESS, None), 0.0)
    until = covered_until if covered_until is not None else previous.get((ARCHIVED_UNTIL, None))
    lines = [
        f"# HELP {ARCHIVED_UNTIL} Every commit before this Unix time is archived, encrypted and "
        "verified off-host (size and SHA-256 read back).",
        f"# TYPE {ARCHIVED_UNTIL} gauge",
        f"{ARCHIVED_UNTIL} {until or 0:.3f}",
        f"# HELP {LAST_SUCCESS} Unix time of the last successful off-host WAL copy run.",
        f"# TYPE {LAST_SUCCESS} gauge",
        f"{LAST_SUCCESS} {last:.0f}",
        f"# HELP {LAST_RUN_SUCCESS} 1 if the last off-host WAL copy run succeeded, else 0.",
        f"# TYPE {LAST_RUN_SUCCESS} gauge",
        f"{LAST_RUN_SUCCESS} {1 if success else 0}",
    ]
    write_atomic(path, "\n".join(lines) + "\n")
