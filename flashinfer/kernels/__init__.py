"""Numba kernels of the forward pass, split by topic:

    simd.py       block-scaled integer dot products as LLVM vector IR (int8 x int8, nibble x int8)
    blocks.py     weight rows of every store scheme; activations quantized into int8 blocks
    matmul.py     dense matmuls (rows x tokens), serial and parallel; embedding row lookups
    ffn.py        the FFN over the store's neuron bundles; gated activations
    attention.py  RoPE and causal (sliding-window, GQA) attention over the KV cache
    norms.py      RMSNorm, LayerNorm

Plain arrays in and out, results written into caller-owned buffers. Activations are float32
[T, features] with T tokens of a chunk; weight matrices are row-major [out, in] as HF stores
them. Every kernel has a slow numpy twin in tests/reference.py that it is tested against.
"""

from .attention import attention, rope
from .blocks import FAST, prepare_input, quantize_blocks, row_axpy, uses_int_dots, widen
from .ffn import ACT_RELU, ACT_SILU, ffn_rows, ffn_rows_parallel, gated_act, relu_
from .matmul import PARALLEL_MIN_WORK, ROW_REUSE_MIN_TOKENS, add_rows, matmul, matmul_for, matmul_serial
from .norms import layernorm, rmsnorm

__all__ = ["ACT_RELU", "ACT_SILU", "FAST", "PARALLEL_MIN_WORK", "ROW_REUSE_MIN_TOKENS", "add_rows", "attention",
           "ffn_rows", "ffn_rows_parallel", "gated_act", "layernorm", "matmul", "matmul_for", "matmul_serial",
           "prepare_input", "quantize_blocks", "relu_", "rmsnorm", "rope", "row_axpy", "uses_int_dots", "widen"]
