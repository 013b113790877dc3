"""Weight rows in every store scheme, and activations quantized into int8 blocks.

Weights: float32, float16 carried as raw uint16 bits (numba has no float16 on the CPU;
`widen` makes float32 in registers), q8 (int8 codes), q4/q4a (uint8 nibble pairs), with f16
scales/mins per group (storage/quant.py is the spec). Activations for q8/q4/q4a weights with
groups of 32 are quantized once per matmul into int8 blocks of 32 with a float32 scale each
(ggml's Q8_0 rule: d = max|x| / 127, q = rint(x / d)), so the row products run in integer
arithmetic (flashinfer/kernels/simd.py); the per-block code sums turn q4's offset of -8 and
q4a's mins into one multiply per block. Other group sizes and float weights keep float dots.

Each function here has a pure-Python form (used with NUMBA_DISABLE_JIT=1) and an @overload
chosen per dtype at compile time.
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import overload

from .lanes import ROWS as LANE_ROWS
from .simd import (BLOCK, NATIVE_F16, TOKENS_PER_PASS, axpy4_i8_blocks, axpy4_u4_blocks, dot4_q4_blocks,
                   dot4_q4a_blocks, dot4_q4k_blocks, dot4_q6k_blocks, dot4_q8_blocks, dot4x4_q4_blocks, dot4x4_q4a_blocks,
                   dot4x4_q4k_blocks, dot4x4_q6k_blocks, dot4x4_q8_blocks, dot_i8_blocks, dot_u4_blocks, widen_f16)

# fastmath without 'nnan'/'ninf': reassociation lets LLVM vectorise the reductions, and
# no kernel relies on IEEE specials (attention never builds -inf masks).
FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
_F16_MIN_NORMAL = np.float32(2.0**-14)  # a half's smallest normal
Q8_ACT_MAX = np.float32(127.0)
Q6K_GROUP = 16  # storage.quant.Q6K_GROUP: q6k's int8 codes with an int8 scale per 16 (and an f16 d per 256)


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


# ---- activations -------------------------------------------------------------------

def uses_int_dots(w, group):
    """Whether rows of w are dotted in integer arithmetic against int8 activation blocks:
    q8/q4/q4a/q4k codes in groups of 32, q6k's in groups of 16 (pure-Python form)."""
    return (w.dtype == np.int8 or w.dtype == np.uint8) and (group == BLOCK or group == Q6K_GROUP)


@overload(uses_int_dots)
def _uses_int_dots_jit(w, group):
    quantized = w.dtype in (types.int8, types.uint8)  # decided at compile time, per dtype
    return lambda w, group: quantized and (group == BLOCK or group == Q6K_GROUP)


@njit(fastmath=FAST)
def quantize_blocks(x, xq, xd, xqs):
    """xq[t] = rint(x[t] / d) per block of 32 with d = max|x| / 127 (xd[t, b] = d; 0 for an
    all-zero block), xqs[t, b] = the block's code sum. Codes lie in -127..127."""
    for t in range(x.shape[0]):
        for b in range(xd.shape[1]):
            top = np.float32(0.0)
            for j in range(b * BLOCK, (b + 1) * BLOCK):
                top = max(top, abs(x[t, j]))
            d = top / Q8_ACT_MAX
            inv = Q8_ACT_MAX / top if top > 0 else np.float32(0.0)
            total = 0
            for j in range(b * BLOCK, (b + 1) * BLOCK):
                q = np.int8(np.rint(x[t, j] * inv))
                xq[t, j] = q
                total += q
            xd[t, b] = d
            xqs[t, b] = total


@njit(fastmath=FAST)
def _quantized_activations(x, quantize: bool):
    """(codes int8 [T, K], block scales float32 [T, K/32], code sums int32 [T, K/32], dequantized
    block sums float32 [T, K/32] (scale * code sum)), or empty arrays."""
    if not quantize:
        return (np.zeros((0, 0), np.int8), np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int32),
                np.zeros((0, 0), np.float32))
    n_blocks = x.shape[1] // BLOCK
    xq = np.empty(x.shape, np.int8)
    xd = np.empty((x.shape[0], n_blocks), np.float32)
    xqs = np.empty((x.shape[0], n_blocks), np.int32)
    quantize_blocks(x, xq, xd, xqs)
    xsum = np.empty((x.shape[0], n_blocks), np.float32)
    for t in range(x.shape[0]):
        for b in range(n_blocks):
            xsum[t, b] = xd[t, b] * np.float32(xqs[t, b])
    return xq, xd, xqs, xsum


def prepare_input(w, x, group):
    """x as the row kernels of w's scheme read it: a tuple (xp, xs, xq, xd, xqs, xsum).

    xp: x in the element order of w's rows: for q4/q4a deinterleaved within each group (its
    even elements, then its odd ones), so a byte's low and high nibbles meet contiguous x;
    x itself for other schemes. xs [T, groups]: per-group sums of xp (q4/q4a float dots).
    xq/xd/xqs/xsum: xp quantized into int8 blocks when uses_int_dots(w, group), else empty
    (codes, block scales, code sums, dequantized block sums). Rows in lanes (w [rows / 8, blocks,
    ...]): x itself, xs the activation code sums per 16 for q6k (int32; none otherwise), the rest
    as above.
    Pure-Python form: x as it is (the Python row functions below read it so)."""
    empty = np.zeros((x.shape[0], 0), np.float32)
    return (x, empty) + _quantized_activations(x, uses_int_dots(w, group))


@overload(prepare_input)
def _prepare_input_jit(w, x, group):
    if w.ndim == 3:  # rows in lanes (kernels/lanes.py): x in its own order, every scheme's integer dots

        def prepare_lanes(w, x, group):
            xq, xd, xqs, xsum = _quantized_activations(x, True)
            # per 16 codes, q6k's groups (int32; no other scheme reads them): lanes take 128 x them
            # off, codes being + 128
            sums16 = np.empty((x.shape[0], x.shape[1] // Q6K_GROUP if group == Q6K_GROUP else 0), np.int32)
            for t in range(x.shape[0]):
                for g in range(sums16.shape[1]):
                    total = 0
                    for j in range(Q6K_GROUP * g, Q6K_GROUP * (g + 1)):
                        total += xq[t, j]
                    sums16[t, g] = total
            return x, sums16, xq, xd, xqs, xsum

        return prepare_lanes
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
            xq, xd, xqs, xsum = _quantized_activations(xp, group == BLOCK)
            return xp, xs, xq, xd, xqs, xsum

        return prepare_q4
    if w.dtype == types.int8:

        def prepare_q8(w, x, group):  # q8 and q6k
            xq, xd, xqs, xsum = _quantized_activations(x, uses_int_dots(w, group))
            return x, np.zeros((x.shape[0], 0), np.float32), xq, xd, xqs, xsum

        return prepare_q8

    def prepare_float(w, x, group):
        xq, xd, xqs, xsum = _quantized_activations(x, False)
        return x, np.zeros((x.shape[0], 0), np.float32), xq, xd, xqs, xsum

    return prepare_float


# ---- integer row dots (q8/q4/q4a, groups of 32) -------------------------------------

@njit(fastmath=FAST)
def _scales_by_integer_ops(scales, mins, r, ws, wm):
    for b in range(ws.shape[0]):
        ws[b] = widen(scales[r, b])
    for b in range(wm.shape[0]):
        wm[b] = widen(mins[r, b])


def row_scales(scales, mins, r, ws, wm):
    """ws[b] = row r's scale of block b as float32 (and wm[b] its min, for q4a/q4k; q6k: of each
    group of 16) (pure-Python form)."""
    if scales.dtype == np.int8:
        for g in range(ws.shape[0]):
            ws[g] = q6k_group_scale(scales, r, g)
        return
    if scales.dtype == np.uint8:
        for b in range(ws.shape[0]):
            ws[b], wm[b] = q4k_group(scales, mins, r, b)
        return
    _scales_by_integer_ops(scales, mins, r, ws, wm)


@njit(fastmath=FAST)
def _super_block_multiplier(packed, r, n_groups, g, groups_per_super):
    """The f16 multiplier of group g's super-block in row r of a q4k scales/mins array (uint8) or
    a q6k scales array (int8): the little-endian half after the rows' n_groups group values."""
    at = n_groups + 2 * (g // groups_per_super)
    # bytes as unsigned (a q6k array is int8), and np.uint16 around the whole: numba widens uint16
    # operands of | and << to int64, which `widen` would take for an integer value rather than half bits
    low, high = np.uint32(packed[r, at]) & np.uint32(0xFF), np.uint32(packed[r, at + 1]) & np.uint32(0xFF)
    return widen(np.uint16(low | (high << np.uint32(8))))


@njit(fastmath=FAST)
def q4k_group(scales, mins, r, g):
    """(scale, min) of group g of row r of a q4k matrix: d sc_g and -dmin m_g (storage/quant.py)."""
    n_groups = scales.shape[1] * 4 // 5  # K/32 six-bit values, then K/128 bytes of multipliers
    s = _super_block_multiplier(scales, r, n_groups, g, 8) * np.float32(scales[r, g])
    return s, -_super_block_multiplier(mins, r, n_groups, g, 8) * np.float32(mins[r, g])


@njit(fastmath=FAST)
def q6k_group_scale(scales, r, g):
    """d sc_g of group g (of 16) of row r of a q6k matrix (storage/quant.py), float32."""
    n_groups = scales.shape[1] * 8 // 9  # K/16 int8 scales, then K/128 bytes of multipliers
    return _super_block_multiplier(scales, r, n_groups, g, 16) * np.float32(scales[r, g])


def group_scale_min(scales, mins, r, g):
    """(scale, min) of group g of row r of a nibble matrix: q4 (min -8 scale), q4a, q4k (pure-Python form)."""
    if scales.dtype == np.uint8:
        return q4k_group(scales, mins, r, g)
    s = widen(scales[r, g])
    return s, (widen(mins[r, g]) if mins.shape[1] else np.float32(-8.0) * s)


@overload(group_scale_min)
def _group_scale_min_jit(scales, mins, r, g):
    if scales.dtype == types.uint8:  # q4k, decided at compile time
        return lambda scales, mins, r, g: q4k_group(scales, mins, r, g)

    def f16_scales(scales, mins, r, g):
        s = widen(scales[r, g])
        return s, (widen(mins[r, g]) if mins.shape[1] else np.float32(-8.0) * s)

    return f16_scales


@overload(row_scales)
def _row_scales_jit(scales, mins, r, ws, wm):
    if scales.dtype == types.int8:  # q6k: a scale per group of 16

        def scales_q6k(scales, mins, r, ws, wm):
            for g in range(ws.shape[0]):
                ws[g] = q6k_group_scale(scales, r, g)

        return scales_q6k
    if scales.dtype == types.uint8:  # q4k: the packed 6-bit values times their super-block's multiplier

        def scales_q4k(scales, mins, r, ws, wm):
            for b in range(ws.shape[0]):
                ws[b], wm[b] = q4k_group(scales, mins, r, b)

        return scales_q4k
    if NATIVE_F16:  # decided when this module is imported: the host's instruction set

        def scales_by_fpext(scales, mins, r, ws, wm):
            widen_f16(scales.ctypes.data + r * scales.strides[0], ws.ctypes.data, ws.shape[0])
            if wm.shape[0]:
                widen_f16(mins.ctypes.data + r * mins.strides[0], wm.ctypes.data, wm.shape[0])

        return scales_by_fpext
    # blocks.widen's integer method
    return lambda scales, mins, r, ws, wm: _scales_by_integer_ops(scales, mins, r, ws, wm)


def int_row_dot(w, r, ws, wm, prep, t):
    """sum_k value(w[r, k]) * x[t, k] with x as quantized by prepare_input, ws/wm from
    row_scales (wm empty unless q4a/q4k; ws per group of 16 for q6k) (pure-Python form)."""
    xq, xd = prep[2], prep[3]
    x_values = (xq[t].astype(np.float32).reshape(-1, BLOCK) * xd[t][:, None]).reshape(-1)
    group = xq.shape[1] // ws.shape[0]
    values = (_row_codes(w, r, wm).reshape(-1, group) * ws[:, None] + (wm[:, None] if wm.shape[0] else 0)).reshape(-1)
    return np.float32(np.dot(values, x_values))


@overload(int_row_dot)
def _int_row_dot_jit(w, r, ws, wm, prep, t):
    if w.dtype == types.int8:

        def dot_q8(w, r, ws, wm, prep, t):
            xq, xd = prep[2], prep[3]
            if ws.shape[0] == xd.shape[1]:  # q8: a scale per block of 32
                return dot_i8_blocks(w.ctypes.data + r * w.strides[0], xq.ctypes.data + t * xq.strides[0],
                                     ws.ctypes.data, xd.ctypes.data + t * xd.strides[0], ws.shape[0])
            acc = np.float32(0.0)  # q6k, a row left over after the four-row passes: two groups per block
            for g in range(ws.shape[0]):
                isum = 0
                for j in range(g * Q6K_GROUP, (g + 1) * Q6K_GROUP):
                    isum += np.int32(w[r, j]) * np.int32(xq[t, j])
                acc += np.float32(isum) * ws[g] * xd[t, g // 2]
            return acc

        return dot_q8

    def dot_q4(w, r, ws, wm, prep, t):
        # value = nibble * s + m (q4: m = -8 s), so per block sum value*x = s d sum(nibble*q) + m d sum(q)
        xq, xd, xsum = prep[2], prep[3], prep[5]
        offset = np.float32(0.0)
        if wm.shape[0]:
            for b in range(wm.shape[0]):
                offset += wm[b] * xsum[t, b]
        else:
            for b in range(ws.shape[0]):
                offset += ws[b] * xsum[t, b]
            offset *= np.float32(-8.0)
        return dot_u4_blocks(w.ctypes.data + r * w.strides[0], xq.ctypes.data + t * xq.strides[0], ws.ctypes.data,
                             xd.ctypes.data + t * xd.strides[0], ws.shape[0]) + offset

    return dot_q4


ROWS_PER_PASS = 4  # int_rows_dot4


def int_rows_dot4(w, r, scales, mins, prep, t):
    """(int_row_dot of row r + i for i < 4) against token t, as a tuple: one pass over the
    token's activation blocks for four rows (simd.dot4_*_blocks) where the host widens halves
    natively, else four int_row_dot (pure-Python form)."""
    return _rows_one_by_one(w, r, scales, mins, prep, t)


def int_group(scales):
    """The group of a matrix dotted in integer arithmetic, told by its scales: q6k's (int8) 16,
    else 32 (pure-Python form)."""
    return Q6K_GROUP if scales.dtype == np.int8 else BLOCK


@overload(int_group)
def _int_group_jit(scales):
    group = Q6K_GROUP if scales.dtype == types.int8 else BLOCK  # decided at compile time
    return lambda scales: group


@njit(fastmath=FAST)
def _rows_one_by_one(w, r, scales, mins, prep, t):
    ws, wm = row_scratch(w, mins, int_group(scales), prep[0].shape[1])
    row_scales(scales, mins, r, ws, wm)
    d0 = int_row_dot(w, r, ws, wm, prep, t)
    row_scales(scales, mins, r + 1, ws, wm)
    d1 = int_row_dot(w, r + 1, ws, wm, prep, t)
    row_scales(scales, mins, r + 2, ws, wm)
    d2 = int_row_dot(w, r + 2, ws, wm, prep, t)
    row_scales(scales, mins, r + 3, ws, wm)
    return d0, d1, d2, int_row_dot(w, r + 3, ws, wm, prep, t)


def interleaved(w) -> bool:
    """Whether w holds rows in lanes (kernels/lanes.py, weights.interleave_rows: [rows / 8, blocks,
    8 x a block's code bytes]), told by its three dimensions (pure-Python form)."""
    return w.ndim == 3


@overload(interleaved)
def _interleaved_jit(w):
    three = w.ndim == 3  # decided at compile time
    return lambda w: three


def n_rows(w):
    """The weight rows of w, plain [rows, ...] or in lanes [rows / 8, blocks, ...]."""
    return w.shape[0] * LANE_ROWS if interleaved(w) else w.shape[0]


@overload(n_rows)
def _n_rows_jit(w):
    per = LANE_ROWS if w.ndim == 3 else 1
    return lambda w: w.shape[0] * per


@njit
def _operands(w, r, scales, mins, xq, xd, xaux, t):
    """Addresses of row r's codes, scales and mins (0 and stride 0 when there are none) and of token
    t's activation codes, block scales and block sums: what the multi-row intrinsics take."""
    has_mins = mins.shape[0] > 0
    return (w.ctypes.data + r * w.strides[0], scales.ctypes.data + r * scales.strides[0],
            mins.ctypes.data + r * mins.strides[0] if has_mins else 0, mins.strides[0] if has_mins else 0,
            xq.ctypes.data + t * xq.strides[0], xd.ctypes.data + t * xd.strides[0], xaux.ctypes.data + t * xaux.strides[0])


@overload(int_rows_dot4)
def _int_rows_dot4_jit(w, r, scales, mins, prep, t):
    if not NATIVE_F16:
        return lambda w, r, scales, mins, prep, t: _rows_one_by_one(w, r, scales, mins, prep, t)
    # q8 reads the activations' int32 code sums (prep[4]), q4/q4a/q4k their dequantized block sums (prep[5])
    dot4, aux = (dot4_q8_blocks, 4) if w.dtype == types.int8 else (dot4_q4a_blocks, 5)
    if scales.dtype == types.uint8:
        dot4 = dot4_q4k_blocks
    if scales.dtype == types.int8:
        dot4 = dot4_q6k_blocks
    has_mins = w.dtype == types.uint8  # q4a/q4k; q4 (no mins) is told apart at run time

    def rows4(w, r, scales, mins, prep, t):
        w_addr, s_addr, m_addr, m_stride, x_addr, xd_addr, xaux_addr = _operands(w, r, scales, mins, prep[2], prep[3],
                                                                                 prep[aux], t)
        w_stride = w.strides[0]
        if has_mins and m_addr == 0:  # q4: no mins
            return dot4_q4_blocks(w_addr, w_stride, s_addr, scales.strides[0], 0, 0, x_addr, xd_addr, xaux_addr,
                           prep[3].shape[1])
        return dot4(w_addr, w_stride, s_addr, scales.strides[0], m_addr, m_stride, x_addr, xd_addr, xaux_addr,
                    prep[3].shape[1])

    return rows4


@njit(fastmath=FAST)
def int_rows_dots(w, r, scales, mins, prep, vals):
    """vals[t, i] = int_row_dot of row r + i (i < 4) with token t, for every token of prep: four
    tokens at a time by int_tile_dot4x4 (each row's codes unpacked once for four tokens), the
    tokens left over by int_rows_dot4. vals: float32 [>= tokens, 4] scratch."""
    n_tokens = prep[0].shape[0]
    t = 0
    while t + TOKENS_PER_PASS <= n_tokens:
        v = int_tile_dot4x4(w, r, scales, mins, prep, t)
        for i in range(ROWS_PER_PASS):
            for j in range(TOKENS_PER_PASS):
                vals[t + j, i] = v[TOKENS_PER_PASS * i + j]
        t += TOKENS_PER_PASS
    for t in range(t, n_tokens):
        d = int_rows_dot4(w, r, scales, mins, prep, t)
        for i in range(ROWS_PER_PASS):
            vals[t, i] = d[i]


def int_tile_dot4x4(w, r, scales, mins, prep, t):
    """The 16 dots of rows r..r+3 with tokens t..t+3, row by row (row r + i with token t + j at
    4 i + j), as a tuple: simd.dot4x4_*_blocks where the host widens halves natively, else four
    int_rows_dot4 (pure-Python form)."""
    return _tile_by_rows4(w, r, scales, mins, prep, t)


@njit(fastmath=FAST)
def _tile_by_rows4(w, r, scales, mins, prep, t):
    a = int_rows_dot4(w, r, scales, mins, prep, t)
    b = int_rows_dot4(w, r, scales, mins, prep, t + 1)
    c = int_rows_dot4(w, r, scales, mins, prep, t + 2)
    d = int_rows_dot4(w, r, scales, mins, prep, t + 3)
    return (a[0], b[0], c[0], d[0], a[1], b[1], c[1], d[1], a[2], b[2], c[2], d[2], a[3], b[3], c[3], d[3])


@overload(int_tile_dot4x4)
def _int_tile_dot4x4_jit(w, r, scales, mins, prep, t):
    if not NATIVE_F16:
        return lambda w, r, scales, mins, prep, t: _tile_by_rows4(w, r, scales, mins, prep, t)
    tile, aux = (dot4x4_q8_blocks, 4) if w.dtype == types.int8 else (dot4x4_q4a_blocks, 5)
    if scales.dtype == types.uint8:
        tile = dot4x4_q4k_blocks
    if scales.dtype == types.int8:
        tile = dot4x4_q6k_blocks
    has_mins = w.dtype == types.uint8  # q4a/q4k; q4 (no mins) is told apart at run time

    def tile4x4(w, r, scales, mins, prep, t):
        xq, xd, xaux = prep[2], prep[3], prep[aux]
        w_addr, s_addr, m_addr, m_stride, x_addr, xd_addr, xaux_addr = _operands(w, r, scales, mins, xq, xd, xaux, t)
        w_stride = w.strides[0]
        strides = (xq.strides[0], xd.strides[0], xaux.strides[0])
        if has_mins and m_addr == 0:  # q4: no mins
            return dot4x4_q4_blocks(w_addr, w_stride, s_addr, scales.strides[0], 0, 0, x_addr, strides[0], xd_addr,
                           strides[1], xaux_addr, strides[2], xd.shape[1])
        return tile(w_addr, w_stride, s_addr, scales.strides[0], m_addr, m_stride, x_addr, strides[0], xd_addr,
                    strides[1], xaux_addr, strides[2], xd.shape[1])

    return tile4x4


def _row_codes(w, r, wm):
    """Row r's values as codes * scale + min are laid out in the store (pure-Python forms):
    (codes float32 [K], True for q4's offset of -8)."""
    if w.dtype == np.int8:
        return w[r].astype(np.float32)
    codes = np.stack([w[r] & 15, w[r] >> 4], axis=1).astype(np.float32).reshape(-1)  # 2j low nibble, 2j+1 high
    return codes if wm.shape[0] else codes - 8


# Per-token queues of active neurons whose down columns are added four at a time. Every array
# is indexed in place (token t, slot, group row i), never sliced: a view made per neuron takes
# and drops an NRT reference count (atomic operations) on the hot path.

@njit(fastmath=FAST)
def _queue(ws4, wm4, i, h, t, slot, coef4, offset, nibbles):
    for b in range(ws4.shape[1]):
        coef4[t, slot, b] = h * ws4[i, b]
    if nibbles:
        if wm4.shape[1]:
            for b in range(ws4.shape[1]):
                offset[t, b] += h * wm4[i, b]
        else:
            for b in range(ws4.shape[1]):
                offset[t, b] -= np.float32(8.0) * h * ws4[i, b]


def queue_axpy(w, ws4, wm4, i, h, t, slot, coef4, offset):
    """Queue h * value(row) in token t's queue for flush_axpy4: coef4[t, slot] = h * the row's
    block scales (ws4[i]/wm4[i], from row_scales_into), and the row's h * min (q4: -8 h scale)
    added to offset[t] (nibble rows). coef4 [T, 4, K/32], offset [T, K/32]."""
    _queue(ws4, wm4, i, h, t, slot, coef4, offset, w.dtype == np.uint8)


def flush_axpy4(w, rows, n_queued, coef4, offset, acc, t):
    """acc[t] += token t's queued rows (rows[t, :n_queued] of w, at most 4), then empties its
    queue (offset[t] zeroed); acc in prepare_input's order (pure-Python form: the store's)."""
    for i in range(n_queued):
        values = _row_codes(w, rows[t, i], np.zeros(0, np.float32)).reshape(-1, BLOCK) * coef4[t, i][:, None]
        if w.dtype == np.uint8:  # _row_codes took 8 off (q4's offset): offset carries it instead
            values += 8 * coef4[t, i][:, None]
        acc[t] += values.reshape(-1)
    if w.dtype == np.uint8:
        acc[t] += np.repeat(offset[t], BLOCK)
    offset[t] = 0.0


@overload(queue_axpy)
def _queue_axpy_jit(w, ws4, wm4, i, h, t, slot, coef4, offset):
    nibbles = w.dtype == types.uint8  # decided at compile time, per dtype
    return lambda w, ws4, wm4, i, h, t, slot, coef4, offset: _queue(ws4, wm4, i, h, t, slot, coef4, offset, nibbles)


@overload(flush_axpy4)
def _flush_axpy4_jit(w, rows, n_queued, coef4, offset, acc, t):
    axpy4 = axpy4_u4_blocks if w.dtype == types.uint8 else axpy4_i8_blocks

    def flush(w, rows, n_queued, coef4, offset, acc, t):
        if n_queued == 0:
            return
        base, stride = w.ctypes.data, w.strides[0]
        for i in range(n_queued, 4):  # unused slots: the first row again, with coefficients 0
            rows[t, i] = rows[t, 0]
            for b in range(coef4.shape[2]):
                coef4[t, i, b] = 0.0
        axpy4(base + rows[t, 0] * stride, base + rows[t, 1] * stride, base + rows[t, 2] * stride,
              base + rows[t, 3] * stride, coef4.ctypes.data + t * coef4.strides[0],
              offset.ctypes.data + t * offset.strides[0], acc.ctypes.data + t * acc.strides[0], coef4.shape[2])
        for b in range(offset.shape[1]):
            offset[t, b] = 0.0

    return flush


def row_scales_into(scales, mins, r, ws4, wm4, i):
    """ws4[i] = row r's block scales as float32 (wm4[i] its mins, q4a), as row_scales does into
    rows of 2-D scratch, without views (pure-Python form)."""
    _scales_into_by_integer_ops(scales, mins, r, ws4, wm4, i)


@njit(fastmath=FAST)
def _scales_into_by_integer_ops(scales, mins, r, ws4, wm4, i):
    for b in range(ws4.shape[1]):
        ws4[i, b] = widen(scales[r, b])
    for b in range(wm4.shape[1]):
        wm4[i, b] = widen(mins[r, b])


@overload(row_scales_into)
def _row_scales_into_jit(scales, mins, r, ws4, wm4, i):
    if NATIVE_F16:

        def by_fpext(scales, mins, r, ws4, wm4, i):
            widen_f16(scales.ctypes.data + r * scales.strides[0], ws4.ctypes.data + i * ws4.strides[0], ws4.shape[1])
            if wm4.shape[1]:
                widen_f16(mins.ctypes.data + r * mins.strides[0], wm4.ctypes.data + i * wm4.strides[0], wm4.shape[1])

        return by_fpext
    # blocks.widen's integer method
    return lambda scales, mins, r, ws4, wm4, i: _scales_into_by_integer_ops(scales, mins, r, ws4, wm4, i)


@njit(fastmath=FAST)
def row_scratch(w, mins, group, n_features):
    """(ws, wm) float32 scratch [K/32] (q6k: [K/16]): a row's scales and mins (row_scales,
    int_row_dot), sized for w's rows (empty when unused)."""
    n = n_features // group if uses_int_dots(w, group) else 0
    return np.empty(n, np.float32), np.empty(n if mins.shape[1] else 0, np.float32)


# ---- float row functions (f32 / f16, and q8/q4/q4a in groups other than 32) ----------

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
    if w.dtype == np.int8:
        scheme = "q6k" if scales.dtype == np.int8 else "q8"
    else:
        scheme = "q4k" if scales.dtype == np.uint8 else ("q4a" if mins.shape[1] else "q4")
    k = w.shape[1] * (1 if w.dtype == np.int8 else 2)
    if scheme in ("q4k", "q6k"):  # their packed scale bytes as they are
        qt = quant.QuantizedTensor(scheme, group, (1, k), w[r : r + 1], scales[r : r + 1],
                                   mins[r : r + 1] if scheme == "q4k" else None)
        return quant.dequantize(qt)[0]
    qt = quant.QuantizedTensor(scheme, group, (1, k), w[r : r + 1], scales[r : r + 1].view(np.float16),
                               mins[r : r + 1].view(np.float16) if scheme == "q4a" else None)
    return quant.dequantize(qt)[0]


@overload(row_dot)
def _row_dot_jit(w, scales, mins, group, r, x, xs, t):
    if _is_float_weight(w.dtype):

        def dot_float(w, scales, mins, group, r, x, xs, t):
            acc = np.float32(0.0)
            for k in range(x.shape[1]):
                acc += widen(w[r, k]) * x[t, k]
            return acc

        return dot_float
    if w.dtype == types.int8 and scales.dtype == types.int8:

        def dot_q6k(w, scales, mins, group, r, x, xs, t):
            acc = np.float32(0.0)
            for g in range(w.shape[1] // Q6K_GROUP):
                part = np.float32(0.0)
                for j in range(g * Q6K_GROUP, (g + 1) * Q6K_GROUP):
                    part += np.float32(w[r, j]) * x[t, j]
                acc += part * q6k_group_scale(scales, r, g)
            return acc

        return dot_q6k
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
            acc = np.float32(0.0)
            half = group // 2
            for g in range(w.shape[1] // half):
                qx = np.float32(0.0)
                for j in range(half):
                    b = np.int32(w[r, g * half + j])
                    qx += (np.float32(b & np.int32(15)) * x[t, g * group + j]
                           + np.float32(b >> np.int32(4)) * x[t, g * group + half + j])
                s, m = group_scale_min(scales, mins, r, g)
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
    if w.dtype == types.int8 and scales.dtype == types.int8:

        def values_q6k(w, scales, mins, group, r, out):
            for g in range(w.shape[1] // Q6K_GROUP):
                s = q6k_group_scale(scales, r, g)
                for j in range(g * Q6K_GROUP, (g + 1) * Q6K_GROUP):
                    out[j] = s * np.float32(w[r, j])

        return values_q6k
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
            for g in range(w.shape[1] // half):
                s, m = group_scale_min(scales, mins, r, g)
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
    if w.dtype == types.int8 and scales.dtype == types.int8:

        def axpy_q6k(w, scales, mins, group, r, coef, out, t):
            for g in range(w.shape[1] // Q6K_GROUP):
                s = coef * q6k_group_scale(scales, r, g)
                for j in range(g * Q6K_GROUP, (g + 1) * Q6K_GROUP):
                    out[t, j] += s * np.float32(w[r, j])

        return axpy_q6k
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
            for g in range(w.shape[1] // half):
                s, m = group_scale_min(scales, mins, r, g)
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
