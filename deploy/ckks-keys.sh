#!/usr/bin/env bash
# Make the CKKS key material for encrypted aggregation (once per federation).
#   bash deploy/ckks-keys.sh OUT_DIR [--poly-modulus-degree 8192] [--scale-bits 40]
# OUT_DIR/ckks-secret.ctx goes to every hospital (node config ckks-context=<path>) and never
# to the coordinator; OUT_DIR/ckks-public.ctx goes to the coordinator. Existing files are
# not overwritten: hospitals holding the old key could no longer take part.
set -euo pipefail
out="${1:?usage: ckks-keys.sh OUT_DIR [--poly-modulus-degree N] [--scale-bits B]}"; shift
# Absolute, since the module runs from the repository root; 0700 as it will hold the secret.
(umask 077; mkdir -p "$out"); out="$(cd "$out" && pwd)"
cd "$(dirname "$0")/.."
python=.venv/bin/python; [ -x "$python" ] || python=python3
exec "$python" -m clinical_fl.secure_aggregation.ckks_keys "$out" "$@"
