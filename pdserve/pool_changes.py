"""Changing the pools of a running `pdserve serve` (pdserve/cluster.py owns them): add an instance, remove one
(drained first), switch one's role in place, and scale a pool by adding or removing. Runs on the admin
executor's thread, one change at a time (pdserve/admin_executor.py); every step is logged and counted.

Which instances: a new one is `{role}-{k}` with the lowest k no instance uses; a pool shrinks by its
highest-numbered members (by k, then by name), so the same command always removes the same instances. A
switched instance keeps its id (its actor's name): `decode-1` may serve as prefill. Decode keeps >= 1 member
(the decode pool serves every stream); prefill may go to 0 (every prompt is then prefilled locally).
"""

from __future__ import annotations

import logging
import re
import time
from collections import Counter
from typing import Any

from pdserve.cluster import Cluster

log = logging.getLogger(__name__)

READY_TIMEOUT_S = 120.0  # a new instance must load its model and register within this long
CALL_MARGIN_S = 30.0  # on top of a drain's own bound, for a call into an instance


class AdminError(Exception):
    """A refused or failed admin command; `code` is the gRPC status name the router answers with."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def instance_index(iid: str) -> int:
    m = re.search(r"-(\d+)$", iid)
    return int(m.group(1)) if m else -1


class PoolChanges:
    def __init__(self, cluster: Cluster, grace_s: float, drain_timeout_s: float) -> None:
        self.cluster, self.grace_s, self.drain_timeout_s = cluster, grace_s, drain_timeout_s
        self.counters: Counter[str] = Counter()  # instances_added, instances_removed, role_switches, ...

    def pools(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {"prefill": [], "decode": []}
        for iid in sorted(self.cluster.roles, key=lambda i: (instance_index(i), i)):
            out[self.cluster.roles[iid]].append(iid)
        return out

    def _role_of(self, iid: str) -> str:
        role = self.cluster.roles.get(iid)
        if role is None:
            raise AdminError("INVALID_ARGUMENT", f"no instance {iid!r} (instances: "
                                                 f"{', '.join(sorted(self.cluster.roles)) or 'none'})")
        return role

    def _keep_a_decode(self, iid: str, what: str) -> None:
        if self.pools()["decode"] == [iid]:
            raise AdminError("FAILED_PRECONDITION", f"{iid} is the last decode instance: {what} would leave "
                                                    "none to serve streams (decode replicas must stay >= 1)")

    # ---- one instance --------------------------------------------------------------------------------------
    def add(self, role: str) -> str:
        import ray

        used = {instance_index(i) for i in self.cluster.actors if i.startswith(f"{role}-")}
        iid = f"{role}-{min(k for k in range(len(used) + 1) if k not in used)}"
        t0 = time.monotonic()
        actor = self.cluster._create(iid, role)
        try:
            ray.get(actor.ready.remote(), timeout=READY_TIMEOUT_S)
        except Exception as e:
            self.counters["add_failures"] += 1
            log.error("instance %s did not become ready (%s); removing it", iid, e)
            self._kill(iid)
            raise AdminError("INTERNAL", f"new instance {iid} did not start: {e}") from None
        self.counters["instances_added"] += 1
        log.info("admin: added %s (%s) in %.1f s (instances added so far: %d)", iid, role, time.monotonic() - t0,
                 self.counters["instances_added"])
        return iid

    def remove(self, iid: str) -> str:
        """Drain `iid`, stop it and forget it. Returns what happened, in one line."""
        import ray

        role = self._role_of(iid)
        if role == "decode":
            self._keep_a_decode(iid, "removing it")
        actor = self.cluster.actors[iid]
        report = self._drain(iid, actor)
        try:
            ray.get(actor.shutdown.remote(0.0), timeout=CALL_MARGIN_S)
        except Exception as e:
            log.warning("instance %s: shutdown failed (%s); killing it", iid, e)
        self._kill(iid)
        self.counters["instances_removed"] += 1
        log.info("admin: removed %s (%s) (instances removed so far: %d)", iid, role,
                 self.counters["instances_removed"])
        return f"removed {iid} ({role}): drained in {report.waited_s:.1f} s" + \
            (f" (timed out: in flight {report.busy}, held KV {report.held})" if report.timed_out else "")

    def set_role(self, iid: str, role: str) -> str:
        import ray

        old = self._role_of(iid)
        if old == role:
            return f"{iid} already serves as {role}"
        if old == "decode":
            self._keep_a_decode(iid, "switching it to prefill")
        actor = self.cluster.actors[iid]
        report = self._drain(iid, actor)
        try:
            ray.get(actor.switch_role.remote(role), timeout=CALL_MARGIN_S)
        except Exception as e:
            self.counters["role_switch_failures"] += 1
            log.error("instance %s: role switch %s -> %s failed (%s); it serves as %s again", iid, old, role, e, old)
            raise AdminError("FAILED_PRECONDITION", f"{iid} could not switch to {role} ({e}); it serves as "
                                                    f"{old} again: try again") from None
        self.cluster.roles[iid] = role
        self.counters["role_switches"] += 1
        log.info("admin: %s switched %s -> %s (role switches so far: %d)", iid, old, role,
                 self.counters["role_switches"])
        return f"{iid}: {old} -> {role} (drained in {report.waited_s:.1f} s; process, weights and KV pool kept)"

    def _drain(self, iid: str, actor: Any) -> Any:
        import ray

        self.counters["drains"] += 1
        report = ray.get(actor.drain.remote(self.grace_s, self.drain_timeout_s),
                         timeout=self.grace_s + self.drain_timeout_s + CALL_MARGIN_S)
        if report.timed_out:
            self.counters["drain_timeouts"] += 1
        return report

    def _kill(self, iid: str) -> None:
        import ray

        actor = self.cluster.actors.pop(iid)
        self.cluster.roles.pop(iid, None)
        self.cluster.resources.pop(iid, None)
        ray.kill(actor, no_restart=True)  # NOTE: the actors restart forever otherwise (max_restarts=-1)

    # ---- a pool --------------------------------------------------------------------------------------------
    def scale(self, role: str, replicas: int) -> list[str]:
        if replicas < 0 or (role == "decode" and replicas < 1):
            raise AdminError("FAILED_PRECONDITION" if replicas >= 0 else "INVALID_ARGUMENT",
                             f"{role} replicas: {replicas} must be >= {1 if role == 'decode' else 0}"
                             + (" (the decode pool serves every stream)" if role == "decode" else ""))
        changes = []
        while len(members := self.pools()[role]) != replicas:
            if len(members) < replicas:
                changes.append(f"added {self.add(role)} ({role})")
            else:
                changes.append(self.remove(members[-1]))
            self.counters["scale_steps"] += 1
        return changes or [f"{role} already has {replicas} instance(s)"]
