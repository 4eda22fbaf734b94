"""The step-level engine the workers drive: add_request / step / abort_request / take_kv_events.

    step():  schedule -> run one batched forward -> postprocess (sample, append, stop, free)

How the forward runs is a strategy (engine/stepper.py): synchronous, or with async scheduling (the default on
one GPU) launching step n+1 before reading step n's tokens, so a step's outputs come back from the next call.
A KV connector (engine/kv_connector.py) is called through one interface; engine/remote_kv.py keeps its
bookkeeping.

Contracts:
  - add_request validates everything and raises ValueError before touching any state, so a bad request never
    disturbs the others in flight.
  - abort_request may be called at any time, for a waiting, running, preempted, loading or held request; its
    blocks are freed at once (or quarantined while a read may still write into them). Unknown ids are ignored.
  - every request that was added is reported finished exactly once by step() (aborts included).
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from engine.async_stepper import AsyncStepper
from engine.block_pool import KVEvent
from engine.config import EngineConfig
from engine.engine_stats import EngineCounters, EngineLoad, EngineStats
from engine.executor import Executor
from engine.kv_cache_manager import KVCacheManager
from engine.kv_connector import KVConnectorSpec
from engine.logprobs import TokenLogprob
from engine.metrics import EngineMetrics
from engine.model_info import ModelInfo
from engine.outputs import RequestOutput
from engine.rank_launcher import ProcessRankLauncher, RankLauncher
from engine.remote_kv import RemoteKV
from engine.request import Request, RequestStatus
from engine.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.step_profile import StepProfile
from engine.step_trace import StepTrace
from engine.step_work import StepWorkMeter
from engine.stepper import SyncStepper
from engine.tokenizer import IncrementalDetokenizer, encode_prompt, load_tokenizer
from engine.warmup import WarmupReport, warm_up


class LLMEngine:
    def __init__(self, config: EngineConfig, kv_connector: KVConnectorSpec | None = None,
                 rank_launcher: RankLauncher | None = None) -> None:
        """`rank_launcher`: who starts TP ranks 1..N-1 (None: spawned processes, engine/rank_launcher.py)."""
        rank_launcher = rank_launcher or ProcessRankLauncher()
        self.config = config = config.resolved(rank_launcher.gpus_needed_here(config.tensor_parallel_size))
        self.info = ModelInfo.from_config(config)
        self.tokenizer = load_tokenizer(config.model)
        self.executor = Executor(config, rank_launcher)
        self.remote: RemoteKV | None = None
        self._kv_ranks: Any = None  # the connector's worker parts (KVRanks), kept for replace_kv_connector
        self.step_trace: StepTrace | None = None  # PDSERVE_STEP_TRACE, set after the warm-up
        self.step_profile: StepProfile | None = None  # PDSERVE_STEP_PROFILE, likewise
        self._start_state()
        self.warmup: WarmupReport | None = None  # what the warm-up ran (config.warmup), for logs and tests
        if config.warmup:
            # NOTE: before the connector is attached: no KV of these requests is held for a reader or streamed
            self.warmup = warm_up(self)
            self._start_state()
            self.executor.runner.reset_activity()
        if kv_connector is not None:
            self._kv_ranks = ranks = self.executor.attach_kv_workers(kv_connector)
            self.remote = RemoteKV(kv_connector.make_connector(ranks, ranks.descriptors), self.kv, self.scheduler,
                                   self.metrics)
        # NOTE: after the warm-up, whose steps are not serving's
        self.step_trace = StepTrace.from_env({"model": config.model, "connector": type(
            self.remote.connector).__name__ if self.remote is not None else None})
        self.step_profile = StepProfile.from_env()

    def _start_state(self) -> None:
        """The request state, the KV cache's bookkeeping and the counters, as an engine starts serving (after a
        warm-up: no cached prefix, no KV events, no counted steps)."""
        config = self.config
        self.kv = KVCacheManager(self.num_kv_blocks, config.block_size, config.enable_prefix_caching,
                                 config.hash_salt)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.enable_chunked_prefill)
        self.metrics = EngineMetrics()
        # requests finished, their prompt tokens, their generated tokens: the workload the adaptive P/D split
        # (pdserve/adaptive_split.py) reads from the decode pool's stats records
        self.finished_totals = (0, 0, 0)
        self.metrics.watch(self.executor.runner.counters)
        stepper = AsyncStepper if config.async_scheduling else SyncStepper
        self.stepper = stepper(self.executor, self.scheduler, Sampler(), config.block_size, self.metrics)
        self.requests: dict[str, Request] = {}
        self.detok: dict[str, IncrementalDetokenizer] = {}
        self._outputs: list[RequestOutput] = []  # made outside step() (aborts), returned by the next step()
        self._arrival = itertools.count()
        self.work = StepWorkMeter()  # what the steps computed and their time (the adaptive split's calibration)

    @property
    def num_kv_blocks(self) -> int:
        return self.executor.runner.layout.num_blocks

    # ---- requests ------------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        return encode_prompt(self.tokenizer, prompt)

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError with a clear message for input the engine cannot serve."""
        params.validate()
        self.info.validate_prompt(prompt_ids)  # NOTE: the same check the router makes before placing
        if params.stop and self.tokenizer is None:
            raise ValueError("stop strings need a tokenizer.json in the model directory")

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                    kv_source: Any | None = None, resumed: list[int] = (),  # type: ignore[assignment]
                    kv_reader: Any | None = None) -> int:
        """Queue a request. With `kv_source` (the decode role: where a prefill instance holds the prompt's KV),
        the KV connector loads the prompt instead of computing it; with `kv_reader` (the prefill role), the
        connector streams the prompt's KV progress to that reader, layer group by layer group. `resumed`: tokens
        the request already generated elsewhere (a migrated stream): they count as its output (max_tokens, stop
        rules, text) and are computed here with the prompt. Returns the number of KV blocks being loaded (0
        without a source, or while the load waits for room: engine/remote_kv.py). Raises ValueError for bad input,
        NoKVSpaceError for a prompt larger than the whole cache."""
        if request_id in self.requests or (self.remote is not None and request_id in self.remote.held):
            raise ValueError(f"request id {request_id!r} is already in flight")
        prompt_ids = self.encode(prompt)
        self.validate(prompt_ids, params)
        request = Request(request_id, [int(t) for t in prompt_ids], params, next(self._arrival),
                          self.info.eos_token_ids, self.info.max_model_len)
        detok = IncrementalDetokenizer(self.tokenizer, params.stop)
        if resumed:
            self.info.validate_resumed(prompt_ids, list(resumed), params.max_tokens, kv_source)
            for token in resumed:
                request.append_token(int(token))
                detok.add(int(token))
        if kv_reader is not None:
            if self.remote is None or kv_source is not None:
                raise ValueError("kv_reader needs a KV connector, and a prompt computed here (no kv_source)")
            self.remote.connector.stream_to(request_id, kv_reader)
        if kv_source is None:
            self.scheduler.add(request)
            loading = 0
        elif self.remote is None:
            raise ValueError("this engine has no KV connector to load a prompt's KV with")
        else:
            loading = self.remote.start_load(request, kv_source)
            if loading is None:  # NOTE: its prefill failed before it came (RemoteKV.lost_early): computed here
                self.scheduler.add(request)
                loading = 0
        self.requests[request_id] = request
        self.detok[request_id] = detok
        return loading

    def abort_request(self, request_id: str) -> None:
        if self.remote is not None and self.remote.drop_held(request_id):
            return
        request = self.requests.get(request_id)
        if request is None or request.finished:
            return
        if request.status is RequestStatus.WAITING_FOR_KV:
            assert self.remote is not None
            self.remote.cancel_load(request)
            request.status = RequestStatus.FINISHED_ABORTED
        else:
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
            if self.remote is not None:
                self.remote.connector.request_aborted(request_id)
        self._outputs.append(self._finish_output(request))

    def kv_source_ready(self, request_id: str, source: Any) -> None:
        """The prefill of a loading request finished and its router passes the hand-off on: the connector takes
        from it what the stream has not brought yet."""
        if self.remote is not None:
            self.remote.source_ready(request_id, source)

    def meet_kv_peers(self, peers: list[Any]) -> int:
        """Instances of the other role this one may exchange KV with (KVConnector.meet): how many were new."""
        return self.remote.connector.meet(peers) if self.remote is not None else 0

    def kv_source_lost(self, request_id: str) -> None:
        """The prefill instance computing a loading request's prompt failed (its router saw it): the request is
        prefilled here instead (a failed load, logged and counted)."""
        if self.remote is None:
            return
        if request_id not in self.requests:
            self.remote.lost_before_request(request_id)
        elif (request := self.remote.source_lost(request_id)) is not None:
            request.status = RequestStatus.WAITING
            self.scheduler.add(request)

    def has_unfinished_requests(self) -> bool:
        """True while any request is queued, running or loading its KV, or a cancelled read is still in flight
        (held blocks do not count: holding is not work)."""
        return bool(self.requests) or bool(self._outputs) or (self.remote is not None and
                                                              self.remote.connector.has_work())

    # ---- the loop ------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """schedule -> run -> postprocess. Returns the outputs produced since the last call: this step's, or
        with async scheduling the previous step's."""
        profile = self.step_profile if self.step_profile is not None and self.step_profile.active else None
        if profile is not None:
            profile.begin()
        t0 = time.perf_counter()
        self.work.step_started(t0)
        outputs, self._outputs = self._outputs, []
        if self.remote is not None:
            if events := self.remote.connector.poll():
                outputs += self.remote.apply(events, self.requests, self._emit)
            for request in self.remote.start_pending():  # NOTE: loads that waited for room; these were refused
                request.status = RequestStatus.WAITING
                self.scheduler.add(request)
        polled = time.perf_counter() - t0 if self.step_trace is not None else 0.0  # NOTE: only the trace reads it
        out = self.scheduler.schedule()
        if self.remote is not None and len(out):
            self.executor.layer_hook = self.remote.connector.layer_hook(out)
        shape = self.work.shape(out) if len(out) else None
        waits = shape is None and self.stepper.has_inflight
        outputs += self.stepper.run(out, self._emit, t0)
        if shape is not None and shape[0]:  # NOTE: routers predict a TTFT from the measured token rate (heartbeats)
            took = time.perf_counter() - t0
            self.work.record(shape, t0, took, more=bool(self.requests))
            if self.step_trace is not None:
                self.step_trace.record(t0, took, polled, shape)
        elif waits:
            self.work.add_wait(time.perf_counter() - t0)
        if profile is not None:
            profile.end(time.perf_counter() - t0, computed=bool(shape is not None and shape[0]))
        return outputs

    def _emit(self, request: Request, token: int, pending: bool = False,
              logprob: TokenLogprob | None = None) -> RequestOutput:
        """Append a sampled token (or fill in its placeholder) with its logprob, apply the stop rules; returns its
        output."""
        if pending:
            request.resolve_token(token)
        else:
            request.append_token(token)
        status = request.check_stop()
        detok = self.detok[request.request_id]
        matched = detok.add(token) if not (status and request.stop_reason == token) else None
        if matched is not None:
            status, request.stop_reason = RequestStatus.FINISHED_STOPPED, matched
        logprobs = [logprob] if logprob is not None else None
        if status is None:
            return self._output(request, [token], logprobs)
        if matched is None:
            detok.flush()
        self.scheduler.finish(request, status, free_blocks=self.remote is None)
        output = self._finish_output(request, [token], logprobs)
        if self.remote is not None:
            output.kv_handoff = self.remote.finish(request)
        return output

    def _output(self, request: Request, new: list[int],
                logprobs: list[TokenLogprob | None] | None = None) -> RequestOutput:
        if logprobs is None and request.sampling_params.logprobs is not None:
            logprobs = [None] * len(new)  # asked, not computed here (a token sampled elsewhere, or none new)
        return RequestOutput(request.request_id, request.prompt_token_ids, request.output_token_ids, new,
                             text=self.detok[request.request_id].text, finished=request.finished,
                             finish_reason=request.status.value if request.finished else None,
                             stop_reason=request.stop_reason, num_cached_tokens=request.num_cached_tokens,
                             new_logprobs=logprobs, kv_load_failed=request.kv_load_failed)

    def _finish_output(self, request: Request, new: list[int] | None = None,
                       logprobs: list[TokenLogprob | None] | None = None) -> RequestOutput:
        output = self._output(request, new or [], logprobs)
        n, prompt, generated = self.finished_totals
        self.finished_totals = (n + 1, prompt + len(request.prompt_token_ids), generated + len(output.token_ids))
        del self.requests[request.request_id], self.detok[request.request_id]
        return output

    # ---- what the workers read -----------------------------------------------------------------------------
    def take_kv_events(self) -> list[KVEvent]:
        """KV events since the last call: blocks stored into / removed from the prefix cache, by hash."""
        return self.kv.take_events()

    def cached_block_hashes(self) -> tuple[int, ...]:
        """Every block hash the prefix cache holds now (to republish the index in full)."""
        return tuple(self.kv.pool.cached)

    def load(self) -> EngineLoad:
        sched = self.scheduler
        queued = sum(r.num_tokens - r.num_computed_tokens for r in sched.waiting)
        return EngineLoad(len(sched.waiting), len(sched.running), self.kv.usage, queued)

    def counters(self) -> EngineCounters:
        """O(1), unlike stats(): what a heartbeat publishes."""
        kv, pool, m = self.kv, self.kv.pool, self.metrics
        return EngineCounters(pool.num_blocks - pool.num_free_blocks, pool.num_blocks, kv.prefix_queries,
                              kv.prefix_hits, self.scheduler.num_preemptions, m.steps, m.total_s,
                              m.counters.get("kv_load_fallbacks", 0), *self.finished_totals,
                              kv_loads_queued=m.counters.get("kv_loads_queued", 0),
                              kv_loads_waiting=len(self.remote.pending) if self.remote else 0, work=self.work.totals(),
                              kv_lost_before_request=m.counters.get("kv_lost_before_request", 0))

    def stats(self) -> EngineStats:
        sched, kv = self.scheduler, self.kv
        return EngineStats(len(sched.waiting), len(sched.running), kv.stats(), kv.usage, kv.prefix_queries,
                           kv.prefix_hits, sched.num_preemptions, len(self.remote.held) if self.remote else 0)

    @property
    def kv_ranks(self) -> Any:
        """The KV connector's worker parts (engine.kv_connector.KVRanks); ValueError without a connector."""
        if self._kv_ranks is None:
            raise ValueError("this engine was built without a KV connector")
        return self._kv_ranks

    def replace_kv_connector(self, spec: KVConnectorSpec) -> None:
        """Swap the scheduler side of the KV connector for `spec`'s (e.g. a role switch: the producer for the
        consumer), over the same rank parts: no rank process, KV cache tensor or weight is touched. Requires an
        idle engine: no request in flight, none loading, no held or quarantined block (ValueError otherwise).
        The old side's counters carry over, so totals stay monotonic."""
        remote = self.remote
        if remote is None or self._kv_ranks is None:
            raise ValueError("this engine was built without a KV connector: there is none to replace")
        busy = {"requests in flight": len(self.requests) + len(self._outputs), "held KV": len(remote.held),
                "quarantined KV": len(remote.quarantined), "connector work": int(remote.connector.has_work())}
        if any(busy.values()):
            raise ValueError("the KV connector can only be replaced on an idle engine: " +
                             ", ".join(f"{k} {v}" for k, v in busy.items() if v))
        old = remote.connector
        new = spec.make_connector(self._kv_ranks, self._kv_ranks.descriptors)
        # NOTE: the old side's close() must leave the rank parts running (engine/kv_connector.py); they are
        # shared with the new side and stop with the executor.
        old.close()
        new.counters.update(old.counters)
        remote.connector = new
        self.metrics.count("kv_connector_replacements")

    def shutdown(self) -> None:
        if self.step_trace is not None:
            self.step_trace.close()
        if self.step_profile is not None:
            self.step_profile.close()
        if self.remote is not None:
            self.remote.connector.close()
        self.executor.shutdown()
