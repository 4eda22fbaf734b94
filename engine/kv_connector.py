"""The one interface through which the engine uses a KV connector. The engine owns it and calls it; a connector
(kv_transfer/ implements the NIXL one) never calls into the engine.

    engine (driver process)                               connector (scheduler side, same process)
    add_request(..., kv_source=S): reserve blocks  ─────►  start_load(request, S, n_cached): post reads
    every step, before scheduling                  ─────►  poll() -> KVConnectorEvents:
        first_tokens: the first token is known (sampled where the prompt was computed): it goes out now, while
            the KV may still be on its way
        loaded: the prompt's KV is in place: it counts as computed (the first token goes out now if it has not)
        failed: prefill it here instead (quarantine the blocks while a read may still write into them)
        settled: quarantined blocks may be reused      released: held blocks may be freed
    a request finishes                             ─────►  request_finished(request) -> hand-off or None
        (a hand-off: the engine keeps the blocks for a reader, until `released` names the request)
    abort of a loading request                     ─────►  cancel_load(id) -> True when nothing writes any more
    abort of a held request                        ─────►  drop_held(id)
    abort of any other request                     ─────►  request_aborted(id)
    the source of a loading request failed         ─────►  source_lost(id)
    ... or finished (its hand-off came another way) ─────►  source_ready(id, source)
    instances of the other role joined (the router) ─────►  meet(peers): learn them and connect, off any request

Layer-wise streaming (the prefill role):
    add_request(..., kv_reader=R)                  ─────►  stream_to(id, R): tell R how the prompt's KV grows
    every step, once scheduled                     ─────►  layer_hook(scheduled) -> hook or None
        the driver rank's forward calls hook(g) after each layer group g (engine/models/llama.py)

Worker side: `KVConnectorSpec.make_worker` builds one worker part per TP rank, in the rank's own process (it
owns that rank's slice of the KV cache); the scheduler side reaches all of them with `KVRanks.call(fn, ...)`,
where fn is a function of the worker part (e.g. an unbound method), never a name.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from engine.config import EngineConfig
    from engine.kv_cache import KVCache
    from engine.request import Request
    from engine.scheduler import SchedulerOutput

W = TypeVar("W")
R = TypeVar("R")

# hook(g): the forward on the driver rank has issued layer group g's layers (all ranks' KV of the group follows:
# every layer ends in an all-reduce over the TP ranks)
LayerHook = Callable[[int], None]


@dataclass(frozen=True)
class LoadDone:
    request_id: str
    first_token: int  # sampled where the prompt was computed


@dataclass(frozen=True)
class LoadFailed:
    request_id: str
    error: Exception  # why (kv_transfer's typed errors); logged and counted by the connector
    settled: bool  # False: a read may still write into the request's blocks, so they are quarantined


@dataclass
class KVConnectorEvents:
    """What changed since the last poll. Empty lists when nothing did."""

    first_tokens: list[LoadDone] = field(default_factory=list)  # of loads still in flight
    loaded: list[LoadDone] = field(default_factory=list)
    failed: list[LoadFailed] = field(default_factory=list)
    settled: list[str] = field(default_factory=list)  # quarantined requests whose blocks may be reused now
    released: list[str] = field(default_factory=list)  # held requests whose blocks may be freed now

    def __bool__(self) -> bool:
        return bool(self.first_tokens or self.loaded or self.failed or self.settled or self.released)


class KVConnectorWorker(Protocol):
    """One TP rank's part, living in that rank's process."""

    def describe(self) -> Any:
        """Plain data about this rank's part, sent to the driver (e.g. its transfer agent's descriptor)."""
        ...

    def close(self) -> None: ...


class KVRanks(Protocol):
    """The engine's handle on every rank's worker part."""

    @property
    def local(self) -> KVConnectorWorker:
        """The driver rank's part, in this process (e.g. for control messages that only rank 0 exchanges)."""
        ...

    def call(self, fn: Callable[..., R], *args: Any) -> list[R]:
        """fn(worker_part, *args) on every rank; results in rank order. A failure on any rank raises
        RuntimeError after every rank has answered."""
        ...


class KVConnector(ABC):
    """The scheduler side. The defaults are a connector that neither loads nor holds KV."""

    counters: Counter[str]

    def start_load(self, request: Request, source: Any, num_cached_blocks: int) -> int:
        """Start loading the KV of `request`'s prompt, whose blocks are allocated (`request.block_ids`; the first
        `num_cached_blocks` are already cached here) from `source`. Returns the number of blocks to load (0:
        nothing to read; `poll` still reports the request). Raises ValueError for a source that cannot serve
        this request (the engine then drops the request)."""
        raise ValueError("this instance does not load KV computed elsewhere")

    def cancel_load(self, request_id: str) -> bool:
        """The request was aborted while loading. True when nothing can write its blocks any more; False: a read
        is still in flight, and `poll` reports the request in `settled` once it is not."""
        return True

    def request_finished(self, request: Request) -> Any | None:
        """A request finished (not aborted). Non-None: a hand-off for a reader of its KV (it reaches the caller
        as RequestOutput.kv_handoff), and the engine keeps the blocks until `poll` reports it `released`."""
        return None

    def drop_held(self, request_id: str) -> None:
        """A request whose blocks were held was aborted: the engine freed them; forget it."""
        return None

    def meet(self, peers: list[Any]) -> int:
        """Instances this one may exchange KV with (their endpoints, e.g. kv_transfer's KVEndpoint), introduced
        before any request between them: load what the first request would need of them (their metadata, a
        connection) now, so it does not wait for it. Returns how many were new here. Never raises for a peer
        that cannot be met: the first request then meets it itself."""
        return 0

    def source_ready(self, request_id: str, source: Any) -> None:
        """Someone outside (the router) has the finished source of a loading request (e.g. the KVHandle of a
        prefill whose progress was being streamed): use it for whatever has not arrived the other way."""
        return None

    def source_lost(self, request_id: str) -> None:
        """Someone outside (the router) saw the source of a loading request fail: stop waiting for it (the
        engine then prefills the prompt here, as for any failed load)."""
        return None

    def request_aborted(self, request_id: str) -> None:
        """A request that was neither loading nor held was aborted (its blocks are freed)."""
        return None

    def stream_to(self, request_id: str, reader: Any) -> None:
        """Stream the KV progress of the (just queued) request to `reader` as its layers are computed. Raises
        ValueError for a reader this connector cannot serve."""
        raise ValueError("this instance does not stream KV to readers")

    def layer_hook(self, scheduled: SchedulerOutput) -> LayerHook | None:
        """Called once the step is scheduled, before its forward: the hook the forward calls after each layer
        group, or None (the common case: nothing to signal)."""
        return None

    @abstractmethod
    def poll(self) -> KVConnectorEvents:
        """Advance reads, serve control messages, expire leases; report what changed."""

    @abstractmethod
    def has_work(self) -> bool:
        """True while reads are in flight (the engine keeps stepping instead of idling)."""

    def close(self) -> None:
        """Called once, by the engine's shutdown before the ranks stop, or by LLMEngine.replace_kv_connector on an
        idle engine: the scheduler side only. The rank parts (`KVRanks`) outlive it and must keep working."""
        return None


class KVConnectorSpec(Protocol):
    """How to build both sides of a connector (picklable: it travels to the TP rank processes)."""

    def make_worker(self, kv_cache: KVCache, config: EngineConfig, rank: int) -> KVConnectorWorker: ...

    def make_connector(self, ranks: KVRanks, descriptors: list[Any]) -> KVConnector: ...
