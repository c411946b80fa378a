"""The Redis store's Lua scripts, one ``.lua`` file each (package data).

Each file opens with a comment documenting its KEYS and ARGV one by one
(tests/test_redis_scripts.py holds every call to it).
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["NAMES", "source"]

NAMES = ("active", "claim", "complete", "day_rows", "drop_day", "end_leases", "expire_due",
         "forget", "live", "prune", "renew", "report", "report_state", "reserve", "set_counter")


@functools.cache
def source(name: str) -> str:
    """The text of script ``name`` (``scripts/<name>.lua``)."""
    if name not in NAMES:
        raise ValueError(f"no Redis script {name!r}")
    return resources.files(__package__).joinpath(f"{name}.lua").read_text(encoding="utf-8")
