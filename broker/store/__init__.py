"""State stores: counters, leases, health, usage and idempotency records."""

from .base import (
    Budget,
    Candidate,
    Rejection,
    ReportState,
    ReportWrite,
    Reservation,
    ReserveRequest,
    StateStore,
)

__all__ = ["Budget", "Candidate", "Rejection", "ReportState", "ReportWrite", "Reservation",
           "ReserveRequest", "StateStore"]
