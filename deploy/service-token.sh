#!/usr/bin/env bash
# Add a bearer token for one client of the prediction service (clinical-fl-serve).
#   bash deploy/service-token.sh TOKEN_FILE
# The service reads TOKEN_FILE (--token-file); give each client its own line, and remove a
# line to revoke that client. Prints the new token for the client.
set -euo pipefail
file="${1:?usage: service-token.sh TOKEN_FILE}"
umask 077
token="$(openssl rand -hex 32)"
echo "$token" >> "$file"
echo "$token"
