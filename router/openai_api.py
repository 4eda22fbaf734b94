"""The OpenAI-compatible HTTP front of a router: an aiohttp application on the router's own event loop, in the
router's process. Its handlers run the same RouterService.generate the gRPC Generate runs (admission, placement,
the prefill and the decode stream, metrics): no extra hop.

    POST /v1/completions         POST /v1/chat/completions (the model's chat template: chat_template.py)
    GET  /v1/models              GET  /health

Streaming answers are server-sent events ending with `data: [DONE]`. Every generation answer carries the header
`x-pdserve-routing` (where and why it ran; for a stream, as placed, since headers go out before the tokens).
Errors are OpenAI's error JSON (openai_request.ApiError) with the HTTP status of the router's error kind; a rate
limit's 429 carries Retry-After. With API keys on, every /v1 endpoint needs `Authorization: Bearer KEY` (401
without; router/access.py), checked by a middleware that puts the caller's key on the request.
A client that goes away mid-request cancels the handler (handler_cancellation), which aborts the request on the
workers as a cancelled gRPC call does.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
from aiohttp import web

from router.chat_template import ChatMessage, ChatTemplate, ChatTemplateError
from router.generation import GenerateInput, Output, RequestError, Routing
from router.openai_logprobs import TokenText, chat_logprobs, completion_logprobs
from router.openai_request import ApiError, CompletionRequest, parse_chat, parse_completion
from router.service import RouterService

ROUTING_HEADER = "x-pdserve-routing"
_HTTP_STATUS = {grpc.StatusCode.INVALID_ARGUMENT: 400, grpc.StatusCode.UNAUTHENTICATED: 401,
                grpc.StatusCode.NOT_FOUND: 404, grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
                grpc.StatusCode.UNAVAILABLE: 503, grpc.StatusCode.DEADLINE_EXCEEDED: 504}
_ERROR_TYPE = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               429: "rate_limit_error", 503: "service_unavailable", 504: "timeout"}


def api_error(e: RequestError) -> ApiError:
    return ApiError(_HTTP_STATUS.get(e.code, 500), e.message, code=e.code.name.lower())


def error_body(e: ApiError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": _ERROR_TYPE.get(e.status, "server_error"), "param": e.param,
                      "code": e.code}}


def error_response(e: ApiError) -> web.Response:
    return web.json_response(error_body(e), status=e.status)


def refusal(e: RequestError) -> web.Response:
    """A RequestError's answer; one that may pass later (a rate limit) carries Retry-After."""
    retry = e.retry_after_header
    return web.json_response(error_body(api_error(e)), status=_HTTP_STATUS.get(e.code, 500),
                             headers={"Retry-After": retry} if retry is not None else None)


def routing_header(r: Routing) -> str:
    return (f"decode={r.decode_instance}; prefill={r.prefill_instance or r.decode_instance}; "
            f"disaggregated={str(r.disaggregated).lower()}; cached={r.cached_tokens}; migrations={r.migrations}; "
            f"reason={r.reason}")


def usage(final: Output | None) -> dict[str, Any]:
    prompt, completion = (final.prompt_tokens, final.completion_tokens) if final else (0, 0)
    cached = final.routing.cached_tokens if final and final.routing else 0
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


class OpenAIFront:
    def __init__(self, service: RouterService, model_name: str, template: ChatTemplate | None) -> None:
        self.service, self.model_name, self.template = service, model_name, template
        self.created = int(time.time())
        self.draining = False  # set when the router drains: /health answers 503, new requests are refused
        self.token_text = TokenText(service.tokenizer)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.service.max_prompt_bytes * 4 + (1 << 16),
                              middlewares=[self.authenticate])
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        return app

    @web.middleware
    async def authenticate(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Every /v1 endpoint needs the caller's API key (router/access.py; none when the server is open); the key
        goes on the request as request["api_key"]. /health stays open."""
        if request.path.startswith("/v1/"):
            try:
                request["api_key"] = self.service.access.authenticate(request.headers.get("Authorization"))
            except RequestError as e:
                self.service.refused(e.code)
                return refusal(e)
        return await handler(request)

    async def health(self, request: web.Request) -> web.Response:
        if self.draining:
            return web.json_response({"status": "draining"}, status=503)
        return web.json_response({"status": "ok"})

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [
            {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "pdserve",
             "max_model_len": self.service.info.max_model_len, "vocab_size": self.service.info.vocab_size}]})

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=False)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, chat=True)

    async def _parse(self, request: web.Request, chat: bool) -> tuple[CompletionRequest, GenerateInput]:
        if self.draining:
            raise ApiError(503, "pdserve is draining (shutting down)")
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not JSON: {e}") from None
        if chat:
            req = parse_chat(body, self.model_name, self.service.info.max_model_len)
            assert isinstance(req.prompt, list)
            prompt: str | list[int] = await asyncio.to_thread(self._chat_prompt, req.prompt)  # type: ignore[arg-type]
        else:
            req = parse_completion(body, self.model_name)
            prompt = req.prompt  # type: ignore[assignment]
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        return req, GenerateInput(prompt, req.params, rid, priority=req.params.priority)

    def _chat_prompt(self, messages: list[ChatMessage]) -> list[int]:
        """The chat's prompt ids: the template's text, tokenized without added special tokens (the template
        writes them), as transformers' apply_chat_template does. NOTE: on a worker thread: CPU-bound."""
        if self.template is None:
            raise ApiError(400, "this model has no chat template (tokenizer_config.json chat_template)")
        if self.service.tokenizer is None:
            raise ApiError(400, "this model has no tokenizer.json: chat needs one")
        try:
            text = self.template.render(messages)
        except ChatTemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        if len(text.encode()) > self.service.max_prompt_bytes:
            raise ApiError(400, f"the rendered chat is over {self.service.max_prompt_bytes} bytes "
                           "(server.max_prompt_bytes)", "messages")
        return self.service.tokenizer.encode(text, add_special_tokens=False).ids

    async def _serve(self, request: web.Request, chat: bool) -> web.StreamResponse:
        try:
            req, inp = await self._parse(request, chat)
        except ApiError as e:
            self.service.refused(grpc.StatusCode.INVALID_ARGUMENT if e.status in (400, 404)
                                 else grpc.StatusCode.UNAVAILABLE)
            return error_response(e)
        key = request.get("api_key")
        if key is not None:
            inp = dataclasses.replace(inp, api_key=key, priority=key.priority)
        stream = self.service.generate(inp)
        async with contextlib.aclosing(stream):  # NOTE: closing it early aborts the request on the workers
            try:
                first = await anext(stream)  # NOTE: before any header: an early error gets its own status
            except RequestError as e:
                return refusal(e)
            if req.stream:
                return await self._stream(request, req, inp.request_id, chat, first, stream)
            try:
                rest = [o async for o in stream] if not first.finished else []
            except RequestError as e:
                return refusal(e)
            return self._whole(inp.request_id, chat, first, rest)

    def _chunk(self, rid: str, chat: bool, text: str, finish: str | None, role: bool = False,
               logprobs: dict[str, Any] | None = None) -> dict[str, Any]:
        if chat:
            delta = {"role": "assistant", "content": text} if role else {"content": text} if text else {}
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                "created": int(time.time()), "model": self.model_name, "choices": [choice]}

    async def _stream(self, request: web.Request, req: CompletionRequest, rid: str, chat: bool, first: Output,
                      rest: AsyncIterator[Output]) -> web.StreamResponse:
        headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        if first.routing is not None:
            headers[ROUTING_HEADER] = routing_header(first.routing)
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)

        async def send(payload: dict[str, Any] | str) -> None:
            data = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
            await response.write(f"data: {data}\n\n".encode())

        out, final, offset = first, None, 0
        try:
            if chat:
                await send(self._chunk(rid, chat, "", None, role=True))
            while True:
                if out.finished:
                    final = out
                logprobs = None
                if out.logprobs:  # NOTE: a chunk per item with tokens, so every token's logprob is sent
                    if chat:
                        logprobs = chat_logprobs(out.logprobs, self.token_text)
                    else:
                        logprobs, offset = completion_logprobs(out.logprobs, self.token_text, offset)
                if out.text or out.finished or logprobs is not None:
                    await send(self._chunk(rid, chat, out.text, _finish(out) if out.finished else None,
                                           logprobs=logprobs))
                if out.finished:
                    break
                out = await anext(rest)
        except RequestError as e:  # after the headers: the error goes in the stream
            await send(error_body(api_error(e)))
        if final is not None and req.include_usage:
            await send({"id": rid, "object": "chat.completion.chunk" if chat else "text_completion",
                        "created": int(time.time()), "model": self.model_name, "choices": [],
                        "usage": usage(final)})
        await send("[DONE]")
        await response.write_eof()
        return response

    def _whole(self, rid: str, chat: bool, first: Output, rest: list[Output]) -> web.Response:
        outs = [first, *rest]
        final = outs[-1]
        text = "".join(o.text for o in outs)
        logprobs: dict[str, Any] | None = None
        if any(o.logprobs is not None for o in outs):
            lps = [lp for o in outs for lp in o.logprobs or ()]
            logprobs = chat_logprobs(lps, self.token_text) if chat else \
                completion_logprobs(lps, self.token_text)[0]
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "logprobs": logprobs, "finish_reason": _finish(final)}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": _finish(final)}
        body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
                "model": self.model_name, "choices": [choice], "usage": usage(final)}
        headers = {ROUTING_HEADER: routing_header(final.routing)} if final.routing else {}
        return web.json_response(body, headers=headers)


def _finish(out: Output) -> str:
    return out.finish_reason or "stop"
