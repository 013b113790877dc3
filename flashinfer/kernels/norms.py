"""RMSNorm (Llama) and LayerNorm (OPT)."""

from __future__ import annotations

import numpy as np
from numba import njit

from .blocks import FAST


@njit(cache=True, nogil=True, fastmath=FAST)
def rmsnorm(x, weight, eps, out):
    """Llama RMSNorm: x / sqrt(mean(x^2) + eps) * weight. `out` may be `x`."""
    dim = x.shape[1]
    for t in range(x.shape[0]):
        ss = np.float32(0.0)
        for d in range(dim):
            ss += x[t, d] * x[t, d]
        inv = np.float32(1.0) / np.sqrt(ss / dim + np.float32(eps))
        for d in range(dim):
            out[t, d] = weight[d] * (x[t, d] * inv)


@njit(cache=True, nogil=True, fastmath=FAST)
def layernorm(x, weight, bias, eps, out):
    """LayerNorm with biased variance, as torch.nn.LayerNorm. `out` may be `x`."""
    dim = x.shape[1]
    for t in range(x.shape[0]):
        mean = np.float32(0.0)
        for d in range(dim):
            mean += x[t, d]
        mean /= dim
        var = np.float32(0.0)
        for d in range(dim):
            var += (x[t, d] - mean) * (x[t, d] - mean)
        inv = np.float32(1.0) / np.sqrt(var / dim + np.float32(eps))
        for d in range(dim):
            out[t, d] = (x[t, d] - mean) * inv * weight[d] + bias[d]
