"""The broker's exception tree. Adapters translate foreign errors into these at the edge;
the gRPC layer turns them into status codes in one table (``broker.api.errors``)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BackendUnavailable",
    "BrokerError",
    "InvalidArgument",
    "LeaseNotActive",
    "LeaseNotFound",
    "LeaseRevoked",
    "NotFound",
    "NotReady",
    "PermissionDenied",
    "QuotaExhausted",
    "QuotaViolation",
    "StartError",
    "TokenExpired",
    "TokenNotYetValid",
    "Unauthenticated",
]


class BrokerError(Exception):
    """Root of every error the broker raises on purpose."""

    reason = "BROKER_ERROR"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(BrokerError):
    """A request field is malformed or out of range."""

    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class NotFound(BrokerError):
    """A named pool or key does not exist."""

    reason = "NOT_FOUND"


class LeaseNotFound(NotFound):
    """No lease has this id."""


class LeaseNotActive(BrokerError):
    """The lease has expired or was completed, so it cannot be renewed."""

    reason = "LEASE_NOT_ACTIVE"


class LeaseRevoked(LeaseNotActive):
    """The lease was ended because its key was revoked (``keybroker keys revoke``): it cannot
    be renewed or replayed; ReportUsage and Complete on it are still accepted. Same status and
    reason as LeaseNotActive, so clients need nothing new; the message says why."""


class Unauthenticated(BrokerError):
    """No credentials, or credentials that name no principal."""

    reason = "UNAUTHENTICATED"


class TokenExpired(Unauthenticated):
    """A bearer token the policy knows, used after its ``not_after``."""

    reason = "TOKEN_EXPIRED"


class TokenNotYetValid(Unauthenticated):
    """A bearer token the policy knows, used before its ``not_before``."""

    reason = "TOKEN_NOT_YET_VALID"


class PermissionDenied(BrokerError):
    """The principal may not do this."""

    reason = "PERMISSION_DENIED"


class NotReady(BrokerError):
    """Keys are not loaded yet."""

    reason = "UNAVAILABLE"


class BackendUnavailable(BrokerError):
    """A backend (the state store, Vault, the model catalog, ...) cannot be reached.

    Attributes:
        backend: which one, set by the adapter's one translate function: ``store``,
            ``vault`` or ``catalog``; metrics count errors by it.
    """

    reason = "UNAVAILABLE"

    def __init__(self, message: str, *, backend: str) -> None:
        super().__init__(message)
        self.backend = backend


@dataclass(frozen=True)
class QuotaViolation:
    """One exhausted window, as reported in ``google.rpc.QuotaFailure``."""

    subject: str
    description: str


class QuotaExhausted(BrokerError):
    """No candidate key can take the request now.

    Attributes:
        retry_after: seconds until the earliest key can be granted again.
        violations: which windows or states blocked each candidate.
        cause: ``quota`` (windows full) or ``unhealthy`` (no key usable at all).
    """

    reason = "QUOTA_EXHAUSTED"

    def __init__(
        self,
        message: str,
        *,
        retry_after: float,
        violations: tuple[QuotaViolation, ...] = (),
        cause: str = "quota",
    ) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.violations = violations
        self.cause = cause


class StartError(Exception):
    """The broker or the dev stack cannot start for a reason outside its configuration (an
    address already in use, a dev stack already running): never an RPC status; the CLI prints
    the message as one line and exits 1."""
