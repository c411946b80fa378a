"""The RPC vocabulary shared by access control and the lease engine.

Members are the method names of the proto's ``KeyBroker`` and ``KeyAdmin`` services (a
test holds them equal to the descriptors); policy files name RPCs by the same strings.
"""

from __future__ import annotations

import enum

__all__ = ["KEY_ADMIN_RPCS", "KEY_BROKER_RPCS", "Rpc"]


class Rpc(enum.StrEnum):
    """One RPC of the broker, by its proto method name."""

    # KeyBroker
    LEASE_KEY = "LeaseKey"
    RENEW_LEASE = "RenewLease"
    REPORT_USAGE = "ReportUsage"
    COMPLETE = "Complete"
    # KeyAdmin
    LIST_KEYS = "ListKeys"
    GET_KEY = "GetKey"
    SET_KEY_ENABLED = "SetKeyEnabled"
    RELOAD_KEYS = "ReloadKeys"
    GET_USAGE = "GetUsage"
    CLEAR_COOLDOWN = "ClearCooldown"
    ROTATE_KEY = "RotateKey"
    REVOKE_KEY = "RevokeKey"
    PROVISION_KEYS = "ProvisionKeys"


KEY_BROKER_RPCS: frozenset[Rpc] = frozenset(
    {Rpc.LEASE_KEY, Rpc.RENEW_LEASE, Rpc.REPORT_USAGE, Rpc.COMPLETE})
"""The methods of ``keybroker.v1.KeyBroker``."""
KEY_ADMIN_RPCS: frozenset[Rpc] = frozenset(set(Rpc) - KEY_BROKER_RPCS)
"""The methods of ``keybroker.v1.KeyAdmin``."""
