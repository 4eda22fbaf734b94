"""The router's gRPC service: tokenize, place, run (prefill remotely or locally), stream.

    router --prefill(request_id, prompt, SamplingParams)--> PrefillActor --> PrefillDone (instance/messages.py)
    router --generate(request_id, prompt, SamplingParams, KVHandle | None)--> DecodeActor --> StreamDelta, ...

The request flow is `generate` (typed in and out: router/generation.py); the gRPC `Generate` and the OpenAI HTTP
front (router/openai_api.py) are thin adapters over it. Error mapping: INVALID_ARGUMENT for bad parameters or a
prompt too long; UNAUTHENTICATED without a valid API key (auth on: router/access.py); RESOURCE_EXHAUSTED when a
decode instance has no room or the key's rate limit is used up (with `retry-after` trailing metadata); UNAVAILABLE
when no healthy instance is registered or an instance died; DEADLINE_EXCEEDED when the client's deadline passes
(the request is aborted on the workers); a cancelled call aborts the request on the workers too, so its blocks
are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import grpc
import ray
from tokenizers import Tokenizer

import api.v1.pdserve_pb2 as pb
import api.v1.pdserve_pb2_grpc as pb_grpc
from engine.block_hash import hash_blocks
from engine.model_info import ModelInfo
from engine.priority import Priority
from engine.sampling_params import SamplingParams
from instance.messages import PrefillDone, StreamDelta
from kv_transfer.handle import KVEndpoint, KVHandle, StreamedKV
from metastore import InstanceInfo
from router import layer_wise, recovery
from router.access import NO_KEY, AccessControl
from router.admission import AdmissionConfig, Prediction, TTFTPredictor
from router.admission_queue import AdmissionQueue, AdmissionRefused
from router.cluster_view import ClusterState, ClusterView
from router.generation import GenerateInput, Output, RequestError, delta_logprobs, final_output, routing_of
from router.health import InstanceHealth
from router.instance_metrics import InstanceCollector, loads_response
from router.introductions import Introductions
from router.metrics import RequestTimer, RouterMetrics
from router.placed_load import PlacedLoad
from router.placement import NoInstanceError, Placement, place
from router.request import prompt_ids, worker_error_status
from router.shared_prefixes import SharedPrefixes
from router.slo_tally import SloTally
from router.wire import Undecodable, generate_input, refuse_undecodable, to_response

log = logging.getLogger(__name__)

ABORT_TIMEOUT_S = 5.0
# Token-id prompts up to this long are validated and hashed on the event loop (~0.1 ms for 2,048 tokens); longer
# ones, and every text prompt, on a worker thread. NOTE: a hop to a worker thread and back waits for the GIL,
# which another busy thread holds for up to the 5 ms switch interval: inline is faster where it is short.
INLINE_PROMPT_TOKENS = 4096
ABORTED = StreamDelta(token_ids=[], text="", finished=True, finish_reason="abort")  # the final item of an abort


class RouterService(pb_grpc.PDServeServicer):
    def __init__(self, info: ModelInfo, tokenizer: Tokenizer | None, view: ClusterView, ray_namespace: str,
                 max_inflight: int = 256, max_prompt_bytes: int = 1 << 20, prefill_timeout_s: float = 30.0,
                 max_migrations: int = 2, health: InstanceHealth | None = None,
                 access: AccessControl | None = None, admission: AdmissionConfig | None = None,
                 admission_queue: AdmissionQueue | None = None, layer_wise_kv: bool = True) -> None:
        self.info = info
        self.tokenizer = tokenizer  # None: the model has no tokenizer.json (token-id prompts only)
        self.view = view  # NOTE: placement reads only this memory; its thread follows Redis
        self.ray_namespace = ray_namespace
        self.inflight: dict[str, Placement | None] = {}  # None: admitted, not yet placed
        # the ids clients know their requests in flight by (GenerateRequest.request_id, or one the router picked)
        # and the ids the router and the instances know them by: one of its own per request (_generate)
        self.by_client_id: dict[str, str] = {}
        self.client_id_of: dict[str, str] = {}
        # request id -> (instance, prompt tokens) until its prefill finishes: placement's queue estimate
        self.load = PlacedLoad()  # what this router placed and has not seen finish, per instance
        self.shared_prefixes = SharedPrefixes()
        self._known_state: ClusterState | None = None
        self._place_lock = threading.Lock()  # placement decisions and their records, one at a time
        # the max_inflight slots, with the queue (by class, then age) in front of them: router/admission_queue.py
        self.slots = admission_queue or AdmissionQueue(max_inflight)
        self.max_prompt_bytes = max_prompt_bytes
        self.prefill_timeout_s, self.max_migrations = prefill_timeout_s, max_migrations
        # layer-wise KV streaming (router/layer_wise.py): instances' KV endpoints by (instance, pid), and the
        # prefill calls in flight alongside their decode streams
        self.layer_wise_kv = layer_wise_kv
        self.kv_endpoints: dict[tuple[str, int], KVEndpoint] = {}
        self.prefilling: dict[str, asyncio.Future[PrefillDone]] = {}
        self.health = health or InstanceHealth()
        self.known: dict[str, InstanceInfo] = {}  # the registry entries placement last saw (their pids)
        self.counters: Counter[str] = Counter()  # recovery: prefill_retries, migrations, ... (router/recovery.py)
        self.aborted_before_placement: set[str] = set()
        self._actors: dict[str, Any] = {}
        self.metrics = RouterMetrics(lambda: len(self.inflight), self._queued)  # its own registry
        # finished requests against the adaptive split's SLOs, when one runs in this process (pdserve/serve.py)
        self.slo_tally: SloTally | None = None
        self.admission = admission or AdmissionConfig()
        self.ttft = TTFTPredictor(self.admission)  # early rejection (router/admission.py)
        # admitted with a prediction: request -> (instance, class, prediction, when placed, prompt tokens to prefill)
        self.predicted: dict[str, tuple[str, Priority, Prediction, float, int]] = {}
        self.introductions = Introductions(self)  # started by the server once attached (pdserve/router_process.py)
        self.metrics.registry.register(InstanceCollector(view, self.health, {
            "recovery": self.counters, "breakers": self.health.counters, "cluster_view": view.counters,
            "introductions": self.introductions.counters}))
        self.access = access or AccessControl()  # API keys and per-key limits (router/access.py); default: open
        self.access.register(self.metrics.registry)

    def _queued(self) -> int:
        """Requests admitted whose first token is not out yet: not placed, or their prefill still pending."""
        with self._place_lock:
            return sum(p is None for p in self.inflight.values()) + len(self.load.prefill_pending)

    def close(self) -> None:
        """Stop following Redis (the view's thread, the API keys' thread) and introducing instances."""
        self.introductions.stop()
        self.view.close()
        self.access.close()

    # ---- helpers -------------------------------------------------------------------------------------------
    def actor(self, instance_id: str) -> Any:
        if instance_id not in self._actors:
            self._actors[instance_id] = ray.get_actor(instance_id, namespace=self.ray_namespace)
        return self._actors[instance_id]

    @staticmethod
    def hash_prompt_of(info: ModelInfo, tokens: list[int]) -> list[int]:
        """The prompt's block hashes (the engines' prefix-cache keys); a prompt shorter than a block gets one
        of its tokens padded, as its affinity key."""
        bs, salt = info.block_size, info.hash_salt
        return hash_blocks(tokens, bs, salt) or hash_blocks(tokens + [0] * bs, bs, salt)[:1]

    def hash_prompt(self, tokens: list[int]) -> list[int]:
        return self.hash_prompt_of(self.info, tokens)

    def place(self, rid: str, tokens: list[int], keep_decode: str | None = None,
              exclude: frozenset[str] = frozenset(), local_only: bool = False,
              hashes: list[int] | None = None) -> Placement:
        """Decide and record (in `inflight` and `load`) as one step under `_place_lock`: each decision
        must count the ones placed before it. Reads only memory (the cluster view): `hashes` are the prompt's
        (hash_prompt), computed here when not given. Re-placing after a failure (router/recovery.py):
        `keep_decode` keeps that decode instance, `exclude` leaves out instances already tried, `local_only`
        prefills on the decode instance."""
        t0 = time.perf_counter()
        if hashes is None:
            hashes = self.hash_prompt(tokens)
        state = self.view.state
        if state is not self._known_state:  # NOTE: for the breakers' pids after an instance left the registry
            self.known.update({i.instance_id: i for i in state.instances})
            self._known_state = state
            # NOTE: a name that left the registry may come back as a new actor (`pdserve scale`): look it up again
            self._actors = {i: a for i, a in self._actors.items() if i in {s.instance_id for s in state.instances}}
        usable = self.health.usable_of([i for i in state.instances if i.instance_id not in exclude])
        decodes = [i for i in usable if i.role == "decode" and keep_decode in (None, i.instance_id)]
        prefills = [] if local_only else [i for i in usable if i.role == "prefill"]
        full = hashes if len(tokens) >= self.info.block_size else []  # a short prompt's key is not a block
        overlaps = self.view.index.overlap(full)
        depth = max(overlaps.values(), default=0)
        policy, fanout = state.policy, state.policy.shared_prefix_fanout
        with self._place_lock:
            self.shared_prefixes.observe(full, depth, fanout)
            shared = self.shared_prefixes.shared_blocks(full, depth, fanout)
            key = hashes[shared] if shared < len(hashes) else hashes[0]
            placement = place(len(tokens), decodes, prefills, overlaps, state.loads, policy,
                              self.load.requests_on, key, self.load.pending_on, shared)
            if rid in self.inflight:  # else cancelled while this thread read the store: record nothing
                self.load.placed(rid, placement, self.inflight.get(rid))
                self.inflight[rid] = placement
                for iid in (placement.decode_instance, placement.prefill_instance):
                    if iid:
                        self.health.placed(iid)
        self.metrics.decision.observe(time.perf_counter() - t0)
        log.debug("request %s: decode on %s, prefill on %s, %d of %d tokens cached there: %s", rid,
                  placement.decode_instance, placement.prefill_instance or "it", placement.cached_tokens,
                  len(tokens), placement.reason)
        return placement

    def prefill_finished(self, rid: str) -> None:
        """The request's prompt is computed: it no longer counts in its instance's prefill queue."""
        with self._place_lock:
            self.load.prefill_finished(rid)

    async def _abort_everywhere(self, request_id: str, placement: Placement) -> None:
        targets = [placement.decode_instance] + ([placement.prefill_instance] if placement.prefill_instance else [])
        for iid in targets:
            try:  # NOTE: bounded: a stalled instance (SIGSTOP) would hold the call forever
                await asyncio.wait_for(self.actor(iid).abort.remote(request_id), ABORT_TIMEOUT_S)
            except Exception as e:  # the instance may be gone (its blocks went with it) or stalled
                log.warning("abort of %s on %s failed: %r", request_id, iid, e)

    # ---- the request flow both fronts share ------------------------------------------------------------------
    def refused(self, code: grpc.StatusCode) -> None:
        """Count a request a front refused before it reached `generate` (it did not parse)."""
        self.metrics.requests.labels(code.name).inc()

    async def generate(self, inp: GenerateInput) -> AsyncIterator[Output]:
        """_generate, timed: TTFT, inter-token latency and end-to-end, and the request's final status code.
        Raises RequestError; a consumer that stops iterating (client gone) aborts the request on the workers."""
        timer, status, generated = RequestTimer(self.metrics), "CANCELLED", 0
        try:
            # NOTE: aclosing: a consumer that stops (GeneratorExit here) closes _generate now, whose finally
            # releases the slot and aborts the request on the workers, rather than whenever it is collected
            async with contextlib.aclosing(self._generate(inp)) as items:
                async for out in items:
                    timer.sent(out.routing is not None and out.routing.disaggregated)
                    generated += len(out.token_ids)
                    yield out
            status = "OK"
            timer.finished()
            measured = timer.ttft_tpot(generated)
            if self.slo_tally is not None and measured is not None:
                self.slo_tally.record(*measured)
        except RequestError as e:
            status = e.code.name
            raise
        except BaseException as e:
            if not isinstance(e, asyncio.CancelledError | GeneratorExit):
                status = "UNKNOWN"  # NOTE: what gRPC answers for an exception a handler raises
            raise
        finally:  # NOTE: a cancelled call (client gone) keeps "CANCELLED"
            self.metrics.requests.labels(status).inc()
            self.access.charge(inp.api_key, generated)  # the key's token bucket (prompt: at admission)

    async def _generate(self, inp: GenerateInput) -> AsyncIterator[Output]:
        client_id = inp.request_id or uuid.uuid4().hex
        if client_id in self.by_client_id:
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request id {client_id!r} is already in flight")
        # NOTE: the instances know a request by an id of its own: a client may reuse an id once its request is
        # over, and what the instances still do for the earlier one (an abort, a late stream message) must not
        # reach the new one
        rid = f"{client_id}@{uuid.uuid4().hex[:12]}" if inp.request_id else client_id
        slo_s = self.admission.budget_ms(inp.priority) / 1e3 if self.admission.early_reject else None
        try:  # NOTE: no suspension when a slot is free, so a burst cannot all get in before one records it
            waited_s = await self.slots.acquire(inp.priority, slo_s)
        except AdmissionRefused as e:
            self._count_rejected(e.reason, inp)
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, e.message) from None
        if client_id in self.by_client_id:  # the same id came in while this one waited in the queue
            self.slots.release()
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, f"request id {client_id!r} is already in flight")
        self.inflight[rid] = None
        self.by_client_id[client_id], self.client_id_of[rid] = rid, client_id
        try:
            if isinstance(inp.prompt, list) and len(inp.prompt) <= INLINE_PROMPT_TOKENS:
                tokens, hashes = self._prepare(inp.prompt)  # NOTE: ~0.1 ms: a thread hop would cost more
            else:  # NOTE: off the event loop: tokenizing or hashing a long prompt would stall every stream
                tokens, hashes = await asyncio.to_thread(self._prepare, inp.prompt)
        except ValueError as e:
            self._release(rid)
            raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except BaseException:  # cancelled while tokenizing
            self._release(rid)
            raise
        try:  # NOTE: the key's per-minute limits, across router replicas (one Redis call, awaited)
            await self.access.admit(inp.api_key, len(tokens))
        except BaseException:
            self._release(rid)
            raise
        try:
            placement = self.place(rid, tokens, hashes=hashes)  # NOTE: from memory, ~0.1 ms: on the loop
        except NoInstanceError as e:
            self._release(rid)
            raise RequestError(grpc.StatusCode.UNAVAILABLE, str(e)) from None
        except BaseException:  # cancelled while placing: the placement thread records nothing after this
            self._release(rid)
            raise
        if self.admission.early_reject:
            self._admit_by_slo(rid, inp, placement, waited_s)
        if rid in self.aborted_before_placement:  # an Abort came while the request was being placed
            self.aborted_before_placement.discard(rid)
            self._release(rid)
            yield self._final(client_id, ABORTED, len(tokens), 0, placement)
            return
        finished = False
        try:
            async with asyncio.timeout(inp.timeout_s):
                params = dataclasses.replace(inp.params, priority=inp.priority)  # NOTE: to the engines
                async for out in self._run(rid, client_id, tokens, params, placement):
                    finished = out.finished
                    yield out
        except TimeoutError:
            await self._abort_everywhere(rid, self.inflight.get(rid) or placement)
            raise RequestError(grpc.StatusCode.DEADLINE_EXCEEDED,
                               "deadline exceeded; the request was aborted") from None
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            status = worker_error_status(cause)
            if status is not None:
                raise RequestError(*status) from None
            log.exception("request %s failed", rid)
            raise RequestError(grpc.StatusCode.INTERNAL, f"worker error: {cause or e}") from None
        except (*recovery.LOST, recovery.StreamLostError, NoInstanceError) as e:
            raise RequestError(grpc.StatusCode.UNAVAILABLE, f"instance unavailable: {e}") from None
        finally:
            # NOTE: where it runs now: a retried prefill or a moved stream re-placed it (recovery.py)
            latest = self.inflight.get(rid) or placement
            self._release(rid)
            if not finished:  # cancelled by the client, deadline, or error: free the blocks on the workers
                await asyncio.shield(self._abort_everywhere(rid, latest))

    def _count_rejected(self, reason: str, inp: GenerateInput) -> None:
        assert self.access.rejected is not None  # registered in __init__
        self.access.rejected.labels(reason, inp.api_key.name if inp.api_key else NO_KEY).inc()

    def _admit_by_slo(self, rid: str, inp: GenerateInput, placement: Placement, waited_s: float) -> None:
        """Refuse (RESOURCE_EXHAUSTED, its slot released) a placed request whose predicted time to first token,
        `waited_s` in the admission queue included, is over its class's SLO (router/admission.py). On the event
        loop: O(instances) dict reads."""
        priority = inp.priority
        target = placement.prefill_instance or placement.decode_instance
        self.ttft.observe(self.view.instance_stats)
        tokens = placement.effective_prefill_tokens
        prediction = self.ttft.predict(target, tokens, priority, 1000.0 * waited_s,
                                       decode_id=placement.decode_instance)
        if not prediction.measured:
            self.metrics.ttft_rate_defaults.inc()
        if prediction.misses:
            self._release(rid)
            self._count_rejected("slo", inp)
            raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED,
                               prediction.reason(priority, target, placement.decode_instance))
        self.ttft.admitted(target, priority, tokens)
        self.predicted[rid] = (target, priority, prediction, time.perf_counter(), tokens)

    def _first_token(self, rid: str) -> None:
        """The request's first token is out: its prefill no longer queues, and its TTFT calibrates the next
        predictions (when it was predicted)."""
        self.prefill_finished(rid)
        predicted = self.predicted.pop(rid, None)
        if predicted is not None:
            target, priority, prediction, start, tokens = predicted
            self.ttft.measured(target, priority, prediction, 1000.0 * (time.perf_counter() - start), tokens)

    async def _run(self, rid: str, client_id: str, tokens: list[int], params: SamplingParams,
                   placement: Placement) -> AsyncIterator[Output]:
        kv_source: KVHandle | StreamedKV | None = None
        if placement.prefill_instance is not None and self.layer_wise_kv:
            kv_source = await layer_wise.start(self, rid, tokens, params, placement)
        aborted, first_logprob = False, None
        if kv_source is None:
            kv_source, placement, aborted, first_logprob = await recovery.prefill(self, rid, tokens, params,
                                                                                  placement)
        if aborted:  # aborted on the prefill instance
            yield self._final(client_id, ABORTED, len(tokens), 0, placement)
            return
        prefilled = time.perf_counter() if isinstance(kv_source, KVHandle) else None  # the hand-off starts
        completion, first_at = 0, 0.0
        async for delta, where, moves in recovery.stream(self, rid, tokens, params, placement, kv_source):
            first = completion == 0
            if first:  # a local prefill: its first token is out
                first_at = time.perf_counter()
                self._first_token(rid)
                if prefilled is not None and not moves:
                    self.metrics.handoff.observe(time.perf_counter() - prefilled)
            logprobs = delta_logprobs(delta, first_logprob if first else None)
            completion += len(delta.token_ids)
            if delta.kv_load_failed and where.prefill_instance:  # NOTE: it ran as a local prefill in the end
                where = dataclasses.replace(where, prefill_instance=None, reason=f"{where.reason}; the KV pull "
                                            f"from {where.prefill_instance} failed: prefilled on the decode instance")
            if delta.finished:
                if self.admission.early_reject and completion > 1 and where.decode_instance:
                    tpot_ms = 1000.0 * (time.perf_counter() - first_at) / (completion - 1)
                    self.ttft.tpot_measured(where.decode_instance, params.priority, tpot_ms)
                self._count_finished(len(tokens), completion, delta.cached_tokens, where, moves)
                yield self._final(client_id, delta, len(tokens), completion, where, moves, logprobs)
                return
            # NOTE: the first item carries where it runs (the HTTP front's routing header goes out before the body)
            routing = routing_of(where, where.cached_tokens, 0, moves) if first else None
            yield Output(client_id, delta.token_ids, delta.text, routing=routing, logprobs=logprobs)

    def _count_finished(self, prompt: int, completion: int, cached: int, placement: Placement, moves: int) -> None:
        m = self.metrics
        m.prompt_tokens.inc(prompt)
        m.generation_tokens.inc(completion)
        m.cached_tokens.inc(cached)
        route = "migrated" if moves else "remote_prefill" if placement.disaggregated else "local_prefill"
        m.requests_by_route.labels(route).inc()

    def _prepare(self, prompt: str | list[int]) -> tuple[list[int], list[int]]:
        tokens = prompt_ids(prompt, self.tokenizer, self.info, self.max_prompt_bytes)
        return tokens, self.hash_prompt(tokens)

    def _release(self, rid: str) -> None:
        """The request is over (finished, failed, cancelled, refused): drop its slot and any pending prefill.
        NOTE: under the lock, so a placement thread still running for it sees it gone and records nothing."""
        with self._place_lock:
            held = rid in self.inflight
            self.load.finished(rid, self.inflight.pop(rid, None))
            client_id = self.client_id_of.pop(rid, None)
            if client_id is not None:
                del self.by_client_id[client_id]
        if held:
            self.slots.release()  # NOTE: to the first queued request by (class, age), if any
        predicted = self.predicted.pop(rid, None)
        if predicted is not None:  # admitted, but over before its first token
            target, priority, _, _, tokens = predicted
            self.ttft.abandoned(target, priority, tokens)

    _final = staticmethod(final_output)

    # ---- RPCs ----------------------------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        """The gRPC front of `generate`: its errors abort the call with their status."""
        try:
            key = self.access.authenticate_grpc(context)
        except RequestError as e:
            self.refused(e.code)
            await context.abort(e.code, e.message)
        if isinstance(request, Undecodable):
            self.refused(grpc.StatusCode.INVALID_ARGUMENT)
            await refuse_undecodable(request, context)
        try:
            inp = generate_input(request, context.time_remaining())
        except RequestError as e:
            self.refused(e.code)
            await context.abort(e.code, e.message)
        if key is not None:
            inp = dataclasses.replace(inp, api_key=key, priority=key.priority)
        try:
            async for out in self.generate(inp):
                yield to_response(out)
        except RequestError as e:
            if e.retry_after_header is not None:  # a refusal that may pass later: when (the rate limits)
                await context.abort(e.code, e.message, trailing_metadata=(("retry-after", e.retry_after_header),))
            await context.abort(e.code, e.message)

    async def Abort(self, request: pb.AbortRequest, context: grpc.aio.ServicerContext) -> pb.AbortResponse:
        try:
            self.access.authenticate_grpc(context)
        except RequestError as e:
            await context.abort(e.code, e.message)
        await refuse_undecodable(request, context)
        rid = self.by_client_id.get(request.request_id)
        if rid is not None:
            placement = self.inflight.get(rid)
            if placement is not None:
                await self._abort_everywhere(rid, placement)
            else:
                self.aborted_before_placement.add(rid)
        found = rid is not None
        return pb.AbortResponse(found=found)

    async def GetModelInfo(self, request: pb.GetModelInfoRequest,
                           context: grpc.aio.ServicerContext) -> pb.ModelInfo:
        await refuse_undecodable(request, context)
        info = self.info
        return pb.ModelInfo(model=info.model, vocab_size=info.vocab_size, max_model_len=info.max_model_len,
                            block_size=info.block_size, dtype=info.dtype, eos_token_ids=list(info.eos_token_ids))

    async def GetLoads(self, request: pb.GetLoadsRequest,
                       context: grpc.aio.ServicerContext) -> pb.GetLoadsResponse:
        await refuse_undecodable(request, context)
        return loads_response(self.view, self.health)

