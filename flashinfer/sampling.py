"""Sampling as small pure functions (gpt-fast style): logits -> probabilities -> token."""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral, Real

import numpy as np

from flashinfer.errors import GenerationError


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off

    @classmethod
    def checked(cls, temperature: float, top_k: int, top_p: float) -> "SamplingParams":
        """Validated params from caller values: a wrong type or range is a GenerationError
        naming the argument, not a numpy ValueError three calls later."""
        if not is_real(temperature):
            raise GenerationError(f"temperature must be a number >= 0 (0 = greedy), got {temperature!r}")
        if not is_int(top_k):
            raise GenerationError(f"top_k must be an integer >= 0 (0 = off), got {top_k!r}")
        if not is_real(top_p):
            raise GenerationError(f"top_p must be a number in (0, 1] (1 = off), got {top_p!r}")
        params = cls(float(temperature), int(top_k), float(top_p))
        params.validate()
        return params

    def validate(self) -> None:
        if not np.isfinite(self.temperature) or self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")


def is_int(value) -> bool:
    """An integer, numpy's included; not a bool (True is an int to Python, never a count here)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def check_seed(seed) -> int | None:
    if seed is not None and not (is_int(seed) and seed >= 0):
        raise GenerationError(f"seed must be a non-negative integer or None, got {seed!r}")
    return None if seed is None else int(seed)


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
