"""The prefill role: runs prompts to their first token and holds their KV for a decode instance to pull."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from concurrent.futures import Future

from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from instance.worker import InstanceWorker
from kv_transfer.handle import KVReader


class PrefillWorker(InstanceWorker):
    role = "prefill"
    poll_when_idle = True

    def prefill(self, request_id: str, prompt: list[int], params: SamplingParams,
                sink: Callable[[RequestOutput], None], reader: KVReader | None = None) -> Future[int]:
        """Queue a prompt; `sink` receives its one output (on the loop thread): the first token, and in
        `kv_handoff` the KVHandle of the held blocks (None if aborted, or if the reader it was streamed to
        gave it up). With `reader`, the KV's layer-group progress is streamed to it. ValueError via the
        Future."""
        return self.submit(request_id, prompt, dataclasses.replace(params, max_tokens=1), sink, kv_reader=reader)
