"""The step-level engine the workers drive: add_request / step / abort_request / take_kv_events.

    step():  schedule -> run one batched forward -> postprocess (sample, append, stop, free)

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

from engine.block_pool import BlockPoolStats, KVEvent
from engine.config import EngineConfig
from engine.executor import Executor
from engine.kv_cache_manager import KVCacheManager
from engine.model_runner import build_step_input
from engine.outputs import RequestOutput
from engine.request import Request, RequestStatus
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
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
        self._arrival = itertools.count()
        self.eos_token_ids = config.model_config.eos_token_ids

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

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if request_id in self.requests:
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
        )
        self.requests[request_id] = request
        self.detok[request_id] = IncrementalDetokenizer(self.tokenizer, params.stop)
        self.scheduler.add(request)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return
        self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self._aborted.append(request)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- the loop ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        out = self.scheduler.schedule()
        logits = self.executor.execute(build_step_input(out, self.config.block_size)) if len(out) else None
        return self._postprocess(out, logits)

    def _postprocess(self, out, logits) -> list[RequestOutput]:  # type: ignore[no-untyped-def]
        self.scheduler.update_after_step(out)
        results = [self._finish_output(r) for r in self._aborted]
        self._aborted = []
        sampling = [r for r in out.requests if r.num_computed_tokens == r.num_tokens]
        if not sampling:
            return results
        tokens = self.sampler(logits, sampling)
        now = time.monotonic()
        for request, token in zip(sampling, tokens, strict=True):
            request.append_token(token)
            status = request.check_stop()
            detok = self.detok[request.request_id]
            matched = detok.add(token) if not (status and request.stop_reason == token) else None
            if matched is not None:
                status, request.stop_reason = RequestStatus.FINISHED_STOPPED, matched
            if status is not None:
                if matched is None:
                    detok.flush()
                self.scheduler.finish(request, status)
                results.append(self._finish_output(request, [token]))
            else:
                results.append(self._output(request, [token]))
            results[-1].metrics["time"] = now
        return results

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
