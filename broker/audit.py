"""The audit trail: one structured record per decision, through structlog."""

from __future__ import annotations

from typing import Any

import structlog

__all__ = ["Audit"]


class Audit:
    """Writes audit records as structlog events named ``<subject>.<decision>``.

    Records carry who (principal), which RPC, pool, key_id (never the secret),
    decision, reason and remaining quota. Trace and span ids are added by the
    logging processors when a span is current.
    """

    def __init__(self, logger: Any = None) -> None:
        self._log = logger if logger is not None else structlog.get_logger("keybroker.audit")

    def record(self, event: str, *, decision: str, principal: str = "", rpc: str = "",
               pool: str = "", key_id: str = "", reason: str = "",
               **fields: Any) -> None:
        self._log.info(event, audit=True, decision=decision, principal=principal, rpc=rpc,
                       pool=pool, key_id=key_id, reason=reason, **fields)
