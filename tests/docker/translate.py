"""Recorded pulumi-docker inputs -> the Docker CLI calls pulumi-docker's provider makes.

The provider (kreuzwerker/terraform-provider-docker, which pulumi-docker wraps) creates a
container with the declared host config, then -- when ``networks_advanced`` is set --
disconnects it from Docker's default ``bridge`` and connects it to each listed network
with its aliases, copies each upload as a one-file tar into ``/``, and starts it. The
plan below makes the same steps with ``docker create`` / ``network disconnect`` /
``network connect`` / ``cp`` / ``start``.

Faithful for what the tests check: names, network mode and networks with aliases,
capabilities, security options, privileged, read-only root, tmpfs, user, memory and swap
(declared in MB), CPU shares, restart policy, published ports with their host IP,
mounts, environment, entrypoint and command. Deliberately not translated: labels (the
test adds its own), the healthcheck (its commands live in the real images) and the
provider's own waiting flags. Anything else in the inputs is an error, so a new
hardening-relevant input cannot be ignored silently.

Two test-only substitutions, both explicit arguments: the image (the real ones cannot be
pulled here) and, optionally, the process (a stand-in instead of the real program).
Names are renamed with a session prefix so nothing collides with a real deployment.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Inputs the translation reads, and inputs that are deliberately not translated.
CONTAINER_INPUTS = {
    "name", "image", "command", "entrypoints", "user", "envs", "capabilities",
    "securityOpts", "privileged", "readOnly", "tmpfs", "memory", "memorySwap", "cpuShares",
    "restart", "maxRetryCount", "networksAdvanced", "networkMode", "ports", "mounts",
    "uploads",
}  # fmt: skip
NOT_TRANSLATED = {"labels", "healthcheck", "mustRun", "attach", "wait", "waitTimeout"}
NETWORK_INPUTS = {"name", "driver", "internal", "options"}
BRIDGE_NAME_OPTION = "com.docker.network.bridge.name"


@dataclass(frozen=True)
class Renamer:
    """``rag-staging-redis`` -> ``ragtest-<id>-staging-redis``; other names unchanged."""

    prefix: str  # e.g. "ragtest-1a2b3c-"

    def __call__(self, name: str) -> str:
        return self.prefix + name.removeprefix("rag-") if name.startswith("rag-") else name

    def bridge(self, name: str) -> str:
        """A host interface name (at most 15 characters) unique to this session."""
        digest = hashlib.sha256((self.prefix + name).encode()).hexdigest()
        return f"rt{digest[:10]}"


@dataclass(frozen=True)
class NetworkAttachmentPlan:
    network: str
    aliases: tuple[str, ...]


@dataclass(frozen=True)
class Upload:
    path: str  # absolute path in the container
    content: str
    executable: bool = False


@dataclass(frozen=True)
class ContainerPlan:
    name: str
    create_args: tuple[str, ...]  # after `docker create --name NAME`: flags, image, argv
    networks: tuple[NetworkAttachmentPlan, ...]
    uploads: tuple[Upload, ...]
    volumes: tuple[str, ...]  # named volumes the mounts use
    published: Mapping[int, tuple[str, int]] = field(default_factory=dict)  # in -> (ip, host)


@dataclass(frozen=True)
class NetworkPlan:
    name: str
    internal: bool
    driver: str
    options: Mapping[str, str] = field(default_factory=dict)


def _reject_unknown(kind: str, inputs: Mapping[str, Any], known: set[str]) -> None:
    unknown = sorted(k for k, v in inputs.items() if v is not None and k not in known)
    if unknown:
        raise ValueError(f"{kind} {inputs.get('name')!r}: no translation for inputs {unknown}")


def plan_network(inputs: Mapping[str, Any], rename: Renamer) -> NetworkPlan:
    _reject_unknown("network", inputs, NETWORK_INPUTS)
    options = dict(inputs.get("options") or {})
    if BRIDGE_NAME_OPTION in options:
        # Host interface names are global: the test's own, short and unique.
        options[BRIDGE_NAME_OPTION] = rename.bridge(options[BRIDGE_NAME_OPTION])
    return NetworkPlan(
        name=rename(inputs["name"]),
        internal=bool(inputs.get("internal", False)),
        driver=inputs.get("driver") or "bridge",
        options=options,
    )


def _mount_flag(mount: Mapping[str, Any], rename: Renamer) -> str:
    kind = mount["type"]
    source = rename(mount["source"]) if kind == "volume" else mount["source"]
    parts = [f"type={kind}", f"source={source}", f"target={mount['target']}"]
    if mount.get("readOnly"):
        parts.append("readonly")
    propagation = (mount.get("bindOptions") or {}).get("propagation")
    if kind == "bind" and propagation:
        parts.append(f"bind-propagation={propagation}")
    return ",".join(parts)


def plan_container(
    inputs: Mapping[str, Any],
    rename: Renamer,
    image: str,
    process: Sequence[str] | None = None,
    host_ports: Mapping[int, int] | None = None,
) -> ContainerPlan:
    """``process`` replaces the declared entrypoint and command (a stand-in program);
    ``host_ports`` maps a declared host port to the one the test binds instead (the
    declared host IP is always kept)."""
    _reject_unknown("container", inputs, CONTAINER_INPUTS | NOT_TRANSLATED)
    flags: list[str] = []
    mode = inputs.get("networkMode")
    if mode:
        flags += ["--network", mode]
    caps = inputs.get("capabilities") or {}
    for cap in caps.get("drops") or []:
        flags += ["--cap-drop", cap]
    for cap in caps.get("adds") or []:
        flags += ["--cap-add", cap]
    for opt in inputs.get("securityOpts") or []:
        flags += ["--security-opt", opt]
    if inputs.get("privileged"):
        flags.append("--privileged")
    if inputs.get("readOnly"):
        flags.append("--read-only")
    for path, options in (inputs.get("tmpfs") or {}).items():
        flags += ["--tmpfs", f"{path}:{options}" if options else path]
    if inputs.get("user"):
        flags += ["--user", inputs["user"]]
    if inputs.get("memory"):
        flags += ["--memory", f"{int(inputs['memory'])}m"]
    swap = inputs.get("memorySwap")
    if swap:
        flags += ["--memory-swap", f"{int(swap)}m" if int(swap) > 0 else str(int(swap))]
    if inputs.get("cpuShares"):
        flags += ["--cpu-shares", str(int(inputs["cpuShares"]))]
    restart = inputs.get("restart")
    if restart:
        retries = int(inputs.get("maxRetryCount") or 0)
        flags += ["--restart", f"{restart}:{retries}" if restart == "on-failure" else restart]
    published: dict[int, tuple[str, int]] = {}
    for port in inputs.get("ports") or []:
        # Numbers arrive as floats (protobuf Struct values).
        internal, external = int(port["internal"]), int(port["external"])
        host_port = (host_ports or {}).get(external, external)
        ip = port.get("ip") or "0.0.0.0"  # noqa: S104 - the provider's default
        protocol = port.get("protocol") or "tcp"
        flags += ["--publish", f"{ip}:{host_port}:{internal}/{protocol}"]
        published[internal] = (ip, host_port)
    volumes: list[str] = []
    for mount in inputs.get("mounts") or []:
        flags += ["--mount", _mount_flag(mount, rename)]
        if mount["type"] == "volume":
            volumes.append(rename(mount["source"]))
    for env in inputs.get("envs") or []:
        flags += ["--env", env]

    argv: list[str]
    if process is not None:
        argv = list(process)
        entrypoint: list[str] = []
    else:
        entrypoint = list(inputs.get("entrypoints") or [])
        argv = list(inputs.get("command") or [])
    if entrypoint:
        # The CLI takes one entrypoint word; the rest of the declared entrypoint goes
        # first in the command -- the process's argv is the same.
        flags += ["--entrypoint", entrypoint[0]]
        argv = entrypoint[1:] + argv
    elif process is not None:
        flags += ["--entrypoint", ""]  # the stand-in replaces any image entrypoint

    networks = tuple(
        NetworkAttachmentPlan(rename(n["name"]), tuple(n.get("aliases") or ()))
        for n in inputs.get("networksAdvanced") or []
    )
    uploads = tuple(
        Upload(u["file"], u["content"], bool(u.get("executable")))
        for u in inputs.get("uploads") or []
    )
    return ContainerPlan(
        name=rename(inputs["name"]),
        create_args=(*flags, image, *argv),
        networks=networks,
        uploads=uploads,
        volumes=tuple(volumes),
        published=published,
    )


def upload_tar(upload: Upload) -> bytes:
    """The one-file tar the provider sends to ``/`` (mode 0644, or 0744 executable)."""
    data = upload.content.encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        info = tarfile.TarInfo(upload.path.lstrip("/"))
        info.size = len(data)
        info.mode = 0o744 if upload.executable else 0o644
        tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
