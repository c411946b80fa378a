# OpenBao's TLS listener in docker-compose.yml (added to dev mode's loopback listener), with
# the certificate deploy/tls/gen-certs.sh issues from the local CA.
listener "tcp" {
  address       = "0.0.0.0:8201"
  tls_cert_file = "/var/lib/keybroker/tls/vault.crt"
  tls_key_file  = "/var/lib/keybroker/tls/vault.key"
}
