"""Rotary position embedding and causal attention over the KV cache."""

from __future__ import annotations

import numpy as np
from numba import njit

from .blocks import FAST


@njit(cache=True, nogil=True)
def rope(x, positions, inv_freq, head_dim):
    """Rotate each head of x [T, n_heads*head_dim] in place, HF's rotate_half convention:
    element i pairs with i + head_dim/2. Angles in float64 for accuracy at long positions."""
    half = head_dim // 2
    n_heads = x.shape[1] // head_dim
    for t in range(x.shape[0]):
        for i in range(half):
            angle = positions[t] * inv_freq[i]
            c = np.float32(np.cos(angle))
            s = np.float32(np.sin(angle))
            for h in range(n_heads):
                base = h * head_dim
                a = x[t, base + i]
                b = x[t, base + i + half]
                x[t, base + i] = a * c - b * s
                x[t, base + i + half] = b * c + a * s


@njit(cache=True, nogil=True, fastmath=FAST)
def attention(q, k_cache, v_cache, start, n_kv_heads, head_dim, window, scores, out):
    """Causal (optionally sliding-window) attention of T queries at positions start..start+T-1
    over the cache rows 0..start+T-1. q/out [T, n_heads*head_dim]; caches [ctx, n_kv*head_dim];
    `scores` is scratch of length >= ctx. window 0 means none; else query p sees p-window+1..p.
    Query head h reads KV head h // (n_heads / n_kv_heads) (GQA)."""
    n_heads = q.shape[1] // head_dim
    n_rep = n_heads // n_kv_heads
    scale = np.float32(1.0 / np.sqrt(head_dim))
    for t in range(q.shape[0]):
        pos = start + t
        lo = max(0, pos - window + 1) if window > 0 else 0
        for h in range(n_heads):
            qo = h * head_dim
            ko = (h // n_rep) * head_dim
            top = np.float32(-3.0e38)
            for j in range(lo, pos + 1):
                acc = np.float32(0.0)
                for d in range(head_dim):
                    acc += q[t, qo + d] * k_cache[j, ko + d]
                acc *= scale
                scores[j] = acc
                top = max(top, acc)
            total = np.float32(0.0)
            for j in range(lo, pos + 1):
                e = np.exp(scores[j] - top)
                scores[j] = e
                total += e
            for d in range(head_dim):
                out[t, qo + d] = 0.0
            for j in range(lo, pos + 1):
                p = scores[j] / total
                for d in range(head_dim):
                    out[t, qo + d] += p * v_cache[j, ko + d]
