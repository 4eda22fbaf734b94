"""A router's Prometheus endpoint: prometheus_client's HTTP server on its own thread, serving that router's
registry (router/metrics.py) at /metrics. A scrape reads the router's memory only (counters, histograms and the
cluster view's last stats records); it takes the GIL for about a millisecond and never blocks a request.
"""

from __future__ import annotations

import logging
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server

log = logging.getLogger(__name__)


class MetricsServer:
    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        """Listen on `port` (0: a free one) at `host`."""
        self._server: Any
        self._server, self._thread = start_http_server(port, host, registry=registry)
        self.host, self.port = host, int(self._server.server_address[1])
        log.info("metrics on %s", self.url)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)
