"""The engine's warm-up: tiny requests run through the real step path before an instance serves, so the GPU
kernels of the step shapes serving meets are compiled then and not while a request waits.

NOTE: why it is needed. Triton compiles a kernel on its first launch for each specialisation of its arguments
(an integer argument equal to 1, or divisible by 16, is a different one), and the attention path differs between a
fresh prompt, a prompt continued on cached or chunked context, and prefill beside decode rows. A server that meets
such a shape first under load stalls that step for the compile: on an H200 a prefill instance's first step with
two prompts in it held every request behind it for ~1 s (docs/performance.md, "A compile in the middle of
serving"). CUDA graphs already warm the decode batches they capture (engine/cuda_graph.py); this covers the rest.

The engine runs it from its constructor, before its KV connector is attached (no KV is held or streamed for these
requests), and then starts from a clean state: no cached prefix, no KV events, no counted steps.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from engine import envs
from engine.attention.dense_prefill import DENSE_DTYPES, bucket_lengths, padded_len
from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm_engine import LLMEngine
    from engine.scheduler import SchedulerOutput

log = logging.getLogger(__name__)

ROUND_STEPS = 64  # a bound on each round's steps: each finishes in a handful
MIN_TOKEN = 3  # ids below are special tokens in most vocabularies


@dataclass(frozen=True)
class WarmupStep:
    """One warm-up step's shape: how many prompt chunks, of them how many continue earlier context (a cached
    prefix or an earlier chunk), and how many decode rows ran in it."""

    prompts: int
    continued: int
    decode_rows: int
    tokens: int
    table_width: int  # blocks of the step's longest sequence: the width of its block table


@dataclass
class WarmupReport:
    steps: list[WarmupStep] = field(default_factory=list)
    seconds: float = 0.0
    dense_lengths: list[int] = field(default_factory=list)  # padded dense prefill lengths it set out to run
    dense_bucket: int = 0  # PDSERVE_DENSE_PREFILL_BUCKET when it ran them
    thread: str = ""  # the thread it ran on: serving's steps must run on the same one (instance/worker.py)

    def covers(self) -> dict[str, bool]:
        """Which of the shapes it set out to run it ran (tests assert all of them)."""
        s = self.steps
        lone = {padded_len(x.tokens, self.dense_bucket)
                for x in s if x.prompts == 1 and not (x.continued or x.decode_rows)}
        return {
            "one prompt": any(x.prompts == 1 and not x.decode_rows for x in s),
            "several prompts": any(x.prompts >= 2 for x in s),
            "a continued prompt": any(x.continued for x in s),
            "prefill beside decode rows": any(x.prompts and x.decode_rows for x in s),
            "decode rows alone": any(x.decode_rows and not x.prompts for x in s),
            "tokens a multiple of 16": any(x.tokens % 16 == 0 and x.prompts for x in s),
            "tokens not a multiple of 16": any(x.tokens % 16 and x.prompts for x in s),
            "a block table 1 wide": any(x.table_width == 1 and x.prompts for x in s),
            "a block table a multiple of 16 wide": any(x.table_width % 16 == 0 and x.prompts for x in s),
        } | ({"every padded dense length": set(self.dense_lengths) <= lone} if self.dense_lengths else {})


def _shape(out: SchedulerOutput, block_size: int) -> WarmupStep:
    prompts = continued = rows = width = 0
    for request, n in zip(out.requests, out.num_scheduled_tokens, strict=True):
        if request.num_computed_tokens < request.num_prompt_tokens:
            prompts += 1
            continued += request.num_computed_tokens > 0
        else:
            rows += 1
        width = max(width, -(-(request.num_computed_tokens + n) // block_size))
    return WarmupStep(prompts, continued, rows, sum(out.num_scheduled_tokens), width)


class _Recorder:
    """Wraps the scheduler's schedule() to record each step's shape."""

    def __init__(self, engine: LLMEngine, report: WarmupReport) -> None:
        self.schedule, self.report = engine.scheduler.schedule, report
        self.block_size = engine.config.block_size

    def __call__(self) -> SchedulerOutput:
        out = self.schedule()
        if len(out):
            self.report.steps.append(_shape(out, self.block_size))
        return out


def warm_up(engine: LLMEngine, seed: int = 0) -> WarmupReport:
    """Run the warm-up rounds to completion on `engine` (no KV connector attached yet). The caller resets the
    engine's state after."""
    report = WarmupReport(thread=threading.current_thread().name)
    t0 = time.perf_counter()
    rng = random.Random(seed)
    cfg = engine.config
    vocab = engine.info.vocab_size
    limit = min(cfg.max_num_batched_tokens, cfg.max_model_len - 8)
    ids = iter(range(1_000_000))

    def prompt(n: int, limit: int = cfg.max_model_len - 8) -> list[int]:
        return [rng.randrange(MIN_TOKEN, vocab) for _ in range(max(1, min(n, limit)))]

    def add(tokens: list[int], max_tokens: int = 3) -> None:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        engine.add_request(f"warmup-{next(ids)}", tokens, params)

    def run(until_idle: bool = True, n: int = ROUND_STEPS) -> None:
        for _ in range(min(n, ROUND_STEPS)):
            if until_idle and not engine.has_unfinished_requests():
                return
            engine.step()
        if until_idle and engine.has_unfinished_requests():
            log.warning("engine warm-up: a round did not finish in %d steps; going on (the engine starts clean)",
                        ROUND_STEPS)

    # a dense step's prompt: one fresh prompt of at most a step's budget that leaves room for one output token
    dense_limit = min(cfg.max_num_batched_tokens, cfg.max_model_len - 1)
    if cfg.torch_dtype in DENSE_DTYPES and envs.PDSERVE_DENSE_PREFILL.get():
        report.dense_bucket = envs.PDSERVE_DENSE_PREFILL_BUCKET.get()
        report.dense_lengths = bucket_lengths(report.dense_bucket, dense_limit)
    # NOTE: logged before it runs: with padded dense lengths it takes seconds (11 s for the Llama-3-8B shape on an
    # H200 with a cold Triton cache: 31 lengths up to 7,936 tokens, measured before the 8,192 one was added), and
    # an operator watching a start-up should see why
    log.info("engine warm-up: the step shapes%s", f" and one prompt of each of {len(report.dense_lengths)} padded "
             f"dense lengths up to {report.dense_lengths[-1]} tokens" if report.dense_lengths else "")
    engine.scheduler.schedule = _Recorder(engine, report)  # type: ignore[method-assign]
    try:
        add(prompt(33))  # one fresh prompt; then decode rows alone
        run()
        # NOTE: the block table's row stride is a kernel argument, and Triton compiles apart a stride of 1 and one
        # divisible by 16: a prompt within one block, and one of exactly 16 blocks
        add(prompt(cfg.block_size - 3))
        run()
        add(prompt(16 * cfg.block_size - 6))
        run()
        shared = prompt(3 * cfg.block_size)
        for n in (40, 56):  # several fresh prompts in one step (with the next one: 144 tokens, a multiple of 16)
            add(prompt(n))
        add(shared)
        run()
        add(shared + prompt(21))  # continued on a cached prefix
        add(prompt(35), max_tokens=8)
        run(until_idle=False, n=2)  # its prefill and a decode step
        add(prompt(50))  # prefill beside decode rows
        run()
        if limit > 64:  # a prompt filling a step's token budget, and one chunked behind it
            add(prompt(limit - 17))
            add(prompt(40))
            run()
        for n in report.dense_lengths:  # a lone prompt of each padded dense length: SDPA builds its plans now
            add(prompt(n, dense_limit), max_tokens=1)
            run()
    finally:
        del engine.scheduler.schedule  # the instance attribute: back to the class's method
    report.seconds = time.perf_counter() - t0
    missing = [k for k, ok in report.covers().items() if not ok]
    log.info("engine warm-up: %d steps in %.1f s%s", len(report.steps), report.seconds,
             f" (not run: {', '.join(missing)})" if missing else "")
    return report
