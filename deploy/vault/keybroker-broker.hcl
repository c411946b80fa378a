# keybroker broker: read the key list, decrypt with the one Transit key.
path "keybroker/data/keys/*" {
  capabilities = ["read"]
}
path "keybroker/metadata/keys" {
  capabilities = ["list"]
}
path "keybroker/metadata/keys/*" {
  capabilities = ["list"]
}
# OpenBao: the list with each key's version, so a reload reads only the keys that changed.
path "keybroker/detailed-metadata/keys" {
  capabilities = ["list"]
}
path "keybroker/detailed-metadata/keys/*" {
  capabilities = ["list"]
}
path "transit/decrypt/keybroker" {
  capabilities = ["update"]
}
path "transit/hmac/keybroker" {
  capabilities = ["update"]
}
