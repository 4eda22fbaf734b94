"""The controller side of the Admin service, in the process that owns the pools (`pdserve serve`, with one router
or many): a thread that takes AdminCommands from Redis (metastore/admin.py), one at a time, runs each against the
pools (pdserve/pool_changes.py) or the policy, and replies with a typed AdminReply."""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections import Counter
from typing import Any

import redis

from metastore import MetadataStore
from metastore.admin import AdminChannel, AdminCommand, AdminReply
from pdserve.cluster import Cluster
from pdserve.config import ConfigError, ServingConfig, build_config
from pdserve.config_diff import diff
from pdserve.pool_changes import AdminError, PoolChanges

log = logging.getLogger(__name__)


class AdminExecutor:
    def __init__(self, cluster: Cluster, store: MetadataStore, overrides: dict[str, Any] | None = None) -> None:
        """`overrides`: the dotted keys `pdserve serve` was started with on its command line (--model, --port);
        they apply to an applied configuration too, as they did to the file at start."""
        cfg = cluster.cfg
        self.cluster, self.store, self.cfg, self.overrides = cluster, store, cfg, overrides or {}
        self.pools = PoolChanges(cluster, cfg.server.drain_grace_s, cfg.server.drain_timeout_s)
        self.channel = AdminChannel(cluster.redis_url, cfg.metastore.namespace)
        self.counters: Counter[str] = Counter()  # commands, per op, failed, expired, redis_errors
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="admin-executor", daemon=True)

    def start(self) -> AdminExecutor:
        self._thread.start()
        return self

    def stop(self) -> None:
        """After the command under way (bounded by its drains)."""
        self._stop.set()
        self._thread.join(self.cfg.server.drain_grace_s + self.cfg.server.drain_timeout_s + 60)
        self.channel.close()
        log.info("admin: %s; pools: %s", dict(self.counters) or "no commands", dict(self.pools.counters) or
                 "unchanged")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                command = self.channel.take(wait_s=1)
                if command is None:
                    continue
                reply = self.execute(command)
                self.channel.reply(reply)
            except redis.RedisError as e:
                self.counters["redis_errors"] += 1
                log.warning("admin: metadata store unreachable (%s); retrying in 1 s", e)
                self._stop.wait(1.0)
            except Exception:  # NOTE: a bug here must not end the executor: log, count, take the next one
                self.counters["executor_errors"] += 1
                log.exception("admin: executor error")

    def execute(self, command: AdminCommand) -> AdminReply:
        self.counters["commands"] += 1
        self.counters[command.op] += 1
        if self.channel.expired(command):
            self.counters["expired"] += 1
            log.warning("admin %s %s: past its deadline when taken; not run", command.op, command.id)
            return AdminReply(command.id, error="the command expired before it could run", code="DEADLINE_EXCEEDED")
        log.info("admin %s %s: %s", command.op, command.id, {k: v for k, v in dataclasses.asdict(command).items()
                                                             if v and k not in ("id", "config", "deadline")})
        try:
            changes, restart = self._dispatch(command)
        except AdminError as e:
            self.counters["failed"] += 1
            log.warning("admin %s %s refused or failed: %s", command.op, command.id, e)
            return AdminReply(command.id, pools=self.pools.pools(), error=str(e), code=e.code)
        except Exception as e:  # NOTE: e.g. an instance that did not answer its drain in time: reply, never hang
            self.counters["failed"] += 1
            log.exception("admin %s %s failed", command.op, command.id)
            return AdminReply(command.id, pools=self.pools.pools(), error=f"{type(e).__name__}: {e}",
                              code="INTERNAL")
        for line in changes:
            log.info("admin %s %s: %s", command.op, command.id, line)
        return AdminReply(command.id, changes, restart, self.pools.pools())

    def _dispatch(self, command: AdminCommand) -> tuple[list[str], list[str]]:
        if command.op == "scale":
            return self.pools.scale(command.role, command.replicas), []
        if command.op == "set_role":
            return [self.pools.set_role(command.instance_id, command.role)], []
        if command.op == "drain":
            return [self.pools.remove(command.instance_id)], []
        return self.apply(command.config)

    def running_config(self) -> ServingConfig:
        """The configuration as it runs now: pool sizes as they are, the policy as the store has it."""
        pools = self.pools.pools()
        cfg = self.cfg
        return dataclasses.replace(cfg, placement=self.store.policy(cfg.placement), pools=dataclasses.replace(
            cfg.pools, **{r: dataclasses.replace(getattr(cfg.pools, r), replicas=len(pools[r]))
                          for r in ("prefill", "decode")}))

    def apply(self, data: dict[str, Any]) -> tuple[list[str], list[str]]:
        try:
            edited = build_config(data, self.overrides)
        except ConfigError as e:
            raise AdminError("INVALID_ARGUMENT", f"the configuration is not valid: {e}") from None
        d = diff(self.running_config(), edited)
        changes = []
        if d.policy:
            try:
                self.store.set_policy(**d.policy)
            except ValueError as e:
                raise AdminError("INVALID_ARGUMENT", f"placement: {e}") from None
            changes.append("placement policy: " + ", ".join(f"{k}={v}" for k, v in sorted(d.policy.items())))
        # NOTE: growth first, so that capacity never dips below both the old and the new size
        current = {r: len(ids) for r, ids in self.pools.pools().items()}
        for role, n in sorted(d.replicas.items(), key=lambda rn: rn[1] < current[rn[0]]):
            changes += self.pools.scale(role, n)
        return changes or ["nothing to change live"], d.needs_restart
