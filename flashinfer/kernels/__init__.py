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

from .attention import (attention, attention_blas, attention_for, attention_serial, exp_nonpositive, rope,
                        store_keys)
from .blocks import FAST, prepare_input, quantize_blocks, row_axpy, uses_int_dots, widen
from .ffn import ACT_RELU, ACT_SILU, ffn_rows, ffn_rows_parallel, gated_act, relu_
from .matmul import PARALLEL_MIN_WORK, ROW_REUSE_MIN_TOKENS, add_rows, matmul, matmul_for, matmul_serial
from .layer import decode_layer
from .norms import layernorm, rmsnorm


def one_blas_thread() -> None:
    """Limit numpy's BLAS to one thread, for the whole process. flashinfer's matmuls run on
    numba's threads (one per core); OpenBLAS's own pool spins between calls and took a core
    from them: a SmolLM2 prefill with the BLAS attention ran at 52 tok/s with two BLAS threads
    and 75+ with one, its BLAS part 0.9 s -> 0.3 s (bench/RESULTS.md). An app embedding the
    engine keeps BLAS single-threaded too (flashinfer/engine.py says so)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")

__all__ = ["ACT_RELU", "ACT_SILU", "FAST", "PARALLEL_MIN_WORK", "ROW_REUSE_MIN_TOKENS", "add_rows", "one_blas_thread", "attention",
           "attention_blas", "attention_for", "attention_serial", "decode_layer", "exp_nonpositive", "ffn_rows", "ffn_rows_parallel", "gated_act", "layernorm", "matmul", "matmul_for", "matmul_serial",
           "prepare_input", "quantize_blocks", "relu_", "rmsnorm", "rope", "row_axpy", "store_keys", "uses_int_dots", "widen"]
