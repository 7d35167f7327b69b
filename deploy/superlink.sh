#!/usr/bin/env bash
# Start the coordinator's SuperLink: TLS + SuperNode authentication, persistent state,
# no per-run dependency installation.
#   bash deploy/superlink.sh STATE_DIR CERT_DIR [--host 0.0.0.0] [--port 8000]
#   bash deploy/superlink.sh STATE_DIR --insecure [...]       # local experiments only
# Runs in the foreground; stop it with Ctrl-C or `kill <pid>`.
set -euo pipefail
cd "$(dirname "$0")/.."
state="${1:?usage: superlink.sh STATE_DIR CERT_DIR|--insecure [--host H] [--port P]}"
certs="${2:?usage: superlink.sh STATE_DIR CERT_DIR|--insecure [--host H] [--port P]}"; shift 2
source scripts/env.sh
mkdir -p "$state"
if [ "$certs" = "--insecure" ]; then
  echo "WARNING: insecure SuperLink (no TLS, no SuperNode authentication): local experiments only" >&2
  security=(--insecure)
else
  for f in ca.crt superlink.pem superlink.key; do
    [ -f "$certs/$f" ] || { echo "$certs/$f missing; run deploy/certs.sh $certs" >&2; exit 1; }
  done
  security=(--ssl-ca-certfile "$certs/ca.crt" --ssl-certfile "$certs/superlink.pem"
            --ssl-keyfile "$certs/superlink.key" --enable-supernode-auth)
fi
exec flower-superlink "${security[@]}" --database "$state/superlink.db" \
  --disable-runtime-dependency-installation "$@"
