"""Who gets which secret, the policy pack in every preview and deploy, and the drift check.

The preview threat model (docs/delivery.md): PR code runs with the passphrase, the state
credentials and the host's SSH key only for a trusted author, after an approval of the
`preview` environment. Proven by running the gate's own script on real event payloads
and following the jobs' conditions from its answer: an untrusted PR's jobs reference no
secret at all.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.registry.test_workflows import (
    PULUMI_ACTION,
    WORKFLOWS,
    load,
    steps,
    strings,
    triggers,
)
from tests.tooling import require_tool

pytestmark = pytest.mark.integration

REPO = WORKFLOWS.parents[1]
REPOSITORY = "owner/personal-rag-infra"
SECRET_REF = re.compile(r"\$\{\{\s*secrets\.([A-Za-z0-9_]+)\s*\}\}")
NEEDS_OUTPUT = re.compile(r"^needs\.([\w-]+)\.outputs\.([\w-]+) == '([^']*)'$")
HOST_SECRETS = {"PULUMI_CONFIG_PASSPHRASE", "DEPLOY_SSH_KEY", "PULUMI_BACKEND_URL", "DOCKER_HOST"}


def secrets_of(job: dict[str, Any]) -> set[str]:
    return {m for text in strings(job) for m in SECRET_REF.findall(text)}


def pr_event(head_repo: str, association: str) -> dict[str, Any]:
    return {
        "pull_request": {
            "number": 7,
            "author_association": association,
            "head": {"repo": {"full_name": head_repo}},
            "base": {"repo": {"full_name": REPOSITORY}},
        }
    }


def run_gate(tmp_path: Path, event: dict[str, Any]) -> dict[str, str]:
    """The gate job's step, run by bash as the runner would, on this event."""
    require_tool("jq")
    gate = load("preview.yml")["jobs"]["gate"]
    (step,) = steps(gate)
    event_file = tmp_path / "event.json"
    event_file.write_text(json.dumps(event))
    output = tmp_path / "output"
    output.write_text("")
    env = {
        **{k: str(v) for k, v in (step.get("env") or {}).items()},
        "REPOSITORY": REPOSITORY,  # what ${{ github.repository }} gives
        "GITHUB_EVENT_PATH": str(event_file),
        "GITHUB_OUTPUT": str(output),
        "GITHUB_STEP_SUMMARY": str(tmp_path / "summary"),
        "PATH": os.environ["PATH"],
    }
    done = subprocess.run(
        ["bash", "-eo", "pipefail", "-c", step["run"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return dict(line.split("=", 1) for line in output.read_text().splitlines() if line)


def jobs_that_run(workflow: dict[str, Any], outputs: dict[str, dict[str, str]]) -> list[str]:
    """GitHub's rule for this workflow's shape: a job runs when every job it needs ran and
    its `if` holds. Only the condition form the workflow uses is understood; any other
    form fails the test (extend this evaluator, do not guess)."""
    ran: list[str] = []
    for name, job in workflow["jobs"].items():
        needs = job.get("needs") or []
        needs = [needs] if isinstance(needs, str) else list(needs)
        if any(n not in ran for n in needs):
            continue
        condition = job.get("if")
        if condition is not None:
            match = NEEDS_OUTPUT.match(str(condition).strip())
            assert match, f"{name}: condition {condition!r} is not understood by this test"
            needed, key, value = match.groups()
            assert needed in needs, f"{name}: reads {needed} without needing it"
            if outputs.get(needed, {}).get(key) != value:
                continue
        ran.append(name)
    return ran


UNTRUSTED = [
    pytest.param(pr_event("attacker/personal-rag-infra", "CONTRIBUTOR"), id="fork"),
    pytest.param(pr_event("owner-fork/personal-rag-infra", "OWNER"), id="fork-by-owner-name"),
    pytest.param(pr_event(REPOSITORY, "CONTRIBUTOR"), id="branch-by-contributor"),
    pytest.param(pr_event(REPOSITORY, "FIRST_TIME_CONTRIBUTOR"), id="first-timer"),
    pytest.param(pr_event(REPOSITORY, "NONE"), id="no-association"),
    pytest.param({"pull_request": {}}, id="missing-fields"),
]
TRUSTED = [
    pytest.param(pr_event(REPOSITORY, assoc), id=assoc)
    for assoc in ("OWNER", "MEMBER", "COLLABORATOR")
]


@pytest.mark.parametrize("event", UNTRUSTED)
def test_an_untrusted_pull_request_gets_no_secret(tmp_path: Path, event: dict[str, Any]) -> None:
    preview = load("preview.yml")
    gate = run_gate(tmp_path, event)
    assert gate == {"trusted": "false"}
    ran = jobs_that_run(preview, {"gate": gate})
    assert ran == ["gate"]
    assert set().union(*(secrets_of(preview["jobs"][j]) for j in ran)) == set()


@pytest.mark.parametrize("event", TRUSTED)
def test_a_trusted_pull_request_is_previewed_behind_the_environment_approval(
    tmp_path: Path, event: dict[str, Any]
) -> None:
    preview = load("preview.yml")
    gate = run_gate(tmp_path, event)
    assert gate == {"trusted": "true"}
    ran = jobs_that_run(preview, {"gate": gate})
    assert "preview" in ran
    job = preview["jobs"]["preview"]
    assert job["environment"] == "preview"
    assert secrets_of(job) >= HOST_SECRETS


def test_the_gate_has_no_secret_no_checkout_and_no_permissions() -> None:
    gate = load("preview.yml")["jobs"]["gate"]
    assert secrets_of(gate) == set()
    assert gate["permissions"] == {}
    assert not [s for s in steps(gate) if "uses" in s]  # no checkout: no PR code runs


@pytest.mark.parametrize("name", ["preview.yml", "deploy.yml", "drift.yml"])
def test_host_and_state_secrets_live_only_in_environment_jobs(name: str) -> None:
    # Repository secrets reach any branch's workflow; environment secrets only the jobs
    # the environment's rules (reviewers, branches) let through.
    for job_name, job in load(name)["jobs"].items():
        if secrets_of(job) & {"PULUMI_CONFIG_PASSPHRASE", "DEPLOY_SSH_KEY"}:
            assert job.get("environment"), f"{name} {job_name}"


@pytest.mark.parametrize("name", ["preview.yml", "drift.yml"])
def test_checkouts_do_not_keep_the_token(name: str) -> None:
    for job in load(name)["jobs"].values():
        for step in steps(job):
            if str(step.get("uses", "")).startswith("actions/checkout@"):
                assert step.get("with", {}).get("persist-credentials") is False


@pytest.mark.parametrize("name", ["preview.yml", "deploy.yml"])
def test_every_preview_and_up_runs_the_policy_pack(name: str) -> None:
    checked = 0
    for job in load(name)["jobs"].values():
        job_steps = steps(job)
        for index, step in enumerate(job_steps):
            if PULUMI_ACTION.match(str(step.get("uses", ""))) and step.get("with", {}).get(
                "command"
            ) in ("preview", "up"):
                assert step["with"].get("policyPacks") == "policy", step
                installs = "\n".join(s.get("run", "") for s in job_steps[:index])
                assert "-r policy/requirements.txt" in installs
                checked += 1
    assert checked >= 1


def test_drift_runs_on_a_schedule_for_both_stacks_and_never_for_a_pull_request() -> None:
    drift = load("drift.yml")
    on = triggers(drift)
    assert "schedule" in on and "workflow_dispatch" in on
    assert "pull_request" not in on and "pull_request_target" not in on
    (job,) = drift["jobs"].values()
    assert sorted(job["strategy"]["matrix"]["stack"]) == ["prod", "staging"]
    assert job["environment"] == "drift-${{ matrix.stack }}"
    assert job["strategy"]["fail-fast"] is False  # one stack's drift does not hide the other's
    (check,) = [s for s in steps(job) if "drift-check.sh" in s.get("run", "")]
    assert check["run"].strip() == 'bash scripts/drift-check.sh "$STACK"'
    policy_install = "\n".join(s.get("run", "") for s in steps(job))
    assert "-r policy/requirements.txt" in policy_install
    assert drift["concurrency"]["group"] != load("deploy.yml")["concurrency"]["group"]


# --- scripts/drift-check.sh: its handling of pulumi's answers. A stand-in `pulumi` on
# PATH plays the CLI (not installable here); it proves this script's exit codes and job
# summary, not pulumi itself (the engine job exercises the real CLI).
STAND_IN = """#!/usr/bin/env bash
printf '%s\\n' "$@" > "$ARGV_FILE"
cat "$PULUMI_OUTPUT"
exit "$PULUMI_STATUS"
"""
DIFF = """Previewing update (prod):
~ docker:index/container:Container rag-prod-redis refresh
  ~ restart: "on-failure" => "always"
Resources:
    ~ 1 to update
error: no changes were expected but changes were proposed
"""


def run_drift_check(
    tmp_path: Path, status: int, output: str, stack: str = "prod"
) -> tuple[subprocess.CompletedProcess[str], str, list[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "pulumi"
    fake.write_text(STAND_IN)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    (tmp_path / "out.txt").write_text(output)
    summary = tmp_path / "summary.md"
    summary.write_text("")
    argv = tmp_path / "argv"
    done = subprocess.run(
        ["bash", str(REPO / "scripts" / "drift-check.sh"), stack],
        env={
            "PATH": f"{bin_dir}:/usr/bin:/bin",
            "PULUMI_OUTPUT": str(tmp_path / "out.txt"),
            "PULUMI_STATUS": str(status),
            "ARGV_FILE": str(argv),
            "GITHUB_STEP_SUMMARY": str(summary),
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    args = argv.read_text().splitlines() if argv.exists() else []
    return done, summary.read_text(), args


def test_drift_check_passes_on_a_quiet_preview(tmp_path: Path) -> None:
    done, summary, args = run_drift_check(tmp_path, 0, "Resources:\n    42 unchanged\n")
    assert done.returncode == 0
    assert "prod: no drift" in summary
    assert args[:3] == ["preview", "--stack", "prod"]
    for flag in ("--refresh", "--expect-no-changes", "--diff", "--non-interactive"):
        assert flag in args
    assert args[args.index("--policy-pack") + 1] == "policy"


@pytest.mark.parametrize(
    "message",
    [
        "error: no changes were expected but changes were proposed",
        "error: no changes were expected for preview but changes were proposed",
    ],
)
def test_drift_fails_with_the_diff_in_the_job_summary(tmp_path: Path, message: str) -> None:
    done, summary, _ = run_drift_check(tmp_path, 255, DIFF.replace(DIFF.splitlines()[-1], message))
    assert done.returncode == 1
    assert "### Drift on prod" in summary
    assert '~ restart: "on-failure" => "always"' in summary
    assert "```diff" in summary


def test_a_broken_check_is_not_reported_as_drift_or_as_clean(tmp_path: Path) -> None:
    done, summary, _ = run_drift_check(
        tmp_path, 255, "error: failed to decrypt encrypted configuration value\n"
    )
    assert done.returncode == 2
    assert "drift check itself failed" in summary
    assert "no drift" not in summary and "Drift on" not in summary


def test_drift_check_refuses_an_unknown_stack_before_running_pulumi(tmp_path: Path) -> None:
    done, _, args = run_drift_check(tmp_path, 0, "", stack="production")
    assert done.returncode == 2
    assert "unknown stack 'production'" in done.stderr
    assert args == []


def test_drift_check_passes_shellcheck() -> None:
    shellcheck = require_tool("shellcheck")
    done = subprocess.run(
        [shellcheck, str(REPO / "scripts" / "drift-check.sh")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout
