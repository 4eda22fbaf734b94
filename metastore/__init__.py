"""The Mooncake-style metadata store on Redis: registry with leases, prefix-block index, loads, policy."""

from metastore.instance_stats import InstanceStatsRecord
from metastore.policy import PlacementPolicy
from metastore.publisher import InstancePublisher
from metastore.redis_server import RedisServer
from metastore.store import InstanceInfo, Load, MetadataStore

__all__ = ["InstanceInfo", "InstancePublisher", "InstanceStatsRecord", "Load", "MetadataStore", "PlacementPolicy",
           "RedisServer"]
