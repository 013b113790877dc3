"""Slow numpy twins of the numba kernels in flashinfer/kernels.py (the spec they are tested against)."""

from __future__ import annotations

import numpy as np


def widen(w: np.ndarray) -> np.ndarray:
    """float32 weights as they are, uint16 as the bits of float16."""
    return w.view(np.float16).astype(np.float32) if w.dtype == np.uint16 else w.astype(np.float32)


def matmul(x, w, bias):
    y = x.astype(np.float64) @ widen(w).astype(np.float64).T
    return (y + bias if bias.size else y).astype(np.float32)


def quantized_activations(x):
    """x as the integer dots see it: int8 codes per block of 32, d = max|x| / 127, q = rint(x * 127 / max|x|),
    returned dequantized (q * d) in float64."""
    x = np.asarray(x, np.float32)
    blocks = x.reshape(x.shape[0], -1, 32)
    top = np.abs(blocks).max(axis=2, keepdims=True)
    d = top / np.float32(127.0)
    inv = np.divide(np.float32(127.0), top, out=np.zeros_like(top), where=top > 0)
    q = np.rint(blocks * inv)
    assert np.abs(q).max() <= 127
    return (q.astype(np.float64) * d.astype(np.float64)).reshape(x.shape)


def rmsnorm(x, weight, eps):
    x64 = x.astype(np.float64)
    return (weight * x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + eps)).astype(np.float32)


def layernorm(x, weight, bias, eps):
    x64 = x.astype(np.float64)
    mean = x64.mean(-1, keepdims=True)
    var = ((x64 - mean) ** 2).mean(-1, keepdims=True)
    return ((x64 - mean) / np.sqrt(var + eps) * weight + bias).astype(np.float32)


def rope(x, positions, inv_freq, head_dim):
    t, width = x.shape
    xh = x.reshape(t, width // head_dim, head_dim).astype(np.float64)
    angle = positions[:, None].astype(np.float64) * inv_freq[None, :]  # [T, half]
    cos, sin = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    a, b = xh[..., : head_dim // 2], xh[..., head_dim // 2 :]
    return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1).reshape(t, width).astype(np.float32)


def attention(q, k_cache, v_cache, start, n_kv_heads, head_dim, window):
    t_len, q_width = q.shape
    n_heads = q_width // head_dim
    n_rep = n_heads // n_kv_heads
    out = np.zeros_like(q, dtype=np.float64)
    for t in range(t_len):
        pos = start + t
        lo = max(0, pos - window + 1) if window else 0
        for h in range(n_heads):
            kv = h // n_rep
            qh = q[t, h * head_dim : (h + 1) * head_dim].astype(np.float64)
            k = k_cache[lo : pos + 1, kv * head_dim : (kv + 1) * head_dim].astype(np.float64)
            v = v_cache[lo : pos + 1, kv * head_dim : (kv + 1) * head_dim].astype(np.float64)
            s = k @ qh / np.sqrt(head_dim)
            p = np.exp(s - s.max())
            out[t, h * head_dim : (h + 1) * head_dim] = (p / p.sum()) @ v
    return out.astype(np.float32)


def silu(x):
    return x / (1.0 + np.exp(-x))


def gated_act(gate, up, act):
    g = silu(gate.astype(np.float64)) if act == 0 else np.maximum(gate, 0)
    return (g * up).astype(np.float32)


def ffn_coef(x, ids, coefs, thresholds, up, up_bias, down):
    """The gate-threshold FFN (kernels.ffn_rows_coef): out[t] = sum over rows r whose neuron
    n = ids[r] has |coefs[t, n]| > thresholds[n] of coefs[t, n] (up[r] . x[t] + b[r]) down[r]."""
    out = np.zeros((x.shape[0], down.shape[1]), np.float64)
    for r, n in enumerate(ids):
        for t in range(x.shape[0]):
            c = float(coefs[t, n])
            if abs(c) > thresholds[n]:
                u = float(up[r].astype(np.float64) @ x[t]) + (float(up_bias[r]) if up_bias.size else 0.0)
                out[t] += c * u * down[r]
    return out.astype(np.float32)
