"""A backup's manifest.json is hostile input (anyone who can write the backup directory
can write it): ``manifest_problem`` checks its whole shape before any command uses it, so a
bad folder is skipped with a warning naming it instead of stopping the command with a
traceback, and no name in it can point outside the backup folder or into SQL."""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath
from typing import Any

# Artifact kinds of the two PostgreSQL forms (the manifest's artifact "kind").
PG_LOGICAL_KIND = "pg_dump_custom"
PG_PHYSICAL_KIND = "pg_basebackup_tar"
REDIS_KIND = "redis_rdb"
CHROMA_KIND = "tar"
COMPONENT_KINDS = {
    "postgres": (PG_LOGICAL_KIND, PG_PHYSICAL_KIND),
    "redis": (REDIS_KIND,),
    "chroma": (CHROMA_KIND,),
}
ENCRYPTION_METHODS = ("gpg", "age")
# A plain file name inside the backup folder: no separator, no leading dot, no "..".
ARTIFACT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# PostgreSQL names the drill and restore pass to the server (database, role).
PG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$-]{0,62}")
SHA256_HEX = re.compile(r"[0-9a-f]{64}")
# 9999-12-31T23:59:59Z: datetime cannot represent a later creation time.
MAX_UNIX = 253402300799.0


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _counts(value: Any) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and _count(v) for k, v in value.items()
    )


def _relative(name: Any) -> bool:
    if not isinstance(name, str) or not name or "\x00" in name:
        return False
    rel = PurePosixPath(name)
    return not rel.is_absolute() and ".." not in rel.parts


def _artifact_problem(component: str, index: int, artifact: Any) -> str | None:
    where = f"components.{component}.artifacts[{index}]"
    if not isinstance(artifact, dict):
        return f"{where} is not an object"
    name = artifact.get("name")
    if not isinstance(name, str) or not ARTIFACT_NAME.fullmatch(name) or name.endswith(".json"):
        return f"{where}.name {name!r} is not a plain artifact file name"
    if not _count(artifact.get("size")):
        return f"{where}.size {artifact.get('size')!r} is not a byte count"
    sha = artifact.get("sha256")
    if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
        return f"{where}.sha256 is not 64 lowercase hex digits"
    if "head_sha256" in artifact:  # absent before 2026-12
        head = artifact["head_sha256"]
        if not isinstance(head, str) or not SHA256_HEX.fullmatch(head):
            return f"{where}.head_sha256 is not 64 lowercase hex digits"
    if artifact.get("kind") not in COMPONENT_KINDS[component]:
        return (
            f"{where}.kind {artifact.get('kind')!r} is not one of "
            f"{', '.join(COMPONENT_KINDS[component])}"
        )
    return None


def _component_problem(name: str, component: Any) -> str | None:
    where = f"components.{name}"
    if not isinstance(component, dict):
        return f"{where} is not an object"
    artifacts = component.get("artifacts")
    if not isinstance(artifacts, list) or not artifacts:
        return f"{where} has no artifacts"
    for index, artifact in enumerate(artifacts):
        problem = _artifact_problem(name, index, artifact)
        if problem:
            return problem
    names = [a["name"] for a in artifacts]
    if len(set(names)) != len(names):
        return f"{where} lists an artifact twice"
    kinds = [a["kind"] for a in artifacts]
    if len(set(kinds)) != len(kinds):
        return f"{where} has two artifacts of one kind"
    if name == "postgres":
        database = component.get("database")
        if not isinstance(database, str) or not PG_NAME.fullmatch(database):
            return f"{where}.database {database!r} is not a plain PostgreSQL name"
        if not _counts(component.get("row_counts")):
            return f"{where}.row_counts is not a table -> row count map"
        if PG_PHYSICAL_KIND in kinds:
            physical = component.get("physical")
            if not isinstance(physical, dict) or not _counts(physical.get("row_counts_after")):
                return f"{where}.physical.row_counts_after is not a table -> row count map"
            user = physical.get("user")
            if not isinstance(user, str) or not PG_NAME.fullmatch(user):
                return f"{where}.physical.user {user!r} is not a plain PostgreSQL name"
    if name == "redis":
        for key in ("keys_before", "keys_after", "expires_before", "expires_after"):
            if not _count(component.get(key)):
                return f"{where}.{key} {component.get(key)!r} is not a count"
    if name == "chroma":
        files = component.get("files", [])
        if not isinstance(files, list):
            return f"{where}.files is not a list"
        for index, item in enumerate(files):
            if not (
                isinstance(item, dict)
                and _relative(item.get("path"))
                and _count(item.get("size"))
                and isinstance(item.get("sha256"), str)
            ):
                return f"{where}.files[{index}] is not a safe relative path with size and sha256"
    return None


def manifest_problem(manifest: Any) -> str | None:
    """None when the manifest has the shape every command relies on, else what is wrong."""
    if not isinstance(manifest, dict):
        return "manifest.json is not a JSON object"
    created = manifest.get("created_unix")
    if (
        not isinstance(created, int | float)
        or isinstance(created, bool)
        or not math.isfinite(created)
        or not 0 < created <= MAX_UNIX
    ):
        return f"created_unix {created!r} is not a Unix time"
    if not isinstance(manifest.get("created_at", ""), str):
        return "created_at is not a string"
    encryption = manifest.get("encryption")
    if not isinstance(encryption, dict) or encryption.get("method") not in ENCRYPTION_METHODS:
        return f"encryption.method is not one of {', '.join(ENCRYPTION_METHODS)}"
    components = manifest.get("components")
    if not isinstance(components, dict) or not components:
        return "components is missing or empty"
    for name, component in components.items():
        if name not in COMPONENT_KINDS:
            return f"unknown component {name!r}"
        problem = _component_problem(name, component)
        if problem:
            return problem
    return None
