"""Named exceptions for broker errors, mapped from gRPC status in one place."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2, status_pb2

__all__ = [
    "BrokerError",
    "InvalidArgument",
    "LeaseNotActive",
    "NotFound",
    "PermissionDenied",
    "QuotaExhausted",
    "QuotaViolation",
    "Unauthenticated",
    "Unavailable",
    "from_rpc_error",
]


class BrokerError(Exception):
    """Root of every error the client raises for a broker answer.

    Attributes:
        code: the gRPC status code.
        reason: the ErrorInfo reason (e.g. ``QUOTA_EXHAUSTED``), or "".
    """

    def __init__(self, message: str, *, code: grpc.StatusCode, reason: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.reason = reason


class InvalidArgument(BrokerError):
    """A request field was rejected; ``field`` names it when the broker said which."""

    field: str = ""


class NotFound(BrokerError):
    """Unknown pool, key or lease."""


class LeaseNotActive(BrokerError):
    """The lease expired or was completed, or was ended because its key was revoked (the
    message says so): renewing or replaying it cannot succeed; lease again."""


class Unauthenticated(BrokerError):
    """No or bad credentials."""


class PermissionDenied(BrokerError):
    """The principal may not do this."""


class Unavailable(BrokerError):
    """The broker is not ready or a backend is down; safe to retry."""


@dataclass(frozen=True)
class QuotaViolation:
    subject: str
    description: str


class QuotaExhausted(BrokerError):
    """No key can take the request now.

    Attributes:
        retry_after: seconds until the earliest key frees up (from RetryInfo).
        violations: the windows or key states that blocked the request.
    """

    retry_after: float = 0.0
    violations: tuple[QuotaViolation, ...] = ()


_BY_CODE: dict[grpc.StatusCode, type[BrokerError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: InvalidArgument,
    grpc.StatusCode.NOT_FOUND: NotFound,
    grpc.StatusCode.FAILED_PRECONDITION: LeaseNotActive,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.PERMISSION_DENIED: PermissionDenied,
    grpc.StatusCode.RESOURCE_EXHAUSTED: QuotaExhausted,
    grpc.StatusCode.UNAVAILABLE: Unavailable,
}


def _status(err: grpc.RpcError) -> status_pb2.Status | None:
    for key, value in err.trailing_metadata() or ():  # type: ignore[attr-defined]
        if key == "grpc-status-details-bin":
            return status_pb2.Status.FromString(value)
    return None


def from_rpc_error(err: grpc.RpcError) -> BrokerError:
    """The named exception for a failed call (sync or asyncio)."""
    code: grpc.StatusCode = err.code()  # type: ignore[attr-defined]
    exc = _BY_CODE.get(code, BrokerError)(err.details() or code.name,  # type: ignore[attr-defined]
                                          code=code)
    status = _status(err)
    if status is None:
        return exc
    violations = []
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            exc.reason = info.reason
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR) and isinstance(exc, QuotaExhausted):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            exc.retry_after = retry.retry_delay.seconds + retry.retry_delay.nanos / 1e9
        elif detail.Is(error_details_pb2.QuotaFailure.DESCRIPTOR):
            failure = error_details_pb2.QuotaFailure()
            detail.Unpack(failure)
            violations += [QuotaViolation(v.subject, v.description) for v in failure.violations]
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR) and isinstance(exc, InvalidArgument):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            if bad.field_violations:
                exc.field = bad.field_violations[0].field
    if isinstance(exc, QuotaExhausted):
        exc.violations = tuple(violations)
    return exc
