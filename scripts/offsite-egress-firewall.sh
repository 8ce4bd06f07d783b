#!/usr/bin/env bash
# Narrow a stack's off-host egress network to its backup target.
#
#   sudo bash scripts/offsite-egress-firewall.sh [--remove] INTERFACE TARGET_IP PORT
#   e.g. sudo bash scripts/offsite-egress-firewall.sh rag-prod-eg 203.0.113.7 23
#
# The backup job's egress network (bridge INTERFACE, e.g. rag-prod-eg; only created when
# offsiteTarget is set) is a plain Docker bridge: it reaches any address. This lets it
# open connections only to TARGET_IP:PORT (tcp) and drops every other connection it
# starts, in Docker's DOCKER-USER chain (forwarded traffic; replies still pass). Name the
# target by IP in offsiteTarget, or resolve it beforehand: DNS is dropped too. To close the
# host itself to the job as well, run scripts/host-firewall.sh INTERFACE. Idempotent;
# rules live until reboot (persist them with your distribution's tool).
set -euo pipefail

usage() { echo "usage: $0 [--remove] INTERFACE TARGET_IP PORT" >&2; exit 2; }
action=insert
if [ "${1:-}" = --remove ]; then action=remove; shift; fi
[ $# -eq 3 ] || usage
interface="$1"; target="$2"; port="$3"
[[ "$interface" =~ ^[A-Za-z0-9._-]{1,15}$ ]] ||
  { echo "offsite-egress-firewall: '$interface' is not an interface name (1-15 of A-Z a-z 0-9 . _ -)" >&2; exit 2; }
[[ "$target" =~ ^[0-9]{1,3}(\.[0-9]{1,3}){3}$ ]] ||
  { echo "offsite-egress-firewall: '$target' is not an IPv4 address" >&2; exit 2; }
if ! [[ "$port" =~ ^[0-9]{1,5}$ ]] || [ "$port" -lt 1 ] || [ "$port" -gt 65535 ]; then
  echo "offsite-egress-firewall: '$port' is not a port (1-65535)" >&2; exit 2
fi
command -v iptables >/dev/null 2>&1 || { echo "offsite-egress-firewall: iptables is not installed" >&2; exit 1; }
iptables -n -L DOCKER-USER >/dev/null 2>&1 || iptables -N DOCKER-USER

allow=(DOCKER-USER -i "$interface" -d "$target" -p tcp --dport "$port" -j ACCEPT)
deny=(DOCKER-USER -i "$interface" -m conntrack --ctstate NEW -j DROP)
if [ "$action" = insert ]; then
  # -I puts a rule first: the drop, then the allow above it.
  iptables -C "${deny[@]}" 2>/dev/null || iptables -I "${deny[@]}"
  iptables -C "${allow[@]}" 2>/dev/null || iptables -I "${allow[@]}"
  echo "offsite-egress-firewall: $interface may open connections to $target:$port only"
else
  while iptables -C "${allow[@]}" 2>/dev/null; do iptables -D "${allow[@]}"; done
  while iptables -C "${deny[@]}" 2>/dev/null; do iptables -D "${deny[@]}"; done
  echo "offsite-egress-firewall: rules for $interface removed"
fi
