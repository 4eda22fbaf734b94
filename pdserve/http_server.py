"""A router's OpenAI-compatible HTTP API (router/openai_api.py) served by aiohttp on the router's own event loop,
so its handlers call the RouterService directly, as the gRPC handlers do. NOTE: aiohttp rather than FastAPI with
uvicorn: it is already installed (a Ray dependency), runs inside an existing loop without a server thread of its
own, and needs no extra dependency tree."""

from __future__ import annotations

import logging
import os
import ssl

from aiohttp import web

from router.chat_template import ChatTemplate
from router.openai_api import OpenAIFront
from router.service import RouterService

log = logging.getLogger(__name__)


class HttpServer:
    def __init__(self, front: OpenAIFront, host: str, tls: bool = False) -> None:
        self.front, self.host, self.port, self.tls = front, host, 0, tls
        # NOTE: handler_cancellation: a client that disconnects cancels its handler, which aborts the request
        self.runner = web.AppRunner(front.app(), handler_cancellation=True, access_log=None)

    @staticmethod
    async def start(service: RouterService, host: str, port: int, model_name: str | None,
                    grace_s: float, ssl_context: ssl.SSLContext | None = None) -> HttpServer:
        """Listen on `port` (0: a free one) at `host`, HTTPS with `ssl_context`; the model's id is `model_name`,
        else its directory's basename. `close` gives requests still running up to `grace_s`."""
        name = model_name or os.path.basename(os.path.normpath(service.info.model))
        server = HttpServer(OpenAIFront(service, name, ChatTemplate.load(service.info.model)), host,
                            ssl_context is not None)
        await server.runner.setup()
        site = web.TCPSite(server.runner, host, port, shutdown_timeout=grace_s, ssl_context=ssl_context)
        await site.start()
        server.port = server.runner.addresses[0][1]
        log.info("OpenAI-compatible HTTP API on %s (model %r)", server.url, name)
        return server

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"

    def drain(self) -> None:
        """Refuse new requests (503) and answer /health with 503; running ones go on until `close`."""
        self.front.draining = True

    async def close(self) -> None:
        await self.runner.cleanup()  # NOTE: waits for handlers still running (TCPSite's shutdown_timeout)
