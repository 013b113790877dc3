"""The FFN over neuron rows of the store's bundles, and the dense FFN's activations.

A bundle row i holds neuron i's up row, gate row (gated FFNs) and down column, each a row of
`dim` weights in the bundle's scheme (storage/format.py); flashinfer/flash_ffn.py makes the
component views. Per neuron: h = act(gate.x) * (up.x) (or act(up.x)), then out += h * down.
With ReLU the gate decides first: an inactive neuron (most of them, in a ReLU model) costs
one dot, not two, and no down-projection work.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .blocks import (FAST, ROWS_PER_PASS, add_unprepared, flush_axpy4, int_row_dot, int_rows_dot4, int_rows_dots,
                     prepare_input, queue_axpy, row_axpy, row_dot, row_scales, row_scales_into, row_scratch, row_values,
                     uses_int_dots)
from .attention import exp_nonpositive
from .simd import prefetch_lines
from .matmul import _dot, linear, matmul2, unpacks_rows

ACT_SILU = 0
ACT_RELU = 1
ACT_GELU_TANH = 2  # GELU, tanh approximation (Gemma's gelu_pytorch_tanh)
ACTS = {"silu": ACT_SILU, "relu": ACT_RELU, "gelu_tanh": ACT_GELU_TANH}  # ModelArgs.act -> kernel code
EMPTY_BIAS = np.zeros(0, np.float32)  # the gate bias, once added by the caller
# Neurons ahead whose bundle rows are prefetched (flashinfer/kernels/simd.py, prefetch_lines):
# the dot over strided rows went 1.9 -> 1.2 ms for 2867 q8 rows of 4096 with 4 ahead.
PREFETCH_AHEAD = 2


@njit(fastmath=FAST)
def _activate(v, act):
    if act == ACT_SILU:
        return silu(v)
    if act == ACT_GELU_TANH:
        return gelu_tanh(v)
    return max(v, np.float32(0.0))


@njit(fastmath=FAST, error_model="numpy")  # no ZeroDivisionError branch: the loops over it vectorise
def gelu_tanh(v):
    """0.5 v (1 + tanh(sqrt(2/pi) (v + 0.044715 v^3))), torch's approximate="tanh"; tanh through
    exp of -2|y| in (0, 1] (attention.exp_nonpositive), as silu."""
    y = np.float32(0.7978845608028654) * (v + np.float32(0.044715) * v * v * v)
    e = exp_nonpositive(np.float32(-2.0) * abs(y))
    t = (np.float32(1.0) - e) / (np.float32(1.0) + e)
    return np.float32(0.5) * v * (np.float32(1.0) + (t if y >= 0 else -t))


@njit(fastmath=FAST, error_model="numpy")  # no ZeroDivisionError branch: the loops over it vectorise
def silu(v):
    """v * sigmoid(v), through exp of -|v| (attention.exp_nonpositive, plain arithmetic):
    numba's np.exp is a libm call per neuron, 7% of SmolLM2's decode FFN."""
    e = exp_nonpositive(-abs(v))  # exp(-|v|) in (0, 1]
    sigmoid = np.float32(1.0) / (np.float32(1.0) + e) if v >= 0 else e / (np.float32(1.0) + e)
    return v * sigmoid


@njit(cache=True, nogil=True, fastmath=FAST)
def _ffn_row_range(x, lo, hi, up, up_s, up_m, gate, gate_s, gate_m, down, down_s, down_m, up_b, gate_b,
                   group, act, out):
    """out[t] += sum over rows lo..hi-1 of h_i * down_i (see ffn_rows)."""
    # up and gate share a scheme (the store quantizes a bundle as one), so one layout of x serves both
    prep = prepare_input(up, x, group)
    n_tokens = x.shape[0]
    if unpacks_rows(up, n_tokens, group):
        _ffn_rows_unpacked(prep[0], lo, hi, up, up_s, up_m, gate, gate_s, gate_m, down, down_s, down_m, up_b,
                           gate_b, group, act, out)
        return
    if uses_int_dots(up, group):
        _ffn_rows_int(prep, lo, hi, up, up_s, up_m, gate, gate_s, gate_m, down, down_s, down_m, up_b, gate_b, group,
                      act, out)
        return
    gated = gate.shape[0] > 0
    for r in range(lo, hi):
        for t in range(n_tokens):
            g = np.float32(0.0)
            if gated:
                g = row_dot(gate, gate_s, gate_m, group, r, prep[0], prep[1], t)
                if gate_b.shape[0]:
                    g += gate_b[r]
                if act == ACT_RELU and g <= 0.0:
                    continue  # inactive: the up product is never needed
            u = row_dot(up, up_s, up_m, group, r, prep[0], prep[1], t)
            h = _neuron_output(u, g, r, up_b, EMPTY_BIAS, gated, act)
            if h != 0.0:
                row_axpy(down, down_s, down_m, group, r, h, out, t)


@njit(cache=True, nogil=True, fastmath=FAST)
def _ffn_rows_int(prep, lo, hi, up, up_s, up_m, gate, gate_s, gate_m, down, down_s, down_m, up_b, gate_b, group, act,
                  out):
    """_ffn_row_range for q8/q4/q4a bundles in groups of 32: integer dots for up and gate, the
    down column added in vector blocks into float32 scratch in prepare_input's order.

    Neurons go in groups of ROWS_PER_PASS: the deciding component (gate, or up when ungated) of the
    four is one pass over a token's activation blocks (int_rows_dot4; a chunk of tokens in tiles
    of four, int_rows_dots), and so is up when every neuron is active (SiLU); with ReLU an active
    neuron's up is one row dot. With SiLU a chunk's four down columns are unpacked to float32
    once and added for every token (_add_columns4: SmolLM2's prefill of 256 tokens 340 -> 485
    tok/s against unpacking every component to float32, as it did before); otherwise each
    token's active neurons are queued and their down columns added four at a time (flush_axpy4:
    one pass over the token's output for four columns)."""
    n_tokens, dim = prep[0].shape[0], prep[0].shape[1]
    n_blocks = dim // 32
    gated = gate.shape[0] > 0
    up_ws, up_wm = row_scratch(up, up_m, group, dim)
    gate_ws, gate_wm = row_scratch(gate, gate_m, group, dim if gated else 0)
    down_wm = row_scratch(down, down_m, group, dim)[1]
    down_ws4 = np.empty((ROWS_PER_PASS, n_blocks), np.float32)  # the group's down scales, widened once
    down_wm4 = np.empty((ROWS_PER_PASS, down_wm.shape[0]), np.float32)
    acc = np.zeros((n_tokens, dim), np.float32)
    # per token, its queue of up to four active neurons (rows, their coefficients, the mins' sum)
    queued_rows = np.zeros((n_tokens, 4), np.int64)
    coef4 = np.zeros((n_tokens, 4, n_blocks), np.float32)
    offset = np.zeros((n_tokens, n_blocks), np.float32)
    n_queued = np.zeros(n_tokens, np.int64)
    decider, dec_s, dec_m = (gate, gate_s, gate_m) if gated else (up, up_s, up_m)
    dec_ws, dec_wm = (gate_ws, gate_wm) if gated else (up_ws, up_wm)
    every_neuron = act != ACT_RELU  # SiLU, GELU: every neuron is active, its whole bundle is read
    zeros4 = (np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0))
    # a chunk's dots of the group with every token (int_rows_dots), for the tokens' loop below
    dec_vals = np.empty((n_tokens if n_tokens > 1 else 0, ROWS_PER_PASS), np.float32)
    up_vals = np.empty((n_tokens if n_tokens > 1 and gated and every_neuron else 0, ROWS_PER_PASS), np.float32)
    dense_chunk = n_tokens > 1 and every_neuron
    h_vals = np.empty((n_tokens if dense_chunk else 0, ROWS_PER_PASS), np.float32)
    down_v = np.empty((ROWS_PER_PASS if dense_chunk else 0, dim), np.float32)
    first = lo
    while first < hi:
        n_rows = min(ROWS_PER_PASS, hi - first)
        for i in range(ROWS_PER_PASS, 2 * ROWS_PER_PASS):  # the next group's bundles (strided rows)
            if first + i < hi:
                prefetch_lines(decider.ctypes.data + (first + i) * decider.strides[0], decider.shape[1])
                if every_neuron:
                    if gated:
                        prefetch_lines(up.ctypes.data + (first + i) * up.strides[0], up.shape[1])
                    prefetch_lines(down.ctypes.data + (first + i) * down.strides[0], down.shape[1])
        down_ready = False  # inactive groups (ReLU) never touch their down columns
        if n_tokens > 1 and n_rows == ROWS_PER_PASS:  # tiles of four neurons x four tokens
            int_rows_dots(decider, first, dec_s, dec_m, prep, dec_vals)
            if gated and every_neuron:
                int_rows_dots(up, first, up_s, up_m, prep, up_vals)
            if every_neuron:  # SiLU: the four down columns unpacked once, added for every token
                for i in range(ROWS_PER_PASS):
                    r = first + i
                    for t in range(n_tokens):  # gated: dec_vals holds the gate's dots; else the up's
                        u = up_vals[t, i] if gated else dec_vals[t, i]
                        g = dec_vals[t, i] if gated else np.float32(0.0)
                        h_vals[t, i] = _neuron_output(u, g, r, up_b, gate_b, gated, act)
                    row_values(down, down_s, down_m, group, r, down_v[i])
                _add_columns4(h_vals, down_v, acc)
                first += n_rows
                continue
        for t in range(n_tokens):
            d4, u4 = zeros4, zeros4
            if n_tokens == 1 and n_rows == ROWS_PER_PASS:
                d4 = int_rows_dot4(decider, first, dec_s, dec_m, prep, t)
                if gated and every_neuron:
                    u4 = int_rows_dot4(up, first, up_s, up_m, prep, t)
            for i in range(n_rows):
                r = first + i
                if n_rows == ROWS_PER_PASS:
                    d = d4[i] if n_tokens == 1 else dec_vals[t, i]
                else:  # the last few neurons, one row at a time
                    row_scales(dec_s, dec_m, r, dec_ws, dec_wm)
                    d = int_row_dot(decider, r, dec_ws, dec_wm, prep, t)
                if gated:
                    g = d + (gate_b[r] if gate_b.shape[0] else np.float32(0.0))
                    if act == ACT_RELU and g <= 0.0:
                        continue  # inactive: the up product is never needed
                    if every_neuron and n_rows == ROWS_PER_PASS:
                        u = u4[i] if n_tokens == 1 else up_vals[t, i]
                    else:
                        row_scales(up_s, up_m, r, up_ws, up_wm)
                        u = int_row_dot(up, r, up_ws, up_wm, prep, t)
                    h = _neuron_output(u, g, r, up_b, EMPTY_BIAS, gated, act)
                else:
                    h = _neuron_output(d, np.float32(0.0), r, up_b, EMPTY_BIAS, gated, act)
                if h == 0.0:
                    continue
                if not down_ready:
                    for k in range(n_rows):
                        row_scales_into(down_s, down_m, first + k, down_ws4, down_wm4, k)
                    down_ready = True
                slot = n_queued[t]
                queue_axpy(down, down_ws4, down_wm4, i, h, t, slot, coef4, offset)
                queued_rows[t, slot] = r
                if slot == 3:
                    flush_axpy4(down, queued_rows, 4, coef4, offset, acc, t)
                    n_queued[t] = 0
                else:
                    n_queued[t] = slot + 1
        first += n_rows
    for t in range(n_tokens):
        flush_axpy4(down, queued_rows, n_queued[t], coef4, offset, acc, t)
    add_unprepared(down, acc, group, out)


@njit(fastmath=FAST)
def _add_columns4(h, columns, acc):
    """acc[t] += sum_i h[t, i] * columns[i] for four float32 columns [4, dim]: one pass over each
    token's output for four neurons, the columns' codes converted once for every token."""
    c0, c1, c2, c3 = columns[0], columns[1], columns[2], columns[3]
    for t in range(acc.shape[0]):
        h0, h1, h2, h3 = h[t, 0], h[t, 1], h[t, 2], h[t, 3]
        row = acc[t]
        for k in range(acc.shape[1]):
            row[k] += h0 * c0[k] + h1 * c1[k] + h2 * c2[k] + h3 * c3[k]


@njit(cache=True, nogil=True, fastmath=FAST)
def _ffn_rows_unpacked(xp, lo, hi, up, up_s, up_m, gate, gate_s, gate_m, down, down_s, down_m, up_b, gate_b,
                       group, act, out):
    """_ffn_row_range for a chunk of tokens with float dots (f16, groups of 64): each row's
    up/gate/down unpacked once into float32 and used for every token (per-token unpacking of
    q4 made these 5x slower). Works in prepare_input's element order, converted back at the end."""
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
    add_unprepared(down, acc, group, out)  # down's order: a bundle may pair q4 up/gate with a q8 down


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


@njit(cache=True, nogil=True, fastmath=FAST)
def ffn_down_rows(x, up, up_b, gate, gate_b, down, act, u, h, out):
    """The dense FFN of a layer that keeps W_down as rows (storage/format.py, FFNLayer.matrices):
    out = down @ (act(gate.x + gate_b) * (up.x + up_b)), or down @ relu(up.x + up_b) ungated, as
    three matmuls (weights.Matrix tuples; up/gate the bundles' rows, down [dim, n]) over the
    int8-quantized input, then the int8-quantized hidden activations (llama.cpp's arithmetic on
    the same blocks). Every neuron is computed: what a SiLU FFN needs. u, h: [>= T, n] scratch
    of exactly n columns."""
    n_tokens = x.shape[0]
    hidden = h[:n_tokens]  # rows only: a column slice would make the matmuls' inputs strided
    ups = u[:n_tokens]
    if gate.data.shape[0]:  # gate and up from one prepared input, in one parallel region
        matmul2(x, gate, gate_b, hidden, up, up_b, ups)
        gated_act(hidden, ups, act)
    else:  # OPT: ReLU only (the config refuses other ungated activations, as model._ffn says)
        # up's products alone (the gate has no rows), through the call above with the two
        # swapped: where up and gate are of one type (every gated store) that is the same
        # compiled region, not a matmul of up's types compiled only for this branch (2026-12-08)
        matmul2(x, up, up_b, hidden, gate, gate_b, ups)
        relu_(hidden)
    linear(hidden, down, EMPTY_BIAS, out)


@njit(cache=True, nogil=True, fastmath=FAST)
def gated_act(gate, up, act):
    """gate <- act(gate) * up (SwiGLU / GeGLU FFN), act one of ACTS. The branches are spelled out
    here rather than through _activate: through that call the SiLU loop compiled to other
    arithmetic (fast-math contractions), moving SmolLM2's logits by up to 0.3 through the int8
    rounding of the hidden activations that follows."""
    for t in range(gate.shape[0]):
        for i in range(gate.shape[1]):
            g = gate[t, i]
            if act == ACT_SILU:
                g = silu(g)
            elif act == ACT_GELU_TANH:
                g = gelu_tanh(g)
            else:
                g = max(g, np.float32(0.0))
            gate[t, i] = g * up[t, i]


@njit(cache=True, nogil=True, fastmath=FAST)
def relu_(h):
    """h <- max(h, 0) in place."""
    for t in range(h.shape[0]):
        for i in range(h.shape[1]):
            h[t, i] = max(h[t, i], np.float32(0.0))


# ---- the gate-threshold FFN (SiLU/GELU models, --predictor gate) ----------------------------

@njit(cache=True, nogil=True, fastmath=FAST)
def activate_(g, act):
    """g <- act(g) in place (the gate predictor's coefficients: act(gate.x) of every neuron)."""
    for t in range(g.shape[0]):
        for i in range(g.shape[1]):
            v = g[t, i]
            if act == ACT_SILU:
                v = silu(v)
            elif act == ACT_GELU_TANH:
                v = gelu_tanh(v)
            else:
                v = max(v, np.float32(0.0))
            g[t, i] = v


@njit(cache=True, nogil=True, fastmath=FAST)
def _ffn_coef_range(x, lo, hi, ids, coefs, threshold, up, up_s, up_m, down, down_s, down_m, up_b, group, out):
    """out[t] += sum over rows lo..hi-1 whose |coefs[t, ids[r]]| > threshold[ids[r]] of c (up_r.x + b_r) down_r."""
    prep = prepare_input(up, x, group)
    n_tokens, dim = x.shape[0], x.shape[1]
    if uses_int_dots(up, group) and uses_int_dots(down, group):
        _ffn_coef_int(prep, lo, hi, ids, coefs, threshold, up, up_s, up_m, down, down_s, down_m, up_b, group, out)
        return
    ints = uses_int_dots(up, group)
    up_ws, up_wm = row_scratch(up, up_m, group, dim)
    for r in range(lo, hi):
        neuron = ids[r]
        scaled = False
        for t in range(n_tokens):
            c = coefs[t, neuron]
            if abs(c) <= threshold[neuron]:
                continue  # skipped: neither its up row nor its down column is touched
            if ints:
                if not scaled:
                    row_scales(up_s, up_m, r, up_ws, up_wm)
                    scaled = True
                u = int_row_dot(up, r, up_ws, up_wm, prep, t)
            else:
                u = row_dot(up, up_s, up_m, group, r, prep[0], prep[1], t)
            if up_b.shape[0]:
                u += up_b[r]
            row_axpy(down, down_s, down_m, group, r, c * u, out, t)


@njit(cache=True, nogil=True, fastmath=FAST)
def _ffn_coef_int(prep, lo, hi, ids, coefs, threshold, up, up_s, up_m, down, down_s, down_m, up_b, group, out):
    """_ffn_coef_range for q8/q4/q4a bundles in groups of 32, as _ffn_rows_int computes its ReLU
    neurons: rows in groups of four, the up dots of a group with a token in one pass over its
    activation blocks (int_rows_dot4) once any of the four is selected, and each token's selected
    down columns queued and added four at a time (flush_axpy4). A plain row at a time (dot, then a
    float axpy) ran 0.57 ms a SmolLM2 layer against the dense FFN's 0.07. The queueing of a down
    column is written out here and in _ffn_rows_int: as a shared @njit helper it was not inlined,
    and _ffn_rows_int lost 6-27% (bench.kernels --against, 2026-12-03: SmolLM2 SiLU layer, one
    token, 0.23 -> 0.30 ms)."""
    n_tokens, dim = prep[0].shape[0], prep[0].shape[1]
    n_blocks = dim // 32
    up_ws, up_wm = row_scratch(up, up_m, group, dim)
    down_wm = row_scratch(down, down_m, group, dim)[1]
    down_ws4 = np.empty((ROWS_PER_PASS, n_blocks), np.float32)
    down_wm4 = np.empty((ROWS_PER_PASS, down_wm.shape[0]), np.float32)
    acc = np.zeros((n_tokens, dim), np.float32)
    queued_rows = np.zeros((n_tokens, 4), np.int64)
    coef4 = np.zeros((n_tokens, 4, n_blocks), np.float32)
    offset = np.zeros((n_tokens, n_blocks), np.float32)
    n_queued = np.zeros(n_tokens, np.int64)
    chunk = n_tokens > 1  # prefill: a group's up dots with every token in tiles, its down columns unpacked once
    up_vals = np.empty((n_tokens if chunk else 0, ROWS_PER_PASS), np.float32)
    h_vals = np.empty((n_tokens if chunk else 0, ROWS_PER_PASS), np.float32)
    down_v = np.empty((ROWS_PER_PASS if chunk else 0, dim), np.float32)
    first = lo
    while first < hi:
        n_rows = min(ROWS_PER_PASS, hi - first)
        for i in range(ROWS_PER_PASS, 2 * ROWS_PER_PASS):  # the next group's bundles (strided rows)
            if first + i < hi:
                prefetch_lines(up.ctypes.data + (first + i) * up.strides[0], up.shape[1])
                prefetch_lines(down.ctypes.data + (first + i) * down.strides[0], down.shape[1])
        if chunk and n_rows == ROWS_PER_PASS:
            # as _ffn_rows_int's SiLU chunk, with h = c (up.x) where |c| clears the threshold, else 0;
            # a group no token selects costs nothing
            selected = False
            for i in range(ROWS_PER_PASS):
                neuron = ids[first + i]
                for t in range(n_tokens):
                    if abs(coefs[t, neuron]) > threshold[neuron]:
                        selected = True
                        break
            if selected:
                int_rows_dots(up, first, up_s, up_m, prep, up_vals)
                for i in range(ROWS_PER_PASS):
                    r = first + i
                    neuron = ids[r]
                    for t in range(n_tokens):
                        c = coefs[t, neuron]
                        u = up_vals[t, i] + (up_b[r] if up_b.shape[0] else np.float32(0.0))
                        h_vals[t, i] = c * u if abs(c) > threshold[neuron] else np.float32(0.0)
                    row_values(down, down_s, down_m, group, r, down_v[i])
                _add_columns4(h_vals, down_v, acc)
            first += n_rows
            continue
        down_ready = False
        for t in range(n_tokens):
            selected = 0
            for i in range(n_rows):
                if abs(coefs[t, ids[first + i]]) > threshold[ids[first + i]]:
                    selected += 1
            if selected == 0:
                continue
            u4 = (np.float32(0.0), np.float32(0.0), np.float32(0.0), np.float32(0.0))
            if n_rows == ROWS_PER_PASS and selected > 1:
                u4 = int_rows_dot4(up, first, up_s, up_m, prep, t)
            for i in range(n_rows):
                r = first + i
                c = coefs[t, ids[r]]
                if abs(c) <= threshold[ids[r]]:
                    continue
                if n_rows == ROWS_PER_PASS and selected > 1:
                    u = u4[i]
                else:
                    row_scales(up_s, up_m, r, up_ws, up_wm)
                    u = int_row_dot(up, r, up_ws, up_wm, prep, t)
                if up_b.shape[0]:
                    u += up_b[r]
                if not down_ready:
                    for k in range(n_rows):
                        row_scales_into(down_s, down_m, first + k, down_ws4, down_wm4, k)
                    down_ready = True
                slot = n_queued[t]
                queue_axpy(down, down_ws4, down_wm4, i, c * u, t, slot, coef4, offset)
                queued_rows[t, slot] = r
                if slot == 3:
                    flush_axpy4(down, queued_rows, 4, coef4, offset, acc, t)
                    n_queued[t] = 0
                else:
                    n_queued[t] = slot + 1
        first += n_rows
    for t in range(n_tokens):
        flush_axpy4(down, queued_rows, n_queued[t], coef4, offset, acc, t)
    add_unprepared(down, acc, group, out)


@njit(cache=True, nogil=True, fastmath=FAST)
def ffn_rows_coef(x, n_rows, ids, coefs, threshold, up, up_s, up_m, down, down_s, down_m, up_b, group, out):
    """The gate-threshold FFN (CATS) over rows 0..n_rows-1 of bundles that hold up rows and down
    columns only (the gate lives apart, format.FFNLayer.matrices): row r holds neuron ids[r], and
    coefs[t, neuron] = act(gate.x_t) was computed densely by the caller (predictors.sparsity.
    GatePredictor). out[t] = sum over rows with |c| > threshold[neuron] (float32 [n_neurons]) of
    c (up.x_t + b) down; a neuron at or under its threshold costs no work. `out` is overwritten."""
    out[:, :] = 0.0
    _ffn_coef_range(x, 0, n_rows, ids, coefs, threshold, up, up_s, up_m, down, down_s, down_m, up_b, group, out)


@njit(cache=True, nogil=True, fastmath=FAST, parallel=True)
def ffn_rows_coef_parallel(x, n_rows, ids, coefs, threshold, up, up_s, up_m, down, down_s, down_m, up_b, group,
                           partial, out):
    """ffn_rows_coef with the rows split over threads (partial: [n_slices, >= T, dim] scratch)."""
    n_slices = partial.shape[0]
    step = (n_rows + n_slices - 1) // n_slices
    for c in prange(n_slices):
        part = partial[c, : x.shape[0]]
        part[:, :] = 0.0
        _ffn_coef_range(x, c * step, min(n_rows, (c + 1) * step), ids, coefs, threshold, up, up_s, up_m, down,
                        down_s, down_m, up_b, group, part)
    for t in range(out.shape[0]):
        for k in range(out.shape[1]):
            acc = np.float32(0.0)
            for c in range(n_slices):
                acc += partial[c, t, k]
            out[t, k] = acc
