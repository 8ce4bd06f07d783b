"""The GitHub workflows: valid against GitHub's schema, and shaped as the delivery
flow needs (previews on every PR for both stacks, prod only by approved dispatch,
real state backend, secrets only from the secret store)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.tooling import require_tool

pytestmark = pytest.mark.integration

WORKFLOWS = Path(__file__).resolve().parents[2] / ".github" / "workflows"
WORKFLOW_FILES = sorted(WORKFLOWS.glob("*.yml"))
SECRET_EXPR = re.compile(r"^\$\{\{\s*secrets\.[A-Z0-9_]+\s*\}\}$")
PULUMI_ACTION = re.compile(r"^pulumi/actions@v\d+$")
# A pulumi CLI command in a shell line (not a word like "pulumi-version").
PULUMI_CLI = re.compile(r"(^|[\s;&|(])pulumi\s+\w")


def load(name: str) -> dict[str, Any]:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(data, dict), name
    # YAML 1.1 (PyYAML) reads the key `on` as the boolean True.
    if True in data:
        data["on"] = data.pop(True)
    return data


def triggers(workflow: dict[str, Any]) -> dict[str, Any]:
    on = workflow["on"]
    if isinstance(on, str):
        return {on: None}
    if isinstance(on, list):
        return dict.fromkeys(on)
    assert isinstance(on, dict)
    return on


def steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    return list(job.get("steps", []))


def pulumi_command_steps(job: dict[str, Any]) -> list[dict[str, Any]]:
    """Steps that run a pulumi command: the action with a command, or a shell line."""
    found = []
    for step in steps(job):
        runs_action = PULUMI_ACTION.match(str(step.get("uses", ""))) and "command" in step.get(
            "with", {}
        )
        runs_cli = "run" in step and PULUMI_CLI.search(step["run"])
        if runs_action or runs_cli:
            found.append(step)
    return found


def env_value(workflow: dict[str, Any], job: dict[str, Any], step: dict[str, Any], key: str) -> Any:
    for scope in (step, job, workflow):
        env = scope.get("env") or {}
        if key in env:
            return env[key]
    return None


def strings(node: Any) -> list[str]:
    """Every string in a loaded workflow (keys and values; comments are gone)."""
    if isinstance(node, str):
        return [node]
    if isinstance(node, dict):
        return [s for k, v in node.items() for s in strings(k) + strings(v)]
    if isinstance(node, list):
        return [s for item in node for s in strings(item)]
    return []


def test_workflow_files_exist() -> None:
    assert {p.name for p in WORKFLOW_FILES} >= {"ci.yml", "preview.yml", "deploy.yml"}


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_workflow_is_valid_against_githubs_schema(path: Path) -> None:
    checker = Path(sys.executable).parent / "check-jsonschema"
    tool = str(checker) if checker.is_file() else require_tool("check-jsonschema")
    done = subprocess.run(
        [tool, "--builtin-schema", "vendor.github-workflows", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_ci_runs_the_readme_test_command_and_the_engine_job_on_every_push_and_pr() -> None:
    ci = load("ci.yml")
    assert {"push", "pull_request"} <= set(triggers(ci))
    lint = ci["jobs"]["lint-test"]
    (command,) = [s["run"].strip() for s in steps(lint) if "scripts/test.sh" in s.get("run", "")]
    assert command.startswith("bash scripts/test.sh")  # the README's test command
    # What the job container cannot run is run by a job on the runner itself.
    for ignored in [arg.split("=", 1)[1] for arg in command.split() if arg.startswith("--ignore=")]:
        (job,) = [j for j in ci["jobs"].values() if f"pytest {ignored}" in str(steps(j))]
        assert "container" not in job
    engine = ci["jobs"]["integration"]
    assert engine["needs"] in ("lint-test", ["lint-test"])
    runs = "\n".join(s.get("run", "") for s in steps(engine))
    assert "pytest tests/engine -m engine" in runs
    installs_cli = [s for s in steps(engine) if PULUMI_ACTION.match(str(s.get("uses", "")))]
    assert installs_cli and all("command" not in s.get("with", {}) for s in installs_cli)
    # Without the CLI the engine test would skip; in this job that must be a failure.
    assert engine["env"]["RAG_ENGINE_REQUIRED"] == "1"


def test_preview_runs_on_pull_requests_for_both_stacks_with_a_pr_comment() -> None:
    preview = load("preview.yml")
    assert "pull_request" in triggers(preview)
    # The job that previews (the other one, the gate, decides who may: test_workflow_safety).
    (job,) = [j for j in preview["jobs"].values() if pulumi_command_steps(j)]
    assert job["permissions"]["pull-requests"] == "write"
    assert sorted(job["strategy"]["matrix"]["stack"]) == ["prod", "staging"]
    (step,) = [s for s in pulumi_command_steps(job) if "uses" in s]
    assert step["with"]["command"] == "preview"
    assert step["with"]["stack-name"] == "${{ matrix.stack }}"
    assert step["with"]["comment-on-pr"] is True
    assert SECRET_EXPR.match(step["with"]["cloud-url"])


def test_prod_is_only_deployed_by_an_approved_manual_dispatch() -> None:
    deploy = load("deploy.yml")
    assert {"workflow_run", "workflow_dispatch"} <= set(triggers(deploy))
    assert triggers(deploy)["workflow_run"]["branches"] == ["main"]
    prod_jobs = {
        name: job
        for name, job in deploy["jobs"].items()
        if any(s.get("with", {}).get("stack-name") == "prod" for s in pulumi_command_steps(job))
    }
    assert list(prod_jobs) == ["promote-prod"]
    prod = prod_jobs["promote-prod"]
    assert prod["environment"] == "production"
    assert "github.event_name == 'workflow_dispatch'" in prod["if"]
    assert "workflow_run" not in prod["if"]
    # It promotes the digest staging runs, not a tag of its own.
    script = "\n".join(s.get("run", "") for s in steps(prod))
    assert "pulumi stack output imageRef --stack staging" in script
    assert "pulumi config set imageDigest" in script


def test_staging_deploys_only_after_ci_succeeded_on_main() -> None:
    deploy = load("deploy.yml")
    staging = deploy["jobs"]["deploy-staging"]
    build = deploy["jobs"][staging["needs"]]
    assert "github.event.workflow_run.conclusion == 'success'" in build["if"]
    (up,) = [s for s in pulumi_command_steps(staging) if "uses" in s]
    assert up["with"] == {**up["with"], "command": "up", "stack-name": "staging"}


def test_deploys_never_overlap() -> None:
    concurrency = load("deploy.yml")["concurrency"]
    assert concurrency["group"]
    assert concurrency["cancel-in-progress"] is False


@pytest.mark.parametrize("name", ["preview.yml", "deploy.yml"])
def test_previews_and_deploys_use_the_real_backend_from_secrets(name: str) -> None:
    workflow = load(name)
    values = list(strings(workflow))
    assert not [v for v in values if "file://" in v or "--local" in v]
    for job in workflow["jobs"].values():
        for step in pulumi_command_steps(job):
            if "uses" in step:
                assert SECRET_EXPR.match(step["with"]["cloud-url"]), step
            else:
                backend = env_value(workflow, job, step, "PULUMI_BACKEND_URL")
                assert backend is not None and SECRET_EXPR.match(backend), step


@pytest.mark.parametrize("name", ["preview.yml", "deploy.yml"])
def test_every_pulumi_step_gets_the_passphrase_from_secrets(name: str) -> None:
    workflow = load(name)
    checked = 0
    for job in workflow["jobs"].values():
        for step in pulumi_command_steps(job):
            passphrase = env_value(workflow, job, step, "PULUMI_CONFIG_PASSPHRASE")
            assert passphrase is not None and SECRET_EXPR.match(str(passphrase)), step
            checked += 1
    assert checked >= 2


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_no_passphrase_or_token_is_a_literal(path: Path) -> None:
    workflow = load(path.name)
    scopes: list[dict[str, Any]] = [workflow]
    for job in workflow["jobs"].values():
        scopes += [job, *steps(job)]
    for scope in scopes:
        for key, value in (scope.get("env") or {}).items():
            if re.search(r"PASSPHRASE|TOKEN|PASSWORD|SSH_KEY", key):
                assert SECRET_EXPR.match(str(value)), f"{path.name}: {key} is not a secret"


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_actions_are_pinned_by_major_version(path: Path) -> None:
    for job in load(path.name)["jobs"].values():
        for step in steps(job):
            if "uses" in step:
                assert re.match(r"^[\w.-]+/[\w.-]+@v\d+$", step["uses"]), step["uses"]


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=lambda p: p.name)
def test_run_scripts_take_inputs_from_env_and_pass_shellcheck(path: Path, tmp_path: Path) -> None:
    # `${{ }}` inside a script is pasted in before bash parses it (injection); the
    # scripts read env vars instead, which also lets shellcheck see real bash.
    shellcheck = require_tool("shellcheck")
    workflow = load(path.name)
    assert workflow["defaults"]["run"]["shell"] == "bash"
    scripts = []
    for job_name, job in workflow["jobs"].items():
        for index, step in enumerate(steps(job)):
            if "run" in step:
                assert "${{" not in step["run"], f"{path.name} {job_name}: {step['run']}"
                script = tmp_path / f"{job_name}-{index}.sh"
                script.write_text("#!/usr/bin/env bash\nset -eo pipefail\n" + step["run"])
                scripts.append(str(script))
    assert scripts
    done = subprocess.run(
        [shellcheck, "--severity=warning", *scripts],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
