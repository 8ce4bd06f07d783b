"""Quiet previews: the program run twice against the same state declares the same thing.

A second ``pulumi preview`` with nothing changed must show no changes: every resource's
inputs and every replacement trigger must be identical between two runs that share the
provider state (the passwords and keys the first run generated). A trigger that depends
on the clock (or anything else that is not the config and that state) fails this.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.pulumi_harness import ProgramRun, run_program
from tests.pulumi_harness import stack_config as make_config

STACKS = ("staging", "prod")
MIGRATE = ("docker:index/container:Container", "rag-{stack}-postgres-migrate")


def declared(run: ProgramRun) -> dict[tuple[str, str], Any]:
    return {(r.typ, r.name): r.inputs for r in run.resources}


def differences(first: ProgramRun, second: ProgramRun) -> list[str]:
    found = []
    a, b = declared(first), declared(second)
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            changed = sorted(
                k
                for k in set(a.get(key) or {}) | set(b.get(key) or {})
                if (a.get(key) or {}).get(k) != (b.get(key) or {}).get(k)
            )
            found.append(f"{key[1]} ({key[0]}): inputs differ in {changed}")
    for key in sorted(set(first.replacement_triggers) | set(second.replacement_triggers)):
        if first.replacement_triggers.get(key) != second.replacement_triggers.get(key):
            found.append(f"{key[1]}: replacement trigger differs")
    return found


@pytest.mark.parametrize("stack", STACKS)
def test_a_second_run_with_nothing_changed_declares_the_same(stack: str) -> None:
    state: dict[str, dict[str, Any]] = {}
    first = run_program(stack, provider_state=state)
    second = run_program(stack, provider_state=state)
    assert len(first.resources) == len(second.resources) > 40
    assert differences(first, second) == []


def _migrate_trigger(run: ProgramRun) -> tuple[Any, bool]:
    key = (MIGRATE[0], MIGRATE[1].format(stack=run.stack))
    return run.replacement_triggers[key]


def test_migration_trigger_is_a_secret_derived_from_the_sql_and_server() -> None:
    state: dict[str, dict[str, Any]] = {}
    first = run_program("prod", provider_state=state)
    trigger, secret = _migrate_trigger(first)
    assert secret, "the trigger hashes the SQL, which holds the role verifiers"
    assert isinstance(trigger, str) and len(trigger) == 64
    # A new password (another state: new random values) changes the SQL, so it runs again.
    fresh = run_program("prod", provider_state={})
    assert _migrate_trigger(fresh)[0] != trigger
    # Adopting a volume replaces the PostgreSQL container it targets: it runs again.
    adopted = run_program(
        "prod",
        make_config("prod", adoptVolumes='{"postgres": "rag_postgres_data"}'),
        provider_state=dict(state),
    )
    assert _migrate_trigger(adopted)[0] != trigger
