#!/usr/bin/env bash
# Start one hospital's SuperNode on its own data.
#   bash deploy/supernode.sh --hospital NAME --number K --data-path FILE --state-dir DIR \
#       --ca CA_CERT --key KEY_FILE --roster ROSTER [--superlink HOST:8000] [--port 9094]
#       [--max-epsilon E] [--max-delta D] [--require-dp true|false] [--eval-metrics full|aggregate|none]
#       [--distributed-dp-noise-floor S] [--min-secure-sum N] [--ckks-context FILE]
#       [--text-column C] [--label-column C] [--site-column C] [--split-column C]
#       [--eval-fraction F] [--deid required|allowed] [--max-evaluations N]
#   ... --insecure instead of --ca/--key for local experiments only.
# NAME is for logs; K (0, 1, ...) numbers the hospital in MLflow. DIR keeps what the
# hospital must remember (privacy ledger, privacy-policy.toml); it must survive restarts.
# The --max-*/--require-dp/--eval-metrics/--distributed-dp-noise-floor/--min-secure-sum flags are the hospital's
# privacy policy (node config keys); they add to DIR/privacy-policy.toml, the stricter value
# winning. The server cannot loosen them. The column, --eval-fraction, --deid and
# --max-evaluations flags are the hospital's data mapping and release rules: a server value
# that differs is refused (de-identification is required unless --deid allowed). --ckks-context names the hospitals' shared CKKS key (ckks-secret.ctx from
# deploy/ckks-keys.sh), needed for secure_aggregation=ckks.
# SecAgg+ (secure_aggregation=secagg_plus, also privacy=distributed_dp): the hospital signs its
# round keys with KEY_FILE, its SuperNode key (node config secagg-signing-key, set with --key),
# and accepts the other hospitals' keys only if ROSTER lists them (node config secagg-roster):
# the federation's hospitals' public keys, this one's included, assembled with
# deploy/roster.sh and each fingerprint checked out of band. The roster must hold KEY_FILE's
# public key. Without --key and --roster (e.g. --insecure) the hospital refuses SecAgg+.
set -euo pipefail
cd "$(dirname "$0")/.."
superlink="127.0.0.1:8000"; port=9094; insecure=0; policy=""
while [ $# -gt 0 ]; do
  case "$1" in
    --hospital) hospital="$2"; shift 2;;
    --number) number="$2"; shift 2;;
    --data-path) data="$2"; shift 2;;
    --state-dir) state="$2"; shift 2;;
    --ca) ca="$2"; shift 2;;
    --key) key="$2"; shift 2;;
    --superlink) superlink="$2"; shift 2;;
    --port) port="$2"; shift 2;;
    --max-epsilon) policy+=" max-epsilon=$2"; shift 2;;
    --max-delta) policy+=" max-delta=$2"; shift 2;;
    --require-dp) policy+=" require-dp=$2"; shift 2;;
    --eval-metrics) policy+=" eval-metrics=\"$2\""; shift 2;;
    --distributed-dp-noise-floor) policy+=" distributed-dp-noise-floor=$2"; shift 2;;
    --min-secure-sum) policy+=" min-secure-sum=$2"; shift 2;;
    --text-column|--label-column|--site-column|--split-column|--deid)
      policy+=" ${1#--}=\"$2\""; shift 2;;
    --eval-fraction|--max-evaluations) policy+=" ${1#--}=$2"; shift 2;;
    --ckks-context)
      [ -f "$2" ] || { echo "CKKS key material '$2' not found (make it with deploy/ckks-keys.sh)" >&2; exit 1; }
      policy+=" ckks-context=\"$(realpath "$2")\""; shift 2;;
    --roster)
      [ -f "$2" ] || { echo "SecAgg+ roster '$2' not found (make it with deploy/roster.sh)" >&2; exit 1; }
      roster="$(realpath "$2")"; shift 2;;
    --insecure) insecure=1; shift;;
    *) echo "unknown option $1" >&2; exit 2;;
  esac
done
: "${hospital:?--hospital NAME is required}" "${number:?--number K is required}"
: "${data:?--data-path FILE is required}" "${state:?--state-dir DIR is required}"
[ -e "$data" ] || { echo "hospital $hospital: data path '$data' not found" >&2; exit 1; }
source scripts/env.sh
mkdir -p "$state"
node_config="partition-id=$number data-path=\"$(realpath "$data")\" state-dir=\"$(realpath "$state")\""
node_config+="$policy"
if [ "$insecure" = 1 ]; then
  echo "WARNING: insecure SuperNode: local experiments only" >&2
  security=(--insecure)
else
  : "${ca:?--ca CA_CERT is required (or --insecure)}" "${key:?--key KEY_FILE is required (or --insecure)}"
  security=(--root-certificates "$ca" --auth-supernode-private-key "$key")
  [ -f "$key" ] || { echo "hospital $hospital: key '$key' not found" >&2; exit 1; }
  # The SuperNode key also signs the hospital's SecAgg+ round keys.
  node_config+=" secagg-signing-key=\"$(realpath "$key")\""
fi
if [ -n "${roster:-}" ]; then
  if [ -n "${key:-}" ] && [ "$insecure" != 1 ]; then
    read -r own_type own_key _ <<<"$(ssh-keygen -y -P "" -f "$key")"
    awk -v t="$own_type" -v k="$own_key" '$1 == t && $2 == k { found = 1 } END { exit !found }' \
        "$roster" || {
      echo "hospital $hospital: the roster $roster does not hold the public key of $key" >&2
      exit 1; }
  fi
  node_config+=" secagg-roster=\"$roster\""
fi
export FLWR_HOME="${FLWR_HOME:-$state/flwr-home}"
exec flower-supernode "${security[@]}" --superlink "$superlink" --port "$port" \
  --node-config "$node_config"
