"""Finding the real tools the integration tests drive.

Locally a missing tool skips the test with the reason; in CI (``CI`` or
``RAG_REQUIRE_TOOLS`` set) a missing tool is a failure, because .ci/run installs them all.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

# Debian puts some server binaries outside PATH.
_EXTRA_DIRS = ["/usr/lib/postgresql/15/bin", "/usr/sbin"]


def tools_required() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("RAG_REQUIRE_TOOLS"))


def find_tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    for directory in _EXTRA_DIRS:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def require_tool(name: str) -> str:
    """Absolute path of ``name``; skip (locally) or fail (CI) when it is missing."""
    path = find_tool(name)
    if path is None:
        message = f"required tool {name!r} is not installed (see .ci/apt-packages.txt)"
        if tools_required():
            pytest.fail(message)
        pytest.skip(message)
    return path
