#!/usr/bin/env bash
# Register a hospital's public key with the SuperLink (coordinator side).
#   bash deploy/register.sh KEY.pub CONNECTION [HOSPITAL_NAME]
# List and revoke:  flwr supernode list CONNECTION;  flwr supernode unregister NODE_ID CONNECTION
set -euo pipefail
cd "$(dirname "$0")/.."
pub="${1:?usage: register.sh KEY.pub CONNECTION [NAME]}"; conn="${2:?usage: register.sh KEY.pub CONNECTION [NAME]}"
name="${3:-$(basename "$pub" .pub)}"
source scripts/env.sh
flwr supernode register "$pub" "$conn" --name "$name"
