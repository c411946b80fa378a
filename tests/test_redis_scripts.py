"""The Redis store's Lua scripts: each header documents its KEYS and ARGV as the store calls
the script, and a script touches only the keys it is given (or, where its header says so,
keys an index it was given names, in that index's slot)."""

from __future__ import annotations

import codecs
import dataclasses
import hashlib
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import resources

import pytest
import redis
from redis.crc import key_slot

from broker.models import Health, HealthState, KeyStats, UsageReport, Window
from broker.store import Budget, Candidate, ReportWrite, Reservation, ReserveRequest
from broker.store.redis import RedisStore
from broker.store.redis import scripts as lua
from broker.testing import RedisServer

# -- the headers ------------------------------------------------------------------------------


@dataclass
class Header:
    """What a script's opening comment documents."""

    keys: list[int] = field(default_factory=list)  # the numbered KEYS entries
    argv: list[int] = field(default_factory=list)
    keys_variadic: bool = False  # a "..." entry: more follow, as many as the call needs
    argv_variadic: bool = False
    stored_data_keys: bool = False  # a STORED-DATA KEYS section: keys named by an index


_SECTION = re.compile(r"^-- (KEYS|ARGV|STORED-DATA KEYS)$")
_ENTRY = re.compile(r"^--   (\d+|\.\.\.)\s+\S")


def parse_header(text: str) -> tuple[Header, str]:
    """The header of a script and its body (the text after the opening comment)."""
    lines = text.splitlines()
    n = next(i for i, line in enumerate(lines) if not line.startswith("--"))
    header, section = Header(), ""
    for line in lines[:n]:
        if m := _SECTION.match(line):
            section = m[1]
            header.stored_data_keys |= section == "STORED-DATA KEYS"
        elif re.match(r"^-- \S", line) or line == "--":
            section = ""
        elif (m := _ENTRY.match(line)) and section in ("KEYS", "ARGV"):
            if m[1] == "...":
                setattr(header, f"{section.lower()}_variadic", True)
            else:
                getattr(header, section.lower()).append(int(m[1]))
    return header, "\n".join(lines[n:])


def scripts() -> dict[str, str]:
    folder = resources.files(lua.__name__)
    return {p.name.removesuffix(".lua"): p.read_text() for p in folder.iterdir()
            if p.name.endswith(".lua")}


def test_every_script_is_a_lua_file_loaded_by_name():
    """The scripts the store registers are exactly the .lua files of the scripts package."""
    assert set(scripts()) == set(lua.NAMES)
    assert all(lua.source(name) == text for name, text in scripts().items())


@pytest.mark.parametrize("name", lua.NAMES)
def test_a_script_header_documents_every_key_and_argument_it_reads(name):
    """A script's header numbers its KEYS and ARGV from 1 without gaps, documents every index its
    body names, and declares STORED-DATA KEYS exactly when a command's key is not from KEYS."""
    header, body = parse_header(scripts()[name])
    assert header.keys or header.keys_variadic, "no KEYS documented"
    for kind, documented, variadic in (("KEYS", header.keys, header.keys_variadic),
                                       ("ARGV", header.argv, header.argv_variadic)):
        assert documented == list(range(1, len(documented) + 1)), f"{kind} not numbered 1..n"
        literal = {int(i) for i in re.findall(rf"{kind}\[(\d+)\]", body)}
        assert variadic or literal <= set(documented), f"{kind} {literal - set(documented)} undocumented"
        assert set(documented) <= literal or variadic, f"{kind} documented but never read"
        computed = re.findall(rf"{kind}\[(?!\d+\])", body)
        assert variadic or not computed, f"{kind} indexed by an expression but not variadic"
    key_args = re.findall(r"redis\.p?call\('[A-Z]+',\s*([^,)]+)", body)
    not_keys = [a for a in key_args if not re.fullmatch(r"KEYS\[[^\]]+\]\s*", a)]
    assert bool(not_keys) == header.stored_data_keys, not_keys


# -- the calls, watched on a real redis-server ------------------------------------------------


@dataclass
class Call:
    """One EVALSHA and the commands its script ran."""

    script: str
    keys: list[str]
    argv: list[str]
    commands: list[list[str]] = field(default_factory=list)


_ARG = re.compile(r'"((?:[^"\\]|\\.)*)"')


def _unquote(arg: str) -> str:
    """An argument as MONITOR prints it (C escapes, \\xHH for other bytes) back to its text."""
    return codecs.escape_decode(arg.encode())[0].decode()


class Monitor:
    """Every command a redis-server runs, from MONITOR, until ``stop``."""

    def __init__(self, port: int) -> None:
        self._client = redis.Redis(port=port)
        self._monitor = self._client.monitor().__enter__()
        self.lines: list[tuple[bool, list[str]]] = []  # (run by a script, argv)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            line = self._monitor.connection.read_response()
            if isinstance(line, bytes):
                line = line.decode()
            assert isinstance(line, str)
            by_lua = "[0 lua]" in line
            args = [_unquote(a) for a in _ARG.findall(line.partition("] ")[2])]
            if args == ["ECHO", "monitor-stop"]:
                return
            self.lines.append((by_lua, args))

    def stop(self) -> None:
        self._client.echo("monitor-stop")
        self._thread.join(timeout=10)
        self._monitor.__exit__(None, None, None)
        self._client.close()


def calls(lines: list[tuple[bool, list[str]]]) -> list[Call]:
    """The EVALSHA calls of known scripts, each with the commands run by it (they follow it)."""
    by_sha = {hashlib.sha1(text.encode()).hexdigest(): name for name, text in scripts().items()}
    out: list[Call] = []
    current: Call | None = None
    for by_lua, args in lines:
        if by_lua:
            assert current is not None, f"a script command with no EVALSHA before it: {args}"
            current.commands.append(args)
            continue
        current = None
        if args and args[0].upper() == "EVALSHA":
            n = int(args[2])
            current = Call(by_sha[args[1]], args[3:3 + n], args[3 + n:])
            out.append(current)
    return out


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def _cand(key: str, account: str, *limits: tuple[str, int]) -> Candidate:
    return Candidate(key_id=key, account=account,
                     windows=tuple(Window(f"{account}:{n}", lim, 1000.0, n) for n, lim in limits))


def _request(n: int, candidates: list[Candidate], request_id: str = "") -> ReserveRequest:
    return ReserveRequest(lease_id=f"ls_{n:020x}{0:012x}", principal="p", request_id=request_id,
                          pool="pool", model="m", units=1, created_at=100.0, expires_at=160.0,
                          candidates=candidates)


async def _every_script(store: RedisStore, raw: redis.Redis) -> None:
    """Drive every script of the store through its public calls (and the cluster claims)."""
    full, room = _cand("k1", "a", ("d", 0), ("m", 5)), _cand("k2", "b", ("d", 5), ("m", 5))
    first = await store.reserve(_request(1, [full, room], request_id="r"))  # a's full: b grants
    assert isinstance(first, Reservation)
    again = await store.reserve(_request(2, [room], request_id="r"))  # the record: a replay
    assert isinstance(again, Reservation) and again.replay and again.lease == first.lease
    raw.delete(store._keys.lease(first.lease.lease_id))  # the record now names a lost lease
    fresh = await store.reserve(_request(3, [room], request_id="r"))
    assert isinstance(fresh, Reservation) and not fresh.replay
    plain = await store.reserve(_request(4, [room]))
    assert isinstance(plain, Reservation)
    await store.renew(fresh.lease.lease_id, 170.0, 110.0)
    await store.complete(plain.lease.lease_id, used=False, now=110.0)  # refunds its windows
    await store.set_counter("a", "a:h", 2, 1000.0, 110.0)
    assert await store.active_leases(120.0) == {"k2": 1}
    doomed = await store.reserve(_request(7, [_cand("k3", "b", ("d", 5), ("m", 5))]))
    assert isinstance(doomed, Reservation)  # a revoked key's lease, ended
    assert [x.lease_id for x in await store.end_leases("b", "k3", 120.0)] == [
        doomed.lease.lease_id]
    assert (await store.live_counters(120.0))["a:h"] == 2
    assert [x.lease_id for x in await store.expire_due(500.0)] == [fresh.lease.lease_id]
    state = await store.report_state(fresh.lease, "key:k2", "account:b")
    await store.apply_report(ReportWrite(
        lease=fresh.lease, report=UsageReport(http_status=429, prompt_tokens=3), now=110.0,
        answer=Health(), health={"account:b": Health(HealthState.COOLING_DOWN, "http_429", 200.0)},
        stats=KeyStats(1.0, 0.0, 5.0, 110.0), counter=("b:x", 5, 1000.0), token=state.token))
    await store.put_health("b", "account:b", Health())
    budget = Budget((("a", "a:d", 5), ("b", "b:d", 5)), 100.0)
    assert isinstance(await store.reserve(dataclasses.replace(_request(6, [room]), budget=budget)),
                      Reservation)
    assert [u.prompt_tokens for u in await store.usage("1970-01-01", "1970-01-02")] == [3]
    assert await store.prune(3 * 86400.0, 0.0, 0.0) > 0  # windows, leases, record, usage day
    claim = _request(5, [room], request_id="c")
    idem = store._keys.idem("p", "c")
    replay, held = await store._claims.claim(claim, idem, "ls_" + "5" * 32)
    assert replay is None and held
    await store._claims.move(claim, idem, held, "")


async def test_scripts_are_called_as_documented_and_touch_only_their_keys(server):
    """Every script runs on a real Redis with as many KEYS and ARGV as its header documents, and
    every key its commands touch is one of its KEYS, or, for a script declaring STORED-DATA KEYS,
    an ARGV prefix plus a name in the slot of its KEYS."""
    raw = redis.Redis(port=server.port, decode_responses=True)
    store = RedisStore(server.url, prefix="kb")
    monitor = Monitor(server.port)
    try:
        await _every_script(store, raw)
    finally:
        monitor.stop()
        await store.close()
    seen = calls(monitor.lines)
    assert {c.script for c in seen if c.commands} == set(lua.NAMES)
    headers = {name: parse_header(text)[0] for name, text in scripts().items()}
    getkeys: dict[tuple[str, ...], list[str]] = {}
    for call in seen:
        h = headers[call.script]
        assert (len(call.keys) >= len(h.keys)) if h.keys_variadic else (len(call.keys) == len(h.keys))
        assert (len(call.argv) >= len(h.argv)) if h.argv_variadic else (len(call.argv) == len(h.argv))
        if call.script == "reserve":  # KEYS: [the record], 4 + n per candidate, the budget's
            budget = int(call.argv[14]) if call.argv[13] else 0
            expected, a = int(call.argv[0] == "1"), 16 + budget
            for _ in range(int(call.argv[10])):
                n = int(call.argv[a + 8])  # lease_id .. key_version, paid subject, n
                expected, a = expected + 4 + n, a + 9 + 4 * n
            assert len(call.keys) == expected + budget and len(call.argv) == a
        for command in call.commands:
            if tuple(command) not in getkeys:
                try:
                    getkeys[tuple(command)] = raw.command_getkeys(*command)
                except redis.ResponseError:  # no key arguments (TIME)
                    getkeys[tuple(command)] = []
            for key in getkeys[tuple(command)]:
                if key in call.keys:
                    continue
                assert h.stored_data_keys, f"{call.script}: {command} touches {key}, not in KEYS"
                assert any(key.startswith(a) and len(a) > 3 for a in call.argv), (call.script, key)
                assert key_slot(key.encode()) == key_slot(call.keys[0].encode()), (call.script, key)
    raw.close()
