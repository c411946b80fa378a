"""State stores: counters, leases, health, usage and idempotency records."""

from .base import Candidate, Rejection, Reservation, ReserveRequest, StateStore

__all__ = ["Candidate", "Rejection", "Reservation", "ReserveRequest", "StateStore"]
