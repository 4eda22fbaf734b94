"""CUDA graphs for decode-only steps: one graph per batch-size bucket, captured at start-up, replayed with the
step's inputs copied into static device buffers.

A decode step of n sequences runs the graph of the smallest bucket b >= n; rows n..b-1 are padding (slot -1:
nothing is stored; seq_len 0: nothing is attended) and their logits are dropped. The graph ends with the logits
of every row, so the only host synchronisation in a step is the sampler reading the chosen tokens.

Contract: the attention backend must launch with shapes that depend only on host ints fixed for a decode step
(max_query_len == 1), never on device values; the Triton backend does.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import torch

from engine.attention import AttentionMetadata
from engine.inflight import feed_tokens
from engine.parallel import tp

if TYPE_CHECKING:
    from engine.model_runner import ModelRunner, StepInput

log = logging.getLogger(__name__)


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16, up to (and always including) max_batch."""
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return [*small, *range(16, max_batch, 16), max_batch]


class DecodeGraphs:
    def __init__(self, runner: ModelRunner, max_batch: int, max_blocks_per_seq: int) -> None:
        self.runner = runner
        self.buckets = batch_buckets(max_batch)
        dev, B = runner.device, self.buckets[-1]
        # Static inputs every graph reads (each bucket a prefix view).
        self.input_ids = torch.zeros(B, dtype=torch.int64, device=dev)  # [B]
        self.positions = torch.zeros(B, dtype=torch.int64, device=dev)  # [B]
        self.slots = torch.full((B,), -1, dtype=torch.int64, device=dev)  # [B]
        self.seq_lens = torch.zeros(B, dtype=torch.int32, device=dev)  # [B]
        self.query_start_loc = torch.arange(B + 1, dtype=torch.int32, device=dev)  # [B+1]: one token each
        self.tables = torch.zeros(B, max_blocks_per_seq, dtype=torch.int32, device=dev)  # [B, max_blocks]
        self.feed = torch.full((B,), -1, dtype=torch.int64, device=dev)  # [B]: see StepInput.feed
        # Pinned host staging, one buffer per dtype.
        self.host_i64 = torch.zeros(4, B, dtype=torch.int64).pin_memory()  # [4, B]: ids, positions, slots, feed
        self.host_seq = torch.zeros(B, dtype=torch.int32).pin_memory()  # [B]
        self.host_tables = torch.zeros(B, max_blocks_per_seq, dtype=torch.int32).pin_memory()  # [B, max_blocks]
        self.copied = torch.cuda.Event()  # the staging buffers may be rewritten once this has passed
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}  # bucket -> [b, vocab] float32, written by its graph
        self.replays = 0
        self.replay_host_s = 0.0  # host time inside graph.replay() (the launch), summed over replays

    def _meta(self, b: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:b], query_start_loc=self.query_start_loc[: b + 1], seq_lens=self.seq_lens[:b],
            block_tables=self.tables[:b], max_query_len=1, max_seq_len=self.runner.config.max_model_len or 0,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every bucket, largest first so the smaller graphs reuse its memory pool."""
        t0 = time.perf_counter()
        pool = None
        # NOTE: at TP > 1 the graphs hold NCCL all-reduces; torch.distributed's watchdog thread polls its work
        # events meanwhile, which global capture mode would count as an illegal call during capture.
        # Every rank captures the same buckets in the same order, so the captured collectives pair up.
        mode = "thread_local" if tp().size > 1 else "global"
        for b in reversed(self.buckets):
            meta = self._meta(b)
            self.runner.forward_logits(self.input_ids[:b], self.positions[:b], meta)  # compile and warm
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=mode):
                self.logits[b] = self.runner.forward_logits(self.input_ids[:b], self.positions[:b], meta)
            pool = graph.pool()
            self.graphs[b] = graph
        torch.cuda.synchronize()
        log.info("captured %d decode CUDA graphs (batch %s) in %.1f s", len(self.buckets), self.buckets,
                 time.perf_counter() - t0)

    def can_run(self, inp: StepInput) -> bool:
        """A decode-only step whose every row samples. NOTE: a 1-token chunk of an unfinished prompt also has
        max_query_len 1 but samples nothing; such a step runs eagerly."""
        n = len(inp.seq_lens)
        return inp.max_query_len == 1 and n <= self.buckets[-1] and len(inp.logits_indices) == n

    def run(self, inp: StepInput, prev_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the decode step `inp` (every request one token, all at their end); returns [n, vocab].
        With `inp.feed`, placeholder ids are first replaced from `prev_tokens` on the device."""
        n = len(inp.seq_lens)
        b = next(x for x in self.buckets if x >= n)
        w = inp.block_tables.shape[1]
        self.copied.synchronize()  # the previous step's copies have left the staging buffers
        host = self.host_i64.numpy()  # [3, B] view of the pinned buffer
        host[0, :n], host[1, :n], host[2, :n] = inp.input_ids, inp.positions, inp.slot_mapping
        host[:2, n:b], host[2, n:b] = 0, -1
        seq = self.host_seq.numpy()
        seq[:n], seq[n:b] = inp.seq_lens, 0
        self.host_tables.numpy()[:n, :w] = inp.block_tables
        self.input_ids[:b].copy_(self.host_i64[0, :b], non_blocking=True)
        self.positions[:b].copy_(self.host_i64[1, :b], non_blocking=True)
        self.slots[:b].copy_(self.host_i64[2, :b], non_blocking=True)
        self.seq_lens[:b].copy_(self.host_seq[:b], non_blocking=True)
        self.tables[:n].copy_(self.host_tables[:n], non_blocking=True)
        if inp.feed is not None:
            assert prev_tokens is not None, "a step with placeholder inputs needs the previous step's tokens"
            host[3, :n] = inp.feed
            self.feed[:n].copy_(self.host_i64[3, :n], non_blocking=True)
            self.input_ids[:n] = feed_tokens(self.input_ids[:n], self.feed[:n], prev_tokens)
        self.copied.record()
        t0 = time.perf_counter()
        self.graphs[b].replay()
        self.replay_host_s += time.perf_counter() - t0
        self.replays += 1
        return self.logits[b][:n]  # [n, vocab]
