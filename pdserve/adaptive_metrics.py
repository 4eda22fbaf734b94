"""The adaptive split's state as Prometheus metrics, on the router's registry of the process that runs it
(`pdserve serve`; with `server.routers` > 1 the controller process has no metrics endpoint, and the split's
decisions are in its log only). A scrape reads the controller's last decision and counters from memory."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pdserve.adaptive_split import AdaptiveSplit

_COUNTERS = (
    ("replans", "Re-plans of the P/D split from the live workload"),
    ("changes", "Changes the adaptive split made (a role switch, or only the local-prefill threshold)"),
    ("change_failures", "Changes the adaptive split tried and could not make (each logged)"),
    ("errors", "Re-plans that failed with an error (each logged; the controller goes on)"),
)


class AdaptiveCollector(Collector):
    def __init__(self, split: AdaptiveSplit) -> None:
        self.split = split

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        counters = dict(self.split.counters)
        for name, doc in _COUNTERS:
            yield CounterMetricFamily(f"pdserve:adaptive_{name}", doc, value=counters.get(name, 0))
        d = self.split.last_decision
        if d is None:
            return
        yield GaugeMetricFamily("pdserve:adaptive_step_slowdown", "The cluster's measured step time over the "
                                "profile's for the same steps, at the last re-plan (1: as profiled)", value=d.slowdown)
        goodput = GaugeMetricFamily("pdserve:adaptive_predicted_goodput", "Predicted requests per second within "
                                    "the SLOs at the last re-plan, of the current split and of the best one",
                                    labels=["which", "split"])
        goodput.add_metric(["current", d.current.split.name()], d.current.goodput_rps)
        goodput.add_metric(["best", d.best.split.name()], d.best.goodput_rps)
        yield goodput
        if d.measured is not None and d.measured.counts.finished:
            yield GaugeMetricFamily("pdserve:adaptive_measured_goodput", "Requests per second this router "
                                    "finished within the adaptive split's SLOs over the last re-plan's window "
                                    "(set beside pdserve:adaptive_predicted_goodput{which=\"current\"})",
                                    value=d.measured.goodput_rps)
            yield GaugeMetricFamily("pdserve:adaptive_measured_attainment", "Of the requests this router finished "
                                    "in the last re-plan's window, the fraction within both SLOs",
                                    value=d.measured.attainment)
