"""Window names and health subjects are built in one place and stay stable."""

from __future__ import annotations

import calendar

from broker.engine import windows
from broker.models import Key, Secret

# 2026-03-01 06:01:30 UTC
NOW = calendar.timegm((2026, 3, 1, 6, 1, 30)) + 0.0


def test_names_are_stable():
    """Stored counters and health records keep their names (renaming one would lose state
    kept by a running broker across an upgrade)."""
    assert windows.account_day("acme", "2026-03-01") == "acct:acme:d:2026-03-01"
    assert windows.account_minute("acme", "2026-03-01T06:01") == "acct:acme:m:2026-03-01T06:01"
    assert windows.key_day("free/k1", "acme", "2026-03-01") == "key:free/k1@acme:d:2026-03-01"
    assert windows.key_minute("free/k1", "acme", "x") == "key:free/k1@acme:m:x"
    assert windows.key_subject("free/k1") == "key:free/k1"
    assert windows.account_subject("acme") == "account:acme"


def test_windows_for_charges_account_and_key():
    """A lease is charged to the account's day and minute and the key's day, plus the key's
    minute only when the key has a minute limit of its own."""
    plain = Key(pool="free", name="k1", account="acme", secret=Secret("s"))
    got = windows.windows_for(plain, (50, 20), NOW)
    assert [(w.name, w.limit, w.label) for w in got] == [
        ("acct:acme:d:2026-03-01", 50, "account:acme/day"),
        ("acct:acme:m:2026-03-01T06:01", 20, "account:acme/minute"),
        ("key:free/k1@acme:d:2026-03-01", windows.UNLIMITED, "key:free/k1/day")]
    assert got[0].ends_at == calendar.timegm((2026, 3, 2, 0, 0, 0))
    assert got[1].ends_at == calendar.timegm((2026, 3, 1, 6, 2, 0))
    limited = Key(pool="free", name="k1", account="acme", secret=Secret("s"), daily_limit=7,
                  minute_limit=2)
    got = windows.windows_for(limited, (50, 20), NOW)
    assert [(w.name, w.limit) for w in got[2:]] == [
        ("key:free/k1@acme:d:2026-03-01", 7), ("key:free/k1@acme:m:2026-03-01T06:01", 2)]
