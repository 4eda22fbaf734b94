"""`pdserve profile`: measure one engine's step times and KV transfer times on this machine, fit the planner's
models, and write them as a profile JSON.

Every step is timed around `LLMEngine.step()` with synchronous scheduling, and its shape (prompt tokens run,
decode rows, the context they attend to) is read from the requests' progress, not assumed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine import EngineConfig, LLMEngine, SamplingParams
from engine.request import Request
from engine.step_work import chunk_pairs
from planner.step_model import StepShape, StepTimeModel, TransferTimeModel

log = logging.getLogger(__name__)

PROFILE_VERSION = 1


@dataclass(frozen=True)
class EngineProfile:
    """What the planner knows about one engine configuration on one kind of machine."""

    model: str
    device: str
    tensor_parallel_size: int
    block_size: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int
    step: StepTimeModel
    transfer: TransferTimeModel
    fit_error: float  # median relative error of the step model on the measured steps
    samples: int
    date: str
    version: int = PROFILE_VERSION
    notes: list[str] = field(default_factory=list)

    def prefill_seconds(self, prompt_tokens: int) -> float:
        """One prompt prefilled alone, in chunks of the step budget (max_num_batched_tokens)."""
        total, done = 0.0, 0
        while done < prompt_tokens:
            n = min(self.max_num_batched_tokens, prompt_tokens - done)
            total += self.step.predict(StepShape(prefill_tokens=n, prefill_pairs=chunk_pairs(done, n)))
            done += n
        return total

    def decode_step_seconds(self, rows: int, context: int) -> float:
        """A decode-only step of `rows` requests, each attending to `context` tokens."""
        return self.step.predict(StepShape(decode_seqs=rows, decode_context=rows * context))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(dataclasses.asdict(self), indent=1))

    @staticmethod
    def load(path: str | Path) -> EngineProfile:
        raw: dict[str, Any] = json.loads(Path(path).read_text())
        if raw.get("version") != PROFILE_VERSION:
            raise ValueError(f"{path}: profile version {raw.get('version')!r}, this pdserve reads {PROFILE_VERSION}")
        raw["step"] = StepTimeModel(**raw["step"])
        raw["transfer"] = TransferTimeModel(**raw["transfer"])
        return EngineProfile(**raw)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_step(engine: LLMEngine) -> tuple[StepShape, float]:
    """One engine step, timed, with the shape of what it ran."""
    before = {rid: (r, r.num_computed_tokens) for rid, r in engine.requests.items()}
    device = engine.executor.runner.device
    _sync(device)
    t0 = time.perf_counter()
    engine.step()
    _sync(device)
    secs = time.perf_counter() - t0
    prefill = decode = context = pairs = 0
    for r, done in before.values():
        ran = r.num_computed_tokens - done
        if ran <= 0:
            continue
        if done >= r.num_prompt_tokens:  # a decode row: one token after `done` cached ones
            decode += 1
            context += done + 1
        else:
            n = min(ran, r.num_prompt_tokens - done)
            prefill += n
            pairs += chunk_pairs(done, n)
    return StepShape(prefill, decode, context, pairs), secs


class _Driver:
    def __init__(self, engine: LLMEngine, seed: int = 0) -> None:
        self.engine = engine
        self.vocab = engine.config.model_config.vocab_size
        self.gen = torch.Generator().manual_seed(seed)
        self.n = 0

    def add(self, prompt_len: int, max_tokens: int) -> Request:
        self.n += 1
        rid = f"profile-{self.n}"
        prompt = torch.randint(3, self.vocab, (prompt_len,), generator=self.gen).tolist()
        self.engine.add_request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0,
                                                            ignore_eos=True))
        return self.engine.requests[rid]

    def clear(self) -> None:
        for rid in list(self.engine.requests):
            self.engine.abort_request(rid)
        while self.engine.has_unfinished_requests():
            self.engine.step()

    def until_decoding(self) -> None:
        while any(r.num_computed_tokens < r.num_prompt_tokens for r in self.engine.requests.values()):
            self.engine.step()


def _grid(limit: int, start: int = 16) -> list[int]:
    out, x = [], start
    while x < limit:
        out.append(x)
        x *= 4
    return [*out, limit]


def measure_steps(engine: LLMEngine, progress: Callable[[str], None] = log.info,
                  repeats: int = 3) -> list[tuple[StepShape, float]]:
    cfg = engine.config
    chunk, max_len, max_seqs = cfg.max_num_batched_tokens, cfg.max_model_len or 2048, cfg.max_num_seqs
    d = _Driver(engine)
    samples: list[tuple[StepShape, float]] = []
    d.add(32, 4)  # warm-up
    d.until_decoding()
    d.clear()
    prompt_lens = [n for n in _grid(min(chunk, max_len - 8)) if n < max_len - 8]
    for n in prompt_lens:  # prefill-only steps, from empty and after a cached chunk
        for _ in range(repeats):
            d.add(n, 1)
            samples.append(timed_step(engine))
            d.clear()
        if 2 * n < max_len - 8 and n <= chunk // 2:
            d.add(2 * n, 1)  # NOTE: chunk limit n: the first step caches n tokens, the second attends to them too
            engine.scheduler.max_num_batched_tokens = n
            try:
                engine.step()
                samples.append(timed_step(engine))
            finally:
                engine.scheduler.max_num_batched_tokens = chunk
            d.clear()
    progress(f"prefill steps: {len(samples)} measured (prompt lengths {prompt_lens})")
    contexts = sorted({min(64, max_len // 4), max(64, max_len // 2)})
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256) if b < max_seqs] + [max_seqs]
    for ctx in contexts:
        for b in batches:
            for _ in range(b):
                d.add(ctx, max_len - ctx - 1)
            d.until_decoding()
            for _ in range(repeats):
                samples.append(timed_step(engine))
            # mixed: the same decodes and one new prompt chunk
            if chunk - b >= 16:
                d.add(min(chunk - b, max(16, chunk // 4)), 1)
                samples.append(timed_step(engine))
            d.clear()
        progress(f"decode and mixed steps at context {ctx}: {len(samples)} measured so far (batches {batches})")
    return samples


def _holder(conn: Any, layout: Any, dtype: torch.dtype, device: str, kv_heads: int, tp_size: int) -> None:
    """The other side of the profile's KV reads: a process with a cache of the engine's geometry (rank 0's, at its
    TP) and an agent, served until the reader says done (as a prefill instance's loop serves its agent)."""
    from engine.kv_cache import KVCache
    from kv_transfer.agent import TransferAgent
    from kv_transfer.config import TransferConfig

    torch.set_num_threads(1)
    agent = TransferAgent(KVCache(layout, dtype, device), "profile-holder", 0, tp_size, kv_heads, str(dtype),
                          "profile", TransferConfig(log_transports=False))
    conn.send(agent.describe())
    while not conn.poll(0.001):
        agent.receive()
    agent.close()


def measure_transfer(engine: LLMEngine, progress: Callable[[str], None] = log.info,
                     repeats: int = 5) -> tuple[TransferTimeModel, str]:
    """KV reads from another process on this machine, each side with a cache of the engine's geometry: what moving
    a request's KV between two instances of one node costs, by the path serving takes (kv_transfer's defaults: on
    GPU a local copy). The holder sits on the next GPU past the engine's when there is one (instances of one node
    sit on different GPUs), else on the engine's device. At TP > 1 both sides are rank 0 of that TP (the ranks
    of an instance read their heads in parallel, so one rank's read is the transfer's)."""
    import multiprocessing as mp

    from engine.kv_cache import KVCache
    from kv_transfer.agent import TransferAgent
    from kv_transfer.config import TransferConfig
    from kv_transfer.read_state import ReadStatus

    runner = engine.executor.runner
    sizes = [1, 4, 16, 64, 256]
    layout = dataclasses.replace(runner.layout, num_blocks=max(sizes) * 2)
    dtype, kv_heads = engine.config.torch_dtype, engine.config.model_config.num_key_value_heads
    tp_size = engine.config.tensor_parallel_size
    holder_device, where = runner.device, "the same device"
    next_gpu = ((runner.device.index or 0) + tp_size) % max(1, torch.cuda.device_count())
    if runner.device.type == "cuda" and next_gpu != (runner.device.index or 0):
        # NOTE: the same device would time an HBM-to-HBM copy (or, through UCX, a slow staged one: 4 ms a 2 MiB block
        # on an H200 in the profile of 2026-11-29), not the NVLink read between two instances
        holder_device = torch.device("cuda", next_gpu)
        where = f"another GPU ({holder_device} to {runner.device})"
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_holder, args=(child, layout, dtype, str(holder_device), kv_heads, tp_size),
                       daemon=True)
    proc.start()
    samples: list[tuple[int, float]] = []
    reader = None
    try:
        if not conn.poll(120):
            raise RuntimeError("the profile's KV holder process did not start in 120 s")
        holder = conn.recv()
        reader = TransferAgent(KVCache(layout, dtype, runner.device), "profile-reader", 0, tp_size, kv_heads,
                               str(dtype), "profile", TransferConfig(log_transports=False))
        for n in sizes:
            for i in range(repeats + 1):
                xid = f"p{n}-{i}"
                t0 = time.perf_counter()
                err = reader.start_read(xid, [holder], list(range(n)), list(range(n, 2 * n)))
                if err is not None:
                    raise RuntimeError(f"profile transfer failed: {err}")
                while (state := reader.poll([xid])[xid]).status is ReadStatus.IN_FLIGHT:
                    if time.perf_counter() > t0 + 30:
                        raise RuntimeError("profile transfer did not complete in 30 s")
                if state.status is not ReadStatus.DONE:
                    raise RuntimeError(f"profile transfer failed: {state}")
                reader.finish(xid)
                if i:  # the first read connects
                    samples.append((n, time.perf_counter() - t0))
        progress(f"KV transfer: {len(samples)} reads of {sizes} blocks from another process")
    finally:
        if reader is not None:
            reader.close()
        conn.send("done")
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return TransferTimeModel.fit(samples), f"transfer measured from another process on {where}"


def profile_engine(config: EngineConfig, progress: Callable[[str], None] = log.info) -> EngineProfile:
    config = dataclasses.replace(config, async_scheduling=False, enable_prefix_caching=False)
    engine = LLMEngine(config)
    try:
        samples = measure_steps(engine, progress)
        model = StepTimeModel.fit(samples)
        errors = sorted(abs(model.predict(s) - t) / t for s, t in samples)
        transfer, note = measure_transfer(engine, progress)
        cfg = engine.config
        return EngineProfile(
            model=Path(cfg.model).name, device=str(engine.executor.runner.device.type),
            tensor_parallel_size=cfg.tensor_parallel_size, block_size=cfg.block_size,
            max_num_seqs=cfg.max_num_seqs, max_num_batched_tokens=cfg.max_num_batched_tokens,
            max_model_len=cfg.max_model_len or 0, step=model, transfer=transfer,
            fit_error=errors[len(errors) // 2], samples=len(samples), date=time.strftime("%Y-%m-%d"),
            notes=[note])
    finally:
        engine.shutdown()
