#!/usr/bin/env bash
# Make a certificate authority and the SuperLink's TLS certificate.
#   bash deploy/certs.sh CERT_DIR [HOSTNAME_OR_IP ...]
# 127.0.0.1 and localhost are always in the certificate: the SuperLink's own SuperExec
# connects to 127.0.0.1 even when it listens on 0.0.0.0. Add the coordinator's public
# name or IP for hospitals on other machines. Keep ca.key offline; hospitals get ca.crt only.
set -euo pipefail
out="${1:?usage: certs.sh CERT_DIR [HOSTNAME_OR_IP ...]}"; shift
mkdir -p "$out"; cd "$out"
san="DNS:localhost,IP:127.0.0.1"
for host in "$@"; do
  if [[ "$host" =~ ^[0-9.]+$ || "$host" == *:* ]]; then san+=",IP:$host"; else san+=",DNS:$host"; fi
done
if [ ! -f ca.key ]; then
  openssl req -x509 -newkey rsa:4096 -sha256 -days 825 -nodes -keyout ca.key -out ca.crt \
    -subj "/CN=clinical-fl coordinator CA" 2>/dev/null
fi
openssl req -newkey rsa:4096 -nodes -keyout superlink.key -out superlink.csr \
  -subj "/CN=clinical-fl superlink" 2>/dev/null
printf 'subjectAltName=%s\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' \
  "$san" > superlink.ext
openssl x509 -req -in superlink.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 825 -sha256 \
  -out superlink.pem -extfile superlink.ext 2>/dev/null
rm -f superlink.csr superlink.ext
chmod 600 ca.key superlink.key
echo "$out: ca.crt (give to hospitals), superlink.pem + superlink.key (SuperLink only), ca.key (keep offline)"
echo "SuperLink certificate names: $san"
