#!/usr/bin/env bash
# One command from a fresh Debian/Ubuntu machine to a running stack on the local Docker
# engine, with Pulumi's local state backend (no account):
#   bash scripts/up.sh staging        (or prod)
# Installs what is missing (Docker, the Pulumi CLI via its official installer, a venv),
# asks for the settings a stack cannot run without, then runs `pulumi up`.
set -euo pipefail
cd "$(dirname "$0")/.."
stack="${1:-staging}"
case "$stack" in
  staging | prod | ephemeral-*) ;;
  *) echo "up.sh: unknown stack '$stack'; expected staging, prod or ephemeral-<suffix>" >&2; exit 2 ;;
esac

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

if ! command -v docker >/dev/null 2>&1; then
  echo "up.sh: installing Docker (docker.io)"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq docker.io >/dev/null
fi
if ! docker info >/dev/null 2>&1; then
  "${sudo_cmd[@]}" systemctl start docker 2>/dev/null || { "${sudo_cmd[@]}" dockerd >/var/log/dockerd.log 2>&1 & sleep 5; }
fi
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
if [ "$(current image)" = "ghcr.io/example/rag_personal" ]; then
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
