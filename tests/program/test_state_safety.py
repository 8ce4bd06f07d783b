"""Irreplaceable state: protected resources and the committed URN snapshot.

A rename or re-parent without ``aliases`` makes `pulumi up` delete a resource and
create a new one: for the data-encryption key or the backup passphrase that is a new
random value (every pgcrypto row and every backup unreadable), for a data volume an
empty one. These tests read what the engine would receive (URNs, protect,
retainOnDelete, aliases) from the program run under mocks.
"""

from __future__ import annotations

from typing import Any

import pulumi
import pulumi_random
import pytest

from tests.program.urn_snapshot import SNAPSHOT_STACKS, compare, read_snapshot
from tests.pulumi_harness import ProgramRun, Registration, run_program
from tests.pulumi_harness import stack_config as make_config

RANDOM_PASSWORD = "random:index/randomPassword:RandomPassword"
VOLUME = "docker:index/volume:Volume"
# What a stack cannot lose (the promise, stated independently of the code): the keys
# that decrypt data and backups, and the volumes whose contents exist nowhere else.
IRREPLACEABLE = {
    (RANDOM_PASSWORD, "data-encryption-key"),
    (RANDOM_PASSWORD, "backup-passphrase"),
    (VOLUME, "postgres-data"),
    (VOLUME, "redis-data"),
    (VOLUME, "chroma-data"),
    (VOLUME, "backups"),
    (VOLUME, "docs"),
    (VOLUME, "mds"),
}


@pytest.fixture(scope="module")
def runs() -> dict[str, ProgramRun]:
    return {stack: run_program(stack) for stack in SNAPSHOT_STACKS}


def irreplaceable(run: ProgramRun) -> dict[tuple[str, str], Registration]:
    by_key = {(r.typ, r.name): r for r in run.registrations}
    found = {}
    for typ, role in IRREPLACEABLE:
        key = (typ, f"rag-{run.stack}-{role}")
        assert key in by_key, f"{run.stack}: the program no longer declares {key}"
        found[key] = by_key[key]
    return found


@pytest.mark.parametrize("stack", SNAPSHOT_STACKS)
def test_urns_match_the_committed_snapshot(runs: dict[str, ProgramRun], stack: str) -> None:
    snapshot = read_snapshot(stack)
    assert snapshot, f"no URN snapshot for {stack}: python -m tests.program.urn_snapshot"
    problems = compare(runs[stack], snapshot).problems(stack)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("stack", SNAPSHOT_STACKS)
def test_irreplaceable_resources_are_protected(runs: dict[str, ProgramRun], stack: str) -> None:
    found = irreplaceable(runs[stack])
    unprotected = [key for key, reg in found.items() if not reg.protect]
    assert not unprotected, f"{stack}: lost protect=True: {unprotected}"
    not_retained = [
        key for key, reg in found.items() if key[0] == VOLUME and not reg.retain_on_delete
    ]
    assert not not_retained, f"{stack}: data volumes must keep retain_on_delete: {not_retained}"


def test_protection_holds_with_adopted_volumes_and_host_backups() -> None:
    config = make_config(
        "prod",
        adoptVolumes='{"postgres": "rag_postgres_data"}',
        backupHostPath="/srv/rag-backups",
    )
    run = run_program("prod", config)
    names = {r.name for r in run.registrations}
    # Adopted volumes and host paths are not resources: Pulumi cannot delete them.
    assert "rag-prod-postgres-data" not in names
    assert "rag-prod-backups" not in names
    for reg in run.registrations:
        if (reg.typ, reg.name.removeprefix("rag-prod-")) in IRREPLACEABLE:
            assert reg.protect, reg.urn


def test_replaceable_state_is_not_protected(runs: dict[str, ProgramRun]) -> None:
    # Protect on what can be re-made (passwords the migration resets, certificates,
    # containers) would only block routine rotations and replacements.
    for run in runs.values():
        keys = {(r.typ, r.name) for r in run.registrations if r.protect}
        expected = {(typ, f"rag-{run.stack}-{role}") for typ, role in IRREPLACEABLE}
        assert keys == expected


def _renaming_random_password(old: str, new: str, with_alias: bool) -> type:
    original = pulumi_random.RandomPassword

    class Renamed(original):  # type: ignore[misc, valid-type]
        def __init__(self, name: str, *args: Any, opts: Any = None, **kwargs: Any) -> None:
            if name == old:
                name = new
                if with_alias:
                    aliases = [pulumi.Alias(name=old)]
                    opts = pulumi.ResourceOptions.merge(
                        opts, pulumi.ResourceOptions(aliases=aliases)
                    )
            super().__init__(name, *args, opts=opts, **kwargs)

    return Renamed


@pytest.mark.parametrize("with_alias", [False, True])
def test_a_rename_is_caught_and_an_alias_is_recognised(
    monkeypatch: pytest.MonkeyPatch, with_alias: bool
) -> None:
    old, new = "rag-staging-data-encryption-key", "rag-staging-pgcrypto-key"
    monkeypatch.setattr(
        pulumi_random, "RandomPassword", _renaming_random_password(old, new, with_alias)
    )
    run = run_program("staging")
    changes = compare(run, read_snapshot("staging"))
    old_urn = next(u for u in read_snapshot("staging") if u.endswith(f"::{old}"))
    assert [u.rsplit("::", 1)[1] for u in changes.appeared] == [new]
    message = "\n".join(changes.problems("staging"))
    if with_alias:
        assert changes.aliased == [old_urn] and not changes.vanished
        assert "regenerate the snapshot" in message
    else:
        assert changes.vanished == [old_urn] and not changes.aliased
        assert "add `aliases=[...]`" in message


@pytest.mark.parametrize("with_alias", [False, True])
def test_a_retyped_component_needs_an_alias_for_its_children(
    monkeypatch: pytest.MonkeyPatch, with_alias: bool
) -> None:
    # A child's URN carries its parents' type chain: changing a component's type token
    # (or moving a resource to another component) changes every child's URN. One alias on
    # the component covers them all (the engine derives the children's old URNs).
    old_type, new_type = "personal-rag:index:StackSecrets", "personal-rag:secrets:StackSecrets"
    original_init = pulumi.ComponentResource.__init__

    def retyped(self: Any, t: str, name: str, props: Any = None, opts: Any = None, *a: Any) -> None:
        if t == old_type:
            t = new_type
            if with_alias:
                alias = pulumi.ResourceOptions(aliases=[pulumi.Alias(type_=old_type)])
                opts = pulumi.ResourceOptions.merge(opts, alias)
        original_init(self, t, name, props, opts, *a)

    monkeypatch.setattr(pulumi.ComponentResource, "__init__", retyped)
    changes = compare(run_program("staging"), read_snapshot("staging"))
    key_urn = next(
        u for u in read_snapshot("staging") if u.endswith("::rag-staging-backup-passphrase")
    )
    assert all(new_type in u for u in changes.appeared) and len(changes.appeared) > 1
    if with_alias:
        assert changes.vanished == [] and key_urn in changes.aliased
    else:
        assert changes.aliased == [] and key_urn in changes.vanished
