"""Which off-host copy `offsite pull` takes by default on a rebuilt host, against a real
sshd: the new host's scheduler has already backed up its empty stores and copied that
off-host before the operator runs scripts/offsite-restore.sh (found on the engine,
tests/stack/test_offsite_restore.py). "latest" must mean the lost host's newest copy."""

from __future__ import annotations

import shutil
import time

import pytest

from tests.backup.conftest import Stack
from tests.backup.helpers import run_cli
from tests.offsite.conftest import Target
from tests.offsite.test_offsite_sftp import _backup, _offsite

pytestmark = pytest.mark.integration


def test_latest_is_the_lost_hosts_newest_copy_not_the_new_hosts_own(
    stack: Stack, sftp_target: Target
) -> None:
    last_good = _backup(stack)
    assert _offsite(stack, sftp_target, "push").returncode == 0
    time.sleep(1.1)  # a distinct backup id
    shutil.rmtree(stack.backup_dir / last_good)  # the new host does not have it
    first_on_new_host = _backup(stack)  # the new scheduler's, of its empty stores
    assert _offsite(stack, sftp_target, "push").returncode == 0

    pulled = _offsite(stack, sftp_target, "pull")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == last_good
    assert f"passing over {first_on_new_host}" in pulled.stderr
    assert (stack.backup_dir / last_good / "manifest.json").is_file()

    # A retried restore pulls the same copy again: it is already here, checked.
    again = _offsite(stack, sftp_target, "pull")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == last_good
    assert "downloading" not in again.stderr
    listing = run_cli(["list"], stack.env)
    assert listing.returncode == 0, listing.stderr
    assert last_good in listing.stdout and first_on_new_host in listing.stdout


def test_latest_refuses_when_every_copy_was_made_on_this_host(
    stack: Stack, sftp_target: Target
) -> None:
    backup_id = _backup(stack)
    assert _offsite(stack, sftp_target, "push").returncode == 0
    pulled = _offsite(stack, sftp_target, "pull")
    assert pulled.returncode == 1
    assert f"was made on this host and is in {stack.backup_dir}" in pulled.stderr
    # By id it is still refused as before: the folder is this host's own.
    by_id = _offsite(stack, sftp_target, "pull", backup_id)
    assert by_id.returncode == 1
    assert "already exists" in by_id.stderr
