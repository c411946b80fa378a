"""Thin servicers: proto in, engine call, proto out. Nothing else lives here."""

from __future__ import annotations

from typing import Any

from keybroker_client.v1 import keybroker_pb2 as pb
from keybroker_client.v1 import keybroker_pb2_grpc as pb_grpc

from ..engine import LeaseEngine
from ..errors import InvalidArgument, NotReady
from ..lifecycle import KeyLifecycle
from .convert import (
    cooldown_to_pb,
    grant_to_pb,
    health_to_pb,
    key_view_to_pb,
    lease_request,
    lease_state_to_pb,
    seconds,
    timestamp,
    usage_dimensions,
    usage_report,
    usage_row_to_pb,
)
from .interceptor import current_caller

__all__ = ["KeyAdminServicer", "KeyBrokerServicer"]

Ctx = Any  # grpc.aio.ServicerContext; unused by these handlers


class KeyBrokerServicer(pb_grpc.KeyBrokerServicer):  # type: ignore[misc]
    def __init__(self, engine: LeaseEngine) -> None:
        self._engine = engine

    async def LeaseKey(self, request: pb.LeaseKeyRequest, context: Ctx) -> pb.LeaseKeyResponse:
        return grant_to_pb(await self._engine.lease(current_caller(), lease_request(request)))

    async def RenewLease(self, request: pb.RenewLeaseRequest,
                         context: Ctx) -> pb.RenewLeaseResponse:
        ttl = seconds(request.ttl) if request.HasField("ttl") else None
        lease = await self._engine.renew(current_caller(), request.lease_id, ttl)
        return pb.RenewLeaseResponse(expires_at=timestamp(lease.expires_at))

    async def ReportUsage(self, request: pb.ReportUsageRequest,
                          context: Ctx) -> pb.ReportUsageResponse:
        health = await self._engine.report(current_caller(), request.lease_id,
                                           usage_report(request))
        return health_to_pb(health)

    async def Complete(self, request: pb.CompleteRequest, context: Ctx) -> pb.CompleteResponse:
        used = request.used if request.HasField("used") else True
        lease = await self._engine.complete(current_caller(), request.lease_id, used)
        return pb.CompleteResponse(state=lease_state_to_pb(lease.status),
                                   refunded=lease.refunded)


class KeyAdminServicer(pb_grpc.KeyAdminServicer):  # type: ignore[misc]
    def __init__(self, engine: LeaseEngine, lifecycle: KeyLifecycle | None = None) -> None:
        self._engine = engine
        self._lifecycle = lifecycle

    def _keys(self) -> KeyLifecycle:
        if self._lifecycle is None:
            raise NotReady("key lifecycle needs keys in Vault; this broker reads them "
                           "from elsewhere")
        return self._lifecycle

    def _info(self, view: Any) -> pb.KeyInfo:
        info = key_view_to_pb(view)
        if self._lifecycle is not None:
            created, due = self._lifecycle.schedule_of(view.key.key_id)
            if created is not None:
                info.created_at.CopyFrom(timestamp(created))
            if due is not None:
                info.next_rotation_at.CopyFrom(timestamp(due))
        return info

    async def RotateKey(self, request: pb.RotateKeyRequest,
                        context: Ctx) -> pb.RotateKeyResponse:
        done = await self._keys().rotate(current_caller(), request.key_id,
                                         request.reason or "operator")
        return pb.RotateKeyResponse(old_key_id=done.old_key_id, new_key_id=done.new_key_id)

    async def RevokeKey(self, request: pb.RevokeKeyRequest,
                        context: Ctx) -> pb.RevokeKeyResponse:
        done = await self._keys().revoke(current_caller(), request.key_id,
                                         request.reason or "leaked")
        return pb.RevokeKeyResponse(key_id=request.key_id, provider_deleted=done.provider_deleted,
                                    leases_ended=done.leases_ended)

    async def ProvisionKeys(self, request: pb.ProvisionKeysRequest,
                            context: Ctx) -> pb.ProvisionKeysResponse:
        expires = seconds(request.expires_in) if request.HasField("expires_in") else None
        if request.count < 0:
            raise InvalidArgument("count", "must be 1 to 100")
        made = await self._keys().provision(
            current_caller(), account=request.account, pool=request.pool,
            count=request.count or 1, limit=request.limit if request.HasField("limit") else None,
            limit_reset=request.limit_reset or None, expires_in=expires,
            base_url=request.base_url, models=tuple(request.models))
        return pb.ProvisionKeysResponse(key_ids=made)

    async def ListKeys(self, request: pb.ListKeysRequest, context: Ctx) -> pb.ListKeysResponse:
        caller = current_caller()
        page = await self._engine.list_keys(caller, request.pool, request.page_size,
                                            request.page_token)
        cooldowns = ([] if request.page_token  # pool-wide, not per key: the first page's
                     else await self._engine.cooldowns(caller, request.pool))
        return pb.ListKeysResponse(keys=[self._info(v) for v in page.items],
                                   cooldowns=[cooldown_to_pb(*c) for c in cooldowns],
                                   next_page_token=page.next_page_token)

    async def GetKey(self, request: pb.GetKeyRequest, context: Ctx) -> pb.GetKeyResponse:
        view = await self._engine.get_key(current_caller(), request.key_id)
        return pb.GetKeyResponse(key=self._info(view))

    async def SetKeyEnabled(self, request: pb.SetKeyEnabledRequest,
                            context: Ctx) -> pb.SetKeyEnabledResponse:
        view = await self._engine.set_enabled(current_caller(), request.key_id, request.enabled,
                                              request.reason)
        return pb.SetKeyEnabledResponse(key=self._info(view))

    async def ClearCooldown(self, request: pb.ClearCooldownRequest,
                            context: Ctx) -> pb.ClearCooldownResponse:
        views = await self._engine.clear_cooldown(current_caller(), request.account,
                                                  request.key_id, request.reason)
        return pb.ClearCooldownResponse(keys=[self._info(v) for v in views])

    async def GetUsage(self, request: pb.GetUsageRequest, context: Ctx) -> pb.GetUsageResponse:
        page = await self._engine.usage(current_caller(), request.days or 7,
                                        usage_dimensions(request.group_by), request.pool,
                                        request.page_size, request.page_token)
        return pb.GetUsageResponse(rows=[usage_row_to_pb(s) for s in page.items],
                                   next_page_token=page.next_page_token)

    async def ReloadKeys(self, request: pb.ReloadKeysRequest,
                         context: Ctx) -> pb.ReloadKeysResponse:
        r = await self._engine.reload(current_caller())
        return pb.ReloadKeysResponse(added=r.added, removed=r.removed, updated=r.updated,
                                     total=r.total)
