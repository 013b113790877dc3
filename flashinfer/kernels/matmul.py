"""Dense matmuls over weight rows of any store scheme, and row lookups (embeddings).

out[t, n] = sum_k x[t, k] * value(w[n, k]) (+ bias[n]) with w row-major [out, in] as HF
stores it. A chunk of tokens is a rows x tokens tile: each weight row is read from DRAM once
and dotted with every token of the chunk while it sits in L1 (prefill), so the weights stream
once per chunk. q8/q4/q4a rows in groups of 32 take the integer dots of blocks.py against the
activations quantized once per call; f16 (and groups of 64) rows are widened once per row
into float32 scratch when a chunk has ROW_REUSE_MIN_TOKENS tokens, else dotted in place.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .blocks import (FAST, ROWS_PER_PASS, int_row_dot, int_rows_dot4, int_rows_dots, n_rows, prepare_input,
                     row_axpy, row_dot, row_scales, row_scratch, row_values, uses_int_dots)
from .lanes import ROWS as LANE_ROWS, lanes_row, lanes_rows
from .simd import prefetch_lines

PREFETCH_AHEAD = 4  # rows ahead whose lines are prefetched (simd.prefetch_lines)
# Row chunks of a parallel matmul, shared out among the threads: few, since a chunk's setup
# costs ~1 us (64 chunks cost more than SmolLM2's 576-row matmuls themselves), and a multiple of
# 2 cores and most thread counts.
PARALLEL_CHUNKS = 8

# From this many tokens on, an f16 row (or a q8/q4 row in groups of 64) is unpacked once into
# float32 and then dotted with every token: per-token unpacking made prefill 5-7x slower than f32.
ROW_REUSE_MIN_TOKENS = 4


def unpacks_rows(w, n_tokens, group):
    """Whether a chunk of n_tokens unpacks each of w's rows once into float32 first: float
    dots of f16 bits or quantized codes (not f32, not the integer dots), from
    ROW_REUSE_MIN_TOKENS tokens on (pure-Python form)."""
    return w.dtype != np.float32 and not uses_int_dots(w, group) and n_tokens >= ROW_REUSE_MIN_TOKENS


@overload(unpacks_rows)
def _unpacks_rows_jit(w, n_tokens, group):
    not_f32 = w.dtype != types.float32  # decided at compile time, per dtype
    return lambda w, n_tokens, group: not_f32 and not uses_int_dots(w, group) and n_tokens >= ROW_REUSE_MIN_TOKENS


@njit(fastmath=FAST)
def _dot(v, x, t):
    """sum_k v[k] * x[t, k]: an unpacked float32 row against one token."""
    acc = np.float32(0.0)
    for k in range(v.shape[0]):
        acc += v[k] * x[t, k]
    return acc


def _matmul_rows(prep, w, scales, mins, group, bias, out, lo, hi):
    """out[:, n] for weight rows lo..hi-1, x already laid out by prepare_input (`prep`): plain rows
    (_plain_rows), or rows in lanes (lanes.lanes_rows; lo and hi multiples of 8), chosen at
    compile time (pure-Python form: plain rows)."""
    _plain_rows(prep, w, scales, mins, group, bias, out, lo, hi)


@overload(_matmul_rows)
def _matmul_rows_jit(prep, w, scales, mins, group, bias, out, lo, hi):
    if w.ndim == 3:
        return lambda prep, w, scales, mins, group, bias, out, lo, hi: lanes_rows(prep, w, scales, mins, bias, out, lo, hi)
    return lambda prep, w, scales, mins, group, bias, out, lo, hi: _plain_rows(prep, w, scales, mins, group, bias, out, lo, hi)


@njit(cache=True, nogil=True, fastmath=FAST)
def _plain_rows(prep, w, scales, mins, group, bias, out, lo, hi):
    """_matmul_rows over plain rows [N, ...]."""
    xp, xs = prep[0], prep[1]
    n_tokens = xp.shape[0]
    if uses_int_dots(w, group):
        vals = np.empty((n_tokens if n_tokens > 1 else 0, ROWS_PER_PASS), np.float32)
        first = lo
        while first + ROWS_PER_PASS <= hi:  # four rows per pass over the activations
            for i in range(ROWS_PER_PASS, 2 * ROWS_PER_PASS):  # the next four rows (strided views)
                if first + i < hi:
                    prefetch_lines(w.ctypes.data + (first + i) * w.strides[0], w.shape[1])
            if n_tokens == 1:
                d0, d1, d2, d3 = int_rows_dot4(w, first, scales, mins, prep, 0)
                if bias.shape[0]:
                    d0, d1, d2, d3 = d0 + bias[first], d1 + bias[first + 1], d2 + bias[first + 2], d3 + bias[first + 3]
                out[0, first], out[0, first + 1], out[0, first + 2], out[0, first + 3] = d0, d1, d2, d3
            else:  # a chunk of tokens: tiles of four rows x four tokens
                int_rows_dots(w, first, scales, mins, prep, vals)
                for t in range(n_tokens):
                    for i in range(ROWS_PER_PASS):
                        out[t, first + i] = vals[t, i] + (bias[first + i] if bias.shape[0] else np.float32(0.0))
            first += ROWS_PER_PASS
        if first == hi:
            return
        ws, wm = row_scratch(w, mins, group, xp.shape[1])
        for n in range(first, hi):
            if n + PREFETCH_AHEAD < hi:  # strided rows (neuron-cache views) are not prefetched by the hardware
                prefetch_lines(w.ctypes.data + (n + PREFETCH_AHEAD) * w.strides[0], w.shape[1])
            row_scales(scales, mins, n, ws, wm)
            b = bias[n] if bias.shape[0] else np.float32(0.0)
            for t in range(n_tokens):
                out[t, n] = int_row_dot(w, n, ws, wm, prep, t) + b
        return
    row = np.empty(xp.shape[1] if unpacks_rows(w, n_tokens, group) else 0, np.float32)
    for n in range(lo, hi):
        b = bias[n] if bias.shape[0] else np.float32(0.0)
        if row.shape[0]:
            row_values(w, scales, mins, group, n, row)
            for t in range(n_tokens):
                out[t, n] = _dot(row, xp, t) + b
        else:
            for t in range(n_tokens):
                out[t, n] = row_dot(w, scales, mins, group, n, xp, xs, t) + b


# parallel over output rows: bench/kernels.py measured 1.5-2.0x on 2 cores (decode and prefill).
@njit(cache=True, nogil=True, fastmath=FAST, parallel=True)
def matmul(x, w, scales, mins, group, bias, out):
    """out[t, n] = sum_k x[t, k] * value(w[n, k]) (+ bias[n]).

    w: float32, f16 bits (uint16), q8 (int8) or q4/q4a (uint8 nibbles) [N, K or K/2], each
    row contiguous, or integer codes in lanes [N / 8, K / 32, 8 x 32 or 16] (kernels/lanes.py, weights.
    interleave_rows); scales/mins: f16 bits [N, K/group] (empty [0, 0] when unused; in lanes [N / 8,
    ...]); bias may be empty."""
    prep = prepare_input(w, x, group)
    rows = n_rows(w)
    step, n_chunks = _chunking(rows, PARALLEL_CHUNKS)  # chunks of whole passes
    for c in prange(n_chunks):
        _matmul_rows(prep, w, scales, mins, group, bias, out, c * step, min(rows, (c + 1) * step))


@njit(nogil=True)
def _chunking(rows, n_chunks):
    """(rows per chunk in whole passes of LANE_ROWS (rows in lanes; two passes of ROWS_PER_PASS
    plain rows), chunks) for `rows` rows in about n_chunks."""
    n_chunks = max(1, min(rows, n_chunks))
    step = (rows + n_chunks - 1) // n_chunks
    step = (step + LANE_ROWS - 1) // LANE_ROWS * LANE_ROWS
    return step, (rows + step - 1) // step


@njit(cache=True, nogil=True, fastmath=FAST, parallel=True)
def matmul3(x, a, a_bias, a_out, b, b_bias, b_out, c, c_bias, c_out):
    """matmul of one input with three matrices of one scheme and group (weights.Matrix tuples;
    attention's q, k and v): the input prepared once, and the rows of all three shared out
    among the threads in one parallel region (three regions of SmolLM2's 576- and 192-row
    products each waited for their slowest thread, and prepared the input again). A c_out of
    no columns skips c (matmul2)."""
    prep = prepare_input(a.data, x, a.group)
    a_rows, b_rows = n_rows(a.data), n_rows(b.data)
    total = a_rows + b_rows + c_out.shape[1]
    step = _chunking(total, PARALLEL_CHUNKS)[0]
    na = (a_rows + step - 1) // step
    nb = (b_rows + step - 1) // step
    nc = (c_out.shape[1] + step - 1) // step  # c's rows; none for matmul2's empty c_out
    for chunk in prange(na + nb + nc):
        if chunk < na:
            lo = chunk * step
            _matmul_rows(prep, a.data, a.scales, a.mins, a.group, a_bias, a_out, lo, min(a_rows, lo + step))
        elif chunk < na + nb:
            lo = (chunk - na) * step
            _matmul_rows(prep, b.data, b.scales, b.mins, b.group, b_bias, b_out, lo, min(b_rows, lo + step))
        else:
            lo = (chunk - na - nb) * step
            _matmul_rows(prep, c.data, c.scales, c.mins, c.group, c_bias, c_out, lo, min(c_out.shape[1], lo + step))


# The same without threads, for small matrices: a parallel region costs a few us when the
# cores are idle and whole scheduler time slices when another process holds a core (a
# 2-layer fixture decoded at 8 tok/s instead of 2000 beside a busy process). A function of
# its own, not njit(matmul.py_func): numba's on-disk cache keys entries by source name, line
# and signature, not by `parallel`, so the two variants overwrote each other's cache entries
# (each process recompiled, and a cached variant could be loaded as the other).
@njit(cache=True, nogil=True, fastmath=FAST)
def matmul_serial(x, w, scales, mins, group, bias, out):
    _matmul_rows(prepare_input(w, x, group), w, scales, mins, group, bias, out, 0, n_rows(w))


# Token rows x weights (multiply-adds) below which matmul_serial is used. A parallel region
# pays a wake-up (~5 us here) and waits for its slowest thread. One token, both cores against
# one (2026-12-02, /tmp/s2/thresh.py-style sweep, q4a and q8 rows of 32-blocks): [192, 576]
# 0.51-0.63x, [576, 576] 0.86-0.99x, [1536, 576] and [576, 1536] 1.30-1.41x, [2048, 2048]
# 1.72-1.77x. So 2**19: SmolLM2's 576 x 576 stays serial, its FFN's 1536 x 576 products
# (gate/up, and W_down's rows) and every larger matrix or prefill chunk run on all cores.
PARALLEL_MIN_WORK = 1 << 19


def matmul_for(n_tokens: int, n_rows: int, n_features: int):
    """matmul (all cores) or matmul_serial, by the multiply-adds of the product."""
    return matmul if n_tokens * n_rows * n_features >= PARALLEL_MIN_WORK else matmul_serial


@njit(nogil=True, fastmath=FAST)
def linear(x, m, bias, out):
    """out = x @ value(m).T + bias (m a weights.Matrix tuple): matmul_for's choice, from compiled code."""
    if x.shape[0] * n_rows(m.data) * x.shape[1] >= PARALLEL_MIN_WORK:
        matmul(x, m.data, m.scales, m.mins, m.group, bias, out)
    else:
        matmul_serial(x, m.data, m.scales, m.mins, m.group, bias, out)


@njit(nogil=True, fastmath=FAST)
def matmul2(x, a, a_bias, a_out, b, b_bias, b_out):
    """matmul3 of two matrices (an FFN's gate and up): one prepared input, one parallel region."""
    matmul3(x, a, a_bias, a_out, b, b_bias, b_out, b, b_bias, b_out[:, :0])


@njit(cache=True, nogil=True, fastmath=FAST)
def add_rows(out, w, scales, mins, group, rows):
    """out[t] += value(w[rows[t]]) for any store scheme: embedding lookup (into zeros) and
    OPT's learned positions (a tied lm_head's rows in lanes too: _any_row_axpy)."""
    for t in range(rows.shape[0]):
        _any_row_axpy(w, scales, mins, group, rows[t], np.float32(1.0), out, t)


def _any_row_axpy(w, scales, mins, group, r, coef, out, t):
    """row_axpy of plain rows, or of rows in lanes (row r gathered first), chosen at
    compile time (pure-Python form: plain rows)."""
    row_axpy(w, scales, mins, group, r, coef, out, t)


@overload(_any_row_axpy)
def _any_row_axpy_jit(w, scales, mins, group, r, coef, out, t):
    if w.ndim != 3:
        return lambda w, scales, mins, group, r, coef, out, t: row_axpy(w, scales, mins, group, r, coef, out, t)

    def gathered(w, scales, mins, group, r, coef, out, t):
        codes, row_scales, row_mins = lanes_row(w, scales, mins, r)
        row_axpy(codes, row_scales, row_mins, group, 0, coef, out, t)

    return gathered
