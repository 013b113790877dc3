"""Each numba kernel against its numpy twin in tests/reference.py."""

import numpy as np
import pytest

from flashinfer import kernels as K
from flashinfer.weights import NO_SCALES, Matrix
from storage import quant
from tests import reference as ref

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


SCHEMES = ["f32", "f16", "q8", "q4", "q4a"]


def kernel_matrix(w: np.ndarray, scheme: str, group: int = 32) -> Matrix:
    """A float32 matrix quantized by the numpy reference, in the kernels' form: read-only, as a
    store's memory-mapped resident tensors are (numba compiles a variant per array type)."""
    qt = quant.quantize(w, scheme, quant.group_size_of(scheme, group) or group)
    if scheme == "q4k":
        return _read_only(Matrix(qt.data, qt.scales, qt.mins, group))
    if scheme == "q6k":  # int8 codes and int8 scales, groups of 16
        return _read_only(Matrix(qt.data, qt.scales, NO_SCALES.copy(), qt.group_size))
    if scheme == "f32":
        return _read_only(Matrix(qt.data))
    if scheme == "f16":
        return _read_only(Matrix(qt.data.view(np.uint16)))
    mins = qt.mins.view(np.uint16) if qt.mins is not None else NO_SCALES
    return _read_only(Matrix(qt.data, qt.scales.view(np.uint16), mins, group))


def _read_only(m: Matrix) -> Matrix:
    for a in (m.data, m.scales, m.mins):
        a.flags.writeable = False
    return m


def seen_input(x: np.ndarray, scheme: str, group: int = 32) -> np.ndarray:
    """x as the kernels multiply it: quantized into int8 blocks for the integer dots (q8/q4/q4a
    in groups of 32, q4k, q6k), as it is for float dots."""
    integer = scheme in ("q4k", "q6k") or (scheme in ("q8", "q4", "q4a") and group == 32)
    return ref.quantized_activations(x) if integer else x


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_matmul_every_scheme(scheme, with_bias, n_tokens):
    x, w = randn(n_tokens, 64), randn(40, 64)
    m = kernel_matrix(w, scheme)
    bias = randn(40) if with_bias else np.zeros(0, np.float32)
    out = np.empty((n_tokens, 40), np.float32)
    K.matmul(x, m.data, m.scales, m.mins, m.group, bias, out)
    expected = ref.matmul(seen_input(x, scheme), quant.dequantize(quant.quantize(w, scheme, 32)), bias)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["q8", "q4", "q4a", "q4k", "q6k"])
@pytest.mark.parametrize("kernel", ["matmul", "matmul_serial"])
@pytest.mark.parametrize("n_tokens", [1, 3, 9])
def test_integer_dots_on_a_realistic_width(scheme, kernel, n_tokens):
    # many blocks per row (the vector loop's steady state), rows that start at an odd
    # address (a strided view, as the neuron cache's bundles are), and values whose block
    # maxima differ by orders of magnitude (each block its own scale)
    x = randn(n_tokens, 1024) * np.repeat(np.logspace(-3, 2, 32, dtype=np.float32), 32)
    w = randn(33, 1024)
    m = kernel_matrix(w, scheme)
    padded = np.zeros((33, m.data.shape[1] + 3), m.data.dtype)
    padded[:, 3:] = m.data
    out = np.empty((n_tokens, 33), np.float32)
    getattr(K, kernel)(x, padded[:, 3:], m.scales, m.mins, m.group, np.zeros(0, np.float32), out)
    deq = quant.dequantize(quant.quantize(w, scheme, m.group))
    np.testing.assert_allclose(out, ref.matmul(seen_input(x, scheme), deq, np.zeros(0, np.float32)),
                               rtol=1e-4, atol=1e-4 * np.abs(out).max())
    # and the activation rounding costs what int8 blocks cost: well under 1% of the output's scale
    exact = ref.matmul(x, deq, np.zeros(0, np.float32))
    assert np.abs(out - exact).max() < 0.01 * np.abs(exact).max()


def test_quantize_blocks_is_the_reference_rounding():
    x = randn(3, 96) * 5
    x[1, :32] = 0.0  # an all-zero block: scale 0, codes 0
    xq, xd, xqs = np.empty((3, 96), np.int8), np.empty((3, 3), np.float32), np.empty((3, 3), np.int32)
    K.quantize_blocks(x, xq, xd, xqs)
    np.testing.assert_allclose((xq.reshape(3, 3, 32) * xd[..., None]).reshape(3, 96), ref.quantized_activations(x),
                               rtol=1e-6, atol=0)
    np.testing.assert_array_equal(xqs, xq.reshape(3, 3, 32).astype(np.int32).sum(axis=2))
    assert np.abs(xq).max() == 127 and xd[1, 0] == 0


@pytest.mark.parametrize("scheme", ["q8", "q4", "q4a"])
@pytest.mark.parametrize("group", [64])
@pytest.mark.parametrize("n_tokens", [1, 6])
@pytest.mark.parametrize("kernel", ["matmul", "matmul_serial"])
def test_matmul_other_group_sizes_both_kernels(scheme, group, n_tokens, kernel):
    # q4's group of 32 has its own unrolled loop; other groups take the generic one, and from
    # ROW_REUSE_MIN_TOKENS tokens on each row is unpacked once (both paths checked here)
    x, w = randn(n_tokens, 128), randn(24, 128)
    m = kernel_matrix(w, scheme, group)
    out = np.empty((n_tokens, 24), np.float32)
    getattr(K, kernel)(x, m.data, m.scales, m.mins, m.group, np.zeros(0, np.float32), out)
    expected = ref.matmul(x, quant.dequantize(quant.quantize(w, scheme, group)), np.zeros(0, np.float32))
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_add_rows_every_scheme(scheme):
    table = randn(6, 64)
    m = kernel_matrix(table, scheme)
    out = np.ones((3, 64), np.float32)
    rows = np.array([5, 0, 5])
    K.add_rows(out, m.data, m.scales, m.mins, m.group, rows)
    expected = 1.0 + quant.dequantize(quant.quantize(table, scheme, 32))[rows]
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["q4k", "q6k"])
def test_add_rows_super_block_schemes(scheme):
    # embedding lookups of a q4k / q6k table (a Q4_K_M file's token_embd, or its tied Q6_K
    # output): the packed scales decoded per group
    table = randn(6, 512) * np.repeat(np.logspace(-2, 1, 16, dtype=np.float32), 32)
    m = kernel_matrix(table, scheme)
    out = np.ones((3, 512), np.float32)
    K.add_rows(out, m.data, m.scales, m.mins, m.group, np.array([5, 0, 5]))
    np.testing.assert_allclose(out, 1.0 + quant.dequantize(quant.quantize(table, scheme))[[5, 0, 5]], rtol=1e-6,
                               atol=1e-6)


def test_widen_f16_bits_exact_over_all_finite_halves():
    bits = np.arange(65536, dtype=np.uint16)
    finite = bits[np.isfinite(bits.view(np.float16))]
    out = np.zeros((1, finite.size), np.float32)
    K.add_rows(out, finite.reshape(1, -1), NO_SCALES, NO_SCALES, 0, np.zeros(1, np.int64))
    np.testing.assert_array_equal(out[0], finite.view(np.float16).astype(np.float32))


# Every scheme through the serial kernel (slices 0); ffn_rows_parallel's slicing (1, 2, 5 slices)
# does not depend on the scheme, so the default suite runs it on q8 and q4a rows and the other
# schemes in `make test-all`: each (scheme, kernel) pair is its own ~15 s cold compile, and the
# six pairs moved out were 90 s of the suite's 10-minute bound (2026-12-08).
PARALLEL_SCHEMES = ("q8", "q4a")
FFN_ROWS_CASES = [pytest.param(slices, scheme, id=f"{slices}-{scheme}",
                               marks=[pytest.mark.slow] if slices and scheme not in PARALLEL_SCHEMES else [])
                  for slices in (0, 1, 2, 5) for scheme in SCHEMES]


@pytest.mark.parametrize("slices,scheme", FFN_ROWS_CASES)  # slices 0: the serial kernel; else ffn_rows_parallel
@pytest.mark.parametrize("gated,act,biases", [(True, K.ACT_SILU, False), (True, K.ACT_RELU, False), (False, K.ACT_RELU, True)])
@pytest.mark.parametrize("n_tokens", [3, 6])  # 6 >= ROW_REUSE_MIN_TOKENS: quantized rows unpacked once per chunk
def test_ffn_rows(scheme, gated, act, biases, slices, n_tokens):
    dim, n_neurons, n_rows = 64, 24, 17
    x = randn(n_tokens, dim)
    w_up, w_gate, w_down_t = randn(n_neurons, dim), randn(n_neurons, dim), randn(n_neurons, dim)
    b_up = randn(n_neurons) if biases else np.zeros(0, np.float32)
    weights = {"up": w_up, "gate": w_gate if gated else None, "down": w_down_t,
               "up_bias": b_up if biases else None}
    v = _bundle_views({k: w for k, w in weights.items() if w is not None}, scheme)
    out = np.full((n_tokens, dim), np.nan, np.float32)
    operands = (x, n_rows, v.up.data, v.up.scales, v.up.mins, v.gate.data, v.gate.scales, v.gate.mins,
                v.down.data, v.down.scales, v.down.mins, v.up_bias, v.gate_bias, 32, act)
    if slices:
        K.ffn_rows_parallel(*operands, np.full((slices, n_tokens + 2, dim), np.nan, np.float32), out)
    else:
        K.ffn_rows(*operands, out)
    deq = lambda w: quant.dequantize(quant.quantize(w, scheme, 32))[:n_rows]  # noqa: E731
    xs = seen_input(x, scheme)
    u = ref.matmul(xs, deq(w_up), b_up[:n_rows] if biases else np.zeros(0, np.float32))
    if gated:
        h = ref.gated_act(ref.matmul(xs, deq(w_gate), np.zeros(0, np.float32)), u, act)
    else:
        h = np.maximum(u, 0)
    expected = h @ deq(w_down_t)
    # float32 sums of terms up to ~100 (h is a product of two dots): an element that cancels
    # to ~0.5 carries the rounding of its large terms, so atol scales with the output
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def _bundle_views(weights: dict, scheme):
    """The kernels' operands as the engine makes them: bundles packed by the store writer, viewed
    by flash_ffn.bundle_views (strided views, the empty gate and biases of the engine's own: the
    argument types numba compiles for, so the tests compile no variants of their own)."""
    from flashinfer.flash_ffn import bundle_views
    from storage import format as fmt
    from storage.writer import bundle_layout, pack_bundles

    n, dim = weights["up"].shape
    components, bundle_bytes = bundle_layout(list(weights), dim, scheme, 32)
    layer = fmt.FFNLayer(file="", n_neurons=n, bundle_bytes=bundle_bytes, components=tuple(components),
                         bundles_per_chunk=1, compression="none", chunks=(), file_bytes=0)
    return bundle_views(pack_bundles(weights, components, bundle_bytes), layer)


def test_rmsnorm_and_layernorm_in_place():
    x, w, b = randn(3, 64), randn(64), randn(64)
    out = x.copy()
    K.rmsnorm(out, w, 1e-5, out)
    np.testing.assert_allclose(out, ref.rmsnorm(x, w, 1e-5), rtol=1e-5, atol=1e-5)
    out = x.copy()
    K.layernorm(out, w, b, 1e-5, out)
    np.testing.assert_allclose(out, ref.layernorm(x, w, b, 1e-5), rtol=1e-4, atol=1e-5)


def test_rope():
    head_dim, inv_freq = 16, 1.0 / 10000 ** (np.arange(8) * 2 / 16)
    x, positions = randn(4, 3 * head_dim), np.array([0, 1, 7, 100])
    out = x.copy()
    K.rope(out, positions, inv_freq, head_dim)
    np.testing.assert_allclose(out, ref.rope(x, positions, inv_freq, head_dim), rtol=1e-5, atol=1e-5)
    # q and k together (prefill and decode): each as rope alone gives it, bit for bit
    q, k = x.copy(), randn(4, head_dim)
    k_alone = k.copy()
    K.rope_qk(q, k, positions, inv_freq, head_dim)
    K.rope(k_alone, positions, inv_freq, head_dim)
    np.testing.assert_array_equal(q, out)
    np.testing.assert_array_equal(k, k_alone)


def q8_dequantized(x, block):
    """x [positions, channels] as a q8 KV cache keeps it: per position and block of channels,
    codes round(x * 127 / amax) times amax / 127 (numpy's rounding of halves to even, as np.rint)."""
    blocks = x.reshape(x.shape[0], -1, block)
    top = np.abs(blocks).max(axis=2, keepdims=True)
    scale = top / np.float32(127)
    codes = np.rint(blocks * np.where(top > 0, np.float32(127) / np.where(top > 0, top, 1), 0)).astype(np.int8)
    return codes.reshape(x.shape), scale[..., 0], (codes * scale).reshape(x.shape).astype(np.float32)


@pytest.mark.parametrize("kv_cache", ["f32", "f16", "q8"])
@pytest.mark.parametrize("kernel", ["attention", "attention_serial", "attention_blas"])
@pytest.mark.parametrize("n_kv_heads,window,head_dim", [(4, 0, 8), (2, 0, 64), (1, 3, 8)])
def test_attention_gqa_and_window(n_kv_heads, window, head_dim, kernel, kv_cache):
    """Every kernel over every cache type equals the float64 reference over the values the cache
    holds (halves; q8's codes times their scales, checked against numpy's quantization)."""
    n_heads, ctx, start, n_tokens = 4, 16, 5, 4
    q = randn(n_tokens, n_heads * head_dim) * 3  # scores spread over several units: a real softmax
    k_cache, v_cache = randn(ctx, n_kv_heads * head_dim), randn(ctx, n_kv_heads * head_dim)
    kv_dtype = K.KV_DTYPES[kv_cache]
    k_cache_t, v_stored = np.zeros((n_kv_heads * head_dim, ctx), kv_dtype), np.zeros((ctx, n_kv_heads * head_dim), kv_dtype)
    kv = K.layer_kv(k_cache_t, v_stored, head_dim)
    K.store_kv(k_cache, v_cache, kv, 0)
    if kv_cache == "f16":  # stored rounded to the nearest half; the reference gets the same values
        k_cache, v_cache = (c.astype(np.float16).astype(np.float32) for c in (k_cache, v_cache))
        np.testing.assert_array_equal(k_cache_t, k_cache.T.astype(np.float16).view(np.uint16))
        np.testing.assert_array_equal(v_stored, v_cache.astype(np.float16).view(np.uint16))
    elif kv_cache == "q8":
        block = K.kv_q8_block(head_dim)
        assert block == min(32, head_dim) and kv.k_scale.shape == (n_kv_heads * head_dim // block, ctx)
        (k_codes, k_scale, k_cache), (v_codes, v_scale, v_cache) = (q8_dequantized(c, block) for c in (k_cache, v_cache))
        np.testing.assert_array_equal(k_cache_t, k_codes.T)
        np.testing.assert_array_equal(v_stored, v_codes)
        np.testing.assert_allclose(kv.k_scale, k_scale.T, rtol=1e-7)
        np.testing.assert_allclose(kv.v_scale, v_scale, rtol=1e-7)
    else:
        np.testing.assert_array_equal(k_cache_t, k_cache.T)
        np.testing.assert_array_equal(v_stored, v_cache)
    out, scores = np.empty_like(q), np.empty((n_heads * n_tokens, ctx), np.float32)
    getattr(K, kernel)(q, kv, start, n_kv_heads, head_dim, window, scores, out)
    expected = ref.attention(q, k_cache, v_cache, start, n_kv_heads, head_dim, window)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_q8_kv_cache_keeps_an_all_zero_block_and_extremes():
    """A block of zeros gets scale 0 and codes 0 (no division by zero); a block's largest |x|
    is stored exactly as +-127 times its scale."""
    head_dim = 32
    k_t, v = np.zeros((head_dim, 2), np.int8), np.zeros((2, head_dim), np.int8)
    kv = K.layer_kv(k_t, v, head_dim)
    x = np.zeros((2, head_dim), np.float32)
    x[1, 3], x[1, 7] = -5.0, 2.0
    K.store_kv(x, x, kv, 0)
    assert kv.k_scale[0, 0] == 0 and not k_t[:, 0].any() and kv.v_scale[0, 0] == 0 and not v[0].any()
    assert k_t[3, 1] == -127 and v[1, 3] == -127 and k_t[7, 1] == 51 and v[1, 7] == 51  # 2 * 127 / 5 = 50.8
    assert kv.k_scale[0, 1] == kv.v_scale[1, 0] == np.float32(5.0) / np.float32(127)


def test_f16_bits_rounds_as_numpy():
    """The KV cache's float32 -> half rounding (ties to even, subnormals, overflow, NaN) is
    numpy's astype(float16), bit for bit."""
    from numba import njit

    @njit
    def narrow(x, out):
        for i in range(x.shape[0]):
            out[i] = K.f16_bits(x[i])

    rng = np.random.default_rng(0)
    x = np.concatenate([rng.standard_normal(20000).astype(np.float32) * s for s in (1e-8, 1e-5, 1, 1e3, 7e4)]
                       + [np.array([0, -0.0, np.inf, -np.inf, np.nan, 65504, 65519.9, 65520, 6.1e-5, 5.96e-8,
                                    2.98e-8, 2.99e-8, 1 + 2**-11, 1 + 3 * 2**-11], np.float32)])
    out = np.empty(x.shape, np.uint16)
    narrow(x, out)
    with np.errstate(over="ignore"):
        np.testing.assert_array_equal(out, x.astype(np.float16).view(np.uint16))


def test_exp_nonpositive_is_exp_to_float_precision():
    from numba import njit

    @njit
    def apply(x, out):
        for i in range(x.shape[0]):
            out[i] = K.exp_nonpositive(x[i])

    x = -np.concatenate([np.linspace(0, 90, 200001), [0.0, 1e-30, 87.5, 1e4]]).astype(np.float32)
    out = np.empty_like(x)
    apply(x, out)
    expected = np.exp(x.astype(np.float64))
    np.testing.assert_allclose(out, expected, rtol=3e-7, atol=1e-37)


@pytest.mark.parametrize("act", [K.ACT_SILU, K.ACT_RELU])
def test_gated_act(act):
    gate, up = randn(2, 33), randn(2, 33)
    out = gate.copy()
    K.gated_act(out, up, act)
    np.testing.assert_allclose(out, ref.gated_act(gate, up, act), rtol=1e-5, atol=1e-6)


def test_relu():
    h = randn(2, 10)
    out = h.copy()
    K.relu_(out)
    np.testing.assert_array_equal(out, np.maximum(h, 0))


def test_widen_is_exact_for_every_half():
    from numba import njit

    @njit
    def widen_all(bits, out):
        for i in range(bits.shape[0]):
            out[i] = K.widen(bits[i])

    bits = np.arange(2**16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(2**16, np.float32)
    widen_all(bits, out)
    np.testing.assert_array_equal(out.view(np.uint32), bits.view(np.float16).astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("scheme", ["f16", "q8", "q4", "q4a"])
def test_large_coefficients_do_not_overflow(scheme):
    # A ReLU FFN row can carry h ~ -1.4e4 (two dots of a wide layer multiplied). With the
    # old widen (bits * 2**112) fastmath folded the constant into h * -8 * 2**112 = inf.
    w = randn(3, 64)
    m = kernel_matrix(w, scheme)
    out = np.zeros((1, 64), np.float32)
    ffn_down_like = np.array([1], np.int64)
    K.add_rows(out, m.data, m.scales, m.mins, m.group, ffn_down_like)  # coefficient 1
    big = np.zeros((1, 64), np.float32)
    from numba import njit

    @njit(fastmath=K.FAST)
    def axpy(w, s, mins, group, coef, out):
        K.row_axpy(w, s, mins, group, 1, coef, out, 0)

    axpy(m.data, m.scales, m.mins, m.group, np.float32(-14336.99), big)
    np.testing.assert_allclose(big, out * np.float32(-14336.99), rtol=1e-5, atol=1e-2)


@pytest.mark.parametrize("vnni", [False, True])
def test_integer_dot_intrinsics_portable_and_vnni_agree(monkeypatch, vnni):
    # the generic IR (int16 products: any CPU) and AVX512-VNNI's vpdpbusd give the same sums
    from numba import njit

    from flashinfer.kernels import simd

    if vnni and not simd.HAS_VNNI:
        pytest.skip("this CPU has no AVX512-VNNI")
    monkeypatch.setattr(simd, "HAS_VNNI", vnni)  # read when the intrinsics generate code

    @njit  # not cached: compiled here, under the patched flag
    def dots(w8, w4, x, ws, xd):
        return (simd.dot_i8_blocks(w8.ctypes.data, x.ctypes.data, ws.ctypes.data, xd.ctypes.data, ws.shape[0]),
                simd.dot_u4_blocks(w4.ctypes.data, x.ctypes.data, ws.ctypes.data, xd.ctypes.data, ws.shape[0]))

    w8 = rng.integers(-128, 128, 256).astype(np.int8)  # -128 too: a GGUF's Q8_0 may hold it
    w4 = rng.integers(0, 256, 128).astype(np.uint8)
    x = rng.integers(-127, 128, 256).astype(np.int8)
    ws, xd = rng.random(8).astype(np.float32), rng.random(8).astype(np.float32)
    q8, q4 = dots(w8, w4, x, ws, xd)
    nibbles = np.concatenate([w4.reshape(8, 16) & 15, w4.reshape(8, 16) >> 4], axis=1).reshape(-1)
    expect8 = (w8.astype(np.int64).reshape(8, 32) * x.reshape(8, 32)).sum(1) @ (ws * xd).astype(np.float64)
    expect4 = (nibbles.astype(np.int64).reshape(8, 32) * x.reshape(8, 32)).sum(1) @ (ws * xd).astype(np.float64)
    assert q8 == pytest.approx(expect8, rel=1e-5) and q4 == pytest.approx(expect4, rel=1e-5)


def _intrinsic_operands(monkeypatch, vnni, scheme, n_tokens):
    """For the multi-row intrinsics' tests: HAS_VNNI patched (read when intrinsics generate code),
    four quantized rows at an odd address and stride (as neuron-cache views are; q8 with -128),
    and n_tokens of activations prepared for them: (w, Matrix, prep, index of prep's block sums)."""
    from numba import njit

    from flashinfer.kernels import blocks, simd

    if vnni and not simd.HAS_VNNI:
        pytest.skip("this CPU has no AVX512-VNNI")
    if not simd.NATIVE_F16:
        pytest.skip("the multi-row intrinsics need native halves (F16C)")
    monkeypatch.setattr(simd, "HAS_VNNI", vnni)
    k = 512 if scheme in ("q4k", "q6k") else 320  # q4k/q6k: whole super-blocks of 256
    m = kernel_matrix(randn(4, k), scheme)
    data = m.data.copy()
    if scheme in ("q8", "q6k"):  # the extreme codes
        data[1, :9] = -128 if scheme == "q8" else -32
    padded = np.zeros((4, data.shape[1] + 5), data.dtype)
    padded[:, 3:-2] = data
    w = padded[:, 3:-2]
    x = randn(n_tokens, k) * np.repeat(np.logspace(-2, 1, k // 32, dtype=np.float32), 32)
    prep = njit(lambda w, x: blocks.prepare_input(w, x, 32))(w, x)
    return w, m, prep, 4 if scheme in ("q8", "q6k") else 5


@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("scheme", ["q8", "q4", "q4a", "q4k", "q6k"])
def test_four_row_dots_portable_vnni_and_fallback_agree(monkeypatch, vnni, scheme):
    # simd.dot4_*_blocks (four rows per pass, scales widened in the loop) against four separate
    # one-row dots (blocks._rows_one_by_one, the path of hosts without native halves)
    from numba import njit

    from flashinfer.kernels import blocks, simd

    w, m, prep, aux = _intrinsic_operands(monkeypatch, vnni, scheme, 1)
    dot4 = {"q8": simd.dot4_q8_blocks, "q4": simd.dot4_q4_blocks, "q4a": simd.dot4_q4a_blocks,
            "q4k": simd.dot4_q4k_blocks, "q6k": simd.dot4_q6k_blocks}[scheme]

    @njit  # not cached: compiled here, under the patched flag
    def four(w, s, m, prep):
        xq, xd, xaux = prep[2], prep[3], prep[aux]
        m_addr = m.ctypes.data if m.shape[0] else 0
        m_stride = m.strides[0] if m.shape[0] else 0
        return dot4(w.ctypes.data, w.strides[0], s.ctypes.data, s.strides[0], m_addr, m_stride, xq.ctypes.data,
                    xd.ctypes.data, xaux.ctypes.data, xd.shape[1])

    one_by_one = njit(lambda w, s, m, prep: blocks._rows_one_by_one(w, 0, s, m, prep, 0))
    expected = np.array(one_by_one(w, m.scales, m.mins, prep))  # atol at the products' scale, as below
    np.testing.assert_allclose(np.array(four(w, m.scales, m.mins, prep)), expected, rtol=1e-5,
                               atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("vnni", [False, True])
@pytest.mark.parametrize("scheme", ["q8", "q4", "q4a", "q4k", "q6k"])
def test_tile_dots_portable_vnni_and_fallback_agree(monkeypatch, vnni, scheme):
    # simd.dot4x4_*_blocks (four rows x four tokens per pass) against four-row dots token by
    # token (blocks._tile_by_rows4, the path of hosts without native halves)
    from numba import njit

    from flashinfer.kernels import blocks, simd

    w, m, prep, aux = _intrinsic_operands(monkeypatch, vnni, scheme, 6)
    tile = {"q8": simd.dot4x4_q8_blocks, "q4": simd.dot4x4_q4_blocks, "q4a": simd.dot4x4_q4a_blocks,
            "q4k": simd.dot4x4_q4k_blocks, "q6k": simd.dot4x4_q6k_blocks}[scheme]

    @njit  # not cached: compiled here, under the patched flag
    def tiled(w, s, m, prep, t):
        xq, xd, xaux = prep[2], prep[3], prep[aux]
        m_addr = m.ctypes.data if m.shape[0] else 0
        m_stride = m.strides[0] if m.shape[0] else 0
        return tile(w.ctypes.data, w.strides[0], s.ctypes.data, s.strides[0], m_addr, m_stride,
                    xq.ctypes.data + t * xq.strides[0], xq.strides[0], xd.ctypes.data + t * xd.strides[0],
                    xd.strides[0], xaux.ctypes.data + t * xaux.strides[0], xaux.strides[0], xd.shape[1])

    by_rows = njit(lambda w, s, m, prep, t: blocks._tile_by_rows4(w, 0, s, m, prep, t))
    for t in (0, 2):  # tokens 0-3, and 2-5
        expected = np.array(by_rows(w, m.scales, m.mins, prep, t))
        # float sums in another order: atol at the products' scale (a dot near 0 among dots of ~100
        # differed by 2.7e-5 for one draw of the suite's shared random stream)
        np.testing.assert_allclose(np.array(tiled(w, m.scales, m.mins, prep, t)), expected, rtol=1e-5,
                                   atol=1e-6 * np.abs(expected).max())


@pytest.mark.parametrize("act", [K.ACT_SILU, K.ACT_RELU])
@pytest.mark.parametrize("n_tokens", [1, 6])
def test_ffn_rows_over_mixed_bundles(act, n_tokens):
    # a GGUF's kept 4-bit up/gate rows next to a q8 down column (convert --quant auto): the
    # down column is summed in its own element order, whichever path the chunk takes
    dim, n_rows = 64, 22  # five passes of four neurons in decode, and two left over
    weights = {name: randn(n_rows, dim) for name in ("up", "gate", "down")}
    v = _bundle_views(weights, {"up": "q4a", "gate": "q4a", "down": "q8"})
    x = randn(n_tokens, dim)
    out = np.empty((n_tokens, dim), np.float32)
    K.ffn_rows(x, n_rows, v.up.data, v.up.scales, v.up.mins, v.gate.data, v.gate.scales, v.gate.mins, v.down.data,
               v.down.scales, v.down.mins, v.up_bias, v.gate_bias, 32, act, out)
    deq = {name: quant.dequantize(quant.quantize(w, s, 32)) for (name, w), s in zip(weights.items(), ("q4a", "q4a", "q8"))}
    xs = seen_input(x, "q4a")
    none = np.zeros(0, np.float32)
    h = ref.gated_act(ref.matmul(xs, deq["gate"], none), ref.matmul(xs, deq["up"], none), act)
    expected = h @ deq["down"]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5 * np.abs(expected).max())


def test_cached_machine_code_is_dropped_when_a_kernel_source_changes(tmp_path):
    # numba's cache keys a function on its own file only; the package drops the whole cache
    # when the digest of its sources differs from the one stored beside it
    from flashinfer import kernels

    (tmp_path / "ffn.py").write_text("x = 1\n")
    cache = tmp_path / "__pycache__"
    kernels._drop_stale_compiled_kernels(tmp_path)
    entry = cache / "ffn.ffn_rows-1.py311.nbi"
    entry.write_bytes(b"")
    kernels._drop_stale_compiled_kernels(tmp_path)
    assert entry.exists()  # same sources: nothing dropped
    (tmp_path / "ffn.py").write_text("x = 2\n")
    kernels._drop_stale_compiled_kernels(tmp_path)
    assert not entry.exists()
    kernels._drop_stale_compiled_kernels(tmp_path)  # and the new digest is kept
    entry.write_bytes(b"")
    kernels._drop_stale_compiled_kernels(tmp_path)
    assert entry.exists()


@pytest.mark.parametrize("scheme", ["q8", "q4a", "f16"])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_matmul3_equals_three_matmuls(scheme, n_tokens):
    # attention's q, k and v from one prepared input in one parallel region (kernels.matmul3)
    from flashinfer.kernels.matmul import matmul3

    x = randn(n_tokens, 96)
    mats = [kernel_matrix(randn(rows, 96), scheme) for rows in (40, 12, 12)]
    biases = [randn(40), np.zeros(0, np.float32), randn(12)]
    outs = [np.full((n_tokens, m.rows), np.nan, np.float32) for m in mats]
    matmul3(x, mats[0], biases[0], outs[0], mats[1], biases[1], outs[1], mats[2], biases[2], outs[2])
    for m, bias, out in zip(mats, biases, outs):
        expected = np.empty_like(out)
        K.matmul(x, m.data, m.scales, m.mins, m.group, bias, expected)
        np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


# a GGUF's Q4_1 (q4a with q4a rows), mixed integer schemes, float up/gate rows over quantized
# W_down (Llama-style, gated SiLU), and an ungated ReLU FFN with biases (OPT-style); each case
# compiles its own kernels, so few
@pytest.mark.parametrize("scheme,down_scheme,gated,act,biases", [
    ("q4a", "q4a", True, K.ACT_SILU, False), ("q8", "q4", True, K.ACT_SILU, False),
    ("f16", "q8", True, K.ACT_SILU, False),
    # ~41 s cold: an ungated FFN keeps W_down as columns unless converted with --ffn-down rows
    pytest.param("q8", "q4", False, K.ACT_RELU, True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("n_tokens", [1, 6])
def test_ffn_down_rows(scheme, down_scheme, gated, act, biases, n_tokens):
    # a layer that keeps W_down as rows (convert --ffn-down rows): gate and up over the bundles'
    # rows (strided views), then W_down's rows [dim, n] over the hidden activations, which the
    # integer dots quantize into int8 blocks as they do any input
    from flashinfer.flash_ffn import bundle_views
    from storage import format as fmt
    from storage.writer import bundle_layout, pack_bundles

    dim, n = 64, 96
    weights = {"up": randn(n, dim), "gate": randn(n, dim) if gated else None}
    if biases:
        weights["up_bias"] = randn(n)
        if gated:
            weights["gate_bias"] = randn(n)
    names = [k for k, v in weights.items() if v is not None]
    components, bundle_bytes = bundle_layout(names, dim, scheme, 32)
    w_down = randn(dim, n)
    qt = quant.quantize(w_down, down_scheme, 32)  # W_down's rows in the planar layout of the layer file
    planar = np.concatenate([a.reshape(-1).view(np.uint8) for a in (qt.data, qt.scales, qt.mins) if a is not None])
    down_spec = fmt.FFNMatrix("down", down_scheme, qt.group_size, (dim, n), fmt.align_up(n * bundle_bytes, fmt.PAGE),
                              planar.size, "")
    layer = fmt.FFNLayer(file="", n_neurons=n, bundle_bytes=bundle_bytes, components=tuple(components),
                         bundles_per_chunk=1, compression="none", chunks=(), file_bytes=0, matrices=(down_spec,))
    matrices = np.zeros(down_spec.offset - n * bundle_bytes + planar.size, np.uint8)
    matrices[down_spec.offset - n * bundle_bytes :] = planar
    bundles = pack_bundles(weights, components, bundle_bytes)
    v = bundle_views(bundles, layer, matrices)
    assert v.down_rows and v.down.data.shape[0] == dim
    down = v.down
    x = randn(n_tokens, dim)
    u, h = np.full((8, n), np.nan, np.float32), np.full((8, n), np.nan, np.float32)
    out = np.full((n_tokens, dim), np.nan, np.float32)
    K.ffn_down_rows(x, v.up, v.up_bias, v.gate, v.gate_bias, down, act, u, h, out)

    deq = lambda w, s: quant.dequantize(quant.quantize(w, s, 32))  # noqa: E731
    none = np.zeros(0, np.float32)
    xs = seen_input(x, scheme)
    up = ref.matmul(xs, deq(weights["up"], scheme), weights.get("up_bias", none))
    if gated:
        hidden = ref.gated_act(ref.matmul(xs, deq(weights["gate"], scheme), weights.get("gate_bias", none)), up, act)
    else:
        hidden = np.maximum(up, 0)
    expected = ref.matmul(seen_input(hidden, down_scheme), deq(w_down, down_scheme), none)
    # the kernel's hidden values differ from the reference's by float rounding, which can move
    # an int8 code of the hidden activations by one: atol at a small share of the output's scale
    np.testing.assert_allclose(out, expected, rtol=1e-3, atol=2e-3 * np.abs(expected).max())

    # a resident layer as the engine lays it out (flash_ffn.interleave_dense_layer: up and gate
    # rewritten over the bundles as matrices in lanes, biases beside them; W_down in lanes in
    # place) gives the same FFN; two cases, each compiles its own variants
    from flashinfer.flash_ffn import interleave_dense_layer
    from flashinfer.kernels.simd import HAS_VNNI, NATIVE_F16

    if not (NATIVE_F16 and HAS_VNNI) or (scheme, down_scheme) not in (("q4a", "q4a"), ("q8", "q4")) or (gated and biases):
        return
    laid_out = interleave_dense_layer(bundles, v)
    assert laid_out.up.data.ndim == 3 and laid_out.down.data.ndim == 3 and laid_out.gate.data.ndim == (3 if gated else 2)
    assert np.may_share_memory(laid_out.up.data, bundles) and np.may_share_memory(laid_out.down.data, matrices)
    np.testing.assert_array_equal(laid_out.up_bias, weights["up_bias"] if biases else [])
    again = np.full((n_tokens, dim), np.nan, np.float32)
    K.ffn_down_rows(x, laid_out.up, laid_out.up_bias, laid_out.gate, laid_out.gate_bias, laid_out.down, act, u, h, again)
    np.testing.assert_allclose(again, out, rtol=1e-5, atol=1e-5 * np.abs(out).max())


# rows in lanes (kernels/lanes.py, weights.interleave_rows: the layout of resident matrices for
# the integer dots on VNNI hosts) give what the same rows give plain: decode, prefill passes of
# 8 and 4 tokens and the tokens left over, embedding lookups of a tied head; plain_rows gives
# back the very codes, scales and mins. q8 and q4a here (a GGUF's Q8_0 head, Q4_1 attention);
# the super-block schemes and q4 compile their own variants (slow).
@pytest.mark.parametrize("scheme", ["q8", "q4a", pytest.param("q4", marks=pytest.mark.slow),
                                    pytest.param("q4k", marks=pytest.mark.slow),
                                    pytest.param("q6k", marks=pytest.mark.slow)])
def test_rows_in_lanes_give_the_plain_rows_results(scheme):
    from flashinfer.kernels.simd import HAS_VNNI, NATIVE_F16
    from flashinfer.weights import interleave_rows, plain_rows

    if not (NATIVE_F16 and HAS_VNNI):
        pytest.skip("rows are laid out in lanes only where vpdpbusd and native halves run")
    k = 512 if scheme in ("q4k", "q6k") else 320
    plain = kernel_matrix(randn(40, k) * np.repeat(np.logspace(-2, 1, k // 32, dtype=np.float32), 32), scheme)
    woven = interleave_rows(plain)
    assert woven.data.shape[0] == 5 and woven.data.ndim == 3 and woven.rows == 40
    back = plain_rows(woven)
    for name in ("data", "scales", "mins"):
        a, b = getattr(back, name), getattr(plain, name)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
    bias = randn(40)
    for n_tokens in (1, 13):  # 13: a pass of eight tokens, one of four, one left over
        x = randn(n_tokens, k)
        expected, out = np.empty((n_tokens, 40), np.float32), np.full((n_tokens, 40), np.nan, np.float32)
        K.matmul(x, plain.data, plain.scales, plain.mins, plain.group, bias, expected)
        K.matmul(x, woven.data, woven.scales, woven.mins, woven.group, bias, out)
        np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    rows = np.array([39, 0, 6, 6])
    expected, out = np.ones((4, k), np.float32), np.ones((4, k), np.float32)
    K.add_rows(expected, plain.data, plain.scales, plain.mins, plain.group, rows)
    K.add_rows(out, woven.data, woven.scales, woven.mins, woven.group, rows)
    np.testing.assert_array_equal(out, expected)


def test_only_integer_rows_in_eights_are_laid_out_in_lanes():
    # float rows, groups the integer dots do not take, and row counts not a multiple of 8 stay
    # as they are (the same Matrix object: no copy)
    from flashinfer.weights import interleave_rows

    for m in (kernel_matrix(randn(8, 64), "f16"), kernel_matrix(randn(8, 128), "q8", 64),
              kernel_matrix(randn(12, 64), "q8")):
        assert interleave_rows(m) is m


def test_a_resident_layers_w_down_is_laid_out_in_its_own_buffer():
    # flash_ffn.interleave_in_place: a resident layer's W_down in lanes where it lies, codes,
    # scales and mins each (no second copy), giving the plain rows' products
    from flashinfer.flash_ffn import interleave_in_place
    from flashinfer.kernels.simd import HAS_VNNI, NATIVE_F16

    if not (NATIVE_F16 and HAS_VNNI):
        pytest.skip("rows are laid out in lanes only where vpdpbusd and native halves run")
    plain = kernel_matrix(randn(40, 320), "q4a")
    buffers = [a.copy() for a in (plain.data, plain.scales, plain.mins)]  # a resident layer's buffer is writable
    woven = interleave_in_place(plain._replace(data=buffers[0], scales=buffers[1], mins=buffers[2]))
    assert woven.data.ndim == 3 and all(np.shares_memory(a, b) for a, b in zip(woven[:3], buffers))
    x, none = randn(1, 320), np.zeros(0, np.float32)
    expected, out = np.empty((1, 40), np.float32), np.empty((1, 40), np.float32)
    K.matmul(x, plain.data, plain.scales, plain.mins, plain.group, none, expected)
    K.matmul(x, woven.data, woven.scales, woven.mins, woven.group, none, out)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
