""" "The VPS is gone" on a real engine, from the program's own declarations: the staging
stack declared with an SFTP ``offsiteTarget`` served by a real OpenSSH sshd in a container
(chrooted, SFTP-only, key login, as docs/disaster_recovery.md recommends), reachable from
the backup job only over the program's offsite egress network. The job copies a backup
off the host; then every container and volume of the stack is removed (the target
survives), the declarations are applied again as a new host's `pulumi up` would (same
state and config, so the same secrets; empty volumes), and ``scripts/offsite-restore.sh``
brings the data back to a point in time (PostgreSQL from the off-host base backup and WAL)
-- after refusing a tampered remote copy and a time the copy does not reach, without
touching anything.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import os
import re
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.pulumi_harness import SECRET_KEYS, ProgramRun, run_program, stack_config
from tests.stack.apply import Applied, StackApplier
from tests.stack.conftest import Stacks, image_id
from tests.stack.images import LocalImages
from tests.stack.test_stacks import ABSENT, PRESENT, REPO, marker, wait_all_healthy
from tests.tooling import require_tool

pytestmark = pytest.mark.stack

STACK = "staging"
OFFSITE_RESTORE_SCRIPT = REPO / "scripts" / "offsite-restore.sh"
SCRIPT_TIMEOUT_S = 900
# The target (tests/stack/recipes/sftp-target): its account, chroot and the name the
# backup job resolves it by on the egress network.
TARGET_RECIPE = "sftp-target"
TARGET_ALIAS = "offsite-target"
TARGET_USER = "rag-backup"
TARGET_CHROOT = f"/srv/offsite/{TARGET_USER}"
TARGET_PATH = "backups"  # relative to the login directory (the chroot's root)
TARGET_HOST_KEY = "/etc/ssh/ssh_host_ed25519_key.pub"
TARGET_START_TIMEOUT_S = 60
# The scheduler catches up on a missed backup (and drill) at its start; its outcome is in
# the textfile volume once both ran.
SCHEDULER_METRICS = "/textfile/rag_backup_scheduler.prom"
SCHEDULER_CATCH_UP_TIMEOUT_S = 600
WAL_CYCLE_TIMEOUT_S = 120
# Marker commits this far either side of the point-in-time target (seconds).
TARGET_MARGIN_S = 1.5
# A row of `rag-backup offsite list`: id, size ("1.2 MiB", or "-"), state.
OFFSITE_LIST_ROW = re.compile(r"^(?P<id>\S+) +(?:-|\S+ \S+)  (?P<state>\S.*)$")


@dataclass(frozen=True)
class SftpTarget:
    container: str
    known_hosts: str  # the target's real host key, as `ssh-keyscan` would print it
    client_key: str  # the private key the stack logs in with (secret config)

    def copies(self, stack: str) -> str:
        """The directory of ``stack``'s off-host copies, on the target's own filesystem."""
        return f"{TARGET_CHROOT}/{TARGET_PATH}/{stack}"


def _authorized_keys_tar(public_key: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(f"etc/ssh/authorized_keys/{TARGET_USER}")
        info.size, info.mode, info.uid, info.gid = len(public_key), 0o644, 0, 0
        tar.addfile(info, io.BytesIO(public_key))
    return buffer.getvalue()


def start_sftp_target(applier: StackApplier, workdir: Path) -> SftpTarget:
    """The off-host machine: its own (internal) network, a fresh host key, the stack's
    client public key authorized for the SFTP-only account."""
    keygen = require_tool("ssh-keygen")
    key = workdir / "offsite_client_key"
    subprocess.run(
        [keygen, "-q", "-t", "ed25519", "-N", "", "-C", "rag-staging-backup", "-f", str(key)],
        check=True,
        capture_output=True,
    )
    image = applier.images.recipe(TARGET_RECIPE)
    prefix = applier.rename.prefix
    home = applier.objects.create_network(f"{prefix}offsite-target-home", internal=True)
    name = applier.objects.create_container(f"{prefix}offsite-target", ["--network", home, image])
    public_key = Path(f"{key}.pub").read_bytes()
    applier.docker.run("cp", "-", f"{name}:/", input_bytes=_authorized_keys_tar(public_key))
    applier.docker.run("start", name)
    deadline = time.monotonic() + TARGET_START_TIMEOUT_S
    while "Server listening" not in (logs := applier.logs(name)):
        assert time.monotonic() < deadline, logs
        time.sleep(1)
    key_type, key_body = applier.docker.run("exec", name, "cat", TARGET_HOST_KEY).split()[:2]
    return SftpTarget(name, f"{TARGET_ALIAS} {key_type} {key_body}\n", key.read_text())


def declared_run(
    state: dict[str, dict[str, Any]], target: SftpTarget, images: LocalImages
) -> ProgramRun:
    """`pulumi up --stack staging` with the off-host target set as a user sets it (the
    SSH key with --secret), from the Pulumi state ``state`` (the generated secrets)."""
    config = stack_config(
        STACK,
        localImageId=image_id(images.docker, images.app()),
        offsiteTarget=f"sftp://{TARGET_USER}@{TARGET_ALIAS}/{TARGET_PATH}",
        offsiteSshKnownHosts=target.known_hosts,
        offsiteSshKey=target.client_key,
    )
    return run_program(
        STACK, config, secret_keys=SECRET_KEYS | {"offsiteSshKey"}, provider_state=state
    )


def egress_network(applier: StackApplier) -> str:
    name = applier.rename(f"rag-{STACK}-offsite-egress")
    assert name in applier.objects.networks, f"the program declares no {name}"
    return name


def bring_up(applier: StackApplier, run: ProgramRun, target: SftpTarget) -> Applied:
    """Networks and volumes first, then the target joins the egress network under the
    name ``offsiteTarget`` gives (the only network the job and the target share), then
    every container, each after its dependencies as Pulumi orders them."""
    applier.apply(run, only=lambda record: False)
    applier.docker.run(
        "network", "connect", "--alias", TARGET_ALIAS, egress_network(applier), target.container
    )
    return applier.apply(run)


def job(stacks: Stacks, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[bytes]:
    return stacks.applier.docker.call("exec", stacks.name(STACK, "backup"), *args, timeout=timeout)


def wait_for_scheduler_catch_up(stacks: Stacks) -> str:
    """The scheduler's start-up run (backup with its off-host copy, drill) is over; its
    metrics."""
    deadline = time.monotonic() + SCHEDULER_CATCH_UP_TIMEOUT_S
    while 'job_success{job="backup"}' not in (
        metrics := job(stacks, "cat", SCHEDULER_METRICS).stdout.decode(errors="replace")
    ):
        assert time.monotonic() < deadline, stacks.applier.logs(stacks.name(STACK, "backup"))
        time.sleep(5)
    return metrics


def run_the_backup_job(stacks: Stacks) -> str:
    """The scheduler's backup job, now: backup --verify, prune, then the off-host copy
    and its prune (rag_backup.schedule.run_job, the steps it runs every night). The new
    backup's id."""
    steps = (
        "import subprocess, sys\n"
        "from rag_backup.schedule import run_job\n"
        "def run(args):\n"
        "    return subprocess.run([sys.executable, '-m', 'rag_backup', *args]).returncode\n"
        "sys.exit(0 if run_job('backup', run) else 1)\n"
    )
    done = job(stacks, "python3", "-c", steps)
    output = (done.stdout + done.stderr).decode(errors="replace")
    assert done.returncode == 0, output[-4000:]
    assert "running rag-backup offsite push" in output, output[-4000:]
    resolved = job(stacks, "python3", "-m", "rag_backup", "resolve", "latest")
    assert resolved.returncode == 0, resolved.stderr.decode(errors="replace")
    return resolved.stdout.decode().strip()


def offsite_listing(stacks: Stacks) -> dict[str, str]:
    """`rag-backup offsite list` in the job: backup id -> state of its off-host copy."""
    done = job(stacks, "python3", "-m", "rag_backup", "offsite", "list")
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    rows = [OFFSITE_LIST_ROW.match(row) for row in done.stdout.decode().splitlines()[1:]]
    assert all(rows), done.stdout.decode()
    return {row["id"]: row["state"] for row in rows if row}


def archive_wal_off_host(stacks: Stacks) -> None:
    """One WAL cycle and its off-host copy now (the scheduler runs the same every minute;
    a cycle of its own in progress holds the archive lock: try again)."""
    deadline = time.monotonic() + WAL_CYCLE_TIMEOUT_S
    for step in (["wal-archive"], ["offsite", "wal-push"]):
        while (done := job(stacks, "python3", "-m", "rag_backup", *step)).returncode != 0:
            output = done.stderr.decode(errors="replace")
            assert "holds" in output and time.monotonic() < deadline, output[-3000:]
            time.sleep(2)


def off_host_wal(stacks: Stacks, target: SftpTarget) -> str:
    """For a failure message: each lineage's off-host WAL index (segments: archived_at)."""
    show = (
        "import glob, json, sys\n"
        "for path in sorted(glob.glob(sys.argv[1] + '/wal/*/index.json')):\n"
        "    index = json.load(open(path))\n"
        "    segments = {n: s['archived_at'] for n, s in index['segments'].items()}\n"
        "    print(path, json.dumps({**index, 'segments': segments}))\n"
    )
    done = stacks.applier.docker.call(
        "exec", target.container, "python3", "-c", show, target.copies(STACK)
    )
    return (done.stdout + done.stderr).decode(errors="replace")[-6000:]


def lose_the_host(applier: StackApplier, target: SftpTarget) -> None:
    """Every container, network and volume of the stack is gone; the target (another
    machine) stays, off the networks that went."""
    docker, objects = applier.docker, applier.objects
    docker.run("network", "disconnect", egress_network(applier), target.container)
    for kind, names, flags in (
        ("container", objects.containers, ["-f", "-v"]),
        ("network", objects.networks, []),
        ("volume", objects.volumes, ["-f"]),
    ):
        keep = {target.container, f"{applier.rename.prefix}offsite-target-home"}
        for name in [n for n in reversed(names) if n not in keep]:
            docker.run(kind, "rm", *flags, name, timeout=120)
            names.remove(name)
    prefix = applier.rename.prefix
    left = docker.run("ps", "-a", "--filter", f"name={prefix}", "--format", "{{.Names}}")
    assert left.split() == [target.container], left
    assert not docker.run("volume", "ls", "--filter", f"name={prefix}", "-q").strip()


def offsite_restore(stacks: Stacks, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("bash"), str(OFFSITE_RESTORE_SCRIPT), *args],
        env={**os.environ, "RAG_NAME_PREFIX": stacks.applier.rename.prefix},
        capture_output=True,
        text=True,
        timeout=SCRIPT_TIMEOUT_S,
        check=False,
    )


def started_at(stacks: Stacks) -> dict[str, str]:
    """Declared name -> start time of every long-running container (a stop changes it)."""
    applied = stacks.applied[STACK]
    return {
        declared: stacks.applier.docker.inspect("container", name)["State"]["StartedAt"]
        for declared, name in applied.containers.items()
        if applied.inputs[declared].get("wait")
    }


def flip_a_byte(stacks: Stacks, target: SftpTarget, path: str) -> None:
    """One bit of ``path`` on the target flipped in place (twice restores it)."""
    flip = (
        "import sys\n"
        "with open(sys.argv[1], 'r+b') as f:\n"
        "    f.seek(-1, 2); last = f.read(1); f.seek(-1, 2); f.write(bytes([last[0] ^ 1]))\n"
    )
    stacks.applier.docker.run("exec", target.container, "python3", "-c", flip, path)


def test_offsite_restore_brings_a_lost_hosts_data_back_onto_a_new_host(
    fresh_applier: StackApplier, tmp_path: Path
) -> None:
    applier = fresh_applier
    target = start_sftp_target(applier, tmp_path)
    state: dict[str, dict[str, Any]] = {}

    # The old host: the stack with its off-host target; the scheduler's start-up backup
    # already goes off-host through the egress network.
    run = declared_run(state, target, applier.images)
    old = Stacks(applier, {STACK: run}, {STACK: bring_up(applier, run, target)}, {STACK: state})
    metrics = wait_for_scheduler_catch_up(old)
    assert 'rag_backup_scheduler_job_success{job="backup"} 1' in metrics, metrics
    # The SSH key reached the job as a file only: in no container's env or command.
    private_body = "".join(target.client_key.splitlines()[1:-1])
    for name in old.applied[STACK].containers.values():
        config = applier.docker.inspect("container", name)["Config"]
        assert private_body[-60:] not in json.dumps([config["Env"], config["Cmd"]]), name

    assert marker(old, STACK, "PUT", "kept-off-host") == PRESENT
    # A host that has run a while: its WAL slot (made by the first cycle, which races with
    # the start-up backup) exists before the base backup, so the WAL follows it without gap.
    archive_wal_off_host(old)
    backup_id = run_the_backup_job(old)
    assert marker(old, STACK, "PUT", "after-the-copy") == PRESENT
    # The last good moment ("16:59"): after-the-copy is before it, past-the-target after;
    # the WAL holding both reaches the off-host copy (the scheduler's minute cycle, now).
    time.sleep(TARGET_MARGIN_S)
    last_good = dt.datetime.now(dt.UTC).isoformat()
    time.sleep(TARGET_MARGIN_S)
    assert marker(old, STACK, "PUT", "past-the-target") == PRESENT
    archive_wal_off_host(old)
    listing = offsite_listing(old)
    assert listing[backup_id].startswith("verified"), listing
    copy = f"{target.copies(STACK)}/{backup_id}"
    manifest = json.loads(
        applier.docker.run("exec", target.container, "cat", f"{copy}/manifest.json")
    )
    artifacts = [a["name"] for c in manifest["components"].values() for a in c["artifacts"]]

    # The VPS is gone. A new host applies the same program with the same state and config.
    lose_the_host(applier, target)
    new_run = declared_run(state, target, applier.images)
    new = Stacks(
        applier, {STACK: new_run}, {STACK: bring_up(applier, new_run, target)}, {STACK: state}
    )
    # Its scheduler has already backed up its empty stores and copied that off-host: the
    # newest copy there is the new host's own.
    wait_for_scheduler_catch_up(new)
    assert marker(new, STACK, "GET", "kept-off-host") == ABSENT
    own = max(offsite_listing(new))
    assert own > backup_id, offsite_listing(new)

    # A tampered remote copy: the pull fails before anything is stopped or restored.
    before = started_at(new)
    flip_a_byte(new, target, f"{copy}/{artifacts[0]}")
    try:
        tampered = offsite_restore(new, STACK, "--yes")
    finally:
        flip_a_byte(new, target, f"{copy}/{artifacts[0]}")
    assert tampered.returncode != 0, tampered.stdout[-3000:] + tampered.stderr[-3000:]
    assert f"{artifacts[0]} does not match the manifest" in tampered.stderr, tampered.stderr
    assert "restore-stack" not in tampered.stdout + tampered.stderr
    assert started_at(new) == before
    leftovers = job(new, "ls", "-A", "/backups").stdout.decode().split()
    assert not [name for name in leftovers if backup_id in name], leftovers
    assert marker(new, STACK, "GET", "kept-off-host") == ABSENT
    # A time the off-host copy does not reach: refused with its range, nothing pulled or
    # stopped.
    late = offsite_restore(new, STACK, "--target-time", "2099-01-01T00:00:00Z", "--yes")
    assert late.returncode == 2, late.stdout[-3000:] + late.stderr[-3000:]
    assert "is outside what is archived off-host" in late.stderr, late.stderr[-3000:]
    assert f"(base backup {backup_id})" in late.stderr, late.stderr[-3000:] + off_host_wal(
        new, target
    )
    assert "restore-stack" not in late.stdout + late.stderr
    assert started_at(new) == before
    assert "offsite-pitr" not in job(new, "ls", "-A", "/backups").stdout.decode().split()

    # The real copy, to the last good moment ("the VPS is gone, and the last good moment
    # was ..."): the off-host base backup and the WAL up to that time pulled, checked and
    # restored -- PostgreSQL recovered to the time, Redis and Chroma as of the base backup
    # (no log to replay); every service healthy.
    done = offsite_restore(
        new, STACK, "--target-time", last_good, "--components", "postgres,redis,chroma", "--yes"
    )
    assert done.returncode == 0, (
        done.stdout[-3000:] + done.stderr[-3000:] + off_host_wal(new, target)
    )
    assert f"passing over {own}" in done.stderr, done.stderr[-3000:]
    assert f"pulled {backup_id} and its WAL into /backups/offsite-pitr" in done.stderr
    assert marker(new, STACK, "GET", "kept-off-host") == PRESENT
    assert marker(new, STACK, "GET", "after-the-copy") == {**ABSENT, "postgres": "present"}
    assert marker(new, STACK, "GET", "past-the-target") == ABSENT
    wait_all_healthy(new, STACK)
    # Beside the stack's own backups and WAL archive, which stay the new cluster's.
    pulled = job(new, "ls", "-A", "/backups/offsite-pitr").stdout.decode().split()
    assert backup_id in pulled and "wal" in pulled, pulled
    # The new host carries on (docs/disaster_recovery.md, step 8): WAL archiving of the
    # restored cluster, and the next backup job with its off-host copy.
    wal = job(new, "python3", "-m", "rag_backup", "wal-archive")
    assert wal.returncode == 0, wal.stderr.decode(errors="replace")[-3000:]
    next_backup = run_the_backup_job(new)
    assert offsite_listing(new)[next_backup].startswith("verified")
    assert offsite_listing(new)[backup_id].startswith("verified")  # the lost host's stays
