"""Sampling as small pure functions (gpt-fast style): logits -> probabilities -> token."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from flashinfer.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    def validate(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def logits_to_probs(logits: np.ndarray, params: SamplingParams) -> np.ndarray:
    """Temperature, then top-k, then top-p (nucleus) filtering; returns float64 probabilities."""
    z = logits.astype(np.float64) / params.temperature
    if 0 < params.top_k < z.size:
        kth = np.partition(z, -params.top_k)[-params.top_k]
        z = np.where(z < kth, -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if params.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep the smallest prefix whose mass reaches top_p (always at least one token)
        keep = order[: int(np.searchsorted(cumulative, params.top_p)) + 1]
        filtered = np.zeros_like(probs)
        filtered[keep] = probs[keep]
        probs = filtered / filtered.sum()
    return probs


def sample(logits: np.ndarray, params: SamplingParams, rng: np.random.Generator) -> int:
    if params.temperature == 0.0:
        return int(np.argmax(logits))
    probs = logits_to_probs(logits, params)
    return int(rng.choice(probs.size, p=probs))
