# Sourced by scripts/restore-stack.sh: waiting for a started service to be healthy.
# shellcheck shell=bash

passes_own_healthcheck() { # container -> 0 if its declared healthcheck passes now
  # Run as Docker runs it (exec in the container, its user and env): Docker itself runs
  # it only every HEALTH_INTERVAL (5 s), and every second here is a second of downtime.
  local check=()
  mapfile -d '' -t check < <(docker inspect --format '{{range .Config.Healthcheck.Test}}{{.}}{{"\x00"}}{{end}}' "$1")
  [ "${#check[@]}" -gt 0 ] && [ "${check[-1]}" = $'\n' ] && unset 'check[-1]'  # inspect's newline
  case "${check[0]:-}" in
    CMD) timeout 10 docker exec "$1" "${check[@]:1}" >/dev/null 2>&1 ;;
    CMD-SHELL) timeout 10 docker exec "$1" /bin/sh -c "${check[1]}" >/dev/null 2>&1 ;;
    *) return 1 ;;
  esac
}

wait_healthy() { # container -> 0 once healthy (5 min at most); prints the last state
  # Healthy: Docker says so, or, while Docker's first check is still to come
  # ("starting"), the container's own healthcheck passes when run now.
  local state=""
  for _ in $(seq 1 300); do
    state=$(docker inspect --format '{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}' "$1")
    [ "$state" = healthy ] && break
    if [ "$state" = starting ] && passes_own_healthcheck "$1"; then state=healthy; break; fi
    sleep 1
  done
  echo "$state"
  [ "$state" = healthy ]
}
