"""The Pulumi program on a real Docker engine: `pulumi up` two throwaway stacks with the
Automation API (local file:// backend in a temp dir), probe them, `pulumi destroy` always.

Checks: the api answers behind Caddy (TLS from Caddy's internal CA, verified), the api
reaches its Redis over TLS and its PostgreSQL, the stack runs the image by digest, and
a container of the second stack cannot reach the first stack's Redis or PostgreSQL,
neither by name nor by IP (while it does reach its own).

Needs the Pulumi CLI and a Docker engine: GitHub's runners have both (the `integration`
job in ci.yml). Without the CLI it skips -- the project's only permitted skip -- unless
RAG_ENGINE_REQUIRED is set, as in that job, where it fails instead.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from pulumi import automation as auto

pytestmark = pytest.mark.engine

REPO_ROOT = Path(__file__).resolve().parents[2]
APP_DIR = Path(__file__).resolve().parent / "app"
SKIP_REASON = "needs the Pulumi CLI (runs in the GitHub integration job)"
CADDY_ROOT_CA = "/data/caddy/pki/authorities/local/root.crt"
REDIS_PORT, POSTGRES_PORT = 6379, 5432
READY_SECONDS = 180

# Tries TCP connections from inside a container; prints {target: outcome} as JSON.
CONNECT_PROBE = """
import json, socket, sys
outcome = {}
for target in sys.argv[1:]:
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
        outcome[target] = "connected"
    except OSError as exc:
        outcome[target] = type(exc).__name__
print(json.dumps(outcome))
"""


def docker(*args: str, timeout: float = 600, stdin: str | None = None) -> str:
    binary = shutil.which("docker")
    if binary is None:
        pytest.fail("the docker CLI is missing; the engine test needs a Docker engine")
    done = subprocess.run(
        [binary, *args], input=stdin, capture_output=True, text=True, timeout=timeout
    )
    if done.returncode != 0:
        raise RuntimeError(f"docker {' '.join(args[:2])} failed: {done.stderr.strip()}")
    return done.stdout.strip()


@pytest.fixture
def pulumi_cli() -> str:
    found = shutil.which("pulumi")
    if found is None:
        if os.environ.get("RAG_ENGINE_REQUIRED"):
            pytest.fail("RAG_ENGINE_REQUIRED is set but the Pulumi CLI is not on PATH")
        pytest.skip(SKIP_REASON)
    return found


@dataclass(frozen=True)
class StandinImage:
    repository: str  # 127.0.0.1:<port>/rag-standin: a real registry, so a real digest
    tag: str
    digest: str


@pytest.fixture
def standin_image(pulumi_cli: str) -> Iterator[StandinImage]:
    """The stand-in app built from tests/engine/app and pushed to a throwaway registry
    on loopback (Docker treats 127.0.0.0/8 registries as plain-HTTP by default)."""
    suffix = secrets.token_hex(4)
    registry = f"rag-engine-registry-{suffix}"
    docker("run", "-d", "--name", registry, "-p", "127.0.0.1::5000", "registry:2")
    image_tag = ""
    try:
        port = docker("port", registry, "5000/tcp").splitlines()[0].rsplit(":", 1)[1]
        repository = f"127.0.0.1:{port}/rag-standin"
        tag = f"engine-{suffix}"
        image_tag = f"{repository}:{tag}"
        docker("build", "--platform", "linux/amd64", "-t", image_tag, str(APP_DIR), timeout=900)
        deadline = time.monotonic() + 60
        while True:  # the registry needs a moment before it accepts pushes
            try:
                docker("push", image_tag)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)
        repo_digest = docker("image", "inspect", "--format", "{{index .RepoDigests 0}}", image_tag)
        yield StandinImage(repository, tag, repo_digest.rsplit("@", 1)[1])
    finally:
        if image_tag:
            subprocess.run(["docker", "rmi", "-f", image_tag], capture_output=True, timeout=120)
        subprocess.run(["docker", "rm", "-f", "-v", registry], capture_output=True, timeout=120)


@dataclass(frozen=True)
class Deployed:
    name: str
    outputs: dict[str, object]

    def container(self, service: str) -> str:
        return f"rag-{self.name}-{service}"


def _set_secret(pulumi: str, env: dict[str, str], stack: str, key: str, value: str) -> None:
    # Through stdin: the Automation API's set_config would put the value on argv.
    subprocess.run(
        [pulumi, "config", "set", "--secret", key, "--stack", stack, "--non-interactive"],
        input=value,
        env={**os.environ, **env},
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )


def _remove_leftovers(stack_name: str) -> None:
    """Data volumes are retained on delete by design; a throwaway stack leaves nothing."""
    prefix = f"rag-{stack_name}-"
    kinds = {
        "container": (["ps", "-a", "--format", "{{.Names}}"], ["rm", "-f", "-v"]),
        "volume": (["volume", "ls", "--format", "{{.Name}}"], ["volume", "rm", "-f"]),
        "network": (["network", "ls", "--format", "{{.Name}}"], ["network", "rm"]),
    }
    for listing, removal in kinds.values():
        found = subprocess.run(
            ["docker", *listing], capture_output=True, text=True, timeout=60, check=False
        )
        names = [name for name in found.stdout.split() if name.startswith(prefix)]
        if names:
            subprocess.run(["docker", *removal, *names], capture_output=True, timeout=300)


@contextmanager
def deployed_stack(
    pulumi: str, backend: Path, image: StandinImage, port_offset: int
) -> Iterator[Deployed]:
    name = f"ephemeral-{secrets.token_hex(3)}-{port_offset // 1000}"
    passphrase_file = backend / f"{name}.passphrase"
    passphrase_file.write_text(secrets.token_urlsafe(24))
    passphrase_file.chmod(0o600)
    env = {
        "PULUMI_BACKEND_URL": backend.as_uri(),
        "PULUMI_CONFIG_PASSPHRASE_FILE": str(passphrase_file),
        "PULUMI_SKIP_UPDATE_CHECK": "true",
    }
    stack = auto.create_or_select_stack(
        stack_name=name,
        work_dir=str(REPO_ROOT),
        opts=auto.LocalWorkspaceOptions(env_vars=env),
    )
    try:
        stack.set_all_config(
            {
                key: auto.ConfigValue(value)
                for key, value in {
                    "domain": "localhost",
                    "caddyTls": "internal",
                    "portOffset": str(port_offset),
                    "alertEmail": "ops@example.com",
                    "smtpHost": "localhost:2525",
                    "smtpFrom": "alerts@example.com",
                    "smtpUsername": "alerts",
                    "image": image.repository,
                    "imageTag": image.tag,
                    "imageDigest": image.digest,
                }.items()
            }
        )
        _set_secret(pulumi, env, name, "smtpPassword", secrets.token_urlsafe(16))
        result = stack.up(on_output=print, show_secrets=False, color="never")
        yield Deployed(name, {key: out.value for key, out in result.outputs.items()})
    finally:
        try:
            # Keys and data volumes are protected (destroy refuses them); a throwaway
            # stack is the one place where they go too.
            subprocess.run(
                [pulumi, "state", "unprotect", "--all", "--yes", "--stack", name],
                env={**os.environ, **env},
                cwd=REPO_ROOT,
                capture_output=True,
                timeout=120,
                # An empty stack has nothing to unprotect; destroy reports what is left.
                check=False,
            )
            stack.destroy(on_output=print, show_secrets=False, color="never")
            stack.workspace.remove_stack(name)
        finally:
            _remove_leftovers(name)
            Path(REPO_ROOT / f"Pulumi.{name}.yaml").unlink(missing_ok=True)


def caddy_root_ca(deployed: Deployed) -> str:
    deadline = time.monotonic() + READY_SECONDS
    while True:
        try:
            return docker("exec", deployed.container("caddy"), "cat", CADDY_ROOT_CA, timeout=30)
        except RuntimeError:
            if time.monotonic() > deadline:
                raise
            time.sleep(2)


def get_via_caddy(deployed: Deployed, path: str, ca_pem: str) -> tuple[int, dict[str, str]]:
    """GET through Caddy's HTTPS port, verifying Caddy's certificate; retried until ready."""
    base = str(deployed.outputs["caddyHttpsUrl"])
    assert base.startswith("https://localhost:"), base
    context = ssl.create_default_context(cadata=ca_pem)
    deadline = time.monotonic() + READY_SECONDS
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(base + path, context=context, timeout=10) as reply:  # noqa: S310
                return reply.status, json.loads(reply.read())
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}: {exc.read()[:300]!r}"
            if exc.code not in (502, 503, 504):
                return exc.code, {"error": last}
        except (OSError, ValueError) as exc:
            last = repr(exc)
        time.sleep(2)
    pytest.fail(f"{base}{path} never answered within {READY_SECONDS}s: {last}")


def container_ips(container: str) -> list[str]:
    networks = json.loads(
        docker("inspect", "--format", "{{json .NetworkSettings.Networks}}", container)
    )
    return [net["IPAddress"] for net in networks.values() if net.get("IPAddress")]


def connect_from(container: str, targets: list[str]) -> dict[str, str]:
    out = docker("exec", container, "python", "-c", CONNECT_PROBE, *targets, timeout=120)
    outcome: dict[str, str] = json.loads(out)
    return outcome


def test_stack_serves_behind_caddy_reaches_its_stores_and_is_isolated(
    pulumi_cli: str, standin_image: StandinImage, tmp_path: Path
) -> None:
    backend = tmp_path / "state"
    backend.mkdir()
    with ExitStack() as stacks:
        first = stacks.enter_context(deployed_stack(pulumi_cli, backend, standin_image, 20000))
        second = stacks.enter_context(deployed_stack(pulumi_cli, backend, standin_image, 21000))

        # Run by digest, never by a movable tag.
        expected_ref = f"{standin_image.repository}@{standin_image.digest}"
        assert first.outputs["imageRef"] == expected_ref
        api_image = docker("inspect", "--format", "{{.Config.Image}}", first.container("api"))
        assert api_image == expected_ref

        ca_pem = caddy_root_ca(first)
        assert get_via_caddy(first, "/health", ca_pem) == (200, {"status": "ok"})
        status, deps = get_via_caddy(first, "/deps", ca_pem)
        assert status == 200, deps
        assert deps["redis"] == "ok (tls)"
        assert deps["postgres"] == "ok (rag_feedback)"

        # The second stack's api reaches its own stores (the probe can succeed) ...
        own = [
            f"{second.container('redis')}:{REDIS_PORT}",
            f"{second.container('postgres')}:{POSTGRES_PORT}",
        ]
        assert set(connect_from(second.container("api"), own).values()) == {"connected"}
        # ... and nothing of the first stack's, by name or by address.
        foreign = [
            f"{first.container('redis')}:{REDIS_PORT}",
            f"{first.container('postgres')}:{POSTGRES_PORT}",
            *(f"{ip}:{REDIS_PORT}" for ip in container_ips(first.container("redis"))),
            *(f"{ip}:{POSTGRES_PORT}" for ip in container_ips(first.container("postgres"))),
        ]
        assert len(foreign) >= 4
        reached = connect_from(second.container("api"), foreign)
        assert [t for t, outcome in reached.items() if outcome == "connected"] == [], reached
