"""Introduce every prefill instance to every decode instance before a request needs them to know each other.

A disaggregated request between two instances that have never exchanged KV used to pay for their first contact:
the router's fetch of both KV endpoints, each side loading the other's NIXL metadata, the first UCX connections
(the notifier's to the reader, the reader's to the holder). On a fresh 1P+1D cluster that put the first request
at 2.6-3.5x the TTFT of the later ones (docs/performance.md). The router now does it when it sees a pair:

    every PERIOD_S, from the cluster view:  new (prefill, decode) pairs (by instance, pid and role)
        fetch both KV endpoints (router/layer_wise.py's cache)
        decode.meet([prefill endpoints])   ─► its ranks map or connect to the holders; rank 0 learns where
                                              releases go (KVConsumer.meet)
        prefill.meet([decode endpoints])   ─► its stream notifier connects to the readers; its release thread
                                              learns them (KVProducer.meet)

`pdserve serve` and `pdserve router` run one round before they announce themselves ready, so a fresh cluster's
first request finds its pair introduced. An instance that re-registers (a restart: a new pid) or switches role is a
new pair member and is introduced again; several routers introducing the same pair cost one idempotent call each.
Nothing here is needed for correctness: a pair not introduced (an endpoint or a call failed: logged, counted as
`failures`, retried after RETRY_S) meets on its first request, as before.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from kv_transfer.handle import KVEndpoint
from metastore.store import InstanceInfo
from router import layer_wise

if TYPE_CHECKING:
    from router.service import RouterService

log = logging.getLogger(__name__)

PERIOD_S = 1.0  # how often the cluster view is checked for new pairs
RETRY_S = 5.0  # after a failed introduction, how long an instance waits for the next try
MEET_TIMEOUT_S = 10.0  # one instance's meet call
START_TIMEOUT_S = 15.0  # the round before the router is ready

Member = tuple[str, int]  # (instance id, pid)
Pair = tuple[Member, Member]  # (prefill, decode)


class Introductions:
    def __init__(self, svc: RouterService, period_s: float = PERIOD_S) -> None:
        self.svc, self.period_s = svc, period_s
        self.met: set[Pair] = set()
        self.retry_at: dict[Member, float] = {}  # members whose last introduction failed -> next try (monotonic)
        self.counters: Counter[str] = Counter({"pairs": 0, "failures": 0})
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """One round now (the pairs already registered; at most START_TIMEOUT_S), then one every period_s until
        `stop`."""
        try:
            await asyncio.wait_for(self.once(), START_TIMEOUT_S)
        except Exception as e:  # NOTE: the periodic rounds try again
            self.counters["failures"] += 1
            log.warning("introducing the instances before serving failed (%s: %s); trying again in the background",
                        type(e).__name__, e)
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.period_s)
            try:
                await self.once()
            except Exception:  # NOTE: never end the loop: the next round tries again
                self.counters["failures"] += 1
                log.exception("introducing instances failed")

    async def once(self) -> int:
        """Introduce the pairs of live instances not introduced yet; returns how many were."""
        instances = self.svc.view.state.instances
        prefills = [i for i in instances if i.role == "prefill"]
        decodes = [i for i in instances if i.role == "decode"]
        live = {(_member(p), _member(d)) for p in prefills for d in decodes}
        self.met &= live  # NOTE: a member that left, restarted or switched role is a new pair member later
        now = time.monotonic()
        self.retry_at = {m: t for m, t in self.retry_at.items() if t > now}
        due = [(p, d) for p in prefills for d in decodes if (_member(p), _member(d)) not in self.met
               and self.retry_at.get(_member(p), 0.0) <= now and self.retry_at.get(_member(d), 0.0) <= now]
        if not due:
            return 0
        members = {i.instance_id: i for pair in due for i in pair}
        endpoints = dict(zip(members, await asyncio.gather(*[layer_wise.endpoint(self.svc, iid) for iid in members]),
                             strict=True))
        peers: dict[str, list[KVEndpoint]] = {}  # instance -> the endpoints it meets
        pairs: list[Pair] = []
        for p, d in due:
            p_ep, d_ep = endpoints[p.instance_id], endpoints[d.instance_id]
            if p_ep is None or d_ep is None:  # NOTE: layer_wise.endpoint logged why
                self._failed([i for i, ep in ((p, p_ep), (d, d_ep)) if ep is None])
                continue
            peers.setdefault(d.instance_id, []).append(p_ep)
            peers.setdefault(p.instance_id, []).append(d_ep)
            pairs.append((_member(p), _member(d)))
        calls = list(peers.items())
        results = await asyncio.gather(*[self._meet(iid, eps) for iid, eps in calls])
        ok = {iid for (iid, _), good in zip(calls, results, strict=True) if good}
        done = [pair for pair in pairs if pair[0][0] in ok and pair[1][0] in ok]
        self._failed([members[iid] for iid, _ in calls if iid not in ok])
        self.met.update(done)
        self.counters["pairs"] += len(done)
        if done:
            log.info("introduced %d prefill/decode pair(s) ahead of their first request: %s", len(done),
                     ", ".join(f"{p[0]}->{d[0]}" for p, d in done))
        return len(done)

    async def _meet(self, iid: str, peers: list[KVEndpoint]) -> bool:
        try:
            await asyncio.wait_for(self.svc.actor(iid).meet.remote(peers), MEET_TIMEOUT_S)
            return True
        except Exception as e:  # NOTE: not fatal: the pair meets on its first request, as before
            log.warning("could not introduce %s to %d instance(s) (%s: %s); retrying in %g s", iid, len(peers),
                        type(e).__name__, e, RETRY_S)
            return False

    def _failed(self, instances: list[InstanceInfo]) -> None:
        self.counters["failures"] += len(instances)
        for i in instances:
            self.retry_at[_member(i)] = time.monotonic() + RETRY_S


def _member(i: InstanceInfo) -> Member:
    return i.instance_id, i.pid
