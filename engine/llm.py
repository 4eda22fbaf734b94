"""Offline batch generation in the vLLM style: `LLM(model=...).generate(prompts, params)`."""

from __future__ import annotations

from typing import Any

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams


class LLM:
    """Keyword arguments are EngineConfig fields (model, dtype, block_size, tensor_parallel_size, ...)."""

    def __init__(self, model: str, **kwargs: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **kwargs))
        self._next_id = 0

    def generate(
        self,
        prompts: list[str] | list[list[int]] | str,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; outputs come back in prompt order. Every prompt is validated before any
        is queued, so a ValueError leaves the engine exactly as it was."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        per_prompt = params if isinstance(params, list) else [params] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} sampling params for {len(prompts)} prompts")
        encoded = [self.engine.encode(p) for p in prompts]  # type: ignore[arg-type]
        for i, (ids, sp) in enumerate(zip(encoded, per_prompt, strict=True)):
            try:
                self.engine.validate(ids, sp)
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        ids_by_req: dict[str, int] = {}
        for i, (ids, sp) in enumerate(zip(encoded, per_prompt, strict=True)):
            rid = f"offline-{self._next_id}"
            self._next_id += 1
            ids_by_req[rid] = i
            self.engine.add_request(rid, ids, sp)
        results: list[RequestOutput | None] = [None] * len(prompts)
        while any(r is None for r in results):
            for out in self.engine.step():
                if out.finished and out.request_id in ids_by_req:
                    results[ids_by_req[out.request_id]] = out
        return results  # type: ignore[return-value]

    def shutdown(self) -> None:
        self.engine.shutdown()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()
