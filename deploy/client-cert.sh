#!/usr/bin/env bash
# A client certificate for the prediction service's --client-ca mode, signed by the CA that
# deploy/certs.sh made (run it where ca.key is).
#   bash deploy/client-cert.sh CERT_DIR CLIENT_NAME
# Writes CERT_DIR/clients/CLIENT_NAME.pem and .key: give both to that client
# (clinical-fl-predict --client-cert PEM KEY). The service checks the signature only; to revoke
# one client, make a new CA or use tokens, which revoke per line.
set -euo pipefail
dir="${1:?usage: client-cert.sh CERT_DIR CLIENT_NAME}"; name="${2:?usage: client-cert.sh CERT_DIR CLIENT_NAME}"
[[ "$name" =~ ^[A-Za-z0-9._-]+$ ]] || { echo "CLIENT_NAME: letters, digits, . _ - only" >&2; exit 2; }
[ -f "$dir/ca.key" ] || { echo "$dir/ca.key not found: make the CA with deploy/certs.sh first" >&2; exit 2; }
mkdir -p "$dir/clients"; cd "$dir"
umask 077
openssl req -newkey rsa:2048 -nodes -keyout "clients/$name.key" -out "clients/$name.csr" \
  -subj "/CN=$name" 2>/dev/null
printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth\n' \
  > "clients/$name.ext"
openssl x509 -req -in "clients/$name.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 \
  -sha256 -out "clients/$name.pem" -extfile "clients/$name.ext" 2>/dev/null
rm -f "clients/$name.csr" "clients/$name.ext"
echo "$dir/clients/$name.pem + $name.key: give both to the client"
