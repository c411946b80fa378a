"""Implicit pipelining on one redis-py connection, for the Redis store's hot path.

Concurrent callers each ``await mux.execute(...)``; commands queued in the same
event-loop tick are written together in one write, and a single reader task takes
the replies off the connection in order, several per socket read. The per-command
costs of redis-py's pool (checkout, health check, its own write and read per call)
are paid once per batch, not once per call, the way envoy's ratelimit service
pipelines its Redis calls.

Everything on the wire is redis-py's: its ``Connection`` (from the store's pool
settings: URL, password, TLS, client name, timeouts) connects, packs commands and
parses replies (with hiredis when installed). This module only orders the futures.

Fail closed:

* A lost connection, an EOF, a protocol error or a reply that does not come within
  the socket timeout fails EVERY call written and not yet answered, and every call
  queued, with redis-py's ``ConnectionError`` / ``TimeoutError``; the connection is
  dropped and the next call opens a new one. Nobody is told "granted" for a reply
  that was not read. (A script that ran but whose reply was lost is the same case as
  with any client: its lease exists and expires at its TTL, never an over-grant.)
* An error reply (``ResponseError``, ``NOSCRIPT`` among them) fails only its call.
* A caller cancelled while its command is in flight gives up its reply: the reply
  is read and dropped; the other calls are not disturbed.

Only for commands answered with exactly one reply, promptly: no blocking commands,
MULTI/EXEC or pub/sub.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any

from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

__all__ = ["Multiplexer"]

Arg = str | int | float | bytes


class Multiplexer:
    """One connection made by ``pool`` (never checked out of it), shared by every caller."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self._conn: AbstractConnection | None = None
        self._queued: collections.deque[tuple[Sequence[Arg], asyncio.Future[Any]]] = (
            collections.deque())
        self._waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self._writer: asyncio.Task[None] | None = None
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        self._closing: set[asyncio.Future[None]] = set()

    async def execute(self, *args: Arg) -> Any:
        """Send one command and return its reply (or raise its error)."""
        if self._closed:
            raise RedisConnectionError("the multiplexer is closed")
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queued.append((args, fut))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write())  # runs after this tick
        return await fut

    async def evalsha(self, script: Any, keys: Sequence[Arg], args: Sequence[Arg]) -> Any:
        """EVALSHA of a redis-py ``Script`` (from ``register_script``); when Redis answers
        NOSCRIPT (it restarted or flushed its scripts: the script did not run), EVAL with
        the body, which also loads it."""
        try:
            return await self.execute("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await self.execute("EVAL", script.script, len(keys), *keys, *args)

    async def _write(self) -> None:
        try:
            while self._queued:
                live = [(a, f) for a, f in self._queued if not f.done()]  # not cancelled
                self._queued.clear()
                if not live:
                    continue
                try:
                    conn = await self._connection()
                except (RedisError, OSError) as exc:
                    for _, f in live:
                        if not f.done():
                            f.set_exception(_as_redis_error(exc))
                    self._fail(exc)
                    return
                self._waiting.extend(f for _, f in live)
                try:
                    await conn.send_packed_command(conn.pack_commands(a for a, _ in live),
                                                   check_health=False)
                except (RedisError, OSError) as exc:
                    self._fail(exc)
                    return
                if self._reader is None:
                    self._reader = asyncio.create_task(self._read(conn))
        finally:
            self._writer = None

    async def _connection(self) -> AbstractConnection:
        if self._conn is None:
            conn = self._pool.make_connection()  # type: ignore[no-untyped-call]
            await conn.connect()
            self._conn = conn
        return self._conn

    async def _read(self, conn: AbstractConnection) -> None:
        try:
            while self._waiting:
                fut = self._waiting[0]
                try:
                    reply: Any = await conn.read_response()
                except ResponseError as exc:  # an error reply: only this call fails
                    reply = exc
                except (RedisError, OSError) as exc:
                    self._fail(exc)
                    return
                except asyncio.CancelledError:
                    self._fail(RedisConnectionError("the connection was closed"))
                    raise
                self._waiting.popleft()
                if fut.done():  # its caller was cancelled: the reply is dropped
                    continue
                if isinstance(reply, Exception):
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)
        finally:
            self._reader = None

    def _fail(self, exc: BaseException) -> None:
        """Fail every call in flight and queued; drop the connection (the next call opens
        a new one)."""
        err = _as_redis_error(exc)
        pending = list(self._waiting) + [f for _, f in self._queued]
        self._waiting.clear()
        self._queued.clear()
        for f in pending:
            if not f.done():
                f.set_exception(err)
        conn, self._conn = self._conn, None
        if conn is not None:  # close it without waiting (a hung peer must not hold us)
            task = asyncio.ensure_future(conn.disconnect(nowait=True))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        self._closed = True
        self._fail(RedisConnectionError("the multiplexer is closed"))
        for task in (self._writer, self._reader):
            if task is not None:
                task.cancel()
        if self._closing:
            await asyncio.wait(self._closing, timeout=1.0)


def _as_redis_error(exc: BaseException) -> RedisError:
    if isinstance(exc, RedisError):
        return exc
    return RedisConnectionError(f"{type(exc).__name__}: {exc}")
