#!/usr/bin/env bash
# Has the Docker host drifted from the program (someone ran `docker rm`, changed a
# container by hand, a volume vanished)? For one stack:
#
#   bash scripts/drift-check.sh STACK
#
# Runs `pulumi preview --refresh --expect-no-changes --diff` with the policy pack: a
# preview reads the host and the state, it never changes either. Exit 0: no drift.
# Exit 1: drift -- the diff is printed and, under GitHub Actions, written to the job
# summary. Any other failure (login, SSH, a policy violation): exit 2, output in the
# summary too, so a broken check is never mistaken for a clean host.
set -euo pipefail

usage() { echo "usage: $0 STACK" >&2; exit 2; }
[ $# -eq 1 ] || usage
stack=$1
[[ "$stack" =~ ^(prod|staging|ephemeral-[a-z0-9][a-z0-9-]{0,30})$ ]] ||
  { echo "drift-check: unknown stack '$stack'; expected prod, staging or ephemeral-<suffix>" >&2; exit 2; }

cd "$(dirname "$0")/.."
summary=${GITHUB_STEP_SUMMARY:-/dev/null}
output=$(mktemp)
trap 'rm -f "$output"' EXIT

status=0
pulumi preview --stack "$stack" --refresh --expect-no-changes --diff \
  --non-interactive --color never --policy-pack policy >"$output" 2>&1 || status=$?
cat "$output"

if [ "$status" -eq 0 ]; then
  echo "### $stack: no drift" >> "$summary"
  exit 0
fi
# --expect-no-changes turns "the preview has changes" into an error with this message;
# anything else is a failure of the check itself.
if grep -Eq "no changes were expected( for [^ ]+)? but changes were proposed" "$output"; then
  {
    echo "### Drift on $stack"
    echo
    echo "The host differs from what the program declares. Review the diff; then either"
    echo "\`pulumi up --stack $stack\` (restore the declared state) or change the program."
    echo
    echo '```diff'
    cat "$output"
    echo '```'
  } >> "$summary"
  echo "drift-check: $stack drifted from the program" >&2
  exit 1
fi
{
  echo "### $stack: the drift check itself failed (exit $status)"
  echo
  echo '```'
  cat "$output"
  echo '```'
} >> "$summary"
echo "drift-check: the preview of $stack failed (exit $status); this is not a drift result" >&2
exit 2
