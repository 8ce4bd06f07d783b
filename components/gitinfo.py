"""Image tags from git, and digest-pinned image references. Pure: no Pulumi.

One image per commit: the tags say which commit an image was built from, so a
tag that claims a commit must never point at something else. Hence:

* a dirty working tree (modified or untracked, non-ignored files, which would
  go into the build context) tags every commit-derived tag with ``-dirty`` and
  never gets ``latest``;
* a detached HEAD has no branch, so it gets no branch tag and no ``latest``.
  CI checkouts are often detached (a pull request's merge commit, a checkout of
  ``workflow_run.head_sha``); there the workflow knows the branch
  (``GITHUB_REF_NAME``, ``workflow_run.head_branch``) and passes it as
  ``branch_override``.

Also runnable as a script, with the standard library only, so a workflow can
compute the tags before any Python dependency is installed::

    python3 components/gitinfo.py tags --repo app --image ghcr.io/o/rag_personal --branch main

prints one ``IMAGE:TAG`` per line, the full-SHA tag first.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

DIRTY_SUFFIX = "-dirty"
SHORT_SHA_LENGTH = 12
_MAX_TAG_LENGTH = 128
_SHA = re.compile(r"^[0-9a-f]{40}$")
_LOOKS_LIKE_SHA = re.compile(r"^(?:[0-9a-f]{12}|[0-9a-f]{40})$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_NOT_TAG_CHAR = re.compile(r"[^A-Za-z0-9_.-]")
# A repository reference: lowercase path components, optionally behind a registry
# host[:port]. No tag and no digest: the digest is what pins it.
_REPOSITORY = re.compile(
    r"^(?:[A-Za-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-]+[a-z0-9]+)*(?:/[a-z0-9]+(?:[._-]+[a-z0-9]+)*)*$"
)


class GitInfoError(Exception):
    """A git repository could not be read, or a reference is malformed."""


@dataclass(frozen=True)
class GitState:
    """What a build of the working tree at ``HEAD`` is made from."""

    sha: str
    branch: str | None  # None when HEAD is detached
    dirty: bool

    @property
    def short_sha(self) -> str:
        return self.sha[:SHORT_SHA_LENGTH]


def _git(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            ["git", "-C", str(repo), *args],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except FileNotFoundError as exc:
        raise GitInfoError("git is not installed; it is needed to tag images") from exc


def read_git_state(repo: str | Path, branch_override: str | None = None) -> GitState:
    """Read the commit, branch and cleanliness of the working tree at ``repo``.

    ``branch_override`` names the branch when the caller knows better than HEAD
    (CI checkouts are detached); it replaces whatever HEAD says.
    """
    path = Path(repo)
    if not path.is_dir():
        raise GitInfoError(f"{str(path)!r} is not a directory; expected a git working tree")
    inside = _git(path, "rev-parse", "--is-inside-work-tree")
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        raise GitInfoError(
            f"{str(path)!r} is not a git working tree: {inside.stderr.strip() or 'no work tree'}"
        )
    head = _git(path, "rev-parse", "--verify", "-q", "HEAD^{commit}")
    sha = head.stdout.strip()
    if head.returncode != 0 or not _SHA.match(sha):
        raise GitInfoError(f"git repository {str(path)!r} has no commit at HEAD yet")

    if branch_override is not None:
        if not branch_override.strip() or branch_override != branch_override.strip():
            raise GitInfoError(
                f"branch override {branch_override!r} is blank or has surrounding spaces; "
                "expected a branch name such as main"
            )
        branch: str | None = branch_override
    else:
        # Exit status 1 with no output is git's answer for a detached HEAD.
        symbolic = _git(path, "symbolic-ref", "-q", "--short", "HEAD")
        branch = symbolic.stdout.strip() if symbolic.returncode == 0 else None

    status = _git(path, "status", "--porcelain")
    if status.returncode != 0:
        raise GitInfoError(f"git status failed in {str(path)!r}: {status.stderr.strip()}")
    return GitState(sha=sha, branch=branch, dirty=bool(status.stdout.strip()))


def sanitize_tag(name: str) -> str:
    """``name`` as a Docker tag: [A-Za-z0-9_.-], at most 128, no leading . or -.

    Returns "" when nothing usable is left (e.g. a branch named "---").
    """
    tag = _NOT_TAG_CHAR.sub("-", name).lstrip(".-")
    return tag[:_MAX_TAG_LENGTH]


def compute_image_tags(state: GitState, default_branch: str = "main") -> list[str]:
    """Tags for an image built from ``state``: full SHA first, then short SHA,
    the branch, and ``latest`` on a clean checkout of ``default_branch``.

    A dirty tree suffixes every tag with ``-dirty`` (so it never claims a commit
    it is not) and gets no ``latest``. A detached HEAD gets no branch tag and no
    ``latest``. A branch literally named like a reserved tag (``latest`` off the
    default branch, or a commit SHA) is prefixed with ``branch-`` so it cannot
    shadow one.
    """
    if not _SHA.match(state.sha):
        raise GitInfoError(f"commit SHA {state.sha!r} is not 40 lowercase hex digits")
    suffix = DIRTY_SUFFIX if state.dirty else ""
    tags = [state.sha + suffix, state.short_sha + suffix]
    if state.branch is not None:
        on_default = state.branch == default_branch
        branch_tag = sanitize_tag(state.branch)
        if (branch_tag == "latest" and not on_default) or _LOOKS_LIKE_SHA.match(branch_tag):
            branch_tag = "branch-" + branch_tag[: _MAX_TAG_LENGTH - len("branch-")]
        if branch_tag:
            branch_tag = branch_tag[: _MAX_TAG_LENGTH - len(suffix)] + suffix
            if branch_tag not in tags:
                tags.append(branch_tag)
        if on_default and not state.dirty and "latest" not in tags:
            tags.append("latest")
    return tags


def image_ref_with_digest(image: str, digest: str) -> str:
    """``image@sha256:...``: the immutable reference every stack runs."""
    if not _DIGEST.match(digest or ""):
        raise GitInfoError(
            f"image digest {digest!r} is malformed; expected sha256: followed by "
            "64 lowercase hex digits"
        )
    if not _REPOSITORY.match(image or ""):
        raise GitInfoError(
            f"image {image!r} is not a repository reference; expected e.g. "
            "ghcr.io/owner/rag_personal (lowercase, without :tag or @digest)"
        )
    return f"{image}@{digest}"


def _main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    tags = commands.add_parser("tags", help="print IMAGE:TAG lines, the full-SHA tag first")
    tags.add_argument("--repo", default=".", help="git working tree of the image's source")
    tags.add_argument("--image", required=True, help="repository, e.g. ghcr.io/owner/app")
    tags.add_argument("--branch", default=None, help="branch name when HEAD is detached (CI)")
    tags.add_argument("--default-branch", default="main")
    tags.add_argument("--refuse-dirty", action="store_true", help="fail instead of tagging -dirty")
    args = parser.parse_args(argv)
    try:
        if not _REPOSITORY.match(args.image):
            raise GitInfoError(
                f"--image {args.image!r} is not a repository reference; expected e.g. "
                "ghcr.io/owner/rag_personal (lowercase, without :tag)"
            )
        state = read_git_state(args.repo, branch_override=args.branch)
        if state.dirty and args.refuse_dirty:
            raise GitInfoError(
                f"working tree {args.repo!r} has uncommitted changes; commit them or drop "
                "--refuse-dirty to get -dirty tags"
            )
        for tag in compute_image_tags(state, default_branch=args.default_branch):
            print(f"{args.image}:{tag}")
    except GitInfoError as exc:
        print(f"gitinfo: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main())
