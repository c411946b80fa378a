"""keybroker: a gRPC broker that leases API keys from a Vault-encrypted pool under quotas.

The names below are imported on first use (PEP 562), so ``import broker`` (and every
``keybroker`` command that does not serve) loads neither gRPC, OpenTelemetry nor hvac.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .clock import Clock, ManualClock, SystemClock
    from .config import Settings, load_settings
    from .engine import LeaseEngine
    from .errors import BrokerError
    from .runtime import Broker

__all__ = [
    "Broker",
    "BrokerError",
    "Clock",
    "LeaseEngine",
    "ManualClock",
    "Settings",
    "SystemClock",
    "load_settings",
]

_HOMES = {"Broker": ".runtime", "BrokerError": ".errors", "Clock": ".clock",
          "LeaseEngine": ".engine", "ManualClock": ".clock", "Settings": ".config",
          "SystemClock": ".clock", "load_settings": ".config"}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home, __name__), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
