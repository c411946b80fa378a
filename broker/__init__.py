"""keybroker: a gRPC broker that leases API keys from a Vault-encrypted pool under quotas."""

from .app import Broker
from .clock import Clock, ManualClock, SystemClock
from .config import Settings, load_settings
from .engine import LeaseEngine
from .errors import BrokerError

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
