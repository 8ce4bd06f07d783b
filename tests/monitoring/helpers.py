"""Shared helpers of the monitoring tests: settings, rendering to a folder, running tools."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

from components.monitoring_config import MonitoringSettings, default_probe_targets, render_all
from components.service_files import REDIS_PORT

TOOL_TIMEOUT_S = 60


def settings(**overrides: Any) -> MonitoringSettings:
    """Production-default settings for a stack named ``staging`` with ``overrides`` applied."""
    values: dict[str, Any] = {
        "stack": "staging",
        "alert_email": "oncall@example.com",
        "smtp_smarthost": "smtp.example.com:587",
        "smtp_from": "alerts@example.com",
        "smtp_username": "alerts@example.com",
        "domain": "staging.api.example.com",
    }
    merged = {**values, **overrides}
    # As the stack's settings: every probe, Redis's port from where the clients get it.
    merged.setdefault("probe_targets", default_probe_targets(merged["stack"], REDIS_PORT))
    return MonitoringSettings(**merged)


def render_to(directory: Path, monitoring: MonitoringSettings) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in render_all(monitoring).items():
        path = directory / name
        path.write_text(text, encoding="utf-8")
        paths[name] = path
    return paths


def run_tool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(args),
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT_S,
        check=False,
        cwd=cwd,
    )
