"""The test image: a Debian base made by debootstrap (no registry is reachable), and on top
of it the tools the tests run in place of the real images (which cannot be pulled here).

Users: the official images' service users get the same ids here, so ``--user redis`` and
``--user postgres`` resolve as they do in ``redis:*-alpine`` (999:1000) and
``postgres:*-bookworm`` (999:999).

Both images are built once per machine and reused while they exist (``docker image
inspect`` succeeds); the tools image's tag is its recipe's hash, so editing the recipe
builds anew.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.docker.engine import DockerCli
from tests.tooling import require_tool

BASE_IMAGE = "rag-test/base:bookworm"
BUILD_TIMEOUT_S = 15 * 60
SUITE = "bookworm"

TOOLS_DOCKERFILE = f"""\
FROM {BASE_IMAGE}
RUN apt-get update \\
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \\
      redis-server redis-tools python3 busybox procps iproute2 netcat-openbsd \\
 && rm -rf /var/lib/apt/lists/*
# Debian's redis package made a system user; give it the official image's ids.
RUN usermod -u 999 redis && groupmod -g 1000 redis \\
 && groupadd -g 999 postgres && useradd -o -u 999 -g postgres -M -s /bin/sh postgres
"""
# Tagged by the recipe's hash: a changed recipe builds a new image instead of reusing.
TOOLS_IMAGE = "rag-test/tools:" + hashlib.sha256(TOOLS_DOCKERFILE.encode()).hexdigest()[:12]


def _progress(message: str) -> None:
    # Visible even under pytest's output capture: the first build takes minutes.
    print(f"[tests/docker] {message}", file=sys.__stderr__, flush=True)


def _build_base(docker: DockerCli, deadline: float) -> None:
    debootstrap = require_tool("debootstrap")
    with tempfile.TemporaryDirectory(prefix="rag-test-rootfs-") as tmp:
        rootfs = Path(tmp) / "rootfs"
        subprocess.run(
            [debootstrap, "--variant=minbase", SUITE, str(rootfs)],
            check=True,
            capture_output=True,
            timeout=max(1.0, deadline - time.monotonic()),
        )
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        try:
            docker.run(
                "import", "-", BASE_IMAGE, stdin=tar.stdout, timeout=deadline - time.monotonic()
            )
        finally:
            if tar.stdout is not None:
                tar.stdout.close()
            tar.wait(timeout=60)
        if tar.returncode != 0:
            raise RuntimeError(f"tar of {rootfs} failed with {tar.returncode}")


def _build_tools(docker: DockerCli, deadline: float) -> None:
    with tempfile.TemporaryDirectory(prefix="rag-test-build-") as context:
        (Path(context) / "Dockerfile").write_text(TOOLS_DOCKERFILE)
        docker.run("build", "-q", "-t", TOOLS_IMAGE, context, timeout=deadline - time.monotonic())


def ensure_base_image(docker: DockerCli, deadline: float) -> str:
    """The debootstrap base's name; built when missing (bounded by ``deadline``)."""
    if not docker.exists("image", BASE_IMAGE):
        started = time.monotonic()
        _progress(f"building {BASE_IMAGE} with debootstrap (first run only, a few minutes)")
        _build_base(docker, deadline)
        _progress(f"{BASE_IMAGE} built in {time.monotonic() - started:.0f}s")
    return BASE_IMAGE


def ensure_tools_image(docker: DockerCli) -> str:
    """The tools image's name; builds what is missing (bounded by BUILD_TIMEOUT_S)."""
    if docker.exists("image", TOOLS_IMAGE):
        return TOOLS_IMAGE
    deadline = time.monotonic() + BUILD_TIMEOUT_S
    started = time.monotonic()
    ensure_base_image(docker, deadline)
    _progress(f"building {TOOLS_IMAGE} (apt-get install inside docker build)")
    _build_tools(docker, deadline)
    _progress(f"test images ready after {time.monotonic() - started:.0f}s")
    return TOOLS_IMAGE
