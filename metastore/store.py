"""Mooncake-style metadata store on Redis: instance registry with leases, prefix-block index, loads, policy.

Key layout (docs/metastore.md), all under the namespace prefix `{ns}:`:

    {ns}:live               ZSET  instance id -> lease expiry (Redis server time, seconds)
    {ns}:inst:{id}          STR   InstanceInfo JSON                                   (TTL = lease)
    {ns}:load:{id}          STR   Load JSON                                           (TTL = lease)
    {ns}:stats:{id}         STR   InstanceStatsRecord JSON (metastore/instance_stats.py) (TTL = lease)
    {ns}:blk:{hash}         SET   instance ids holding the full block with this 128-bit hash (32 hex digits)
    {ns}:iblk:{id}          SET   block hashes an instance holds (to drop them when it leaves)
    {ns}:kvev:{id}          STREAM the instance's KV events in order: n (sequence), k (s|r), h (hashes, hex)
    {ns}:kvseq:{id}         STR   the sequence number of the instance's last KV event
    {ns}:policy             HASH  PlacementPolicy field -> JSON value
    {ns}:nodes              HASH  Ray node id -> NodeRecord JSON (metastore/nodes.py)

Leases use the Redis server's clock (TIME), so instances on hosts with skewed clocks agree on expiry.
"""

from __future__ import annotations

import binascii
import json
import logging
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import redis

from engine.block_pool import KVEvent
from metastore.instance_stats import InstanceStatsRecord
from metastore.nodes import NodeRecord, sorted_nodes
from metastore.policy import PlacementPolicy

log = logging.getLogger(__name__)

ROLES = ("prefill", "decode")


@dataclass(frozen=True)
class InstanceInfo:
    instance_id: str
    role: str  # "prefill" | "decode"
    address: str  # how the router reaches it (a Ray actor name, or host:port)
    tp_size: int
    block_size: int
    num_blocks: int  # KV capacity per rank
    max_num_seqs: int
    model: str = ""
    host: str = ""  # where the instance's driver process runs, for operators
    node_ip: str = ""  # its node's address as Ray sees it (engine.envs.PDSERVE_NODE_IP); "" outside Ray
    pid: int = 0

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"instance role {self.role!r} is not one of {ROLES}")

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(text: str | bytes) -> InstanceInfo:
        return InstanceInfo(**json.loads(text))


@dataclass(frozen=True)
class Load:
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0  # fraction of KV blocks in use
    queued_prefill_tokens: int = 0

    def to_json(self) -> str:
        return json.dumps(asdict(self))


# Applies one KV event: KEYS = the instance's block set, its event stream, its event sequence counter; ARGV =
# kind ("s" stored / "r" removed), instance id, the block-key prefix, the stream's approximate length cap, then
# block hashes. The sets and the stream change in one atomic step, so a router that reads the block set and the
# stream's last entry in one transaction has a snapshot and the exact point to follow the stream from.
# NOTE: it writes keys it derives from its arguments (blk:<hash>), which a standalone Redis allows and Redis
# Cluster would not; the store targets one Redis.
_INDEX_SCRIPT = """
local add = ARGV[1] == 's'
for i = 5, #ARGV do
  if add then redis.call('SADD', ARGV[3] .. ARGV[i], ARGV[2]) else redis.call('SREM', ARGV[3] .. ARGV[i], ARGV[2]) end
end
if add then redis.call('SADD', KEYS[1], unpack(ARGV, 5)) else redis.call('SREM', KEYS[1], unpack(ARGV, 5)) end
local seq = redis.call('INCR', KEYS[3])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[4], '*', 'n', seq, 'k', ARGV[1], 'h', table.concat(ARGV, '', 5))
return seq
"""
_SCRIPT_CHUNK = 4000  # block hashes per script call: Lua's unpack() is limited to a few thousand values


BLOCK_KEY_MASK = (1 << 64) - 1


def block_key(block_hash: int) -> int:
    """A block's key in a router's in-memory index: the low 64 bits of its 128-bit hash. NOTE: 64 bits make
    reading millions of keys cheap (numpy turns them into Python ints at C speed, see `block_keys`); the chance
    that two of 10 million blocks share a key is about 3e-6, and the index is only a placement hint."""
    return block_hash & BLOCK_KEY_MASK


def block_keys(hex_digits: bytes) -> list[int]:
    """The block keys of hashes written as concatenated 32-digit hex (the stream's and the block sets' form)."""
    raw = np.frombuffer(binascii.unhexlify(hex_digits), dtype=">u8")  # [2 * n] big-endian halves
    return raw[1::2].tolist()


@dataclass(frozen=True)
class IndexEvent:
    """One entry of an instance's KV event stream: its stream id, its sequence number (1, 2, ... per stream,
    so a reader sees a gap or a restart), and the keys (`block_key`) of the blocks it stored or removed."""

    entry_id: str
    seq: int
    stored: bool
    block_keys: list[int]


@dataclass(frozen=True)
class IndexSnapshot:
    """An instance's block set (as `block_key`s) and the stream position it reflects (read in one
    transaction)."""

    entry_id: str  # follow the stream from here ("0-0": from its start)
    seq: int  # the sequence number of that entry (0: none yet)
    block_keys: list[int]


class MetadataStore:
    def __init__(self, url: str, namespace: str = "pdserve", registry_lease_s: float = 10.0,
                 event_stream_len: int = 10_000, socket_timeout: float | None = None) -> None:
        """`event_stream_len`: entries each instance's KV event stream keeps (about); a reader that falls
        further behind re-reads the instance's block set. `socket_timeout`: seconds a Redis call may take."""
        if registry_lease_s <= 0:
            raise ValueError(f"registry_lease_s: {registry_lease_s} must be > 0")
        if event_stream_len < 1:
            raise ValueError(f"event_stream_len: {event_stream_len} must be >= 1")
        self.r = redis.Redis.from_url(url, socket_timeout=socket_timeout)
        self.url = url
        self.ns = namespace
        self.registry_lease_s = registry_lease_s
        self.event_stream_len = event_stream_len
        self._index_script = self.r.register_script(_INDEX_SCRIPT)
        # NOTE: the same connections, but SMEMBERS answers a list: building a Python set of 100,000 members that
        # are only joined into one string afterwards took a third of a snapshot's time.
        self._raw = redis.Redis(connection_pool=self.r.connection_pool)
        self._raw.set_response_callback("SMEMBERS", lambda response, **options: response)

    # ---- keys ----------------------------------------------------------------------------------------------
    def _k(self, *parts: str) -> str:
        return ":".join((self.ns, *parts))

    @staticmethod
    def _h(block_hash: int) -> str:
        return f"{block_hash:032x}"

    def now(self) -> float:
        sec, usec = self.r.time()
        return sec + usec / 1e6

    # ---- registry ------------------------------------------------------------------------------------------
    def register(self, info: InstanceInfo) -> None:
        """Add (or replace) an instance; it stays live while heartbeats renew its lease."""
        ttl = max(1, int(self.registry_lease_s + 0.999))
        pipe = self.r.pipeline()
        pipe.set(self._k("inst", info.instance_id), info.to_json(), ex=ttl)
        pipe.zadd(self._k("live"), {info.instance_id: self.now() + self.registry_lease_s})
        pipe.execute()

    def heartbeat(self, instance_id: str, load: Load | None = None,
                  stats: InstanceStatsRecord | None = None) -> bool:
        """Renew the lease (and publish the load and the stats record, in the same round trip). False if the
        record is gone: the caller must re-register (and republish its blocks), e.g. after the lease lapsed or
        Redis restarted."""
        ttl = max(1, int(self.registry_lease_s + 0.999))
        if not self.r.expire(self._k("inst", instance_id), ttl):
            return False
        pipe = self.r.pipeline()
        pipe.zadd(self._k("live"), {instance_id: self.now() + self.registry_lease_s})
        if load is not None:
            pipe.set(self._k("load", instance_id), load.to_json(), ex=ttl)
        if stats is not None:
            pipe.set(self._k("stats", instance_id), stats.to_json(), ex=ttl)
        pipe.execute()
        return True

    def deregister(self, instance_id: str) -> None:
        self._drop(instance_id)

    def live_instances(self, role: str | None = None) -> list[InstanceInfo]:
        """Instances whose lease has not expired, in id order; expired ones are pruned on the way."""
        now = self.now()
        for dead in self.r.zrangebyscore(self._k("live"), "-inf", now):
            log.warning("instance %s missed its heartbeats: removed from the registry", dead.decode())
            self._drop(dead.decode())
        ids = [i.decode() for i in self.r.zrangebyscore(self._k("live"), now, "+inf")]
        if not ids:
            return []
        raw = self.r.mget([self._k("inst", i) for i in ids])
        out = [InstanceInfo.from_json(r) for r in raw if r is not None]
        return sorted((i for i in out if role is None or i.role == role), key=lambda i: i.instance_id)

    def _drop(self, instance_id: str) -> None:
        hashes = [h.decode() for h in self.r.smembers(self._k("iblk", instance_id))]
        pipe = self.r.pipeline()
        for h in hashes:
            pipe.srem(self._k("blk", h), instance_id)
        pipe.delete(self._k("iblk", instance_id), self._k("inst", instance_id), self._k("load", instance_id),
                    self._k("stats", instance_id), self._k("kvev", instance_id), self._k("kvseq", instance_id))
        pipe.zrem(self._k("live"), instance_id)
        pipe.execute()

    # ---- prefix-block index --------------------------------------------------------------------------------
    def apply_kv_events(self, instance_id: str, events: Iterable[KVEvent]) -> None:
        """Keep the index current from an engine's KV events (stored / removed, by block hash), in order.
        NOTE: one server-side script call per chunk of an event, not two commands per block: a decode instance
        stores every transferred prompt's blocks (~190 for 3,000 tokens), and packing the per-block commands
        in Python took ~12% of a loaded decode actor's samples (docs/performance.md)."""
        pipe = self.r.pipeline(transaction=False)
        n = 0
        for event in events:
            hashes = [self._h(h) for h in event.block_hashes]
            kind = "s" if event.kind == "stored" else "r"
            for at in range(0, len(hashes), _SCRIPT_CHUNK):
                self._index_script(keys=[self._k("iblk", instance_id), self._k("kvev", instance_id),
                                         self._k("kvseq", instance_id)],
                                   args=[kind, instance_id, self._k("blk", ""), self.event_stream_len,
                                         *hashes[at : at + _SCRIPT_CHUNK]], client=pipe)
                n += 1
        if n:
            pipe.execute()

    def index_snapshot(self, instance_id: str) -> IndexSnapshot:
        """The blocks an instance holds and the position in its KV event stream they reflect: a reader applies
        the stream's entries after `entry_id` on top (router/cluster_view.py)."""
        pipe = self._raw.pipeline(transaction=True)
        pipe.xrevrange(self._k("kvev", instance_id), count=1)
        pipe.smembers(self._k("iblk", instance_id))
        last, members = pipe.execute()
        entry_id, seq = (last[0][0].decode(), int(last[0][1][b"n"])) if last else ("0-0", 0)
        return IndexSnapshot(entry_id, seq, block_keys(b"".join(members)))

    def read_index_events(self, cursors: dict[str, str], block_ms: int | None = None,
                          count: int = 1000) -> dict[str, list[IndexEvent]]:
        """KV events after each instance's cursor (an entry id), in order; waits up to `block_ms` for the first
        (None: returns at once)."""
        if not cursors:
            return {}
        prefix = len(self._k("kvev", ""))
        streams = {self._k("kvev", iid): cursor for iid, cursor in cursors.items()}
        out: dict[str, list[IndexEvent]] = {}
        for key, entries in self.r.xread(streams, count=count, block=block_ms) or []:
            out[key.decode()[prefix:]] = [IndexEvent(eid.decode(), int(f[b"n"]), f[b"k"] == b"s", block_keys(f[b"h"]))
                                          for eid, f in entries]
        return out

    def prefix_overlap(self, block_hashes: list[int]) -> dict[str, int]:
        """For every instance holding the first block: how many leading blocks of `block_hashes` it holds.
        NOTE: one SMEMBERS per block; the router answers this from its own copy of the index
        (router/prefix_index.py). This read is for tools and the baseline of bench/router_overhead.py."""
        if not block_hashes:
            return {}
        pipe = self.r.pipeline(transaction=False)
        for block_hash in block_hashes:
            pipe.smembers(self._k("blk", self._h(block_hash)))
        holders = pipe.execute()
        alive = {i.decode() for i in holders[0]}
        out: dict[str, int] = {}
        for depth, members in enumerate(holders):
            alive &= {m.decode() for m in members}
            if not alive:
                break
            for instance_id in alive:
                out[instance_id] = depth + 1
        return out

    # ---- loads ---------------------------------------------------------------------------------------------
    def loads(self, instance_ids: list[str]) -> dict[str, Load]:
        if not instance_ids:
            return {}
        raw = self.r.mget([self._k("load", i) for i in instance_ids])
        return {i: Load(**json.loads(r)) if r is not None else Load() for i, r in zip(instance_ids, raw, strict=True)}

    def instance_stats(self, instance_ids: list[str]) -> dict[str, InstanceStatsRecord]:
        """The last stats record of each instance that has one (one MGET)."""
        if not instance_ids:
            return {}
        raw = self.r.mget([self._k("stats", i) for i in instance_ids])
        return {i: InstanceStatsRecord.from_json(r) for i, r in zip(instance_ids, raw, strict=True) if r is not None}

    # ---- policy --------------------------------------------------------------------------------------------
    def policy(self, base: PlacementPolicy | None = None) -> PlacementPolicy:
        """The current placement policy: `base` (the configured one) overridden by what is stored."""
        return PlacementPolicy.from_redis(self.r.hgetall(self._k("policy")), base)

    def set_policy(self, **changes: Any) -> PlacementPolicy:
        """Change placement parameters at runtime (validated; the router's next decision uses them)."""
        merged = PlacementPolicy.from_redis({k: json.dumps(v) for k, v in changes.items()}, self.policy())
        self.r.hset(self._k("policy"), mapping={k: v for k, v in merged.to_redis().items() if k in changes})
        return merged

    # ---- nodes (pdserve serve's node watcher; metastore/nodes.py) ---------------------------------------------
    def write_node(self, record: NodeRecord) -> None:
        self.r.hset(self._k("nodes"), record.node_id, record.to_json())

    def nodes(self) -> tuple[NodeRecord, ...]:
        """Every node record, alive nodes first, then by IP."""
        return sorted_nodes(NodeRecord.from_json(v) for v in self.r.hgetall(self._k("nodes")).values())

    def clear_nodes(self) -> None:
        self.r.delete(self._k("nodes"))

    def close(self) -> None:
        self.r.close()
