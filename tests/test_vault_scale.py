"""The Vault key source with many keys, against a real OpenBao: chunked Transit decrypts,
concurrent KV reads, and reloads that re-read only what changed."""

from __future__ import annotations

from broker.config import VaultSettings
from broker.testing.vaultfill import fill_keys
from broker.vault import VaultKeySource, VaultSession


def names(n: int, prefix: str = "k") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


async def test_more_keys_than_one_transit_batch_all_load(vault_settings: VaultSettings) -> None:
    """300 keys (more than OpenBao takes in one decrypt body) all load with their own secrets."""
    put = fill_keys(vault_settings, "big", names(300))
    keys = await VaultKeySource(VaultSession(vault_settings)).load()
    assert {k.key_id: k.secret.reveal() for k in keys} == put
