#!/usr/bin/env bash
# Register a hospital's public key with the SuperLink (coordinator side).
#   bash deploy/register.sh KEY.pub CONNECTION [HOSPITAL_NAME]
# `flwr supernode list` shows node ids only, so each registration is also noted as
# "name<TAB>node id<TAB>UTC time" in $HOSPITAL_REGISTRY (default deploy-state/hospitals.tsv):
# that is where the coordinator finds the node id to revoke a hospital
# (flwr supernode unregister NODE_ID CONNECTION).
set -euo pipefail
cd "$(dirname "$0")/.."
pub="${1:?usage: register.sh KEY.pub CONNECTION [NAME]}"; conn="${2:?usage: register.sh KEY.pub CONNECTION [NAME]}"
name="${3:-$(basename "$pub" .pub)}"
registry="${HOSPITAL_REGISTRY:-deploy-state/hospitals.tsv}"
source scripts/env.sh
status=0
output="$(flwr supernode register "$pub" "$conn" --name "$name")" || status=$?
echo "$output"  # flwr's own message, also when it failed
node_id="$(grep -oE 'SuperNode [0-9]+ registered' <<<"$output" | grep -oE '[0-9]+' || true)"
if [ "$status" -ne 0 ] || [ -z "$node_id" ]; then
  echo "register.sh: $pub was not registered (see the message above)" >&2
  exit 1
fi
mkdir -p "$(dirname "$registry")"
printf '%s\t%s\t%s\n' "$name" "$node_id" "$(date -u +%FT%TZ)" >> "$registry"
echo "noted in $registry: $name -> $node_id"
