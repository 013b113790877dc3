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
_F16_MIN_NORMAL = np.float32(2.0**-14)  # a half's smallest normal


def widen(v):
    """A weight element as float32 (pure-Python form, used when NUMBA_DISABLE_JIT=1)."""
    if isinstance(v, np.uint16):
        return np.float32(v.view(np.float16))
    return np.float32(v)


@overload(widen)
def _widen_jit(v):
    if isinstance(v, types.Integer) and v.bitwidth == 16 and not v.signed:

        def widen_f16_bits(v):
            # Exact, by Giesen's branch-free method: the exponent rebiased (15 -> 127) by an
            # integer add; inf/NaN and zero/subnormals fixed up by selects (subnormals are
            # renormalised by subtracting 2**-14, a small constant, harmless under reassociation),
            # so loops over f16 weights still vectorise. Not the shorter `bits * 2**112` multiply:
            # under fastmath 'reassoc' LLVM folded that constant into neighbouring products
            # (coef * -8 * 2**112 = coef * -4.2e34), which overflowed to inf once |coef| > 8e3: a
            # ReLU FFN row with h = -14337 turned a whole q4 down-projection into inf.
            h = np.uint32(v)
            magnitude = np.uint32((h & np.uint32(0x7FFF)) << np.uint32(13))
            exponent = np.uint32(magnitude & np.uint32(0x0F800000))
            special = exponent == np.uint32(0x0F800000)  # inf / NaN: all-ones exponent
            small = exponent == np.uint32(0)
            rebias = np.uint32(224 << 23) if special else (np.uint32(113 << 23) if small else np.uint32(112 << 23))
            unsigned_bits = np.uint32(magnitude + rebias)
            normalised = unsigned_bits.view(np.float32)
            value = np.float32(normalised - _F16_MIN_NORMAL) if small else normalised
            return -value if h & np.uint32(0x8000) else value

        return widen_f16_bits
    return lambda v: np.float32(v)


def _is_float_weight(dtype) -> bool:
    """float32 values, or float16 carried as uint16 bits."""
    return dtype == types.float32 or (isinstance(dtype, types.Integer) and dtype.bitwidth == 16 and not dtype.signed)


def prepare_input(w, x, group):
    """(x laid out as the row kernels of w's scheme read it, per-group sums of x [T, groups]).

    For q4/q4a the kernels read x deinterleaved within each group (the group's even elements,
    then its odd ones) so that a byte's low and high nibbles meet contiguous x and the nibble
    loop vectorises; the group sums turn the nibble offset (q4) or the min (q4a) into one
    multiply per group. Other schemes read x as it is. Pure-Python form: x as it is, and the
    Python row_dot / row_values below read it so."""
    return x, np.zeros((x.shape[0], 0), np.float32)


def row_dot(w, scales, mins, group, r, x, xs, t):
    """sum_k value(w[r, k]) * x[t, k] for any store scheme, x and xs from prepare_input
    (pure-Python form for NUMBA_DISABLE_JIT=1)."""
    from storage import quant

    return np.float32(np.dot(_dequant_row(w, scales, mins, group, r, quant), x[t]))


def row_values(w, scales, mins, group, r, out):
    """out[:] = value(w[r, :]) as float32, in the element order prepare_input gives x (pure-Python form)."""
    from storage import quant

    out[:] = _dequant_row(w, scales, mins, group, r, quant)


def row_axpy(w, scales, mins, group, r, coef, out, t):
    """out[t, k] += coef * value(w[r, k]) (pure-Python form)."""
    from storage import quant

    out[t] += coef * _dequant_row(w, scales, mins, group, r, quant)


def _dequant_row(w, scales, mins, group, r, quant):
    if w.dtype == np.float32 or w.dtype == np.uint16:
        return w[r].view(np.float16).astype(np.float32) if w.dtype == np.uint16 else w[r]
    scheme = "q8" if w.dtype == np.int8 else ("q4a" if mins.shape[1] else "q4")
    k = w.shape[1] * (1 if scheme == "q8" else 2)
    qt = quant.QuantizedTensor(scheme, group, (1, k), w[r : r + 1], scales[r : r + 1].view(np.float16),
                               mins[r : r + 1].view(np.float16) if scheme == "q4a" else None)
    return quant.dequantize(qt)[0]


@overload(prepare_input)
def _prepare_input_jit(w, x, group):
    if w.dtype == types.uint8:

        def prepare_q4(w, x, group):
            half = group // 2
            n_groups = x.shape[1] // group
            xp = np.empty_like(x)
            xs = np.empty((x.shape[0], n_groups), np.float32)
            for t in range(x.shape[0]):
                for g in range(n_groups):
                    base = g * group
                    total = np.float32(0.0)
                    for j in range(half):
                        xp[t, base + j] = x[t, base + 2 * j]
                        xp[t, base + half + j] = x[t, base + 2 * j + 1]
                        total += x[t, base + 2 * j] + x[t, base + 2 * j + 1]
                    xs[t, g] = total
            return xp, xs

        return prepare_q4
    return lambda w, x, group: (x, np.zeros((x.shape[0], 0), np.float32))


@overload(row_dot)
def _row_dot_jit(w, scales, mins, group, r, x, xs, t):
    if _is_float_weight(w.dtype):

        def dot_float(w, scales, mins, group, r, x, xs, t):
            acc = np.float32(0.0)
            for k in range(x.shape[1]):
                acc += widen(w[r, k]) * x[t, k]
            return acc

        return dot_float
    if w.dtype == types.int8:

        def dot_q8(w, scales, mins, group, r, x, xs, t):
            acc = np.float32(0.0)
            for g in range(scales.shape[1]):
                base = g * group
                part = np.float32(0.0)
                for j in range(group):
                    part += np.float32(w[r, base + j]) * x[t, base + j]
                acc += part * widen(scales[r, g])
            return acc

        return dot_q8
    if w.dtype == types.uint8:

        def dot_q4(w, scales, mins, group, r, x, xs, t):
            # value = nibble * scale + min (q4: min = -8 * scale), so per group
            # sum value*x = scale * sum(nibble*x) + min * sum(x), sum(x) from prepare_input.
            # x is deinterleaved: byte j's low nibble meets x[base + j], its high one x[base + half + j].
            # The common group of 32 has a loop of its own with constant offsets: LLVM then turns
            # each group into whole vectors (with the group size a variable it did not, 1.9x slower).
            acc = np.float32(0.0)
            if group == 32:
                for g in range(scales.shape[1]):
                    qx = np.float32(0.0)
                    for j in range(16):
                        b = np.int32(w[r, g * 16 + j])
                        qx += (np.float32(b & np.int32(15)) * x[t, g * 32 + j]
                               + np.float32(b >> np.int32(4)) * x[t, g * 32 + 16 + j])
                    s = widen(scales[r, g])
                    m = widen(mins[r, g]) if mins.shape[1] else np.float32(-8.0) * s
                    acc += s * qx + m * xs[t, g]
                return acc
            half = group // 2
            for g in range(scales.shape[1]):
                qx = np.float32(0.0)
                for j in range(half):
                    b = np.int32(w[r, g * half + j])
                    qx += (np.float32(b & np.int32(15)) * x[t, g * group + j]
                           + np.float32(b >> np.int32(4)) * x[t, g * group + half + j])
                s = widen(scales[r, g])
                m = widen(mins[r, g]) if mins.shape[1] else np.float32(-8.0) * s
                acc += s * qx + m * xs[t, g]
            return acc

        return dot_q4


@overload(row_values)
def _row_values_jit(w, scales, mins, group, r, out):
    if _is_float_weight(w.dtype):

        def values_float(w, scales, mins, group, r, out):
            for k in range(out.shape[0]):
                out[k] = widen(w[r, k])

        return values_float
    if w.dtype == types.int8:

        def values_q8(w, scales, mins, group, r, out):
            for g in range(scales.shape[1]):
                s = widen(scales[r, g])
                for j in range(g * group, (g + 1) * group):
                    out[j] = s * np.float32(w[r, j])

        return values_q8
    if w.dtype == types.uint8:

        def values_q4(w, scales, mins, group, r, out):
            half = group // 2  # deinterleaved within each group, as prepare_input lays out x
            for g in range(scales.shape[1]):
                s = widen(scales[r, g])
                m = widen(mins[r, g]) if mins.shape[1] else np.float32(-8.0) * s
                for j in range(half):
                    b = np.int32(w[r, g * half + j])
                    out[g * group + j] = np.float32(b & np.int32(15)) * s + m
                    out[g * group + half + j] = np.float32(b >> np.int32(4)) * s + m

        return values_q4


@overload(row_axpy)
def _row_axpy_jit(w, scales, mins, group, r, coef, out, t):
    if _is_float_weight(w.dtype):

        def axpy_float(w, scales, mins, group, r, coef, out, t):
            for k in range(out.shape[1]):
                out[t, k] += coef * widen(w[r, k])

        return axpy_float
    if w.dtype == types.int8:

        def axpy_q8(w, scales, mins, group, r, coef, out, t):
            for g in range(scales.shape[1]):
                s = coef * widen(scales[r, g])
                for j in range(g * group, (g + 1) * group):
                    out[t, j] += s * np.float32(w[r, j])

        return axpy_q8
    if w.dtype == types.uint8:

        def axpy_q4(w, scales, mins, group, r, coef, out, t):
            half = group // 2
            for g in range(scales.shape[1]):
                s = widen(scales[r, g])
                m = widen(mins[r, g]) if mins.shape[1] else np.float32(-8.0) * s
                cs = coef * s
                cm = coef * m
                for j in range(half):
                    b = w[r, g * half + j]
                    k = g * group + 2 * j
                    out[t, k] += cs * np.float32(b & np.uint8(15)) + cm
                    out[t, k + 1] += cs * np.float32(b >> np.uint8(4)) + cm

        return axpy_q4


def add_unprepared(w, acc, group, out):
    """out += acc, where acc is in prepare_input's element order for w's scheme (pure-Python form: the same order)."""
    out += acc


@overload(add_unprepared)
def _add_unprepared_jit(w, acc, group, out):
    if w.dtype == types.uint8:

        def add_q4(w, acc, group, out):
            half = group // 2
            for t in range(out.shape[0]):
                for g in range(out.shape[1] // group):
                    base = g * group
                    for j in range(half):
                        out[t, base + 2 * j] += acc[t, base + j]
                        out[t, base + 2 * j + 1] += acc[t, base + half + j]

        return add_q4

    def add_same_order(w, acc, group, out):
        for t in range(out.shape[0]):
            for k in range(out.shape[1]):
                out[t, k] += acc[t, k]

    return add_same_order


# From this many tokens on, a q8/q4/f16 row is unpacked once into float32 and then dotted
# with every token: per-token unpacking made prefill 5-7x slower than f32 for q4.
ROW_REUSE_MIN_TOKENS = 4


@njit(cache=True, nogil=True, fastmath=FAST)
def _matmul_row(x, xs, w, scales, mins, group, bias, out, n, row):
    """out[:, n] for one weight row; `row` is float32 scratch [K] for unpacking it, or empty."""
    b = bias[n] if bias.shape[0] else np.float32(0.0)
    if row.shape[0]:
        row_values(w, scales, mins, group, n, row)
        for t in range(x.shape[0]):
            out[t, n] = _dot(row, x, t) + b
    else:
        for t in range(x.shape[0]):
            out[t, n] = row_dot(w, scales, mins, group, n, x, xs, t) + b


def unpacks_rows(w, n_tokens):
    """Whether a chunk of n_tokens unpacks each of w's rows once into float32 first: every
    scheme but float32 (q8/q4 codes, f16 bits), from ROW_REUSE_MIN_TOKENS tokens on (pure-Python form)."""
    return w.dtype != np.float32 and n_tokens >= ROW_REUSE_MIN_TOKENS


@overload(unpacks_rows)
def _unpacks_rows_jit(w, n_tokens):
    unpacks = w.dtype != types.float32  # decided at compile time, per dtype
    return lambda w, n_tokens: unpacks and n_tokens >= ROW_REUSE_MIN_TOKENS


@njit(fastmath=FAST)
def _dot(v, x, t):
    """sum_k v[k] * x[t, k]: an unpacked float32 row against one token."""
    acc = np.float32(0.0)
    for k in range(v.shape[0]):
        acc += v[k] * x[t, k]
    return acc


# parallel over output rows: bench/kernels.py measured 1.5-2.0x on 2 cores (decode and prefill).
@njit(cache=True, nogil=True, fastmath=FAST, parallel=True)
def matmul(x, w, scales, mins, group, bias, out):
    """out[t, n] = sum_k x[t, k] * value(w[n, k]) (+ bias[n]).

    w: float32, f16 bits (uint16), q8 (int8) or q4/q4a (uint8 nibbles) [N, K or K/2];
    scales/mins: f16 bits [N, K/group] (empty [0, 0] when unused); bias may be empty."""
    xp, xs = prepare_input(w, x, group)
    row_len = xp.shape[1] if unpacks_rows(w, x.shape[0]) else 0
    n_chunks = min(w.shape[0], 64)
    step = (w.shape[0] + n_chunks - 1) // n_chunks
    for c in prange(n_chunks):
        row = np.empty(row_len, np.float32)  # one per chunk: per-thread scratch
        for n in range(c * step, min(w.shape[0], (c + 1) * step)):
            _matmul_row(xp, xs, w, scales, mins, group, bias, out, n, row)


# The same without threads, for small matrices: a parallel region costs a few us when the
# cores are idle and whole scheduler time slices when another process holds a core (a
# 2-layer fixture decoded at 8 tok/s instead of 2000 beside a busy process). A function of
# its own, not njit(matmul.py_func): numba's on-disk cache keys entries by source name, line
# and signature, not by `parallel`, so the two variants overwrote each other's cache entries
# (each process recompiled, and a cached variant could be loaded as the other).
@njit(cache=True, nogil=True, fastmath=FAST)
def matmul_serial(x, w, scales, mins, group, bias, out):
    xp, xs = prepare_input(w, x, group)
    row = np.empty(xp.shape[1] if unpacks_rows(w, x.shape[0]) else 0, np.float32)
    for n in range(w.shape[0]):
        _matmul_row(xp, xs, w, scales, mins, group, bias, out, n, row)


# x rows * weight elements below which matmul_serial is used. A parallel region pays a wake-up
# and waits for its slowest thread: with the second core busy (a shared 2-core machine) the
# ~80 small regions of a decode step made it 4x slower (bench/sparse.py, 1B: 1.1 vs 4.7 tok/s).
# Decode matmuls of a layer (<= 16M elements) run serially; the lm_head and prefill chunks,
# where the work per region is large, run on all cores.
PARALLEL_MIN_WORK = 1 << 25


@njit(cache=True, nogil=True, fastmath=FAST)
def _ffn_row_range(x, lo, hi, up, up_s, up_m, gate, gate_s, gate_m, down, down_s, down_m, up_b, gate_b,
                   group, act, out):
    """out[t] += sum over rows lo..hi-1 of h_i * down_i (see ffn_rows)."""
    # up and gate share a scheme (the store quantizes a bundle as one), so one layout of x serves both
    xp, xs = prepare_input(up, x, group)
    if unpacks_rows(up, x.shape[0]):
        _ffn_rows_unpacked(xp, lo, hi, up, up_s, up_m, gate, gate_s, gate_m, down, down_s, down_m, up_b, gate_b,
                           group, act, out)
        return
    gated = gate.shape[0] > 0
    for r in range(lo, hi):
        for t in range(x.shape[0]):
            u = row_dot(up, up_s, up_m, group, r, xp, xs, t)
            g = row_dot(gate, gate_s, gate_m, group, r, xp, xs, t) if gated else np.float32(0.0)
            h = _neuron_output(u, g, r, up_b, gate_b, gated, act)
            if h != 0.0:
                row_axpy(down, down_s, down_m, group, r, h, out, t)


@njit(cache=True, nogil=True, fastmath=FAST)
def _ffn_rows_unpacked(xp, lo, hi, up, up_s, up_m, gate, gate_s, gate_m, down, down_s, down_m, up_b, gate_b,
                       group, act, out):
    """_ffn_row_range for a chunk of tokens: each row's up/gate/down unpacked once into float32
    and used for every token (a prefill chunk or calibration pass; per-token unpacking of q4
    made these 5x slower). Works in prepare_input's element order, converted back at the end."""
    dim = xp.shape[1]
    gated = gate.shape[0] > 0
    up_v = np.empty(dim, np.float32)
    gate_v = np.empty(dim if gated else 0, np.float32)
    down_v = np.empty(dim, np.float32)
    acc = np.zeros((xp.shape[0], dim), np.float32)  # in prepare_input's order
    for r in range(lo, hi):
        row_values(up, up_s, up_m, group, r, up_v)
        if gated:
            row_values(gate, gate_s, gate_m, group, r, gate_v)
        down_ready = False
        for t in range(xp.shape[0]):
            u = _dot(up_v, xp, t)
            g = _dot(gate_v, xp, t)  # gate_v is empty (g = 0) when not gated
            h = _neuron_output(u, g, r, up_b, gate_b, gated, act)
            if h != 0.0:
                if not down_ready:  # inactive rows (most, with ReLU) never unpack their down column
                    row_values(down, down_s, down_m, group, r, down_v)
                    down_ready = True
                for k in range(dim):
                    acc[t, k] += h * down_v[k]
    add_unprepared(up, acc, group, out)


@njit(cache=True, nogil=True, fastmath=FAST)
def ffn_rows(x, n_rows, up, up_s, up_m, gate, gate_s, gate_m, down, down_s, down_m, up_b, gate_b,
             group, act, out):
    """FFN over neuron rows 0..n_rows-1 of a bundle matrix (the store's row-column bundles,
    as component views): out[t] = sum_i h_i * down_i with h_i = act(gate_i.x) * (up_i.x)
    for gated FFNs (gate has rows) or act(up_i.x) otherwise. Rows with h_i == 0 (ReLU)
    cost no down-projection work. `out` is overwritten."""
    out[:, :] = 0.0
    _ffn_row_range(x, 0, n_rows, up, up_s, up_m, gate, gate_s, gate_m, down, down_s, down_m, up_b, gate_b,
                   group, act, out)


# Rows split into partial.shape[0] slices, one per thread, each summed into its own slice of
# `partial` [n_slices, T, dim] (caller-owned scratch), then reduced: the down-projection is
# a scatter into all of out, so threads cannot share it. bench/kernels.py measures the gain.
@njit(cache=True, nogil=True, fastmath=FAST, parallel=True)
def ffn_rows_parallel(x, n_rows, up, up_s, up_m, gate, gate_s, gate_m, down, down_s, down_m, up_b, gate_b,
                      group, act, partial, out):
    """ffn_rows with the rows split over threads; same result up to summation order."""
    n_slices = partial.shape[0]
    step = (n_rows + n_slices - 1) // n_slices
    for c in prange(n_slices):
        part = partial[c, : x.shape[0]]
        part[:, :] = 0.0
        _ffn_row_range(x, c * step, min(n_rows, (c + 1) * step), up, up_s, up_m, gate, gate_s, gate_m,
                       down, down_s, down_m, up_b, gate_b, group, act, part)
    for t in range(out.shape[0]):
        for k in range(out.shape[1]):
            acc = np.float32(0.0)
            for c in range(n_slices):
                acc += partial[c, t, k]
            out[t, k] = acc


@njit(fastmath=FAST)
def _neuron_output(u, g, r, up_b, gate_b, gated, act):
    """h of neuron r from its up and gate dot products: act(g + gate bias) * (u + up bias) for
    gated FFNs, act(u + up bias) otherwise (biases may be empty)."""
    if up_b.shape[0]:
        u += up_b[r]
    if not gated:
        return _activate(u, act)
    if gate_b.shape[0]:
        g += gate_b[r]
    return _activate(g, act) * u


@njit(fastmath=FAST)
def _activate(v, act):
    if act == ACT_SILU:
        return v / (np.float32(1.0) + np.exp(-v))
    return max(v, np.float32(0.0))


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


@njit(cache=True, nogil=True, fastmath=FAST)
def add_rows(out, w, scales, mins, group, rows):
    """out[t] += value(w[rows[t]]) for any store scheme: embedding lookup (into zeros) and
    OPT's learned positions."""
    for t in range(rows.shape[0]):
        row_axpy(w, scales, mins, group, rows[t], np.float32(1.0), out, t)
