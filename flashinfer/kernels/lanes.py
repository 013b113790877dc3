"""Rows in lanes: a resident integer matrix laid out so that one vpdpbusd serves eight rows.

The row-at-a-time kernels (simd.dot4_*, dot4x4_*) spend one vpdpbusd on a block of one row and
one token, then a conversion, a broadcast of the block's scale and a multiply-add to fold it
into that row's accumulator: about five operations per 32 products, so a prefill tile ran at
~80 GMAC/s on this host's two cores whatever the memory did. Here (the layout of oneDNN's and
ggml's repacked VNNI GEMMs) a 32-byte vector holds four consecutive codes of each of eight
rows, and a token's matching four activation codes are broadcast to all eight lanes: eight
vpdpbusd cover a block of 32 for eight rows, and the block's scales are one vector op for the
eight rows together. 2026-12-07, /tmp experiment in the commit message: q8 [2048, 640] x 64
tokens 78 -> 243 GMAC/s, one token 2.4x, a [11008, 4096] matrix from DRAM 1.8x.

Layout (weights.interleave_rows writes it, plain_rows undoes it), for rows 8G..8G+7, block b of
32 weights, k-group g = 0..7 (weights 32b + 4g .. 32b + 4g + 3):
  codes (data[G, b]):
    q8, q6k (int8 codes): eight vectors, vector g = rows 0..7's four codes of k-group g, each
        code + 128 (an unsigned byte for vpdpbusd; the 128 x activation sum comes off again);
    q4, q4a, q4k (nibbles 0..15): four vectors, vector p's low nibbles k-group p, high nibbles
        k-group p + 4, same order.
  scales / mins (scales[G], mins[G], one flat row per group of eight rows): every per-row value
    of the store's row (storage/quant.py) becomes eight values side by side, row 0 first:
    q8/q4/q4a the f16 block scales (and q4a's f16 mins); q4k the 6-bit scales (mins) of each
    block, then each super-block's f16 d (dmin); q6k the int8 scales of each group of 16, then
    each super-block's f16 d. q4 has no mins (its -8 is -8 x scale). Same bytes as the rows.

Only where the host has AVX512-VNNI with 256-bit vectors (simd.HAS_VNNI) and converts f16 in
an instruction: elsewhere matrices stay plain rows and the row kernels run.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic, overload

from .simd import (_F32, _I8, _I16, _I32, _I64, _carried_loop, _const_vec, _fmuladd, _load, _shuffle, _splat8,
                   _strided, _vec)

ROWS = 8  # rows a group holds side by side (weights.ROWS_INTERLEAVED)
TOKEN_PASSES = (8, 4, 1)  # tokens one call dots with a group of rows: the widest that fits first


def leading_units(dtype_name: str, width: int, n_blocks: int) -> int:
    """Leading values of a scales/mins row (`width` elements of dtype_name) laid out one by one:
    all of an f16 row (uint16); q4k's 6-bit values (uint8, one a block); q6k's int8 scales (two
    a block). The rest are f16 multipliers, laid out as byte pairs."""
    return {"uint16": width, "uint8": n_blocks, "int8": 2 * n_blocks}[dtype_name]


def _vpdpbusd_acc(builder, acc, u8x32, s8x32):
    """acc + <8 x i32> sums of four u8 x s8 products each (llvm.x86.avx512.vpdpbusd.256)."""
    v8 = _vec(_I32, 8)
    fn = builder.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.256", (), ir.FunctionType(v8, [v8, v8, v8]))
    return builder.call(fn, [acc, builder.bitcast(u8x32, v8), builder.bitcast(s8x32, v8)])


def _splat_i32(builder, addr):
    """<8 x i32> of the int32 at addr in every lane (four activation codes, or a code sum)."""
    v = builder.load(builder.inttoptr(addr, _I32.as_pointer()), align=1)
    one = builder.insert_element(ir.Constant(_vec(_I32, 8), None), v, ir.Constant(_I32, 0))
    return _shuffle(builder, one, ir.Constant(_vec(_I32, 8), None), [0] * 8)


def _f32_splat(builder, addr):
    return _splat8(builder, builder.load(builder.inttoptr(addr, _F32.as_pointer()), align=4))


def _halves8(builder, addr):
    """<8 x float> of the eight IEEE halves at addr (one vcvtph2ps)."""
    bits = builder.load(builder.inttoptr(addr, _vec(_I16, 8).as_pointer()), align=2)
    return builder.fpext(builder.bitcast(bits, _vec(ir.HalfType(), 8)), _vec(_F32, 8))


def _bytes8(builder, addr, signed: bool):
    """<8 x float> of the eight bytes at addr (q4k's 6-bit values, q6k's int8 scales)."""
    v = builder.load(builder.inttoptr(addr, _vec(_I8, 8).as_pointer()), align=1)
    return builder.sitofp(v, _vec(_F32, 8)) if signed else builder.uitofp(v, _vec(_F32, 8))


def _at(builder, base, *terms):
    """base + sum of (value, constant multiplier) terms, as i64."""
    for value, mul in terms:
        value = value if isinstance(value, ir.Value) else ir.Constant(_I64, value)
        base = builder.add(base, builder.mul(value, ir.Constant(_I64, mul)) if mul != 1 else value)
    return base


def _block_scales(builder, kind: str, s, m, b, n_blocks):
    """(scale vectors, min vector or None) of block b for eight rows: one scale vector per set of
    k-groups sharing a scale (q6k: two, its groups of 16), each <8 x float> row by row."""
    sb = builder.lshr(b, ir.Constant(_I64, 3))  # super-block (q4k / q6k)
    if kind in ("q8", "q4", "q4a"):
        ws = _halves8(builder, _at(builder, s, (b, 16)))
        if kind == "q8":
            return [ws], None
        if kind == "q4":
            return [ws], builder.fmul(ws, _splat8(builder, ir.Constant(_F32, -8.0)))
        return [ws], _halves8(builder, _at(builder, m, (b, 16)))
    if kind == "q4k":
        d = _halves8(builder, _at(builder, s, (n_blocks, 8), (sb, 16)))
        dmin = _halves8(builder, _at(builder, m, (n_blocks, 8), (sb, 16)))
        ws = builder.fmul(d, _bytes8(builder, _at(builder, s, (b, 8)), False))
        wm = builder.fneg(builder.fmul(dmin, _bytes8(builder, _at(builder, m, (b, 8)), False)))
        return [ws], wm
    d = _halves8(builder, _at(builder, s, (n_blocks, 16), (sb, 16)))  # q6k: 2 n_blocks groups of 16 first
    first = _at(builder, s, (b, 16))
    return [builder.fmul(d, _bytes8(builder, first, True)),
            builder.fmul(d, _bytes8(builder, builder.add(first, ir.Constant(_I64, 8)), True))], None


def _codegen(kind: str, n_tokens: int):
    """Codegen of lanes_<kind>_<n_tokens>: see _intrinsic."""
    signed = kind in ("q8", "q6k")
    halves = 2 if kind == "q6k" else 1  # sets of k-groups with a scale of their own
    chains = 4 if n_tokens == 1 else 1  # independent vpdpbusd chains (one token has no other parallelism)
    zero_i = ir.Constant(_vec(_I32, 8), [ir.Constant(_I32, 0)] * 8)
    zero_f = ir.Constant(_vec(_F32, 8), [ir.Constant(_F32, 0.0)] * 8)

    def codegen(context, builder, signature, args):
        w, s, m, x, x_stride, xd, xd_stride, xaux, xaux_stride, out, out_stride, n = args
        tokens = [_strided(builder, x, x_stride, t) for t in range(n_tokens)]

        def body(builder, b, carried):
            scales, mins = _block_scales(builder, kind, s, m, b, n)
            if signed:
                at = _at(builder, w, (b, 256))
                codes = [_load(builder, at, ir.Constant(_I64, 32 * g), _vec(_I8, 32)) for g in range(8)]
            else:
                at = _at(builder, w, (b, 128))
                packed = [_load(builder, at, ir.Constant(_I64, 32 * p), _vec(_I8, 32)) for p in range(4)]
                codes = [builder.and_(v, _const_vec(_I8, [15] * 32)) for v in packed]
                codes += [builder.lshr(v, _const_vec(_I8, [4] * 32)) for v in packed]
            x_block = _at(builder, ir.Constant(_I64, 0), (b, 32))
            new = []
            for t in range(n_tokens):
                sums = [[zero_i] * chains for _ in range(halves)]
                for g in range(8):
                    xv = builder.bitcast(_splat_i32(builder, builder.add(tokens[t], builder.add(x_block, ir.Constant(_I64, 4 * g)))),
                                         _vec(_I8, 32))
                    h, c = g * halves // 8, g % chains
                    sums[h][c] = _vpdpbusd_acc(builder, sums[h][c], codes[g], xv)
                d_x = _f32_splat(builder, _at(builder, xd, (xd_stride, t), (b, 4)))
                acc = carried[t]
                for h in range(halves):
                    isum = sums[h][0]
                    for c in range(1, chains):
                        isum = builder.add(isum, sums[h][c])
                    if signed:  # codes + 128: take 128 x the activations' code sum (per 32, or per 16 for q6k) off
                        unit = builder.add(builder.mul(b, ir.Constant(_I64, halves)), ir.Constant(_I64, h))
                        total = _splat_i32(builder, _at(builder, xaux, (xaux_stride, t), (unit, 4)))
                        isum = builder.sub(isum, builder.shl(total, _const_vec(_I32, [7] * 8)))
                    acc = _fmuladd(builder, builder.sitofp(isum, _vec(_F32, 8)), builder.fmul(scales[h], d_x), acc)
                if mins is not None:  # the min (q4: -8 x scale) times the block's dequantized activation sum
                    acc = _fmuladd(builder, mins, _f32_splat(builder, _at(builder, xaux, (xaux_stride, t), (b, 4))), acc)
                new.append(acc)
            return new

        final = _carried_loop(builder, n, [zero_f] * n_tokens, body, name="lanes")
        for t in range(n_tokens):
            ptr = builder.inttoptr(_strided(builder, out, out_stride, t), _vec(_F32, 8).as_pointer())
            builder.store(final[t], ptr, align=4)
        return context.get_dummy_value()

    return codegen


def _intrinsic(kind: str, n_tokens: int):
    """The dots of one group of eight rows (codes at w, scales at s, mins at m or 0) with n_tokens
    tokens (int8 codes at x + t x_stride, float32 block scales at xd + t xd_stride, and at xaux +
    t xaux_stride their int32 code sums per 32 (q8) or per 16 (q6k), or their dequantized float32
    sums per 32 (nibbles)) over n_blocks blocks: token t's eight floats at out + t out_stride."""
    def lanes(typingctx, w, s, m, x, x_stride, xd, xd_stride, xaux, xaux_stride, out, out_stride, n_blocks):
        return types.void(*([types.intp] * 12)), _codegen(kind, n_tokens)

    return intrinsic(lanes)


KINDS = ("q8", "q6k", "q4", "q4a", "q4k")
_KERNELS = {(kind, t): _intrinsic(kind, t) for kind in KINDS for t in TOKEN_PASSES}


def _kind(w_dtype, s_dtype) -> str:
    """The scheme of a matrix in lanes, from its numba dtypes (q4a also stands for q4: told apart
    at run time by whether it has mins)."""
    if w_dtype == types.int8:
        return "q6k" if s_dtype == types.int8 else "q8"
    return "q4k" if s_dtype == types.uint8 else "q4a"


def lanes_rows(prep, w, scales, mins, bias, out, lo, hi):
    """out[t, n] (+ bias[n]) for rows lo..hi - 1 (multiples of ROWS) of a matrix in lanes, x laid
    out by blocks.prepare_input. Compiled only (no matrix is laid out with the JIT off)."""
    raise NotImplementedError("rows in lanes run compiled only (weights.interleave_rows keeps them plain without JIT)")


@overload(lanes_rows)
def _lanes_rows_jit(prep, w, scales, mins, bias, out, lo, hi):
    kind = _kind(w.dtype, scales.dtype)
    rows = _rows_over(kind)
    no_mins = _rows_over("q4") if kind == "q4a" else rows  # q4: q4a's dtypes without mins

    def lanes(prep, w, scales, mins, bias, out, lo, hi):
        if mins.shape[0] == 0:
            no_mins(prep, w, scales, mins, bias, out, lo, hi)
        else:
            rows(prep, w, scales, mins, bias, out, lo, hi)

    return lanes


_ROWS_OVER: dict = {}


def _rows_over(kind: str):
    """lanes_rows for one scheme: each group of eight rows against the tokens in passes of 8, 4
    and 1 (TOKEN_PASSES)."""
    if kind in _ROWS_OVER:
        return _ROWS_OVER[kind]
    k8, k4, k1 = (_KERNELS[(kind, t)] for t in TOKEN_PASSES)
    aux = {"q8": 4, "q6k": 1}.get(kind, 5)  # prep's code sums per 32 / per 16, or dequantized block sums

    @njit(nogil=True)
    def rows(prep, w, scales, mins, bias, out, lo, hi):
        xq, xd, xaux = prep[2], prep[3], prep[aux]
        n_tokens, n_blocks = xq.shape[0], xd.shape[1]
        vals = np.empty((TOKEN_PASSES[0], ROWS), np.float32)
        for g in range(lo // ROWS, hi // ROWS):
            w_at = w.ctypes.data + g * w.strides[0]
            s_at = scales.ctypes.data + g * scales.strides[0]
            m_at = mins.ctypes.data + g * mins.strides[0] if mins.shape[0] else 0
            t = 0
            while t < n_tokens:
                x_at, xd_at = xq.ctypes.data + t * xq.strides[0], xd.ctypes.data + t * xd.strides[0]
                xaux_at, at = xaux.ctypes.data + t * xaux.strides[0], vals.ctypes.data
                if t + 8 <= n_tokens:
                    step = 8
                    k8(w_at, s_at, m_at, x_at, xq.strides[0], xd_at, xd.strides[0], xaux_at, xaux.strides[0], at,
                       vals.strides[0], n_blocks)
                elif t + 4 <= n_tokens:
                    step = 4
                    k4(w_at, s_at, m_at, x_at, xq.strides[0], xd_at, xd.strides[0], xaux_at, xaux.strides[0], at,
                       vals.strides[0], n_blocks)
                else:
                    step = 1
                    k1(w_at, s_at, m_at, x_at, xq.strides[0], xd_at, xd.strides[0], xaux_at, xaux.strides[0], at,
                       vals.strides[0], n_blocks)
                for j in range(step):
                    for i in range(ROWS):
                        out[t + j, g * ROWS + i] = vals[j, i] + (bias[g * ROWS + i] if bias.shape[0] else np.float32(0.0))
                t += step

    _ROWS_OVER[kind] = rows
    return rows


def lanes_row(w, scales, mins, r):
    """Row r of a matrix in lanes as the store's plain row: (codes [1, ...], scales [1, ...], mins
    [1, ...] or the empty mins), what blocks.row_axpy takes (a tied head's embedding lookups).
    Compiled only."""
    raise NotImplementedError("rows in lanes run compiled only")


@overload(lanes_row)
def _lanes_row_jit(w, scales, mins, r):
    codes_of = _signed_codes if w.dtype == types.int8 else _nibble_codes
    # leading_units is linear in (width, n_blocks): its two coefficients per dtype, taken from it here
    s_row, s_block = leading_units(scales.dtype.name, 1, 0), leading_units(scales.dtype.name, 0, 1)
    m_row, m_block = leading_units(mins.dtype.name, 1, 0), leading_units(mins.dtype.name, 0, 1)  # none: f16 [0, 0]

    def row(w, scales, mins, r):
        g, i = r // ROWS, r % ROWS
        n_blocks = w.shape[1]
        s = _unlane(scales, g, i, s_row * (scales.shape[1] // ROWS) + s_block * n_blocks)
        m = _unlane(mins, g, i, m_row * (mins.shape[1] // ROWS) + m_block * n_blocks) if mins.shape[0] else mins[:0]
        return codes_of(w, g, i), s, m

    return row


@njit(nogil=True)
def _signed_codes(w, g, i):
    """Row 8g + i's int8 codes [1, K] (q8, q6k), the + 128 taken off."""
    codes = np.empty((1, w.shape[1] * 32), np.int8)
    for b in range(w.shape[1]):
        for k in range(8):
            for j in range(4):
                codes[0, 32 * b + 4 * k + j] = np.int8(np.int32(w[g, b, 32 * k + 4 * i + j]) ^ np.int32(-128))
    return codes


@njit(nogil=True)
def _nibble_codes(w, g, i):
    """Row 8g + i's nibbles [1, K / 2] as the store packs them (2e low, 2e + 1 high)."""
    codes = np.zeros((1, w.shape[1] * 16), np.uint8)
    for b in range(w.shape[1]):
        for k in range(8):
            for j in range(4):
                byte = np.int32(w[g, b, 32 * (k % 4) + 4 * i + j])
                code = byte & 15 if k < 4 else byte >> 4
                e = 4 * k + j
                codes[0, 16 * b + e // 2] |= np.uint8(code << (4 * (e % 2)))
    return codes


@njit(nogil=True)
def _unlane(a, g, i, first):
    """Row 8g + i of a laid-out scales/mins array (row g of a), as the store's row [1, ...]: its
    first `first` values a lane each, then f16 multipliers as byte pairs (q4k's, q6k's)."""
    width = a.shape[1] // ROWS
    row = np.empty((1, width), a.dtype)
    for u in range(first):
        row[0, u] = a[g, u * ROWS + i]
    raw, out = a[g].view(np.uint8), row[0].view(np.uint8)
    for u in range((width - first) // 2):  # two bytes per row and multiplier
        for byte in range(2):
            out[first + 2 * u + byte] = raw[first * ROWS + (u * ROWS + i) * 2 + byte]
    return row
