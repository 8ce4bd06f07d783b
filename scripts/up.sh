#!/usr/bin/env bash
# One command from a fresh Debian/Ubuntu machine to a running stack on the local Docker
# engine, with Pulumi's local state backend (no account):
#   bash scripts/up.sh staging --demo (no app image of your own yet: the demo app)
#   bash scripts/up.sh staging        (or prod; your app image)
# Installs what is missing (Docker, the Pulumi CLI via its official installer, a venv),
# asks for the settings a stack cannot run without, then runs `pulumi up`.
# --demo builds the small demo app (tests/engine/app: the app's port, paths and env
# contract) on this Docker host and deploys it by its digest (config localImageId), so
# the whole stack comes up with no image of one's own.
set -euo pipefail
cd "$(dirname "$0")/.."
stack="${1:-staging}"
case "$stack" in
  staging | prod | ephemeral-*) ;;
  *) echo "up.sh: unknown stack '$stack'; expected staging, prod or ephemeral-<suffix>" >&2; exit 2 ;;
esac
demo=""
case "${2:-}" in
  "") ;;
  --demo) demo=1 ;;
  *) echo "up.sh: unknown option '$2'; expected --demo or nothing" >&2; exit 2 ;;
esac

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
# docker itself: directly when this user may reach the engine, else through sudo.
sudo_docker=()

if ! command -v docker >/dev/null 2>&1; then
  echo "up.sh: installing Docker (docker.io)"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq docker.io >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  # Without systemd: dockerd in the background, its log written by root (the redirect
  # runs inside the privileged shell, not as the calling user).
  "${sudo_cmd[@]}" systemctl start docker 2>/dev/null ||
    "${sudo_cmd[@]}" sh -c 'nohup dockerd >>/var/log/dockerd.log 2>&1 &'
  for _ in $(seq 1 30); do "${sudo_cmd[@]}" docker info >/dev/null 2>&1 && break; sleep 1; done
  "${sudo_cmd[@]}" docker info >/dev/null 2>&1 || { echo "up.sh: the Docker engine did not start (see /var/log/dockerd.log)" >&2; exit 1; }
fi
docker info >/dev/null 2>&1 || sudo_docker=("${sudo_cmd[@]}")
for pkg in python3-venv git curl; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" ||
    { "${sudo_cmd[@]}" apt-get update -qq && "${sudo_cmd[@]}" apt-get install -y -qq "$pkg" >/dev/null; }
done

export PATH="$HOME/.pulumi/bin:$PATH"
if ! command -v pulumi >/dev/null 2>&1; then
  echo "up.sh: installing the Pulumi CLI (official installer)"
  curl -fsSL https://get.pulumi.com | sh
fi

if [ ! -x venv/bin/python ]; then python3 -m venv venv; fi
venv/bin/pip install -q --disable-pip-version-check -r requirements.txt

# Local stacks encrypt their secrets with a passphrase kept in a file (0600), never in
# the environment of other processes or on a command line. Back this file up offline.
passphrase_file="${PULUMI_CONFIG_PASSPHRASE_FILE:-$HOME/.config/personal-rag/pulumi-passphrase}"
if [ ! -s "$passphrase_file" ]; then
  mkdir -p "$(dirname "$passphrase_file")"
  (umask 077 && head -c 32 /dev/urandom | base64 > "$passphrase_file")
  echo "up.sh: created $passphrase_file — back it up: it decrypts this machine's stack secrets"
fi
export PULUMI_CONFIG_PASSPHRASE_FILE="$passphrase_file"

pulumi stack select --create "$stack" --secrets-provider passphrase

ask() { # ask KEY PROMPT [secret]
  local value
  if [ ! -t 0 ]; then
    echo "up.sh: personal-rag:$1 is not set for stack $stack; run: pulumi config set ${3:+--secret }$1 <value> --stack $stack" >&2
    exit 2
  fi
  if [ -n "${3:-}" ]; then read -r -s -p "$2: " value; echo; else read -r -p "$2: " value; fi
  # The value goes through stdin, never the command line.
  printf '%s' "$value" | pulumi config set ${3:+--secret} "$1" --stack "$stack"
}
current() { pulumi config get "$1" --stack "$stack" 2>/dev/null || true; }

[ -n "$(current smtpPassword)" ] || ask smtpPassword "SMTP password for $(current smtpUsername)" secret
if [ -n "$demo" ]; then
  echo "up.sh: building the demo app (tests/engine/app) on the local Docker engine"
  image_id=$("${sudo_docker[@]}" docker build -q tests/engine/app)
  [[ "$image_id" =~ ^sha256:[0-9a-f]{64}$ ]] || { echo "up.sh: docker build gave '$image_id'" >&2; exit 1; }
  pulumi config set localImageId "$image_id" --stack "$stack"
elif [ "$(current image)" = "ghcr.io/example/rag_personal" ] && [ -z "$(current localImageId)" ]; then
  ask image "Your app image repository (e.g. ghcr.io/you/rag_personal)"
  ask imageTag "Tag to deploy (a git SHA)"
fi

# pulumi up applies the host firewall (scripts/host-firewall.sh) as root through
# `sudo -n`; ask for the password once now rather than fail in the middle of the update.
if [ "$(current hostFirewall)" != external ] && [ "$(id -u)" -ne 0 ] && ! sudo -n true 2>/dev/null; then
  echo "up.sh: pulumi up closes the host to the backend network with iptables (sudo)"
  sudo -v
fi

pulumi up --stack "$stack"
