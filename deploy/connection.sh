#!/usr/bin/env bash
# Add (or replace) a named SuperLink connection in $FLWR_HOME/config.toml for `flwr run . NAME`.
#   bash deploy/connection.sh NAME ADDRESS CA_CERT            # TLS (default)
#   bash deploy/connection.sh NAME ADDRESS --insecure         # local experiments only
set -euo pipefail
name="${1:?usage: connection.sh NAME HOST:PORT CA_CERT|--insecure}"
address="${2:?usage: connection.sh NAME HOST:PORT CA_CERT|--insecure}"
ca="${3:?usage: connection.sh NAME HOST:PORT CA_CERT|--insecure}"
home="${FLWR_HOME:-$HOME/.flwr}"; mkdir -p "$home"
config="$home/config.toml"; touch "$config"
if [ "$ca" = "--insecure" ]; then
  body="address = \"$address\"\ninsecure = true"
else
  [ -f "$ca" ] || { echo "CA certificate '$ca' not found" >&2; exit 1; }
  body="address = \"$address\"\nroot-certificates = \"$(cd "$(dirname "$ca")" && pwd)/$(basename "$ca")\""
fi
python3 - "$config" "$name" "$body" <<'PY'
import re, sys
path, name, body = sys.argv[1], sys.argv[2], sys.argv[3].replace("\\n", "\n")
text = open(path).read()
# Drop an existing [superlink.NAME] table (up to the next table header).
text = re.sub(rf"(?ms)^\[superlink\.{re.escape(name)}\]\n.*?(?=^\[|\Z)", "", text)
if "[superlink]" not in text:
    text = '[superlink]\ndefault = "local"\n\n' + text
text = text.rstrip("\n") + f"\n\n[superlink.{name}]\n{body}\n"
open(path, "w").write(text)
PY
echo "$config: [superlink.$name] -> $address"
