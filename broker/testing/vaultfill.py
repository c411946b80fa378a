"""Write many keys into Vault / OpenBao fast: one Transit ``batch_input`` encrypt per chunk
and concurrent KV v2 writes (threads with a bound). For the scale bench and tests that need
thousands of keys; `VaultAdmin.put_key` writes one key with two round trips in sequence.

The keys are written exactly as ``keybroker keys put`` writes them (a ciphertext bound to
the key id and host by `broker.vault.key_context`), so the broker loads them unchanged.
"""

from __future__ import annotations

import base64
import dataclasses
import secrets
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..config import VaultSettings
from ..vault import VaultSession, key_context, translate_errors

__all__ = ["fill_keys"]


def fill_keys(settings: VaultSettings, pool: str, names: Sequence[str], *,
              account: Callable[[int], str] = lambda i: f"acct-{i // 2:06d}",
              base_url: str = "", concurrency: int = 16, chunk: int = 200,
              secret: Callable[[int], str] | None = None) -> dict[str, str]:
    """Put one key per name into ``pool``; returns {key_id: secret}.

    Args:
        settings: where to write (a token that may encrypt and write keys).
        names: the key names, in order; key ``i`` gets account ``account(i)``.
        base_url: every key's base URL ("" for the default, OpenRouter's).
        concurrency: KV writes in flight at once.
        chunk: plaintexts per Transit encrypt call.
        secret: key ``i``'s secret (default: random ``sk-or-v1-fill-...``).
    """
    client = VaultSession(dataclasses.replace(settings, read_concurrency=concurrency)).client()
    make = secret or (lambda i: f"sk-or-v1-fill-{secrets.token_hex(24)}")
    plain = [make(i) for i in range(len(names))]
    ciphertexts: list[str] = []
    for start in range(0, len(names), chunk):
        batch = [{"plaintext": base64.b64encode(p.encode()).decode(),
                  "context": key_context(pool, n, base_url)}
                 for n, p in zip(names[start:start + chunk], plain[start:start + chunk],
                                 strict=True)]
        with translate_errors("transit encrypt"):
            resp = client.secrets.transit.encrypt_data(
                name=settings.transit_key, mount_point=settings.transit_mount,
                batch_input=batch)
        ciphertexts += [str(r["ciphertext"]) for r in resp["data"]["batch_results"]]
    prefix = settings.key_prefix.strip("/")

    def write(i: int) -> None:
        fields: dict[str, Any] = {"ciphertext": ciphertexts[i], "enabled": True, "models": [],
                                  "account": account(i)}
        if base_url:
            fields["base_url"] = base_url
        with translate_errors(f"write {pool}/{names[i]}"):
            client.secrets.kv.v2.create_or_update_secret(
                path=f"{prefix}/{pool}/{names[i]}", secret=fields,
                mount_point=settings.kv_mount)

    with ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="vaultfill") as pool_:
        list(pool_.map(write, range(len(names))))
    return {f"{pool}/{n}": p for n, p in zip(names, plain, strict=True)}
