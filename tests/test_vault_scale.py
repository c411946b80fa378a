"""The Vault key source with many keys, against a real OpenBao: chunked Transit decrypts,
concurrent KV reads, and reloads that re-read only what changed."""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import hvac
import pytest
import requests

from broker import vault as vault_module
from broker.config import VaultSettings
from broker.errors import BackendUnavailable
from broker.models import Key
from broker.testing import BaoDevServer, free_port
from broker.testing.vaultfill import fill_keys
from broker.vault import (
    VaultAdmin,
    VaultForbidden,
    VaultKeySource,
    VaultSession,
    broker_policy_hcl,
)


def names(n: int, prefix: str = "k") -> list[str]:
    return [f"{prefix}{i:05d}" for i in range(n)]


def secrets_of(keys: list[Key]) -> dict[str, str]:
    return {k.key_id: k.secret.reveal() for k in keys}


class Requests:
    """Counts the HTTP requests a VaultSession's client sends, by method and path."""

    def __init__(self, session: VaultSession) -> None:
        self.seen: list[tuple[str, str]] = []
        session.client().adapter.session.hooks["response"].append(self._hear)

    def _hear(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self.seen.append((str(response.request.method), urlsplit(response.request.url).path))

    def clear(self) -> None:
        self.seen.clear()

    def count(self, part: str, method: str = "") -> int:
        return sum(1 for m, path in self.seen if part in path and (not method or m == method))

    def reads(self, settings: VaultSettings) -> set[str]:
        """Names of the keys whose data was read."""
        head = f"/v1/{settings.kv_mount}/data/{settings.key_prefix}/"
        return {path[len(head):] for m, path in self.seen if m == "GET" and path.startswith(head)}


def token_with(settings: VaultSettings, name: str, hcl: str) -> VaultSettings:
    """Settings whose token carries only the policy ``hcl``."""
    root = hvac.Client(url=settings.addr, token=settings.token)
    root.sys.create_or_update_policy(name=name, policy=hcl)
    token = root.auth.token.create(policies=[name], ttl="1h")["auth"]["client_token"]
    return dataclasses.replace(settings, token=token)


def old_broker_policy(settings: VaultSettings) -> str:
    """The broker policy as `vault bootstrap` wrote it before detailed-metadata."""
    hcl = broker_policy_hcl(settings)
    start = hcl.index("# OpenBao: the list")
    end = hcl.index(f'path "{settings.transit_mount}/decrypt')
    return hcl[:start] + hcl[end:]


@pytest.fixture
def own_bao() -> Iterator[BaoDevServer]:
    """An OpenBao of this test (bootstrapped), closed after."""
    with BaoDevServer(port=free_port()) as server:
        yield server


# -- loading many keys ---------------------------------------------------------------------


async def test_more_keys_than_one_transit_batch_all_load(vault_settings: VaultSettings) -> None:
    """300 keys (more than OpenBao takes in one decrypt body) all load with their own secrets."""
    put = fill_keys(vault_settings, "big", names(300))
    keys = await VaultKeySource(VaultSession(vault_settings)).load()
    assert secrets_of(keys) == put


async def test_concurrent_reads_load_every_key_of_every_pool_exactly(
        vault_settings: VaultSettings) -> None:
    """With 8 reads in flight, 450 keys in two pools load once each, with their own secret,
    account and base URL, in 2 listings, 450 reads and 3 decrypt calls."""
    settings = dataclasses.replace(vault_settings, read_concurrency=8)
    put = fill_keys(settings, "free", names(300), account=lambda i: f"acct-{i % 7}")
    put |= fill_keys(settings, "paid", names(150, "p"), account=lambda i: f"paid-{i}",
                     base_url="https://api.example.test/v1")
    session = VaultSession(settings)
    heard = Requests(session)
    keys = await VaultKeySource(session, allowed_base_urls=(
        "https://openrouter.ai/api/v1", "https://api.example.test/v1")).load()
    assert len(keys) == 450
    assert secrets_of(keys) == put
    by_id = {k.key_id: k for k in keys}
    assert by_id["free/k00009"].account == "acct-2"
    assert by_id["paid/p00149"].account == "paid-149"
    assert by_id["paid/p00149"].base_url == "https://api.example.test/v1"
    assert heard.count("/detailed-metadata/", "LIST") == 3  # the pools, then each pool
    assert heard.count("/data/", "GET") == 450
    assert heard.count("/transit/decrypt/") == 2 + 1  # 300 and 150 ciphertexts, 200 a call


async def test_a_ciphertext_refused_in_a_later_batch_skips_only_that_key(
        vault_settings: VaultSettings) -> None:
    """A key whose ciphertext was copied from another is skipped; the other 299 load."""
    put = fill_keys(vault_settings, "big", names(300))
    root = hvac.Client(url=vault_settings.addr, token=vault_settings.token)
    path = f"{vault_settings.key_prefix}/big/"
    donor = root.secrets.kv.v2.read_secret_version(
        path=path + "k00001", mount_point=vault_settings.kv_mount,
        raise_on_deleted_version=True)["data"]["data"]
    root.secrets.kv.v2.create_or_update_secret(path=path + "k00250", secret=donor,
                                               mount_point=vault_settings.kv_mount)
    skipped: list[str] = []
    keys = await VaultKeySource(VaultSession(vault_settings), on_skip=skipped.append).load()
    del put["big/k00250"]
    assert secrets_of(keys) == put
    assert skipped == ["decrypt failed"]


async def test_vault_down_during_a_concurrent_load_is_the_same_clear_error(
        own_bao: BaoDevServer) -> None:
    """With Vault gone a many-key load fails as BackendUnavailable naming the address, and a
    revoked token as VaultForbidden; the keys loaded before stay the source's to serve."""
    settings = VaultSettings(addr=own_bao.addr, token=own_bao.root_token, reload_interval=3600.0)
    VaultAdmin(VaultSession(settings)).bootstrap()
    fill_keys(settings, "big", names(260))
    root = hvac.Client(url=settings.addr, token=settings.token)
    token = root.auth.token.create(policies=[VaultAdmin.BROKER_POLICY], ttl="1h")
    revocable = dataclasses.replace(settings, token=token["auth"]["client_token"])
    source = VaultKeySource(VaultSession(revocable))
    assert len(await source.load()) == 260
    root.auth.token.revoke(token["auth"]["client_token"])
    with pytest.raises(VaultForbidden, match="permission denied"):
        await source.load()

    source = VaultKeySource(VaultSession(settings))
    assert len(await source.load()) == 260
    own_bao.stop()
    with pytest.raises(BackendUnavailable) as err:
        await source.load()
    assert err.value.message.startswith(f"vault unreachable at {settings.addr} (")
    assert "Traceback" not in err.value.message


# -- incremental reloads -------------------------------------------------------------------


async def test_reload_reads_and_decrypts_only_the_keys_that_changed(
        vault_settings: VaultSettings, vault_admin: VaultAdmin) -> None:
    """After one key of 300 is rotated, one removed and one added, a reload lists once per
    pool, reads and decrypts just the rotated and the added key, and returns the new set."""
    put = fill_keys(vault_settings, "big", names(300))
    session = VaultSession(vault_settings)
    heard = Requests(session)
    source = VaultKeySource(session)
    first = await source.load()
    assert secrets_of(first) == put
    unchanged = {k.key_id: k for k in first}

    rotated, added = f"sk-or-v1-new-{secrets.token_hex(20)}", f"sk-or-v1-add-{secrets.token_hex(20)}"
    vault_admin.put_key("big", "k00123", rotated, account="acct-000061")
    vault_admin.remove_key("big", "k00200")
    vault_admin.put_key("big", "zz", added, account="acct-new")
    heard.clear()
    keys = await source.load()

    assert heard.reads(vault_settings) == {"big/k00123", "big/zz"}
    assert heard.count("/detailed-metadata/", "LIST") == 2
    assert heard.count("/transit/decrypt/") == 1
    assert len(heard.seen) == 2 + 2 + 1
    expected = put | {"big/k00123": rotated, "big/zz": added}
    del expected["big/k00200"]
    assert secrets_of(keys) == expected
    assert next(k for k in keys if k.key_id == "big/zz").account == "acct-new"
    assert all(k == unchanged[k.key_id] for k in keys if k.key_id not in ("big/k00123", "big/zz"))

    heard.clear()
    assert secrets_of(await source.load()) == expected  # nothing changed: nothing read
    assert heard.reads(vault_settings) == set()
    assert heard.count("/transit/decrypt/") == 0


async def test_reload_sees_a_key_written_anew_at_version_one_and_a_soft_deleted_one(
        vault_settings: VaultSettings, vault_admin: VaultAdmin) -> None:
    """A key removed and written again (back at KV version 1) gets its new secret; a key whose
    current version is soft-deleted is dropped, and comes back once undeleted."""
    put = fill_keys(vault_settings, "p", names(5))
    source = VaultKeySource(VaultSession(vault_settings))
    assert secrets_of(await source.load()) == put
    again = f"sk-or-v1-again-{secrets.token_hex(20)}"
    vault_admin.remove_key("p", "k00001")
    assert vault_admin.put_key("p", "k00001", again, account="acct-000000") == 1
    root = hvac.Client(url=vault_settings.addr, token=vault_settings.token)
    path = f"{vault_settings.key_prefix}/p/k00002"
    root.secrets.kv.v2.delete_latest_version_of_secret(path=path,
                                                       mount_point=vault_settings.kv_mount)
    keys = secrets_of(await source.load())
    assert keys["p/k00001"] == again
    assert "p/k00002" not in keys
    root.secrets.kv.v2.undelete_secret_versions(path=path, versions=[1],
                                                mount_point=vault_settings.kv_mount)
    assert secrets_of(await source.load())["p/k00002"] == put["p/k00002"]


async def test_without_detailed_metadata_a_reload_reads_every_key_and_stays_correct(
        vault_settings: VaultSettings, vault_admin: VaultAdmin) -> None:
    """With a broker policy from before detailed-metadata, loads read every key (decrypting
    only new ciphertexts) and still pick up a rotated and a removed key."""
    put = fill_keys(vault_settings, "big", names(260))
    settings = token_with(vault_settings, f"old-{vault_settings.key_prefix}",
                          old_broker_policy(vault_settings))
    session = VaultSession(settings)
    heard = Requests(session)
    source = VaultKeySource(session)
    assert secrets_of(await source.load()) == put
    rotated = f"sk-or-v1-new-{secrets.token_hex(20)}"
    vault_admin.put_key("big", "k00007", rotated, account="acct-000003")
    vault_admin.remove_key("big", "k00008")
    heard.clear()
    keys = secrets_of(await source.load())
    assert keys == {**{k: v for k, v in put.items() if k != "big/k00008"}, "big/k00007": rotated}
    assert len(heard.reads(vault_settings)) == 259
    assert heard.count("/transit/decrypt/") == 1



@pytest.mark.parametrize("n", [200, 250])
async def test_the_listing_pages_through_every_key(vault_settings: VaultSettings,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   n: int) -> None:
    """With pages of 100 entries, a pool of exactly two pages and one of two and a half load
    every key, in 3 listing pages of the pool."""
    monkeypatch.setattr(vault_module, "LIST_PAGE", 100)
    put = fill_keys(vault_settings, "paged", names(n))
    session = VaultSession(vault_settings)
    heard = Requests(session)
    assert secrets_of(await VaultKeySource(session).load()) == put
    assert heard.count("/detailed-metadata/", "LIST") == 1 + 3
