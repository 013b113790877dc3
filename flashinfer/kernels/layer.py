"""One decode step of a transformer block as a single compiled call.

A decode token through a block is a dozen small kernels (norms, the q/k/v/o products, RoPE,
attention, the FFN over resident bundles, residual adds); dispatched one at a time from
Python they cost ~1 ms of a 7.4 ms SmolLM2-135M token (30 blocks) in interpreter work between
them. `decode_layer` runs the same kernels in the same order from compiled code: the results
are the ones flashinfer/model.py's per-kernel path gives (tests/test_model.py compares them).
Each product still picks its serial or parallel kernel by its own work, as the Python path does.
"""

from __future__ import annotations

import numpy as np
from numba import njit, typeof
from numba.core.typing.typeof import Purpose
from numba.extending import overload

from .attention import ATTENTION_PARALLEL_MIN_WORK, attention, attention_serial, rope_qk, store_kv
from .blocks import FAST
from .ffn import ffn_down_rows, ffn_rows, ffn_rows_parallel
from .matmul import linear as _linear, matmul3
from .norms import layernorm, rmsnorm


def compiled_call(dispatcher, args: tuple):
    """The machine code numba's `dispatcher` has run for arguments of these types (call it through
    the dispatcher once first), to call directly with arguments of the same types again: each call
    through the dispatcher types every argument first. decode_layer's 46 (namedtuples of arrays, 72
    values) took 12-18 us a call to type and 3-5 us to unbox: ~0.4 ms of SmolLM2-135M's 30 blocks
    a token (2026-12-04). The dispatcher itself when no compiled signature equals these types (it
    converted one): it then finds the match each call, as before."""
    try:
        return dispatcher.get_overload(tuple(typeof(a, Purpose.argument) for a in args))
    except KeyError:
        return dispatcher


@njit(nogil=True, fastmath=FAST)
def _norm(rms, x, weight, bias, eps, out):
    if rms:
        rmsnorm(x, weight, eps, out)
    else:
        layernorm(x, weight, bias, eps, out)


# decode_layer's ffn_up / ffn_hidden for a block whose FFN keeps W_down in its bundles (columns):
# scratch of another number of dimensions, so the kernel's types say which FFN the block runs and
# only that one is compiled. Both were compiled before (one a runtime branch never taken): a block
# of bundle columns compiled ffn_down_rows too, 40-60 s of its cold compile (2026-12-08).
NO_DOWN_ROWS = np.zeros(0, np.float32)


def _block_ffn(xb, v, n_neurons, act, ffn_parallel, partial, ffn_up, ffn_hidden, out):
    """out = the FFN of xb over a block's resident bundles `v` (flash_ffn.BundleViews): W_down's
    rows (v.down_rows, scratch ffn_up / ffn_hidden [>= 1, n]), else the bundles' down columns
    (scratch NO_DOWN_ROWS) on all cores or one (pure-Python form)."""
    if v.down_rows:
        ffn_down_rows(xb, v.up, v.up_bias, v.gate, v.gate_bias, v.down, act, ffn_up, ffn_hidden, out)
    else:
        _columns_ffn(xb, v, n_neurons, act, ffn_parallel, partial, out)


@njit(nogil=True, fastmath=FAST)
def _columns_ffn(xb, v, n_neurons, act, ffn_parallel, partial, out):
    """_block_ffn over the bundles' down columns: ffn_rows_parallel (all cores) or ffn_rows."""
    if ffn_parallel:
        ffn_rows_parallel(xb, n_neurons, v.up.data, v.up.scales, v.up.mins, v.gate.data, v.gate.scales, v.gate.mins,
                          v.down.data, v.down.scales, v.down.mins, v.up_bias, v.gate_bias, v.group, act,
                          partial[:, :1], out)
    else:
        ffn_rows(xb, n_neurons, v.up.data, v.up.scales, v.up.mins, v.gate.data, v.gate.scales, v.gate.mins,
                 v.down.data, v.down.scales, v.down.mins, v.up_bias, v.gate_bias, v.group, act, out)


@overload(_block_ffn)
def _block_ffn_jit(xb, v, n_neurons, act, ffn_parallel, partial, ffn_up, ffn_hidden, out):
    if ffn_up.ndim == 1:  # NO_DOWN_ROWS: the bundles' down columns
        return lambda xb, v, n_neurons, act, ffn_parallel, partial, ffn_up, ffn_hidden, out: _columns_ffn(
            xb, v, n_neurons, act, ffn_parallel, partial, out)
    return lambda xb, v, n_neurons, act, ffn_parallel, partial, ffn_up, ffn_hidden, out: ffn_down_rows(
        xb, v.up, v.up_bias, v.gate, v.gate_bias, v.down, act, ffn_up, ffn_hidden, out)


@njit(cache=True, nogil=True, fastmath=FAST)
def decode_layer(x, xb, q, k, v, attn, block_out, kv, start, positions, inv_freq, rms, eps,
                 attn_norm_w, attn_norm_b, ffn_norm_w, ffn_norm_b, wq, bq, wk, bk, wv, bv, wo, bo, use_rope,
                 head_dim, n_kv_heads, window, scores, ffn, n_neurons, act, ffn_parallel, partial, b_down, shared_qkv,
                 ffn_up, ffn_hidden, qk_norm, q_norm_w, k_norm_w, query_scale, sandwich, attn_post_norm_w,
                 ffn_post_norm_w):
    """x [1, dim] += attn(norm(x)); then x += ffn(norm(x)), a pre-norm block (Llama, Mistral,
    Qwen2; OPT-125m's pre-LN too) at position `start`. Matrices are weights.Matrix tuples, `ffn`
    the block's resident bundles as flash_ffn.BundleViews; xb/q/k/v/attn/block_out [1, ...] scratch
    rows; the new key and value go into the layer's LayerKV `kv` in its element type (store_kv). ffn_parallel: whether the
    FFN runs on all cores (flash_ffn.ffn_over_bundles decides it the same way), `partial` its
    per-thread sums; shared_qkv: wq, wk and wv share a scheme and group (matmul3); ffn_up /
    ffn_hidden: scratch [>= 1, n_neurons] of a layer that keeps W_down as rows (ffn.down_rows),
    NO_DOWN_ROWS for one that keeps it in its bundles (only that block's FFN is compiled).
    Gemma 3's extras: qk_norm (each head of q and k RMS-normed by q_norm_w / k_norm_w), q times
    query_scale (when not 1), sandwich (the attention and FFN outputs RMS-normed by
    attn_post_norm_w / ffn_post_norm_w before the residual adds)."""
    _norm(rms, x, attn_norm_w, attn_norm_b, eps, xb)
    if shared_qkv:  # one scheme and group: one prepared input, one parallel region
        matmul3(xb, wq, bq, q, wk, bk, k, wv, bv, v)
    else:
        _linear(xb, wq, bq, q)
        _linear(xb, wk, bk, k)
        _linear(xb, wv, bv, v)
    if qk_norm:
        qh, kh = q.reshape(-1, head_dim), k.reshape(-1, head_dim)
        rmsnorm(qh, q_norm_w, eps, qh)
        rmsnorm(kh, k_norm_w, eps, kh)
    if query_scale != 1.0:
        q *= query_scale
    if use_rope:
        rope_qk(q, k, positions[start : start + 1], inv_freq, head_dim)
    store_kv(k, v, kv, start)
    if (start + 1) * q.shape[1] >= ATTENTION_PARALLEL_MIN_WORK:
        attention(q, kv, start, n_kv_heads, head_dim, window, scores, attn)
    else:
        attention_serial(q, kv, start, n_kv_heads, head_dim, window, scores, attn)
    _linear(attn, wo, bo, block_out)
    if sandwich:
        rmsnorm(block_out, attn_post_norm_w, eps, block_out)
    x += block_out
    _norm(rms, x, ffn_norm_w, ffn_norm_b, eps, xb)
    _block_ffn(xb, ffn, n_neurons, act, ffn_parallel, partial, ffn_up, ffn_hidden, block_out)
    if b_down.shape[0]:
        block_out += b_down
    if sandwich:
        rmsnorm(block_out, ffn_post_norm_w, eps, block_out)
    x += block_out
