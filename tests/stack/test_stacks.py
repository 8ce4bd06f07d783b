"""Both stacks from the program's own declarations on a real engine, and what a user
and an operator do with them afterwards (README, "Tests": the scenarios).

The module brings staging and prod up once (fixture ``stacks``) and runs the scenarios
in order against them; each scenario leaves both stacks healthy for the next.
"""

from __future__ import annotations

import pytest

from tests.stack.conftest import Stacks
from tests.stack.probes import caddy_request

pytestmark = pytest.mark.stack


def test_both_stacks_answer_through_caddy_with_redis_tls_postgres_and_pgcrypto(
    stacks: Stacks,
) -> None:
    for stack, run in stacks.runs.items():
        domain = run.config["domain"]
        status, deps = caddy_request(stacks.applier, stacks.applied[stack], domain, "GET", "/deps")
        assert (status, deps) == (
            200,
            {"redis": "ok (tls)", "postgres": "ok (rag_feedback)", "pgcrypto": "ok"},
        ), stack
        status, health = caddy_request(
            stacks.applier, stacks.applied[stack], domain, "GET", "/health"
        )
        assert (status, health) == (200, {"status": "ok"}), stack
