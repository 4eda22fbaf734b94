"""Workloads: Poisson arrivals with length distributions and optional shared prefixes, or a Mooncake trace.

Every token is derived deterministically from a seed (or, for a trace, from its hash ids), so a workload is
reproducible and equal hash ids produce equal token blocks, which is what makes prefix caching visible.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

MIN_TOKEN = 3  # ids below are special tokens in most vocabularies


@dataclass(frozen=True)
class BenchRequest:
    index: int
    arrival_s: float  # offset from the start of the run
    tokens: list[int]
    max_tokens: int
    hash_ids: tuple[int, ...] = ()  # trace replay: the prompt's block ids
    priority: str = "interactive"  # its class (engine/priority.py): "interactive" | "batch"


class Distribution:
    """'fixed:N', 'uniform:LO:HI' or 'normal:MEAN:STD' (clipped to >= 1)."""

    def __init__(self, spec: str) -> None:
        kind, *args = spec.split(":")
        try:
            values = [float(a) for a in args]
        except ValueError:
            raise ValueError(f"distribution {spec!r}: arguments must be numbers") from None
        expected = {"fixed": 1, "uniform": 2, "normal": 2}
        if kind not in expected or len(values) != expected[kind]:
            raise ValueError(f"distribution {spec!r}: use fixed:N, uniform:LO:HI or normal:MEAN:STD")
        if kind == "uniform" and values[0] > values[1]:
            raise ValueError(f"distribution {spec!r}: LO > HI")
        self.kind, self.values, self.spec = kind, values, spec

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            n = self.values[0]
        elif self.kind == "uniform":
            n = rng.uniform(*self.values)
        else:
            n = rng.gauss(*self.values)
        return max(1, round(n))


def block_tokens(block_id: int, size: int, vocab: int) -> list[int]:
    """The tokens of hash block `block_id`: the same for every request that names it."""
    rng = random.Random(0x5EED0000 + block_id)
    return [rng.randrange(MIN_TOKEN, vocab) for _ in range(size)]


def poisson(num: int, rate: float, input_len: Distribution, output_len: Distribution, vocab: int, seed: int = 0,
            prefix_groups: int = 0, prefix_len: int = 0) -> list[BenchRequest]:
    """`num` requests with exponential inter-arrival times at `rate` per second (rate <= 0: all at once). With
    `prefix_groups`, each request starts with one of that many shared `prefix_len`-token prefixes."""
    if num < 1:
        raise ValueError("the number of requests must be >= 1")
    rng = random.Random(seed)
    prefixes = [block_tokens(1_000_000 + seed * 1000 + g, prefix_len, vocab) for g in range(prefix_groups)]
    t, out = 0.0, []
    for i in range(num):
        if rate > 0 and i:
            t += rng.expovariate(rate)
        body = [rng.randrange(MIN_TOKEN, vocab) for _ in range(input_len.sample(rng))]
        prefix = prefixes[rng.randrange(prefix_groups)] if prefix_groups else []
        out.append(BenchRequest(i, t, prefix + body, output_len.sample(rng)))
    return out


def mooncake_trace(path: str | Path, num: int, vocab: int, time_scale: float = 1.0, tokens_per_block: int = 512,
                   output_scale: float = 1.0, max_output: int | None = None, max_input: int | None = None,
                   salt: int = 0) -> list[BenchRequest]:
    """The first `num` requests of a Mooncake-format trace (timestamp ms, input_length, output_length, hash_ids
    with 512 tokens per hash block), scaled: arrival times by `time_scale`, each hash block to
    `tokens_per_block` tokens (prompt lengths in proportion), output lengths by `output_scale`. Another `salt`
    gives every block other tokens (the same hash structure): the runs of a sweep do not hit each other's cache."""
    offset = salt << 40  # NOTE: past every hash id and below every negative filler id of another salt
    out = []
    with open(path) as f:
        for i, line in enumerate(f):
            if i >= num:
                break
            row = json.loads(line)
            ids = tuple(int(h) for h in row["hash_ids"])
            length = max(1, math.ceil(int(row["input_length"]) * tokens_per_block / 512))
            if max_input is not None:
                length = min(length, max_input)
            tokens = [t for h in ids for t in block_tokens(h + offset, tokens_per_block, vocab)][:length]
            # a trace row longer than its ids
            tokens += block_tokens(-1 - i + offset, max(0, length - len(tokens)), vocab)
            output = max(1, round(int(row["output_length"]) * output_scale))
            if max_output is not None:
                output = min(output, max_output)
            out.append(BenchRequest(i, float(row["timestamp"]) / 1000 * time_scale, tokens, output, ids))
    if not out:
        raise ValueError(f"trace {path} has no requests")
    return out


def numbers(text: str, flag: str) -> list[float]:
    """A comma-separated list of numbers (`--rates 2,4,8`), or a clear error naming the flag."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag}: expected comma-separated numbers, got {text!r}") from None
    return values


def offered_rate(work: list[BenchRequest], duration_s: float) -> float:
    """Arrivals per second of the requests a run of `duration_s` sends (a replayed trace's rate): those arriving
    in the window, over the time between the first and the last of them (0.0 for fewer than two)."""
    arrivals = sorted(r.arrival_s for r in work if r.arrival_s < duration_s)
    if len(arrivals) < 2 or arrivals[-1] <= arrivals[0]:
        return 0.0
    return (len(arrivals) - 1) / (arrivals[-1] - arrivals[0])


def with_priorities(work: list[BenchRequest], batch_share: float, seed: int) -> list[BenchRequest]:
    """The workload with a random `batch_share` of its requests in the batch class (the rest interactive)."""
    if batch_share <= 0:
        return work
    rng = random.Random(seed ^ 0x5EED)
    return [dataclasses.replace(r, priority="batch" if rng.random() < batch_share else "interactive") for r in work]
