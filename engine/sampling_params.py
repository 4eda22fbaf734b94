"""Per-request sampling parameters, in the vLLM style."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.priority import Priority

MAX_TOP_LOGPROBS = 20  # as OpenAI's top_logprobs


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    temperature == 0 is greedy. top_k <= 0 and top_p == 1 disable those filters. `stop` strings cut the text
    before the first occurrence (the stop string itself is not returned); `stop_token_ids` and EOS stop after
    the token is produced (the stop token is returned in token_ids, but not rendered into text).
    `max_tokens` may exceed what fits: generation then ends at the engine's max_model_len (prompt + output
    tokens) with finish_reason "length", like any other length stop; it is never an error.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # None: no logprobs; k >= 0: each sampled token's logprob and the k most likely tokens' (engine/logprobs.py)
    logprobs: int | None = None
    # NOTE: here, not a separate argument, because SamplingParams is what already travels unchanged from the
    # router to every role's engine; the scheduler orders by it (engine/priority.py)
    priority: Priority = Priority.INTERACTIVE

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field. Called on construction and again when a request is added."""
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens <= 0:
            raise ValueError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature) \
                or self.temperature < 0:
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, int | float) or not 0.0 < self.top_p <= 1.0:  # NOTE: NaN fails this too
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool)
                                          or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ValueError(f"logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}], got {self.logprobs!r}")
        if not isinstance(self.priority, Priority):
            raise ValueError(f"priority must be a Priority, got {self.priority!r}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
