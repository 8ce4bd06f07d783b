#!/usr/bin/env bash
# "The VPS is gone": on a new host where `pulumi up` recreated the stack with the same
# offsiteTarget and credentials, pull a backup from the off-host copy into the stack's
# backups volume (checked against its manifest before it appears there), then restore it
# with restore-stack.sh (verify first, all-or-nothing). docs/disaster_recovery.md.
#
#   bash scripts/offsite-restore.sh STACK [--id BACKUP_ID] [--target-time ISO-TIME | --target latest]
#                                         [restore-stack.sh options...]
# --id: a backup id from `offsite list` (default: the newest verified off-host copy this
# host did not make itself: the new stack's scheduler may already have copied a backup of
# its empty stores off-host).
# --target-time 2026-11-30T16:59:00Z (a zone is required) / --target latest: point-in-time
# recovery of PostgreSQL from the off-host copy ("the last good moment was 16:59"). The
# time is resolved against the off-host copies first (`rag-backup offsite pull
# --target-time`): the newest verified off-host base backup this host did not make that
# ended before it and whose off-host WAL reaches it (--id: that one); a time outside what
# is off-host exits 2 with the off-host ranges, nothing pulled or stopped. Then that base
# backup and only the WAL up to the first archive cycle at or after the time (latest: all of
# it) are pulled, each checked, into the backups volume's folder offsite-pitr
# (/backups/offsite-pitr/<ID>/ and /backups/offsite-pitr/wal/): a store of its own, never
# the stack's own backups or WAL archive (/backups/wal holds the new cluster's WAL under the
# same segment names); nothing there is overwritten (what is there is used again when
# identical, a difference is refused). restore-stack.sh --backups-subdir offsite-pitr
# --target-time then resolves and range-checks it again there, verifies and restores
# (PostgreSQL only unless --components says more).
# Other options (--key-volume VOLUME, --logical, --components LIST, --yes) go to
# restore-stack.sh; the pulled backup is always restored by its id, never "latest" (the
# new stack may already hold a backup of its empty stores).
# RAG_NAME_PREFIX (default rag-) is the prefix of the stack's container and volume names,
# as for restore-stack.sh.
set -euo pipefail

usage() { echo "usage: $0 STACK [--id BACKUP_ID] [--target-time ISO-TIME | --target latest] [--key-volume VOLUME] [--logical] [--components LIST] [--yes]" >&2; exit 2; }
[ $# -ge 1 ] || usage
stack="$1"; shift
backup_id=latest; restore_args=(); target=(); force_logical=""
while [ $# -gt 0 ]; do
  case "$1" in
    --id) backup_id="${2:?}"; shift 2 ;;
    --key-volume|--components) restore_args+=("$1" "${2:?}"); shift 2 ;;
    --logical) force_logical=1; restore_args+=("$1"); shift ;;
    --yes) restore_args+=("$1"); shift ;;
    --target-time) target=(--target-time "${2:?}"); shift 2 ;;
    --target)
      [ "${2:-}" = latest ] || { echo "offsite-restore: --target '${2:-}': expected latest (or --target-time ISO-TIME)" >&2; exit 2; }
      target=(--target latest); shift 2 ;;
    *) usage ;;
  esac
done
[[ "$stack" =~ ^(prod|staging|ephemeral-[a-z0-9-]+)$ ]] || { echo "offsite-restore: unknown stack '$stack'" >&2; exit 2; }
[[ "$backup_id" =~ ^(latest|[0-9]{8}T[0-9]{6}Z(-[0-9]+)?)$ ]] || { echo "offsite-restore: --id '$backup_id' is not a backup id (e.g. 20261124T030000Z)" >&2; exit 2; }
if [ ${#target[@]} -gt 0 ] && [ -n "$force_logical" ]; then
  echo "offsite-restore: ${target[0]} is a physical point-in-time recovery; it cannot be combined with --logical" >&2; exit 2
fi

prefix="${RAG_NAME_PREFIX:-rag-}"
[[ "$prefix" =~ ^[a-z0-9][a-z0-9-]*-$ ]] || { echo "offsite-restore: RAG_NAME_PREFIX '$prefix' must be lowercase letters, digits and dashes ending in '-'" >&2; exit 2; }

# The stack's backup job has the target's settings, its credentials (files) and the only
# egress; the pull runs there, as the job's user, into its backups volume.
job="$prefix$stack-backup"
# rag_backup.offsite_pitr.PULL_DIR: where a point-in-time pull lands inside /backups.
pitr_dir=offsite-pitr
echo "offsite-restore: off-host copies of $stack:" >&2
docker exec "$job" python3 -m rag_backup offsite list >&2
pull=(offsite pull "$backup_id")
[ ${#target[@]} -eq 0 ] || pull+=("${target[@]}")
pull_code=0
pulled=$(docker exec "$job" python3 -m rag_backup "${pull[@]}" | tail -n 1) || pull_code=$?
if [ "$pull_code" != 0 ]; then
  echo "offsite-restore: nothing to restore (rag-backup offsite pull said why, above); nothing was stopped or changed" >&2
  [ "$pull_code" = 2 ] && exit 2
  exit 1
fi
[[ "$pulled" =~ ^[0-9]{8}T[0-9]{6}Z(-[0-9]+)?$ ]] || { echo "offsite-restore: pull did not name a backup" >&2; exit 1; }
if [ ${#target[@]} -gt 0 ]; then
  echo "offsite-restore: pulled $pulled and its WAL into /backups/$pitr_dir; recovering it to ${target[1]}" >&2
  exec bash "$(dirname "$0")/restore-stack.sh" "$stack" --backups-subdir "$pitr_dir" --id "$pulled" "${target[@]}" "${restore_args[@]}"
fi
echo "offsite-restore: pulled $pulled; restoring it" >&2
exec bash "$(dirname "$0")/restore-stack.sh" "$stack" --id "$pulled" "${restore_args[@]}"
