#!/usr/bin/env bash
# "The VPS is gone": on a new host where `pulumi up` recreated the stack with the same
# offsiteTarget and credentials, pull a backup from the off-host copy into the stack's
# backups volume (checked against its manifest before it appears there), then restore it
# with restore-stack.sh (verify first, all-or-nothing). docs/disaster_recovery.md.
#
#   bash scripts/offsite-restore.sh STACK [--id BACKUP_ID] [restore-stack.sh options...]
# --id: a backup id from `offsite list` (default: the newest verified off-host copy this
# host did not make itself: the new stack's scheduler may already have copied a backup of
# its empty stores off-host).
# Other options (--key-volume VOLUME, --logical, --components LIST, --yes) go to
# restore-stack.sh; the pulled backup is always restored by its id, never "latest" (the
# new stack may already hold a backup of its empty stores).
# RAG_NAME_PREFIX (default rag-) is the prefix of the stack's container and volume names,
# as for restore-stack.sh.
set -euo pipefail

usage() { echo "usage: $0 STACK [--id BACKUP_ID] [--key-volume VOLUME] [--logical] [--components LIST] [--yes]" >&2; exit 2; }
[ $# -ge 1 ] || usage
stack="$1"; shift
backup_id=latest; restore_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --id) backup_id="${2:?}"; shift 2 ;;
    --key-volume|--components) restore_args+=("$1" "${2:?}"); shift 2 ;;
    --logical|--yes) restore_args+=("$1"); shift ;;
    *) usage ;;
  esac
done
[[ "$stack" =~ ^(prod|staging|ephemeral-[a-z0-9-]+)$ ]] || { echo "offsite-restore: unknown stack '$stack'" >&2; exit 2; }
[[ "$backup_id" =~ ^(latest|[0-9]{8}T[0-9]{6}Z(-[0-9]+)?)$ ]] || { echo "offsite-restore: --id '$backup_id' is not a backup id (e.g. 20261124T030000Z)" >&2; exit 2; }

prefix="${RAG_NAME_PREFIX:-rag-}"
[[ "$prefix" =~ ^[a-z0-9][a-z0-9-]*-$ ]] || { echo "offsite-restore: RAG_NAME_PREFIX '$prefix' must be lowercase letters, digits and dashes ending in '-'" >&2; exit 2; }

# The stack's backup job has the target's settings, its credentials (files) and the only
# egress; the pull runs there, as the job's user, into its backups volume.
job="$prefix$stack-backup"
echo "offsite-restore: off-host copies of $stack:" >&2
docker exec "$job" python3 -m rag_backup offsite list >&2
pulled=$(docker exec "$job" python3 -m rag_backup offsite pull "$backup_id" | tail -n 1)
[[ "$pulled" =~ ^[0-9]{8}T[0-9]{6}Z(-[0-9]+)?$ ]] || { echo "offsite-restore: pull did not name a backup" >&2; exit 1; }
echo "offsite-restore: pulled $pulled; restoring it" >&2
exec bash "$(dirname "$0")/restore-stack.sh" "$stack" --id "$pulled" "${restore_args[@]}"
