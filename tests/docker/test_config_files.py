"""Why files reach services through a config volume, and that the pattern works, on a
real engine.

pulumi-docker delivers ``uploads`` with a copy into the created container before it
starts; Docker refuses that on a read-only root filesystem. The program's answer: a
one-shot ``<service>-config-init`` (root, no network, only CHOWN/DAC_OVERRIDE/FOWNER)
receives the uploads and copies them into the config volume with the script it declares;
the service mounts that volume read-only at /etc/rag. Here the declared init runs for
real (its entrypoint script, flags and uploads; the test image instead of the service's
image) and a stand-in service with the service's declared flags reads the result.
"""

from __future__ import annotations

import json

import pytest

from tests.docker.deployment import Deployment
from tests.docker.engine import DockerError
from tests.pulumi_harness import ProgramRun, run_program

pytestmark = [pytest.mark.integration, pytest.mark.docker]

CONFIG_DIR = "/etc/rag"
IDLE = ["sleep", "infinity"]
STRANGER = "12345:12345"  # neither the service's user nor root

# Runs as the service's user inside the service: every entry under /etc/rag with its
# stat, each file's content (read as that user), and whether writing there fails.
INSPECT_CONFIG = """
import errno, json, os, sys
root = sys.argv[1]
entries = {}
for directory, dirs, files in os.walk(root):
    for name in dirs + files:
        path = os.path.join(directory, name)
        st = os.stat(path)
        entry = {"dir": name in dirs, "mode": st.st_mode & 0o7777,
                 "uid": st.st_uid, "gid": st.st_gid}
        if not entry["dir"]:
            with open(path) as f:
                entry["content"] = f.read()
        entries[os.path.relpath(path, root)] = entry
writes = {}
some_file = next(os.path.join(d, f[0]) for d, _, f in os.walk(root) if f)
for label, path, mode in (("create", os.path.join(root, "new-file"), "w"),
                          ("append", some_file, "a")):
    try:
        with open(path, mode) as f:
            f.write("x")
        writes[label] = "written"
    except OSError as exc:
        writes[label] = errno.errorcode.get(exc.errno, str(exc.errno))
with open("/proc/self/mounts") as f:
    options = [line.split()[3].split(",") for line in f if line.split()[1] == root]
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "entries": entries,
                  "writes": writes, "mount_options": options}))
"""

# Reads each file as someone else: what it gets per path.
READ_AS_STRANGER = """
import errno, json, os, sys
outcome = {}
for directory, _, files in os.walk(sys.argv[1]):
    for name in files:
        path = os.path.join(directory, name)
        try:
            open(path).close()
            outcome[os.path.relpath(path, sys.argv[1])] = "read"
        except OSError as exc:
            outcome[os.path.relpath(path, sys.argv[1])] = errno.errorcode.get(exc.errno, "?")
print(json.dumps(outcome))
"""


def is_secret(path: str) -> bool:
    """Files holding keys, passwords or password hashes (README: secrets only in files
    readable by the service's user alone)."""
    return path.startswith("secrets/") or path.endswith((".key", ".acl", ".sql"))


def services_with_files(stack: str) -> list[str]:
    run: ProgramRun = run_program(stack)
    return sorted(
        name.removeprefix(f"rag-{stack}-").removesuffix("-config-init")
        for name in run.containers
        if name.endswith("-config-init")
    )


CASES = [
    (stack, service) for stack in ("staging", "prod") for service in services_with_files(stack)
]


def test_uploads_into_a_read_only_container_are_refused(deployment: Deployment) -> None:
    """The reason for the pattern: the provider's upload step against the service's own
    read-only flags fails with Docker's error, while the same upload into the declared
    init container (not read-only) is accepted."""
    init_inputs = deployment.declared("staging", "rag-staging-redis-config-init")
    service_inputs = deployment.declared("staging", "rag-staging-redis")
    assert service_inputs["readOnly"] is True
    with_uploads = {**service_inputs, "uploads": init_inputs["uploads"]}
    plan = deployment.plan("staging", "rag-staging-redis", process=IDLE, inputs=with_uploads)
    with pytest.raises(DockerError, match="marked read-only"):
        deployment.create("staging", plan)

    init = deployment.plan("staging", "rag-staging-redis-config-init")
    deployment.create("staging", init)  # raises if any upload were refused
    copied = deployment.docker.call("cp", f"{init.name}:/incoming/redis.conf", "-")
    assert copied.returncode == 0 and b"redis.conf" in copied.stdout, copied.stderr


@pytest.mark.parametrize(("stack", "service"), CASES)
def test_init_fills_the_volume_the_service_reads_read_only(
    deployment: Deployment, stack: str, service: str
) -> None:
    init_name, service_name = f"rag-{stack}-{service}-config-init", f"rag-{stack}-{service}"
    init_inputs = deployment.declared(stack, init_name)
    uploads = {u["file"].removeprefix("/incoming/"): u["content"] for u in init_inputs["uploads"]}
    assert uploads

    init = deployment.plan(stack, init_name)  # the declared entrypoint script runs
    code = deployment.run_to_exit(stack, init)
    logs = deployment.docker.call("logs", init.name).stderr.decode(errors="replace")
    assert code == 0, f"{init_name} exited {code}: {logs}"

    service_plan = deployment.plan(stack, service_name, process=IDLE)
    shared = set(init.volumes) & set(service_plan.volumes)
    assert len(shared) == 1, (init.volumes, service_plan.volumes)
    container = deployment.start(stack, service_plan)

    done = deployment.exec(container, "python3", "-c", INSPECT_CONFIG, CONFIG_DIR)
    assert done.returncode == 0, done.stderr.decode()
    seen = json.loads(done.stdout)
    files = {path: e for path, e in seen["entries"].items() if not e["dir"]}
    directories = {path: e for path, e in seen["entries"].items() if e["dir"]}

    assert set(files) == set(uploads)
    for path, entry in files.items():
        assert entry["content"] == uploads[path], path
        assert entry["mode"] == (0o400 if is_secret(path) else 0o444), (path, oct(entry["mode"]))
        assert (entry["uid"], entry["gid"]) == (seen["uid"], seen["gid"]), path
    for path, entry in directories.items():
        assert entry["mode"] == 0o555, (path, oct(entry["mode"]))
    # The mount is read-only (creating fails with EROFS, checked before the directory's
    # mode), and the files cannot be changed either.
    assert len(seen["mount_options"]) == 1 and "ro" in seen["mount_options"][0], seen
    assert seen["writes"]["create"] == "EROFS", seen["writes"]
    assert seen["writes"]["append"] in ("EROFS", "EACCES"), seen["writes"]

    done = deployment.exec(container, "python3", "-c", READ_AS_STRANGER, CONFIG_DIR, user=STRANGER)
    assert done.returncode == 0, done.stderr.decode()
    as_stranger = json.loads(done.stdout)
    assert as_stranger == {p: ("EACCES" if is_secret(p) else "read") for p in uploads}
