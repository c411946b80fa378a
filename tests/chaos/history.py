"""What a campaign records: every operation a client invoked and every fault the nemesis ran."""

from __future__ import annotations

import dataclasses
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Fault", "History", "Op"]

OK, FAIL, UNKNOWN = "ok", "fail", "unknown"
# Codes after which the request may or may not have reached the store.
UNKNOWN_CODES = frozenset({"UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED", "CLIENT_TIMEOUT"})


@dataclass
class Op:
    """One call: what was asked, where, when, and what came back.

    ``outcome`` is ok, fail (a definite error: the broker answered with a status that says
    nothing changed) or unknown (a timeout or UNAVAILABLE: it may or may not have happened).
    """

    id: int
    kind: str  # lease, renew, report, complete, enable, check
    client: int
    replica: int
    principal: str
    invoke: float  # real (monotonic-free) wall time, time.time()
    args: dict[str, Any] = field(default_factory=dict)
    complete: float = 0.0
    outcome: str = ""
    code: str = ""
    result: dict[str, Any] = field(default_factory=dict)

    def line(self) -> str:
        res = f" {self.result}" if self.result else ""
        code = f" {self.code}" if self.code else ""
        return (f"#{self.id:<6} {self.invoke:.3f}..{self.complete:.3f} c{self.client:<2} "
                f"r{self.replica} {self.principal:<5} {self.kind:<8} {self.args} -> "
                f"{self.outcome}{code}{res}")


@dataclass
class Fault:
    """One nemesis action: active from ``start`` until ``healed`` (the system is whole again:
    a restarted replica SERVING, Redis answering, OpenBao holding its keys)."""

    kind: str
    target: str
    start: float
    healed: float = 0.0
    detail: str = ""

    def line(self) -> str:
        return f"fault {self.kind}({self.target}) {self.start:.3f}..{self.healed:.3f} {self.detail}"


@dataclass
class History:
    ops: list[Op] = field(default_factory=list)
    faults: list[Fault] = field(default_factory=list)
    # replica index -> [(since real time, clock offset)]
    offsets: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    def begin(self, kind: str, client: int, replica: int, principal: str, now: float,
              **args: Any) -> Op:
        op = Op(next(self._ids), kind, client, replica, principal, now, dict(args))
        self.ops.append(op)
        return op

    def dump(self, path: Path) -> None:
        """Every operation and fault, one JSON object a line (kept with a failing run)."""
        with path.open("w") as out:
            for f in self.faults:
                out.write(json.dumps({"fault": dataclasses.asdict(f)}) + "\n")
            for op in self.ops:
                out.write(json.dumps({"op": dataclasses.asdict(op)}, default=str) + "\n")

    def offset_at(self, replica: int, when: float) -> float:
        """The clock offset the replica ran with at real time ``when``."""
        current = 0.0
        for since, offset in self.offsets.get(replica, []):
            if since <= when:
                current = offset
        return current
