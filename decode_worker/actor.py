"""The decode Ray actor: DecodeWorker behind an async streaming interface the router consumes."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from decode_worker.stream import OutputQueue, StepMailbox, next_outputs
from decode_worker.worker import DecodeWorker
from engine.sampling_params import SamplingParams
from instance.actor import InstanceActor
from instance.messages import StreamDelta
from instance.worker import InstanceStats
from kv_transfer import KVHandle
from kv_transfer.handle import StreamedKV

log = logging.getLogger(__name__)


class DecodeActor(InstanceActor):
    worker_cls = DecodeWorker
    worker: DecodeWorker
    _mailbox: StepMailbox | None = None  # made on the first call, on the actor's event loop
    stream_outputs = 0  # engine outputs streamed
    stream_items = 0  # stream items they went out in (fewer: a consumer lagged, outputs were merged)
    streams_abandoned = 0  # streams whose consumer went away before the final item (the request was aborted)

    async def kv_source_ready(self, request_id: str, handle: KVHandle) -> None:
        """The streamed prefill of this request finished; its hand-off backs up the holder's own messages."""
        await asyncio.wrap_future(self.worker.kv_source_ready(request_id, handle))

    async def kv_source_lost(self, request_id: str) -> None:
        """The prefill instance streaming this request's KV failed: prefill it here (router/layer_wise.py)."""
        await asyncio.wrap_future(self.worker.kv_source_lost(request_id))

    async def generate(self, request_id: str, prompt: list[int], params: SamplingParams,
                       kv_handle: KVHandle | StreamedKV | None = None, resumed: list[int] = (),  # type: ignore[assignment]
                       text_offset: int = 0) -> AsyncIterator[StreamDelta]:
        """Stream the request's tokens: one item per step while the consumer keeps up, else the tokens of every
        step since its last item, in order. The final item carries the routing counts. Cancelling the stream
        aborts the request (blocks freed). A stream that moved here from a lost instance passes the tokens it
        already generated (`resumed`) and the characters of text already sent (`text_offset`): the text is a
        function of the tokens, so the stream continues where the client's text ends."""
        if self._mailbox is None:
            self._mailbox = StepMailbox(asyncio.get_running_loop())
        outputs: OutputQueue = asyncio.Queue()
        transferred = await asyncio.wrap_future(
            self.worker.generate(request_id, prompt, params, self._mailbox.sink(outputs), kv_handle, resumed))
        finished, items = False, 0
        try:
            text_sent = text_offset
            while not finished:
                out, token_ids, merged, logprobs = await next_outputs(outputs)
                self.stream_outputs += merged
                self.stream_items += 1
                items += 1
                finished = out.finished
                pulled = transferred if finished and not out.kv_load_failed else 0
                yield StreamDelta(token_ids, out.text[text_sent:], finished, out.finish_reason,
                                  out.num_cached_tokens, pulled, logprobs, finished and out.kv_load_failed)
                text_sent = len(out.text)
        except (GeneratorExit, asyncio.CancelledError) as e:
            # NOTE: how a stream ends without its consumer: the router cancelled it, or the router process died
            # (kill -9). Ray does not cancel a streaming call whose caller died; it closes the generator
            # (GeneratorExit) at its next yield, when reporting the item to the dead caller fails, whether it
            # was streaming or blocked at the backpressure wait (docs/reliability.md). Either way the request
            # must go now, or it would decode on to max_tokens holding its KV blocks for nobody.
            self.streams_abandoned += 1
            log.info("request %s: its stream's consumer went away (%s) after %d items; aborted here, its KV "
                     "blocks freed (streams abandoned so far: %d)", request_id, type(e).__name__, items,
                     self.streams_abandoned)
            raise
        finally:
            if not finished:  # the consumer went away (cancel, deadline, its router died): free the blocks now
                self.worker.abort(request_id)

    def stats(self) -> InstanceStats:
        wakeups = self._mailbox.wakeups if self._mailbox is not None else 0
        return self.worker.stats({"stream_outputs": self.stream_outputs, "stream_items": self.stream_items,
                                  "stream_wakeups": wakeups, "streams_abandoned": self.streams_abandoned})
