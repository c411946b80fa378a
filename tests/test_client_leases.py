"""OpenRouterClient and SyncOpenRouterClient complete every lease they take, on every path.

Real broker (SQLite), real OpenBao, the OpenRouter emulator, and real local sockets for
dead endpoints: a bound port nobody listens on (connection refused) and a listener whose
backlog is full (the TCP connect hangs). After each path the tests read ListKeys (no
active lease, the unit refunded exactly when nothing was sent, the key's health),
GetUsage (one report per attempt that got a decision) and the emulator's own counts.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from keybroker_client import KeyBrokerClient as SyncBrokerClient
from keybroker_client import OpenRouterClient, OpenRouterError, RouteInternal, SyncOpenRouterClient
from keybroker_client.v1 import keybroker_pb2 as pb

from broker.clock import ManualClock
from broker.testing import Emulator
from tests.support import TOKENS, wait_until

FREE = "meta-llama/llama-3.3-70b-instruct:free"
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
async def emu(clock: ManualClock) -> AsyncIterator[Emulator]:
    async with Emulator(clock=clock, seed=3) as emulator:
        yield emulator


@pytest.fixture
def refusing() -> Iterator[str]:
    """A base_url on a port that is bound but not listening: every connect is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/api/v1"


@pytest.fixture
def hanging() -> Iterator[str]:
    """A base_url whose listener never accepts and has its backlog full: a connect hangs."""
    with socket.socket() as server, socket.socket() as filler:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        filler.connect(server.getsockname())  # takes the one backlog slot
        yield f"http://127.0.0.1:{server.getsockname()[1]}/api/v1"


@pytest.fixture
def key_at(put_keys: Callable[..., dict[str, str]], emu: Emulator) -> Callable[[str], None]:
    """key_at(base_url): one key (free/k1, account acct-a) whose base_url is given; its
    secret is also a key of the emulator, so the emulator's base_url serves it."""

    def add(base_url: str) -> None:
        (secret,) = put_keys("free", [("k1", "acct-a")], base_url=base_url).values()
        emu.add_key("acct-a", secret, name="k1")

    return add


async def key_state(connect: Any, broker: Any) -> tuple[int, int, int]:
    """(units spent on acct-a today, active leases, attempts reported) for free/k1."""
    admin = connect(broker, "admin")
    (info,) = await admin.list_keys("free")
    reported = sum(r.requests for r in await admin.usage(1, ["key"], "free"))
    return info.account_used_today, info.active_leases, reported


async def until_connecting(connect: Any, broker: Any) -> None:
    """Wait until free/k1 is leased, then a little longer: the client is inside connect()."""
    async with asyncio.timeout(30):
        while (await key_state(connect, broker))[1] != 1:
            await asyncio.sleep(0.02)
    await asyncio.sleep(0.2)


def router(client: Any, clock: ManualClock, **kw: Any) -> OpenRouterClient:
    return OpenRouterClient(client, "free", clock=clock.now, max_wait=0.0, **kw)


def sync_router(broker: Any, clock: ManualClock, **kw: Any) -> tuple[SyncBrokerClient,
                                                                      SyncOpenRouterClient]:
    sync = SyncBrokerClient(f"127.0.0.1:{broker.port}", token=TOKENS["alice"])
    return sync, SyncOpenRouterClient(sync, "free", clock=clock.now, max_wait=0.0, **kw)


async def consume(client: OpenRouterClient, kind: str, **params: Any) -> None:
    """One chat completion, or one stream read to its end."""
    if kind == "chat":
        await client.chat(HELLO, model=FREE, **params)
        return
    async with client.stream(HELLO, model=FREE, **params) as stream:
        async for _chunk in stream:
            pass


def consume_sync(client: SyncOpenRouterClient, kind: str, **params: Any) -> None:
    if kind == "chat":
        client.chat(HELLO, model=FREE, **params)
        return
    with client.stream(HELLO, model=FREE, **params) as stream:
        for _chunk in stream:
            pass


# -- arguments are checked before a lease is taken --------------------------------------------

@pytest.mark.parametrize("kind", ["chat", "stream"])
@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_arguments_that_cannot_be_sent_take_no_lease(start_broker, connect, emu, key_at,
                                                           clock, kind, mode):
    """A parameter JSON cannot encode, NaN or a missing model raises before any lease is taken."""
    key_at(emu.base_url)
    broker = await start_broker()
    bad: list[tuple[type[Exception], dict[str, Any]]] = [
        (TypeError, {"metadata": {"t": {1}}}), (ValueError, {"temperature": float("nan")})]
    if mode == "async":
        async with router(connect(broker), clock) as client:
            for error, params in bad:
                with pytest.raises(error, match="JSON"):
                    await consume(client, kind, **params)
            with pytest.raises(ValueError, match="model"):
                await client.chat(HELLO, model="")
    else:
        def run() -> None:
            sync, client = sync_router(broker, clock)
            with sync, client:
                for error, params in bad:
                    with pytest.raises(error, match="JSON"):
                        consume_sync(client, kind, **params)
                with pytest.raises(ValueError, match="messages"):
                    client.chat([], model=FREE)

        await asyncio.to_thread(run)
    assert await key_state(connect, broker) == (0, 0, 0)
    assert emu.calls == []


# -- connection refused: reported, refunded, and the key's circuit learns ---------------------

@pytest.mark.parametrize("kind", ["chat", "stream"])
@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_refused_connections_are_reported_refunded_and_open_the_circuit(
        start_broker, connect, key_at, refusing, clock, kind, mode):
    """Each refused connect is reported (status 0) and refunded; five open the key's circuit."""
    key_at(refusing)
    broker = await start_broker()
    admin = connect(broker, "admin")
    for n in range(1, 6):
        if mode == "async":
            async with router(connect(broker), clock, max_attempts=1) as client:
                with pytest.raises(OpenRouterError) as err:
                    await consume(client, kind)
        else:
            def run() -> pytest.ExceptionInfo[OpenRouterError]:
                sync, client = sync_router(broker, clock, max_attempts=1)
                with sync, client, pytest.raises(OpenRouterError) as raised:
                    consume_sync(client, kind)
                return raised

            err = await asyncio.to_thread(run)
        assert (err.value.status, err.value.error_type) == (0, "connection")
        assert await key_state(connect, broker) == (0, 0, n)  # refunded, completed, reported
        health = (await admin.get_key("free/k1")).health
        assert health == (pb.KEY_HEALTH_CIRCUIT_OPEN if n == 5 else pb.KEY_HEALTH_HEALTHY)
    rows = await admin.usage(1, ["key"], "free")
    assert [(r.requests, r.failures) for r in rows] == [(5, 5)]
    # The dead key is out of rotation: no further request spends an attempt on it.
    async with router(connect(broker), clock, allow_internal=True) as client:
        with pytest.raises(RouteInternal) as internal:
            await client.chat(HELLO, model=FREE)
    assert internal.value.reason == "all_keys_unhealthy"
    assert await key_state(connect, broker) == (0, 0, 5)


# -- the TCP connect hangs ----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["chat", "stream"])
async def test_cancel_while_the_connect_hangs_refunds_and_completes(
        start_broker, connect, key_at, hanging, clock, kind):
    """Cancelling while the TCP connect hangs completes the lease unused (refund), no report."""
    key_at(hanging)
    broker = await start_broker()
    async with router(connect(broker), clock) as client:
        task = asyncio.create_task(consume(client, kind))
        await until_connecting(connect, broker)
        assert (await key_state(connect, broker))[:2] == (1, 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await key_state(connect, broker) == (0, 0, 0)


async def cancel_until_done(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` again and again (at every turn of the loop) until it ends cancelled."""
    while not task.done():
        task.cancel()
        await asyncio.sleep(0)
    assert task.cancelled()


@pytest.mark.parametrize("kind", ["chat", "stream"])
async def test_repeated_cancellation_cannot_skip_the_completion(start_broker, connect, key_at,
                                                                hanging, clock, kind):
    """Cancellations arriving while the lease is being completed do not cut the completion."""
    key_at(hanging)
    broker = await start_broker()
    async with router(connect(broker), clock) as client:
        task = asyncio.create_task(consume(client, kind))
        await until_connecting(connect, broker)
        await cancel_until_done(task)
    assert await key_state(connect, broker) == (0, 0, 0)


async def test_repeated_cancellation_of_a_lease_block_still_refunds(start_broker, connect,
                                                                    key_at, emu):
    """`client.lease()` cancelled again and again while completing still refunds its unit."""
    key_at(emu.base_url)
    broker = await start_broker()
    client = connect(broker)
    inside = asyncio.Event()

    async def hold() -> None:
        async with client.lease("free", FREE):
            inside.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hold())
    await inside.wait()
    await cancel_until_done(task)
    assert await key_state(connect, broker) == (0, 0, 0)


@pytest.mark.parametrize("kind", ["chat", "stream"])
@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_connect_timeout_is_reported_and_refunded(start_broker, connect, key_at,
                                                        hanging, clock, kind, mode):
    """A connect that times out is reported as status 0 "timeout" and its unit refunded."""
    key_at(hanging)
    broker = await start_broker()
    if mode == "async":
        async with router(connect(broker), clock, max_attempts=2, timeout=0.2) as client:
            with pytest.raises(OpenRouterError) as err:
                await consume(client, kind)
    else:
        def run() -> pytest.ExceptionInfo[OpenRouterError]:
            sync, client = sync_router(broker, clock, max_attempts=2, timeout=0.2)
            with sync, client, pytest.raises(OpenRouterError) as raised:
                consume_sync(client, kind)
            return raised

        err = await asyncio.to_thread(run)
    assert [(a.status, a.error_type) for a in err.value.attempts] == [(0, "timeout")] * 2
    assert await key_state(connect, broker) == (0, 0, 2)


# -- cancelled after the provider counted the request ------------------------------------------

async def test_cancel_after_the_provider_counted_keeps_the_unit_and_completes(
        start_broker, connect, emu, key_at, clock):
    """Cancelling a chat the provider already counted completes it as used: counts agree."""
    key_at(emu.base_url)
    emu.faults.latency = 5.0
    broker = await start_broker()
    async with router(connect(broker), clock) as client:
        task = asyncio.create_task(client.chat(HELLO, model=FREE))
        await wait_until(lambda: emu.free_requests_today("acct-a") == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    # No answer arrived: nothing to report, and the key's health is not charged with it.
    assert await key_state(connect, broker) == (1, 0, 0)
    assert emu.free_requests_today("acct-a") == 1
    assert (await connect(broker, "admin").get_key("free/k1")).health == pb.KEY_HEALTH_HEALTHY


async def test_cancel_inside_a_stream_block_reports_and_completes(start_broker, connect, emu,
                                                                  key_at, clock):
    """Cancelling a task reading a stream reports what it saw (200, abandoned) and completes."""
    key_at(emu.base_url)
    emu.faults.chunk_delay = 5.0
    broker = await start_broker()
    seen: list[dict[str, Any]] = []

    async def read(client: OpenRouterClient) -> None:
        async with client.stream(HELLO, model=FREE) as stream:
            async for chunk in stream:
                seen.append(chunk)

    async with router(connect(broker), clock) as client:
        task = asyncio.create_task(read(client))
        await wait_until(lambda: len(seen) == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert await key_state(connect, broker) == (1, 0, 1)
    assert emu.free_requests_today("acct-a") == 1


async def test_an_exception_in_a_stream_block_reports_and_completes(start_broker, connect, emu,
                                                                    key_at, clock):
    """An exception raised by the caller inside a stream block still settles its lease."""
    key_at(emu.base_url)
    broker = await start_broker()
    async with router(connect(broker), clock) as client:
        with pytest.raises(LookupError):
            async with client.stream(HELLO, model=FREE) as stream:
                async for _chunk in stream:
                    raise LookupError("the caller's own bug")
    assert await key_state(connect, broker) == (1, 0, 1)
    assert emu.free_requests_today("acct-a") == 1


# -- every answer is reported before its lease is completed -------------------------------------

@pytest.mark.parametrize("kind", ["chat", "stream"])
@pytest.mark.parametrize("mode", ["async", "sync"])
async def test_every_failed_attempt_is_reported_and_completed(start_broker, connect, emu,
                                                              key_at, clock, kind, mode):
    """An outage's attempts are each reported and completed as used, as the provider counted."""
    key_at(emu.base_url)
    emu.faults.outage = 503
    broker = await start_broker()
    if mode == "async":
        async with router(connect(broker), clock, max_attempts=3) as client:
            with pytest.raises(OpenRouterError) as err:
                await consume(client, kind)
    else:
        def run() -> pytest.ExceptionInfo[OpenRouterError]:
            sync, client = sync_router(broker, clock, max_attempts=3)
            with sync, client, pytest.raises(OpenRouterError) as raised:
                consume_sync(client, kind)
            return raised

        err = await asyncio.to_thread(run)
    assert [a.status for a in err.value.attempts] == [503] * 3
    assert await key_state(connect, broker) == (3, 0, 3)
    assert emu.free_requests_today("acct-a") == 3


# -- KeyboardInterrupt in the sync client (a real SIGINT to a child process) ---------------------

_CHILD = """
import os, signal, sys
# A shell that starts the suite in the background (no job control) hands every child
# SIGINT ignored; this child is about Ctrl-C, so it takes Python's usual handler back.
signal.signal(signal.SIGINT, signal.default_int_handler)
from keybroker_client import KeyBrokerClient, SyncOpenRouterClient
kind = os.environ["KB_KIND"]
with KeyBrokerClient(os.environ["KB_TARGET"], token=os.environ["KB_TOKEN"]) as broker, \\
        SyncOpenRouterClient(broker, "free", max_wait=0.0, max_attempts=1) as client:
    print("ready", flush=True)
    try:
        if kind == "chat":
            client.chat([{"role": "user", "content": "hello"}], model=os.environ["KB_MODEL"])
        else:
            with client.stream([{"role": "user", "content": "hello"}],
                               model=os.environ["KB_MODEL"]) as stream:
                for _chunk in stream:
                    print("chunk", flush=True)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(0)
    print("finished", flush=True)
    sys.exit(1)
"""


async def interrupt_child(broker: Any, kind: str,
                          when: Callable[[asyncio.StreamReader], Awaitable[None]]) -> None:
    """Run a sync client in a child process and send it SIGINT once ``when(stdout)`` returns;
    the child must then leave with KeyboardInterrupt."""
    env = {**os.environ, "KB_TARGET": f"127.0.0.1:{broker.port}", "KB_TOKEN": TOKENS["alice"],
           "KB_KIND": kind, "KB_MODEL": FREE}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(60):
            assert (await proc.stdout.readline()).strip() == b"ready"
            await when(proc.stdout)
            proc.send_signal(signal.SIGINT)
            rest, _ = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0 and b"interrupted" in rest, rest.decode()


@pytest.mark.parametrize("kind", ["chat", "stream"])
async def test_sync_interrupt_while_the_connect_hangs_refunds(start_broker, connect, key_at,
                                                              hanging, kind):
    """KeyboardInterrupt during a hanging connect completes the lease unused (refund)."""
    key_at(hanging)
    broker = await start_broker()

    async def connecting(_out: asyncio.StreamReader) -> None:
        await until_connecting(connect, broker)

    await interrupt_child(broker, kind, connecting)
    assert await key_state(connect, broker) == (0, 0, 0)


async def test_sync_interrupt_after_the_provider_counted_keeps_the_unit(start_broker, connect,
                                                                        emu, key_at):
    """KeyboardInterrupt while waiting for a counted answer completes the lease as used."""
    key_at(emu.base_url)
    emu.faults.latency = 5.0
    broker = await start_broker()

    async def counted(_out: asyncio.StreamReader) -> None:
        await wait_until(lambda: emu.free_requests_today("acct-a") == 1, timeout=30)

    await interrupt_child(broker, "chat", counted)
    assert await key_state(connect, broker) == (1, 0, 0)
    assert emu.free_requests_today("acct-a") == 1


async def test_sync_interrupt_inside_a_stream_reports_and_completes(start_broker, connect, emu,
                                                                    key_at):
    """KeyboardInterrupt while reading a stream reports what was seen and completes the lease."""
    key_at(emu.base_url)
    emu.faults.chunk_delay = 5.0
    broker = await start_broker()

    async def first_chunk(out: asyncio.StreamReader) -> None:
        assert (await out.readline()).strip() == b"chunk"

    await interrupt_child(broker, "stream", first_chunk)
    assert await key_state(connect, broker) == (1, 0, 1)
    assert emu.free_requests_today("acct-a") == 1
