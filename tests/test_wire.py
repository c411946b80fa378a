"""Bodies that do not parse as the request message: a clear status, never UNKNOWN or INTERNAL."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import message as pb_message
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from keybroker_client.v1 import keybroker_pb2 as pb

from tests.support import TOKENS

# Every RPC of both services, from the proto's descriptors: (path, request class).
METHODS = [(f"/{s.full_name}/{m.name}", m.input_type.name)
           for s in pb.DESCRIPTOR.services_by_name.values() for m in s.methods]
SAMPLES: dict[str, pb_message.Message] = {
    "LeaseKeyRequest": pb.LeaseKeyRequest(pool="free", model="m", request_id="r-1", units=1),
    "RenewLeaseRequest": pb.RenewLeaseRequest(lease_id="ls_" + "0" * 32),
    "ReportUsageRequest": pb.ReportUsageRequest(lease_id="ls_" + "0" * 32, http_status=200,
                                                model="some/model", error_type="x"),
    "CompleteRequest": pb.CompleteRequest(lease_id="ls_" + "0" * 32, used=True),
    "GetKeyRequest": pb.GetKeyRequest(key_id="free/k1"),
    "SetKeyEnabledRequest": pb.SetKeyEnabledRequest(key_id="free/k1", reason="why"),
}


def _parses(request_type: str, body: bytes) -> bool:
    try:
        getattr(pb, request_type).FromString(body)
    except Exception:
        return False
    return True


def _bodies(request_type: str, rng: random.Random, count: int) -> list[bytes]:
    """``count`` random bodies plus every truncation of a filled-in sample, plus `0a02fffe`."""
    out = [bytes.fromhex("0a02fffe"), bytes.fromhex("0a05ff"), b"\xff" * 8]
    sample = SAMPLES.get(request_type)
    if sample is not None:
        full = sample.SerializeToString()
        out += [full[:i] for i in range(1, len(full))]
    for _ in range(count):
        size = rng.randint(1, 40)
        body = bytes(rng.getrandbits(8) for _ in range(size))
        if rng.random() < 0.5:  # a plausible tag first: field 1, length-delimited
            body = b"\x0a" + bytes([rng.randint(1, 60)]) + body
        out.append(body)
    return out


async def _send(call: Any, body: bytes, metadata: Any) -> tuple[bytes, Any]:
    try:
        await call(body, metadata=metadata, timeout=20)
    except grpc.aio.AioRpcError as exc:
        return body, exc
    return body, None


@pytest.mark.timeout(240)
async def test_undecodable_bodies_never_answer_unknown_or_internal(
        start_broker: Callable[..., Any], put_keys: Callable[..., Any]) -> None:
    """Thousands of random and truncated bodies to every RPC of both services answer
    UNAUTHENTICATED without credentials and, with them, INVALID_ARGUMENT with ErrorInfo and
    BadRequest when the body does not parse; no call ever answers UNKNOWN or INTERNAL."""
    put_keys("free", [("k1", "acct-a")])
    broker = await start_broker()
    rng = random.Random(12)
    seen_undecodable = 0
    async with grpc.aio.insecure_channel(f"127.0.0.1:{broker.port}") as channel:
        for path, request_type in METHODS:
            call = channel.unary_unary(path, request_serializer=None,
                                       response_deserializer=None)
            bodies = _bodies(request_type, rng, 100)
            for who in (None, "admin"):
                metadata = (("authorization", f"Bearer {TOKENS[who]}"),) if who else ()

                results = []
                for i in range(0, len(bodies), 50):
                    results += await asyncio.gather(*(_send(call, b, metadata)
                                                      for b in bodies[i:i + 50]))
                for body, exc in results:
                    code = exc.code() if exc is not None else grpc.StatusCode.OK
                    assert code not in (grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL), (
                        path, body.hex(), exc and exc.details())
                    if who is None:
                        assert code is grpc.StatusCode.UNAUTHENTICATED, (path, body.hex())
                        continue
                    if _parses(request_type, body):
                        continue
                    seen_undecodable += 1
                    assert code is grpc.StatusCode.INVALID_ARGUMENT, (path, body.hex(), code)
                    status = rpc_status.from_call(exc)
                    assert status is not None
                    kinds = {d.type_url.rsplit(".", 1)[-1] for d in status.details}
                    assert {"ErrorInfo", "BadRequest"} <= kinds, kinds
                    info = error_details_pb2.ErrorInfo()
                    status.details[0].Unpack(info)
                    assert info.reason == "INVALID_ARGUMENT"
                    assert "DecodeError" not in exc.details()
    assert seen_undecodable > 100
