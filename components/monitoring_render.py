"""Render one stack's monitoring files to a folder, without Pulumi (for linting in PRs).

    python -m components.monitoring_render --stack staging --out DIR [--config-file PATH]

Reads the non-secret settings from ``Pulumi.<stack>.yaml`` in the repository root and writes
prometheus.yml, alerts.yml, alertmanager.yml and blackbox.yml. The SMTP password is never read: the
Alertmanager config only names the file it will be mounted at.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import yaml

from components.config import PROJECT, SECRET_KEYS, ConfigError, StackConfig, parse_stack_config
from components.containers import CONFIG_DIR
from components.monitoring_config import (
    DOCKER_VOLUMES_DIR,
    WATCHED_VOLUMES,
    AppMetricNames,
    MonitoringConfigError,
    MonitoringSettings,
    default_probe_targets,
    render_all,
)
from components.service_files import REDIS_PORT

# Where the Monitoring component mounts Alertmanager's SMTP password file.
SMTP_PASSWORD_FILE = f"{CONFIG_DIR}/secrets/smtp_password"
# Where the blackbox container finds the probe's Redis CA, client certificate and key.
PROBE_TLS_DIR = f"{CONFIG_DIR}/tls"

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


def settings_from_config(cfg: StackConfig) -> MonitoringSettings:
    """The one mapping from a stack's validated config to its monitoring settings, used by
    the Monitoring component and by this command."""
    return MonitoringSettings(
        stack=cfg.stack,
        alert_email=cfg.alert_email,
        smtp_smarthost=cfg.smtp.smarthost,
        smtp_from=cfg.smtp.sender,
        smtp_username=cfg.smtp.username,
        smtp_require_tls=cfg.smtp.require_tls,
        smtp_password_file=SMTP_PASSWORD_FILE,
        heartbeat_url=cfg.heartbeat_url,
        metrics=AppMetricNames(
            cache_hits=cfg.metrics.cache_hits,
            cache_misses=cfg.metrics.cache_misses,
            llm_errors=cfg.metrics.llm_errors,
        ),
        domain=cfg.domain,
        caddy_tls=cfg.caddy_tls,
        probe_tls_dir=PROBE_TLS_DIR,
        probe_targets=default_probe_targets(cfg.stack, REDIS_PORT),
        volume_paths=volume_host_paths(cfg),
        slo=cfg.slo,
        group_wait=cfg.page_timings.group_wait,
        group_interval=cfg.page_timings.group_interval,
    )


def volume_host_paths(cfg: StackConfig) -> dict[str, str]:
    """Host paths of the watched volumes' data: a bind-mounted backupHostPath, an adopted
    volume, or the stack's own volume under Docker's default data root."""
    paths = {}
    for volume, suffix in WATCHED_VOLUMES.items():
        name = cfg.adopt_volumes.get(volume) or cfg.resource_name(suffix)
        paths[volume] = f"{DOCKER_VOLUMES_DIR}/{name}/_data"
    if cfg.backup.host_path:
        paths["backups"] = cfg.backup.host_path
    return paths


def settings_from_stack_config(stack: str, raw: Mapping[str, str]) -> MonitoringSettings:
    """Validate a stack file's settings as ``pulumi up`` would, then map them.

    Rendering never reads a secret: the secret keys get a stand-in (never written, since
    the files only name the password file), so only non-secret values are checked.
    """
    stand_ins = {key: "<not read when rendering>" for key in SECRET_KEYS if key != "ghcrToken"}
    cfg = parse_stack_config(
        stack,
        {**stand_ins, **raw},
        secret_keys=SECRET_KEYS,
        # Host paths belong to the Docker host, not to the machine rendering.
        docker_host="ssh://render-only",
    )
    return settings_from_config(cfg)


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
        description="Write one stack's Prometheus, rules, Alertmanager and blackbox files.",
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
    except (StackFileError, ConfigError, MonitoringConfigError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in write_files(render_all(settings), args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
