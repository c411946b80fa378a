"""The Redis store's implicit pipelining (broker/store/redis_mux.py) against a real redis-server:
replies in order, NOSCRIPT, error isolation, cancellation, and fail-closed on a lost or hung server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from broker.store.redis_mux import Multiplexer
from tests.redis_server import RedisServer

SCRIPT = "return {KEYS[1], redis.call('INCRBY', KEYS[1], ARGV[1]), ARGV[2]}"


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture
async def mux(server: RedisServer) -> AsyncIterator[Callable[..., Multiplexer]]:
    made: list[Multiplexer] = []

    def make(timeout: float = 2.0) -> Multiplexer:
        pool = aioredis.ConnectionPool.from_url(server.url, decode_responses=True,
                                                socket_timeout=timeout,
                                                socket_connect_timeout=timeout)
        made.append(Multiplexer(pool))
        return made[-1]

    yield make
    for m in made:
        await m.close()


async def test_replies_match_redis_py_and_keep_their_order(server, mux):
    """Concurrent commands each get their own reply, in the order they were issued."""
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    script = client.register_script(SCRIPT)
    m = mux()
    expected = await script(keys=["a"], args=[1, "x y"])
    assert await m.evalsha(script, ["a"], [1, "x y"]) == ["a", expected[1] + 1, "x y"]
    counts = await asyncio.gather(*(m.execute("INCR", "n") for _ in range(200)))
    assert counts == list(range(1, 201))
    assert await m.execute("GET", "missing") is None
    assert await m.execute("SET", "k", "é" * 3) == "OK"
    assert await m.execute("GET", "k") == "é" * 3
    await client.aclose()


async def test_noscript_loads_the_script_and_runs_each_call_once(server, mux):
    """After Redis forgets its scripts, each EVALSHA answered NOSCRIPT runs once, as EVAL."""
    client = aioredis.Redis.from_url(server.url, decode_responses=True)
    script = client.register_script(SCRIPT)
    m = mux()
    await m.execute("SCRIPT", "FLUSH")
    results = await asyncio.gather(*(m.evalsha(script, ["c"], [1, ""]) for _ in range(5)))
    assert sorted(r[1] for r in results) == [1, 2, 3, 4, 5]
    assert await m.execute("SCRIPT", "EXISTS", script.sha) == [1]
    await client.aclose()


async def test_an_error_reply_fails_only_its_call(mux):
    """An error reply raises ResponseError for its own call; the calls around it succeed."""
    m = mux()
    await m.execute("SET", "s", "text")
    results = await asyncio.gather(m.execute("INCR", "i"), m.execute("INCR", "s"),
                                   m.execute("INCR", "i"), return_exceptions=True)
    assert results[0] == 1 and results[2] == 2
    assert isinstance(results[1], ResponseError)


async def test_a_cancelled_caller_does_not_disturb_the_others(mux):
    """A caller cancelled while its command is in flight loses its reply; the next caller gets its own."""
    m = mux()
    await m.execute("PING")
    first = asyncio.ensure_future(m.execute("INCR", "q"))
    second = asyncio.ensure_future(m.execute("INCR", "q"))
    await asyncio.sleep(0)
    first.cancel()
    assert await second in (1, 2)
    assert await m.execute("GET", "q") in ("1", "2")


async def test_a_hung_server_fails_every_call_in_flight_then_recovers(server, mux):
    """With Redis stopped (SIGSTOP) every call fails with a timeout; after SIGCONT a new connection works."""
    m = mux(timeout=0.3)
    await m.execute("PING")
    server.pause()
    try:
        results = await asyncio.gather(*(m.execute("INCR", "h") for _ in range(10)),
                                       return_exceptions=True)
    finally:
        server.resume()
    assert all(isinstance(r, RedisTimeoutError | RedisConnectionError) for r in results), results
    assert await m.execute("PING") == "PONG"


async def test_a_lost_server_fails_every_call_then_reconnects(server, mux):
    """kill -9 of Redis fails every call in flight; calls fail while it is down and work once it is back."""
    m = mux()
    await m.execute("PING")
    server.pause()
    calls = [asyncio.ensure_future(m.execute("INCR", "l")) for _ in range(10)]
    await asyncio.sleep(0.1)
    server.kill9()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert all(isinstance(r, RedisConnectionError) for r in results), results
    with pytest.raises(RedisConnectionError):
        await m.execute("PING")
    server.start()
    assert await m.execute("PING") == "PONG"


async def test_a_closed_multiplexer_refuses_calls(mux):
    """After close, calls raise ConnectionError instead of opening a new connection."""
    m = mux()
    await m.execute("PING")
    await m.close()
    with pytest.raises(RedisConnectionError):
        await m.execute("PING")
