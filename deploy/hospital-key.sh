#!/usr/bin/env bash
# Make a hospital's SuperNode key pair (ECDSA P-384; Flower rejects ed25519).
#   bash deploy/hospital-key.sh KEY_DIR HOSPITAL
# The private key KEY_DIR/HOSPITAL never leaves the hospital; the coordinator registers
# KEY_DIR/HOSPITAL.pub (deploy/register.sh).
set -euo pipefail
dir="${1:?usage: hospital-key.sh KEY_DIR HOSPITAL}"; name="${2:?usage: hospital-key.sh KEY_DIR HOSPITAL}"
[[ "$name" =~ ^[A-Za-z0-9_.-]+$ ]] || { echo "hospital name '$name': use letters, digits, . _ -" >&2; exit 2; }
mkdir -p "$dir"
if [ -e "$dir/$name" ]; then echo "$dir/$name exists; not overwritten" >&2; exit 1; fi
ssh-keygen -q -t ecdsa -b 384 -N "" -C "$name" -f "$dir/$name"
echo "$dir/$name (private, stays at the hospital), $dir/$name.pub (register it)"
