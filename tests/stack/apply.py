"""Apply a stack's recorded declarations to the real engine the way pulumi-docker does.

Driven by what the program declares (``tests/pulumi_harness.run_program``), nothing
hand-copied: every ``docker:index/network|volume|image|container``, networks and volumes
first (registration order), images built (tests/stack/images), then each container, in
its own thread, as the Pulumi engine runs independent resources in parallel:

- created with every declared input (tests/docker/translate.py: user, caps, security
  options, read-only root, tmpfs, memory, CPU shares, restart policy, ports, mounts, env,
  entrypoint, command) plus its declared labels and healthcheck; the default bridge
  swapped for the declared networks with their aliases; ``uploads`` copied into ``/``;
  then started;
- not before each of its explicit dependencies is done, as Pulumi orders them: a
  ``wait`` container is done when healthy (within its ``waitTimeout``), an ``attach``
  one when it has exited -- with code 0, or the apply fails (the program's
  ``require_success`` turns a non-zero code into a failed ``pulumi up``).

A declared input the harness does not apply, an unknown resource type, or an image ref
without a local image is an error, never a silent skip.

Test-only differences, all explicit: names carry the session prefix (Renamer) and each
container also gets its declared name as a network alias, so the names the program
writes into env and configs resolve; published host ports are free ones (the declared
host IP is kept); image refs map to the local images; DNS stays on this machine
(tests/docker/deployment.py); the healthcheck's ``CMD`` argv runs through ``/bin/sh``
(the CLI takes a shell string). One host limit: a bind mount declared with ``rslave``
propagation of a source whose host mount is private (a sandbox without systemd; systemd
makes ``/`` shared at boot) cannot even be created there. The harness then binds the
same filesystem through a shared bind of the source it makes itself
(``/run/ragtest-binds/...``, removed by ``release_host_binds``), keeping ``rslave``, and
records that in ``Applied.deviations`` (logged), never silently. The program's command
on the Docker host (pulumi-command's local Command: the host firewall) runs as declared,
but inside a throwaway network namespace, so this host's own iptables stay untouched;
also a recorded deviation.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import shlex
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.docker.deployment import CONTAINED_DNS
from tests.docker.engine import DockerCli, DockerError, DockerObjects
from tests.docker.translate import (
    CONTAINER_INPUTS,
    ContainerPlan,
    Renamer,
    plan_container,
    plan_network,
    upload_tar,
)
from tests.pulumi_harness import ProgramRun, Recorded
from tests.stack.images import LocalImages
from tests.tooling import require_tool

NETWORK = "docker:index/network:Network"
VOLUME = "docker:index/volume:Volume"
IMAGE = "docker:index/image:Image"
CONTAINER = "docker:index/container:Container"
# Resources that make no engine object (keys, certificates, passwords, components).
NO_ENGINE_OBJECT = ("tls:", "random:", "personal-rag:")
# pulumi-command's command on the Docker host itself: ``/bin/sh -c <create>`` with
# ``stdin``, ``delete`` likewise at destroy. Run for real, but in a throwaway network
# namespace: the host firewall's rules change iptables, and this host's own must stay
# untouched (tests/docker proves the rules against a real bridge).
LOCAL_COMMAND = "command:local:Command"
LOCAL_COMMAND_INPUTS = {"create", "delete", "stdin", "triggers"}
# Inputs applied here on top of the translator's.
HARNESS_INPUTS = {"labels", "healthcheck", "mustRun", "attach", "wait", "waitTimeout"}
VOLUME_INPUTS = {"name", "labels"}
ATTACH_TIMEOUT_S = 300.0
IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")
POLL_S = 1.0


class ApplyError(RuntimeError):
    pass


LOG = logging.getLogger("tests.stack")


def progress(message: str) -> None:
    """Where a bring-up's time goes; shown live with ``-o log_cli=true --log-cli-level=INFO``."""
    LOG.info("%s %s", time.strftime("%H:%M:%S", time.gmtime()), message)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def mount_propagation(path: str) -> str:
    """The host's propagation of the mount holding ``path`` (findmnt), e.g. shared."""
    findmnt = shutil.which("findmnt")
    if findmnt is None:
        raise ApplyError("findmnt (util-linux) is needed to read the host's mount propagation")
    done = subprocess.run(
        [findmnt, "-n", "-o", "PROPAGATION", "--target", path],
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    )
    return done.stdout.strip()


HOST_BINDS_DIR = Path("/run/ragtest-binds")
_host_binds: dict[str, str] = {}  # declared source -> the shared bind standing in for it
_host_binds_lock = threading.Lock()


def _shared_bind_of(source: str) -> str:
    with _host_binds_lock:
        if source not in _host_binds:
            target = HOST_BINDS_DIR / f"{os.getpid()}-{len(_host_binds)}"
            target.mkdir(parents=True, exist_ok=True)
            for argv in (
                ["mount", "--bind", source, str(target)],
                ["mount", "--make-shared", str(target)],
            ):
                subprocess.run(argv, check=True, capture_output=True, timeout=30)
            _host_binds[source] = str(target)
        return _host_binds[source]


def release_host_binds() -> None:
    """Unmount and remove the shared binds this process made."""
    with _host_binds_lock:
        for target in _host_binds.values():
            subprocess.run(["umount", target], check=False, capture_output=True, timeout=30)
            Path(target).rmdir()
        _host_binds.clear()


def deviation(deviations: list[str], text: str) -> None:
    """A test-only difference from what pulumi-docker would do: recorded and logged."""
    deviations.append(text)
    LOG.warning("deviation: %s", text)


def host_bindable(inputs: Mapping[str, Any], deviations: list[str]) -> dict[str, Any]:
    """``inputs`` with rslave/rshared binds of private host mounts made through a shared
    bind of the same source."""
    mounts = []
    for mount in inputs.get("mounts") or []:
        propagation = (mount.get("bindOptions") or {}).get("propagation")
        if (
            mount["type"] == "bind"
            and propagation in ("rslave", "slave", "rshared", "shared")
            and mount_propagation(mount["source"]) == "private"
        ):
            stand_in = _shared_bind_of(mount["source"])
            deviation(
                deviations,
                f"{inputs['name']}: bind {mount['source']} ({propagation}) made through "
                f"{stand_in}, a shared bind of it (the host's mount is private)",
            )
            mount = {**mount, "source": stand_in}
        mounts.append(mount)
    return {**inputs, "mounts": mounts} if mounts else dict(inputs)


def health_flags(inputs: Mapping[str, Any]) -> list[str]:
    check = inputs.get("healthcheck")
    if not check:
        return []
    tests = list(check.get("tests") or [])
    if tests == ["NONE"]:
        return ["--no-healthcheck"]
    if tests[0] == "CMD":
        command = shlex.join(tests[1:])
    elif tests[0] == "CMD-SHELL":
        command = tests[1]
    else:
        raise ApplyError(f"{inputs['name']}: healthcheck test {tests[0]!r} not applied")
    flags = ["--health-cmd", command]
    for key, flag in (
        ("interval", "--health-interval"),
        ("timeout", "--health-timeout"),
        ("startPeriod", "--health-start-period"),
    ):
        if check.get(key):
            flags += [flag, str(check[key])]
    if check.get("retries") is not None:
        flags += ["--health-retries", str(int(check["retries"]))]
    unknown = set(check) - {"tests", "interval", "timeout", "startPeriod", "retries"}
    if unknown - {k for k, v in check.items() if v is None}:
        raise ApplyError(f"{inputs['name']}: healthcheck inputs {sorted(unknown)} not applied")
    return flags


def label_flags(inputs: Mapping[str, Any]) -> list[str]:
    return [
        arg
        for label in inputs.get("labels") or []
        for arg in ("--label", f"{label['label']}={label['value']}")
    ]


class HealthBoard:
    """State and health of every container being waited for, read with ONE ``docker
    inspect`` per poll for all of them: a CLI call per container per second would take
    most of a core on 2 while a stack comes up."""

    FORMAT = "{{.Name}} {{.State.Status}} {{if .State.Health}}{{.State.Health.Status}}{{end}}"

    def __init__(self, docker: DockerCli) -> None:
        self.docker = docker
        self._lock = threading.Lock()
        self._waiting: set[str] = set()
        self._states: dict[str, tuple[str, str]] = {}
        self._polled_at = 0.0

    def state(self, name: str) -> tuple[str, str]:
        """(status, health) of ``name``, at most POLL_S old."""
        with self._lock:
            self._waiting.add(name)
            if name not in self._states or time.monotonic() - self._polled_at >= POLL_S:
                self._poll()
            return self._states.get(name, ("missing", ""))

    def forget(self, name: str) -> None:
        with self._lock:
            self._waiting.discard(name)
            self._states.pop(name, None)

    def _poll(self) -> None:
        done = self.docker.call(
            "inspect", "--type", "container", "--format", self.FORMAT, *sorted(self._waiting),
            timeout=30,
        )  # fmt: skip
        self._states = {}
        for line in done.stdout.decode(errors="replace").splitlines():
            name, status, *health = line.split()
            self._states[name.lstrip("/")] = (status, health[0] if health else "")
        self._polled_at = time.monotonic()


def run_as_dag(
    records: Sequence[Recorded],
    dependencies: Callable[[Recorded], Sequence[str]],
    step: Callable[[Recorded], None],
) -> None:
    """``step`` for every record, each in its own thread as soon as the records it
    depends on (by name, among ``records``) are done -- the Pulumi engine's order, which
    runs independent resources in parallel. After a failure nothing new starts (steps
    already running finish); the first error is raised."""
    done = {record.name: threading.Event() for record in records}
    failed = threading.Event()

    def worker(record: Recorded) -> None:
        try:
            for dependency in dependencies(record):
                done[dependency].wait()
            if not failed.is_set():
                step(record)
        except BaseException:
            failed.set()
            raise
        finally:
            done[record.name].set()

    in_threads([functools.partial(worker, record) for record in records])


def in_threads(jobs: Sequence[Callable[[], None]]) -> None:
    """Run each job in its own thread and wait for all; the first error raised."""
    errors: list[BaseException] = []

    def guarded(job: Callable[[], None]) -> None:
        try:
            job()
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=(job,)) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]


@dataclass
class Applied:
    """What one stack's apply made: declared name -> engine name, and host ports."""

    stack: str
    containers: dict[str, str] = field(default_factory=dict)
    host_ports: dict[int, int] = field(default_factory=dict)  # declared -> bound
    inputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # declared name -> inputs
    deviations: list[str] = field(default_factory=list)


@dataclass
class StackApplier:
    docker: DockerCli
    objects: DockerObjects
    rename: Renamer
    images: LocalImages
    app_image: str
    # Serializes network/volume creation and host-port choice (containers are applied
    # in parallel, as the Pulumi engine applies independent resources).
    lock: threading.Lock = field(default_factory=threading.Lock)
    claimed: set[str] = field(default_factory=set)  # networks and volumes being made now
    # Local images are built once, by one thread (LocalImages keeps no lock of its own).
    image_lock: threading.Lock = field(default_factory=threading.Lock)
    health: HealthBoard = field(init=False)
    # The network namespace the host's commands run in, and their delete steps.
    host_namespace: str | None = None
    host_deletes: list[tuple[str, str, str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.health = HealthBoard(self.docker)

    # --- commands on the Docker host -------------------------------------------------
    def _in_host_namespace(
        self, command: str, stdin: str | None
    ) -> subprocess.CompletedProcess[str]:
        assert self.host_namespace is not None
        return subprocess.run(
            [require_tool("ip"), "netns", "exec", self.host_namespace, "/bin/sh", "-c", command],
            input=stdin or "",
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def _claim(self, name: str, made: list[str], mine: set[str]) -> bool:
        """True for the one caller that is to create ``name`` (not made before, not
        being made by another thread of this applier); recorded in ``mine``."""
        with self.lock:
            if name in made or name in self.claimed:
                return False
            self.claimed.add(name)
            mine.add(name)
            return True

    def host_command(self, record: Recorded, applied: Applied) -> None:
        """pulumi-command's local Command, as it runs it (a non-zero exit fails the
        apply), inside this applier's throwaway network namespace."""
        inputs = record.inputs
        unknown = sorted(
            k for k, v in inputs.items() if v is not None and k not in LOCAL_COMMAND_INPUTS
        )
        if unknown:
            raise ApplyError(f"command {record.name}: inputs {unknown} are not applied")
        with self.lock:
            if self.host_namespace is None:
                namespace = f"{self.rename.prefix}host"
                subprocess.run(
                    [require_tool("ip"), "netns", "add", namespace],
                    check=True, capture_output=True, timeout=30,
                )  # fmt: skip
                self.host_namespace = namespace
        done = self._in_host_namespace(inputs["create"], inputs.get("stdin"))
        if done.returncode != 0:
            raise ApplyError(
                f"command {record.name}: create exited {done.returncode}:\n{done.stderr[-2000:]}"
            )
        if inputs.get("delete"):
            self.host_deletes.append((record.name, inputs["delete"], inputs.get("stdin")))
        deviation(
            applied.deviations,
            f"{record.name} (command on the host) run in network namespace "
            f"{self.host_namespace}, not the host's: this host's iptables stay untouched",
        )

    def release_host_commands(self) -> list[str]:
        """Each host command's delete (as `pulumi destroy` runs it), newest first, then the
        namespace removed; what failed."""
        errors = []
        for name, delete, stdin in reversed(self.host_deletes):
            done = self._in_host_namespace(delete, stdin)
            if done.returncode != 0:
                errors.append(f"command {name}: delete exited {done.returncode}: {done.stderr}")
        self.host_deletes.clear()
        if self.host_namespace is not None:
            subprocess.run(
                [require_tool("ip"), "netns", "del", self.host_namespace],
                check=False, capture_output=True, timeout=30,
            )  # fmt: skip
            self.host_namespace = None
        return errors

    # --- images --------------------------------------------------------------------
    def local_image(self, run: ProgramRun, ref: str) -> str:
        with self.image_lock:
            return self._local_image(run, ref)

    def _local_image(self, run: ProgramRun, ref: str) -> str:
        if IMAGE_ID.fullmatch(ref):
            # Already an image of this engine (localImageId, `up.sh --demo`): as declared.
            if not self.docker.exists("image", ref):
                raise ApplyError(f"image id {ref} is not an image of this engine")
            return ref
        for image in run.of_type(IMAGE):
            if image.inputs["imageName"] == ref:
                return self.images.declared_build(image.inputs)
        app_ref = run.exports.get("imageRef", (None, False))[0]
        if ref == app_ref:
            return self.app_image
        return self.images.for_official(ref)

    # --- containers ----------------------------------------------------------------
    def plan(self, run: ProgramRun, inputs: Mapping[str, Any], applied: Applied) -> ContainerPlan:
        with self.lock:
            for port in inputs.get("ports") or []:
                external = int(port["external"])
                applied.host_ports.setdefault(external, free_port())
        return plan_container(
            inputs, self.rename, self.local_image(run, inputs["image"]), None, applied.host_ports
        )

    def create(self, inputs: Mapping[str, Any], plan: ContainerPlan) -> str:
        extra = [*CONTAINED_DNS, *label_flags(inputs), *health_flags(inputs)]
        self.objects.create_container(plan.name, [*extra, *plan.create_args])
        if plan.networks:
            done = self.docker.call("network", "disconnect", "bridge", plan.name)
            stderr = done.stderr.decode(errors="replace")
            if done.returncode != 0 and "is not connected" not in stderr:
                raise ApplyError(f"disconnecting {plan.name} from bridge: {stderr}")
            for network in plan.networks:
                aliases = [*network.aliases, inputs["name"]]
                flags = [arg for alias in aliases for arg in ("--alias", alias)]
                self.docker.run("network", "connect", *flags, network.network, plan.name)
        for upload in plan.uploads:
            self.docker.run("cp", "-", f"{plan.name}:/", input_bytes=upload_tar(upload))
        return plan.name

    def logs(self, name: str) -> str:
        done = self.docker.call("logs", "--tail", "40", name, timeout=30)
        return (done.stdout + done.stderr).decode(errors="replace")

    def wait_exit(self, name: str, timeout: float = ATTACH_TIMEOUT_S) -> int:
        code = int(self.docker.run("wait", name, timeout=timeout))
        return code

    def wait_healthy(self, name: str, deadline: float) -> None:
        while True:
            status, health = self.health.state(name)
            if health == "healthy":
                self.health.forget(name)
                progress(f"{name} healthy")
                return
            if health == "unhealthy" or time.monotonic() > deadline:
                self.health.forget(name)
                raise ApplyError(
                    f"{name} is {health or status} (waited for healthy):\n{self.logs(name)}"
                )
            time.sleep(POLL_S / 2)

    def apply_container(self, run: ProgramRun, record: Recorded, applied: Applied) -> str:
        inputs = record.inputs
        unknown = sorted(
            k
            for k, v in inputs.items()
            if v is not None and k not in CONTAINER_INPUTS | HARNESS_INPUTS
        )
        if unknown:
            raise ApplyError(f"container {inputs['name']}: inputs {unknown} are not applied")
        plan = self.plan(run, host_bindable(inputs, applied.deviations), applied)
        name = self.create(inputs, plan)
        applied.containers[inputs["name"]] = name
        applied.inputs[inputs["name"]] = dict(inputs)
        self.docker.run("start", name, timeout=60)
        progress(f"{name} started")
        if inputs.get("attach"):
            code = self.wait_exit(name)
            progress(f"{name} exited {code}")
            if code != 0:
                raise ApplyError(f"{name} exited with {code}:\n{self.logs(name)}")
        elif inputs.get("mustRun", True) is False:
            raise ApplyError(f"{name}: mustRun=false without attach is not applied")
        return name

    # --- the whole stack -----------------------------------------------------------
    def dependencies(self, run: ProgramRun, record: Recorded) -> list[Recorded]:
        opts = run.options.get((record.typ, record.name))
        deps = list(getattr(opts, "depends_on", None) or [])
        by_name = {(r.typ, r.name): r for r in run.resources}
        found = []
        for dep in deps:
            key = (getattr(dep, "_type", ""), getattr(dep, "_name", ""))
            if key not in by_name:
                raise ApplyError(f"{record.name}: dependency {key} is not a recorded resource")
            found.append(by_name[key])
        return found

    def apply(
        self,
        run: ProgramRun,
        only: Callable[[Recorded], bool] | None = None,
    ) -> Applied:
        """Apply ``run``; ``only`` limits which containers are made (their dependencies
        outside the selection are not waited for)."""
        applied = Applied(run.stack)
        # Networks and volumes depend on nothing: made in parallel, as the engine does;
        # the host command (the firewall names the networks) after them.
        creations: list[Callable[[], Any]] = []
        claimed: set[str] = set()
        host_commands: list[Recorded] = []
        for record in run.resources:
            if record.typ.startswith(NO_ENGINE_OBJECT) or record.typ in (CONTAINER, IMAGE):
                continue
            if record.typ == LOCAL_COMMAND:
                host_commands.append(record)
            elif record.typ == NETWORK:
                plan = plan_network(record.inputs, self.rename)
                if self._claim(plan.name, self.objects.networks, claimed):
                    creations.append(
                        functools.partial(
                            self.objects.create_network,
                            plan.name,
                            plan.internal,
                            plan.driver,
                            plan.options,
                        )
                    )
            elif record.typ == VOLUME:
                unknown = sorted(
                    k for k, v in record.inputs.items() if v is not None and k not in VOLUME_INPUTS
                )
                if unknown:
                    raise ApplyError(
                        f"volume {record.inputs['name']}: inputs {unknown} not applied"
                    )
                name = self.rename(record.inputs["name"])
                if self._claim(name, self.objects.volumes, claimed):
                    labels = [
                        arg
                        for label in record.inputs.get("labels") or []
                        for arg in ("--label", f"{label['label']}={label['value']}")
                    ]
                    self.objects.volumes.append(name)
                    argv = ["volume", "create", "--label", self.objects.label, *labels, name]
                    creations.append(functools.partial(self.docker.run, *argv))
            else:
                raise ApplyError(f"resource type {record.typ} ({record.name}) is not applied")
        try:
            in_threads(creations)
        finally:
            with self.lock:  # made now (in the objects' lists), or failed
                self.claimed -= claimed
        for record in host_commands:
            self.host_command(record, applied)

        selected = [r for r in run.resources if r.typ == CONTAINER and (only is None or only(r))]
        names = {r.name for r in selected}

        run_as_dag(
            selected,
            lambda r: [d.name for d in self.dependencies(run, r) if d.name in names],
            lambda record: self.start_container(run, record, applied),
        )
        return applied

    def start_container(self, run: ProgramRun, record: Recorded, applied: Applied) -> None:
        """Create and start one declared container; with `wait`, wait until it is
        healthy within its waitTimeout, as pulumi-docker does."""
        name = self.apply_container(run, record, applied)
        if record.inputs.get("wait"):
            timeout = float(record.inputs.get("waitTimeout") or 60)
            self.wait_healthy(name, time.monotonic() + timeout)

    def update(self, old: ProgramRun, new: ProgramRun, applied: Applied) -> list[str]:
        """A later `pulumi up`: every container whose declaration changed is replaced,
        the old one deleted first (the program declares delete-before-replace: names
        are fixed), each after its replaced dependencies are done (run_as_dag);
        everything else is left running. The replaced containers' declared names."""
        for typ in (NETWORK, VOLUME, IMAGE):
            before = {r.name: r.inputs for r in old.of_type(typ)}
            after = {r.name: r.inputs for r in new.of_type(typ)}
            if before != after:
                raise ApplyError(f"{typ} declarations changed; update applies containers only")
        changed = changed_containers(old, new)
        records = [r for r in new.resources if r.typ == CONTAINER and r.name in changed]

        def replace(record: Recorded) -> None:
            name = applied.containers[record.inputs["name"]]
            self.docker.run("rm", "-f", "-v", name, timeout=60)
            self.objects.containers.remove(name)
            self.start_container(new, record, applied)

        run_as_dag(
            records,
            lambda r: [d.name for d in self.dependencies(new, r) if d.name in changed],
            replace,
        )
        return [r.inputs["name"] for r in records]


def changed_containers(old: ProgramRun, new: ProgramRun) -> set[str]:
    """Logical names of the containers a `pulumi up` from ``old`` to ``new`` replaces: any
    input differs (the provider replaces a container on every input change) or the
    declared ``replacement_trigger`` changed."""
    before = {r.name: r for r in old.of_type(CONTAINER)}
    changed = set()
    for record in new.of_type(CONTAINER):
        previous = before.get(record.name)
        if previous is None:
            raise ApplyError(f"{record.name} is new; update replaces existing containers only")
        old_trigger = getattr(
            old.options.get((CONTAINER, record.name)), "replacement_trigger", None
        )
        new_trigger = getattr(
            new.options.get((CONTAINER, record.name)), "replacement_trigger", None
        )
        if previous.inputs != record.inputs or old_trigger != new_trigger:
            changed.add(record.name)
    return changed


def run_parallel(tasks: Sequence[Callable[[], Any]]) -> list[Any]:
    """Run each task in a thread; the results, or the first error raised."""
    results: list[Any] = [None] * len(tasks)

    def runner(i: int, task: Callable[[], Any]) -> None:
        results[i] = task()

    in_threads([functools.partial(runner, i, task) for i, task in enumerate(tasks)])
    return results


__all__ = ["Applied", "ApplyError", "DockerError", "StackApplier", "run_parallel"]
