"""Rotary position embedding and causal attention over the KV cache."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .blocks import FAST, widen
from .simd import NATIVE_F16, half_to_f32

# The KV cache's element types: "f16" (IEEE halves carried as uint16 bits, as f16 weights are:
# numba has no float16 on the CPU) halves the bytes a long context holds and attention streams;
# "f32" keeps keys and values as computed; "q8" stores int8 codes with a float32 scale per block
# of kv_q8_block(head_dim) channels of a position (llama.cpp's q8_0 idea: 1.125 bytes an element
# at blocks of 32, 0.56x of f16), for a long context under a tight DRAM cap.
KV_DTYPES = {"f16": np.uint16, "f32": np.float32, "q8": np.int8}
KV_Q8_MAX_BLOCK = 32


def kv_q8_block(head_dim: int) -> int:
    """Channels sharing a scale in a q8 KV cache: 32 (q8_0's block) where it divides head_dim, else
    the whole head, so a block never spans two heads (attention scales per head and block)."""
    return KV_Q8_MAX_BLOCK if head_dim % KV_Q8_MAX_BLOCK == 0 else head_dim


class LayerKV(NamedTuple):
    """One layer's KV cache. k_t: keys transposed [kv_dim, ctx] (attention's scores run along
    positions); v: values [ctx, kv_dim]; both in the cache's element type (KV_DTYPES). A q8 cache's
    scales: k_scale [kv_dim / block, ctx], v_scale [ctx, kv_dim / block] (block: kv_q8_block);
    float32 [0, 0] for f16 and f32 caches, which is how the kernels tell q8 apart."""
    k_t: np.ndarray
    v: np.ndarray
    k_scale: np.ndarray
    v_scale: np.ndarray


def layer_kv(k_t: np.ndarray, v: np.ndarray, head_dim: int) -> LayerKV:
    """A LayerKV over caches k_t / v, with scale arrays when they are q8 (int8)."""
    if k_t.dtype != np.int8:
        none = np.zeros((0, 0), np.float32)
        return LayerKV(k_t, v, none, none)
    per_head = head_dim // kv_q8_block(head_dim)
    n_blocks = k_t.shape[0] // head_dim * per_head
    return LayerKV(k_t, v, np.zeros((n_blocks, k_t.shape[1]), np.float32), np.zeros((v.shape[0], n_blocks), np.float32))


@njit(cache=True, nogil=True)
def rope(x, positions, inv_freq, head_dim):
    """Rotate each head of x [T, n_heads*head_dim] in place, HF's rotate_half convention:
    element i pairs with i + head_dim/2. Angles in float64 for accuracy at long positions."""
    rope_qk(x, x[:, :0], positions, inv_freq, head_dim)


@njit(cache=True, nogil=True)  # no fastmath: a * c - b * s rounded as HF's (no contraction into an FMA)
def rope_qk(q, k, positions, inv_freq, head_dim):
    """rope of q and of k at the same positions: a token's cosines and sines computed once (in
    float64, stored as float32) for both, then each head rotated along contiguous halves (with
    the heads innermost, the loop stayed scalar: 9 ns a rotation; 2026-12-07)."""
    half = head_dim // 2
    c = np.empty(half, np.float32)
    s = np.empty(half, np.float32)
    for t in range(q.shape[0]):
        for i in range(half):
            angle = positions[t] * inv_freq[i]
            c[i] = np.float32(np.cos(angle))
            s[i] = np.float32(np.sin(angle))
        _rotate_heads(q[t], c, s, half)
        _rotate_heads(k[t], c, s, half)


@njit(nogil=True)
def _rotate_heads(row, c, s, half):
    """Every head of one token's row, rotated by the angles of cosines c and sines s."""
    for h in range(row.shape[0] // (2 * half)):
        a = row[2 * h * half : (2 * h + 1) * half]
        b = row[(2 * h + 1) * half : (2 * h + 2) * half]
        for i in range(half):
            x, y = a[i], b[i]
            a[i] = x * c[i] - y * s[i]
            b[i] = y * c[i] + x * s[i]


_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two (Cody-Waite): n * hi is exact
_LN2_LO = np.float32(-2.12194440e-4)


@njit(fastmath=FAST)
def exp_nonpositive(x):
    """exp(x) for x <= 0 (a softmax's scores minus their max), 2 ulp, in plain arithmetic so a
    loop over scores vectorises: np.exp stays a scalar call per score (no vector math library
    in numba here), which was a third of prefill attention. 2**n is built in the exponent bits;
    below -87 (exp underflows float32) it is 0."""
    x = max(x, np.float32(-87.0))
    n = np.floor(x * _LOG2E + np.float32(0.5))
    r = (x - n * _LN2_HI) - n * _LN2_LO  # |r| <= ln2 / 2
    p = np.float32(1.0 / 5040.0)
    p = p * r + np.float32(1.0 / 720.0)
    p = p * r + np.float32(1.0 / 120.0)
    p = p * r + np.float32(1.0 / 24.0)
    p = p * r + np.float32(1.0 / 6.0)
    p = p * r + np.float32(0.5)
    p = p * r + np.float32(1.0)
    p = p * r + np.float32(1.0)
    scale = (np.int32(n) + np.int32(127)) << np.int32(23)
    return p * np.int32(scale).view(np.float32)


@njit(nogil=True)  # no fastmath: the subnormal path's float add must round as written
def f16_bits(x):
    """float32 x rounded to the nearest IEEE half (ties to even), as its uint16 bits; overflow
    gives inf, NaN stays NaN (Giesen's float_to_half_fast3_rtne, integer arithmetic only, so it
    needs no F16C). Equal to numpy's astype(float16) for every float32 (tested)."""
    bits = np.float32(x).view(np.uint32)
    sign = np.uint32(bits & np.uint32(0x80000000))
    u = np.uint32(bits ^ sign)  # |x|; numba widens integer arithmetic to 64 bits: cast back
    if u >= np.uint32(143 << 23):  # >= 65536 before rounding: inf, or NaN
        o = np.uint32(0x7E00) if u > np.uint32(0x7F800000) else np.uint32(0x7C00)
    elif u < np.uint32(113 << 23):  # a half's subnormal range: the float add rounds the mantissa
        magic = np.uint32(126 << 23)  # 0.5: its ulp is a half subnormal's
        f = np.float32(u.view(np.float32) + magic.view(np.float32))
        o = np.uint32(f.view(np.uint32) - magic)
    else:
        odd = np.uint32((u >> np.uint32(13)) & np.uint32(1))
        o = np.uint32(np.uint32(u + np.uint32(((15 - 127) << 23) + 0xFFF) + odd) >> np.uint32(13))
    return np.uint16(o | (sign >> np.uint32(16)))


def kv_value(x, cache):
    """x as an element of the KV cache `cache` (pure-Python form, NUMBA_DISABLE_JIT=1)."""
    if cache.dtype == np.uint16:
        return np.float32(x).astype(np.float16).view(np.uint16)
    return np.float32(x)


@overload(kv_value)
def _kv_value_jit(x, cache):
    if cache.dtype == types.uint16:
        return lambda x, cache: f16_bits(x)
    return lambda x, cache: np.float32(x)


def kv_float(element):
    """A KV cache element as float32 (pure-Python form, NUMBA_DISABLE_JIT=1)."""
    return widen(element)


@overload(kv_float)
def _kv_float_jit(element):
    if element != types.uint16:
        return lambda element: element
    if NATIVE_F16:  # fpext: loops over a row vectorise into vcvtph2ps, one per 8
        return lambda element: half_to_f32(element)
    return lambda element: widen(element)  # integer arithmetic, vectorises too (blocks.widen)


@njit(cache=True, nogil=True)
def store_kv(k, v, kv, start):
    """kv.k_t[:, start + t] = k[t] and kv.v[start + t] = v[t] (kv: a LayerKV): the new tokens' keys
    into the transposed cache, their values into the row-major one, in the caches' element type;
    q8 ones as codes round(x * 127 / amax) with scale amax / 127 per block (q8_0's rounding)."""
    if kv.k_scale.shape[0]:
        block = k.shape[1] // kv.k_scale.shape[0]
        for t in range(k.shape[0]):
            for b in range(kv.k_scale.shape[0]):
                kv.k_scale[b, start + t] = _quantize_block(k[t, b * block : (b + 1) * block], kv.k_t[b * block : (b + 1) * block, start + t])
                kv.v_scale[start + t, b] = _quantize_block(v[t, b * block : (b + 1) * block], kv.v[start + t, b * block : (b + 1) * block])
        return
    for t in range(k.shape[0]):
        for c in range(k.shape[1]):
            kv.k_t[c, start + t] = kv_value(k[t, c], kv.k_t)
        for c in range(v.shape[1]):
            kv.v[start + t, c] = kv_value(v[t, c], kv.v)


@njit(nogil=True)
def _quantize_block(x, codes):
    """codes[i] = round(x[i] / scale) in -127..127, scale = max |x| / 127 (0 for an all-zero
    block); returns the scale."""
    top = np.float32(0.0)
    for i in range(x.shape[0]):
        top = max(top, abs(x[i]))
    scale = top / np.float32(127.0)
    inv = np.float32(127.0) / top if top > 0 else np.float32(0.0)
    for i in range(x.shape[0]):
        codes[i] = np.int8(np.rint(x[i] * inv))
    return scale


def kv_block(cache_block, scale_block, axis: int):
    """A block of the KV cache as a float32 array for BLAS (a copy when the cache is f16 or q8;
    a q8 block's scales repeat along `axis`, its channels)."""
    if cache_block.dtype == np.uint16:
        return cache_block.view(np.float16).astype(np.float32)
    if cache_block.dtype == np.int8:
        block = cache_block.shape[axis] // scale_block.shape[axis]
        return cache_block.astype(np.float32) * np.repeat(scale_block, block, axis=axis)
    return cache_block


@njit(fastmath=FAST)
def _attend_group(q, kv, t, g, start, n_rep, head_dim, window, scale, scores, partial, acc, out):
    """out[t, heads of KV group g] for query t at position start + t: the group's n_rep query
    heads (GQA) together, so each key and value row is loaded once for all of them. kv: the
    layer's LayerKV; scores: float32 scratch [>= n_rep, >= ctx]; partial: float32 scratch
    [n_rep, >= ctx] for a q8 cache (a block's partial scores before its scales), else unused;
    acc: float32 scratch [>= n_rep * head_dim]. An f16 cache's elements are widened where they
    are used (kv_float: vcvtph2ps in the vector loop; widening rows into a scratch first cost
    0.64-0.8x of float32's time at SmolLM2's head_dim 64, in place it is 1.1-1.9x faster than
    float32, 2026-12-07). Every inner loop runs over a contiguous 1-D row (a key row along
    positions, a value row along head_dim): with 2-D indexing inside, LLVM left the old per-head
    loop scalar (0.6 us a position)."""
    pos = start + t
    lo = max(0, pos - window + 1) if window > 0 else 0
    n = pos + 1 - lo
    ko = g * head_dim
    h0 = g * n_rep
    for r in range(n_rep):
        row = scores[r]
        for j in range(n):
            row[j] = 0.0
    # the keys are stored transposed ([kv_dim, ctx]): each step adds one query element times a
    # row of positions, so the loop runs along positions in vectors with no reduction per score
    if kv.k_scale.shape[0]:
        _q8_scores(q, kv, t, ko, h0, n_rep, head_dim, lo, n, scale, scores, partial)
    else:
        for d in range(head_dim):
            keys = kv.k_t[ko + d, lo : pos + 1]
            for r in range(n_rep):
                qd = q[t, (h0 + r) * head_dim + d] * scale
                row = scores[r]
                for j in range(n):
                    row[j] += qd * kv_float(keys[j])
    for r in range(n_rep):
        row = scores[r]
        top = np.float32(-3.0e38)
        for j in range(n):
            top = max(top, row[j])
        total = np.float32(0.0)
        for j in range(n):
            e = exp_nonpositive(row[j] - top)
            row[j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(n):
            row[j] *= inv
    width = n_rep * head_dim
    for i in range(width):
        acc[i] = 0.0
    if kv.v_scale.shape[0]:
        _q8_values(kv, ko, n_rep, head_dim, lo, n, scores, acc)
    else:
        for j in range(n):
            values = kv.v[lo + j, ko : ko + head_dim]
            for r in range(n_rep):
                p = scores[r, j]
                base = r * head_dim
                for d in range(head_dim):
                    acc[base + d] += p * kv_float(values[d])
    for i in range(width):
        out[t, h0 * head_dim + i] = acc[i]


@njit(fastmath=FAST)
def _q8_scores(q, kv, t, ko, h0, n_rep, head_dim, lo, n, scale, scores, partial):
    """scores[r, :n] += the group's queries . q8 keys at positions lo..lo+n-1: per block of
    channels the codes' dot products along positions (as the float path), then times the
    block's scale at each position."""
    block = kv.k_t.shape[0] // kv.k_scale.shape[0]
    for b0 in range(0, head_dim, block):
        for r in range(n_rep):
            part = partial[r]
            for j in range(n):
                part[j] = 0.0
        for d in range(b0, b0 + block):
            keys = kv.k_t[ko + d, lo : lo + n]
            for r in range(n_rep):
                qd = q[t, (h0 + r) * head_dim + d] * scale
                part = partial[r]
                for j in range(n):
                    part[j] += qd * np.float32(keys[j])
        block_scale = kv.k_scale[(ko + b0) // block, lo : lo + n]
        for r in range(n_rep):
            row = scores[r]
            part = partial[r]
            for j in range(n):
                row[j] += part[j] * block_scale[j]


@njit(fastmath=FAST)
def _q8_values(kv, ko, n_rep, head_dim, lo, n, scores, acc):
    """acc[r * head_dim + d] += weight of position j x its q8 value: each position's value row
    widened and scaled into a float32 row once, then added to every query head's sum (folding
    the scale into each weight per block left 32-element loops that ran 7x slower, 2026-12-07)."""
    block = kv.v.shape[1] // kv.v_scale.shape[1]
    per_head = head_dim // block
    row = np.empty(head_dim, np.float32)
    for j in range(n):
        values = kv.v[lo + j, ko : ko + head_dim]
        scales = kv.v_scale[lo + j, ko // block : ko // block + per_head]
        for b in range(per_head):
            s = scales[b]
            codes = values[b * block : (b + 1) * block]
            widened = row[b * block : (b + 1) * block]
            for d in range(block):
                widened[d] = s * np.float32(codes[d])
        for r in range(n_rep):
            p = scores[r, j]
            out = acc[r * head_dim : (r + 1) * head_dim]
            for d in range(head_dim):
                out[d] += p * row[d]


@njit(cache=True, nogil=True, fastmath=FAST)
def attention_serial(q, kv, start, n_kv_heads, head_dim, window, scores, out):
    """Causal (optionally sliding-window) attention of T queries at positions start..start+T-1
    over cache positions 0..start+T-1. q/out [T, n_heads*head_dim]; kv the layer's LayerKV (keys
    transposed [n_kv*head_dim, ctx], store_kv writes them; values [ctx, n_kv*head_dim]; float32,
    f16 bits or q8 codes with their scales, KV_DTYPES); `scores` scratch [n_heads, >= ctx].
    window 0 means none; else query p sees p-window+1..p. Query head h reads KV head
    h // (n_heads / n_kv_heads) (GQA)."""
    n_heads = q.shape[1] // head_dim
    n_rep = n_heads // n_kv_heads
    scale = np.float32(1.0 / np.sqrt(head_dim))
    acc = np.empty(n_rep * head_dim, np.float32)
    partial = np.empty((n_rep if kv.k_scale.shape[0] else 0, scores.shape[1]), np.float32)
    for t in range(q.shape[0]):
        for g in range(n_kv_heads):
            _attend_group(q, kv, t, g, start, n_rep, head_dim, window, scale, scores, partial, acc, out)


# parallel over KV heads: a prefill chunk's attention (64 tokens over a growing context) or a long
# context's decode step; short decode steps run attention_serial (attention_for)
@njit(cache=True, nogil=True, fastmath=FAST, parallel=True)
def attention(q, kv, start, n_kv_heads, head_dim, window, scores, out):
    """attention_serial on all cores (the same arguments; scores rows n_rep per KV head)."""
    n_heads = q.shape[1] // head_dim
    n_rep = n_heads // n_kv_heads
    scale = np.float32(1.0 / np.sqrt(head_dim))
    for g in prange(n_kv_heads):
        acc = np.empty(n_rep * head_dim, np.float32)
        partial = np.empty((n_rep if kv.k_scale.shape[0] else 0, scores.shape[1]), np.float32)
        group_scores = scores[g * n_rep : (g + 1) * n_rep]
        for t in range(q.shape[0]):
            _attend_group(q, kv, t, g, start, n_rep, head_dim, window, scale, group_scores, partial, acc, out)


# query tokens x positions x q_dim from which attention runs on all cores, over KV heads:
# SmolLM2's decode (9 heads over 3 KV heads) at 200 positions 22 us serial, 15 parallel; at 56
# positions 5.9 serial, 6.8 parallel (/tmp measurement, 2-core EPYC)
ATTENTION_PARALLEL_MIN_WORK = 1 << 16


def attention_for(n_tokens: int, n_positions: int, q_dim: int):
    """attention_blas for a prefill chunk, else attention (all cores) or attention_serial by
    the multiply-adds of the step."""
    if n_tokens >= ATTENTION_BLAS_MIN_TOKENS:
        return attention_blas
    return attention if n_tokens * n_positions * q_dim >= ATTENTION_PARALLEL_MIN_WORK else attention_serial


@njit(cache=True, nogil=True, fastmath=FAST, error_model="numpy")
def causal_softmax(s, start, n_tokens, window, scale):
    """s [rows, positions] <- softmax(scale * s) per row over the keys its query sees, 0 elsewhere:
    row r is token r % n_tokens (query head-major rows) at position start + r % n_tokens, which
    sees keys pos - window < key <= pos (every key <= pos when window is 0). One compiled pass
    a step where numpy's mask, max, subtract, exp, sum and divide took six over the whole matrix
    (SmolLM2's prefill attention was 40% of a 512-token prompt; 2026-12-07)."""
    for r in range(s.shape[0]):
        pos = start + r % n_tokens
        lo = max(0, pos - window + 1) if window > 0 else 0
        row = s[r]
        seen = row[lo : pos + 1]  # indexed from 0: with row[j] for j from lo the loops stayed scalar (4x)
        top = seen[seen.shape[0] - 1]
        for j in range(seen.shape[0]):
            top = max(top, seen[j])
        total = np.float32(0.0)
        for j in range(seen.shape[0]):
            e = exp_nonpositive((seen[j] - top) * scale)
            seen[j] = e
            total += e
        inv = np.float32(1.0) / total
        for j in range(seen.shape[0]):
            seen[j] *= inv
        row[:lo] = 0.0
        row[pos + 1 :] = 0.0


def attention_blas(q, kv, start, n_kv_heads, head_dim, window, scores, out):
    """The same attention through BLAS, for a prefill chunk: per KV head, the scores of all
    its query heads' tokens are one matrix product with the transposed keys, the output one
    with the values (numpy's sgemm; the numba loop ran prefill attention at ~2 GMAC/s on 2
    cores). `scores`: float32 scratch [n_rep * T, >= start + T]; the softmax in one compiled
    pass (causal_softmax), masked keys weighted 0."""
    n_tokens = q.shape[0]
    n_positions = start + n_tokens
    n_heads = q.shape[1] // head_dim
    n_rep = n_heads // n_kv_heads
    scale = np.float32(1.0 / np.sqrt(head_dim))
    per_head = kv.k_scale.shape[0] // n_kv_heads  # q8 scale blocks of a head (0 for f16 and f32)
    if not scores.flags.c_contiguous:  # its flat view below would be a copy
        raise ValueError("attention_blas: the scores scratch must be C-contiguous")
    for g in range(n_kv_heads):
        cols = slice(g * n_rep * head_dim, (g + 1) * n_rep * head_dim)
        # rows: query head-major (head 0's tokens, then head 1's ...), as the group's scores
        q_group = q[:, cols].reshape(n_tokens, n_rep, head_dim).transpose(1, 0, 2).reshape(n_rep * n_tokens, head_dim)
        # a contiguous [rows, positions] view of the scratch: causal_softmax's loops vectorise over C rows
        s = scores.reshape(-1)[: n_rep * n_tokens * n_positions].reshape(n_rep * n_tokens, n_positions)
        np.matmul(q_group, kv_block(kv.k_t[g * head_dim : (g + 1) * head_dim, :n_positions],
                                    kv.k_scale[g * per_head : (g + 1) * per_head, :n_positions], 0), out=s)
        causal_softmax(s, start, n_tokens, window, scale)
        o = s @ kv_block(kv.v[:n_positions, g * head_dim : (g + 1) * head_dim],
                         kv.v_scale[:n_positions, g * per_head : (g + 1) * per_head], 1)
        out[:, cols] = o.reshape(n_rep, n_tokens, head_dim).transpose(1, 0, 2).reshape(n_tokens, n_rep * head_dim)


# query tokens from which attention goes through BLAS (a prefill chunk); below, the numba kernels
ATTENTION_BLAS_MIN_TOKENS = 8
