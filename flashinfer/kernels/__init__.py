"""Numba kernels of the forward pass, split by topic:

    simd.py       block-scaled integer dot products as LLVM vector IR (int8 x int8, nibble x int8)
    blocks.py     weight rows of every store scheme; activations quantized into int8 blocks
    matmul.py     dense matmuls (rows x tokens), serial and parallel; embedding row lookups
    ffn.py        the FFN over the store's neuron bundles; gated activations
    attention.py  RoPE and causal (sliding-window, GQA) attention over the KV cache
    norms.py      RMSNorm, LayerNorm
    layer.py      a decode step of a whole block as one compiled call

Plain arrays in and out, results written into caller-owned buffers. Activations are float32
[T, features] with T tokens of a chunk; weight matrices are row-major [out, in] as HF stores
them. Every kernel has a slow numpy twin in tests/reference.py that it is tested against.
"""

import hashlib
from pathlib import Path


def sources_digest(here: Path = Path(__file__).resolve().parent) -> str:
    """sha256 of every kernel source (these files, in name order): what numba's cached machine
    code of them was compiled from."""
    return hashlib.sha256(b"".join(p.read_bytes() for p in sorted(here.glob("*.py")))).hexdigest()


def _drop_stale_compiled_kernels(here: Path = Path(__file__).resolve().parent) -> None:
    """Delete numba's cached machine code of these kernels when any of their sources changed.

    Numba keys a cached function on its own file's timestamp, not on the functions it calls from
    other files: after an edit to simd.py or ffn.py, layer.decode_layer kept loading machine code
    with the old callees compiled in (a decode measured 1.1x slower than the code it ran, until
    the cache was deleted by hand). A digest of every kernel source is kept beside the cache; a
    new one drops the cache, once. Read-only installs and a NUMBA_CACHE_DIR elsewhere are left
    alone (the sources of an install do not change)."""
    cache = here / "__pycache__"
    try:
        digest = sources_digest(here)
        stamp = cache / "kernel-sources.sha256"
        if stamp.is_file() and stamp.read_text() == digest:
            return
        for compiled in list(cache.glob("*.nbi")) + list(cache.glob("*.nbc")):
            compiled.unlink(missing_ok=True)
        cache.mkdir(exist_ok=True)
        stamp.write_text(digest)
    except OSError:
        pass


_drop_stale_compiled_kernels()

from .attention import (ATTENTION_BLAS_MIN_TOKENS, KV_DTYPES, LayerKV, attention, attention_blas, attention_for, attention_serial, exp_nonpositive, f16_bits,
                        kv_q8_block, layer_kv, rope, rope_qk, store_kv)
from .blocks import FAST, prepare_input, quantize_blocks, row_axpy, uses_int_dots, widen
from .ffn import (ACT_GELU_TANH, ACT_RELU, ACT_SILU, ACTS, activate_, ffn_down_rows, ffn_rows, ffn_rows_coef,
                  ffn_rows_coef_parallel, ffn_rows_parallel, gated_act, relu_)
from .matmul import PARALLEL_MIN_WORK, ROW_REUSE_MIN_TOKENS, add_rows, matmul, matmul_for, matmul_serial
from .layer import NO_DOWN_ROWS, compiled_call, decode_layer
from .norms import layernorm, rmsnorm


def one_blas_thread() -> None:
    """Limit numpy's BLAS to one thread, for the whole process. flashinfer's matmuls run on
    numba's threads (one per core); OpenBLAS's own pool spins between calls and took a core
    from them: a SmolLM2 prefill with the BLAS attention ran at 52 tok/s with two BLAS threads
    and 75+ with one, its BLAS part 0.9 s -> 0.3 s (bench/RESULTS.md). An app embedding the
    engine keeps BLAS single-threaded too (flashinfer/engine.py says so)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")

__all__ = ["ATTENTION_BLAS_MIN_TOKENS", "ACT_GELU_TANH", "ACT_RELU", "ACT_SILU", "ACTS", "FAST", "PARALLEL_MIN_WORK", "ROW_REUSE_MIN_TOKENS", "add_rows", "one_blas_thread", "attention",
           "attention_blas", "attention_for", "attention_serial", "NO_DOWN_ROWS", "compiled_call", "decode_layer", "exp_nonpositive", "activate_", "ffn_down_rows", "ffn_rows", "ffn_rows_coef", "ffn_rows_coef_parallel", "ffn_rows_parallel", "gated_act", "layernorm", "matmul", "matmul_for", "matmul_serial",
           "prepare_input", "quantize_blocks", "relu_", "rmsnorm", "rope", "rope_qk", "row_axpy", "store_kv", "KV_DTYPES", "LayerKV", "kv_q8_block", "layer_kv", "f16_bits", "uses_int_dots", "widen"]
