"""The hardening the README claims, on a real engine: containers created with the flags
the program declares for redis, postgres, the api and Caddy have a read-only root with a
writable tmpfs, no capabilities (Caddy: only NET_BIND_SERVICE), no-new-privileges, the
declared user and a memory limit without extra swap -- checked in ``docker inspect`` and
from inside the running process.

The expected values are the README's claims, written here, not read from the program.
The test image maps the images' user names to their ids: redis 999:1000 (redis alpine),
postgres 999:999 (postgres bookworm); the api runs as apiUser 1000:1000.
"""

from __future__ import annotations

import pytest

from tests.docker.deployment import Deployment

pytestmark = [pytest.mark.integration, pytest.mark.docker]

IDLE = ["sleep", "infinity"]
CAP_NET_BIND_SERVICE = 1 << 10
MIB = 1024 * 1024


# service -> (uid, gid the process must run as, effective capability mask)
EXPECTED = {
    "redis": (999, 1000, 0),
    "postgres": (999, 999, 0),
    "api": (1000, 1000, 0),
    "caddy": (0, 0, CAP_NET_BIND_SERVICE),
}


def proc_status(deployment: Deployment, container: str) -> dict[str, str]:
    done = deployment.exec(container, "cat", "/proc/1/status")
    assert done.returncode == 0, done.stderr
    fields = (line.split(":", 1) for line in done.stdout.decode().splitlines())
    return {key: value.strip() for key, value in fields}


def memory_limit_bytes(deployment: Deployment, container: str) -> int:
    """The cgroup's memory limit as the container sees it (cgroup v1 or v2)."""
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        done = deployment.exec(container, "cat", path)
        if done.returncode == 0:
            return int(done.stdout.decode().strip())
    raise AssertionError(f"no memory cgroup visible in {container}")


@pytest.mark.parametrize("stack", ["staging", "prod"])
@pytest.mark.parametrize("service", sorted(EXPECTED))
def test_declared_hardening_holds_in_the_container(
    deployment: Deployment, stack: str, service: str
) -> None:
    uid, gid, caps = EXPECTED[service]
    name = f"rag-{stack}-{service}"
    # Caddy's published ports go to any free host port (0); test_ports checks bindings.
    any_port = {int(p["external"]): 0 for p in deployment.declared(stack, name).get("ports") or []}
    plan = deployment.plan(stack, name, process=IDLE, host_ports=any_port)
    container = deployment.start(stack, plan)

    host_config = deployment.docker.inspect("container", container)["HostConfig"]
    assert host_config["ReadonlyRootfs"] is True
    assert host_config["Privileged"] is False
    assert host_config["CapDrop"] == ["ALL"]
    added = [cap.removeprefix("CAP_") for cap in host_config["CapAdd"] or []]
    assert added == (["NET_BIND_SERVICE"] if caps else [])
    assert host_config["SecurityOpt"] == ["no-new-privileges:true"]
    assert host_config["NetworkMode"] not in ("host",) and host_config["PidMode"] == ""
    assert host_config["Memory"] > 0
    assert host_config["MemorySwap"] == host_config["Memory"]  # no swap beyond the limit
    assert host_config["CpuShares"] > 0
    assert "/tmp" in (host_config["Tmpfs"] or {})

    # Inside: the root filesystem refuses writes, the tmpfs takes them.
    touch_root = deployment.exec(container, "touch", "/x")
    assert touch_root.returncode != 0
    assert b"Read-only file system" in touch_root.stderr
    touch_tmp = deployment.exec(container, "sh", "-c", "echo scratch > /tmp/x && cat /tmp/x")
    assert touch_tmp.returncode == 0 and touch_tmp.stdout == b"scratch\n", touch_tmp.stderr
    mounts = deployment.exec(container, "cat", "/proc/mounts").stdout.decode().splitlines()
    tmp_mount = next(line.split() for line in mounts if line.split()[1] == "/tmp")
    assert tmp_mount[2] == "tmpfs" and "noexec" in tmp_mount[3].split(","), tmp_mount

    # The process itself: user, capabilities, no-new-privileges, memory limit.
    status = proc_status(deployment, container)
    assert [int(x) for x in status["Uid"].split()] == [uid] * 4, status["Uid"]
    assert [int(x) for x in status["Gid"].split()] == [gid] * 4, status["Gid"]
    assert int(status["CapEff"], 16) == caps, status["CapEff"]
    assert int(status["CapPrm"], 16) == caps, status["CapPrm"]
    assert int(status["CapBnd"], 16) == caps, status["CapBnd"]
    assert status["NoNewPrivs"] == "1"
    assert memory_limit_bytes(deployment, container) == host_config["Memory"]
    assert host_config["Memory"] % MIB == 0
