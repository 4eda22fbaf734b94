"""`pdserve plan`: predicted goodput of every P/D split of N instances for a workload, ranked, with the serving
YAML fragment of the best.

Splits: all aggregated (N decode instances that prefill their own prompts), and every xP+yD with x + y = N,
each pure (every prompt prefilled on the prefill pool) and conditional (prompts up to a threshold prefilled
where they decode; thresholds from the workload's prompt-length quartiles). One instance per GPU group of the
profile's tensor_parallel_size.

TP choices (`rank_tp_choices`): given profiles of the same model at several tensor-parallel sizes, every split at
each size, and every P/D split whose pools take different sizes (prefill at one, decode at another: KV moves
between them, docs/kv-layout.md), with as many instances of each pool as the GPUs hold and no GPU left that
would hold another of either.
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
    prefill_tp: int = 0  # the pools' tensor-parallel sizes, when TP choices were ranked (0: not given)
    decode_tp: int = 0

    @staticmethod
    def of(result: SimResult, slo: SLO, prefill_tp: int = 0, decode_tp: int = 0) -> SplitPrediction:
        ttft = np.array([r.ttft_s for r in result.results])
        tpot = np.array([r.tpot_s for r in result.results])
        return SplitPrediction(result.split, result.goodput(slo.ttft_s, slo.tpot_s),
                               result.attainment(slo.ttft_s, slo.tpot_s), float(np.percentile(ttft, 90)),
                               float(np.percentile(tpot, 90)), prefill_tp, decode_tp)

    def name(self) -> str:
        if not self.decode_tp:
            return self.split.name()
        if self.split.prefill == 0:
            return f"{self.split.name()}, TP {self.decode_tp}"
        return f"{self.split.name()}, TP {self.prefill_tp}/{self.decode_tp}"


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
    splits = [Split(0, instances)]
    for p in range(1, instances):
        splits += pd_splits(p, instances - p, arrivals)
    return splits


def pd_splits(prefill: int, decode: int, arrivals: list[Arrival]) -> list[Split]:
    """`prefill`P+`decode`D pure, and conditional at the workload's prompt-length quartiles."""
    lens = sorted(a.prompt_tokens for a in arrivals)
    quartiles = sorted({lens[len(lens) // 4], lens[len(lens) // 2], lens[3 * len(lens) // 4]})
    return [Split(prefill, decode)] + [Split(prefill, decode, q) for q in quartiles]


def rank_splits(profile: EngineProfile, arrivals: list[Arrival], instances: int, slo: SLO) -> list[SplitPrediction]:
    preds = [SplitPrediction.of(simulate(profile, s, arrivals), slo) for s in candidate_splits(instances, arrivals)]
    return sorted(preds, key=lambda p: (-p.goodput_rps, p.split.prefill))


def mixed_tp_counts(gpus: int, prefill_tp: int, decode_tp: int) -> list[tuple[int, int]]:
    """(prefill, decode) instance counts, each >= 1, that fit `gpus` with no GPU left over that would hold one
    more instance of either pool."""
    out = []
    for p in range(1, gpus // prefill_tp + 1):
        for d in range(1, (gpus - p * prefill_tp) // decode_tp + 1):
            left = gpus - p * prefill_tp - d * decode_tp
            if left < prefill_tp and left < decode_tp:
                out.append((p, d))
    return out


def rank_tp_choices(profiles: list[EngineProfile], arrivals: list[Arrival], gpus: int,
                    slo: SLO) -> list[SplitPrediction]:
    """Every split at each profile's tensor-parallel size, and every P/D split with the prefill pool at one size
    and the decode pool at another (simulated with the decode profile, its prefill instances taking the prefill
    profile's step times), ranked together. The profiles must be of one model at distinct sizes."""
    sizes = [p.tensor_parallel_size for p in profiles]
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"two profiles at one tensor_parallel_size ({sorted(sizes)}): give one a size")
    first = profiles[0]
    for p in profiles[1:]:
        if (p.block_size, p.max_model_len) != (first.block_size, first.max_model_len):
            raise ValueError(f"the profiles at TP {first.tensor_parallel_size} and TP {p.tensor_parallel_size} "
                             "differ in block_size or max_model_len: not one serving configuration")
    preds: list[SplitPrediction] = []
    for p in profiles:
        tp = p.tensor_parallel_size
        if gpus // tp >= 1:
            preds += [SplitPrediction.of(simulate(p, s, arrivals), slo, tp if s.prefill else 0, tp)
                      for s in candidate_splits(gpus // tp, arrivals)]
    for pre in profiles:
        for dec in profiles:
            if pre is dec:
                continue
            for n_p, n_d in mixed_tp_counts(gpus, pre.tensor_parallel_size, dec.tensor_parallel_size):
                preds += [SplitPrediction.of(simulate(dec, s, arrivals, prefill_step=pre.step), slo,
                                             pre.tensor_parallel_size, dec.tensor_parallel_size)
                          for s in pd_splits(n_p, n_d, arrivals)]
    if not preds:
        raise ValueError(f"{gpus} GPUs hold no instance at tensor_parallel_size {min(sizes)}")
    return sorted(preds, key=lambda p: (-p.goodput_rps, p.split.prefill, p.prefill_tp + p.decode_tp))


def yaml_fragment(split: Split, profile: EngineProfile, prefill_tp: int = 0, decode_tp: int = 0) -> str:
    """The pools (and placement) of `split`; the TP sizes are the profile's unless given."""
    decode_tp = decode_tp or profile.tensor_parallel_size
    prefill_tp = prefill_tp or decode_tp  # NOTE: an aggregated split's empty prefill pool: the decode pool's size
    lines = ["pools:", f"  prefill: {{replicas: {split.prefill}, tensor_parallel_size: {prefill_tp}}}",
             f"  decode: {{replicas: {split.decode}, tensor_parallel_size: {decode_tp}}}"]
    if split.prefill:
        lines += ["placement:", f"  max_local_prefill_tokens: {split.max_local_prefill_tokens}",
                  f"  prefill_queue_threshold: {split.prefill_queue_threshold}"]
    return "\n".join(lines)


def format_ranking(preds: list[SplitPrediction], slo: SLO) -> str:
    width = max([44, *(len(p.name()) for p in preds)])
    rows = [f"{'split':{width}s} {'goodput req/s':>13s} {'in SLO':>7s} {'p90 TTFT ms':>11s} {'p90 TPOT ms':>11s}"]
    for p in preds:
        rows.append(f"{p.name():{width}s} {p.goodput_rps:13.2f} {p.attainment:7.1%} {1e3 * p.p90_ttft_s:11.1f} "
                    f"{1e3 * p.p90_tpot_s:11.1f}")
    rows.append(f"(SLOs: TTFT <= {1e3 * slo.ttft_s:g} ms, TPOT <= {1e3 * slo.tpot_s:g} ms)")
    return "\n".join(rows)
