"""The Admin gRPC service (`pdserve.v1.Admin`) on a router: each call becomes a typed AdminCommand that the
process owning the pools executes (metastore/admin.py has the channel, pdserve/admin_executor.py the executor);
the router only checks the arguments it can check alone and turns the typed reply into a response or a status."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import Counter
from typing import Any

import grpc
import redis

import api.v1.pdserve_pb2 as pb
from metastore.admin import AdminChannel, AdminCommand, AdminReply
from metastore.store import ROLES
from router.access import AccessControl
from router.generation import RequestError
from router.wire import refuse_undecodable

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 300.0  # a call without a deadline waits this long for the executor's reply


class AdminService:
    def __init__(self, channel: AdminChannel, auth_required: bool = False) -> None:
        """`auth_required` (the YAML has `auth.api_keys`): every call needs a key whose entry says `admin: true`,
        checked against the router's keys (`access`, set when the router attaches; until then: UNAVAILABLE)."""
        self.channel, self.auth_required = channel, auth_required
        self.access: AccessControl | None = None
        self.counters: Counter[str] = Counter()  # calls per op, and failures: no_reply, redis_errors, refused

    async def Scale(self, request: pb.ScaleRequest, context: grpc.aio.ServicerContext) -> pb.AdminResponse:
        await refuse_undecodable(request, context)
        await self._authorize(context)
        await self._check_role(request.role, context)
        if request.replicas < 0:
            await self._refuse(context, f"replicas: {request.replicas} must be >= 0")
        return await self._call(AdminCommand("scale", role=request.role, replicas=request.replicas), context)

    async def SetRole(self, request: pb.SetRoleRequest, context: grpc.aio.ServicerContext) -> pb.AdminResponse:
        await refuse_undecodable(request, context)
        await self._authorize(context)
        await self._check_role(request.role, context)
        if not request.instance_id:
            await self._refuse(context, "instance_id is empty")
        return await self._call(AdminCommand("set_role", role=request.role, instance_id=request.instance_id),
                                context)

    async def Drain(self, request: pb.DrainRequest, context: grpc.aio.ServicerContext) -> pb.AdminResponse:
        await refuse_undecodable(request, context)
        await self._authorize(context)
        if not request.instance_id:
            await self._refuse(context, "instance_id is empty")
        return await self._call(AdminCommand("drain", instance_id=request.instance_id), context)

    async def Apply(self, request: pb.ApplyRequest, context: grpc.aio.ServicerContext) -> pb.AdminResponse:
        await refuse_undecodable(request, context)
        await self._authorize(context)
        try:
            config = json.loads(request.config_json)
        except ValueError as e:
            config = None
            await self._refuse(context, f"config_json is not JSON: {e}")
        if not isinstance(config, dict):
            await self._refuse(context, "config_json must be a JSON object (the serving YAML's mapping)")
        return await self._call(AdminCommand("apply", config=config), context)

    # ---- helpers -------------------------------------------------------------------------------------------
    async def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        """With auth on: UNAUTHENTICATED without a valid key, PERMISSION_DENIED for a key without `admin: true`.
        NOTE: memory only (the router's key ring), like the public service's check."""
        if not self.auth_required:
            return
        if self.access is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the router is starting: try again")
        assert self.access is not None
        try:
            key = self.access.authenticate_grpc(context)
        except RequestError as e:
            self.counters["unauthenticated"] += 1
            await context.abort(e.code, e.message)
        if key is None or not key.admin:
            self.counters["permission_denied"] += 1
            name = key.name if key is not None else "?"
            log.warning("admin call refused: key %r has no admin rights", name)
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"key {name!r} may not use the Admin service (its entry needs `admin: true`)")

    async def _check_role(self, role: str, context: grpc.aio.ServicerContext) -> None:
        if role not in ROLES:
            await self._refuse(context, f"role {role!r} is not one of {', '.join(ROLES)}")

    async def _refuse(self, context: grpc.aio.ServicerContext, message: str) -> None:
        self.counters["refused"] += 1
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    async def _call(self, command: AdminCommand, context: grpc.aio.ServicerContext) -> pb.AdminResponse:
        remaining = context.time_remaining()
        timeout = DEFAULT_TIMEOUT_S if remaining is None else max(1.0, remaining - 0.5)
        command = dataclasses.replace(command, deadline=time.time() + timeout)
        self.counters[command.op] += 1
        log.info("admin %s %s: posted for the pools' owner", command.op, command.id)
        try:
            reply = await asyncio.to_thread(self.channel.call, command, timeout)
        except redis.RedisError as e:
            self.counters["redis_errors"] += 1
            log.warning("admin %s %s: metadata store unreachable: %s", command.op, command.id, e)
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"metadata store unreachable: {e}")
        if reply is None:
            self.counters["no_reply"] += 1
            log.warning("admin %s %s: no reply within %.0f s", command.op, command.id, timeout)
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"no reply from `pdserve serve` within {timeout:.0f} s (is it running?)")
        return await self._response(reply, context)

    @staticmethod
    async def _response(reply: AdminReply, context: grpc.aio.ServicerContext) -> Any:
        if reply.error:
            code = getattr(grpc.StatusCode, reply.code or "INTERNAL", grpc.StatusCode.INTERNAL)
            await context.abort(code, reply.error)
        return pb.AdminResponse(changes=reply.changes, needs_restart=reply.needs_restart,
                                pools={r: pb.PoolMembers(instance_ids=ids) for r, ids in reply.pools.items()})

    def close(self) -> None:
        self.channel.close()
