"""The Registry component under mocks, in both modes, with real throwaway git repos."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from tests.pulumi_harness import ProgramRun, is_secret, run_program, stack_config

TOKEN = "ghp_test_token_value_123456"


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(repo), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


@pytest.fixture
def app_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "app"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    git(repo, "config", "user.email", "t@example.com")
    git(repo, "config", "user.name", "t")
    (repo / "Dockerfile.prod").write_text("FROM scratch AS runtime\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "app")
    return repo


def build_run(repo: Path) -> ProgramRun:
    config = stack_config(
        "staging", buildContext=str(repo), ghcrUsername="octocat", ghcrToken=TOKEN
    )
    return run_program("staging", config)


def pushed_tags(run: ProgramRun) -> list[str]:
    (image,) = [r for r in run.of_type("docker:index/image:Image") if r.name == "app-image"]
    tags = [image.inputs["imageName"].split(":", 1)[1]]
    tags += [t.inputs["targetImage"].split(":", 1)[1] for t in run.of_type("docker:index/tag:Tag")]
    return tags


def test_build_mode_on_main_pushes_sha_short_branch_latest(app_repo: Path) -> None:
    sha = git(app_repo, "rev-parse", "HEAD")
    run = build_run(app_repo)
    assert pushed_tags(run) == [sha, sha[:12], "main", "latest"]
    (image,) = [r for r in run.of_type("docker:index/image:Image") if r.name == "app-image"]
    build = image.inputs["build"]
    assert build["target"] == "runtime" and build["platform"] == "linux/amd64"
    assert build["dockerfile"] == f"{app_repo}/Dockerfile.prod"
    assert image.inputs["registry"]["server"] == "ghcr.io"
    assert is_secret(image.raw_inputs["registry"]) or is_secret(
        image.raw_inputs["registry"]["password"]
    )
    # The api runs what was pushed, by digest.
    api_image = run.containers["rag-staging-api"].inputs["image"]
    assert re.fullmatch(r"ghcr\.io/example/rag_personal@sha256:[0-9a-f]{64}", api_image)
    assert run.exports["imageRef"][0] == api_image


def test_build_mode_on_a_branch_has_no_latest(app_repo: Path) -> None:
    git(app_repo, "checkout", "-q", "-b", "feature/login")
    sha = git(app_repo, "rev-parse", "HEAD")
    assert pushed_tags(build_run(app_repo)) == [sha, sha[:12], "feature-login"]


def test_build_mode_detached_head_gets_only_sha_tags(app_repo: Path) -> None:
    git(app_repo, "checkout", "-q", "--detach")
    sha = git(app_repo, "rev-parse", "HEAD")
    assert pushed_tags(build_run(app_repo)) == [sha, sha[:12]]


def test_build_mode_dirty_tree_never_claims_a_clean_sha(app_repo: Path) -> None:
    (app_repo / "Dockerfile.prod").write_text("FROM scratch AS runtime\nLABEL x=1\n")
    sha = git(app_repo, "rev-parse", "HEAD")
    tags = pushed_tags(build_run(app_repo))
    assert tags == [f"{sha}-dirty", f"{sha[:12]}-dirty", "main-dirty"]
    assert sha not in tags and "latest" not in tags


def test_resolve_mode_runs_the_tags_digest() -> None:
    run = run_program("prod")
    assert not run.of_type("docker:index/image:Image")[1:]  # only the local backup image
    ref, secret = run.exports["imageRef"]
    assert not secret
    assert ref.startswith("ghcr.io/example/rag_personal@sha256:")
    assert run.containers["rag-prod-api"].inputs["image"] == ref


def test_registry_token_never_in_plaintext(app_repo: Path) -> None:
    from tests.pulumi_harness import plaintext_strings

    run = build_run(app_repo)
    leaks = [
        (r.name, path)
        for r in run.resources
        for path, text in plaintext_strings(r.raw_inputs)
        if TOKEN in text
    ]
    assert leaks == []
