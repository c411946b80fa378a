"""Health checking, reflection and graceful shutdown of the gRPC service."""

from __future__ import annotations

import dataclasses

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from tests.support import wait_until

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


async def health(port: int, service: str = "") -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        return (await stub.Check(health_pb2.HealthCheckRequest(service=service))).status


async def test_health_is_not_serving_until_keys_load(start_broker, put_keys, vault_settings):
    """Health says NOT_SERVING while keys cannot be loaded and SERVING once they are."""
    put_keys("free", [("k1", "acct-a")])
    broken = dataclasses.replace(vault_settings, token="not-a-valid-token", reload_interval=0.2)
    broker = await start_broker(wait_ready=False, vault=broken)
    assert await health(broker.port) == NOT_SERVING
    assert await health(broker.port, "keybroker.v1.KeyBroker") == NOT_SERVING
    assert not broker.engine.ready
    good = await start_broker(wait_ready=False)
    await wait_until(lambda: good.engine.ready)
    assert await health(good.port) == SERVING
    assert await health(good.port, "keybroker.v1.KeySource") == SERVING


async def test_reflection_lists_the_services(start_broker, put_keys):
    """Server reflection (what grpcurl uses) lists KeyBroker, KeyAdmin and Health."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}") as ch:
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        call = stub.ServerReflectionInfo()
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
    names = {s.name for s in reply.list_services_response.service}
    assert {"keybroker.v1.KeyBroker", "keybroker.v1.KeyAdmin",
            "grpc.health.v1.Health"} <= names


async def test_shutdown_reports_not_serving(start_broker, put_keys):
    """Stopping the broker turns health NOT_SERVING before the server goes away."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    assert await health(broker.port) == SERVING
    await broker.health.enter_graceful_shutdown()
    assert await health(broker.port) == NOT_SERVING
