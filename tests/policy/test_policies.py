"""The CrossGuard pack's policies, called the way the engine calls them (no CLI): with
the resources the program declares for both stacks under mocks -- no violation -- and
with one mutated resource per broken promise, which the matching policy must report."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import yaml
from pulumi_policy import (
    EnforcementLevel,
    PolicyCustomTimeouts,
    PolicyResourceOptions,
    ResourceValidationArgs,
)

from policy.rag_policies import POLICIES
from tests.pulumi_harness import REPO, ProgramRun, Recorded, run_program

STACKS = ("staging", "prod")
ALL_INTERFACES = "0.0.0.0"  # noqa: S104 - what a mutation publishes on
BY_NAME = {p.name: p for p in POLICIES}


@pytest.fixture(scope="module")
def runs() -> dict[str, ProgramRun]:
    return {stack: run_program(stack) for stack in STACKS}


def as_policy_args(
    run: ProgramRun, resource: Recorded, props: dict[str, Any] | None = None, **opts: Any
) -> ResourceValidationArgs:
    registration = next(
        r for r in run.registrations if (r.typ, r.name) == (resource.typ, resource.name)
    )
    options = {
        "protect": registration.protect,
        "ignore_changes": [],
        "delete_before_replace": None,
        "aliases": sorted(registration.alias_urns),
        "custom_timeouts": PolicyCustomTimeouts(0, 0, 0),
        "additional_secret_outputs": [],
        **opts,
    }
    return ResourceValidationArgs(
        resource_type=resource.typ,
        props=resource.inputs if props is None else props,
        urn=registration.urn,
        name=resource.name,
        opts=PolicyResourceOptions(**options),
        provider=None,
    )


def violations(policy_name: str, args: ResourceValidationArgs) -> list[str]:
    found: list[str] = []

    def report(message: str, urn: str | None = None) -> None:
        found.append(message)

    result = BY_NAME[policy_name].validate(args, report)
    assert result is None  # synchronous validations
    return found


def resource(run: ProgramRun, name: str) -> Recorded:
    (found,) = [r for r in run.resources if r.name == name]
    return found


def test_every_policy_is_mandatory_and_in_the_pack() -> None:
    assert len(POLICIES) >= 12
    assert all(p.enforcement_level == EnforcementLevel.MANDATORY for p in POLICIES)
    main = (REPO / "policy" / "__main__.py").read_text()
    assert "EnforcementLevel.MANDATORY" in main and "policies=list(POLICIES)" in main
    pack = yaml.safe_load((REPO / "policy" / "PulumiPolicy.yaml").read_text())
    assert pack["runtime"]["name"] == "python"
    requirements = (REPO / "policy" / "requirements.txt").read_text()
    assert "pulumi-policy==" in requirements


@pytest.mark.parametrize("stack", STACKS)
def test_both_stacks_pass_every_policy(runs: dict[str, ProgramRun], stack: str) -> None:
    run = runs[stack]
    found = {
        (policy.name, r.name): v
        for r in run.resources
        for policy in POLICIES
        if (v := violations(policy.name, as_policy_args(run, r)))
    }
    assert found == {}
    # The policies did look at something: every kind they judge is there.
    kinds = {r.typ for r in run.resources}
    assert {
        "docker:index/container:Container",
        "docker:index/network:Network",
        "docker:index/volume:Volume",
        "docker:index/image:Image",
        "random:index/randomPassword:RandomPassword",
    } <= kinds


def env_set(props: dict[str, Any], key: str, value: str) -> None:
    envs = [e for e in props.get("envs") or [] if not e.startswith(f"{key}=")]
    props["envs"] = [*envs, f"{key}={value}"]


Mutation = Callable[[dict[str, Any]], object]
# (policy that must fire, stack, resource name, mutation of its props)
MUTATIONS: list[tuple[str, str, str, Mutation]] = [
    (
        "container-no-new-privileges",
        "staging",
        "rag-staging-redis",
        lambda p: p.update(securityOpts=[]),
    ),
    (
        "container-drop-all-capabilities",
        "prod",
        "rag-prod-api",
        lambda p: p.update(capabilities={"drops": [], "adds": []}),
    ),
    (
        "container-drop-all-capabilities",
        "prod",
        "rag-prod-caddy",
        lambda p: p["capabilities"].update(adds=["NET_BIND_SERVICE", "SYS_ADMIN"]),
    ),
    ("container-read-only-root", "prod", "rag-prod-postgres", lambda p: p.update(readOnly=False)),
    (
        "container-read-only-root",
        "staging",
        "rag-staging-redis-config-init",
        lambda p: p.update(networkMode="bridge"),
    ),
    ("container-memory-limit", "prod", "rag-prod-prometheus", lambda p: p.pop("memory")),
    (
        "container-memory-limit",
        "prod",
        "rag-prod-api",
        lambda p: p.update(memorySwap=p["memory"] * 2),
    ),
    ("container-restart-policy", "staging", "rag-staging-api", lambda p: p.update(restart="no")),
    (
        "container-healthcheck",
        "prod",
        "rag-prod-redis",
        lambda p: p["healthcheck"].update(tests=["NONE"]),
    ),
    ("container-no-host-access", "prod", "rag-prod-api", lambda p: p.update(privileged=True)),
    (
        "container-no-host-access",
        "staging",
        "rag-staging-redis",
        lambda p: p.update(networkMode="host"),
    ),
    (
        "container-no-host-access",
        "prod",
        "rag-prod-backup",
        lambda p: p["mounts"].append(
            {"type": "bind", "source": "/var/run/docker.sock", "target": "/var/run/docker.sock"}
        ),
    ),
    ("container-no-host-access", "prod", "rag-prod-node-exporter", lambda p: p.update(user="0:0")),
    (
        "published-ports",
        "staging",
        "rag-staging-caddy",
        lambda p: [port.update(ip=ALL_INTERFACES) for port in p["ports"]],
    ),
    (
        "published-ports",
        "prod",
        "rag-prod-prometheus",
        lambda p: [port.update(ip=ALL_INTERFACES) for port in p["ports"]],
    ),
    (
        "published-ports",
        "prod",
        "rag-prod-caddy",
        lambda p: p["ports"].append({"internal": 2019, "external": 2019, "ip": ALL_INTERFACES}),
    ),
    (
        "images-by-digest",
        "prod",
        "rag-prod-api",
        lambda p: p.update(image=p["image"].split("@")[0] + ":latest"),
    ),
    (
        "images-by-digest",
        "staging",
        "rag-staging-backup-image",
        lambda p: p["build"]["args"].update(POSTGRES_IMAGE="postgres:15.10-bookworm"),
    ),
    ("backend-networks-internal", "prod", "rag-prod-backend", lambda p: p.update(internal=False)),
    (
        "no-plaintext-secrets",
        "prod",
        "rag-prod-postgres",
        lambda p: env_set(p, "POSTGRES_PASSWORD", "hunter2"),
    ),
    (
        "no-plaintext-secrets",
        "staging",
        "rag-staging-api",
        lambda p: env_set(p, "DATABASE_URL", "postgresql://app:hunter2@rag-staging-postgres/db"),
    ),
    (
        "no-plaintext-secrets",
        "prod",
        "rag-prod-redis-exporter",
        lambda p: p["command"].append("--redis.password=hunter2"),
    ),
    (
        "no-plaintext-secrets",
        "prod",
        "rag-prod-caddy",
        lambda p: p["labels"].append(
            {"label": "k", "value": "-----BEGIN EC PRIVATE KEY-----\nMHc...\n"}
        ),
    ),
]


@pytest.mark.parametrize(
    ("policy", "stack", "name", "mutate"),
    MUTATIONS,
    ids=[f"{p}-{n}" for p, _, n, _ in MUTATIONS],
)
def test_a_mutated_resource_fails_its_policy(
    runs: dict[str, ProgramRun], policy: str, stack: str, name: str, mutate: Mutation
) -> None:
    run = runs[stack]
    original = resource(run, name)
    assert violations(policy, as_policy_args(run, original)) == []
    props = copy.deepcopy(original.inputs)
    mutate(props)
    assert violations(policy, as_policy_args(run, original, props)), (policy, name)


@pytest.mark.parametrize(
    ("stack", "name"),
    [
        ("prod", "rag-prod-data-encryption-key"),
        ("staging", "rag-staging-backup-passphrase"),
        ("prod", "rag-prod-postgres-data"),
        ("staging", "rag-staging-chroma-data"),
        ("prod", "rag-prod-backups"),
    ],
)
def test_an_unprotected_irreplaceable_resource_fails(
    runs: dict[str, ProgramRun], stack: str, name: str
) -> None:
    run = runs[stack]
    target = resource(run, name)
    assert violations("irreplaceable-protected", as_policy_args(run, target)) == []
    assert violations("irreplaceable-protected", as_policy_args(run, target, protect=False))


def test_every_policy_has_a_mutation_that_fails_it() -> None:
    covered = {m[0] for m in MUTATIONS} | {"irreplaceable-protected"}
    assert covered == set(BY_NAME)
