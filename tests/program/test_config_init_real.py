"""The config-init script, run for real by busybox (the prom/* and alpine images' shell and
tools): files land in the config directory with their modes and owner, stale ones go."""

from __future__ import annotations

import grp
import os
import pwd
import stat
import subprocess
from pathlib import Path

import pytest

from components.containers import CONFIG_DIR
from tests.pulumi_harness import ProgramRun, run_program
from tests.tooling import require_tool

pytestmark = pytest.mark.integration
APPLETS = ("sh", "find", "cp", "chmod", "chown", "rm")


@pytest.fixture(scope="module")
def staging() -> ProgramRun:
    return run_program("staging")


def owner_ids(owner: str) -> tuple[int, int]:
    user, _, group = owner.partition(":")
    uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
    gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
    return uid, gid


@pytest.mark.parametrize("service", ["redis", "postgres", "api", "caddy", "alertmanager"])
def test_init_copies_files_with_modes_and_owner(
    service: str, staging: ProgramRun, tmp_path: Path
) -> None:
    if os.geteuid() != 0:
        pytest.skip("chown to the services' users needs root (CI runs as root)")
    busybox = require_tool("busybox")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for applet in APPLETS:
        (bin_dir / applet).symlink_to(busybox)
    init = staging.containers[f"rag-staging-{service}-config-init"].inputs
    incoming, config = tmp_path / "incoming", tmp_path / "config"
    config.mkdir()
    (config / "stale.conf").write_text("from an older deploy")
    for upload in init["uploads"]:
        target = incoming / upload["file"].removeprefix("/incoming/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(upload["content"])
    shell, flag, script = init["entrypoints"]
    assert (shell, flag) == ("/bin/sh", "-c")
    script = script.replace("/incoming", str(incoming)).replace(CONFIG_DIR, str(config))
    subprocess.run(
        [str(bin_dir / "sh"), "-c", script], env={"PATH": str(bin_dir)}, check=True, timeout=30
    )

    owner = next(c for c in script.split("&&") if "chown" in c).split()[2]
    uid, gid = owner_ids(owner)
    copied = {p.relative_to(config).as_posix(): p for p in config.rglob("*") if p.is_file()}
    uploaded = {u["file"].removeprefix("/incoming/"): u for u in init["uploads"]}
    assert set(copied) == set(uploaded)  # the stale file is gone
    for name, path in copied.items():
        assert path.read_text() == uploaded[name]["content"]
        mode = stat.S_IMODE(path.stat().st_mode)
        secret = name.startswith("secrets/") or name.endswith((".key", ".acl", ".sql"))
        assert mode == (0o400 if secret else 0o444), (name, oct(mode))
        assert (path.stat().st_uid, path.stat().st_gid) == (uid, gid), name
    for directory in [config, *(p for p in config.rglob("*") if p.is_dir())]:
        assert stat.S_IMODE(directory.stat().st_mode) == 0o555
