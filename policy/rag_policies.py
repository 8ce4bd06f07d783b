"""The invariants personal-rag promises, as CrossGuard resource policies (all mandatory).

Self-contained on purpose: the pack runs in its own virtualenv and states the promise
independently of the program that is supposed to keep it. Property names are the
engine's (camelCase), as CrossGuard passes them.

Secrets: CrossGuard hands a Python policy its props with secret values already unwrapped,
so "no secret outside a secret" is enforced by place: a secret may travel only as the
content of an uploaded file (which the program marks secret); environment variables,
command lines, entrypoints, labels, healthchecks and network options must never hold
anything that looks like a credential.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
)

CONTAINER = "docker:index/container:Container"
NETWORK = "docker:index/network:Network"
VOLUME = "docker:index/volume:Volume"
IMAGE = "docker:index/image:Image"
RANDOM_PASSWORD = "random:index/randomPassword:RandomPassword"  # noqa: S105 - a type token

LOOPBACK = "127.0.0.1"
PUBLIC_CADDY_PORTS = {80, 443}
DIGEST = re.compile(r"@sha256:[0-9a-f]{64}$")
# The one image the program builds itself (never pushed): tagged with its recipe's hash.
OWN_BUILD = re.compile(r"^personal-rag/[a-z0-9-]+:[0-9a-f]{16}$")
DOCKER_SOCKET_PATHS = ("/var/run/docker.sock", "/run/docker.sock")
# Capabilities a container may get back after dropping ALL: Caddy binds 80/443; the
# one-shot file copies chown what they copy.
SERVICE_CAPABILITIES = {"NET_BIND_SERVICE"}
ONE_SHOT_CAPABILITIES = {"CHOWN", "DAC_OVERRIDE", "FOWNER"}
# Volume purposes whose contents exist nowhere else, and keys that decrypt data/backups.
IRREPLACEABLE_PURPOSES = {"data", "documents", "backups"}
IRREPLACEABLE_KEYS = ("-data-encryption-key", "-backup-passphrase")

Validate = Callable[[ResourceValidationArgs, ReportViolation], None]


def _labels(props: Mapping[str, Any]) -> dict[str, str]:
    return {str(i.get("label")): str(i.get("value")) for i in props.get("labels") or []}


def _is_one_shot(props: Mapping[str, Any]) -> bool:
    """A job run to completion during `pulumi up`: never restarted, not kept running."""
    return props.get("mustRun") is False and props.get("restart") == "no"


def _is_declared_writable_one_shot(props: Mapping[str, Any]) -> bool:
    """The documented read-only exception: a config-init copy job, with no network."""
    return (
        _is_one_shot(props)
        and _labels(props).get("personal-rag.purpose") == "config-init"
        and props.get("networkMode") == "none"
        and not props.get("networksAdvanced")
        and not props.get("ports")
    )


def _containers(
    validate: Callable[[ResourceValidationArgs, Mapping[str, Any]], Iterator[str]],
) -> Validate:
    def run(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
        if args.resource_type != CONTAINER:
            return
        for problem in validate(args, args.props):
            report_violation(f"{args.props.get('name', args.name)}: {problem}", None)

    return run


@_containers
def no_new_privileges(args: ResourceValidationArgs, props: Mapping[str, Any]) -> Iterator[str]:
    if "no-new-privileges:true" not in (props.get("securityOpts") or []):
        yield "securityOpts must contain no-new-privileges:true"


@_containers
def drop_all_capabilities(args: ResourceValidationArgs, props: Mapping[str, Any]) -> Iterator[str]:
    caps = props.get("capabilities") or {}
    if "ALL" not in (caps.get("drops") or []):
        yield "capabilities.drops must be [ALL]"
    allowed = SERVICE_CAPABILITIES | (ONE_SHOT_CAPABILITIES if _is_one_shot(props) else set())
    extra = sorted(set(caps.get("adds") or []) - allowed)
    if extra:
        yield f"capabilities.adds {extra} are not allowed (only {sorted(allowed)})"


@_containers
def read_only_root(args: ResourceValidationArgs, props: Mapping[str, Any]) -> Iterator[str]:
    if props.get("readOnly") is not True and not _is_declared_writable_one_shot(props):
        yield "readOnly must be true (only a network-less config-init one-shot may write)"


@_containers
def memory_limit(args: ResourceValidationArgs, props: Mapping[str, Any]) -> Iterator[str]:
    memory = props.get("memory")
    if not isinstance(memory, (int, float)) or memory <= 0:
        yield "memory must be a limit in MB"
    swap = props.get("memorySwap")
    if swap is not None and swap != memory:
        yield "memorySwap must equal memory (no swap beyond the limit)"


@_containers
def restart_policy(args: ResourceValidationArgs, props: Mapping[str, Any]) -> Iterator[str]:
    if _is_one_shot(props):
        return
    if props.get("restart") not in ("on-failure", "unless-stopped", "always"):
        yield f"restart must be on-failure (a service), not {props.get('restart')!r}"
    elif props.get("restart") == "on-failure" and not props.get("maxRetryCount"):
        yield "restart on-failure needs maxRetryCount"


@_containers
def healthcheck(args: ResourceValidationArgs, props: Mapping[str, Any]) -> Iterator[str]:
    if _is_one_shot(props):
        return
    tests = (props.get("healthcheck") or {}).get("tests") or []
    if not tests or tests[0] == "NONE":
        yield "a service needs a healthcheck"


@_containers
def no_privileged_host_access(
    args: ResourceValidationArgs, props: Mapping[str, Any]
) -> Iterator[str]:
    if props.get("privileged"):
        yield "privileged is not allowed"
    for key in ("networkMode", "pidMode", "ipcMode", "usernsMode", "utsMode", "cgroupnsMode"):
        if props.get(key) == "host":
            yield f"{key} host is not allowed"
    runs_as_root = str(props.get("user") or "root").split(":")[0] in ("", "0", "root")
    for mount in [*(props.get("mounts") or []), *(props.get("volumes") or [])]:
        source = str(mount.get("source") or mount.get("hostPath") or "").rstrip("/") or "/"
        if any(source == path for path in DOCKER_SOCKET_PATHS):
            yield f"the Docker socket ({source}) must not be mounted"
        elif runs_as_root and any(
            path.startswith(source + "/") or source == "/" for path in DOCKER_SOCKET_PATHS
        ):
            yield f"a root container must not see the Docker socket (mount of {source})"
    for device in props.get("devices") or []:
        yield f"device {device.get('hostPath')} must not be passed in"


@_containers
def published_ports(args: ResourceValidationArgs, props: Mapping[str, Any]) -> Iterator[str]:
    public_caddy = props.get("name") == "rag-prod-caddy"
    for port in props.get("ports") or []:
        ip = port.get("ip") or "0.0.0.0"  # noqa: S104 - Docker's default: every interface
        if ip == LOOPBACK:
            continue
        if (
            public_caddy
            and port.get("internal") in PUBLIC_CADDY_PORTS
            and port.get("external") == port.get("internal")
        ):
            continue
        yield (
            f"port {port.get('external')}->{port.get('internal')} is published on {ip}; "
            "only prod's Caddy publishes 80/443, everything else binds 127.0.0.1"
        )


def images_by_digest(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    refs: list[tuple[str, Any]] = []
    if args.resource_type == CONTAINER:
        refs.append(("image", args.props.get("image")))
    elif args.resource_type == IMAGE:
        build_args = (args.props.get("build") or {}).get("args") or {}
        refs += [(f"build.args.{k}", v) for k, v in build_args.items() if k.endswith("_IMAGE")]
    for where, ref in refs:
        if not isinstance(ref, str) or not (DIGEST.search(ref) or OWN_BUILD.match(ref)):
            report_violation(
                f"{args.name}: {where} {ref!r} is not pinned by digest (name@sha256:...)", None
            )


def backend_networks_internal(
    args: ResourceValidationArgs, report_violation: ReportViolation
) -> None:
    if args.resource_type != NETWORK:
        return
    name = str(args.props.get("name") or args.name)
    if name.endswith("-backend") and args.props.get("internal") is not True:
        report_violation(f"{name}: a backend network must be internal (no egress)", None)


# What a credential looks like where none may be.
_SECRET_ENV_NAME = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_?KEY|PRIVATE_?KEY|PASSPHRASE)")
_URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/@\s:]+:[^/@\s]+@")
_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")
# --redis.password=x is a credential; --redis.password-file=/etc/rag/... names a file.
_PASSWORD_FLAG = re.compile(
    r"^--?[a-z._-]*(password|passwd|secret|token)(?![a-z._-]*file=)[a-z._-]*=.+", re.I
)


def _looks_secret(text: str) -> bool:
    return bool(_URL_WITH_PASSWORD.search(text) or _PRIVATE_KEY.search(text))


def _strings(value: Any, path: str) -> Iterator[tuple[str, str]]:
    if isinstance(value, str):
        yield path, value
    elif isinstance(value, Mapping):
        for k, v in value.items():
            yield from _strings(v, f"{path}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _strings(v, f"{path}[{i}]")


def no_plaintext_secrets(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    props = args.props
    if args.resource_type == CONTAINER:
        for env in props.get("envs") or []:
            key, _, value = str(env).partition("=")
            if _SECRET_ENV_NAME.search(key) and not key.endswith("_FILE") and value:
                report_violation(
                    f"{args.name}: env {key} holds a credential; pass a file (*_FILE)", None
                )
            elif _looks_secret(value):
                report_violation(f"{args.name}: env {key} holds a credential", None)
        for field in ("command", "entrypoints"):
            for i, arg in enumerate(props.get(field) or []):
                if _PASSWORD_FLAG.match(str(arg)) or _looks_secret(str(arg)):
                    report_violation(f"{args.name}: {field}[{i}] holds a credential", None)
        for path, text in _strings(
            {"labels": props.get("labels"), "healthcheck": props.get("healthcheck")}, ""
        ):
            if _looks_secret(text):
                report_violation(f"{args.name}: {path.lstrip('.')} holds a credential", None)
    elif args.resource_type in (NETWORK, VOLUME):
        for path, text in _strings(
            {"options": props.get("options"), "labels": props.get("labels")}, ""
        ):
            if _looks_secret(text):
                report_violation(f"{args.name}: {path.lstrip('.')} holds a credential", None)


def irreplaceable_protected(
    args: ResourceValidationArgs, report_violation: ReportViolation
) -> None:
    irreplaceable = False
    if args.resource_type == VOLUME:
        purposes = {
            str(i.get("value"))
            for i in args.props.get("labels") or []
            if i.get("label") == "personal-rag.purpose"
        }
        irreplaceable = bool(purposes & IRREPLACEABLE_PURPOSES)
    elif args.resource_type == RANDOM_PASSWORD:
        irreplaceable = args.name.endswith(IRREPLACEABLE_KEYS)
    if irreplaceable and not args.opts.protect:
        report_violation(
            f"{args.name}: irreplaceable (its loss loses data) and must be protect=True", None
        )


def _policy(name: str, description: str, validate: Validate) -> ResourceValidationPolicy:
    return ResourceValidationPolicy(
        name=name,
        description=description,
        validate=validate,
        enforcement_level=EnforcementLevel.MANDATORY,
    )


POLICIES: tuple[ResourceValidationPolicy, ...] = (
    _policy("container-no-new-privileges", "Containers set no-new-privileges.", no_new_privileges),
    _policy(
        "container-drop-all-capabilities",
        "Containers drop ALL capabilities.",
        drop_all_capabilities,
    ),
    _policy(
        "container-read-only-root",
        "Read-only root filesystem (declared one-shot exception).",
        read_only_root,
    ),
    _policy("container-memory-limit", "A memory limit, no extra swap.", memory_limit),
    _policy("container-restart-policy", "Services restart on failure (bounded).", restart_policy),
    _policy("container-healthcheck", "Services have a healthcheck.", healthcheck),
    _policy(
        "container-no-host-access",
        "Not privileged, no host namespaces, no Docker socket.",
        no_privileged_host_access,
    ),
    _policy(
        "published-ports",
        "Only prod's Caddy publishes 80/443; the rest binds 127.0.0.1.",
        published_ports,
    ),
    _policy("images-by-digest", "Every image by digest.", images_by_digest),
    _policy(
        "backend-networks-internal", "Backend networks are internal.", backend_networks_internal
    ),
    _policy("no-plaintext-secrets", "No credential outside a secret file.", no_plaintext_secrets),
    _policy(
        "irreplaceable-protected", "Keys and data volumes are protected.", irreplaceable_protected
    ),
)
