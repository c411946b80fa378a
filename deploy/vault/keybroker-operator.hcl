# keybroker operators: manage keys, encrypt and rewrap; no decrypt.
path "keybroker/data/keys/*" {
  capabilities = ["create", "read", "update", "patch", "delete"]
}
path "keybroker/metadata/keys" {
  capabilities = ["list"]
}
path "keybroker/metadata/keys/*" {
  capabilities = ["list", "read", "delete"]
}
path "transit/encrypt/keybroker" {
  capabilities = ["update"]
}
path "transit/rewrap/keybroker" {
  capabilities = ["update"]
}
path "transit/verify/keybroker" {
  capabilities = ["update"]
}
# rewrap reads the key's latest version to find the keys still on older ones.
path "transit/keys/keybroker" {
  capabilities = ["read"]
}
