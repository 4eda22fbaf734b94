"""The step-level engine the workers drive: add_request / step / abort_request / take_kv_events.

    step():  schedule -> run one batched forward -> postprocess (sample, append, stop, free)

With async scheduling (engine/inflight.py; the default on one GPU) step() launches its forward before it reads
the previous step's tokens, so a step's outputs come back from the next call.

Contracts:
  - add_request validates everything and raises ValueError before touching any state, so a bad request never
    disturbs the others in flight.
  - abort_request may be called at any time, for a waiting, running or preempted request; its blocks are freed
    at once. Aborting an unknown or finished id is a no-op.
  - every request that was added is reported finished exactly once by step() (aborts included).
"""

from __future__ import annotations

import itertools
import logging
import time
from dataclasses import dataclass

import torch

from engine.block_pool import BlockPoolStats, KVEvent
from engine.config import EngineConfig
from engine.executor import Executor
from engine.inflight import InflightStep
from engine.kv_cache_manager import KVCacheManager
from engine.model_runner import build_step_input
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler, SchedulerOutput
from engine.tokenizer import IncrementalDetokenizer, load_tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineStats:
    num_waiting: int
    num_running: int
    kv: BlockPoolStats
    kv_usage: float
    prefix_cache_queries: int  # prompt tokens looked up
    prefix_cache_hits: int  # of those, tokens served from cache
    num_preemptions: int


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        config = config.resolved()
        self.config = config
        self.tokenizer = load_tokenizer(config.model)
        self.executor = Executor(config)
        layout = self.executor.runner.layout
        self.kv = KVCacheManager(layout.num_blocks, config.block_size, config.enable_prefix_caching,
                                 config.hash_salt)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self._aborted: list[Request] = []
        self._pending: list[RequestOutput] = []  # produced outside step(), returned by the next step()
        self.held: dict[str, Request] = {}  # finished prefill-role requests whose blocks await a reader
        self.quarantined: dict[str, list[int]] = {}  # blocks a failed read may still write into
        self.num_local_fallbacks = 0
        self._arrival = itertools.count()
        self._inflight: InflightStep | None = None
        self.eos_token_ids = config.model_config.eos_token_ids
        # Sampling steps: wall time, and the part the host spent outside waiting for the device (schedule,
        # input building, launches, postprocess). Read by the benchmarks; reset freely.
        self.timing: dict[str, float] = {"steps": 0, "host_s": 0.0, "total_s": 0.0}

    # ---- requests ------------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer.json; pass prompt token ids instead of text")
            return self.tokenizer.encode(prompt, add_special_tokens=True).ids
        return list(prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError with a clear message for input the engine cannot serve."""
        params.validate()
        vocab = self.config.model_config.vocab_size
        max_len = self.config.max_model_len or 0
        if not prompt_ids:
            raise ValueError("prompt is empty: at least one token is required")
        bad = [t for t in prompt_ids if not 0 <= int(t) < vocab]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if len(prompt_ids) >= max_len:
            raise ValueError(
                f"prompt has {len(prompt_ids)} tokens but max_model_len is {max_len}: at most {max_len - 1} "
                "prompt tokens fit, leaving room for one generated token"
            )
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer.json in the model directory")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    hold_kv: bool = False) -> None:
        """Queue a request. With `hold_kv` (the prefill role), its blocks outlive it: the finished output
        carries `kv_block_ids`, and the blocks stay allocated until `release_held(request_id)`."""
        self._create(request_id, prompt, params, hold_kv)
        self.scheduler.add(self.requests[request_id])

    def _create(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                hold_kv: bool = False) -> Request:
        if request_id in self.requests or request_id in self.held:
            raise ValueError(f"request id {request_id!r} is already in flight")
        prompt_ids = self.encode(prompt)
        self.validate(prompt_ids, params)
        request = Request(
            request_id=request_id,
            prompt_token_ids=[int(t) for t in prompt_ids],
            sampling_params=params,
            arrival=next(self._arrival),
            eos_token_ids=self.eos_token_ids,
            max_model_len=self.config.max_model_len or 0,
            hold_kv=hold_kv,
        )
        self.requests[request_id] = request
        self.detok[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        return request

    def abort_request(self, request_id: str) -> None:
        if self.release_held(request_id):
            return
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self._aborted.append(request)

    def release_held(self, request_id: str) -> bool:
        """Free the blocks of a finished hold_kv request. False if it holds none (unknown or released)."""
        request = self.held.pop(request_id, None)
        if request is None:
            return False
        self.kv.free(request)
        return True

    # ---- requests whose KV is computed elsewhere (the decode role) -----------------------------------------
    def reserve_remote(self, request_id: str, prompt: list[int], params: SamplingParams) -> tuple[list[int], int]:
        """Create a request whose prompt KV will be pulled from a prefill worker: look up the local prefix
        cache and allocate blocks for the rest. Returns (block ids covering the prompt, number of leading
        blocks already cached here). The request waits, outside the scheduler, for `commit_remote` or
        `fallback_local`. Raises ValueError for bad input, RuntimeError when the cache has no room now."""
        request = self._create(request_id, prompt, params)
        hits = self.kv.get_computed_blocks(request)
        if not self.kv.allocate_slots(request, request.num_prompt_tokens - len(hits) * self.config.block_size,
                                      hits):
            del self.requests[request_id], self.detok[request_id]
            raise RuntimeError("no KV blocks free for the prompt right now")
        request.status = RequestStatus.WAITING_FOR_KV
        request.num_cached_tokens = len(hits) * self.config.block_size
        request.num_cached_blocks = len(hits)
        return list(request.block_ids), len(hits)

    def commit_remote(self, request_id: str, first_token: int) -> None:
        """The pulled KV is in place: the prompt counts as computed, `first_token` (sampled by the prefill
        worker) is the first output, and the request joins the scheduler to decode."""
        request = self.requests[request_id]
        assert request.status is RequestStatus.WAITING_FOR_KV
        request.num_computed_tokens = request.num_prompt_tokens
        self.kv.cache_full_blocks(request)  # the pulled blocks are now valid prefix-cache entries
        request.status = RequestStatus.WAITING
        self._emit(request, first_token)
        if not request.finished:
            self.scheduler.add(request)

    def fallback_local(self, request_id: str, quarantine: bool = False) -> None:
        """Compute the prompt here instead (the pull failed). With `quarantine`, the request's blocks are set
        aside (a failed read may still write into them) until `release_quarantine`; it gets fresh ones."""
        request = self.requests[request_id]
        assert request.status is RequestStatus.WAITING_FOR_KV
        if quarantine:
            self.quarantine_blocks(request_id)
        else:
            self.kv.free(request)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.num_local_fallbacks += 1
        self.scheduler.add(request)

    def quarantine_blocks(self, request_id: str) -> None:
        """Set a waiting-for-KV request's blocks aside: still allocated, owned by nobody, until
        `release_quarantine` (a read that failed or timed out may still be writing into them)."""
        request = self.requests[request_id]
        self.quarantined[request_id] = request.block_ids
        request.block_ids, request.num_cached_blocks = [], 0

    def release_quarantine(self, request_id: str) -> None:
        blocks = self.quarantined.pop(request_id, None)
        if blocks:
            self.kv.pool.free(reversed(blocks))

    def has_unfinished_requests(self) -> bool:
        """True while any request is queued, running or waiting for KV (held blocks do not count)."""
        return bool(self.requests) or bool(self._pending)

    # ---- the loop ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule, run one batched forward, postprocess. Returns the outputs produced since the
        last call: this step's, or with async scheduling the previous step's."""
        if self.config.async_scheduling:
            return self._step_async()
        t0 = time.perf_counter()
        out = self.scheduler.schedule()
        logits = self.executor.execute(build_step_input(out, self.config.block_size)) if len(out) else None
        return self._postprocess(out, logits, t0)

    def _postprocess(self, out: SchedulerOutput, logits: torch.Tensor | None, t0: float) -> list[RequestOutput]:
        self.scheduler.update_after_step(out)
        results = self._pending + [self._finish_output(r) for r in self._aborted]
        self._pending, self._aborted = [], []
        sampling = [r for r in out.requests if r.num_computed_tokens == r.num_tokens]
        if not sampling:
            return results
        t1 = time.perf_counter()
        tokens = self.sampler(logits, sampling)  # NOTE: the step's one wait for the device
        t2 = time.perf_counter()
        self._pending = results
        for request, token in zip(sampling, tokens, strict=True):
            self._emit(request, token)
        results, self._pending = self._pending, []
        t3 = time.perf_counter()
        timing = self.timing
        timing["steps"] += 1
        timing["host_s"] += (t1 - t0) + (t3 - t2)
        timing["total_s"] += t3 - t0
        return results

    def _step_async(self) -> list[RequestOutput]:
        """Launch this step, then resolve the previous one (the protocol is in engine/inflight.py)."""
        t0 = time.perf_counter()
        prev, self._inflight = self._inflight, None
        out = self.scheduler.schedule()
        sampling: list[Request] = []
        tokens: torch.Tensor | None = None
        if len(out):
            inp = build_step_input(out, self.config.block_size)
            inp.feed = prev.feed(out.requests, inp.query_start_loc) if prev is not None else None
            logits = self.executor.execute(inp, prev.tokens if inp.feed is not None else None)
            sampling = [r for r, n in zip(out.requests, out.num_scheduled_tokens, strict=True)
                        if r.num_computed_tokens + n == r.num_tokens]
            if sampling:
                tokens = self.sampler.sample(logits, sampling)  # [N] on the device; nothing waits
        results = self._pending + [self._finish_output(r) for r in self._aborted]
        self._pending, self._aborted = [], []
        wait_s = 0.0
        if prev is not None:
            t1 = time.perf_counter()
            values = prev.wait()  # NOTE: the step's one wait for the device, while this step's forward runs
            wait_s = time.perf_counter() - t1
            self._pending = results
            for request, pending, token in zip(prev.requests, prev.pending, values, strict=True):
                if not request.finished:  # aborted since, or stopped: its row in this step is dropped
                    self._emit(request, token, pending)
            results, self._pending = self._pending, []
        self.scheduler.update_after_step(out)
        if tokens is not None:
            pending = [not r.finished and not r.finishes_by_length_after_next() for r in sampling]
            for request, p in zip(sampling, pending, strict=True):
                if p:
                    request.append_placeholder()
            self._inflight = InflightStep.launch(sampling, pending, tokens)
        if len(out) or prev is not None:
            total = time.perf_counter() - t0
            timing = self.timing
            timing["steps"] += 1
            timing["host_s"] += total - wait_s
            timing["total_s"] += total
        return results

    def _emit(self, request: Request, token: int, pending: bool = False) -> None:
        """Append a sampled token (or fill in its placeholder), apply the stop rules, and queue the request's
        output for this step."""
        if pending:
            request.resolve_token(token)
        else:
            request.append_token(token)
        status = request.check_stop()
        detok = self.detok[request.request_id]
        matched = detok.add(token) if not (status and request.stop_reason == token) else None
        if matched is not None:
            status, request.stop_reason = RequestStatus.FINISHED_STOPPED, matched
        if status is not None:
            if matched is None:
                detok.flush()
            self.scheduler.finish(request, status, free_blocks=not request.hold_kv)
            output = self._finish_output(request, [token])
            if request.hold_kv:
                self.held[request.request_id] = request
                output.kv_block_ids = list(request.block_ids)
        else:
            output = self._output(request, [token])
        output.metrics["time"] = time.monotonic()
        self._pending.append(output)

    def _output(self, request: Request, new: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            token_ids=request.output_token_ids,
            new_token_ids=new,
            text=self.detok[request.request_id].text,
            finished=request.finished,
            finish_reason=request.status.value if request.finished else None,
            stop_reason=request.stop_reason,
            num_cached_tokens=request.num_cached_tokens,
        )

    def _finish_output(self, request: Request, new: list[int] | None = None) -> RequestOutput:
        output = self._output(request, new or [])
        del self.requests[request.request_id]
        del self.detok[request.request_id]
        return output

    # ---- observability -------------------------------------------------------------------------------------
    def take_kv_events(self) -> list[KVEvent]:
        """KV events since the last call: blocks stored into / removed from the prefix cache, by hash."""
        return self.kv.take_events()

    def stats(self) -> EngineStats:
        return EngineStats(
            num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running),
            kv=self.kv.stats(),
            kv_usage=self.kv.usage,
            prefix_cache_queries=self.kv.prefix_queries,
            prefix_cache_hits=self.kv.prefix_hits,
            num_preemptions=self.scheduler.num_preemptions,
        )

    def shutdown(self) -> None:
        self.executor.shutdown()
