"""Every image by digest, from one table (components/images.py), and PostgreSQL's major
version in one place -- checked on what the program declares for both stacks."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from components.images import IMAGES, POSTGRES_MAJOR, POSTGRES_VERSION, unpinned
from tests.pulumi_harness import REPO, ProgramRun, run_program
from tests.tooling import require_tool

STACKS = ("staging", "prod")
# name[:tag]@sha256:<64 hex> (the app image runs as name@digest, the others keep the tag).
BY_DIGEST = re.compile(r"^(?P<name>[^@\s]+?)(?::(?P<tag>[\w.-]+))?@sha256:[0-9a-f]{64}$")
# The one image the program builds itself (never pushed): its tag is a hash of its
# recipe, and its base images come from the table by digest.
OWN_BUILD = re.compile(r"^personal-rag/backup:[0-9a-f]{16}$")
IMAGE_LITERAL = re.compile(
    r"\b(redis|postgres|caddy|prom/[\w-]+|oliver006/[\w-]+|prometheuscommunity/[\w-]+)"
    r":v?\d[\w.-]*"
)


@pytest.fixture(scope="module")
def runs() -> dict[str, ProgramRun]:
    return {stack: run_program(stack) for stack in STACKS}


@pytest.mark.parametrize("stack", STACKS)
def test_every_container_runs_an_image_by_digest(runs: dict[str, ProgramRun], stack: str) -> None:
    for name, container in runs[stack].containers.items():
        image = container.inputs["image"]
        assert BY_DIGEST.match(image) or OWN_BUILD.match(image), f"{name} runs {image!r}"


@pytest.mark.parametrize("stack", STACKS)
def test_third_party_images_are_the_tables_tags(runs: dict[str, ProgramRun], stack: str) -> None:
    tagged = {pinned.tagged for pinned in IMAGES.values()}
    used = set()
    for container in runs[stack].containers.values():
        match = BY_DIGEST.match(container.inputs["image"])
        if match and match["tag"]:
            used.add(f"{match['name']}:{match['tag']}")
    assert used and used <= tagged
    # A committed digest is the one the container runs (none resolved over it).
    for pinned in IMAGES.values():
        if pinned.digest:
            runs_it = {c.inputs["image"] for c in runs[stack].containers.values()}
            assert pinned.ref in runs_it or pinned.tagged not in used


def test_table_entries_are_well_formed() -> None:
    for key, pinned in IMAGES.items():
        assert pinned.tag and ":" not in pinned.tag and "@" not in pinned.tag, key
        if pinned.digest is not None:
            assert re.fullmatch(r"sha256:[0-9a-f]{64}", pinned.digest), key
        assert pinned.source, key


@pytest.mark.xfail(
    condition=bool(unpinned()),
    strict=True,
    reason=(
        f"no verifiable published digest for {unpinned()} could be found offline; they are "
        "resolved to the registry's digest at each deploy until "
        "scripts/refresh-image-digests.sh is run with internet and the digests committed"
    ),
)
def test_every_third_party_image_has_a_committed_digest() -> None:
    assert unpinned() == []


def test_image_literals_live_only_in_the_table() -> None:
    sources = [*sorted((REPO / "components").glob("*.py")), REPO / "docker/backup/Dockerfile"]
    found = []
    for path in sources:
        if path.name == "images.py":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if IMAGE_LITERAL.search(line):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert found == []


def test_postgres_major_version_lives_in_one_place() -> None:
    assert POSTGRES_VERSION.startswith(f"{POSTGRES_MAJOR}.")
    literal = re.compile(rf"postgresql/{POSTGRES_MAJOR}\b|\b{POSTGRES_MAJOR}\.\d+-bookworm")
    sources = [*sorted((REPO / "components").glob("*.py")), REPO / "docker/backup/Dockerfile"]
    found = [
        f"{path.relative_to(REPO)}: {line.strip()}"
        for path in sources
        if path.name != "images.py"
        for line in path.read_text().splitlines()
        if literal.search(line)
    ]
    assert found == []


@pytest.mark.parametrize("stack", STACKS)
def test_postgres_server_and_backup_tools_share_the_major_version(
    runs: dict[str, ProgramRun], stack: str
) -> None:
    run = runs[stack]
    server = run.containers[f"rag-{stack}-postgres"].inputs["image"]
    assert server.startswith(f"postgres:{POSTGRES_MAJOR}.")
    (build,) = run.of_type("docker:index/image:Image")
    args = build.inputs["build"]["args"]
    assert args["POSTGRES_MAJOR"] == str(POSTGRES_MAJOR)
    # The backup image is built FROM the server's own image, digest included.
    assert args["POSTGRES_IMAGE"] == server
    assert BY_DIGEST.match(args["REDIS_IMAGE"])
    env = dict(
        e.split("=", 1) for e in run.containers[f"rag-{stack}-backup"].inputs.get("envs", [])
    )
    assert env["RAG_BACKUP_PG_BIN_DIR"] == f"/usr/lib/postgresql/{POSTGRES_MAJOR}/bin"


def test_the_dockerfile_takes_its_bases_and_major_only_as_build_args() -> None:
    dockerfile = (REPO / "docker/backup/Dockerfile").read_text()
    args = re.findall(r"^ARG\s+(\S+)", dockerfile, flags=re.MULTILINE)
    assert set(args) == {"POSTGRES_IMAGE", "REDIS_IMAGE", "POSTGRES_MAJOR"}
    assert all("=" not in a for a in args), "no defaults: the program passes them"


def test_refresh_script_passes_shellcheck_and_fails_loudly_without_a_registry(
    tmp_path: Path,
) -> None:
    script = REPO / "scripts/refresh-image-digests.sh"
    shellcheck = require_tool("shellcheck")
    lint = subprocess.run([shellcheck, str(script)], capture_output=True, text=True, check=False)
    assert lint.returncode == 0, lint.stdout
    # Without a registry client (a PATH with only python3 and dirname: no crane, no
    # docker) it must fail and print no digest at all, never a stale or made-up one.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python3").symlink_to(sys.executable)
    (bin_dir / "dirname").symlink_to(require_tool("dirname"))
    done = subprocess.run(
        [require_tool("bash"), str(script), "--check"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
    )
    assert done.returncode != 0
    assert "sha256:" not in done.stdout
    assert "cannot read the digest of" in done.stderr
