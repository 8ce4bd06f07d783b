"""One hardened container per service, and the way files reach it.

Hardening follows CIS Docker Benchmark section 5: no-new-privileges, every capability
dropped and only the image's needs added back, read-only root filesystem with tmpfs
scratch, memory limit, CPU shares, restart on-failure (5 tries), a healthcheck; never
privileged, never the host's network/PID/IPC, never the Docker socket.

Files (configs, certificates, secrets) cannot be ``uploads`` of a read-only container:
pulumi-docker copies uploads as a tar into ``/`` before start and Docker refuses that
on a read-only rootfs. So each service with files gets a config volume, filled by a
one-shot init container (the documented read-only exception: no network, exits at
once) and mounted read-only by the service at ``CONFIG_DIR``. A hash of the files is a
label of the service, so changed content replaces (restarts) it.
"""

from __future__ import annotations

import hashlib
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_docker as docker

CONFIG_DIR = "/etc/rag"
_INCOMING_DIR = "/incoming"
ON_FAILURE_RETRIES = 5
# Every healthcheck is cheap (pg_isready, redis-cli PING, a wget or a Python one-liner
# on localhost), so it runs often: Docker 20.10 (Debian bookworm's docker.io) has no
# start_interval, so a service turns healthy one interval after start at the earliest,
# and `pulumi up` waits for that along each dependency chain (postgres -> api -> caddy).
# A service that stops answering is unhealthy after HEALTH_RETRIES x HEALTH_INTERVAL.
HEALTH_INTERVAL = "5s"
HEALTH_TIMEOUT = "10s"
HEALTH_RETRIES = 3
# Failures in the start period do not count (a success ends it at once), so a slow
# first start (initdb, a cold cache) gets this long before it can turn unhealthy.
HEALTH_START_PERIOD = "60s"


@dataclass(frozen=True)
class ConfigFile:
    """A file placed at CONFIG_DIR/<path> in the service, owned by its runtime user."""

    path: str
    content: pulumi.Input[str]
    secret: bool = False

    @property
    def mode(self) -> str:
        return "0400" if self.secret else "0444"


@dataclass(frozen=True)
class NetworkAttachment:
    network: docker.Network
    aliases: Sequence[str] = ()


@dataclass(frozen=True)
class PublishedPort:
    internal: int
    external: int
    host_ip: str  # "127.0.0.1", or "0.0.0.0" for prod's Caddy only


@dataclass(frozen=True)
class ServiceSpec:
    """What differs between services; everything else is the hardened default."""

    service: str
    image: pulumi.Input[str]
    healthcheck: Sequence[str]
    memory_mb: int
    cpu_shares: int = 512
    command: Sequence[pulumi.Input[str]] | None = None
    entrypoint: Sequence[str] | None = None
    user: str | None = None
    # "user:group" (names or ids valid in the image) that must own the config files.
    files_owner: str | None = None
    capabilities: Sequence[str] = ()
    networks: Sequence[NetworkAttachment] = ()
    ports: Sequence[PublishedPort] = ()
    mounts: Sequence[docker.ContainerMountArgs] = ()
    tmpfs: Mapping[str, str] = field(default_factory=dict)
    env: Mapping[str, pulumi.Input[str]] = field(default_factory=dict)
    files: Sequence[ConfigFile] = ()
    read_only: bool = True
    health_start_period: str = HEALTH_START_PERIOD
    # Set on one-shot jobs: run to completion during `pulumi up`, never restarted.
    one_shot: bool = False


# Volume purposes whose contents exist nowhere else (databases, Chroma, the documents,
# the backups): protected, so no preview can delete or replace them (a rename must ship
# `aliases`, CONTRIBUTING.md). Certificates, metrics and alert state can be re-made.
IRREPLACEABLE_PURPOSES = frozenset({"data", "documents", "backups"})
PURPOSE_LABEL = "personal-rag.purpose"


def stack_volume(
    name: str, parent: pulumi.Resource, purpose: str, holds_data: bool
) -> docker.Volume:
    """Docker volume ``name`` (it carries the stack). Volumes that hold data outlive the
    stack: ``pulumi destroy`` leaves them (retain on delete), so nothing is lost; the
    irreplaceable ones are also protected."""
    irreplaceable = purpose in IRREPLACEABLE_PURPOSES
    if irreplaceable and not holds_data:
        raise ValueError(f"{name}: a volume for {purpose!r} holds data")
    return docker.Volume(
        name,
        name=name,
        labels=[docker.VolumeLabelArgs(label=PURPOSE_LABEL, value=purpose)],
        opts=pulumi.ResourceOptions(
            parent=parent, retain_on_delete=holds_data, protect=irreplaceable
        ),
    )


def volume_mount(
    source: pulumi.Input[str], target: str, read_only: bool = False
) -> docker.ContainerMountArgs:
    return docker.ContainerMountArgs(
        type="volume", source=source, target=target, read_only=read_only
    )


def bind_mount(source: str, target: str, read_only: bool = True) -> docker.ContainerMountArgs:
    return docker.ContainerMountArgs(
        type="bind",
        source=source,
        target=target,
        read_only=read_only,
        bind_options=docker.ContainerMountBindOptionsArgs(propagation="rslave"),
    )


def _files_hash(files: Sequence[ConfigFile]) -> pulumi.Output[str]:
    """sha256 over paths, modes and contents; secret when any content is."""

    def digest(contents: list[str]) -> str:
        h = hashlib.sha256()
        for f, content in zip(files, contents, strict=True):
            h.update(f"{f.path}\0{f.mode}\0{len(content)}\0".encode())
            h.update(content.encode())
        return h.hexdigest()

    hashed = pulumi.Output.all(*[f.content for f in files]).apply(digest)
    return pulumi.Output.secret(hashed) if any(f.secret for f in files) else hashed


def _init_script(files: Sequence[ConfigFile], owner: str | None) -> str:
    """Copy incoming files into the config volume; stale files are removed first.

    The volume holds only generated copies (never data), so replacing them is safe.
    """
    # Only commands busybox has too: the init runs in each service's own image.
    steps = [
        f"find {CONFIG_DIR} -mindepth 1 -maxdepth 1 -exec rm -rf {{}} +",
        f"cp -R {_INCOMING_DIR}/. {CONFIG_DIR}/",
    ]
    for f in files:
        target = shlex.quote(f"{CONFIG_DIR}/{f.path}")
        steps.append(f"chmod {f.mode} {target}")
    if owner:
        steps.append(f"chown -R {shlex.quote(owner)} {CONFIG_DIR}")
    steps.append(f"find {CONFIG_DIR} -type d -exec chmod 0555 {{}} +")
    return " && ".join(["set -e", *steps])


def image_by_digest(image: pulumi.Input[str], parent: pulumi.Resource) -> pulumi.Input[str]:
    """``image`` as ``repository:tag@sha256:...``: a reference without a digest (a table
    entry not pinned yet, components/images.py) is resolved to the registry's current
    digest now, so no container ever runs a bare tag."""
    if not isinstance(image, str) or "@sha256:" in image:
        return image
    resolved = docker.get_registry_image_output(
        name=image, opts=pulumi.InvokeOutputOptions(parent=parent)
    )
    return resolved.sha256_digest.apply(lambda digest: f"{image}@{digest}")


def require_success(container: docker.Container, name: str) -> pulumi.Output[str]:
    """A one-shot container's exit code, as a value that fails ``pulumi up`` when it is
    not 0 (the provider itself only waits for the exit). Use it where it is awaited: a
    label of the service that needs the job, or the component's registered outputs."""

    def check(code: int | None) -> str:
        if code not in (None, 0):
            raise RuntimeError(f"{name} exited with code {code}; see `docker logs {name}`")
        return "ok"

    return container.exit_code.apply(check)


def hardened_container(
    name: str,
    spec: ServiceSpec,
    parent: pulumi.Resource,
    depends_on: Sequence[pulumi.Resource] = (),
    labels: Mapping[str, pulumi.Input[str]] | None = None,
    replacement_trigger: pulumi.Input[str] | None = None,
) -> docker.Container:
    """Declare ``spec`` as container ``name`` (e.g. rag-staging-redis), hardened."""
    if spec.read_only is False and spec.files and not spec.one_shot:
        # Long-running services keep a read-only root; files come through the volume.
        raise ValueError(f"{name}: a long-running service must keep read_only=True")

    image = image_by_digest(spec.image, parent)
    mounts = list(spec.mounts)
    all_labels: dict[str, pulumi.Input[str]] = {"personal-rag.service": spec.service}
    all_labels.update(labels or {})
    deps = list(depends_on)
    if spec.files:
        config_volume = stack_volume(f"{name}-config", parent, "config", holds_data=False)
        init = docker.Container(
            f"{name}-config-init",
            name=f"{name}-config-init",
            image=image,
            entrypoints=["/bin/sh", "-c", _init_script(spec.files, spec.files_owner)],
            user="0:0",
            network_mode="none",
            # Root inside the init container only needs to copy and chown.
            capabilities=docker.ContainerCapabilitiesArgs(
                drops=["ALL"], adds=["CHOWN", "DAC_OVERRIDE", "FOWNER"]
            ),
            security_opts=["no-new-privileges:true"],
            read_only=False,
            uploads=[
                docker.ContainerUploadArgs(file=f"{_INCOMING_DIR}/{f.path}", content=f.content)
                for f in spec.files
            ],
            mounts=[volume_mount(config_volume.name, CONFIG_DIR)],
            memory=64,
            restart="no",
            must_run=False,
            attach=True,  # pulumi up waits for the copy to finish before the service starts
            labels=[docker.ContainerLabelArgs(label="personal-rag.purpose", value="config-init")],
            opts=pulumi.ResourceOptions(parent=parent, delete_before_replace=True),
        )
        mounts.append(volume_mount(config_volume.name, CONFIG_DIR, read_only=True))
        all_labels["personal-rag.config-sha256"] = _files_hash(spec.files)
        # The service waits for the copy and is not created if it failed.
        all_labels["personal-rag.config-init"] = require_success(init, f"{name}-config-init")
        deps.append(init)

    return docker.Container(
        name,
        name=name,
        image=image,
        command=list(spec.command) if spec.command is not None else None,
        entrypoints=list(spec.entrypoint) if spec.entrypoint is not None else None,
        user=spec.user,
        envs=[pulumi.Output.concat(k, "=", v) for k, v in spec.env.items()] or None,
        capabilities=docker.ContainerCapabilitiesArgs(drops=["ALL"], adds=list(spec.capabilities)),
        security_opts=["no-new-privileges:true"],
        privileged=False,
        read_only=spec.read_only,
        tmpfs=dict(spec.tmpfs) or None,
        memory=spec.memory_mb,
        memory_swap=spec.memory_mb,  # no swap beyond the limit
        cpu_shares=spec.cpu_shares,
        restart="no" if spec.one_shot else "on-failure",
        max_retry_count=0 if spec.one_shot else ON_FAILURE_RETRIES,
        must_run=not spec.one_shot,
        # One-shot jobs are waited for to exit; services until their healthcheck passes,
        # so a broken service fails `pulumi up` instead of passing silently.
        attach=spec.one_shot or None,
        wait=None if spec.one_shot else True,
        wait_timeout=None if spec.one_shot else 180,
        healthcheck=docker.ContainerHealthcheckArgs(
            tests=list(spec.healthcheck),
            interval=HEALTH_INTERVAL,
            timeout=HEALTH_TIMEOUT,
            retries=HEALTH_RETRIES,
            start_period=spec.health_start_period,
        ),
        networks_advanced=[
            docker.ContainerNetworksAdvancedArgs(name=a.network.name, aliases=list(a.aliases))
            for a in spec.networks
        ]
        or None,
        network_mode="none" if not spec.networks else None,
        ports=[
            docker.ContainerPortArgs(internal=p.internal, external=p.external, ip=p.host_ip)
            for p in spec.ports
        ]
        or None,
        mounts=mounts or None,
        labels=[docker.ContainerLabelArgs(label=k, value=v) for k, v in all_labels.items()],
        # Names are fixed (they carry the stack), so the old container must go first.
        opts=pulumi.ResourceOptions(
            parent=parent,
            depends_on=deps,
            delete_before_replace=True,
            replacement_trigger=replacement_trigger,
        ),
    )
