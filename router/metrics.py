"""The router's Prometheus metrics: one registry per RouterService (so tests that build several do not clash),
the request-level metrics the service records on its hot path, and the per-instance collector
(router/instance_metrics.py) registered beside them. Names follow vLLM: a `pdserve:` prefix, units in the name.

Recording costs a Histogram.observe or Counter.inc per event (about a microsecond); nothing here blocks.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Seconds: from a millisecond (a cached decode step) to minutes (a long generation), as vLLM's buckets.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
               0.5, 0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.01, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
               120.0, 240.0, 480.0)
DECISION_BUCKETS = (0.00002, 0.00005, 0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.05)

ROUTES = ("local_prefill", "remote_prefill", "migrated")
FIRST_TOKEN_ROUTES = ("local_prefill", "remote_prefill")  # where the prompt was prefilled, as its first token left


class RouterMetrics:
    """What one router records. `in_flight` and `queued` are read at scrape time from the service's state."""

    def __init__(self, in_flight: Callable[[], int], queued: Callable[[], int]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("pdserve:requests", "Requests finished, by final gRPC status code",
                                ["status"], registry=r)
        self.requests_by_route = Counter(
            "pdserve:requests_by_route", "Requests that got a placement, by route: local_prefill (on the decode "
            "instance), remote_prefill (on a prefill instance, KV pulled), migrated (the stream moved)",
            ["route"], registry=r)
        self.ttft = Histogram("pdserve:time_to_first_token_seconds", "Time from the request's arrival to its "
                              "first token sent, by route: local_prefill (prefilled on its decode instance) or "
                              "remote_prefill (on a prefill instance)", ["route"], buckets=TTFT_BUCKETS,
                              registry=r)
        self.itl = Histogram("pdserve:inter_token_latency_seconds", "Time between two stream messages of a "
                             "request (a message may carry several tokens)", buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("pdserve:e2e_request_latency_seconds", "Time from arrival to the last message of "
                             "a request that finished", buckets=E2E_BUCKETS, registry=r)
        self.handoff = Histogram(
            "pdserve:kv_handoff_seconds", "Of a request prefilled on a prefill instance: time from the prefill "
            "instance's reply (the KV is held for the decode instance) to the first token out of the decode "
            "instance: the decode admission, the KV pull, the release acknowledgement and the first stream "
            "message. What disaggregation adds to its time to first token", buckets=ITL_BUCKETS, registry=r)
        self.decision = Histogram("pdserve:placement_decision_seconds", "Time a placement decision takes "
                                  "(RouterService.place, from memory)", buckets=DECISION_BUCKETS, registry=r)
        self.ttft_rate_defaults = Counter(
            "pdserve:ttft_rate_defaults", "TTFT predictions made with admission.default_tokens_per_s because the "
            "instance had not reported a measured token rate yet", registry=r)
        self.prompt_tokens = Counter("pdserve:prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("pdserve:generation_tokens", "Tokens generated", registry=r)
        self.cached_tokens = Counter("pdserve:cached_prompt_tokens", "Prompt tokens the decode instance reused "
                                     "from its prefix cache, of finished requests", registry=r)
        Gauge("pdserve:requests_in_flight", "Requests admitted and not finished", registry=r).set_function(
            in_flight)
        Gauge("pdserve:requests_queued", "Requests admitted whose first token is not out yet (tokenizing, "
              "placing, prefilling)", registry=r).set_function(queued)
        for status in ("OK", "INVALID_ARGUMENT", "RESOURCE_EXHAUSTED", "UNAVAILABLE", "DEADLINE_EXCEEDED",
                       "CANCELLED", "INTERNAL"):
            self.requests.labels(status)  # present at 0 from the start, so rate() works on the first request
        for route in ROUTES:
            self.requests_by_route.labels(route)
        for route in FIRST_TOKEN_ROUTES:
            self.ttft.labels(route)


class RequestTimer:
    """One request's timestamps: arrival, its first message, the last message sent."""

    __slots__ = ("first_at", "last", "metrics", "start")

    def __init__(self, metrics: RouterMetrics) -> None:
        self.metrics = metrics
        self.start = self.last = time.perf_counter()
        self.first_at: float | None = None

    def sent(self, remote_prefill: bool = False) -> None:
        """A stream message went out: the first is TTFT (by where its prompt was prefilled), each later one an
        inter-token latency."""
        now = time.perf_counter()
        if self.first_at is None:
            self.metrics.ttft.labels(FIRST_TOKEN_ROUTES[remote_prefill]).observe(now - self.start)
            self.first_at = now
        else:
            self.metrics.itl.observe(now - self.last)
        self.last = now

    def finished(self) -> None:
        self.metrics.e2e.observe(self.last - self.start)

    def ttft_tpot(self, tokens: int) -> tuple[float, float | None] | None:
        """The finished request's TTFT and TPOT over its `tokens` output tokens (None: one token); None when
        nothing was sent."""
        if self.first_at is None:
            return None
        tpot = (self.last - self.first_at) / (tokens - 1) if tokens > 1 else None
        return self.first_at - self.start, tpot
