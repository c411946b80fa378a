#!/bin/sh
# Configure Vault/OpenBao for keybroker, exactly as `keybroker vault bootstrap` does
# (it runs that command): the Transit key (aes256-gcm96), the KV v2 mount, the
# keybroker-broker and keybroker-operator policies (the text of deploy/vault/*.hcl)
# and the AppRole role "keybroker". Safe to run again: every step is idempotent.
#
# Usage:
#   VAULT_ADDR=https://vault:8200 VAULT_TOKEN=<admin token> deploy/bootstrap.sh [CREDS_DIR]
#
# With CREDS_DIR it also issues a new AppRole secret_id and writes CREDS_DIR/role_id
# and CREDS_DIR/secret_id (mode 0600) for the broker's KEYBROKER_VAULT_ROLE_ID and
# KEYBROKER_VAULT_SECRET_ID_FILE. Mounts, key prefix and Transit key follow the
# broker's settings (KEYBROKER_CONFIG or KEYBROKER_VAULT_*). KEYBROKER names the CLI
# to run (default: `keybroker` on PATH).
set -eu

keybroker=${KEYBROKER:-keybroker}

if [ -z "${KEYBROKER_VAULT_ADDR:-}${VAULT_ADDR:-}" ]; then
  echo "bootstrap.sh: set VAULT_ADDR (or KEYBROKER_VAULT_ADDR)" >&2
  exit 2
fi
if [ -z "${KEYBROKER_VAULT_TOKEN:-}${VAULT_TOKEN:-}" ]; then
  echo "bootstrap.sh: set VAULT_TOKEN to a token that may manage mounts, policies and auth" >&2
  exit 2
fi
if [ $# -gt 1 ]; then
  echo "usage: bootstrap.sh [CREDS_DIR]" >&2
  exit 2
fi

if [ $# -eq 0 ]; then
  exec "$keybroker" vault bootstrap
fi

dir=$1
umask 077
mkdir -p "$dir"
# --approle-out writes only a new file (never an existing one, never through a symlink).
tmp=$(mktemp -d "$dir/.approle.XXXXXX")
json="$tmp/approle.json"
trap 'rm -rf "$tmp" "$dir/.role_id.new" "$dir/.secret_id.new"' EXIT
"$keybroker" vault bootstrap --approle-out "$json"

# The file is {"role_id": "...", "secret_id": "..."}: UUIDs, no escaping to undo.
role_id=$(sed -n 's/.*"role_id": *"\([^"]*\)".*/\1/p' "$json")
secret_id=$(sed -n 's/.*"secret_id": *"\([^"]*\)".*/\1/p' "$json")
if [ -z "$role_id" ] || [ -z "$secret_id" ]; then
  echo "bootstrap.sh: no role_id/secret_id in the bootstrap output" >&2
  exit 1
fi
# No trailing newline: `kubectl create secret --from-file` passes the bytes on unchanged.
printf '%s' "$role_id" >"$dir/.role_id.new"
printf '%s' "$secret_id" >"$dir/.secret_id.new"
mv "$dir/.role_id.new" "$dir/role_id"
mv "$dir/.secret_id.new" "$dir/secret_id"
echo "wrote $dir/role_id and $dir/secret_id (AppRole credentials of the broker; keep them secret)"
