#!/usr/bin/env bash
# Restore a deployed stack from its backups (or another stack's), then bring it back.
#
#   bash scripts/restore-stack.sh STACK [--from SOURCE_STACK] [--id BACKUP_ID] [--logical]
#                                       [--key-volume VOLUME] [--components LIST] [--yes]
#                                       [--target-time ISO-TIME | --target latest]
# --components: e.g. postgres or redis,chroma (default: every store in the backup).
# --target-time 2026-11-30T16:59:00Z (a zone is required) / --target latest: point-in-time
# recovery of PostgreSQL: the newest base backup that ended before the time, plus the WAL
# the backup job archives every minute, replayed up to the time (latest: to the end of the
# archive). Resolved and range-checked before anything stops: a time the archive does not
# reach exits 2 with the archived ranges, nothing stopped. PostgreSQL only by default:
# Redis and Chroma have no log to replay, so they could only go back to the base backup's
# own time — hours before the target, losing what was written since in stores a bad
# migration did not touch. --components postgres,redis,chroma adds them from that same
# base backup, with a warning. Implies the physical mode: not with --logical or --from.
# --key-volume: a volume holding secrets/backup_passphrase, for backups made under another
# key (a host rebuilt from nothing, docs/disaster_recovery.md).
# --backups-subdir NAME: restore from the store in the backups volume's folder NAME (its own
# backup folders and wal/) instead of the volume's top: offsite-pitr, where
# offsite-restore.sh --target-time pulls a lost host's base backup and WAL.
#
# PostgreSQL comes back from the physical base backup (copy speed; PostgreSQL is stopped
# and its cluster directory swapped) when the cluster lives in a subdirectory of its
# volume, else — or with --logical — from the logical dump into the running server.
#
# Order, so that nothing is lost: (1) resolve the backup once (what "latest" means now)
# and verify exactly that one while everything still runs; (2) stop the api, the backup
# scheduler and Redis; (3) rag-backup restore of that id in a one-off container with the
# stack's volumes — all-or-nothing: it checks and stages every store beside the live data
# before the first swap and undoes its swaps if one fails; (4) give the files back to the
# services' users; (5) start what was stopped — PostgreSQL first, then the stack's own
# migration job (this stack's roles and passwords, not the backup's) — and wait until
# healthy. If any step after the stop fails, everything stopped is started again, each
# service's state is printed and the exit code is 1.
# The backups are mounted read-only; what verify/restore must write (verification record,
# lock, staging) goes to the stack's scratch volume (rag-backup --state-dir).
# --from prod restores prod's backup into staging (tests a release on real data): prod's
# backups read-only and prod's backup passphrase — only that file, copied into a throwaway
# volume — reach staging's job; no network or other secret of prod is shared.
# RAG_NAME_PREFIX (default rag-) is the prefix of the stack's container and volume names.
set -euo pipefail

usage() { echo "usage: $0 STACK [--from SOURCE_STACK] [--id BACKUP_ID] [--logical] [--key-volume VOLUME] [--components LIST] [--yes] [--target-time ISO-TIME | --target latest] [--backups-subdir NAME]" >&2; exit 2; }
[ $# -ge 1 ] || usage
stack="$1"; shift
source_stack="$stack"; backup_id=""; assume_yes=""; force_logical=""; key_volume=""; components=()
target=(); backups_subdir=""
while [ $# -gt 0 ]; do
  case "$1" in
    --from) source_stack="${2:?}"; shift 2 ;;
    --id) backup_id="${2:?}"; shift 2 ;;
    --yes) assume_yes=1; shift ;;
    --logical) force_logical=1; shift ;;
    --key-volume) key_volume="${2:?}"; shift 2 ;;
    --backups-subdir) backups_subdir="${2:?}"; shift 2 ;;
    --components) components=(--components "${2:?}"); components[1]="${components[1]// /}"; shift 2 ;;
    --target-time) target=(--target-time "${2:?}"); shift 2 ;;
    --target)
      [ "${2:-}" = latest ] || { echo "restore-stack: --target '${2:-}': expected latest (or --target-time ISO-TIME)" >&2; exit 2; }
      target=(--target latest); shift 2 ;;
    *) usage ;;
  esac
done
for s in "$stack" "$source_stack"; do
  [[ "$s" =~ ^(prod|staging|ephemeral-[a-z0-9-]+)$ ]] || { echo "restore-stack: unknown stack '$s'" >&2; exit 2; }
done
if [ "$stack" = prod ] && [ "$source_stack" != prod ]; then
  echo "restore-stack: refusing to restore $source_stack's data into prod" >&2; exit 2
fi
if [ ${#target[@]} -gt 0 ]; then
  # A point in time exists only in the WAL of the stack's own cluster, replayed physically.
  [ -z "$force_logical" ] || { echo "restore-stack: ${target[0]} is a physical point-in-time recovery; it cannot be combined with --logical" >&2; exit 2; }
  [ "$source_stack" = "$stack" ] || { echo "restore-stack: ${target[0]} recovers $stack's own PostgreSQL from its own WAL archive; it cannot be combined with --from $source_stack" >&2; exit 2; }
  [ ${#components[@]} -gt 0 ] || components=(--components postgres)
  case ",${components[1]}," in
    *,postgres,*) ;;
    *) echo "restore-stack: ${target[0]} needs postgres in --components (got '${components[1]}')" >&2; exit 2 ;;
  esac
fi
# One folder name, never a path: the store stays inside the stack's backups volume.
[ -z "$backups_subdir" ] || [[ "$backups_subdir" =~ ^[a-z0-9][a-z0-9-]*$ ]] || { echo "restore-stack: --backups-subdir '$backups_subdir': expected one folder name of lowercase letters, digits and dashes (e.g. offsite-pitr)" >&2; exit 2; }
prefix="${RAG_NAME_PREFIX:-rag-}"
[[ "$prefix" =~ ^[a-z0-9][a-z0-9-]*-$ ]] || { echo "restore-stack: RAG_NAME_PREFIX '$prefix' must be lowercase letters, digits and dashes ending in '-'" >&2; exit 2; }

n() { echo "$prefix$1-$2"; }
mount_of() { # container destination -> the volume name (or a bind's host path)
  docker inspect --format "{{range .Mounts}}{{if eq .Destination \"$2\"}}{{if .Name}}{{.Name}}{{else}}{{.Source}}{{end}}{{end}}{{end}}" "$1"
}
mount_type() { [[ "$1" = /* ]] && echo bind || echo volume; }
backup_container=$(n "$stack" backup)
image=$(docker inspect --format '{{.Config.Image}}' "$backup_container")
job_user=$(docker inspect --format '{{.Config.User}}' "$backup_container")
chroma_volume=$(mount_of "$(n "$stack" api)" /workspace/data/chroma)
redis_volume=$(mount_of "$(n "$stack" redis)" /data)
backups_source=$(mount_of "$(n "$source_stack" backup)" /backups)
textfile_volume=$(mount_of "$backup_container" /textfile)
pg_mount=/var/lib/postgresql/data
postgres_volume=$(mount_of "$(n "$stack" postgres)" "$pg_mount")
pgdata=$(docker inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$(n "$stack" postgres)" | sed -n 's/^PGDATA=//p')
pg_mode=logical
if [ -z "$force_logical" ] && [ "${pgdata#"$pg_mount"/}" != "$pgdata" ]; then
  pg_mode=physical
fi
if [ ${#target[@]} -gt 0 ] && [ "$pg_mode" != physical ]; then
  echo "restore-stack: ${target[0]} needs the physical mode: $stack's PGDATA ($pgdata) must be a subdirectory of $pg_mount" >&2; exit 2
fi
# The job's environment holds settings and file paths only (secrets are files).
mapfile -t job_env < <(docker inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$backup_container" | grep -E '^(PG|REDIS_|CHROMA_DIR|BACKUP_DIR|RAG_BACKUP_)' | grep -v -E '^(RAG_BACKUP_KEY_FILE|RAG_BACKUP_STATE_DIR|PGDATA)=' || true)
env_args=()
for e in "${job_env[@]}"; do
  if [ -n "$backups_subdir" ] && [[ "$e" == BACKUP_DIR=* ]]; then continue; fi
  env_args+=(--env "$e")
done
# run_job mounts the backups at /backups; the store is that folder inside.
[ -z "$backups_subdir" ] || env_args+=(--env "BACKUP_DIR=/backups/$backups_subdir")

# The passphrase: the stack's own (in its config volume), the operator's --key-volume, or
# for --from only the source stack's passphrase file, copied into a throwaway volume.
key_mount=(); key_file=/etc/rag/secrets/backup_passphrase; key_only_volume=""
cleanup() { [ -z "$key_only_volume" ] || docker volume rm -f "$key_only_volume" >/dev/null || true; }
trap cleanup EXIT
if [ -n "$key_volume" ]; then
  key_mount=(--mount "type=volume,source=$key_volume,target=/source-keys,readonly")
  key_file=/source-keys/secrets/backup_passphrase
elif [ "$source_stack" != "$stack" ]; then
  key_only_volume="$(n "$stack" restore-key)-$$"
  docker volume create "$key_only_volume" >/dev/null
  docker run --rm --network none --user 0:0 --cap-drop ALL --cap-add CHOWN --cap-add DAC_OVERRIDE \
    --cap-add FOWNER --security-opt no-new-privileges:true --read-only \
    --mount "type=volume,source=$(n "$source_stack" backup-config),target=/from,readonly" \
    --mount "type=volume,source=$key_only_volume,target=/to" \
    --entrypoint sh "$image" -c 'set -e; mkdir /to/secrets; cp /from/secrets/backup_passphrase /to/secrets/
      chown -R "$1" /to/secrets; chmod 0400 /to/secrets/backup_passphrase; chmod 0500 /to/secrets' sh "$job_user"
  key_mount=(--mount "type=volume,source=$key_only_volume,target=/source-keys,readonly")
  key_file=/source-keys/secrets/backup_passphrase
fi

# One-off container, hardened like the services; $1 = user, rest = rag-backup arguments.
run_job() {
  local user="$1"; shift
  local caps=(--cap-drop ALL) extra=()
  # Root only for the swap: owners kept (CHOWN, FOWNER, DAC_OVERRIDE); the staged copies
  # extracted and checked as their owners (SETUID, SETGID: rag-backup runs tar and a
  # private PostgreSQL as them; KILL: it stops that server).
  [ "$user" = "0:0" ] && caps+=(--cap-add CHOWN --cap-add DAC_OVERRIDE --cap-add FOWNER --cap-add SETUID --cap-add SETGID --cap-add KILL)
  [ "$pg_mode" = physical ] && extra+=(--mount "type=volume,source=$postgres_volume,target=/pg")
  docker run --rm --name "$(n "$stack" restore)" --network "$(n "$stack" backend)" \
    --user "$user" "${caps[@]}" --security-opt no-new-privileges:true --read-only \
    --tmpfs /tmp:rw,nosuid,size=64m --memory 2g \
    --mount "type=volume,source=$(n "$stack" backup-config),target=/etc/rag,readonly" \
    "${key_mount[@]}" \
    --mount "type=$(mount_type "$backups_source"),source=$backups_source,target=/backups,readonly" \
    --mount "type=volume,source=$(n "$stack" backup-scratch),target=/scratch" \
    --mount "type=$(mount_type "$textfile_volume"),source=$textfile_volume,target=/textfile" \
    --mount "type=volume,source=$chroma_volume,target=/workspace/data/chroma" \
    --mount "type=volume,source=$redis_volume,target=/redis-data" "${extra[@]}" \
    "${env_args[@]}" --env "RAG_BACKUP_KEY_FILE=$key_file" \
    --env RAG_BACKUP_STATE_DIR=/scratch/restore-state \
    --env REDIS_DATA_DIR=/redis-data --entrypoint python3 "$image" -m rag_backup "$@"
}

# "latest" is resolved once: the backup verified and confirmed is the one restored. With a
# target, resolve also checks the WAL archive reaches it from that backup (exit 2 if not).
resolve_code=0
resolved=$(run_job "$job_user" resolve "${backup_id:-latest}" "${target[@]}") || resolve_code=$?
if [ "$resolve_code" != 0 ]; then
  echo "restore-stack: no backup to restore (rag-backup resolve said why, above); nothing was stopped or changed" >&2
  [ "$resolve_code" = 2 ] && exit 2
  exit 1
fi
[[ "$resolved" =~ ^[0-9A-Za-z_-]+$ ]] || { echo "restore-stack: rag-backup resolve gave '$resolved'" >&2; exit 1; }
echo "restore-stack: verifying backup $resolved of $source_stack"
run_job "$job_user" verify "$resolved"

what="PostgreSQL, Redis and Chroma data"
[ ${#components[@]} -eq 0 ] || what="${components[1]} data"
if [ ${#target[@]} -gt 0 ]; then
  when="${target[1]}"; [ "$when" = latest ] && when="the end of the WAL archive"
  what="$what with base backup $resolved recovered to $when"
  case ",${components[1]}," in
    *,redis,*|*,chroma,*) echo "restore-stack: warning: Redis and Chroma have no log to replay: they come back as of base backup $resolved itself, not $when; what was written to them since is replaced" >&2 ;;
  esac
else
  what="$what with backup $resolved of $source_stack"
fi
if [ -z "$assume_yes" ]; then
  read -r -p "Replace $stack's $what? Type the stack name: " answer
  [ "$answer" = "$stack" ] || { echo "restore-stack: not confirmed; nothing changed" >&2; exit 1; }
fi

owner_of() { # volume -> uid:gid of its root
  docker run --rm --cap-drop ALL --network none --mount "type=volume,source=$1,target=/v,readonly" \
    --entrypoint stat "$image" -c '%u:%g' /v
}
redis_owner=$(owner_of "$redis_volume")
chroma_owner=$(owner_of "$chroma_volume")

restores() { # store -> whether this restore replaces it (no --components: every store)
  case ",${components[1]:-postgres,redis,chroma}," in *,"$1",*) return 0 ;; esac
  return 1
}
stop=("$(n "$stack" api)" "$backup_container")
restores redis && stop+=("$(n "$stack" redis)")  # else Redis keeps running
pg_args=(--pg-mode "$pg_mode")
if [ "$pg_mode" = physical ]; then
  stop+=("$(n "$stack" postgres)")
  pg_args+=(--pg-data-dir "/pg/${pgdata#"$pg_mount"/}")
fi
start_order=()  # dependencies first: the stores, then the api and the scheduler
[ "$pg_mode" = physical ] && start_order+=("$(n "$stack" postgres)")
start_order+=("$(n "$stack" redis)" "$(n "$stack" api)" "$backup_container")

report_states() {
  local container
  echo "restore-stack: service states:" >&2
  for container in "${start_order[@]}"; do
    echo "  $container: $(docker inspect --format '{{.State.Status}}{{if .State.Health}} ({{.State.Health.Status}}){{end}}' "$container" 2>&1)" >&2
  done
}
bring_back() { # $1 = what went wrong; start everything stopped, say where things are, exit 1
  local container
  echo "restore-stack: $1; starting the stopped services again" >&2
  for container in "${start_order[@]}"; do
    docker start "$container" >/dev/null || echo "restore-stack: could not start $container" >&2
  done
  report_states
  exit 1
}

echo "restore-stack: stopping ${stop[*]} (PostgreSQL restore: $pg_mode)"
docker stop "${stop[@]}" >/dev/null || bring_back "stopping the services failed"

echo "restore-stack: restoring backup $resolved"
if ! run_job 0:0 restore "$resolved" "${components[@]}" "${target[@]}" --yes --staging-dir /scratch \
  "${pg_args[@]}" --redis-data-dir /redis-data --redis-server-cmd redis-server; then
  # rag-backup is all-or-nothing: it swapped nothing, or undid its swaps (its output says).
  bring_back "restore of $resolved failed (rag-backup's output above says what it left)"
fi
give_back=true  # the restored files to their services' users (Redis, Chroma; not a running one)
restores redis && give_back="$give_back && chown -R $redis_owner /redis-data"
restores chroma && give_back="$give_back && chown -R $chroma_owner /chroma"
docker run --rm --network none --user 0:0 --cap-drop ALL --cap-add CHOWN --cap-add DAC_READ_SEARCH \
  --mount "type=volume,source=$redis_volume,target=/redis-data" \
  --mount "type=volume,source=$chroma_volume,target=/chroma" \
  --entrypoint sh "$image" -c "$give_back" \
  || bring_back "giving the restored files back to their owners failed (the data is restored)"

# shellcheck source=scripts/lib/wait-healthy.sh
source "$(dirname "$0")/lib/wait-healthy.sh"

echo "restore-stack: starting ${start_order[*]}"
postgres_container=$(n "$stack" postgres)
migrate_container=$(n "$stack" postgres-migrate)
for container in "${start_order[@]}"; do
  docker start "$container" >/dev/null || bring_back "starting $container failed (the data is restored)"
  if [ "$container" = "$postgres_container" ]; then
    # The restored cluster has the roles and passwords of the time (and stack) it was
    # backed up from: the stack's own migration job, which every deploy runs, makes them
    # this stack's again before any client connects.
    state=$(wait_healthy "$postgres_container") || bring_back "$postgres_container is $state after the restore (the data is restored)"
    if docker inspect "$migrate_container" >/dev/null 2>&1; then
      code=$(docker start --attach "$migrate_container" >&2; docker inspect --format '{{.State.ExitCode}}' "$migrate_container")
      [ "$code" = 0 ] || bring_back "$migrate_container exited $code (the data is restored; roles not updated)"
    fi
  fi
done
for container in "${start_order[@]}"; do
  state=$(wait_healthy "$container") || bring_back "$container is $state after the restore; see docs/disaster_recovery.md (rollback)"
done
echo "restore-stack: $stack restored from $source_stack's backup $resolved${target[1]:+ (PostgreSQL to ${target[1]})} and healthy"
