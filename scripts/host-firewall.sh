#!/usr/bin/env bash
# Close the Docker host itself to the stacks' backend networks.
#
#   sudo bash scripts/host-firewall.sh [--remove] rag-prod-be rag-staging-be
#
# Docker's internal networks stop forwarding (no egress beyond the host), but a backend
# container can still open connections to services listening on the host (sshd, a host
# exporter, ...) through its bridge. This drops NEW connections arriving from the named
# bridge interfaces (stack output `backendBridge`); replies to connections the host opens
# still pass. Idempotent. Rules live until reboot: persist them with your distribution's
# tool (e.g. iptables-persistent: `netfilter-persistent save`).
set -euo pipefail

usage() { echo "usage: $0 [--remove] INTERFACE..." >&2; exit 2; }
action=insert
if [ "${1:-}" = --remove ]; then action=remove; shift; fi
[ $# -ge 1 ] || usage

tools=()
for tool in iptables ip6tables; do
  command -v "$tool" >/dev/null 2>&1 && tools+=("$tool")
done
[ ${#tools[@]} -gt 0 ] || { echo "host-firewall: iptables is not installed" >&2; exit 1; }

for interface in "$@"; do
  [[ "$interface" =~ ^[A-Za-z0-9._-]{1,15}$ ]] ||
    { echo "host-firewall: '$interface' is not an interface name (1-15 of A-Z a-z 0-9 . _ -)" >&2; exit 2; }
  rule=(INPUT -i "$interface" -m conntrack --ctstate NEW -j DROP)
  for tool in "${tools[@]}"; do
    if [ "$action" = insert ]; then
      "$tool" -C "${rule[@]}" 2>/dev/null || "$tool" -I "${rule[@]}"
    else
      while "$tool" -C "${rule[@]}" 2>/dev/null; do "$tool" -D "${rule[@]}"; done
    fi
  done
  if [ "$action" = insert ]; then
    echo "host-firewall: new connections from $interface to this host are dropped"
  else
    echo "host-firewall: rule for $interface removed"
  fi
done
