#!/usr/bin/env bash
# Assemble the federation's SecAgg+ roster from the hospitals' public keys.
#   bash deploy/roster.sh [--force] OUT_FILE KEY.pub [KEY.pub ...]
# KEY.pub are the hospitals' SuperNode keys (deploy/hospital-key.sh), one per hospital, every
# hospital's own included. OUT_FILE gets one OpenSSH line per key ("TYPE KEY NAME", the name
# being the key's comment, or the file name when it has none); every hospital gets a copy and
# names it with `deploy/supernode.sh --roster OUT_FILE`. An existing OUT_FILE is not
# overwritten unless --force. A file that is not one ECDSA or Ed25519 OpenSSH public key line
# is refused, and so are two files with the same key or the same name.
#
# The roster is the trust anchor of SecAgg+: a hospital accepts round keys and signatures only
# from the keys it lists. A roster that the server alone assembled and that nobody checked
# would let a malicious server add keys of its own and play hospitals. So the script prints
# each key's SHA256 fingerprint; every hospital compares its copy's fingerprints
# (`ssh-keygen -lf ROSTER`) with the ones the other hospitals give it out of band (phone, a
# signed letter, a meeting), its own included, before it starts its SuperNode with it.
set -euo pipefail
usage="usage: roster.sh [--force] OUT_FILE KEY.pub [KEY.pub ...]"
force=0; args=()
for arg in "$@"; do
  case "$arg" in
    --force) force=1;;
    -*) echo "unknown option $arg ($usage)" >&2; exit 2;;
    *) args+=("$arg");;
  esac
done
[ "${#args[@]}" -ge 2 ] || { echo "$usage" >&2; exit 2; }
out="${args[0]}"; pubs=("${args[@]:1}")
if [ -e "$out" ] && [ "$force" != 1 ]; then
  echo "$out exists; not overwritten (--force replaces it)" >&2; exit 1
fi
lines=(); declare -A seen_key=() seen_name=()
for pub in "${pubs[@]}"; do
  [ -f "$pub" ] || { echo "$pub: not found" >&2; exit 1; }
  # Exactly one key line; blank lines and # comments aside. A private key, an
  # authorized_keys line with options or a file of several keys is refused.
  keylines=()
  while IFS= read -r line || [ -n "$line" ]; do
    line="${line%$'\r'}"
    [[ "$line" =~ ^[[:space:]]*(#|$) ]] || keylines+=("$line")
  done < "$pub"
  if [[ "${keylines[0]:-}" == -----BEGIN* ]]; then
    echo "$pub: a private key; the roster takes the public half ($pub.pub)" >&2; exit 1
  fi
  [ "${#keylines[@]}" -eq 1 ] || {
    echo "$pub: not an OpenSSH public key file (${#keylines[@]} key lines, need 1)" >&2; exit 1; }
  read -r type blob name <<<"${keylines[0]}"
  case "$type" in
    ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521|ssh-ed25519) ;;
    *) echo "$pub: not an ECDSA or Ed25519 OpenSSH public key (starts '${type:0:30}'); the" \
            "roster holds SuperNode keys (deploy/hospital-key.sh)" >&2; exit 1;;
  esac
  if [[ ! "$blob" =~ ^[A-Za-z0-9+/]+=*$ ]] ||
     ! ssh-keygen -E sha256 -lf - <<<"$type $blob" >/dev/null 2>&1; then
    echo "$pub: not a valid OpenSSH public key" >&2; exit 1
  fi
  name="${name:-$(basename "$pub" .pub)}"
  [ -z "${seen_key[$blob]:-}" ] || {
    echo "$pub: the same key as ${seen_key[$blob]}; one key per hospital" >&2; exit 1; }
  [ -z "${seen_name[$name]:-}" ] || {
    echo "$pub: named '$name' like ${seen_name[$name]}; give each hospital its own name" >&2
    exit 1; }
  seen_key[$blob]="$pub"; seen_name[$name]="$pub"
  lines+=("$type $blob $name")
done
# Written beside OUT_FILE and renamed: a SuperNode reading the roster never sees half of it.
mkdir -p "$(dirname "$out")"
tmp="$(mktemp "$(dirname "$out")/.roster.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
{
  echo "# SecAgg+ roster: ${#lines[@]} hospital keys, made $(date -u +%FT%TZ) by deploy/roster.sh."
  echo "# Check every fingerprint (ssh-keygen -lf THIS_FILE) with its hospital out of band."
  printf '%s\n' "${lines[@]}"
} > "$tmp"
chmod 644 "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
echo "$out: ${#lines[@]} hospital keys. Fingerprints (each hospital checks them out of band):"
ssh-keygen -E sha256 -lf "$out"
