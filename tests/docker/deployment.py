"""What the tests deploy: the program's declared networks and containers, made for real
through the translator, in the session's namespace, plus probes run inside containers."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tests.docker.engine import DockerCli, DockerObjects
from tests.docker.translate import (
    ContainerPlan,
    Renamer,
    plan_container,
    plan_network,
    upload_tar,
)
from tests.pulumi_harness import ProgramRun

START_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 2.0

# Name resolution stays on this machine: the embedded DNS answers the test's container
# names itself and forwards any other name to 127.0.0.1:53, where nothing answers, so no
# lookup leaves for the host's resolvers; a name it does not know fails within
# DNS_TIMEOUT_S instead. Test-only: the program declares no DNS settings, and resolving
# container names does not use them.
DNS_TIMEOUT_S = 2
CONTAINED_DNS = (
    "--dns", "127.0.0.1",
    "--dns-option", f"timeout:{DNS_TIMEOUT_S}",
    "--dns-option", "attempts:1",
)  # fmt: skip

# Runs inside a container: TCP connect to each host:port (in parallel, bounded) and print
# {target: {"outcome": ..., "address": ...}} as JSON.
CONNECT_PROBE = """
import concurrent.futures, errno, json, socket, sys
TIMEOUT = float(sys.argv[1])
def probe(target):
    host, _, port = target.rpartition(":")
    try:
        address = socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)[0][4]
    except socket.gaierror:
        return {"outcome": "no-dns", "address": None}
    try:
        socket.create_connection(address, timeout=TIMEOUT).close()
        outcome = "connected"
    except ConnectionRefusedError:
        outcome = "refused"
    except TimeoutError:
        outcome = "timeout"
    except OSError as exc:
        unreachable = (errno.ENETUNREACH, errno.EHOSTUNREACH)
        outcome = "unreachable" if exc.errno in unreachable else f"error-{exc.errno}"
    return {"outcome": outcome, "address": address[0]}
targets = sys.argv[2:]
with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps(dict(zip(targets, pool.map(probe, targets)))))
"""
# A packet got to a host that answered: the target is reachable.
REACHED = {"connected", "refused"}


@dataclass
class Deployment:
    docker: DockerCli
    objects: DockerObjects
    rename: Renamer
    image: str
    programs: Mapping[str, ProgramRun]

    def declared(self, stack: str, name: str) -> dict[str, Any]:
        """The recorded inputs of container ``name`` (e.g. rag-staging-api)."""
        return dict(self.programs[stack].containers[name].inputs)

    def ensure_network(self, stack: str, declared_name: str) -> str:
        plan = plan_network(self.programs[stack].networks[declared_name].inputs, self.rename)
        if plan.name not in self.objects.networks:
            self.objects.create_network(plan.name, plan.internal, plan.driver, plan.options)
        return plan.name

    def plan(
        self,
        stack: str,
        name: str,
        process: Sequence[str] | None = None,
        host_ports: Mapping[int, int] | None = None,
        inputs: Mapping[str, Any] | None = None,
    ) -> ContainerPlan:
        declared = dict(inputs) if inputs is not None else self.declared(stack, name)
        return plan_container(declared, self.rename, self.image, process, host_ports)

    def create(self, stack: str, plan: ContainerPlan) -> str:
        """The provider's steps up to (not including) start: create, swap the default
        bridge for the declared networks, upload. Raises DockerError on any step."""
        for network in plan.networks:
            self.ensure_network(*self._declared_network(network.network))
        for volume in plan.volumes:
            if volume not in self.objects.volumes:
                self.objects.create_volume(volume)
        self.objects.create_container(plan.name, [*CONTAINED_DNS, *plan.create_args])
        if plan.networks:
            done = self.docker.call("network", "disconnect", "bridge", plan.name)
            stderr = done.stderr.decode(errors="replace")
            if done.returncode != 0 and "is not connected" not in stderr:
                raise RuntimeError(f"disconnecting {plan.name} from bridge: {stderr}")
            for network in plan.networks:
                aliases = [arg for alias in network.aliases for arg in ("--alias", alias)]
                self.docker.run("network", "connect", *aliases, network.network, plan.name)
        for upload in plan.uploads:
            self.docker.run("cp", "-", f"{plan.name}:/", input_bytes=upload_tar(upload))
        return plan.name

    def start(self, stack: str, plan: ContainerPlan) -> str:
        """create + start; returns once the container runs (bounded)."""
        name = self.create(stack, plan)
        self.docker.run("start", name, timeout=START_TIMEOUT_S)
        state = self.docker.inspect("container", name)["State"]
        if not state["Running"]:
            logs = self.docker.call("logs", name).stderr.decode(errors="replace")
            raise RuntimeError(f"{name} is not running ({state['Status']}): {logs[-2000:]}")
        return name

    def run_to_exit(self, stack: str, plan: ContainerPlan, timeout: float = 60) -> int:
        """create + start attached until the process exits (a one-shot job); exit code."""
        name = self.create(stack, plan)
        self.docker.call("start", "--attach", name, timeout=timeout)
        code = self.docker.inspect("container", name)["State"]["ExitCode"]
        return int(code)

    def _declared_network(self, renamed: str) -> tuple[str, str]:
        """(stack, declared name) of a renamed network, whichever stack declares it."""
        for stack, program in self.programs.items():
            for declared in program.networks:
                if self.rename(declared) == renamed:
                    return stack, declared
        raise KeyError(f"{renamed} is not a declared network")

    def exec(
        self, container: str, *argv: str, user: str | None = None, timeout: float = 30
    ) -> subprocess.CompletedProcess[bytes]:
        as_user = ["--user", user] if user else []
        return self.docker.call("exec", *as_user, container, *argv, timeout=timeout)

    def connect_probe(self, container: str, targets: Sequence[str]) -> dict[str, dict[str, Any]]:
        """From inside ``container``: outcome per ``host:port`` (bounded per target)."""
        done = self.exec(
            container,
            "python3",
            "-c",
            CONNECT_PROBE,
            str(CONNECT_TIMEOUT_S),
            *targets,
            timeout=CONNECT_TIMEOUT_S * 4 + 10,
        )
        if done.returncode != 0:
            raise RuntimeError(f"probe in {container} failed: {done.stderr.decode()}")
        result: dict[str, dict[str, Any]] = json.loads(done.stdout)
        return result

    def ip_on(self, container: str, network: str) -> str:
        networks = self.docker.inspect("container", container)["NetworkSettings"]["Networks"]
        address: str = networks[network]["IPAddress"]
        return address

    def addresses(self, container: str) -> dict[str, str]:
        """network -> the container's IPv4 address there, for every network it is on."""
        networks = self.docker.inspect("container", container)["NetworkSettings"]["Networks"]
        return {name: settings["IPAddress"] for name, settings in networks.items()}

    def bridge_interface(self, network: str) -> str:
        """The host interface of a bridge network (the program names the backend's)."""
        options = self.docker.inspect("network", network)["Options"]
        name: str = options["com.docker.network.bridge.name"]
        return name

    def gateway_of(self, network: str) -> str:
        config = self.docker.inspect("network", network)["IPAM"]["Config"]
        gateway: str = config[0]["Gateway"]
        return gateway
