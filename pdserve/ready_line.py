"""The one line `pdserve serve` and `pdserve router` print on stdout once they serve:

    pdserve: serving on HOST:PORT metrics http://HOST:MPORT/metrics

With `server.routers: N >= 2` the controller lists every router, in order, and router i's metrics URL is the i-th:

    pdserve: serving on HOST:P1,HOST:P2 metrics http://HOST:M1/metrics,http://HOST:M2/metrics

Scripts and tests parse it with `ReadyLine.parse`.
"""

from __future__ import annotations

from dataclasses import dataclass

READY_PREFIX = "pdserve: serving on "
_METRICS = " metrics "


@dataclass(frozen=True)
class ReadyLine:
    targets: tuple[str, ...]  # every router's gRPC HOST:PORT
    metrics_urls: tuple[str, ...]  # router i's Prometheus endpoint is metrics_urls[i]

    def __post_init__(self) -> None:
        if not self.targets or len(self.targets) != len(self.metrics_urls):
            raise ValueError(f"a ready line needs one metrics URL per router: {self.targets} {self.metrics_urls}")

    def format(self) -> str:
        return f"{READY_PREFIX}{','.join(self.targets)}{_METRICS}{','.join(self.metrics_urls)}"

    @staticmethod
    def parse(line: str) -> ReadyLine:
        """ValueError if `line` is not a ready line."""
        line = line.strip()
        if not line.startswith(READY_PREFIX) or _METRICS not in line:
            raise ValueError(f"not a pdserve ready line: {line[:200]!r}")
        targets, urls = line[len(READY_PREFIX):].split(_METRICS, 1)
        return ReadyLine(tuple(targets.split(",")), tuple(urls.split(",")))

    @staticmethod
    def join(lines: list[ReadyLine]) -> ReadyLine:
        """Several routers' lines as the controller's one line."""
        return ReadyLine(tuple(t for r in lines for t in r.targets), tuple(u for r in lines for u in r.metrics_urls))
