"""The off-host target of a stack's backups, as rclone sees it: a pure renderer of the
rclone config file (it holds the S3 keys, so it is delivered as a secret file) and the
remote path. Used by ``Backups`` and by the tests against a real sshd and S3 server.

Every value rendered here was validated by ``components.config`` (no newline, no space),
so nothing can add a line to the INI file.
"""

from __future__ import annotations

import hashlib

from components.config import OffsiteSettings

REMOTE_NAME = "offsite"
# Paths inside the backup container (under its config volume).
RCLONE_CONFIG_FILE = "secrets/offsite_rclone.conf"
SSH_KEY_FILE = "secrets/offsite_ssh_key"
KNOWN_HOSTS_FILE = "offsite_known_hosts"


def offsite_bridge_name(stack: str) -> str:
    """Host interface of the egress network (rag-prod-eg): a host firewall can narrow it
    to the target's address (docs/disaster_recovery.md). Hashed to fit 15 characters."""
    name = f"rag-{stack}-eg"
    if len(name) <= 15:
        return name
    return f"rag-{hashlib.sha256(stack.encode()).hexdigest()[:8]}-eg"


def rclone_remote(stack: str, target: OffsiteSettings) -> str:
    """``offsite:<path>/<stack>``: each stack under its own prefix, so one stack's prune
    never sees the other's copies."""
    base = target.path.rstrip("/")
    return f"{REMOTE_NAME}:{base}/{stack}" if base else f"{REMOTE_NAME}:{stack}"


def render_rclone_config(
    target: OffsiteSettings,
    *,
    ssh_key_path: str,
    known_hosts_path: str,
    s3_access_key_id: str = "",
    s3_secret_access_key: str = "",
) -> str:
    """rclone.conf with one remote, ``offsite``. SFTP: key auth, the host key pinned by
    known_hosts (rclone accepts any host key without it), no shell commands on the target
    (it is SFTP-only). S3: path-style, no bucket creation (the key may only write)."""
    if target.kind == "sftp":
        lines = {
            "type": "sftp",
            "host": target.host,
            "port": str(target.port),
            "user": target.user,
            "key_file": ssh_key_path,
            "known_hosts_file": known_hosts_path,
            "shell_type": "none",
            "disable_hashcheck": "true",
        }
    else:
        lines = {
            "type": "s3",
            "provider": "Other" if target.s3_endpoint else "AWS",
            "access_key_id": s3_access_key_id,
            "secret_access_key": s3_secret_access_key,
            "no_check_bucket": "true",
            "force_path_style": "true",
        }
        if target.s3_endpoint:
            lines["endpoint"] = target.s3_endpoint
        if target.s3_region:
            lines["region"] = target.s3_region
    body = "\n".join(f"{key} = {value}" for key, value in lines.items())
    return f"[{REMOTE_NAME}]\n{body}\n"
