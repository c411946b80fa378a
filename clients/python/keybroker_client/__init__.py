"""keybroker client: lease API keys from a keybroker over gRPC.

    async with AsyncKeyBrokerClient("127.0.0.1:50051", token=TOKEN) as client:
        async with client.lease(pool="free", model="meta-llama/llama-3.3-70b-instruct:free") as lease:
            ...  # call lease.base_url with lease.api_key
            await lease.report(http_status=200, latency_ms=420)
"""

from ._client import AsyncKeyBrokerClient, KeyBrokerClient, Lease
from ._errors import (
    BrokerError,
    InvalidArgument,
    LeaseNotActive,
    NotFound,
    PermissionDenied,
    QuotaExhausted,
    QuotaViolation,
    Unauthenticated,
    Unavailable,
)
from .openrouter import (
    ChatResult,
    ChatStream,
    OpenRouterClient,
    OpenRouterError,
    RouteInternal,
    SyncChatStream,
    SyncOpenRouterClient,
)

__all__ = [
    "AsyncKeyBrokerClient",
    "BrokerError",
    "ChatResult",
    "ChatStream",
    "InvalidArgument",
    "KeyBrokerClient",
    "Lease",
    "LeaseNotActive",
    "NotFound",
    "OpenRouterClient",
    "OpenRouterError",
    "PermissionDenied",
    "QuotaExhausted",
    "QuotaViolation",
    "RouteInternal",
    "SyncChatStream",
    "SyncOpenRouterClient",
    "Unauthenticated",
    "Unavailable",
]
