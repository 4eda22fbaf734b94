"""A discrete-event simulation of one P/D split serving a workload, from an engine profile.

Each instance runs engine steps back to back while it has work, as the engine's scheduler forms them: every
running decode takes one token of the step's budget, then waiting prompts are chunked into what is left (first
come, first served, at most `max_num_seqs` requests in flight). A step lasts what the profile's step model
predicts for its shape. The router places a request as pdserve's does in spirit: a prompt of at most
`max_local_prefill_tokens` (or any prompt when the split has no prefill instance, when every prefill
instance has `prefill_queue_threshold` prompts waiting, or `max_prefill_queue_tokens` prompt tokens queued while
the decode instance has fewer) is prefilled on the decode instance that will decode
it; otherwise on the prefill instance with the fewest prompt tokens queued. Its first token does not wait for the
KV (architecture.md, "The first token does not wait for the KV"): the decode instance emits it when its loop
next polls the KV connector, at the start of its next step, and the token leaves with that step's outputs; so it
is out at the prefill's end when the decode instance is idle, else at the end of the step after the one it is
in. Its KV moves to the decode instance (the profile's transfer model), which decodes from the second token on. With
layer-wise streaming (`server.layer_wise_kv`, the default) the KV moves while the prompt computes, one layer group
at a time, so what is left after the prefill is the larger of the last chunk's last layer group and what the
prefill's duration could not hide; without it, the whole transfer follows the prefill. The hand-off so delays the
second token and counts in the TPOT.
Queueing is what the simulation adds to a capacity model: the TTFT of a request includes every step that ran
before its prompt's last chunk.
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field

from engine.step_work import chunk_pairs
from planner.profile import EngineProfile
from planner.step_model import StepShape, StepTimeModel


@dataclass(frozen=True)
class Split:
    prefill: int  # prefill instances (0: aggregated)
    decode: int  # decode instances
    max_local_prefill_tokens: int = 0  # conditional disaggregation: shorter prompts prefill where they decode
    prefill_queue_threshold: int = 8  # ...and any prompt, once every prefill instance has this many waiting
    max_prefill_queue_tokens: int = 0  # ...or this many prompt tokens queued, and the decode instance fewer (0: off)

    @property
    def instances(self) -> int:
        return self.prefill + self.decode

    def name(self) -> str:
        if self.prefill == 0:
            return f"{self.decode} aggregated"
        cond = f", local prefill <= {self.max_local_prefill_tokens} tokens" if self.max_local_prefill_tokens else ""
        if self.max_prefill_queue_tokens:
            cond += f", local past {self.max_prefill_queue_tokens} queued tokens"
        return f"{self.prefill}P+{self.decode}D{cond}"


STREAM_LAYER_GROUPS = 4  # pdserve's default: server.layer_wise_kv on, engine.kv_layer_groups 4


@dataclass(frozen=True)
class Arrival:
    time_s: float
    prompt_tokens: int
    output_tokens: int


@dataclass
class _Req:
    arrival: Arrival
    computed: int = 0  # prompt tokens prefilled
    generated: int = 0
    prefill_start_s: float | None = None  # its first prompt chunk's step began
    first_token_s: float | None = None
    finish_s: float | None = None
    decode_on: _Instance | None = None


@dataclass(eq=False)
class _Instance:
    index: int
    role: str
    waiting: deque[_Req] = field(default_factory=deque)  # prompts to prefill, in arrival order
    running: list[_Req] = field(default_factory=list)  # decoding
    ready: deque[_Req] = field(default_factory=deque)  # KV arrived, waiting for a decode slot
    busy: bool = False
    polled: list[_Req] = field(default_factory=list)  # first tokens its loop picks up at its next step's start
    emitting: list[_Req] = field(default_factory=list)  # first tokens that leave with its current step's outputs

    def queued_tokens(self) -> int:
        return sum(r.arrival.prompt_tokens - r.computed for r in self.waiting)

    def load(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.ready)


@dataclass(frozen=True)
class RequestResult:
    ttft_s: float
    tpot_s: float  # 0 for a single-token output


@dataclass(frozen=True)
class SimResult:
    split: Split
    results: list[RequestResult]
    elapsed_s: float  # first arrival to last completion (as `pdserve bench` counts a run)

    def goodput(self, slo_ttft_s: float, slo_tpot_s: float) -> float:
        """Requests per second that met both SLOs."""
        good = sum(r.ttft_s <= slo_ttft_s and r.tpot_s <= slo_tpot_s for r in self.results)
        return good / max(self.elapsed_s, 1e-9)

    def attainment(self, slo_ttft_s: float, slo_tpot_s: float) -> float:
        good = sum(r.ttft_s <= slo_ttft_s and r.tpot_s <= slo_tpot_s for r in self.results)
        return good / max(1, len(self.results))


def simulate(profile: EngineProfile, split: Split, arrivals: list[Arrival],
             stream_layer_groups: int = STREAM_LAYER_GROUPS, prefill_step: StepTimeModel | None = None) -> SimResult:
    """Serve `arrivals` (sorted by time) on `split`; every request runs to completion. `stream_layer_groups`: the
    layer groups a disaggregated prompt's KV streams in while it computes (0: moved after the prefill).
    `prefill_step`: the prefill instances' step times, where they differ from the profile's (e.g. each role
    calibrated by its own measured slowdown); the decode instances always take the profile's."""
    if split.decode < 1:
        raise ValueError("a split needs at least one decode instance")
    budget, max_seqs = profile.max_num_batched_tokens, profile.max_num_seqs
    prefills = [_Instance(i, "prefill") for i in range(split.prefill)]
    decodes = [_Instance(split.prefill + i, "decode") for i in range(split.decode)]
    events: list[tuple[float, int, str, object]] = []
    seq = itertools.count()
    reqs = [_Req(a) for a in arrivals]
    for r in reqs:
        heapq.heappush(events, (r.arrival.time_s, next(seq), "arrive", r))

    def start_step(inst: _Instance, now: float) -> None:
        while inst.ready and len(inst.running) < max_seqs:
            inst.running.append(inst.ready.popleft())
        rows = list(inst.running)
        left = budget - len(rows)
        chunks: list[tuple[_Req, int]] = []
        for r in inst.waiting:
            if left <= 0 or len(rows) + len(chunks) >= max_seqs:
                break
            n = min(left, r.arrival.prompt_tokens - r.computed)
            chunks.append((r, n))
            left -= n
            if r.prefill_start_s is None:
                r.prefill_start_s = now
        if not rows and not chunks:
            inst.busy = False
            return
        shape = StepShape(prefill_tokens=sum(n for _, n in chunks), decode_seqs=len(rows),
                          decode_context=sum(r.arrival.prompt_tokens + r.generated for r in rows),
                          prefill_pairs=sum(chunk_pairs(r.computed, n) for r, n in chunks))
        inst.busy = True
        secs = (prefill_step if prefill_step is not None and inst.role == "prefill" else profile.step).predict(shape)
        heapq.heappush(events, (now + secs, next(seq), "step", (inst, rows, chunks)))

    def finish_step(inst: _Instance, rows: list[_Req], chunks: list[tuple[_Req, int]], now: float) -> None:
        for r in inst.emitting:
            r.first_token_s = now
        inst.emitting, polled, inst.polled = [], inst.polled, []
        for r in rows:
            r.generated += 1
            if r.generated >= r.arrival.output_tokens:
                r.finish_s = now
                inst.running.remove(r)
        for r, n in chunks:
            r.computed += n
            if r.computed < r.arrival.prompt_tokens:
                continue
            inst.waiting.remove(r)
            r.generated = 1
            r.first_token_s = now
            if inst.role != "decode":
                assert r.decode_on is not None
                if r.decode_on.busy:  # NOTE: its first token goes out through the decode instance's loop
                    r.decode_on.polled.append(r)
            if inst.role != "decode" and r.generated < r.arrival.output_tokens:  # hand the KV to its decode instance
                assert r.prefill_start_s is not None
                blocks = -(-r.arrival.prompt_tokens // profile.block_size)
                moved = profile.transfer.predict(blocks)  # the whole KV's transfer
                tail = moved
                if stream_layer_groups > 0:  # NOTE: all but the last chunk's last group could move while computing
                    last_group = moved * n / r.arrival.prompt_tokens / stream_layer_groups
                    tail = max(last_group, moved - (now - r.prefill_start_s))
                heapq.heappush(events, (now + tail, next(seq), "kv", r))
                continue
            if r.generated >= r.arrival.output_tokens:
                r.finish_s = now
            else:
                inst.running.append(r)
        start_step(inst, now)
        if inst.busy:
            inst.emitting = polled
        else:
            for r in polled:
                r.first_token_s = now

    def place(r: _Req, now: float) -> None:
        d = min(decodes, key=lambda i: (i.load(), i.index))
        r.decode_on = d
        cap = split.max_prefill_queue_tokens
        local = (not prefills or r.arrival.prompt_tokens <= split.max_local_prefill_tokens
                 or all(len(p.waiting) >= split.prefill_queue_threshold for p in prefills)
                 or (cap > 0 and all(p.queued_tokens() >= cap for p in prefills) and d.queued_tokens() < cap))
        target = d if local else min(prefills, key=lambda i: (i.queued_tokens(), i.index))
        target.waiting.append(r)
        if not target.busy:
            start_step(target, now)

    while events:
        now, _, kind, payload = heapq.heappop(events)
        if kind == "arrive":
            assert isinstance(payload, _Req)
            place(payload, now)
        elif kind == "step":
            inst, rows, chunks = payload  # type: ignore[misc]
            finish_step(inst, rows, chunks, now)
        else:  # "kv": the KV of a remotely prefilled request is on its decode instance, which decodes on
            assert isinstance(payload, _Req) and payload.decode_on is not None
            payload.decode_on.ready.append(payload)
            if not payload.decode_on.busy:
                start_step(payload.decode_on, now)
    out = []
    for r in reqs:
        assert r.first_token_s is not None and r.finish_s is not None
        r.finish_s = max(r.finish_s, r.first_token_s)  # a one-token answer of a prefill instance ends with it
        tpot = (r.finish_s - r.first_token_s) / (r.arrival.output_tokens - 1) if r.arrival.output_tokens > 1 else 0.0
        out.append(RequestResult(r.first_token_s - r.arrival.time_s, tpot))
    last = max(r.finish_s for r in reqs if r.finish_s is not None)
    return SimResult(split, out, last - arrivals[0].time_s)
