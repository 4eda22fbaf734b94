"""The time of one engine step as a linear function of what the step does, fitted from measured steps.

A step runs `prefill_tokens` new prompt tokens (chunks of prompts) and `decode_seqs` one-token decodes; the
decodes attend to `decode_context` tokens in all, and the prefill tokens attend to `prefill_pairs` (query,
key) pairs in all. Prefill is compute-bound (linear in tokens, plus the quadratic attention pairs), decode is
bandwidth-bound (a fixed cost for the weights, plus the KV read, linear in context).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

FEATURES = ("fixed_s", "per_prefill_token_s", "per_decode_seq_s", "per_context_token_s", "per_prefill_pair_s")


@dataclass(frozen=True)
class StepShape:
    prefill_tokens: int = 0
    decode_seqs: int = 0
    decode_context: int = 0  # tokens the decode rows attend to, summed over the rows
    prefill_pairs: int = 0  # (query, key) pairs the prefill rows attend to, summed

    def features(self) -> list[float]:
        return [1.0, self.prefill_tokens, self.decode_seqs, self.decode_context, self.prefill_pairs]


@dataclass(frozen=True)
class StepTimeModel:
    fixed_s: float
    per_prefill_token_s: float
    per_decode_seq_s: float
    per_context_token_s: float
    per_prefill_pair_s: float

    def predict(self, shape: StepShape) -> float:
        coef = (self.fixed_s, self.per_prefill_token_s, self.per_decode_seq_s, self.per_context_token_s,
                self.per_prefill_pair_s)
        return float(np.dot(coef, shape.features()))

    def predict_sum(self, steps: int, total: StepShape) -> float:
        """What `steps` steps whose shapes add up to `total` take together (the model is linear)."""
        return self.predict(total) + self.fixed_s * (steps - 1)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    def scaled(self, factor: float) -> StepTimeModel:
        """Every step `factor` times as long (a machine slower than the profiled one, or busier)."""
        return StepTimeModel(*(factor * v for v in asdict(self).values()))

    @staticmethod
    def fit(samples: list[tuple[StepShape, float]]) -> StepTimeModel:
        """Least squares on relative error (each step weighs the same whatever its length), coefficients >= 0
        (a feature whose coefficient comes out negative is dropped and the rest refitted)."""
        if len(samples) < len(FEATURES):
            raise ValueError(f"need at least {len(FEATURES)} measured steps, got {len(samples)}")
        x = np.array([s.features() for s, _ in samples], dtype=np.float64)  # [n, F]
        y = np.array([t for _, t in samples], dtype=np.float64)  # [n]
        w = 1.0 / y  # relative error
        active = list(range(len(FEATURES)))
        while True:
            coef, *_ = np.linalg.lstsq(x[:, active] * w[:, None], y * w, rcond=None)
            if (coef >= 0).all() or len(active) == 1:
                break
            active.pop(int(np.argmin(coef)))
        full = np.zeros(len(FEATURES))
        full[active] = np.clip(coef, 0, None)
        return StepTimeModel(*map(float, full))


@dataclass(frozen=True)
class TransferTimeModel:
    """Seconds to move a request's KV from a prefill to a decode instance: fixed + per block."""

    fixed_s: float
    per_block_s: float

    def predict(self, blocks: int) -> float:
        return self.fixed_s + self.per_block_s * blocks

    @staticmethod
    def fit(samples: list[tuple[int, float]]) -> TransferTimeModel:
        blocks = np.array([b for b, _ in samples], dtype=np.float64)
        secs = np.array([t for _, t in samples], dtype=np.float64)
        slope, intercept = np.polyfit(blocks, secs, 1) if len(set(blocks)) > 1 else (0.0, float(secs.mean()))
        return TransferTimeModel(max(0.0, float(intercept)), max(0.0, float(slope)))
