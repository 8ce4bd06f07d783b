"""The isolated app stack under Pulumi mocks, for both stacks side by side."""

from __future__ import annotations

import re
from collections import Counter

import pytest

from tests.pulumi_harness import ProgramRun, Recorded, is_secret, plaintext_strings, run_program
from tests.pulumi_harness import stack_config as make_config

STACKS = ("staging", "prod")
CORE_SERVICES = ("api", "redis", "postgres", "caddy")
# Capabilities a service may add back after dropping ALL (see components/app_stack.py).
ALLOWED_CAP_ADDS = {
    "caddy": {"NET_BIND_SERVICE"},
}
INIT_CAPS = {"CHOWN", "DAC_OVERRIDE", "FOWNER"}


@pytest.fixture(scope="module")
def runs() -> dict[str, ProgramRun]:
    return {stack: run_program(stack) for stack in STACKS}


def services(run: ProgramRun) -> dict[str, Recorded]:
    """Long-running containers (not config-init, not one-shot jobs)."""
    return {
        name: c for name, c in run.containers.items() if c.inputs.get("mustRun", True) is not False
    }


def label(container: Recorded, key: str) -> str | None:
    for item in container.inputs.get("labels", []):
        if item["label"] == key:
            return str(item["value"])
    return None


def test_each_stack_declares_its_components_and_core_services(runs: dict[str, ProgramRun]) -> None:
    for stack, run in runs.items():
        types = {r.typ for r in run.resources}
        for token in ("AppStack", "RedisTls", "StackSecrets", "Registry"):
            assert f"personal-rag:index:{token}" in types
        for service in CORE_SERVICES:
            assert f"rag-{stack}-{service}" in run.containers


def test_resource_names_are_unique_within_a_stack(runs: dict[str, ProgramRun]) -> None:
    for run in runs.values():
        counts = Counter((r.typ, r.name) for r in run.resources)
        assert [k for k, n in counts.items() if n > 1] == []
        docker_names = Counter(
            (r.typ, r.inputs.get("name", r.name))
            for r in run.resources
            if r.typ.startswith("docker:")
        )
        assert [k for k, n in docker_names.items() if n > 1] == []


def test_docker_names_carry_the_stack_and_are_disjoint(runs: dict[str, ProgramRun]) -> None:
    names = {}
    for stack, run in runs.items():
        names[stack] = {
            r.inputs["name"]
            for r in run.resources
            if r.typ.split("/")[-1].split(":")[-1] in ("Container", "Network", "Volume")
        }
        assert names[stack]
        assert all(n.startswith(f"rag-{stack}-") for n in names[stack]), names[stack]
    assert not names["staging"] & names["prod"]


def test_containers_join_only_their_own_stacks_networks(runs: dict[str, ProgramRun]) -> None:
    for run in runs.values():
        own = set(run.networks)
        for name, c in run.containers.items():
            attached = {n["name"] for n in c.inputs.get("networksAdvanced", [])}
            assert attached <= own, (name, attached)
            mode = c.inputs.get("networkMode")
            assert mode in (None, "none"), (name, mode)
            if not attached:
                assert mode == "none", f"{name} would land on Docker's shared default bridge"


def test_backend_is_internal_and_holds_the_databases(runs: dict[str, ProgramRun]) -> None:
    for stack, run in runs.items():
        backend = run.networks[f"rag-{stack}-backend"]
        frontend = run.networks[f"rag-{stack}-frontend"]
        assert backend.inputs["internal"] is True
        assert frontend.inputs.get("internal", False) is False
        for db in ("redis", "postgres"):
            nets = {
                n["name"] for n in run.containers[f"rag-{stack}-{db}"].inputs["networksAdvanced"]
            }
            assert nets == {f"rag-{stack}-backend"}, (db, nets)
        caddy_nets = {
            n["name"] for n in run.containers[f"rag-{stack}-caddy"].inputs["networksAdvanced"]
        }
        assert f"rag-{stack}-backend" not in caddy_nets


def test_only_prods_caddy_is_public_and_databases_publish_nothing(
    runs: dict[str, ProgramRun],
) -> None:
    public = []
    for stack, run in runs.items():
        for name, c in run.containers.items():
            for port in c.inputs.get("ports", []):
                if port.get("ip") != "127.0.0.1":
                    public.append((name, port.get("ip"), port["external"]))
        for db in ("redis", "postgres", "api"):
            assert not run.containers[f"rag-{stack}-{db}"].inputs.get("ports"), db
    all_interfaces = "0.0.0.0"  # noqa: S104 (what the assertion is about)
    assert sorted(public) == [
        ("rag-prod-caddy", all_interfaces, 80),
        ("rag-prod-caddy", all_interfaces, 443),
    ]


def test_published_loopback_ports_do_not_collide_across_stacks(
    runs: dict[str, ProgramRun],
) -> None:
    seen: dict[int, str] = {}
    for run in runs.values():
        for name, c in run.containers.items():
            for port in c.inputs.get("ports", []):
                assert port["external"] not in seen, (name, seen.get(port["external"]))
                seen[port["external"]] = name


def test_every_service_is_hardened(runs: dict[str, ProgramRun]) -> None:
    for run in runs.values():
        for name, c in services(run).items():
            i = c.inputs
            service = label(c, "personal-rag.service") or ""
            assert "no-new-privileges:true" in i["securityOpts"], name
            assert i["capabilities"]["drops"] == ["ALL"], name
            adds = set(i["capabilities"].get("adds", []))
            assert adds <= ALLOWED_CAP_ADDS.get(service, set()), (name, adds)
            assert i["readOnly"] is True, name
            assert i.get("privileged", False) is False, name
            assert i["memory"] > 0 and i["memorySwap"] == i["memory"], name
            assert i["cpuShares"] > 0, name
            assert i["restart"] == "on-failure" and 0 < i["maxRetryCount"] <= 5, name
            tests = i["healthcheck"]["tests"]
            assert tests and tests[0] == "CMD", name
            for mode_key in ("pidMode", "ipcMode", "networkMode", "usernsMode"):
                assert i.get(mode_key) not in ("host",), (name, mode_key)


def test_no_container_mounts_the_docker_socket(runs: dict[str, ProgramRun]) -> None:
    for run in runs.values():
        for name, c in run.containers.items():
            sources = [m.get("source", "") for m in c.inputs.get("mounts", [])]
            sources += [v.get("hostPath", "") for v in c.inputs.get("volumes", [])]
            assert not any("docker.sock" in s for s in sources), name


def test_no_container_is_read_only_and_receives_uploads(runs: dict[str, ProgramRun]) -> None:
    # Docker refuses uploads into a read-only rootfs ("container rootfs is marked read-only").
    for run in runs.values():
        for name, c in run.containers.items():
            assert not (c.inputs.get("readOnly") and c.inputs.get("uploads")), name


def test_files_reach_services_through_a_read_only_config_volume(
    runs: dict[str, ProgramRun],
) -> None:
    for stack, run in runs.items():
        for service in CORE_SERVICES:
            c = run.containers[f"rag-{stack}-{service}"]
            init = run.containers[f"rag-{stack}-{service}-config-init"]
            assert init.inputs["uploads"], service
            assert init.inputs["networkMode"] == "none"
            assert set(init.inputs["capabilities"]["adds"]) <= INIT_CAPS
            config_volume = f"rag-{stack}-{service}-config"
            mounts = {m["source"]: m for m in c.inputs["mounts"]}
            assert mounts[config_volume]["readOnly"] is True
            init_mounts = {m["source"]: m for m in init.inputs["mounts"]}
            assert init_mounts[config_volume]["target"] == mounts[config_volume]["target"]
            # A content hash label restarts the service when a file changes.
            assert re.fullmatch(r"[0-9a-f]{64}", label(c, "personal-rag.config-sha256") or "")


def test_config_hash_changes_with_content() -> None:
    a = run_program("staging", make_config("staging", domain="a.example.com"))
    b = run_program("staging", make_config("staging", domain="b.example.com"))
    ca, cb = a.containers["rag-staging-caddy"], b.containers["rag-staging-caddy"]
    assert label(ca, "personal-rag.config-sha256") != label(cb, "personal-rag.config-sha256")


def test_secret_files_are_secret_outputs(runs: dict[str, ProgramRun]) -> None:
    for run in runs.values():
        for name, c in run.containers.items():
            uploads = c.raw_inputs.get("uploads")
            plain = {p for p, _ in plaintext_strings(uploads)} if uploads else set()
            has_secret_file = any(
                "secrets/" in u["file"] or u["file"].endswith((".key", ".acl", "migrate.sql"))
                for u in c.inputs.get("uploads", [])
            )
            if has_secret_file:
                assert is_secret(uploads) or not plain, name


def test_no_secret_value_appears_in_plaintext_anywhere(runs: dict[str, ProgramRun]) -> None:
    """The secrets audit: every input of every resource and every export, both stacks."""
    for stack, run in runs.items():
        secrets = [s for s in run.known_secret_values() if len(s) >= 8]
        assert len(secrets) >= 10  # passwords, keys, the SMTP password
        leaks = []
        for r in run.resources:
            for path, text in plaintext_strings(r.raw_inputs):
                for s in secrets:
                    if s in text:
                        leaks.append((r.typ, r.name, path))
        for key, (value, secret) in run.exports.items():
            if not secret:
                for _, text in plaintext_strings(value):
                    leaks += [("export", key, "") for s in secrets if s in text]
        assert leaks == [], f"{stack}: secrets in plaintext at {leaks}"


# A variable whose name says it holds a credential; *_FILE variables name a file instead.
_CREDENTIAL_NAME = re.compile(
    r".*(PASSWORD|PASSWD|SECRET|TOKEN|KEY|PASSPHRASE|CREDENTIAL).*|.*_AUTH"
)


def credential_envs(envs: list[str]) -> list[str]:
    """Entries of ``envs`` that carry a credential by name (not a *_FILE path) or put a
    password in a URL's userinfo (scheme://user:password@host)."""
    found = []
    for entry in envs:
        name, _, value = entry.partition("=")
        by_name = _CREDENTIAL_NAME.fullmatch(name.upper()) and not name.upper().endswith("_FILE")
        in_url = re.search(r"://[^/@\s:]+:[^/@\s]+@", value)
        if by_name or in_url:
            found.append(name)
    return found


def test_env_vars_carry_no_credentials(runs: dict[str, ProgramRun]) -> None:
    for run in runs.values():
        for name, c in run.containers.items():
            assert credential_envs(c.inputs.get("envs", [])) == [], name


@pytest.mark.parametrize(
    "planted",
    [
        "POSTGRES_PASSWORD=hunter2",
        "DATA_ENCRYPTION_KEY=abc",
        "REDISCLI_AUTH=hunter2",
        "DATABASE_URL=postgresql://rag_app:hunter2@db:5432/x",
    ],
)
def test_env_check_catches_a_planted_credential(runs: dict[str, ProgramRun], planted: str) -> None:
    api_envs = runs["prod"].containers["rag-prod-api"].inputs["envs"]
    assert credential_envs(api_envs) == []
    assert credential_envs([*api_envs, planted]) == [planted.partition("=")[0]]


def test_backup_passphrase_export_is_secret(runs: dict[str, ProgramRun]) -> None:
    for run in runs.values():
        value, secret = run.exports["backupPassphrase"]
        assert secret and len(value) >= 32


def test_stacks_get_their_own_secrets(runs: dict[str, ProgramRun]) -> None:
    staging = set(runs["staging"].generated_secrets)
    prod = set(runs["prod"].generated_secrets)
    assert staging and prod and not staging & prod


def test_api_runs_the_digest_with_the_stacks_settings(runs: dict[str, ProgramRun]) -> None:
    for stack, run in runs.items():
        api = run.containers[f"rag-{stack}-api"].inputs
        image_ref, _ = run.exports["imageRef"]
        assert re.fullmatch(r"ghcr\.io/example/rag_personal@sha256:[0-9a-f]{64}", image_ref)
        assert api["image"] == image_ref
        env = dict(e.split("=", 1) for e in api["envs"])
        assert env["REDIS_URL"].startswith(f"rediss://app@rag-{stack}-redis:6379/")
        assert env["LOG_LEVEL"] == ("DEBUG" if stack == "staging" else "INFO")
        assert env["SESSION_QUERIES_PER_HOUR"] == ("100" if stack == "staging" else "30")
        mounts = {m["target"]: m for m in api["mounts"]}
        assert mounts["/workspace/data/chroma"]["readOnly"] in (False, None)
        assert mounts["/workspace/data/docs"]["readOnly"] is True
        assert mounts["/workspace/data/mds"]["readOnly"] is True


def test_image_digest_config_pins_the_api_image() -> None:
    digest = "sha256:" + "ab" * 32
    run = run_program("prod", make_config("prod", imageDigest=digest))
    assert (
        run.containers["rag-prod-api"].inputs["image"] == f"ghcr.io/example/rag_personal@{digest}"
    )


def test_adopted_volumes_are_used_in_place_not_created() -> None:
    adopt = '{"postgres": "rag_postgres_data", "chroma": "rag_chroma_data"}'
    run = run_program("prod", make_config("prod", adoptVolumes=adopt))
    assert "rag-prod-postgres-data" not in run.volumes
    assert "rag-prod-chroma-data" not in run.volumes
    assert "rag-prod-redis-data" in run.volumes
    pg_sources = {m["source"] for m in run.containers["rag-prod-postgres"].inputs["mounts"]}
    api_sources = {m["source"] for m in run.containers["rag-prod-api"].inputs["mounts"]}
    assert "rag_postgres_data" in pg_sources
    assert "rag_chroma_data" in api_sources


def test_nothing_that_holds_data_is_deleted_with_the_stack(runs: dict[str, ProgramRun]) -> None:
    for stack, run in runs.items():
        for name in ("redis-data", "postgres-data", "chroma-data", "backups", "prometheus-data"):
            opts = run.options[("docker:index/volume:Volume", f"rag-{stack}-{name}")]
            assert opts.retain_on_delete is True, name
        config_opts = run.options[("docker:index/volume:Volume", f"rag-{stack}-redis-config")]
        assert not config_opts.retain_on_delete  # generated copies only


def test_fixed_name_containers_are_deleted_before_replacement(
    runs: dict[str, ProgramRun],
) -> None:
    # Names carry the stack and are fixed; create-before-delete would collide.
    for run in runs.values():
        for name in run.containers:
            opts = run.options[("docker:index/container:Container", name)]
            assert opts.delete_before_replace is True, name


def test_cluster_lives_in_a_subdirectory_unless_adopted(runs: dict[str, ProgramRun]) -> None:
    def pgdata(run: ProgramRun, stack: str) -> str:
        envs = run.containers[f"rag-{stack}-postgres"].inputs["envs"]
        return dict(e.split("=", 1) for e in envs)["PGDATA"]

    mount = "/var/lib/postgresql/data"
    # A subdirectory can be swapped by rename during a physical restore.
    assert pgdata(runs["prod"], "prod").startswith(mount + "/")
    adopted = run_program("prod", make_config("prod", adoptVolumes='{"postgres": "old_pg"}'))
    # compose kept the cluster at the volume root: starting elsewhere would hide the data.
    assert pgdata(adopted, "prod") == mount


def test_migration_runs_before_the_api() -> None:
    # When it re-runs (its trigger): tests/program/test_quiet_previews.py.
    first = run_program("prod")
    api_deps = first.options[("docker:index/container:Container", "rag-prod-api")].depends_on
    assert "rag-prod-postgres-migrate" in {d._name for d in api_deps}  # type: ignore[union-attr]
    api = first.containers["rag-prod-api"]
    assert label(api, "personal-rag.postgres-migration") == "ok"


@pytest.mark.parametrize(
    "job",
    ["rag-prod-postgres-migrate", "rag-prod-redis-config-init", "rag-prod-backup-volume-init"],
)
def test_a_failed_one_shot_job_fails_the_deploy(job: str) -> None:
    with pytest.raises(Exception, match=f"{job} exited with code 3"):
        run_program("prod", exit_codes={job: 3})


def test_successful_one_shot_jobs_pass() -> None:
    jobs = ["rag-prod-postgres-migrate", "rag-prod-redis-config-init"]
    run = run_program("prod", exit_codes=dict.fromkeys(jobs, 0))
    assert "rag-prod-api" in run.containers


def test_backend_bridges_have_fixed_distinct_interface_names(runs: dict[str, ProgramRun]) -> None:
    names = {}
    for stack, run in runs.items():
        options = run.networks[f"rag-{stack}-backend"].inputs["options"]
        names[stack] = options["com.docker.network.bridge.name"]
        assert len(names[stack]) <= 15  # Linux interface names
        assert run.exports["backendBridge"][0] == names[stack]
    assert names["staging"] != names["prod"]
    long_stack = run_program(
        "ephemeral-a-very-long-name-1",
        make_config("ephemeral-a-very-long-name-1", portOffset="20000"),
    )
    bridge = long_stack.networks["rag-ephemeral-a-very-long-name-1-backend"].inputs["options"]
    assert len(bridge["com.docker.network.bridge.name"]) <= 15


def test_each_client_gets_its_own_database_role_and_redis_user(
    runs: dict[str, ProgramRun],
) -> None:
    for stack, run in runs.items():
        envs = {
            service: dict(
                e.split("=", 1) for e in run.containers[f"rag-{stack}-{service}"].inputs["envs"]
            )
            for service in ("api", "backup", "postgres-exporter", "postgres")
        }
        roles = {
            "api": envs["api"]["PGUSER"],
            "backup": envs["backup"]["PGUSER"],
            "exporter": envs["postgres-exporter"]["DATA_SOURCE_USER"],
        }
        superuser = envs["postgres"]["POSTGRES_USER"]
        assert len(set(roles.values())) == 3 and superuser not in roles.values(), roles
        assert envs["api"]["DATABASE_URL"].startswith(f"postgresql://{roles['api']}@")
        assert envs["backup"]["REDIS_URL"].startswith(f"rediss://backup@rag-{stack}-redis:")
        assert envs["api"]["REDIS_URL"].startswith(f"rediss://app@rag-{stack}-redis:")


def test_service_ports_are_written_only_where_clients_are_built() -> None:
    """5432/6379 live in components/service_files.py; clients build addresses through
    components/clients.py, so no other component spells them."""
    from pathlib import Path

    components = Path(__file__).resolve().parents[2] / "components"
    spelled = [
        f"{path.name}:{number}"
        for path in sorted(components.glob("*.py"))
        if path.name not in ("service_files.py", "clients.py")
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.search(r"\b(5432|6379)\b", line)
    ]
    assert spelled == []
