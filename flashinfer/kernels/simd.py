"""Block-scaled integer dot products, written as LLVM vector IR (numba intrinsics).

Numba leaves the natural loop (32 int8 products summed per block, then one float multiply
per block) scalar: the fixed 32-trip inner loop is unrolled and the reduction per block defeats
the vectorizers (1.4-2.8 GB/s on a [11008, 4096] q8 matrix, whatever the source shape; a
whole-row integer dot with no scales reached 30 GB/s). Here the loop over blocks is written
in IR with the accumulator an <8 x float> vector, as ggml's AVX2 kernels keep it: per block the
int8 x int8 (or nibble x int8) products are summed in int16 pairs, widened to <8 x i32>,
converted and multiplied by the block's scale into the vector accumulator; one horizontal sum
per row. The IR is generic (no x86 intrinsics), so LLVM lowers it for whatever CPU numba
targets: on AVX2/AVX-512 it becomes vpmovsxbw / vpmullw / vpaddw / vpmovsxwd / vpaddd /
vcvtdq2ps / vfmadd per 32 weights (bench/kernels.py: q8 3 -> 15-22 GB/s, q4 1.5 -> 8-11 GB/s
on one core of this 2-core EPYC).

Numba's on-disk cache keys a kernel on the source file it is defined in, not on the intrinsics
it calls: after editing this file, delete flashinfer/kernels/__pycache__ (a fresh clone or an
install has fresh files and never sees a stale entry).
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

BLOCK = 32  # activation block: 32 int8 codes share one float32 scale (ggml's Q8_0)

_I8, _I16, _I32, _I64, _F32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()


def _host_features() -> dict:
    import llvmlite.binding as llvm

    try:
        return dict(llvm.get_host_cpu_features())
    except RuntimeError:  # no feature list for this host
        return {}


# AVX512-VNNI's vpdpbusd: 32 unsigned x signed byte products summed into 8 int32 lanes in one
# instruction (Zen 4, Ice Lake and later). Numba compiles for the host CPU, so the choice is
# made once, here; elsewhere the generic IR below (int16 products) is the portable fallback.
_FEATURES = _host_features()
HAS_VNNI = bool(_FEATURES.get("avx512vnni") and _FEATURES.get("avx512vl"))


def _vpdpbusd(builder, u8x32, s8x32):
    """<8 x i32> sums of four u8 x s8 products each (llvm.x86.avx512.vpdpbusd.256, zero start)."""
    v8 = _vec(_I32, 8)
    fn = builder.module.declare_intrinsic("llvm.x86.avx512.vpdpbusd.256", (), ir.FunctionType(v8, [v8, v8, v8]))
    zero = ir.Constant(v8, [ir.Constant(_I32, 0)] * 8)
    return builder.call(fn, [zero, builder.bitcast(u8x32, v8), builder.bitcast(s8x32, v8)])


def _vec(t, n: int) -> ir.VectorType:
    return ir.VectorType(t, n)


def _const_vec(t, values) -> ir.Constant:
    return ir.Constant(_vec(t, len(values)), [ir.Constant(t, v) for v in values])


def _shuffle(builder, a, b, idx):
    return builder.shuffle_vector(a, b, _const_vec(_I32, list(idx)))


def _halves(builder, v, n: int):
    undef = ir.Constant(v.type, None)
    return _shuffle(builder, v, undef, range(n // 2)), _shuffle(builder, v, undef, range(n // 2, n))


def _load(builder, addr, offset, vec_type):
    ptr = builder.inttoptr(builder.add(addr, offset), vec_type.as_pointer())
    return builder.load(ptr, align=1)


def _i16x16(builder, addr, offset, signed: bool = True):
    """16 bytes at addr + offset, widened to <16 x i16>."""
    v = _load(builder, addr, offset, _vec(_I8, 16))
    return builder.sext(v, _vec(_I16, 16)) if signed else builder.zext(v, _vec(_I16, 16))


def _sum_to_i32x8(builder, p16):
    """<16 x i16> -> <8 x i32>: lane i plus lane i+8 (a sum does not care which lanes pair up)."""
    lo, hi = _halves(builder, builder.sext(p16, _vec(_I32, 16)), 16)
    return builder.add(lo, hi)


def _f32_at(builder, addr, b):
    """The float32 at addr + 4b."""
    ptr = builder.inttoptr(builder.add(addr, builder.mul(b, ir.Constant(_I64, 4))), _F32.as_pointer())
    return builder.load(ptr, align=4)


def _scaled(builder, isum, w_scale_addr, x_scale_addr, b):
    """float(isum) * w_scale[b] * x_scale[b] (float32 arrays at the two addresses)."""
    s = builder.fmul(_f32_at(builder, w_scale_addr, b), _f32_at(builder, x_scale_addr, b))
    splat = builder.insert_element(ir.Constant(_vec(_F32, 8), None), s, ir.Constant(_I32, 0))
    splat = _shuffle(builder, splat, ir.Constant(_vec(_F32, 8), None), [0] * 8)
    return builder.fmul(builder.sitofp(isum, _vec(_F32, 8)), splat)


def _hsum(builder, acc):
    a4 = builder.fadd(*_halves(builder, acc, 8))
    a2 = builder.fadd(*_halves(builder, a4, 4))
    return builder.fadd(builder.extract_element(a2, ir.Constant(_I32, 0)),
                        builder.extract_element(a2, ir.Constant(_I32, 1)))


def _block_loop(builder, n_blocks, body):
    """sum over b < n_blocks of body(builder, b) (each an <8 x float>), as one float."""
    entry = builder.block
    loop = builder.append_basic_block("blocks")
    done = builder.append_basic_block("blocks.done")
    zero = ir.Constant(_vec(_F32, 8), [ir.Constant(_F32, 0.0)] * 8)
    builder.cbranch(builder.icmp_signed(">", n_blocks, ir.Constant(_I64, 0)), loop, done)
    builder.position_at_end(loop)
    b = builder.phi(_I64)
    acc = builder.phi(_vec(_F32, 8))
    b.add_incoming(ir.Constant(_I64, 0), entry)
    acc.add_incoming(zero, entry)
    new_acc = builder.fadd(acc, body(builder, b))
    b_next = builder.add(b, ir.Constant(_I64, 1))
    b.add_incoming(b_next, builder.block)
    acc.add_incoming(new_acc, builder.block)
    builder.cbranch(builder.icmp_signed("<", b_next, n_blocks), loop, done)
    builder.position_at_end(done)
    result = builder.phi(_vec(_F32, 8))
    result.add_incoming(zero, entry)
    result.add_incoming(new_acc, loop)
    return _hsum(builder, result)


@intrinsic
def dot_i8_blocks(typingctx, w_addr, x_addr, w_scale_addr, x_scale_addr, n_blocks):
    """sum_b w_scale[b] * x_scale[b] * sum_{j<32} w[32b+j] * x[32b+j]: w and x int8 codes at
    byte addresses, the scales float32[n_blocks] (the weight row's, the activation's).

    Two products sum in int16: |w * x| <= 128 * 127 since activations are never -128."""
    sig = types.float32(types.intp, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        w, x, w_scales, x_scales, n = args

        def body(builder, b):
            off = builder.mul(b, ir.Constant(_I64, BLOCK))
            if HAS_VNNI:  # w * x = |w| * (x with w's sign), as unsigned x signed bytes
                wv = _load(builder, w, off, _vec(_I8, 32))
                xv = _load(builder, x, off, _vec(_I8, 32))
                zero = ir.Constant(_vec(_I8, 32), [ir.Constant(_I8, 0)] * 32)
                negative = builder.icmp_signed("<", wv, zero)
                magnitude = builder.select(negative, builder.sub(zero, wv), wv)
                signed_x = builder.select(negative, builder.sub(zero, xv), xv)
                return _scaled(builder, _vpdpbusd(builder, magnitude, signed_x), w_scales, x_scales, b)
            off16 = builder.add(off, ir.Constant(_I64, 16))
            p16 = builder.add(builder.mul(_i16x16(builder, w, off), _i16x16(builder, x, off)),
                              builder.mul(_i16x16(builder, w, off16), _i16x16(builder, x, off16)))
            return _scaled(builder, _sum_to_i32x8(builder, p16), w_scales, x_scales, b)

        return _block_loop(builder, n, body)

    return sig, codegen


@intrinsic
def dot_u4_blocks(typingctx, w_addr, x_addr, w_scale_addr, x_scale_addr, n_blocks):
    """sum_b w_scale[b] x_scale[b] sum_{j<16} (lo(w[16b+j]) x[32b+j] + hi(w[16b+j]) x[32b+16+j]):
    16 bytes of nibbles (0..15) per block, the low nibble meeting the block's first 16
    activations and the high nibble its last 16 (ggml's Q4_0/Q4_1 order; flashinfer's q4/q4a
    meet it with x deinterleaved by prepare_input). The caller adds the mins' (or q4's -8)
    share, a dot over blocks (blocks.int_row_dot): accumulated here, in a second chain, it made
    the loop 1.25x slower. 15 * 127 * 2 fits int16."""
    sig = types.float32(types.intp, types.intp, types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        w, x, w_scales, x_scales, n = args

        def body(builder, b):
            packed = _load(builder, w, builder.mul(b, ir.Constant(_I64, BLOCK // 2)), _vec(_I8, 16))
            off = builder.mul(b, ir.Constant(_I64, BLOCK))
            if HAS_VNNI:  # nibbles are unsigned bytes already
                codes = _shuffle(builder, builder.and_(packed, _const_vec(_I8, [15] * 16)),
                                 builder.lshr(packed, _const_vec(_I8, [4] * 16)), range(32))
                isum = _vpdpbusd(builder, codes, _load(builder, x, off, _vec(_I8, 32)))
                return _scaled(builder, isum, w_scales, x_scales, b)
            lo = builder.zext(builder.and_(packed, _const_vec(_I8, [15] * 16)), _vec(_I16, 16))
            hi = builder.zext(builder.lshr(packed, _const_vec(_I8, [4] * 16)), _vec(_I16, 16))
            p16 = builder.add(builder.mul(lo, _i16x16(builder, x, off)),
                              builder.mul(hi, _i16x16(builder, x, builder.add(off, ir.Constant(_I64, 16)))))
            return _scaled(builder, _sum_to_i32x8(builder, p16), w_scales, x_scales, b)

        return _block_loop(builder, n, body)

    return sig, codegen


def _splat(builder, addr, b):
    """<32 x float> of the float32 at addr + 4b."""
    ptr = builder.inttoptr(builder.add(addr, builder.mul(b, ir.Constant(_I64, 4))), _F32.as_pointer())
    one = builder.insert_element(ir.Constant(_vec(_F32, 32), None), builder.load(ptr, align=4), ir.Constant(_I32, 0))
    return _shuffle(builder, one, ir.Constant(_vec(_F32, 32), None), [0] * 32)


def _counted_loop(builder, limit, body, step: int = 1, name: str = "loop"):
    """for i in range(0, limit, step): body(builder, i) — an IR loop with no result."""
    _carried_loop(builder, limit, [], lambda builder, i, carried: body(builder, i) or [], step=step, name=name)


def _prefetch_line(builder, addr):
    """llvm.prefetch of the cache line at byte address addr: read, keep in all levels."""
    fn = builder.module.declare_intrinsic("llvm.prefetch", (), ir.FunctionType(
        ir.VoidType(), [ir.PointerType(_I8), _I32, _I32, _I32]))
    ptr = builder.inttoptr(addr, ir.PointerType(_I8))
    builder.call(fn, [ptr, ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])


@intrinsic
def prefetch_lines(typingctx, addr, n_bytes):
    """Ask for the cache lines of n_bytes at addr ahead of use (llvm.prefetch, read, keep in
    all levels). Bundles of the neuron cache are read a component at a time with large
    strides, which the hardware prefetcher does not follow: a q8 dot over a strided row ran
    at a third of its speed over contiguous rows."""
    sig = types.void(types.intp, types.intp)

    def codegen(context, builder, signature, args):
        start, size = args
        _counted_loop(builder, size, lambda builder, off: _prefetch_line(builder, builder.add(start, off)), step=64,
                      name="prefetch")
        return context.get_dummy_value()

    return sig, codegen


def _codes_f32(builder, w, b, nibbles: bool):
    """Block b of a row at w as <32 x float> codes: int8, or nibbles in ggml's order (lo | hi)."""
    if not nibbles:
        return builder.sitofp(_load(builder, w, builder.mul(b, ir.Constant(_I64, BLOCK)), _vec(_I8, 32)),
                              _vec(_F32, 32))
    packed = _load(builder, w, builder.mul(b, ir.Constant(_I64, BLOCK // 2)), _vec(_I8, 16))
    lo = builder.and_(packed, _const_vec(_I8, [15] * 16))
    hi = builder.lshr(packed, _const_vec(_I8, [4] * 16))
    return builder.uitofp(_shuffle(builder, lo, hi, range(32)), _vec(_F32, 32))


def _axpy4(nibbles: bool):
    def codegen(context, builder, signature, args):
        w0, w1, w2, w3, coef, offset, acc, n = args

        def body(builder, b):
            ptr = builder.inttoptr(builder.add(acc, builder.mul(b, ir.Constant(_I64, 4 * BLOCK))),
                                   _vec(_F32, 32).as_pointer())
            total = builder.load(ptr, align=4)
            for i, w in enumerate((w0, w1, w2, w3)):
                row_coef = builder.add(coef, builder.mul(n, ir.Constant(_I64, 4 * i)))
                total = builder.fadd(total, builder.fmul(_codes_f32(builder, w, b, nibbles), _splat(builder, row_coef, b)))
            if nibbles:
                total = builder.fadd(total, _splat(builder, offset, b))
            builder.store(total, ptr, align=4)

        _counted_loop(builder, n, body, name="axpy")
        return context.get_dummy_value()

    return codegen


def _axpy4_intrinsic(nibbles: bool):
    def axpy4(typingctx, w0, w1, w2, w3, coef_addr, offset_addr, acc_addr, n_blocks):
        sig = types.void(*([types.intp] * 8))
        return sig, _axpy4(nibbles)

    return axpy4


# acc[block b] += sum_i coef[i, b] * codes(w_i, b) (+ offset[b] for nibble rows, whose acc is in
# prepare_input's order): four neurons' down columns in one pass over acc, which one neuron at a
# time was read and written four times (the down-projection's cost in decode). coef float32
# [4, n_blocks] contiguous; offset float32 [n_blocks] (unused for int8 rows).
axpy4_i8_blocks = intrinsic(_axpy4_intrinsic(False))
axpy4_u4_blocks = intrinsic(_axpy4_intrinsic(True))


def _has_native_f16() -> bool:
    """Whether LLVM converts half to float in an instruction here (x86 F16C, any AArch64)
    rather than a compiler-rt call numba's JIT may not link."""
    import llvmlite.binding as llvm

    triple = llvm.get_process_triple()
    if triple.startswith(("aarch64", "arm64")):
        return True
    try:
        return bool(llvm.get_host_cpu_features().get("f16c"))
    except RuntimeError:  # no feature list for this host
        return False


NATIVE_F16 = _has_native_f16()


@intrinsic
def widen_f16(typingctx, src_addr, dst_addr, n):
    """dst[i] = float32(src[i]) for i < n: IEEE halves (raw uint16) widened by LLVM's fpext,
    one vcvtph2ps per 8 on F16C (the integer method of blocks.widen costs ~15 operations an
    element; a q4a row of 576 weights widens 36 of them per dot). Only where NATIVE_F16."""
    sig = types.void(types.intp, types.intp, types.intp)

    def codegen(context, builder, signature, args):
        src, dst, size = args
        # pointers from one base and a GEP per element: LLVM's loop vectorizer sees consecutive
        # accesses (with inttoptr per address it left one vcvtph2ps per element)
        src_ptr = builder.inttoptr(src, ir.HalfType().as_pointer())
        dst_ptr = builder.inttoptr(dst, _F32.as_pointer())
        def body(builder, i):
            value = builder.fpext(builder.load(builder.gep(src_ptr, [i], inbounds=True), align=2), _F32)
            builder.store(value, builder.gep(dst_ptr, [i], inbounds=True), align=4)

        _counted_loop(builder, size, body, name="widen")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def half_to_f32(typingctx, bits):
    """One IEEE half (raw uint16) as float32 by LLVM's fpext: inside a loop over halves the
    vectorizer makes it one vcvtph2ps per 8 (F16C). Only where NATIVE_F16."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)

    return sig, codegen


# ---- four rows per pass ---------------------------------------------------------------


def _carried_loop(builder, limit, inits, body, step: int = 1, name: str = "rows4", start=None):
    """for b in range(start, limit, step): values = body(builder, b, values), starting from `inits`
    (start an i64 value, 0 when None); the final values (the inits when start >= limit). The
    loop-carried values stay in registers."""
    start = ir.Constant(_I64, 0) if start is None else start
    entry = builder.block
    loop = builder.append_basic_block(name)
    done = builder.append_basic_block(name + ".done")
    builder.cbranch(builder.icmp_signed("<", start, limit), loop, done)
    builder.position_at_end(loop)
    b = builder.phi(_I64)
    b.add_incoming(start, entry)
    phis = []
    for v in inits:
        p = builder.phi(v.type)
        p.add_incoming(v, entry)
        phis.append(p)
    new = body(builder, b, phis)
    b_next = builder.add(b, ir.Constant(_I64, step), flags=["nuw", "nsw"])
    b.add_incoming(b_next, builder.block)
    for p, v in zip(phis, new):
        p.add_incoming(v, builder.block)
    body_end = builder.block
    builder.cbranch(builder.icmp_signed("<", b_next, limit), loop, done)
    builder.position_at_end(done)
    results = []
    for init, v in zip(inits, new):
        r = builder.phi(v.type)
        r.add_incoming(init, entry)
        r.add_incoming(v, body_end)
        results.append(r)
    return results


def _half_splat8(builder, addr, b):
    """<8 x float> of the IEEE half at addr + 2b in every lane: vpbroadcastw from memory, then one
    vcvtph2ps (F16C). A scalar half load became vpinsrw into whatever register LLVM picked, once
    an accumulator's, which chained every row's scale to that accumulator's adds (a q4 matmul
    1.3x slower); the broadcast writes its whole register."""
    ptr = builder.inttoptr(builder.add(addr, builder.mul(b, ir.Constant(_I64, 2))), _I16.as_pointer())
    one = builder.insert_element(ir.Constant(_vec(_I16, 8), None), builder.load(ptr, align=2), ir.Constant(_I32, 0))
    bits = _shuffle(builder, one, ir.Constant(_vec(_I16, 8), None), [0] * 8)
    return builder.fpext(builder.bitcast(bits, _vec(ir.HalfType(), 8)), _vec(_F32, 8))


def _q4k_super8(builder, addr, b0, n_blocks, negate: bool):
    """<8 x float> of q4k's scales (or, `negate`, mins) of the eight groups b0..b0+7 of one
    super-block of a row whose packed values start at addr (storage/quant.py): the 6-bit values
    (bytes b0..b0+7) times the super-block's f16 multiplier (at addr + n_blocks + 2 (b0 / 8)),
    -dmin m for mins. Decoded once per super-block, one lane per group."""
    six_bit = builder.load(builder.inttoptr(builder.add(addr, b0), _vec(_I8, 8).as_pointer()), align=1)
    values = builder.uitofp(six_bit, _vec(_F32, 8))
    super_at = builder.add(builder.add(addr, n_blocks), builder.mul(builder.lshr(b0, ir.Constant(_I64, 3)),
                                                                    ir.Constant(_I64, 2)))
    multiplier = _half_splat8(builder, super_at, ir.Constant(_I64, 0))
    product = builder.fmul(values, multiplier)
    return builder.fneg(product) if negate else product


def _lane_splat8(builder, v, j: int):
    """<8 x float> of lane j of v in every lane."""
    return _shuffle(builder, v, ir.Constant(v.type, None), [j] * 8)


def _group_values(builder, kind: str, s_rows, m_rows, b, n_blocks):
    """The functions scale8(r, j) and min8(r, j, scale8) giving block b + j's scale and min of row r,
    each as a <8 x float> splat (min8 None for q8), for a pass over one block (q8/q4/q4a: the f16 at
    row + 2b widened; q4's min is -8 scale) or over a super-block's eight (q4k: decoded once)."""
    if kind != "q4k":
        def scale8(r, j):
            return _half_splat8(builder, s_rows[r], b)

        def min8(r, j, w_scale8):
            if kind == "q4a":
                return _half_splat8(builder, m_rows[r], b)
            return builder.fmul(w_scale8, _splat8(builder, ir.Constant(_F32, -8.0))) if kind == "q4" else None

        return scale8, min8
    scales = [_q4k_super8(builder, s_rows[r], b, n_blocks, False) for r in range(len(s_rows))]
    mins = [_q4k_super8(builder, m_rows[r], b, n_blocks, True) for r in range(len(m_rows))]
    return (lambda r, j: _lane_splat8(builder, scales[r], j), lambda r, j, w_scale8: _lane_splat8(builder, mins[r], j))


def _q6k_super(builder, s_row, b0, n_blocks):
    """(<8 x float> splat of d, <16 x float> the sixteen int8 group scales) of the super-block of
    block b0 in a q6k row whose scales start at s_row (storage/quant.py: the K/16 = 2 n_blocks
    int8 scales, then each super-block's f16 d). Decoded once per super-block."""
    super_block = builder.lshr(b0, ir.Constant(_I64, 3))
    at = builder.add(s_row, builder.mul(super_block, ir.Constant(_I64, 16)))
    sixteen = builder.sitofp(builder.load(builder.inttoptr(at, _vec(_I8, 16).as_pointer()), align=1), _vec(_F32, 16))
    d_at = builder.add(builder.add(s_row, builder.mul(n_blocks, ir.Constant(_I64, 2))),
                       builder.mul(super_block, ir.Constant(_I64, 2)))
    return _half_splat8(builder, d_at, ir.Constant(_I64, 0)), sixteen


def _q6k_pair(builder, sixteen, j: int):
    """The scales of block j's two groups of 16 (j < 8 in its super-block), as _block_sum takes
    them: VNNI's <8 x float> (lanes 0-3 the first group's, 4-7 the second's: vpdpbusd's lanes
    follow the bytes), else a splat of each."""
    if HAS_VNNI:
        return _shuffle(builder, sixteen, ir.Constant(sixteen.type, None), [2 * j] * 4 + [2 * j + 1] * 4)
    return tuple(_shuffle(builder, sixteen, ir.Constant(sixteen.type, None), [g] * 8) for g in (2 * j, 2 * j + 1))


def _strided(builder, base, stride, i: int):
    """base + i * stride (base itself for i == 0): row i's address, or token i's."""
    return base if i == 0 else builder.add(base, builder.mul(stride, ir.Constant(_I64, i)))


def _blocks_per_pass(kind: str) -> int:
    """Blocks one loop iteration of the multi-row intrinsics covers: q4k/q6k a super-block's eight."""
    return 8 if kind in ("q4k", "q6k") else 1


def _pass(builder, kind: str, s, s_stride, m, m_stride, b0, n_blocks):
    """(scale8, min8, sub, blocks) of one loop iteration over four rows from block b0 on: the
    rows' group values (_group_values; scales and mins at s / m with their row strides; for q6k
    scale8 is the super-block's d and sub(r, j) the scales of block j's two groups, else
    sub is None) and the block indices the iteration covers."""
    s_rows = [_strided(builder, s, s_stride, r) for r in range(4)]
    blocks = [b0] + [builder.add(b0, ir.Constant(_I64, j)) for j in range(1, _blocks_per_pass(kind))]
    if kind == "q6k":
        supers = [_q6k_super(builder, s_rows[r], b0, n_blocks) for r in range(4)]
        return (lambda r, j: supers[r][0]), None, (lambda r, j: _q6k_pair(builder, supers[r][1], j)), blocks
    m_rows = [_strided(builder, m, m_stride, r) for r in range(4)]
    scale8, min8 = _group_values(builder, kind, s_rows, m_rows, b0, n_blocks)
    return scale8, min8, None, blocks


def _lane0(builder, v):
    return builder.extract_element(v, ir.Constant(_I32, 0))


def _splat8(builder, s):
    one = builder.insert_element(ir.Constant(_vec(_F32, 8), None), s, ir.Constant(_I32, 0))
    return _shuffle(builder, one, ir.Constant(_vec(_F32, 8), None), [0] * 8)


def _fmuladd(builder, a, b, c):
    """a * b + c, fused where the target has FMA (llvm.fmuladd: LLVM picks; plain IR fmul and
    fadd carry no fast-math flags here, so they were never fused)."""
    suffix = f"v{a.type.count}f32" if isinstance(a.type, ir.VectorType) else "f32"
    fn = builder.module.declare_intrinsic(f"llvm.fmuladd.{suffix}", (), ir.FunctionType(a.type, [a.type] * 3))
    return builder.call(fn, [a, b, c])


def _block_codes(builder, row, b, nibbles: bool):
    """Block b of the weight row at `row`, as _block_isum takes it: VNNI's unsigned bytes (nibbles,
    or q8 codes + 128), else int16 halves (low/high nibbles, or the q8 codes' two halves)."""
    if nibbles:
        packed = _load(builder, row, builder.mul(b, ir.Constant(_I64, BLOCK // 2)), _vec(_I8, 16))
        lo = builder.and_(packed, _const_vec(_I8, [15] * 16))
        hi = builder.lshr(packed, _const_vec(_I8, [4] * 16))
        if HAS_VNNI:
            return _shuffle(builder, lo, hi, range(32))
        return builder.zext(lo, _vec(_I16, 16)), builder.zext(hi, _vec(_I16, 16))
    raw = _load(builder, row, builder.mul(b, ir.Constant(_I64, BLOCK)), _vec(_I8, 32))
    if HAS_VNNI:  # w + 128 as unsigned bytes: sum (w + 128) x - 128 sum x
        return builder.xor(raw, _const_vec(_I8, [-128] * 32))
    return _halves(builder, builder.sext(raw, _vec(_I16, 32)), 32)


def _block_isum(builder, codes, xv, correction):
    """<8 x i32> partial sums of a block's 32 code x activation products (codes from _block_codes,
    xv the token's <32 x i8>); `correction` (q8 on VNNI: 128 x the activations' code sum, in lane
    0; q6k on VNNI: _lane_correction) is subtracted, else None."""
    if HAS_VNNI:
        isum = _vpdpbusd(builder, codes, xv)
        return isum if correction is None else builder.sub(isum, correction)
    x_lo, x_hi = _halves(builder, builder.sext(xv, _vec(_I16, 32)), 32)
    return _sum_to_i32x8(builder, builder.add(builder.mul(codes[0], x_lo), builder.mul(codes[1], x_hi)))


def _block_sum(builder, codes, xv, correction, sub):
    """_block_isum as <8 x float>; `sub` (q6k, from _q6k_pair): each group of 16's products times
    its scale, in float (|sum| <= 16 x 32 x 127 per group: exact), as _tile_codegen folds the
    scales into its multipliers instead on VNNI."""
    if sub is None:
        return builder.sitofp(_block_isum(builder, codes, xv, correction), _vec(_F32, 8))
    if HAS_VNNI:
        return builder.fmul(builder.sitofp(_block_isum(builder, codes, xv, correction), _vec(_F32, 8)), sub)
    x_lo, x_hi = _halves(builder, builder.sext(xv, _vec(_I16, 32)), 32)  # the two groups apart (<= 32 x 127: int16)
    lo = builder.sitofp(_sum_to_i32x8(builder, builder.mul(codes[0], x_lo)), _vec(_F32, 8))
    hi = builder.sitofp(_sum_to_i32x8(builder, builder.mul(codes[1], x_hi)), _vec(_F32, 8))
    return _fmuladd(builder, lo, sub[0], builder.fmul(hi, sub[1]))


def _lane_correction(builder, xv):
    """<8 x i32>: 128 x the sum of each four consecutive activation codes (vpdpbusd of ones), what
    codes + 128 add to each lane of _block_isum on VNNI: q6k scales its lanes apart (_block_sum),
    so the correction is per lane where q8's is one total."""
    ones = _const_vec(_I8, [1] * 32)
    return builder.shl(_vpdpbusd(builder, ones, xv), _const_vec(_I32, [7] * 8))


def _q8_correction(builder, xaux, b):
    """<8 x i32> with 128 x the activations' code sum of block b in lane 0 (the eight lanes are
    summed at the end): what q8's +128 on VNNI adds."""
    ptr = builder.inttoptr(builder.add(xaux, builder.mul(b, ir.Constant(_I64, 4))), _I32.as_pointer())
    c = builder.mul(builder.load(ptr, align=4), ir.Constant(_I32, 128))
    return builder.insert_element(ir.Constant(_vec(_I32, 8), [ir.Constant(_I32, 0)] * 8), c, ir.Constant(_I32, 0))


def _correction(builder, kind: str, xv, xaux, b):
    """What _block_isum subtracts for a block of `kind` on VNNI (None elsewhere and for nibbles)."""
    if not HAS_VNNI or kind not in ("q8", "q6k"):
        return None
    return _lane_correction(builder, xv) if kind == "q6k" else _q8_correction(builder, xaux, b)


# Passes of four rows ahead whose codes the multi-row dots prefetch as they go, a line at a time
# beside the loads of the current pass (_prefetch_rows). The hardware prefetchers follow one
# stream well but not four rows read side by side in short runs (SmolLM2's W_down, [576, 1536]
# q4a, streamed from DRAM at 5.6-6.5 GB/s on one core, 19 GB/s from cache). matmul.py's
# prefetch of the whole next pass at a pass's start stays beside this (without it q8's head
# fell to 0.44-0.61x), but moved 3 passes ahead it did not help. 2 beat 1 and 4 here.
PREFETCH_PASSES = 2


def _prefetch_rows(builder, w, w_stride, offset, n_lines: int):
    """Prefetch n_lines cache lines at `offset` bytes into each of the four rows PREFETCH_PASSES
    passes on (_prefetch_line; a prefetch never faults, so rows past a matrix's end cost a wasted
    line, not an error)."""
    ahead = builder.add(builder.mul(w_stride, ir.Constant(_I64, 4 * PREFETCH_PASSES)), offset)
    for r in range(4):
        at = builder.add(_strided(builder, w, w_stride, r), ahead)
        for line in range(n_lines):
            _prefetch_line(builder, builder.add(at, ir.Constant(_I64, 64 * line)) if line else at)


WIDE = 8  # blocks whose f16 scales (and mins) one vcvtph2ps widens: _wide_pass


def _halves8(builder, addr, b0):
    """<8 x float> of the eight IEEE halves at addr + 2 b0 (one vcvtph2ps from memory)."""
    bits = _load(builder, addr, builder.mul(b0, ir.Constant(_I64, 2)), _vec(_I16, 8))
    return builder.fpext(builder.bitcast(bits, _vec(ir.HalfType(), 8)), _vec(_F32, 8))


def _floats8(builder, addr, b0):
    """<8 x float> of the eight float32 values at addr + 4 b0."""
    return _load(builder, addr, builder.mul(b0, ir.Constant(_I64, 4)), _vec(_F32, 8))


def _wide_pass(builder, kind: str, w, w_stride, s, s_stride, m, m_stride, x, xd, xaux, b0, carried):
    """One iteration of dot4_<kind>_blocks's main loop (q4, q4a): blocks b0..b0+7 of four rows.
    Each row's eight f16 scales are widened at once and multiplied by the token's eight block
    scales (two vector ops where a block at a time took a broadcast, a conversion and a multiply per
    block and row); a block's multiplier is then a lane splat of that. The block-sum terms (q4's -8
    scale, q4a's mins) are one vector multiply-add per row for the eight blocks into carried[4 + r],
    an <8 x float> summed at the end: a scalar half per block and row had been a vpinsrw into an
    accumulator's register, a false dependency through every row's min. (q8 keeps the loop of one
    block: this one was 1.13x faster on rows of 1536 but 0.9x on SmolLM2's rows of 512-640.)"""
    d_x = _floats8(builder, xd, b0)
    x_sums = _floats8(builder, xaux, b0)
    new = list(carried)
    d_rows = []
    for r in range(4):
        scales = _halves8(builder, _strided(builder, s, s_stride, r), b0)
        d_rows.append(builder.fmul(scales, d_x))
        if kind == "q4a":
            term = _halves8(builder, _strided(builder, m, m_stride, r), b0)
        else:  # q4: codes - 8
            term = builder.fmul(scales, _splat8(builder, ir.Constant(_F32, -8.0)))
        new[4 + r] = _fmuladd(builder, term, x_sums, carried[4 + r])
    _prefetch_rows(builder, w, w_stride, builder.mul(b0, ir.Constant(_I64, BLOCK // 2)), 2)
    for j in range(WIDE):
        b = builder.add(b0, ir.Constant(_I64, j)) if j else b0
        xv = _load(builder, x, builder.mul(b, ir.Constant(_I64, BLOCK)), _vec(_I8, 32))
        for r in range(4):
            codes = _block_codes(builder, _strided(builder, w, w_stride, r), b, True)
            total = builder.sitofp(_block_isum(builder, codes, xv, None), _vec(_F32, 8))
            new[r] = _fmuladd(builder, total, _lane_splat8(builder, d_rows[r], j), new[r])
    return new


def _rows4_codegen(kind: str):
    """Codegen of dot4_<kind>_blocks (kind: q8, q4, q4a, q4k or q6k); see dot4_q8_blocks."""
    nibbles = kind not in ("q8", "q6k")
    wide = kind in ("q4", "q4a")

    def codegen(context, builder, signature, args):
        w, w_stride, s, s_stride, m, m_stride, x, xd, xaux, n = args
        zero8 = ir.Constant(_vec(_F32, 8), [ir.Constant(_F32, 0.0)] * 8)
        inits = [zero8] * 4 + ([ir.Constant(_F32, 0.0)] * 4 if nibbles else [])

        def body(builder, b0, carried):
            scale8, min8, sub, blocks = _pass(builder, kind, s, s_stride, m, m_stride, b0, n)
            code_bytes = BLOCK // 2 if nibbles else BLOCK
            for j, b in enumerate(blocks):  # q4k/q6k: a super-block's eight blocks, its scales decoded once
                off = builder.mul(b, ir.Constant(_I64, BLOCK))
                # a line per 64 bytes of codes (q8: each block's, half of them already asked for;
                # q4/q4a come here for the last blocks only, whose lines _wide_pass's ran into)
                if not wide and (j * code_bytes) % 64 == 0:
                    _prefetch_rows(builder, w, w_stride, builder.mul(b, ir.Constant(_I64, code_bytes)), 1)
                xv = _load(builder, x, off, _vec(_I8, 32))
                d_x8 = _splat8(builder, _f32_at(builder, xd, b))
                if nibbles:  # the block's dequantized activation sum, for the min (q4a/q4k) or -8 * scale (q4)
                    x_sum = _f32_at(builder, xaux, b)
                correction = _correction(builder, kind, xv, xaux, b)
                new_acc, new_off = [], []
                for r in range(4):
                    codes = _block_codes(builder, _strided(builder, w, w_stride, r), b, nibbles)
                    total = _block_sum(builder, codes, xv, correction, None if sub is None else sub(r, j))
                    w_scale8 = scale8(r, j)
                    d = builder.fmul(w_scale8, d_x8)
                    new_acc.append(_fmuladd(builder, total, d, carried[r]))
                    if nibbles:
                        new_off.append(_fmuladd(builder, _lane0(builder, min8(r, j, w_scale8)), x_sum, carried[4 + r]))
                carried = new_acc + new_off
            return carried

        wide_sums = None
        start = None
        if wide:  # whole groups of WIDE blocks first (_wide_pass), the rest a block at a time below
            n_wide = builder.and_(n, ir.Constant(_I64, -WIDE))
            final = _carried_loop(builder, n_wide, [zero8] * 8, lambda builder, b0, carried: _wide_pass(
                builder, kind, w, w_stride, s, s_stride, m, m_stride, x, xd, xaux, b0, carried),
                step=WIDE, name="rows4.wide")
            inits = final[:4] + inits[4:]
            wide_sums = final[4:]
            start = n_wide
        final = _carried_loop(builder, n, inits, body, step=_blocks_per_pass(kind), start=start)
        totals = []
        for r in range(4):
            acc = final[r] if wide_sums is None else builder.fadd(final[r], wide_sums[r])
            total = _hsum(builder, acc)
            totals.append(builder.fadd(total, final[4 + r]) if nibbles else total)
        return context.make_tuple(builder, signature.return_type, totals)

    return codegen


def _rows4_intrinsic(kind: str):
    def dot4(typingctx, w_addr, w_stride, s_addr, s_stride, m_addr, m_stride, x_addr, xd_addr, xaux_addr, n_blocks):
        return types.UniTuple(types.float32, 4)(*([types.intp] * 10)), _rows4_codegen(kind)

    return dot4


# (dot of row 0, ..., dot of row 3) for the four rows at w_addr + r * w_stride against one
# token's int8 activation blocks: codes q8 (int8) / q4, q4a (nibbles in ggml's order, x
# deinterleaved by prepare_input); their f16 block scales at s_addr + r * s_stride (q4a's mins
# likewise at m_addr; q4k's packed 6-bit scales and mins, q6k's int8 scales and d: storage/quant.py,
# q6k's xaux unused); x_addr the token's
# int8 codes, xd_addr its float32 block scales, xaux_addr
# its int32 block code sums (q8) or float32 dequantized block sums (q4, q4a). One pass over x
# serves four rows, each with its own accumulator (one row at a time was a chain of dependent
# adds across blocks), and the scales are widened in the loop (no scratch). Only where NATIVE_F16.
dot4_q8_blocks = intrinsic(_rows4_intrinsic("q8"))
dot4_q4_blocks = intrinsic(_rows4_intrinsic("q4"))
dot4_q4a_blocks = intrinsic(_rows4_intrinsic("q4a"))
dot4_q4k_blocks = intrinsic(_rows4_intrinsic("q4k"))
dot4_q6k_blocks = intrinsic(_rows4_intrinsic("q6k"))


# ---- four rows x four tokens per pass (prefill) -------------------------------------------

TOKENS_PER_PASS = 4  # dot4x4_*_blocks


def _gather4(builder, values):
    """<4 x float> of four float32 values."""
    v = ir.Constant(_vec(_F32, 4), None)
    for i, s in enumerate(values):
        v = builder.insert_element(v, s, ir.Constant(_I32, i))
    return v


def _tile_codegen(kind: str):
    """Codegen of dot4x4_<kind>_blocks; see there."""
    nibbles = kind not in ("q8", "q6k")

    def codegen(context, builder, signature, args):
        w, w_stride, s, s_stride, m, m_stride, x, x_stride, xd, xd_stride, xaux, xaux_stride, n = args
        zero8 = ir.Constant(_vec(_F32, 8), [ir.Constant(_F32, 0.0)] * 8)
        zero4 = ir.Constant(_vec(_F32, 4), [ir.Constant(_F32, 0.0)] * 4)
        inits = [zero8] * 16 + ([zero4] * 4 if nibbles else [])

        def at(base, stride, i):
            return _strided(builder, base, stride, i)

        def body(builder, b0, carried):
            scale8, min8, sub, blocks = _pass(builder, kind, s, s_stride, m, m_stride, b0, n)
            for j, b in enumerate(blocks):  # q4k/q6k: a super-block's eight blocks, its scales decoded once
                off = builder.mul(b, ir.Constant(_I64, BLOCK))
                xs = [_load(builder, at(x, x_stride, t), off, _vec(_I8, 32)) for t in range(4)]
                d_x = _gather4(builder, [_f32_at(builder, at(xd, xd_stride, t), b) for t in range(4)])
                if nibbles:
                    x_sums = _gather4(builder, [_f32_at(builder, at(xaux, xaux_stride, t), b) for t in range(4)])
                corrections = [_correction(builder, kind, xs[t], at(xaux, xaux_stride, t), b) for t in range(4)]
                # q6k on VNNI: each lane's group scale folded into the row's d once for four tokens, so
                # a token's multiplier is one fmul (as q8's is one broadcast), not a broadcast and an fmul
                lane_scales = sub is not None and HAS_VNNI
                if lane_scales:
                    d_x8s = [_splat8(builder, builder.extract_element(d_x, ir.Constant(_I32, t))) for t in range(4)]
                new = list(carried)
                for r in range(4):
                    codes = _block_codes(builder, at(w, w_stride, r), b, nibbles)
                    w_scale8 = scale8(r, j)
                    pair = None if sub is None else sub(r, j)
                    if lane_scales:
                        d_lanes = builder.fmul(pair, w_scale8)
                    else:
                        d_rt = builder.fmul(d_x, _shuffle(builder, w_scale8, w_scale8, range(4)))  # times each token's
                    for t in range(4):
                        k = 4 * r + t
                        if lane_scales:
                            total = builder.sitofp(_block_isum(builder, codes, xs[t], corrections[t]), _vec(_F32, 8))
                            new[k] = _fmuladd(builder, total, builder.fmul(d_lanes, d_x8s[t]), carried[k])
                            continue
                        total = _block_sum(builder, codes, xs[t], corrections[t], pair)
                        d = _splat8(builder, builder.extract_element(d_rt, ir.Constant(_I32, t)))
                        new[k] = _fmuladd(builder, total, d, carried[k])
                    if nibbles:
                        w_min8 = min8(r, j, w_scale8)
                        new[16 + r] = _fmuladd(builder, _shuffle(builder, w_min8, w_min8, range(4)), x_sums,
                                               carried[16 + r])
                carried = new
            return carried

        final = _carried_loop(builder, n, inits, body, name="tile", step=_blocks_per_pass(kind))
        totals = []
        for r in range(4):
            for t in range(4):
                total = _hsum(builder, final[4 * r + t])
                if nibbles:
                    total = builder.fadd(total, builder.extract_element(final[16 + r], ir.Constant(_I32, t)))
                totals.append(total)
        return context.make_tuple(builder, signature.return_type, totals)

    return codegen


def _tile_intrinsic(kind: str):
    def dot4x4(typingctx, w_addr, w_stride, s_addr, s_stride, m_addr, m_stride, x_addr, x_stride, xd_addr,
               xd_stride, xaux_addr, xaux_stride, n_blocks):
        return types.UniTuple(types.float32, 16)(*([types.intp] * 13)), _tile_codegen(kind)

    return dot4x4


# The 16 dots of four rows (as dot4_*_blocks takes them) with four tokens' activation blocks, row
# by row (dot of row r with token t at index 4 r + t): tokens at x_addr + t * x_stride, their block
# scales and sums likewise at xd_addr / xaux_addr with their own strides. Each row's codes are
# unpacked once for four tokens and each token's codes loaded once for four rows: a prefill
# chunk's products at about half the operations per weight of dot4 token by token.
dot4x4_q8_blocks = intrinsic(_tile_intrinsic("q8"))
dot4x4_q4_blocks = intrinsic(_tile_intrinsic("q4"))
dot4x4_q4a_blocks = intrinsic(_tile_intrinsic("q4a"))
dot4x4_q4k_blocks = intrinsic(_tile_intrinsic("q4k"))
dot4x4_q6k_blocks = intrinsic(_tile_intrinsic("q6k"))
