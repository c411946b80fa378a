import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]
    PRIORITY_NORMAL: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]

class Route(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ROUTE_UNSPECIFIED: _ClassVar[Route]
    ROUTE_EXTERNAL: _ClassVar[Route]
    ROUTE_INTERNAL: _ClassVar[Route]

class InternalReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERNAL_REASON_UNSPECIFIED: _ClassVar[InternalReason]
    INTERNAL_REASON_QUOTA_EXHAUSTED: _ClassVar[InternalReason]
    INTERNAL_REASON_RESERVED_FOR_HIGHER_PRIORITY: _ClassVar[InternalReason]
    INTERNAL_REASON_ALL_KEYS_UNHEALTHY: _ClassVar[InternalReason]
    INTERNAL_REASON_PACING: _ClassVar[InternalReason]
    INTERNAL_REASON_MODEL_COOLING_DOWN: _ClassVar[InternalReason]

class KeyHealth(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_HEALTH_UNSPECIFIED: _ClassVar[KeyHealth]
    KEY_HEALTH_HEALTHY: _ClassVar[KeyHealth]
    KEY_HEALTH_COOLING_DOWN: _ClassVar[KeyHealth]
    KEY_HEALTH_CIRCUIT_OPEN: _ClassVar[KeyHealth]
    KEY_HEALTH_DISABLED: _ClassVar[KeyHealth]

class LeaseState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_STATE_UNSPECIFIED: _ClassVar[LeaseState]
    LEASE_STATE_ACTIVE: _ClassVar[LeaseState]
    LEASE_STATE_COMPLETED: _ClassVar[LeaseState]
    LEASE_STATE_EXPIRED: _ClassVar[LeaseState]
    LEASE_STATE_REVOKED: _ClassVar[LeaseState]

class UsageDimension(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    USAGE_DIMENSION_UNSPECIFIED: _ClassVar[UsageDimension]
    USAGE_DIMENSION_DAY: _ClassVar[UsageDimension]
    USAGE_DIMENSION_KEY: _ClassVar[UsageDimension]
    USAGE_DIMENSION_ACCOUNT: _ClassVar[UsageDimension]
    USAGE_DIMENSION_MODEL: _ClassVar[UsageDimension]
    USAGE_DIMENSION_PRINCIPAL: _ClassVar[UsageDimension]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_HIGH: Priority
PRIORITY_NORMAL: Priority
PRIORITY_LOW: Priority
ROUTE_UNSPECIFIED: Route
ROUTE_EXTERNAL: Route
ROUTE_INTERNAL: Route
INTERNAL_REASON_UNSPECIFIED: InternalReason
INTERNAL_REASON_QUOTA_EXHAUSTED: InternalReason
INTERNAL_REASON_RESERVED_FOR_HIGHER_PRIORITY: InternalReason
INTERNAL_REASON_ALL_KEYS_UNHEALTHY: InternalReason
INTERNAL_REASON_PACING: InternalReason
INTERNAL_REASON_MODEL_COOLING_DOWN: InternalReason
KEY_HEALTH_UNSPECIFIED: KeyHealth
KEY_HEALTH_HEALTHY: KeyHealth
KEY_HEALTH_COOLING_DOWN: KeyHealth
KEY_HEALTH_CIRCUIT_OPEN: KeyHealth
KEY_HEALTH_DISABLED: KeyHealth
LEASE_STATE_UNSPECIFIED: LeaseState
LEASE_STATE_ACTIVE: LeaseState
LEASE_STATE_COMPLETED: LeaseState
LEASE_STATE_EXPIRED: LeaseState
LEASE_STATE_REVOKED: LeaseState
USAGE_DIMENSION_UNSPECIFIED: UsageDimension
USAGE_DIMENSION_DAY: UsageDimension
USAGE_DIMENSION_KEY: UsageDimension
USAGE_DIMENSION_ACCOUNT: UsageDimension
USAGE_DIMENSION_MODEL: UsageDimension
USAGE_DIMENSION_PRINCIPAL: UsageDimension

class LeaseKeyRequest(_message.Message):
    __slots__ = ("pool", "model", "units", "priority", "request_id", "ttl", "allow_internal")
    POOL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    ALLOW_INTERNAL_FIELD_NUMBER: _ClassVar[int]
    pool: str
    model: str
    units: int
    priority: Priority
    request_id: str
    ttl: _duration_pb2.Duration
    allow_internal: bool
    def __init__(self, pool: _Optional[str] = ..., model: _Optional[str] = ..., units: _Optional[int] = ..., priority: _Optional[_Union[Priority, str]] = ..., request_id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., allow_internal: _Optional[bool] = ...) -> None: ...

class LeaseKeyResponse(_message.Message):
    __slots__ = ("lease_id", "key_id", "api_key", "base_url", "model", "expires_at", "remaining_key_today", "remaining_account_today", "resets_at", "route", "internal_reason", "account", "units", "retry_after")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    API_KEY_FIELD_NUMBER: _ClassVar[int]
    BASE_URL_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REMAINING_KEY_TODAY_FIELD_NUMBER: _ClassVar[int]
    REMAINING_ACCOUNT_TODAY_FIELD_NUMBER: _ClassVar[int]
    RESETS_AT_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    INTERNAL_REASON_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    key_id: str
    api_key: str
    base_url: str
    model: str
    expires_at: _timestamp_pb2.Timestamp
    remaining_key_today: int
    remaining_account_today: int
    resets_at: _timestamp_pb2.Timestamp
    route: Route
    internal_reason: InternalReason
    account: str
    units: int
    retry_after: _duration_pb2.Duration
    def __init__(self, lease_id: _Optional[str] = ..., key_id: _Optional[str] = ..., api_key: _Optional[str] = ..., base_url: _Optional[str] = ..., model: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., remaining_key_today: _Optional[int] = ..., remaining_account_today: _Optional[int] = ..., resets_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., route: _Optional[_Union[Route, str]] = ..., internal_reason: _Optional[_Union[InternalReason, str]] = ..., account: _Optional[str] = ..., units: _Optional[int] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RenewLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "ttl")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TTL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    ttl: _duration_pb2.Duration
    def __init__(self, lease_id: _Optional[str] = ..., ttl: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class RenewLeaseResponse(_message.Message):
    __slots__ = ("expires_at",)
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReportUsageRequest(_message.Message):
    __slots__ = ("lease_id", "http_status", "error_type", "prompt_tokens", "completion_tokens", "cost", "latency_ms", "ratelimit_limit", "ratelimit_remaining", "ratelimit_reset_ms", "model", "retry_after", "error_reason", "limit_source", "upstream_provider", "resets_at")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    HTTP_STATUS_FIELD_NUMBER: _ClassVar[int]
    ERROR_TYPE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    RATELIMIT_LIMIT_FIELD_NUMBER: _ClassVar[int]
    RATELIMIT_REMAINING_FIELD_NUMBER: _ClassVar[int]
    RATELIMIT_RESET_MS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_FIELD_NUMBER: _ClassVar[int]
    ERROR_REASON_FIELD_NUMBER: _ClassVar[int]
    LIMIT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_PROVIDER_FIELD_NUMBER: _ClassVar[int]
    RESETS_AT_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    http_status: int
    error_type: str
    prompt_tokens: int
    completion_tokens: int
    cost: float
    latency_ms: int
    ratelimit_limit: int
    ratelimit_remaining: int
    ratelimit_reset_ms: int
    model: str
    retry_after: _duration_pb2.Duration
    error_reason: str
    limit_source: str
    upstream_provider: str
    resets_at: _timestamp_pb2.Timestamp
    def __init__(self, lease_id: _Optional[str] = ..., http_status: _Optional[int] = ..., error_type: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cost: _Optional[float] = ..., latency_ms: _Optional[int] = ..., ratelimit_limit: _Optional[int] = ..., ratelimit_remaining: _Optional[int] = ..., ratelimit_reset_ms: _Optional[int] = ..., model: _Optional[str] = ..., retry_after: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., error_reason: _Optional[str] = ..., limit_source: _Optional[str] = ..., upstream_provider: _Optional[str] = ..., resets_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class ReportUsageResponse(_message.Message):
    __slots__ = ("health", "cooldown_until")
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_UNTIL_FIELD_NUMBER: _ClassVar[int]
    health: KeyHealth
    cooldown_until: _timestamp_pb2.Timestamp
    def __init__(self, health: _Optional[_Union[KeyHealth, str]] = ..., cooldown_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CompleteRequest(_message.Message):
    __slots__ = ("lease_id", "used")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    USED_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    used: bool
    def __init__(self, lease_id: _Optional[str] = ..., used: _Optional[bool] = ...) -> None: ...

class CompleteResponse(_message.Message):
    __slots__ = ("state", "refunded")
    STATE_FIELD_NUMBER: _ClassVar[int]
    REFUNDED_FIELD_NUMBER: _ClassVar[int]
    state: LeaseState
    refunded: bool
    def __init__(self, state: _Optional[_Union[LeaseState, str]] = ..., refunded: _Optional[bool] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("pool", "page_size", "page_token")
    POOL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    pool: str
    page_size: int
    page_token: str
    def __init__(self, pool: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys", "cooldowns", "next_page_token")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    COOLDOWNS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeyInfo]
    cooldowns: _containers.RepeatedCompositeFieldContainer[Cooldown]
    next_page_token: str
    def __init__(self, keys: _Optional[_Iterable[_Union[KeyInfo, _Mapping]]] = ..., cooldowns: _Optional[_Iterable[_Union[Cooldown, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class Cooldown(_message.Message):
    __slots__ = ("scope", "pool", "name", "reason", "description", "until")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    UNTIL_FIELD_NUMBER: _ClassVar[int]
    scope: str
    pool: str
    name: str
    reason: str
    description: str
    until: _timestamp_pb2.Timestamp
    def __init__(self, scope: _Optional[str] = ..., pool: _Optional[str] = ..., name: _Optional[str] = ..., reason: _Optional[str] = ..., description: _Optional[str] = ..., until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class GetKeyRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class GetKeyResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: KeyInfo
    def __init__(self, key: _Optional[_Union[KeyInfo, _Mapping]] = ...) -> None: ...

class SetKeyEnabledRequest(_message.Message):
    __slots__ = ("key_id", "enabled", "reason")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    enabled: bool
    reason: str
    def __init__(self, key_id: _Optional[str] = ..., enabled: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class SetKeyEnabledResponse(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: KeyInfo
    def __init__(self, key: _Optional[_Union[KeyInfo, _Mapping]] = ...) -> None: ...

class ClearCooldownRequest(_message.Message):
    __slots__ = ("account", "key_id", "reason")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    account: str
    key_id: str
    reason: str
    def __init__(self, account: _Optional[str] = ..., key_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ClearCooldownResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[KeyInfo]
    def __init__(self, keys: _Optional[_Iterable[_Union[KeyInfo, _Mapping]]] = ...) -> None: ...

class RotateKeyRequest(_message.Message):
    __slots__ = ("key_id", "reason")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    reason: str
    def __init__(self, key_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RotateKeyResponse(_message.Message):
    __slots__ = ("old_key_id", "new_key_id")
    OLD_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    NEW_KEY_ID_FIELD_NUMBER: _ClassVar[int]
    old_key_id: str
    new_key_id: str
    def __init__(self, old_key_id: _Optional[str] = ..., new_key_id: _Optional[str] = ...) -> None: ...

class RevokeKeyRequest(_message.Message):
    __slots__ = ("key_id", "reason")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    reason: str
    def __init__(self, key_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RevokeKeyResponse(_message.Message):
    __slots__ = ("key_id", "provider_deleted", "leases_ended")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_DELETED_FIELD_NUMBER: _ClassVar[int]
    LEASES_ENDED_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    provider_deleted: bool
    leases_ended: int
    def __init__(self, key_id: _Optional[str] = ..., provider_deleted: _Optional[bool] = ..., leases_ended: _Optional[int] = ...) -> None: ...

class ProvisionKeysRequest(_message.Message):
    __slots__ = ("account", "pool", "count", "limit", "limit_reset", "expires_in", "base_url", "models")
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_RESET_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_IN_FIELD_NUMBER: _ClassVar[int]
    BASE_URL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    account: str
    pool: str
    count: int
    limit: float
    limit_reset: str
    expires_in: _duration_pb2.Duration
    base_url: str
    models: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, account: _Optional[str] = ..., pool: _Optional[str] = ..., count: _Optional[int] = ..., limit: _Optional[float] = ..., limit_reset: _Optional[str] = ..., expires_in: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., base_url: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ...) -> None: ...

class ProvisionKeysResponse(_message.Message):
    __slots__ = ("key_ids",)
    KEY_IDS_FIELD_NUMBER: _ClassVar[int]
    key_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, key_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReloadKeysRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadKeysResponse(_message.Message):
    __slots__ = ("added", "removed", "updated", "total")
    ADDED_FIELD_NUMBER: _ClassVar[int]
    REMOVED_FIELD_NUMBER: _ClassVar[int]
    UPDATED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    added: int
    removed: int
    updated: int
    total: int
    def __init__(self, added: _Optional[int] = ..., removed: _Optional[int] = ..., updated: _Optional[int] = ..., total: _Optional[int] = ...) -> None: ...

class KeyInfo(_message.Message):
    __slots__ = ("key_id", "pool", "name", "account", "base_url", "models", "enabled", "health", "health_reason", "cooldown_until", "used_today", "account_daily_limit", "account_minute_limit", "account_used_today", "account_remaining_today", "key_daily_limit", "active_leases", "strategy", "created_at", "next_rotation_at", "key_minute_limit")
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    BASE_URL_FIELD_NUMBER: _ClassVar[int]
    MODELS_FIELD_NUMBER: _ClassVar[int]
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REASON_FIELD_NUMBER: _ClassVar[int]
    COOLDOWN_UNTIL_FIELD_NUMBER: _ClassVar[int]
    USED_TODAY_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_DAILY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_MINUTE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_USED_TODAY_FIELD_NUMBER: _ClassVar[int]
    ACCOUNT_REMAINING_TODAY_FIELD_NUMBER: _ClassVar[int]
    KEY_DAILY_LIMIT_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_LEASES_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROTATION_AT_FIELD_NUMBER: _ClassVar[int]
    KEY_MINUTE_LIMIT_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    pool: str
    name: str
    account: str
    base_url: str
    models: _containers.RepeatedScalarFieldContainer[str]
    enabled: bool
    health: KeyHealth
    health_reason: str
    cooldown_until: _timestamp_pb2.Timestamp
    used_today: int
    account_daily_limit: int
    account_minute_limit: int
    account_used_today: int
    account_remaining_today: int
    key_daily_limit: int
    active_leases: int
    strategy: str
    created_at: _timestamp_pb2.Timestamp
    next_rotation_at: _timestamp_pb2.Timestamp
    key_minute_limit: int
    def __init__(self, key_id: _Optional[str] = ..., pool: _Optional[str] = ..., name: _Optional[str] = ..., account: _Optional[str] = ..., base_url: _Optional[str] = ..., models: _Optional[_Iterable[str]] = ..., enabled: _Optional[bool] = ..., health: _Optional[_Union[KeyHealth, str]] = ..., health_reason: _Optional[str] = ..., cooldown_until: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., used_today: _Optional[int] = ..., account_daily_limit: _Optional[int] = ..., account_minute_limit: _Optional[int] = ..., account_used_today: _Optional[int] = ..., account_remaining_today: _Optional[int] = ..., key_daily_limit: _Optional[int] = ..., active_leases: _Optional[int] = ..., strategy: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., next_rotation_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_minute_limit: _Optional[int] = ...) -> None: ...

class GetUsageRequest(_message.Message):
    __slots__ = ("days", "group_by", "pool", "page_size", "page_token")
    DAYS_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_FIELD_NUMBER: _ClassVar[int]
    POOL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    days: int
    group_by: _containers.RepeatedScalarFieldContainer[UsageDimension]
    pool: str
    page_size: int
    page_token: str
    def __init__(self, days: _Optional[int] = ..., group_by: _Optional[_Iterable[_Union[UsageDimension, str]]] = ..., pool: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class GetUsageResponse(_message.Message):
    __slots__ = ("rows", "next_page_token")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    rows: _containers.RepeatedCompositeFieldContainer[UsageRow]
    next_page_token: str
    def __init__(self, rows: _Optional[_Iterable[_Union[UsageRow, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class UsageRow(_message.Message):
    __slots__ = ("group", "requests", "failures", "prompt_tokens", "completion_tokens", "cost", "latency_ms_avg", "latency_ms_p50", "latency_ms_p95", "latency_ms_p99")
    GROUP_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_AVG_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_P50_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_P95_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_P99_FIELD_NUMBER: _ClassVar[int]
    group: _containers.RepeatedScalarFieldContainer[str]
    requests: int
    failures: int
    prompt_tokens: int
    completion_tokens: int
    cost: float
    latency_ms_avg: float
    latency_ms_p50: float
    latency_ms_p95: float
    latency_ms_p99: float
    def __init__(self, group: _Optional[_Iterable[str]] = ..., requests: _Optional[int] = ..., failures: _Optional[int] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., cost: _Optional[float] = ..., latency_ms_avg: _Optional[float] = ..., latency_ms_p50: _Optional[float] = ..., latency_ms_p95: _Optional[float] = ..., latency_ms_p99: _Optional[float] = ...) -> None: ...
