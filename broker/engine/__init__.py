"""The lease engine: quota-safe leases over a key pool.

It knows nothing of gRPC, Vault, SQLite or Redis. Its rooms: ``windows`` (names of
quota windows and health subjects), ``keys`` (the key registry), ``ledger`` (window
counts), ``healthbook`` with the pure ``health`` state machine, ``admission`` (pure
decisions), ``strategies``, ``leasing`` and ``admin``; ``LeaseEngine`` wires them.
"""

from .config import EngineConfig
from .facade import LeaseEngine
from .types import (
    Caller,
    InternalRoute,
    KeySnapshot,
    KeySource,
    KeyView,
    LeaseGrant,
    LeaseRequest,
    ModelChooser,
    ReloadResult,
)

__all__ = [
    "Caller",
    "EngineConfig",
    "InternalRoute",
    "KeySnapshot",
    "KeySource",
    "KeyView",
    "LeaseEngine",
    "LeaseGrant",
    "LeaseRequest",
    "ModelChooser",
    "ReloadResult",
]
