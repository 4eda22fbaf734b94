"""The one line `pdserve serve` and `pdserve router` print on stdout once they serve:

    pdserve: serving on HOST:PORT metrics http://HOST:MPORT/metrics

With `server.routers: N >= 2` the controller lists every router, in order, and router i's metrics URL is the i-th:

    pdserve: serving on HOST:P1,HOST:P2 metrics http://HOST:M1/metrics,http://HOST:M2/metrics

With `server.http_port` set, the line ends with every router's OpenAI-compatible HTTP API, in the same order:

    pdserve: serving on HOST:PORT metrics http://HOST:MPORT/metrics http http://HOST:HPORT

Scripts and tests parse it with `ReadyLine.parse`.
"""

from __future__ import annotations

from dataclasses import dataclass

READY_PREFIX = "pdserve: serving on "
_METRICS = " metrics "
_HTTP = " http "


@dataclass(frozen=True)
class ReadyLine:
    targets: tuple[str, ...]  # every router's gRPC HOST:PORT
    metrics_urls: tuple[str, ...]  # router i's Prometheus endpoint is metrics_urls[i]
    http_urls: tuple[str, ...] = ()  # router i's HTTP API base URL (http://HOST:HPORT); () when it is off

    def __post_init__(self) -> None:
        if not self.targets or len(self.targets) != len(self.metrics_urls):
            raise ValueError(f"a ready line needs one metrics URL per router: {self.targets} {self.metrics_urls}")
        if self.http_urls and len(self.http_urls) != len(self.targets):
            raise ValueError(f"a ready line needs one HTTP URL per router or none: {self.targets} {self.http_urls}")

    def format(self) -> str:
        http = f"{_HTTP}{','.join(self.http_urls)}" if self.http_urls else ""
        return f"{READY_PREFIX}{','.join(self.targets)}{_METRICS}{','.join(self.metrics_urls)}{http}"

    @staticmethod
    def parse(line: str) -> ReadyLine:
        """ValueError if `line` is not a ready line."""
        line = line.strip()
        if not line.startswith(READY_PREFIX) or _METRICS not in line:
            raise ValueError(f"not a pdserve ready line: {line[:200]!r}")
        targets, urls = line[len(READY_PREFIX):].split(_METRICS, 1)
        urls, _, http = urls.partition(_HTTP)  # NOTE: " http " with its spaces is not in a URL
        return ReadyLine(tuple(targets.split(",")), tuple(urls.split(",")), tuple(http.split(",")) if http else ())

    @staticmethod
    def join(lines: list[ReadyLine]) -> ReadyLine:
        """Several routers' lines as the controller's one line."""
        return ReadyLine(tuple(t for r in lines for t in r.targets), tuple(u for r in lines for u in r.metrics_urls),
                         tuple(u for r in lines for u in r.http_urls))
