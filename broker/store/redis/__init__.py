"""Redis state store: any number of broker replicas share one Redis or one Redis Cluster.

``store`` holds the ``RedisStore``, ``layout`` the key names (a table of every key),
``claims`` the request_id claims on a cluster, ``scripts/`` the Lua scripts.
"""

from .store import RedisStore
from .store import _translate_errors as _translate_errors  # the error mapping, pinned by a test

__all__ = ["RedisStore"]
