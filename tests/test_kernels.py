"""Each numba kernel against its numpy twin in tests/reference.py."""

import numpy as np
import pytest

from flashinfer import kernels as K
from tests import reference as ref

rng = np.random.default_rng(0)


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


@pytest.mark.parametrize("weight_dtype", ["f32", "f16"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_matmul(weight_dtype, with_bias, n_tokens):
    x, w = randn(n_tokens, 48), randn(40, 48)
    if weight_dtype == "f16":
        w = w.astype(np.float16).view(np.uint16)
    bias = randn(40) if with_bias else np.zeros(0, np.float32)
    out = np.empty((n_tokens, 40), np.float32)
    K.matmul(x, w, bias, out)
    np.testing.assert_allclose(out, ref.matmul(x, w, bias), rtol=1e-5, atol=1e-5)


def test_widen_f16_bits_exact_over_all_finite_halves():
    bits = np.arange(65536, dtype=np.uint16)
    halves = bits.view(np.float16)
    finite = bits[np.isfinite(halves)]
    table = finite.reshape(1, -1)
    out = np.empty((1, finite.size), np.float32)
    K.embed(np.zeros(1, np.int64), table, out)
    np.testing.assert_array_equal(out[0], finite.view(np.float16).astype(np.float32))


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


@pytest.mark.parametrize("n_kv_heads,window", [(4, 0), (2, 0), (1, 3)])
def test_attention_gqa_and_window(n_kv_heads, window):
    head_dim, n_heads, ctx, start, n_tokens = 8, 4, 16, 5, 4
    q = randn(n_tokens, n_heads * head_dim)
    k_cache, v_cache = randn(ctx, n_kv_heads * head_dim), randn(ctx, n_kv_heads * head_dim)
    out, scores = np.empty_like(q), np.empty(ctx, np.float32)
    K.attention(q, k_cache, v_cache, start, n_kv_heads, head_dim, window, scores, out)
    expected = ref.attention(q, k_cache, v_cache, start, n_kv_heads, head_dim, window)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("act", [K.ACT_SILU, K.ACT_RELU])
def test_gated_act(act):
    gate, up = randn(2, 33), randn(2, 33)
    out = gate.copy()
    K.gated_act(out, up, act)
    np.testing.assert_allclose(out, ref.gated_act(gate, up, act), rtol=1e-5, atol=1e-6)


def test_relu_embed_add_rows():
    h = randn(2, 10)
    out = h.copy()
    K.relu_(out)
    np.testing.assert_array_equal(out, np.maximum(h, 0))
    table = randn(6, 4)
    emb = np.empty((3, 4), np.float32)
    K.embed(np.array([5, 0, 2]), table, emb)
    np.testing.assert_array_equal(emb, table[[5, 0, 2]])
    K.add_rows(emb, table, np.array([1, 1, 3]))
    np.testing.assert_allclose(emb, table[[5, 0, 2]] + table[[1, 1, 3]])
