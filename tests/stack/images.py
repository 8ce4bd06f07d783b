"""Local images for the whole-stack tests, faithful to the pinned official ones (which
cannot be pulled here), built from the debootstrap base with Debian packages.

Layers: ``shared`` (every Debian package any image needs, one layer), then a thin
recipe per image (users, directory owners, links, entrypoints) in ``recipes/<name>``;
what each reproduces of its official Dockerfile/entrypoint and what it does not is in
``recipes/README.md``. The app is tests/engine/app; the backup image is built from the
program's own declared build (docker/backup/Dockerfile, its declared build args) with
its base-image args pointed at the local postgres and redis images.

Every tag is a hash of what the image depends on (its recipe files, its parent's tag,
its build args), so an image is built once and rebuilt exactly when that changes.
"""

from __future__ import annotations

import hashlib
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.docker.engine import DockerCli
from tests.docker.images import ensure_base_image

REPO = Path(__file__).resolve().parents[2]
RECIPES = Path(__file__).resolve().parent / "recipes"
APP_DIR = REPO / "tests" / "engine" / "app"
LOCAL_REPOSITORY = "ragtest-local"
BUILD_TIMEOUT_S = 20 * 60

# Official repository (as the program declares it) -> local recipe.
OFFICIAL_TO_RECIPE: Mapping[str, str] = {
    "postgres": "postgres",
    "redis": "redis",
    "caddy": "caddy",
    "prom/prometheus": "prometheus",
    "prom/alertmanager": "alertmanager",
    "prom/node-exporter": "node-exporter",
    "oliver006/redis_exporter": "redis-exporter",
    "prometheuscommunity/postgres-exporter": "postgres-exporter",
    "prom/blackbox-exporter": "blackbox-exporter",
}
# The backup Dockerfile's base-image build args -> the local recipe each must use.
BACKUP_BASE_ARGS: Mapping[str, str] = {"POSTGRES_IMAGE": "postgres", "REDIS_IMAGE": "redis"}
# Recipes whose trust store gets ``LocalImages.trusted_ca``: Alertmanager mails through an
# SMTP server whose certificate a public CA in the official image's bundle signs; here the
# test's SMTP sink has a certificate of a CA the test makes.
TRUSTING_RECIPES = frozenset({"alertmanager"})
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"


def repository_of(ref: str) -> str:
    """``redis:7.4.2-alpine`` -> ``redis``; ``ghcr.io/x/y@sha256:..`` -> ``ghcr.io/x/y``."""
    name = ref.split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name = name[: len(name) - len(last)] + last.split(":", 1)[0]
    return name


def _progress(message: str) -> None:
    print(f"[tests/stack] {message}", file=sys.__stderr__, flush=True)


def _files_digest(directory: Path, extra: Mapping[str, str]) -> str:
    digest = hashlib.sha256()
    for key, value in sorted(extra.items()):
        digest.update(f"{key}={value}\0".encode())
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        if "__pycache__" in path.parts:
            continue
        digest.update(str(path.relative_to(directory)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


@dataclass
class LocalImages:
    """Builds (once) and names the local images."""

    docker: DockerCli
    built: dict[str, str] = field(default_factory=dict)  # recipe -> tag
    trusted_ca: bytes | None = None  # PEM added to TRUSTING_RECIPES' CA bundle

    def _deadline(self) -> float:
        return time.monotonic() + BUILD_TIMEOUT_S

    def _build(self, name: str, context: Path, args: Mapping[str, str]) -> str:
        tag = f"{LOCAL_REPOSITORY}/{name}:{_files_digest(context, args)}"
        if not self.docker.exists("image", tag):
            started = time.monotonic()
            _progress(f"building {tag}")
            flags = [
                arg for key, value in args.items() for arg in ("--build-arg", f"{key}={value}")
            ]
            self.docker.run(
                "build", "-q", "--label", "rag-test.local-image=1", *flags, "-t", tag,
                str(context), timeout=BUILD_TIMEOUT_S,
            )  # fmt: skip
            _progress(f"{tag} built in {time.monotonic() - started:.0f}s")
        return tag

    def shared(self) -> str:
        if "shared" not in self.built:
            base = ensure_base_image(self.docker, self._deadline())
            self.built["shared"] = self._build("shared", RECIPES / "shared", {"BASE_IMAGE": base})
        return self.built["shared"]

    def recipe(self, name: str) -> str:
        if name not in self.built:
            if not (RECIPES / name / "Dockerfile").is_file():
                raise KeyError(f"no local recipe {name!r} in {RECIPES}")
            tag = self._build(name, RECIPES / name, {"SHARED_IMAGE": self.shared()})
            if name in TRUSTING_RECIPES and self.trusted_ca is not None:
                tag = self._trusting(name, tag, self.trusted_ca)
            self.built[name] = tag
        return self.built[name]

    def _trusting(self, name: str, parent: str, ca_pem: bytes) -> str:
        """``parent`` with ``ca_pem`` appended to its CA bundle (user, entrypoint kept)."""
        bundle = self.docker.call("run", "--rm", "--entrypoint", "cat", parent, CA_BUNDLE)
        if bundle.returncode != 0:
            raise RuntimeError(f"{parent}: no {CA_BUNDLE}: {bundle.stderr.decode()[-500:]}")
        with tempfile.TemporaryDirectory() as tmp:
            context = Path(tmp)
            (context / "ca-certificates.crt").write_bytes(bundle.stdout + b"\n" + ca_pem)
            (context / "Dockerfile").write_text(
                f"ARG PARENT\nFROM ${{PARENT}}\nCOPY ca-certificates.crt {CA_BUNDLE}\n"
            )
            return self._build(f"{name}-trusting-test-ca", context, {"PARENT": parent})

    def app(self) -> str:
        """The api: tests/engine/app on the shared Debian layer."""
        if "app" not in self.built:
            self.built["app"] = self._build("app", APP_DIR, {"BASE_IMAGE": self.shared()})
        return self.built["app"]

    def for_official(self, ref: str) -> str:
        repository = repository_of(ref)
        if repository not in OFFICIAL_TO_RECIPE:
            raise KeyError(
                f"image {ref!r}: no local image reproduces {repository!r}; add a recipe to "
                f"{RECIPES} and OFFICIAL_TO_RECIPE"
            )
        return self.recipe(OFFICIAL_TO_RECIPE[repository])

    def declared_build(self, inputs: Mapping[str, Any]) -> str:
        """A ``docker:index/image:Image`` as the program declares it (context, Dockerfile,
        build args), its base-image args pointed at the local images."""
        build = dict(inputs["build"])
        known = {"context", "dockerfile", "platform", "args"}
        unknown = sorted(k for k, v in build.items() if v is not None and k not in known)
        if unknown:
            raise ValueError(f"image {inputs['imageName']}: build inputs {unknown} not applied")
        context = Path(build["context"])
        dockerfile = Path(build["dockerfile"])
        args = {str(k): str(v) for k, v in (build.get("args") or {}).items()}
        for arg, recipe in BACKUP_BASE_ARGS.items():
            args[arg] = self.recipe(recipe)
        name = repository_of(inputs["imageName"]).rsplit("/", 1)[-1]
        # The context is the repo: hash what the Dockerfile may COPY (its ignore file
        # admits rag_backup/ only) plus the Dockerfile itself.
        digest_args = {
            **args,
            "dockerfile": dockerfile.read_text(),
            "declared": inputs["imageName"],
        }
        tag = f"{LOCAL_REPOSITORY}/{name}:{_files_digest(context / 'rag_backup', digest_args)}"
        if not self.docker.exists("image", tag):
            started = time.monotonic()
            _progress(f"building {tag} from {dockerfile.relative_to(context)}")
            flags = [
                arg for key, value in args.items() for arg in ("--build-arg", f"{key}={value}")
            ]
            self.docker.run(
                "build", "-q", "--label", "rag-test.local-image=1", *flags,
                "--file", str(dockerfile), "-t", tag, str(context), timeout=BUILD_TIMEOUT_S,
            )  # fmt: skip
            _progress(f"{tag} built in {time.monotonic() - started:.0f}s")
        return tag
