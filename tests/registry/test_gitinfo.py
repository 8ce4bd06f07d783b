"""Image tags computed from real throwaway git repositories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from components.gitinfo import (
    GitInfoError,
    GitState,
    compute_image_tags,
    image_ref_with_digest,
    read_git_state,
    sanitize_tag,
)
from tests.tooling import require_tool

pytestmark = pytest.mark.integration

GITINFO_SCRIPT = Path(__file__).resolve().parents[2] / "components" / "gitinfo.py"
DIGEST = "sha256:" + "ab12" * 16


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(
        [require_tool("git"), "-C", str(repo), *args],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A repository on branch main with one commit, isolated from any user config."""
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", "/dev/null")
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    for var, value in {
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
    }.items():
        monkeypatch.setenv(var, value)
    path = tmp_path / "app"
    path.mkdir()
    git(path, "init", "-q", "-b", "main")
    (path / "Dockerfile.prod").write_text("FROM scratch\n")
    git(path, "add", "Dockerfile.prod")
    git(path, "commit", "-q", "-m", "first")
    return path


def commit(repo: Path, name: str) -> str:
    (repo / name).write_text(name)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", name)
    return git(repo, "rev-parse", "HEAD")


def test_clean_main_gets_sha_short_sha_branch_and_latest(repo: Path) -> None:
    sha = commit(repo, "second")
    state = read_git_state(repo)
    assert state == GitState(sha=sha, branch="main", dirty=False)
    assert compute_image_tags(state) == [sha, sha[:12], "main", "latest"]


def test_feature_branch_gets_sanitized_branch_tag_and_no_latest(repo: Path) -> None:
    git(repo, "switch", "-q", "-c", "feature/Try+it#2")
    sha = commit(repo, "feature")
    tags = compute_image_tags(read_git_state(repo))
    assert tags == [sha, sha[:12], "feature-Try-it-2"]


def test_detached_head_gets_no_branch_tag_and_no_latest(repo: Path) -> None:
    first = git(repo, "rev-parse", "HEAD")
    commit(repo, "second")
    git(repo, "checkout", "-q", "--detach", first)
    state = read_git_state(repo)
    assert state.branch is None
    assert compute_image_tags(state) == [first, first[:12]]


def test_branch_override_names_the_branch_of_a_detached_ci_checkout(repo: Path) -> None:
    sha = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "--detach")
    state = read_git_state(repo, branch_override="main")
    assert compute_image_tags(state) == [sha, sha[:12], "main", "latest"]


@pytest.mark.parametrize(
    "change",
    ["modified", "untracked", "staged"],
)
def test_dirty_tree_suffixes_every_tag_and_never_gets_latest(repo: Path, change: str) -> None:
    sha = git(repo, "rev-parse", "HEAD")
    if change == "modified":
        (repo / "Dockerfile.prod").write_text("FROM busybox\n")
    elif change == "untracked":
        (repo / "new.py").write_text("print()\n")
    else:
        (repo / "staged.txt").write_text("x")
        git(repo, "add", "staged.txt")
    state = read_git_state(repo)
    assert state.dirty
    assert compute_image_tags(state) == [f"{sha}-dirty", f"{sha[:12]}-dirty", "main-dirty"]


def test_ignored_files_do_not_make_the_tree_dirty(repo: Path) -> None:
    (repo / ".gitignore").write_text("*.log\n")
    git(repo, "add", ".gitignore")
    commit(repo, "ignore-logs")
    (repo / "debug.log").write_text("noise")
    assert read_git_state(repo).dirty is False


def test_not_a_git_repository_is_an_error_naming_the_path(tmp_path: Path, repo: Path) -> None:
    plain = tmp_path / "plain"
    plain.mkdir()
    with pytest.raises(GitInfoError, match=r"'.*plain' is not a git working tree"):
        read_git_state(plain)
    with pytest.raises(GitInfoError, match=r"'.*missing' is not a directory"):
        read_git_state(tmp_path / "missing")


def test_repository_without_commits_is_an_error(tmp_path: Path, repo: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    git(empty, "init", "-q")
    with pytest.raises(GitInfoError, match="has no commit at HEAD"):
        read_git_state(empty)


@pytest.mark.parametrize("bad", ["", " main", "main "])
def test_blank_branch_override_is_refused(repo: Path, bad: str) -> None:
    with pytest.raises(GitInfoError, match="branch override"):
        read_git_state(repo, branch_override=bad)


@pytest.mark.parametrize(
    ("branch", "tag"),
    [
        ("feature/x", "feature-x"),
        ("-leading.dash", "leading.dash"),
        ("..dots", "dots"),
        ("ok_1.2-3", "ok_1.2-3"),
        ("ü", ""),  # nothing usable left: no branch tag at all
        ("a" * 200, "a" * 128),
    ],
)
def test_sanitize_tag_follows_docker_tag_rules(branch: str, tag: str) -> None:
    assert sanitize_tag(branch) == tag


def test_branch_named_like_a_reserved_tag_cannot_shadow_it() -> None:
    sha = "c" * 40
    latest = compute_image_tags(GitState(sha=sha, branch="latest", dirty=False))
    assert latest == [sha, sha[:12], "branch-latest"]
    shaped = compute_image_tags(GitState(sha=sha, branch="d" * 12, dirty=False))
    assert shaped == [sha, sha[:12], "branch-" + "d" * 12]
    unusable = compute_image_tags(GitState(sha=sha, branch="ü", dirty=False))
    assert unusable == [sha, sha[:12]]


def test_default_branch_is_configurable() -> None:
    sha = "e" * 40
    tags = compute_image_tags(GitState(sha=sha, branch="trunk", dirty=False), "trunk")
    assert tags[-1] == "latest"
    assert "latest" not in compute_image_tags(
        GitState(sha=sha, branch="main", dirty=False), "trunk"
    )


def test_image_ref_with_digest_pins_the_repository() -> None:
    assert image_ref_with_digest("ghcr.io/owner/rag_personal", DIGEST) == (
        f"ghcr.io/owner/rag_personal@{DIGEST}"
    )
    assert image_ref_with_digest("127.0.0.1:5000/rag-standin", DIGEST).endswith(DIGEST)


@pytest.mark.parametrize(
    "digest",
    ["", "ab12" * 16, "sha256:" + "AB12" * 16, "sha256:" + "ab12" * 15, "sha512:" + "ab" * 64],
)
def test_image_ref_with_digest_rejects_a_bad_digest(digest: str) -> None:
    with pytest.raises(GitInfoError, match=r"image digest .* expected sha256: followed by 64"):
        image_ref_with_digest("ghcr.io/owner/rag_personal", digest)


@pytest.mark.parametrize(
    "image",
    ["", "ghcr.io/owner/rag_personal:latest", f"ghcr.io/o/r@{DIGEST}", "ghcr.io/Owner/r", "a b"],
)
def test_image_ref_with_digest_rejects_a_bad_image(image: str) -> None:
    with pytest.raises(GitInfoError, match=rf"image {image!r} is not a repository reference"):
        image_ref_with_digest(image, DIGEST)


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    # As the workflow runs it: a plain script, no package import, stdlib only.
    return subprocess.run(
        [sys.executable, "-I", str(GITINFO_SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_script_prints_image_tags_full_sha_first(repo: Path) -> None:
    sha = git(repo, "rev-parse", "HEAD")
    git(repo, "checkout", "-q", "--detach")
    done = run_script("tags", "--repo", str(repo), "--image", "ghcr.io/o/app", "--branch", "main")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        f"ghcr.io/o/app:{sha}",
        f"ghcr.io/o/app:{sha[:12]}",
        "ghcr.io/o/app:main",
        "ghcr.io/o/app:latest",
    ]


def test_script_refuses_a_dirty_tree_when_asked(repo: Path) -> None:
    (repo / "wip.txt").write_text("wip")
    done = run_script("tags", "--repo", str(repo), "--image", "ghcr.io/o/app", "--refuse-dirty")
    assert done.returncode == 2
    assert "uncommitted changes" in done.stderr and str(repo) in done.stderr
    assert done.stdout == ""


def test_script_rejects_an_image_with_a_tag(repo: Path) -> None:
    done = run_script("tags", "--repo", str(repo), "--image", "ghcr.io/o/app:v1")
    assert done.returncode == 2
    assert "--image 'ghcr.io/o/app:v1'" in done.stderr
