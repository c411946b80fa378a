"""The emulator's management API (/api/v1/keys) answers like OpenRouter's, on a real port."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx
import pytest

from broker.clock import ManualClock
from broker.testing import Emulator

FREE = "meta-llama/llama-3.3-70b-instruct:free"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def emu(clock: ManualClock) -> AsyncIterator[Emulator]:
    async with Emulator(clock=clock, seed=1) as emulator:
        yield emulator


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


async def chat(http: httpx.AsyncClient, emu: Emulator, secret: str) -> httpx.Response:
    return await http.post(f"{emu.base_url}/chat/completions", headers=bearer(secret),
                           json={"model": FREE, "messages": HELLO})


async def test_create_returns_the_secret_once_and_the_key_serves_at_once(emu: Emulator):
    """POST /keys answers 201 with the secret once; GET shows the key by hash, never the secret."""
    mgmt = emu.add_management_key("acct-a")
    async with httpx.AsyncClient() as http:
        made = await http.post(f"{emu.base_url}/keys", headers=bearer(mgmt),
                               json={"name": "k1", "limit": 5, "limit_reset": "daily"})
        assert made.status_code == 201
        body = made.json()
        secret, key_hash = body["key"], body["data"]["hash"]
        assert body["data"]["name"] == "k1" and body["data"]["limit"] == 5.0
        assert body["data"]["limit_reset"] == "daily" and body["data"]["disabled"] is False
        assert (await chat(http, emu, secret)).status_code == 200
        got = await http.get(f"{emu.base_url}/keys/{key_hash}", headers=bearer(mgmt))
        assert got.status_code == 200 and secret not in got.text
        assert got.json()["data"]["usage"] == 0
        listed = await http.get(f"{emu.base_url}/keys", headers=bearer(mgmt))
        assert [k["hash"] for k in listed.json()["data"]] == [key_hash]
        assert secret not in listed.text


async def test_management_and_normal_keys_do_not_cross(emu: Emulator):
    """A management key cannot chat and a normal key cannot manage keys (both 401)."""
    mgmt = emu.add_management_key("acct-a")
    normal = emu.add_key("acct-a", name="a1")
    async with httpx.AsyncClient() as http:
        assert (await chat(http, emu, mgmt)).status_code == 401
        assert (await http.get(f"{emu.base_url}/keys", headers=bearer(normal))).status_code == 401
        assert (await http.post(f"{emu.base_url}/keys", headers=bearer(normal),
                                json={"name": "x"})).status_code == 401
        assert (await http.get(f"{emu.base_url}/keys")).status_code == 401


async def test_deleted_and_disabled_keys_answer_401_at_once_expired_after_expires_at(
        emu: Emulator, clock: ManualClock):
    """DELETE and PATCH disabled make a key answer 401 at once; expires_at does at its time."""
    mgmt = emu.add_management_key("acct-a")
    async with httpx.AsyncClient() as http:
        async def make(name: str, **extra: object) -> tuple[str, str]:
            r = await http.post(f"{emu.base_url}/keys", headers=bearer(mgmt),
                                json={"name": name, **extra})
            assert r.status_code == 201, r.text
            return r.json()["key"], r.json()["data"]["hash"]

        gone, gone_hash = await make("gone")
        off, off_hash = await make("off")
        soon_at = datetime.fromtimestamp(clock.now() + 30, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        soon, _ = await make("soon", expires_at=soon_at)
        deleted = await http.delete(f"{emu.base_url}/keys/{gone_hash}", headers=bearer(mgmt))
        assert deleted.json() == {"deleted": True}
        assert (await chat(http, emu, gone)).status_code == 401
        assert (await http.get(f"{emu.base_url}/keys/{gone_hash}",
                               headers=bearer(mgmt))).status_code == 404
        patched = await http.patch(f"{emu.base_url}/keys/{off_hash}", headers=bearer(mgmt),
                                   json={"disabled": True, "name": "off2"})
        assert patched.json()["data"]["disabled"] is True
        assert patched.json()["data"]["name"] == "off2"
        assert (await chat(http, emu, off)).status_code == 401
        listed = await http.get(f"{emu.base_url}/keys", headers=bearer(mgmt))
        assert [k["name"] for k in listed.json()["data"]] == ["soon"]
        listed = await http.get(f"{emu.base_url}/keys?include_disabled=true",
                                headers=bearer(mgmt))
        assert [k["name"] for k in listed.json()["data"]] == ["off2", "soon"]
        assert (await chat(http, emu, soon)).status_code == 200
        clock.set(clock.now() + 60)
        assert (await chat(http, emu, soon)).status_code == 401


async def test_bad_parameters_answer_400_and_create_nothing(emu: Emulator):
    """Missing name, a non-UTC expires_at, a bad limit_reset or unknown field: 400, no key."""
    mgmt = emu.add_management_key("acct-a")
    async with httpx.AsyncClient() as http:
        for body in ({}, {"name": ""}, {"name": "x", "expires_at": "2026-07-01T00:00:00+02:00"},
                     {"name": "x", "limit_reset": "hourly"}, {"name": "x", "limit": -1},
                     {"name": "x", "colour": "red"}):
            r = await http.post(f"{emu.base_url}/keys", headers=bearer(mgmt), json=body)
            assert r.status_code == 400, body
            assert r.json()["error"]["code"] == 400
        r = await http.get(f"{emu.base_url}/keys?offset=-1", headers=bearer(mgmt))
        assert r.status_code == 400
        assert emu.live_keys("acct-a") == []


async def test_listing_pages_by_100_and_keys_of_other_accounts_stay_hidden(emu: Emulator):
    """GET /keys pages 100 keys at a time by offset; one account's manager sees only its keys."""
    mgmt = emu.add_management_key("acct-a")
    other = emu.add_management_key("acct-b")
    for i in range(130):
        emu.add_key("acct-a", name=f"a{i}")
    async with httpx.AsyncClient() as http:
        first = (await http.get(f"{emu.base_url}/keys", headers=bearer(mgmt))).json()["data"]
        second = (await http.get(f"{emu.base_url}/keys?offset=100",
                                 headers=bearer(mgmt))).json()["data"]
        assert len(first) == 100 and len(second) == 30
        assert len({k["hash"] for k in first + second}) == 130
        assert (await http.get(f"{emu.base_url}/keys", headers=bearer(other))).json() == {
            "data": []}
        r = await http.delete(f"{emu.base_url}/keys/{first[0]['hash']}", headers=bearer(other))
        assert r.status_code == 404


async def test_new_keys_share_their_accounts_free_counters(emu: Emulator):
    """More keys on one account add no quota: a new key is refused once the account's minute is spent."""
    emu.minute_limit = 2
    mgmt = emu.add_management_key("acct-a")
    async with httpx.AsyncClient() as http:
        old = emu.add_key("acct-a", name="old")
        assert (await chat(http, emu, old)).status_code == 200
        assert (await chat(http, emu, old)).status_code == 200
        made = await http.post(f"{emu.base_url}/keys", headers=bearer(mgmt), json={"name": "new"})
        assert (await chat(http, emu, made.json()["key"])).status_code == 429


def test_cli_demo_prints_a_management_key_per_account():
    """`keybroker emulate-openrouter` (demo accounts) prints each account's management key,
    which creates a key through /api/v1/keys on that account."""
    import signal
    import subprocess
    import sys
    from pathlib import Path

    proc = subprocess.Popen([str(Path(sys.executable).parent / "keybroker"),
                             "emulate-openrouter", "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        base_url = proc.stdout.readline().split()[-1]
        lines = [proc.stdout.readline() for _ in range(6)]
        managers = {line.split()[0]: line.split()[-1] for line in lines
                    if "management key" in line}
        assert set(managers) == {"acct-a", "acct-b", "acct-c"}
        made = httpx.post(base_url + "/keys", json={"name": "cli"}, timeout=5,
                          headers={"Authorization": f"Bearer {managers['acct-b']}"})
        assert made.status_code == 201
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=10)
