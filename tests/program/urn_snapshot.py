"""The committed URN snapshot of each stack (tests/program/urns/<stack>.txt).

A URN is how Pulumi knows a resource across deploys: rename or re-parent one without
``aliases`` and `pulumi up` deletes the old resource and creates a new one -- a new
random key (old backups and pgcrypto rows unreadable), an empty volume. The snapshot
makes every URN change visible in review; CONTRIBUTING.md explains what to do.

Regenerate after a deliberate change (and commit the files in the same change):

    venv/bin/python -m tests.program.urn_snapshot
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from tests.pulumi_harness import ProgramRun, run_program

SNAPSHOT_DIR = Path(__file__).resolve().parent / "urns"
SNAPSHOT_STACKS = ("staging", "prod")
REGENERATE = "venv/bin/python -m tests.program.urn_snapshot"


def snapshot_path(stack: str) -> Path:
    return SNAPSHOT_DIR / f"{stack}.txt"


def render_snapshot(run: ProgramRun) -> str:
    return "".join(f"{urn}\n" for urn in sorted(run.urns))


def read_snapshot(stack: str) -> set[str]:
    path = snapshot_path(stack)
    if not path.is_file():
        return set()
    return {line.strip() for line in path.read_text().splitlines() if line.strip()}


@dataclass(frozen=True)
class UrnChanges:
    vanished: list[str]  # in the snapshot, declared by nothing (not even as an alias)
    aliased: list[str]  # in the snapshot, now an alias of a declared resource
    appeared: list[str]  # declared, not in the snapshot

    def problems(self, stack: str) -> list[str]:
        lines = []
        for urn in self.vanished:
            lines.append(
                f"{stack}: URN {urn} disappeared. Pulumi would DELETE that resource and create "
                "a new one (a new random key, an empty volume). If it was renamed or "
                "re-parented, add `aliases=[...]` to the new resource's ResourceOptions "
                '(e.g. `aliases=[pulumi.Alias(name="<old name>")]`; CONTRIBUTING.md); if the '
                f"deletion is intended, regenerate the snapshot: {REGENERATE}"
            )
        for urn in self.aliased:
            lines.append(
                f"{stack}: URN {urn} is now an alias of a renamed resource; regenerate the "
                f"snapshot in the same change: {REGENERATE}"
            )
        for urn in self.appeared:
            lines.append(
                f"{stack}: new URN {urn}. If it replaces a resource that exists, add "
                f"`aliases=[...]` for the old one; otherwise regenerate the snapshot: {REGENERATE}"
            )
        return lines


def compare(run: ProgramRun, snapshot: set[str]) -> UrnChanges:
    declared = run.urns
    alias_of = {alias for reg in declared.values() for alias in reg.alias_urns}
    gone = sorted(snapshot - set(declared))
    return UrnChanges(
        vanished=[u for u in gone if u not in alias_of],
        aliased=[u for u in gone if u in alias_of],
        appeared=sorted(set(declared) - snapshot),
    )


def main() -> int:
    SNAPSHOT_DIR.mkdir(exist_ok=True)
    for stack in SNAPSHOT_STACKS:
        path = snapshot_path(stack)
        path.write_text(render_snapshot(run_program(stack)))
        print(f"wrote {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
