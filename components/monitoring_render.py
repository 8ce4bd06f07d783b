"""Render one stack's monitoring files to a folder, without Pulumi (for linting in PRs).

    python -m components.monitoring_render --stack staging --out DIR [--config-file PATH]

Reads the non-secret settings from ``Pulumi.<stack>.yaml`` in the repository root and writes
prometheus.yml, alerts.yml and alertmanager.yml. The SMTP password is never read: the
Alertmanager config only names the file it will be mounted at.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from components.monitoring_config import (
    AppMetricNames,
    MonitoringConfigError,
    MonitoringSettings,
    render_all,
)

PROJECT = "personal-rag"
REPO_ROOT = Path(__file__).resolve().parent.parent


class StackFileError(ValueError):
    """The stack file is missing, unreadable or lacks a setting the monitoring needs."""


def read_stack_file(path: Path) -> dict[str, str]:
    """The ``personal-rag:`` keys of a Pulumi stack file (prefix removed), as strings.

    Secure values (``{secure: ...}``) are skipped: rendering never needs a secret.
    """
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StackFileError(
            f"stack file {path} does not exist; expected Pulumi.<stack>.yaml"
        ) from None
    except yaml.YAMLError as error:
        raise StackFileError(f"stack file {path} is not valid YAML: {error}") from None
    config = document.get("config") if isinstance(document, dict) else None
    if not isinstance(config, dict):
        raise StackFileError(f"stack file {path} has no 'config:' mapping")
    prefix = f"{PROJECT}:"
    return {
        key[len(prefix) :]: str(value)
        for key, value in config.items()
        if isinstance(key, str) and key.startswith(prefix) and not isinstance(value, dict)
    }


def settings_from_stack_config(stack: str, raw: Mapping[str, str]) -> MonitoringSettings:
    """MonitoringSettings from a stack's raw config (key -> string).

    The one place that maps stack config keys to monitoring settings; it reads only the
    keys monitoring needs so it can be swapped for ``components.config.parse_stack_config``.
    """
    problems: list[str] = []

    def required(key: str, expected: str) -> str:
        value = raw.get(key, "")
        if not value:
            problems.append(f"{PROJECT}:{key} is not set; expected {expected}")
        return value

    alert_email = required("alertEmail", "an email address, e.g. you@example.com")
    smarthost = required("smtpHost", "host:port, e.g. smtp.example.com:587")
    smtp_from = required("smtpFrom", "an email address, e.g. alerts@example.com")
    username = required("smtpUsername", "the SMTP login name")
    require_tls_text = raw.get("smtpRequireTls", "true").lower()
    if require_tls_text not in ("true", "false"):
        problems.append(
            f"{PROJECT}:smtpRequireTls = {raw['smtpRequireTls']!r} is invalid; "
            "expected true or false"
        )
    if problems:
        raise StackFileError(
            f"stack {stack!r} lacks monitoring settings:\n"
            + "\n".join(f"  - {p}" for p in problems)
        )
    defaults = AppMetricNames()
    metrics = AppMetricNames(
        cache_hits=raw.get("cacheHitsMetric") or defaults.cache_hits,
        cache_misses=raw.get("cacheMissesMetric") or defaults.cache_misses,
        llm_errors=raw.get("llmErrorsMetric") or defaults.llm_errors,
    )
    return MonitoringSettings(
        stack=stack,
        alert_email=alert_email,
        smtp_smarthost=smarthost,
        smtp_from=smtp_from,
        smtp_username=username,
        smtp_require_tls=require_tls_text != "false",
        heartbeat_url=raw.get("heartbeatUrl") or None,
        metrics=metrics,
    )


def write_files(files: Mapping[str, str], out_dir: Path) -> list[Path]:
    """Write each file atomically (temp file + rename) so a reader never sees half a file."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        target = out_dir / name
        temporary = out_dir / f".{name}.tmp"
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, target)
        written.append(target)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m components.monitoring_render",
        description="Write one stack's prometheus.yml, alerts.yml and alertmanager.yml.",
    )
    parser.add_argument("--stack", required=True, help="stack name, e.g. staging")
    parser.add_argument("--out", required=True, type=Path, help="folder to write the files to")
    parser.add_argument(
        "--config-file",
        type=Path,
        help="stack file to read (default: Pulumi.<stack>.yaml in the repository root)",
    )
    args = parser.parse_args(argv)
    config_file = args.config_file or REPO_ROOT / f"Pulumi.{args.stack}.yaml"
    try:
        settings = settings_from_stack_config(args.stack, read_stack_file(config_file))
    except (StackFileError, MonitoringConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in write_files(render_all(settings), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
