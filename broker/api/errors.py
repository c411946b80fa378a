"""Domain errors -> gRPC status, in exactly one table, with rich details."""

from __future__ import annotations

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from ..errors import (
    BackendUnavailable,
    BrokerError,
    InvalidArgument,
    LeaseNotActive,
    NotFound,
    NotReady,
    PermissionDenied,
    QuotaExhausted,
    Unauthenticated,
)

__all__ = ["DOMAIN", "STATUS_TABLE", "internal_status", "to_status"]

DOMAIN = "keybroker.v1"

STATUS_TABLE: dict[type[BrokerError], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    LeaseNotActive: grpc.StatusCode.FAILED_PRECONDITION,
    Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    QuotaExhausted: grpc.StatusCode.RESOURCE_EXHAUSTED,
    NotReady: grpc.StatusCode.UNAVAILABLE,
    BackendUnavailable: grpc.StatusCode.UNAVAILABLE,
}


def _code(exc: BrokerError) -> grpc.StatusCode:
    for cls in type(exc).__mro__:
        if cls in STATUS_TABLE:
            return STATUS_TABLE[cls]
    return grpc.StatusCode.INTERNAL


def _pack(message: object) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)  # type: ignore[arg-type]
    return packed


def to_status(exc: BrokerError) -> grpc.Status:
    """The status a domain error is sent as: code, message and details."""
    code = _code(exc)
    details = [_pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN))]
    if isinstance(exc, InvalidArgument):
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=exc.field,
                                                        description=exc.message)])))
    if isinstance(exc, QuotaExhausted):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(exc.retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
        details.append(_pack(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=v.subject,
                                                     description=v.description)
            for v in exc.violations])))
    status = status_pb2.Status(code=code.value[0], message=exc.message, details=details)
    return rpc_status.to_status(status)


def internal_status() -> grpc.Status:
    """What an unexpected error is sent as: no text of the exception, which may hold data."""
    return rpc_status.to_status(status_pb2.Status(
        code=code_pb2.INTERNAL, message="internal error; see the broker log",
        details=[_pack(error_details_pb2.ErrorInfo(reason="INTERNAL", domain=DOMAIN))]))
