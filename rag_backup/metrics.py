"""Prometheus textfile metrics (node_exporter textfile collector), written atomically.
A failed run keeps the previous last-success timestamps so BackupTooOld keeps counting."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from pathlib import Path

BACKUP_FILE = "rag_backup.prom"
DRILL_FILE = "rag_restore_drill.prom"
STORE_FILE = "rag_backup_store.prom"
COMPONENTS = ("postgres", "redis", "chroma", "all")

_SAMPLE = re.compile(
    r'^(?P<name>[a-z_]+)(\{component="(?P<component>[a-z]+)"\})?\s+(?P<value>\S+)$'
)


def read_samples(path: Path) -> dict[tuple[str, str | None], float]:
    samples: dict[tuple[str, str | None], float] = {}
    try:
        text = path.read_text()
    except OSError:
        return samples
    for line in text.splitlines():
        match = _SAMPLE.match(line.strip())
        if match:
            try:
                samples[(match["name"], match["component"])] = float(match["value"])
            except ValueError:
                continue
    return samples


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _fmt(value: float) -> str:
    return repr(float(value)) if value != int(value) else f"{int(value)}"


def write_backup_metrics(
    directory: Path,
    *,
    success: bool,
    run_timestamp: float,
    durations: Mapping[str, float],
    sizes: Mapping[str, int],
) -> None:
    """``durations``/``sizes`` are per component of this run (with "all"); on failure they
    may be partial and the previous values stay."""
    path = directory / BACKUP_FILE
    previous = read_samples(path)
    last_success: dict[str, float] = {}
    duration: dict[str, float] = {}
    size: dict[str, float] = {}
    for component in COMPONENTS:
        key_success = ("rag_backup_last_success_timestamp_seconds", component)
        if success and component in durations:
            last_success[component] = run_timestamp
            duration[component] = durations[component]
            size[component] = sizes.get(component, 0)
        else:
            if key_success in previous:
                last_success[component] = previous[key_success]
            prev_duration = previous.get(("rag_backup_duration_seconds", component))
            if prev_duration is not None:
                duration[component] = prev_duration
            prev_size = previous.get(("rag_backup_size_bytes", component))
            if prev_size is not None:
                size[component] = prev_size
    lines = [
        "# HELP rag_backup_last_success_timestamp_seconds Unix time of the last successful "
        "backup of a component.",
        "# TYPE rag_backup_last_success_timestamp_seconds gauge",
        *[
            f'rag_backup_last_success_timestamp_seconds{{component="{c}"}} {_fmt(v)}'
            for c, v in last_success.items()
        ],
        "# HELP rag_backup_duration_seconds Duration of the last successful backup of a component.",
        "# TYPE rag_backup_duration_seconds gauge",
        *[f'rag_backup_duration_seconds{{component="{c}"}} {_fmt(v)}' for c, v in duration.items()],
        "# HELP rag_backup_size_bytes Encrypted size of the last successful backup of a component.",
        "# TYPE rag_backup_size_bytes gauge",
        *[f'rag_backup_size_bytes{{component="{c}"}} {_fmt(v)}' for c, v in size.items()],
        "# HELP rag_backup_last_run_timestamp_seconds Unix time the last backup run ended.",
        "# TYPE rag_backup_last_run_timestamp_seconds gauge",
        f"rag_backup_last_run_timestamp_seconds {_fmt(run_timestamp)}",
        "# HELP rag_backup_last_run_success 1 if the last backup run succeeded, else 0.",
        "# TYPE rag_backup_last_run_success gauge",
        f"rag_backup_last_run_success {1 if success else 0}",
    ]
    write_atomic(path, "\n".join(lines) + "\n")


def write_drill_metrics(
    directory: Path, *, success: bool, run_timestamp: float, duration_s: float | None
) -> None:
    path = directory / DRILL_FILE
    previous = read_samples(path)
    last_success = (
        run_timestamp
        if success
        else previous.get(("rag_restore_drill_last_success_timestamp_seconds", None))
    )
    duration = duration_s if success else previous.get(("rag_restore_drill_duration_seconds", None))
    lines = [
        "# HELP rag_restore_drill_last_success_timestamp_seconds Unix time of the last "
        "successful restore drill.",
        "# TYPE rag_restore_drill_last_success_timestamp_seconds gauge",
    ]
    if last_success is not None:
        lines.append(f"rag_restore_drill_last_success_timestamp_seconds {_fmt(last_success)}")
    lines += [
        "# HELP rag_restore_drill_last_run_timestamp_seconds Unix time the last drill ended.",
        "# TYPE rag_restore_drill_last_run_timestamp_seconds gauge",
        f"rag_restore_drill_last_run_timestamp_seconds {_fmt(run_timestamp)}",
        "# HELP rag_restore_drill_last_run_success 1 if the last restore drill succeeded, else 0.",
        "# TYPE rag_restore_drill_last_run_success gauge",
        f"rag_restore_drill_last_run_success {1 if success else 0}",
        "# HELP rag_restore_drill_duration_seconds Restore time (RTO) measured by the last "
        "successful drill.",
        "# TYPE rag_restore_drill_duration_seconds gauge",
    ]
    if duration is not None:
        lines.append(f"rag_restore_drill_duration_seconds {_fmt(duration)}")
    write_atomic(path, "\n".join(lines) + "\n")


def write_store_metrics(
    directory: Path, *, malformed: int, future: int, newest_verification_failed: bool
) -> None:
    """What the last scan of BACKUP_DIR found unusable (any command that lists it)."""
    lines = [
        "# HELP rag_backup_malformed_backups Backup folders skipped because their "
        "manifest.json is malformed.",
        "# TYPE rag_backup_malformed_backups gauge",
        f"rag_backup_malformed_backups {malformed}",
        "# HELP rag_backup_future_backups Backups dated more than an hour ahead of the "
        "clock (suspect: never latest, never a reason to prune).",
        "# TYPE rag_backup_future_backups gauge",
        f"rag_backup_future_backups {future}",
        "# HELP rag_backup_newest_verification_failed 1 if the newest backup's last "
        "verification failed (it exists but may not restore), else 0.",
        "# TYPE rag_backup_newest_verification_failed gauge",
        f"rag_backup_newest_verification_failed {1 if newest_verification_failed else 0}",
    ]
    write_atomic(directory / STORE_FILE, "\n".join(lines) + "\n")


def now() -> float:
    return time.time()
