"""What the router does when an instance fails under a request, so that the client sees nothing of it:

  - Before the first token: a prefill call that fails (the instance died, or raised) or that does not answer
    within `server.prefill_timeout_s` goes to another prefill instance, else the decode instance prefills the
    prompt itself. A refusal of the input (ValueError) is the client's and is not retried.
  - Mid-stream: when the decode instance is lost, the stream moves to another decode instance, which computes
    prompt + the tokens generated so far and continues (LLMEngine.add_request(resumed=...)): no token repeated
    or missing, max_tokens and stop rules counted across the move, and greedy output identical to an
    undisturbed run (seeded sampling continues, but from a fresh generator). At most `server.max_migrations`.

Every failure trips the instance's circuit breaker (router/health.py), is logged, and counted in
`RouterService.counters` (prefill_retries, local_prefill_fallbacks, migrations).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import ray

from engine.logprobs import TokenLogprob
from engine.sampling_params import SamplingParams
from instance.messages import PrefillDone, StreamDelta
from kv_transfer.handle import KVHandle, StreamedKV
from router.placement import NoInstanceError, Placement

if TYPE_CHECKING:
    from router.service import RouterService

log = logging.getLogger(__name__)

# The instance is gone (its process died, or Ray cannot reach it): not the request's fault.
LOST = (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError)


class StreamLostError(RuntimeError):
    """More decode instances were lost under one stream than `server.max_migrations` allows (UNAVAILABLE)."""
# Stream items a decode actor may run ahead of this router per request. NOTE: beyond it the actor's generator
# waits, its outputs queue up, and it sends them merged (decode_worker/stream.py): a router that falls behind
# then receives fewer, larger items instead of an ever longer backlog of one-token items.
STREAM_AHEAD_ITEMS = 8


def failure(svc: RouterService, iid: str, dead: bool, why: str) -> None:
    info = svc.known.get(iid)
    svc.health.failed(iid, info.pid if info else 0, dead, why)


def forget(svc: RouterService, iid: str, rid: str) -> None:
    """Best effort, never awaited: free whatever the request holds on an instance we stopped waiting for (a
    stalled one answers when it resumes; a dead one's blocks went with it)."""
    try:
        svc.actor(iid).abort.remote(rid)
    except Exception as e:
        log.debug("abort of %s on %s not sent: %s", rid, iid, e)


async def prefill(svc: RouterService, rid: str, tokens: list[int], params: SamplingParams,
                  placement: Placement) -> tuple[KVHandle | None, Placement, bool, TokenLogprob | None]:
    """Run the remote prefill, retrying elsewhere. Returns (KV handle or None for a local prefill, the
    placement as it ends up, whether the request was aborted on the prefill instance, the first token's
    logprob when the request asked for logprobs and a prefill instance sampled it)."""
    tried: set[str] = set()
    while placement.prefill_instance is not None:
        iid = placement.prefill_instance
        try:
            done: PrefillDone = await asyncio.wait_for(svc.actor(iid).prefill.remote(rid, tokens, params),
                                                       svc.prefill_timeout_s)
        except ray.exceptions.RayTaskError as e:
            if isinstance(getattr(e, "cause", None), ValueError):
                raise  # the input: INVALID_ARGUMENT, on any instance
            why, dead = f"prefill raised {getattr(e, 'cause', None) or e!r}", False
        except LOST as e:
            why, dead = f"lost ({type(e).__name__})", True
        except TimeoutError:
            why, dead = f"no answer within {svc.prefill_timeout_s:g} s (server.prefill_timeout_s)", False
            forget(svc, iid, rid)
        else:
            svc.health.succeeded(iid)
            svc.prefill_finished(rid)
            return done.kv_handle, placement, done.aborted, done.first_logprob
        failure(svc, iid, dead, why)
        tried.add(iid)
        svc.counters["prefill_retries"] += 1
        try:
            placement = await asyncio.to_thread(svc.place, rid, tokens, placement.decode_instance, frozenset(tried))
        except NoInstanceError:
            # NOTE: the decode instance placed with it is unusable too (a lost node takes both): nothing has
            # decoded yet, so choose the decode instance again as well
            tried.add(placement.decode_instance)
            svc.counters["decode_moves_before_prefill"] += 1
            log.warning("request %s: decode instance %s is unusable too; placing the request again", rid,
                        placement.decode_instance)
            placement = await asyncio.to_thread(svc.place, rid, tokens, None, frozenset(tried))
        svc.counters["local_prefill_fallbacks" if placement.prefill_instance is None else "prefill_moves"] += 1
        log.warning("request %s: prefill on %s failed (%s); retrying on %s", rid, iid, why,
                    placement.prefill_instance or f"{placement.decode_instance} (local prefill)")
    return None, placement, False, None


async def stream(svc: RouterService, rid: str, tokens: list[int], params: SamplingParams, placement: Placement,
                 kv_handle: KVHandle | StreamedKV | None) -> AsyncIterator[tuple[StreamDelta, Placement, int]]:
    """The decode stream's items, moved to another decode instance if this one is lost. Yields (item, the
    placement it came from, moves so far)."""
    generated: list[int] = []
    text_sent = 0
    lost: set[str] = set()
    while True:
        iid = placement.decode_instance
        try:
            items = svc.actor(iid).generate.options(
                num_returns="streaming", _generator_backpressure_num_objects=STREAM_AHEAD_ITEMS).remote(
                rid, tokens, params, kv_handle, list(generated), text_sent)  # NOTE: a copy: it grows below
            first = True
            async for ref in items:
                delta: StreamDelta = await ref
                if first:
                    svc.health.succeeded(iid)
                    first = False
                generated += delta.token_ids
                text_sent += len(delta.text)
                yield delta, placement, len(lost)
                if delta.finished:
                    return
            return
        except LOST as e:
            why = f"lost ({type(e).__name__})"
        failure(svc, iid, True, why)
        lost.add(iid)
        if len(lost) > svc.max_migrations:
            raise StreamLostError(f"request {rid}: decode instances {sorted(lost)} were lost "
                                  f"(server.max_migrations {svc.max_migrations})")
        if kv_handle is not None and placement.prefill_instance:
            forget(svc, placement.prefill_instance, rid)  # its held KV will not be read now
        kv_handle = None
        moved = await asyncio.to_thread(svc.place, rid, tokens + generated, None, frozenset(lost), True)
        placement = dataclasses.replace(moved, reason=f"{moved.reason}; moved from {iid} ({why}) after "
                                                         f"{len(generated)} tokens")
        svc.counters["migrations"] += 1
        log.warning("request %s: decode instance %s %s after %d tokens; continuing on %s", rid, iid, why,
                    len(generated), placement.decode_instance)
