"""Numba kernels of the dense forward pass.

Plain arrays in and out, results written into caller-owned buffers (nothing allocates per
token). Activations are float32 [T, features] with T tokens of a chunk; weight matrices are
row-major [out, in] as HF stores them, either float32 or float16 carried as its raw uint16
bits, widened in registers by `widen` (numba has no float16 type on the CPU). Every kernel
has a slow numpy twin in tests/reference.py that it is tested against.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

# fastmath without 'nnan'/'ninf': reassociation lets LLVM vectorise the reductions, and
# no kernel relies on IEEE specials (attention never builds -inf masks).
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
ACT_SILU = 0
ACT_RELU = 1
# 2**112 moves a half's exponent (bias 15) into a single's (bias 127); exact for normals and subnormals.
_F16_EXP_SHIFT = np.float32(2.0**112)


def widen(v):
    """A weight element as float32 (pure-Python form, used when NUMBA_DISABLE_JIT=1)."""
    if isinstance(v, np.uint16):
        return np.float32(v.view(np.float16))
    return np.float32(v)


@overload(widen, inline="always")
def _widen_jit(v):
    if isinstance(v, types.Integer) and v.bitwidth == 16 and not v.signed:

        def widen_f16_bits(v):
            h = np.uint32(v)
            magnitude = np.uint32((h & np.uint32(0x7FFF)) << np.uint32(13)).view(np.float32) * _F16_EXP_SHIFT
            return -magnitude if h & np.uint32(0x8000) else magnitude

        return widen_f16_bits
    return lambda v: np.float32(v)


# parallel over output rows: bench/kernels.py measured 1.5-2.0x on 2 cores (decode and prefill).
@njit(cache=True, nogil=True, fastmath=FAST, parallel=True)
def matmul(x, w, bias, out):
    """out[t, n] = sum_k x[t, k] * w[n, k] (+ bias[n]); w float32 or f16 bits; bias may be empty."""
    n_tokens, k_dim = x.shape
    for n in prange(w.shape[0]):
        b = bias[n] if bias.shape[0] else np.float32(0.0)
        for t in range(n_tokens):
            acc = np.float32(0.0)
            for k in range(k_dim):
                acc += widen(w[n, k]) * x[t, k]
            out[t, n] = acc + b


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


@njit(cache=True, nogil=True, fastmath=FAST)
def gated_act(gate, up, act):
    """gate <- act(gate) * up (SwiGLU-style FFN), act ACT_SILU or ACT_RELU."""
    for t in range(gate.shape[0]):
        for i in range(gate.shape[1]):
            g = gate[t, i]
            if act == ACT_SILU:
                g = g / (np.float32(1.0) + np.exp(-g))
            else:
                g = max(g, np.float32(0.0))
            gate[t, i] = g * up[t, i]


@njit(cache=True, nogil=True, fastmath=FAST)
def relu_(h):
    """h <- max(h, 0) in place."""
    for t in range(h.shape[0]):
        for i in range(h.shape[1]):
            h[t, i] = max(h[t, i], np.float32(0.0))


@njit(cache=True, nogil=True)
def embed(tokens, table, out):
    """out[t] = table[tokens[t]] as float32 (table float32 or f16 bits)."""
    for t in range(tokens.shape[0]):
        row = tokens[t]
        for d in range(out.shape[1]):
            out[t, d] = widen(table[row, d])


@njit(cache=True, nogil=True)
def add_rows(out, table, rows):
    """out[t] += table[rows[t]] (OPT's learned positions)."""
    for t in range(rows.shape[0]):
        for d in range(out.shape[1]):
            out[t, d] += widen(table[rows[t], d])
