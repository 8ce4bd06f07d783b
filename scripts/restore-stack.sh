#!/usr/bin/env bash
# Restore a deployed stack from its backups (or another stack's), then bring it back.
#
#   bash scripts/restore-stack.sh STACK [--from SOURCE_STACK] [--id BACKUP_ID] [--logical]
#                                       [--key-volume VOLUME] [--components LIST] [--yes]
# --components: e.g. postgres or redis,chroma (default: every store in the backup).
# --key-volume: a volume holding secrets/backup_passphrase, for backups made under another
# key (a host rebuilt from nothing, docs/disaster_recovery.md).
#
# PostgreSQL comes back from the physical base backup (copy speed; PostgreSQL is stopped
# and its cluster directory swapped) when the cluster lives in a subdirectory of its
# volume, else — or with --logical — from the logical dump into the running server.
#
# Order, so that nothing is lost: (1) verify the backup while everything still runs;
# (2) stop the api, the backup scheduler and Redis; (3) rag-backup restore in a one-off
# container with the stack's volumes — it stages and checks everything beside the live
# data before swapping and keeps the previous data for rollback; (4) give the files back
# to the services' users; (5) start Redis, the api, the scheduler; wait until healthy.
# --from prod restores prod's newest backup into staging (tests a release on real data):
# prod's backups and key are mounted read-only; no network is shared between stacks.
set -euo pipefail

usage() { echo "usage: $0 STACK [--from SOURCE_STACK] [--id BACKUP_ID] [--logical] [--key-volume VOLUME] [--components LIST] [--yes]" >&2; exit 2; }
[ $# -ge 1 ] || usage
stack="$1"; shift
source_stack="$stack"; backup_id=""; assume_yes=""; force_logical=""; key_volume=""; components=()
while [ $# -gt 0 ]; do
  case "$1" in
    --from) source_stack="${2:?}"; shift 2 ;;
    --id) backup_id="${2:?}"; shift 2 ;;
    --yes) assume_yes=1; shift ;;
    --logical) force_logical=1; shift ;;
    --key-volume) key_volume="${2:?}"; shift 2 ;;
    --components) components=(--components "${2:?}"); shift 2 ;;
    *) usage ;;
  esac
done
for s in "$stack" "$source_stack"; do
  [[ "$s" =~ ^(prod|staging|ephemeral-[a-z0-9-]+)$ ]] || { echo "restore-stack: unknown stack '$s'" >&2; exit 2; }
done
if [ "$stack" = prod ] && [ "$source_stack" != prod ]; then
  echo "restore-stack: refusing to restore $source_stack's data into prod" >&2; exit 2
fi

n() { echo "rag-$1-$2"; }
image=$(docker inspect --format '{{.Config.Image}}' "$(n "$stack" backup)")
chroma_volume=$(docker inspect --format '{{range .Mounts}}{{if eq .Destination "/workspace/data/chroma"}}{{.Name}}{{end}}{{end}}' "$(n "$stack" api)")
redis_volume=$(docker inspect --format '{{range .Mounts}}{{if eq .Destination "/data"}}{{.Name}}{{end}}{{end}}' "$(n "$stack" redis)")
backups_source=$(docker inspect --format '{{range .Mounts}}{{if eq .Destination "/backups"}}{{if .Name}}{{.Name}}{{else}}{{.Source}}{{end}}{{end}}{{end}}' "$(n "$source_stack" backup)")
pg_mount=/var/lib/postgresql/data
postgres_volume=$(docker inspect --format "{{range .Mounts}}{{if eq .Destination \"$pg_mount\"}}{{.Name}}{{end}}{{end}}" "$(n "$stack" postgres)")
pgdata=$(docker inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$(n "$stack" postgres)" | sed -n 's/^PGDATA=//p')
pg_mode=logical
if [ -z "$force_logical" ] && [ "${pgdata#"$pg_mount"/}" != "$pgdata" ]; then
  pg_mode=physical
fi
# The job's environment holds settings and file paths only (secrets are files).
mapfile -t job_env < <(docker inspect --format '{{range .Config.Env}}{{println .}}{{end}}' "$(n "$stack" backup)" | grep -E '^(PG|REDIS_|CHROMA_DIR|BACKUP_DIR|RAG_BACKUP_)' | grep -v -E '^(RAG_BACKUP_KEY_FILE|PGDATA)=' || true)
env_args=()
for e in "${job_env[@]}"; do env_args+=(--env "$e"); done

# One-off container, hardened like the services; $1 = user, rest = rag-backup arguments.
run_job() {
  local user="$1"; shift
  local caps=(--cap-drop ALL) extra=()
  [ "$user" = "0:0" ] && caps+=(--cap-add CHOWN --cap-add DAC_OVERRIDE --cap-add FOWNER)
  [ "$pg_mode" = physical ] && extra+=(--mount "type=volume,source=$postgres_volume,target=/pg")
  docker run --rm --name "$(n "$stack" restore)" --network "$(n "$stack" backend)" \
    --user "$user" "${caps[@]}" --security-opt no-new-privileges:true --read-only \
    --tmpfs /tmp:rw,nosuid,size=64m --memory 2g \
    --mount "type=volume,source=$(n "$stack" backup-config),target=/etc/rag,readonly" \
    --mount "type=volume,source=${key_volume:-$(n "$source_stack" backup-config)},target=/source-keys,readonly" \
    --mount "type=$( [[ "$backups_source" = /* ]] && echo bind || echo volume ),source=$backups_source,target=/backups,readonly" \
    --mount "type=volume,source=$(n "$stack" backup-scratch),target=/scratch" \
    --mount "type=volume,source=$chroma_volume,target=/workspace/data/chroma" \
    --mount "type=volume,source=$redis_volume,target=/redis-data" "${extra[@]}" \
    "${env_args[@]}" --env RAG_BACKUP_KEY_FILE=/source-keys/secrets/backup_passphrase \
    --env REDIS_DATA_DIR=/redis-data --entrypoint python3 "$image" -m rag_backup "$@"
}

echo "restore-stack: verifying ${backup_id:-the newest} backup of $source_stack"
run_job "$(docker inspect --format '{{.Config.User}}' "$(n "$stack" backup)")" verify ${backup_id:+"$backup_id"}

if [ -z "$assume_yes" ]; then
  read -r -p "Replace $stack's PostgreSQL, Redis and Chroma data with it? Type the stack name: " answer
  [ "$answer" = "$stack" ] || { echo "restore-stack: not confirmed; nothing changed" >&2; exit 1; }
fi

owner_of() { # volume path-in-container -> uid:gid
  docker run --rm --cap-drop ALL --network none --mount "type=volume,source=$1,target=/v,readonly" \
    --entrypoint stat "$image" -c '%u:%g' /v
}
redis_owner=$(owner_of "$redis_volume")
chroma_owner=$(owner_of "$chroma_volume")

stop=("$(n "$stack" api)" "$(n "$stack" backup)" "$(n "$stack" redis)")
pg_args=(--pg-mode "$pg_mode")
if [ "$pg_mode" = physical ]; then
  stop+=("$(n "$stack" postgres)")
  pg_args+=(--pg-data-dir "/pg/${pgdata#"$pg_mount"/}")
fi
echo "restore-stack: stopping ${stop[*]} (PostgreSQL restore: $pg_mode)"
docker stop "${stop[@]}" >/dev/null

echo "restore-stack: restoring"
if ! run_job 0:0 restore ${backup_id:+"$backup_id"} "${components[@]}" --yes --staging-dir /scratch "${pg_args[@]}" \
  --redis-data-dir /redis-data --redis-server-cmd redis-server; then
  # rag-backup swaps nothing it has not fully checked: the live data is as it was.
  echo "restore-stack: restore failed; the previous data is in place, starting the services again" >&2
  for container in "${stop[@]}"; do docker start "$container" >/dev/null || true; done
  exit 1
fi
docker run --rm --network none --user 0:0 --cap-drop ALL --cap-add CHOWN \
  --mount "type=volume,source=$redis_volume,target=/redis-data" \
  --mount "type=volume,source=$chroma_volume,target=/chroma" \
  --entrypoint sh "$image" -c "chown -R $redis_owner /redis-data && chown -R $chroma_owner /chroma"

services=(redis api backup)
[ "$pg_mode" = physical ] && services=(postgres "${services[@]}")
echo "restore-stack: starting ${services[*]}"
for service in "${services[@]}"; do docker start "$(n "$stack" "$service")" >/dev/null; done
for service in "${services[@]}"; do
  for _ in $(seq 1 60); do
    state=$(docker inspect --format '{{.State.Health.Status}}' "$(n "$stack" "$service")")
    [ "$state" = healthy ] && break
    sleep 5
  done
  [ "$state" = healthy ] || { echo "restore-stack: $(n "$stack" "$service") is $state; see docs/disaster_recovery.md (rollback)" >&2; exit 1; }
done
echo "restore-stack: $stack restored from $source_stack and healthy"
