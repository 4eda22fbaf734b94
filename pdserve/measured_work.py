"""What a running cluster's engines measured of their own steps, read from a router's Prometheus endpoint: every
instance's steps in the planner's step-model terms and their wall time (the `pdserve:engine_*` counters,
engine/step_work.py). `pdserve plan --calibrate-from` and bench/plan_accuracy.py scale a profile by it, as the
adaptive split does at runtime from the same counters in the metadata store (`step_slowdown`)."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from engine.step_work import StepWork

WORK_COUNTERS = ("work_steps", "computed_tokens", "prefill_tokens", "prefill_pairs", "decode_rows",
                 "decode_context_tokens")


def metric_samples(text: str) -> list[Sample]:
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def total(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of `name`'s samples over every label set that has `labels`."""
    return sum(s.value for s in samples if s.name == name and labels.items() <= s.labels.items())


def work_from_samples(samples: list[Sample], **labels: str) -> StepWork:
    """Every instance's steps together (the router exports one row per instance), or those of the instances whose
    labels include `labels` (e.g. role="decode")."""
    counts = [int(total(samples, f"pdserve:engine_{n}_total", **labels)) for n in WORK_COUNTERS]
    return StepWork(*counts, seconds=total(samples, "pdserve:engine_work_seconds_total", **labels),
                    cycles=int(total(samples, "pdserve:engine_cycles_total", **labels)),
                    cycle_step_seconds=total(samples, "pdserve:engine_cycle_step_seconds_total", **labels),
                    cycle_seconds=total(samples, "pdserve:engine_cycle_seconds_total", **labels))


def fetch_work(metrics_url: str, timeout_s: float = 10.0) -> StepWork:
    """The cluster's measured step work, from one router's /metrics. Raises OSError when it cannot be read and
    ValueError when it is not a pdserve router's (no engine counters)."""
    with urllib.request.urlopen(metrics_url, timeout=timeout_s) as response:
        text = response.read().decode()
    samples = metric_samples(text)
    if not any(s.name == "pdserve:engine_work_steps_total" for s in samples):
        raise ValueError(f"{metrics_url} has no pdserve:engine_work_steps_total: not a pdserve router's metrics, "
                         "or no instance has reported yet")
    return work_from_samples(samples)
