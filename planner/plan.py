"""`pdserve plan`: predicted goodput of every P/D split of N instances for a workload, ranked, with the serving
YAML fragment of the best.

Splits: all aggregated (N decode instances that prefill their own prompts), and every xP+yD with x + y = N,
each pure (every prompt prefilled on the prefill pool) and conditional (prompts up to a threshold prefilled
where they decode; thresholds from the workload's prompt-length quartiles). One instance per GPU group of the
profile's tensor_parallel_size.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from planner.profile import EngineProfile
from planner.simulate import Arrival, SimResult, Split, simulate


@dataclass(frozen=True)
class SLO:
    ttft_s: float
    tpot_s: float


@dataclass(frozen=True)
class SplitPrediction:
    split: Split
    goodput_rps: float  # requests per second within both SLOs
    attainment: float  # fraction of requests within both SLOs
    p90_ttft_s: float
    p90_tpot_s: float

    @staticmethod
    def of(result: SimResult, slo: SLO) -> SplitPrediction:
        ttft = np.array([r.ttft_s for r in result.results])
        tpot = np.array([r.tpot_s for r in result.results])
        return SplitPrediction(result.split, result.goodput(slo.ttft_s, slo.tpot_s),
                               result.attainment(slo.ttft_s, slo.tpot_s), float(np.percentile(ttft, 90)),
                               float(np.percentile(tpot, 90)))


Length = int | Callable[[random.Random], int]  # a fixed token count, or a draw from a distribution


def poisson_workload(rate: float, input_len: Length, output_len: Length, num_requests: int,
                     seed: int = 0) -> list[Arrival]:
    """`num_requests` Poisson arrivals at `rate` per second. A length is a token count, or a function drawing one
    (`pdserve plan --input-len normal:3000:300`); the draws use their own generator, so the arrival times are the
    same whatever the lengths."""
    fixed = [n for n in (input_len, output_len) if isinstance(n, int)]
    if rate <= 0 or num_requests < 1 or any(n < 1 for n in fixed):
        raise ValueError("rate, input and output lengths and the request count must be positive")
    rng, lengths = random.Random(seed), random.Random(seed + 1)

    def draw(n: Length) -> int:
        return n if isinstance(n, int) else max(1, n(lengths))

    t, out = 0.0, []
    for _ in range(num_requests):
        out.append(Arrival(t, draw(input_len), draw(output_len)))
        t += rng.expovariate(rate)
    return out


def trace_workload(path: str | Path, max_model_len: int, limit: int | None = None,
                   speed: float = 1.0) -> list[Arrival]:
    """A Mooncake-format JSONL trace (timestamp ms, input_length, output_length); outputs are capped at half of
    max_model_len and prompts cut so that prompt + output fit it; `speed` > 1 compresses time."""
    out = []
    with open(path) as f:
        for n, line in enumerate(f):
            if limit is not None and n >= limit:
                break
            rec = json.loads(line)
            outlen = max(1, min(int(rec["output_length"]), max_model_len // 2))
            prompt = max(1, min(int(rec["input_length"]), max_model_len - outlen - 1))
            out.append(Arrival(float(rec["timestamp"]) / 1000.0 / speed, prompt, outlen))
    if not out:
        raise ValueError(f"{path}: no requests")
    t0 = out[0].time_s
    return [Arrival(a.time_s - t0, a.prompt_tokens, a.output_tokens) for a in sorted(out, key=lambda a: a.time_s)]


def candidate_splits(instances: int, arrivals: list[Arrival]) -> list[Split]:
    if instances < 1:
        raise ValueError("need at least one instance")
    lens = sorted(a.prompt_tokens for a in arrivals)
    quartiles = sorted({lens[len(lens) // 4], lens[len(lens) // 2], lens[3 * len(lens) // 4]})
    splits = [Split(0, instances)]
    for p in range(1, instances):
        splits.append(Split(p, instances - p))
        splits += [Split(p, instances - p, q) for q in quartiles]
    return splits


def rank_splits(profile: EngineProfile, arrivals: list[Arrival], instances: int, slo: SLO) -> list[SplitPrediction]:
    preds = [SplitPrediction.of(simulate(profile, s, arrivals), slo) for s in candidate_splits(instances, arrivals)]
    return sorted(preds, key=lambda p: (-p.goodput_rps, p.split.prefill))


def yaml_fragment(split: Split, profile: EngineProfile) -> str:
    tp = profile.tensor_parallel_size
    lines = ["pools:", f"  prefill: {{replicas: {split.prefill}, tensor_parallel_size: {tp}}}",
             f"  decode: {{replicas: {split.decode}, tensor_parallel_size: {tp}}}"]
    if split.prefill:
        lines += ["placement:", f"  max_local_prefill_tokens: {split.max_local_prefill_tokens}",
                  f"  prefill_queue_threshold: {split.prefill_queue_threshold}"]
    return "\n".join(lines)


def format_ranking(preds: list[SplitPrediction], slo: SLO) -> str:
    rows = [f"{'split':44s} {'goodput req/s':>13s} {'in SLO':>7s} {'p90 TTFT ms':>11s} {'p90 TPOT ms':>11s}"]
    for p in preds:
        rows.append(f"{p.split.name():44s} {p.goodput_rps:13.2f} {p.attainment:7.1%} {1e3 * p.p90_ttft_s:11.1f} "
                    f"{1e3 * p.p90_tpot_s:11.1f}")
    rows.append(f"(SLOs: TTFT <= {1e3 * slo.ttft_s:g} ms, TPOT <= {1e3 * slo.tpot_s:g} ms)")
    return "\n".join(rows)
