#!/bin/sh
# A local CA and the certificates of the compose stack (openssl only; not for production:
# on Kubernetes cert-manager or your PKI issues them, see docs/deployment.md).
#
# Usage: gen-certs.sh DIR [BROKER_UID]
#
# Writes, once (an existing DIR/ca.crt is kept, so clients keep trusting the stack):
#   ca.crt                 the CA clients and the broker trust (ca.key is deleted after use)
#   broker.crt broker.key  the broker's server certificate (serverAuth and clientAuth, so the
#                          health check can present it when client certificates are required)
#   vault.crt vault.key    OpenBao's TLS listener
#   client.crt client.key  a demo client certificate, CN "demo-client" (for the mTLS variant)
# Certificates name localhost and 127.0.0.1 besides the compose service names. With
# BROKER_UID (run as root) broker.key and client.key are handed to that user.
set -eu

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
  echo "usage: gen-certs.sh DIR [BROKER_UID]" >&2
  exit 2
fi
dir=$1
owner=${2:-}
command -v openssl >/dev/null || { echo "gen-certs.sh: openssl not found" >&2; exit 2; }
mkdir -p "$dir"
if [ -f "$dir/ca.crt" ]; then
  echo "gen-certs.sh: $dir/ca.crt exists; keeping the certificates there"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
umask 077

openssl req -x509 -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 -days 825 \
  -subj "/CN=keybroker local CA" -keyout "$work/ca.key" -out "$work/ca.crt" \
  -addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
  -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null

# issue NAME CN SAN USAGE
issue() {
  openssl req -new -nodes -newkey ec -pkeyopt ec_paramgen_curve:P-256 -sha256 \
    -subj "/CN=$2" -keyout "$work/$1.key" -out "$work/$1.csr" 2>/dev/null
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" "extendedKeyUsage=$4" \
    ${3:+"subjectAltName=$3"} > "$work/$1.ext"
  openssl x509 -req -in "$work/$1.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" \
    -CAcreateserial -days 397 -sha256 -extfile "$work/$1.ext" -out "$work/$1.crt" 2>/dev/null
}
issue broker broker "DNS:broker,DNS:keybroker,DNS:localhost,IP:127.0.0.1" serverAuth,clientAuth
issue vault vault "DNS:vault,DNS:localhost,IP:127.0.0.1" serverAuth
issue client demo-client "" clientAuth

for name in broker vault client; do
  cp "$work/$name.crt" "$work/$name.key" "$dir/"
  chmod 0644 "$dir/$name.crt"
done
chmod 0600 "$dir/broker.key" "$dir/client.key"
# OpenBao's container user differs from the broker's; its key is readable in this local,
# throwaway volume only.
chmod 0644 "$dir/vault.key"
if [ -n "$owner" ]; then
  chown "$owner:$owner" "$dir/broker.key" "$dir/client.key"
fi
cp "$work/ca.crt" "$dir/ca.crt.new"
chmod 0644 "$dir/ca.crt.new"
mv "$dir/ca.crt.new" "$dir/ca.crt"   # last: its presence means the set is complete
echo "gen-certs.sh: wrote a local CA and certificates to $dir"
