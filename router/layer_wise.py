"""Layer-wise KV streaming from the router's side: start the decode stream together with the prefill, so the
decode instance reads each layer group of the prompt's KV while the prefill instance computes the next ones
(kv_transfer/stream.py), and the hand-off (the prefill call's return, the decode call, the pull) no longer
follows the whole prefill.

    router ─prefill(rid, prompt, params, reader=decode's KVReader)──► prefill instance ─┐ StreamBlocks,
    router ─generate(rid, prompt, params, StreamedKV(prefill's agents))─► decode instance ◄┘ StreamProgress

Both instances' KV endpoints (agents, reader identity) are fetched once per instance process and cached. When
they cannot be had, or the request asks for logprobs (the first token's comes back with the prefill call), the
router prefills first and hands off after (router/recovery.py), counted as `layer_wise_skipped`. When the
prefill call fails, the decode instance is told to compute the prompt itself (`kv_source_lost`), counted as
`layer_wise_prefill_failures`; the failure trips the prefill instance's breaker like any other.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import ray

from engine.sampling_params import SamplingParams
from instance.messages import PrefillDone
from kv_transfer.handle import KVEndpoint, StreamedKV
from router import recovery
from router.placement import Placement

if TYPE_CHECKING:
    from router.service import RouterService

log = logging.getLogger(__name__)

ENDPOINT_TIMEOUT_S = 5.0


async def endpoint(svc: RouterService, iid: str) -> KVEndpoint | None:
    """The instance's KV endpoint, cached per instance process (a restarted instance has new agents)."""
    info = svc.known.get(iid)
    key = (iid, info.pid if info else 0)
    ep = svc.kv_endpoints.get(key)
    if ep is None:
        try:
            ep = await asyncio.wait_for(svc.actor(iid).kv_endpoint.remote(), ENDPOINT_TIMEOUT_S)
        except Exception as e:  # NOTE: not fatal: this request is prefilled first and handed off after
            log.warning("no KV endpoint from %s (%s: %s): prefill, then hand off", iid, type(e).__name__, e)
            return None
        svc.kv_endpoints[key] = ep
    return ep


async def start(svc: RouterService, rid: str, tokens: list[int], params: SamplingParams,
                placement: Placement) -> StreamedKV | None:
    """Send the prefill call with the decode instance as its reader; returns the decode side's KV source, or
    None when this request goes the sequential way."""
    p_iid, d_iid = placement.prefill_instance, placement.decode_instance
    assert p_iid is not None
    holder, reader = await asyncio.gather(endpoint(svc, p_iid), endpoint(svc, d_iid))
    if holder is None or reader is None or params.logprobs is not None:
        svc.counters["layer_wise_skipped"] += 1
        return None
    call = asyncio.wait_for(svc.actor(p_iid).prefill.remote(rid, tokens, params, reader.reader),
                            svc.prefill_timeout_s)
    task = asyncio.ensure_future(call)
    svc.prefilling[rid] = task  # NOTE: a reference, or the task could be collected mid-flight
    task.add_done_callback(lambda t: _prefill_done(svc, rid, p_iid, d_iid, t))
    svc.counters["layer_wise"] += 1
    return StreamedKV(holder.engine_id, rid, len(tokens), holder.agents)


def _prefill_done(svc: RouterService, rid: str, p_iid: str, d_iid: str, task: asyncio.Future[PrefillDone]) -> None:
    svc.prefilling.pop(rid, None)
    svc.prefill_finished(rid)
    if task.cancelled():
        return
    e = task.exception()
    if e is None:
        svc.health.succeeded(p_iid)
        done = task.result()
        if done.kv_handle is not None:  # NOTE: backs up the holder's own messages, should one lag or be lost
            try:
                svc.actor(d_iid).kv_source_ready.remote(rid, done.kv_handle)
            except Exception as err:
                log.warning("request %s: could not pass its hand-off to %s: %s", rid, d_iid, err)
        return
    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(getattr(e, "cause", None), ValueError):
        why, dead = f"refused the input ({e.cause})", False  # NOTE: the decode instance refuses it too
    elif isinstance(e, recovery.LOST):
        why, dead = f"lost ({type(e).__name__})", True
    elif isinstance(e, TimeoutError):
        why, dead = f"no answer within {svc.prefill_timeout_s:g} s (server.prefill_timeout_s)", False
        recovery.forget(svc, p_iid, rid)
    else:
        why, dead = f"prefill raised {getattr(e, 'cause', None) or e!r}", False
    recovery.failure(svc, p_iid, dead, why)
    svc.kv_endpoints = {k: v for k, v in svc.kv_endpoints.items() if k[0] != p_iid}
    svc.counters["layer_wise_prefill_failures"] += 1
    svc.counters["local_prefill_fallbacks"] += 1
    log.warning("request %s: prefill on %s failed (%s); retrying on %s (local prefill)", rid, p_iid, why, d_iid)
    try:
        svc.actor(d_iid).kv_source_lost.remote(rid)
    except Exception as err:
        log.warning("request %s: could not tell %s its KV source is lost: %s", rid, d_iid, err)
