"""The router's gRPC handlers, registered with request parsers that never raise.

NOTE: with the generated `add_PDServeServicer_to_server`, bytes that do not parse as the request message (or
carry invalid UTF-8 in a string field) raise inside gRPC's deserializer: the client gets UNKNOWN and the server
logs a traceback per request. Here such a request reaches the servicer as an `Undecodable` value, which it
refuses with INVALID_ARGUMENT; the refusals are logged at WARNING at most once per interval, with a count.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError, Message

import api.v1.pdserve_pb2 as pb
from engine.priority import Priority
from router.generation import GenerateInput, Output, RequestError
from router.request import sampling_params

log = logging.getLogger(__name__)

SERVICE = pb.DESCRIPTOR.services_by_name["PDServe"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name


@dataclass(frozen=True)
class Undecodable:
    """A request whose bytes did not parse."""

    method: str
    num_bytes: int
    error: str


class RateLimitedWarning:
    """Logs the first event, then at most one line per `interval_s` saying how many came meanwhile."""

    def __init__(self, logger: logging.Logger, interval_s: float = 10.0) -> None:
        self.logger, self.interval_s = logger, interval_s
        self.count = 0  # events in all
        self._lock = threading.Lock()
        self._next = 0.0
        self._suppressed = 0

    def warn(self, message: str) -> None:
        with self._lock:
            self.count += 1
            now = time.monotonic()
            if now < self._next:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._next = self._suppressed, 0, now + self.interval_s
        more = f" ({suppressed} more since the last such line)" if suppressed else ""
        self.logger.warning("%s%s", message, more)


UNDECODABLE = RateLimitedWarning(log)


def _parser(cls: type[Message], method: str) -> Callable[[bytes], Message | Undecodable]:
    def parse(raw: bytes) -> Message | Undecodable:
        try:
            return cls.FromString(raw)
        except (DecodeError, UnicodeDecodeError, ValueError) as e:
            return Undecodable(method, len(raw), str(e) or type(e).__name__)

    return parse


async def refuse_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    """Abort the call with INVALID_ARGUMENT if its request did not parse (call first in every RPC)."""
    if isinstance(request, Undecodable):
        UNDECODABLE.warn(f"refused {UNDECODABLE.count + 1} undecodable request(s); latest: {request.method}, "
                         f"{request.num_bytes} bytes: {request.error}")
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"the request is not a valid {request.method} message: {request.error}")


def add_router_to_server(servicer: Any, server: grpc.aio.Server) -> None:
    """Register `servicer`'s four RPCs (the PDServe service) on `server`."""
    handlers = {}
    for name, request, response, streams in (
            ("Generate", pb.GenerateRequest, pb.GenerateResponse, True),
            ("Abort", pb.AbortRequest, pb.AbortResponse, False),
            ("GetModelInfo", pb.GetModelInfoRequest, pb.ModelInfo, False),
            ("GetLoads", pb.GetLoadsRequest, pb.GetLoadsResponse, False)):
        make = grpc.unary_stream_rpc_method_handler if streams else grpc.unary_unary_rpc_method_handler
        handlers[name] = make(getattr(servicer, name), request_deserializer=_parser(request, request.__name__),
                              response_serializer=response.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
    server.add_registered_method_handlers(SERVICE, handlers)


def add_admin_to_server(servicer: Any, server: grpc.aio.Server) -> None:
    """Register `servicer`'s Admin RPCs (router/admin_service.py) on `server`, with the same parsers."""
    handlers = {}
    for name, request in (("Scale", pb.ScaleRequest), ("SetRole", pb.SetRoleRequest), ("Drain", pb.DrainRequest),
                          ("Apply", pb.ApplyRequest)):
        handlers[name] = grpc.unary_unary_rpc_method_handler(
            getattr(servicer, name), request_deserializer=_parser(request, request.__name__),
            response_serializer=pb.AdminResponse.SerializeToString)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(ADMIN_SERVICE, handlers),))
    server.add_registered_method_handlers(ADMIN_SERVICE, handlers)


def generate_input(request: pb.GenerateRequest, time_remaining: float | None) -> GenerateInput:
    """A GenerateRequest as the typed input of RouterService.generate (RequestError: INVALID_ARGUMENT)."""
    kind = request.WhichOneof("prompt")
    if kind is None:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the request has neither text nor token_ids")
    try:
        params = sampling_params(request.sampling)
    except ValueError as e:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
    try:
        priority = Priority(request.priority)
    except ValueError:
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"unknown priority {request.priority}") from None
    prompt = request.text if kind == "text" else list(request.token_ids.ids)
    return GenerateInput(prompt, params, request.request_id, time_remaining, priority=priority)


def to_response(out: Output) -> pb.GenerateResponse:
    """One stream item as a GenerateResponse: the final one with usage and routing."""
    if not out.finished:
        return pb.GenerateResponse(request_id=out.request_id, token_ids=out.token_ids, text=out.text)
    r = out.routing
    assert r is not None  # the final item always says where it ran
    return pb.GenerateResponse(
        request_id=out.request_id, token_ids=out.token_ids, text=out.text, finished=True,
        finish_reason=out.finish_reason, usage=pb.Usage(prompt_tokens=out.prompt_tokens,
                                                        completion_tokens=out.completion_tokens),
        routing=pb.Routing(prefill_instance=r.prefill_instance, decode_instance=r.decode_instance,
                           disaggregated=r.disaggregated, cached_tokens=r.cached_tokens,
                           transferred_blocks=r.transferred_blocks, reason=r.reason, migrations=r.migrations))

