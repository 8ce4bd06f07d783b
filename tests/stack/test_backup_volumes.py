"""The backup job's volumes on a real engine (issue 11's defect): Docker copies an image
directory's owner onto an EMPTY named volume when a container first mounts it, so the
backup image's mount points decide who owns /backups, /scratch and /textfile -- after the
volume-init job's chown. The job, as declared, must own them and run."""

from __future__ import annotations

import pytest

from tests.stack.apply import IMAGE, StackApplier
from tests.stack.conftest import stack_run

pytestmark = pytest.mark.stack


def test_the_backup_job_owns_its_fresh_volumes_and_keeps_running(
    fresh_applier: StackApplier,
) -> None:
    run = stack_run("staging")
    backup = run.containers["rag-staging-backup"].inputs
    # The directories the volume-init job hands to the job (Chroma's is the api's).
    handed_over = {
        m["target"] for m in run.containers["rag-staging-backup-volume-init"].inputs["mounts"]
    }
    # The job alone (its config-init, the volume-init job, the job): no PostgreSQL or
    # Redis, so the scheduler's catch-up backup fails, but it must write its state.
    applied = fresh_applier.apply(
        run, only=lambda r: r.inputs["name"].startswith("rag-staging-backup")
    )
    name = applied.containers["rag-staging-backup"]
    docker = fresh_applier.docker
    container = docker.inspect("container", name)
    logs = fresh_applier.logs(name)
    assert container["State"]["Running"] and container["RestartCount"] == 0, logs
    assert "PermissionError" not in logs, logs
    owners = {
        mount["target"]: docker.run("exec", name, "stat", "-c", "%u:%g", mount["target"])
        for mount in backup["mounts"]
        if mount["type"] == "volume" and mount["target"] in handed_over
    }
    assert owners and set(owners.values()) == {backup["user"]}, owners
    listing = docker.run("exec", name, "ls", "-A", "/textfile")
    assert listing.strip(), "the scheduler wrote nothing into its textfile volume"


def _in_backup_image(applier: StackApplier, code: str) -> None:
    """Runs ``code`` with the declared backup image's own Python; it must exit 0."""
    run = stack_run("staging")
    declared = run.containers["rag-staging-backup"].inputs["image"]
    (build,) = [i for i in run.of_type(IMAGE) if i.inputs["imageName"] == declared]
    image = applier.images.declared_build(build.inputs)
    done = applier.docker.call(
        "run", "--rm", "--network", "none", "--entrypoint", "python3", image, "-c", code,
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def test_the_backup_image_imports_every_module_from_its_bytecode(
    fresh_applier: StackApplier,
) -> None:
    """The job runs with PYTHONDONTWRITEBYTECODE on a read-only root: without bytecode
    built into the image every rag-backup call compiles its modules again."""
    _in_backup_image(
        fresh_applier,
        "import importlib.util, pathlib, sys\n"
        "missing = [str(p) for p in pathlib.Path('/opt/rag-backup/rag_backup').glob('*.py')\n"
        "           if not pathlib.Path(importlib.util.cache_from_source(str(p))).is_file()]\n"
        "print(missing); sys.exit(1 if missing else 0)\n",
    )


def test_the_backup_image_decrypts_in_process(fresh_applier: StackApplier) -> None:
    """The restore's in-process decryption needs libgcrypt and libzstd (gnupg's and zstd's
    libraries) loadable by the image's own Python; without them every restore silently
    takes the slower gpg and zstd processes."""
    _in_backup_image(
        fresh_applier,
        "import sys\nfrom rag_backup import clibs\nsys.exit(0 if clibs.available() else 1)\n",
    )
