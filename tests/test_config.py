"""Settings: TOML plus KEYBROKER_* environment, typed and validated."""

from __future__ import annotations

import pytest

from broker.config import StoreBackend, StrategyName, VaultAuth, load_settings
from broker.errors import InvalidArgument


def test_toml_and_environment_build_typed_settings(tmp_path):
    """Values come from the file, the environment overrides them, and types are enforced."""
    path = tmp_path / "kb.toml"
    path.write_text("""
listen = "127.0.0.1:6000"
[store]
backend = "sqlite"
sqlite_path = "/var/lib/kb.db"
[vault]
addr = "http://vault:8200"
auth = "approle"
role_id = "rid"
[quota]
daily_limit = 50
[pools.free]
strategy = "least_used"
minute_limit = 10
[accounts.rich]
daily_limit = 1000
""")
    s = load_settings(path, {"KEYBROKER_QUOTA_DAILY_LIMIT": "70",
                             "KEYBROKER_VAULT_SECRET_ID": "sid", "VAULT_ADDR": "http://x:1"})
    assert s.listen == "127.0.0.1:6000"
    assert s.store.backend is StoreBackend.SQLITE and s.store.sqlite_path == "/var/lib/kb.db"
    assert s.vault.auth is VaultAuth.APPROLE and s.vault.secret_id == "sid"
    assert s.vault.addr == "http://vault:8200", "the file wins over the generic VAULT_ADDR"
    assert s.quota.daily_limit == 70
    assert s.pool("free").strategy is StrategyName.LEAST_USED
    assert s.limits("free", "rich") == (1000, 10)
    assert s.limits("free", "other") == (70, 10)
    assert s.limits("paid", "other") == (70, 20)
    assert "sid" not in repr(s.vault)


def test_vault_addr_and_token_fall_back_to_the_standard_variables():
    """VAULT_ADDR and VAULT_TOKEN are honoured when no KEYBROKER_ variable is set."""
    s = load_settings(None, {"VAULT_ADDR": "http://v:8200", "VAULT_TOKEN": "t0k"})
    assert (s.vault.addr, s.vault.token) == ("http://v:8200", "t0k")


@pytest.mark.parametrize("env", [
    {"KEYBROKER_QUOTA_DAILY_LIMIT": "many"},
    {"KEYBROKER_STORE_BACKEND": "mongodb"},
    {"KEYBROKER_TLS_REQUIRE_CLIENT_CERT": "maybe"},
    {"KEYBROKER_LEASE_DEFAULT_TTL": "0"},
    {"KEYBROKER_VAULT_AUTH": "approle"},
    {"KEYBROKER_VAULT_READ_CONCURRENCY": "0"},
    {"KEYBROKER_VAULT_READ_CONCURRENCY": "100000"},
])
def test_bad_values_are_refused_with_the_setting_named(env):
    """A malformed or inconsistent value raises InvalidArgument naming the setting."""
    with pytest.raises(InvalidArgument):
        load_settings(None, env)


def test_unknown_settings_are_refused(tmp_path):
    """A misspelt key in the file is an error, not silently ignored."""
    path = tmp_path / "kb.toml"
    path.write_text("[quota]\ndaily_limt = 5\n")
    with pytest.raises(InvalidArgument, match="daily_limt"):
        load_settings(path, {})


def test_the_variables_the_dev_env_file_and_the_client_commands_use_are_known():
    """A shell that sourced `.keybroker/env` (or sets any variable the client commands read)
    can still start `keybroker serve`: none of those KEYBROKER_* names is refused as a typo."""
    from broker.config import check_env
    from broker.shell import CLIENT_VARIABLES

    dev_env = {"KEYBROKER_ADDR": "127.0.0.1:1", "KEYBROKER_TOKEN": "t",
               "KEYBROKER_ADMIN_TOKEN": "t"}  # what DevStack.environment() writes
    check_env({**dev_env, **dict.fromkeys(CLIENT_VARIABLES, "x")})


@pytest.mark.parametrize(("text", "setting"), [
    ("[rotation]\nmax_age_days = 30\n", "rotation.interval"),
    ("[rotation]\ninterval = 60\n[pools.free]\nrotation_max_age_days = -1\n",
     "pools.free.rotation_max_age_days"),
])
def test_rotation_settings_that_cannot_work_are_refused(tmp_path, text, setting):
    """A max age without rotation rounds or a negative age is refused, naming the setting."""
    path = tmp_path / "kb.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument) as refused:
        load_settings(path, {})
    assert refused.value.field.endswith(setting)  # after the file's name


def test_a_pool_rotation_age_with_rounds_loads():
    """rotation.interval with a pool's rotation_max_age_days loads; the pool's age wins."""
    s = load_settings(None, {"KEYBROKER_ROTATION_INTERVAL": "600"})
    assert s.rotation.interval == 600 and s.pool("free").rotation_max_age_days is None
