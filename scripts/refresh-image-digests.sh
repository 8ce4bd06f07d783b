#!/usr/bin/env bash
# Look up the current digest of every image in components/images.py.
#
#   bash scripts/refresh-image-digests.sh          # print: key  repository:tag  digest
#   bash scripts/refresh-image-digests.sh --check  # exit 1 if a committed digest differs
#
# Needs a registry: run it on a machine with internet (not the offline test machine) and
# either `docker buildx` or `crane`. It prints the multi-arch index digest (what
# `docker pull repository:tag` resolves); paste the new digests into
# components/images.py in one commit, then deploy staging first. It never edits the
# table itself: a digest change is reviewed like any other change.
set -euo pipefail

check=false
if [ "${1:-}" = --check ]; then check=true; shift; fi
[ $# -eq 0 ] || { echo "usage: $0 [--check]" >&2; exit 2; }

cd "$(dirname "$0")/.."

digest_of() {
  local ref=$1
  if command -v crane >/dev/null 2>&1; then
    crane digest "$ref"
  elif docker buildx version >/dev/null 2>&1; then
    docker buildx imagetools inspect --format '{{json .Manifest}}' "$ref" |
      python3 -c 'import json, sys; print(json.load(sys.stdin)["digest"])'
  else
    echo "refresh-image-digests: needs crane or docker buildx" >&2
    return 2
  fi
}

table=$(python3 -m components.images)
changed=0
while IFS=$'\t' read -r key ref committed; do
  if ! current=$(digest_of "$ref"); then
    echo "refresh-image-digests: cannot read the digest of $ref (no registry access?)" >&2
    exit 1
  fi
  [[ "$current" =~ ^sha256:[0-9a-f]{64}$ ]] ||
    { echo "refresh-image-digests: $ref: unexpected digest '$current'" >&2; exit 1; }
  printf '%s\t%s\t%s\n' "$key" "$ref" "$current"
  if [ "$current" != "$committed" ]; then
    echo "refresh-image-digests: $key: committed ${committed}, registry ${current}" >&2
    changed=1
  fi
done <<< "$table"

if $check && [ "$changed" -ne 0 ]; then exit 1; fi
