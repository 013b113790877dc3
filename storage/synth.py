"""Synthetic Hugging Face checkpoints with planted FFN activation sparsity.

Random-weight models with the shapes of real 7B-class checkpoints, for performance work:
the flash store, the neuron cache and the benchmarks need a model whose ReLU FFN fires
sparsely (OPT-6.7B, ReluLLaMA/ProSparse, TurboSparse-Mistral report 90-97% zeros), with a
power-law "hot" set of neurons that fire far more often than the rest (PowerInfer, §3).
They are not language models: the text they generate is noise.

    from storage.synth import synthesize
    report = synthesize("mistral-7b-relu", "models/mistral-relu", sparsity=0.9)
    flashinfer synth mistral-7b-relu models/mistral-relu --sparsity 0.9

Output: an HF directory (config.json as transformers 4.x writes it, safetensors shards of at
most ~1 GB + model.safetensors.index.json, tokenizer.json, tokenizer_config.json,
generation_config.json) and `synth.json` with the preset, the targets and the sparsity
measured on the model itself.

## How sparsity is planted

Neuron i of a layer should fire (ReLU output > 0) with probability p_i over tokens. The
p_i follow a power law over a random ranking of the neurons, p_i ∝ rank^-hot_skew, clipped
to [1e-4, 0.9] and scaled so that their mean is 1 - sparsity. hot_skew 0 is uniform;
hot_skew 1 puts ~52% of all firings on the top 10% of neurons and ~39% of neurons carry
80% of them (PowerInfer: 43% for ReGLU LLaMA-70B, 26% for OPT-30B).

A neuron fires when its pre-activation w_i·x + b_i > 0, so a threshold θ_i with
P(w_i·x > θ_i) = p_i does it. θ_i is fitted on the real forward pass, not on an idealised
x: the generator runs a small numpy forward of the model it is writing (embeddings →
attention → FFN, layer after layer, with the weights as stored, i.e. after rounding to
f16) on a few random token sequences, and sets θ_i = μ_i + σ_i·Φ⁻¹(1 - p_i) from the mean
and spread of w_i·x over the calibration tokens (w_i·x is a sum of thousands of terms, so
close to normal). Layer l is calibrated on the inputs produced by layers < l as written.

- OPT has biases: fc1's bias is b_i = -θ_i, with x the FFN LayerNorm's output.
- Llama/Mistral have none, so the model carries its own constant: a *bias channel*.
  Residual coordinate c holds the same value A in every token's embedding; no block writes
  to it (row c of o_proj and down_proj is zero) and attention and up_proj ignore it (their
  column c is zero), so it equals A at every layer. Gate column c is -θ_i. After RMSNorm
  the FFN input is x/rms(x), so gate_i·x̂ = (w_i·x_rest - θ_i·A)/rms(x): the ReLU sign
  is exactly that of a biased neuron whatever rms(x) is (θ is fitted on x̂/x̂_c, where the
  per-token scale cancels). Real LLMs grow such constant "massive activation" channels
  themselves (Sun et al. 2024); ReLU(gate)·up is zero exactly when the gate is.

## SwiGLU presets (tiny-silu, mistral-7b)

SiLU has no zeros, so a SwiGLU preset plants the sign of each neuron's gate instead, with the
same machinery (p_i = P(gate_i.x > 0), the bias channel), and gives the gate rows a real model's
spread: defaults measured on SmolLM2-135M-Instruct (SILU_* below): 37% of gate pre-activations
positive, the hottest 10% of neurons carrying 22% of the positives, a per-neuron gate std of 0.5.
The scale matters for SiLU: at 0.5 a threshold on |silu(g)| (the gate predictor's test) keeps
negative gates too, as on SmolLM2. For the benchmark of the gate predictor under a cap (bench/run.py
--models mistral-7b); the text is noise, as with the ReLU presets.

## Low-rank structure in the rows that decide activity

Gate (fc1 for OPT) rows are not white noise: column j of the matrix is scaled by
s_j ∝ rank_j^-spectrum_decay over a random ranking of the input coordinates (mean square 1),
so the matrix's singular values fall off as a power law and its pre-activations are
close to low-rank, as in trained LLMs (the premise of Deja Vu's and LLM in a flash's
low-rank predictors). With white rows (decay 0) no rank-r predictor can find the firing
neurons: on d=2048, f=5632, 10% active, the rank-128 truncated SVD needs 84% of the
neurons for 0.99 recall; decay 0.5 needs 39%, 0.75 (the default) 16.5%, 1.0 11%
(rank 512 at 0.75: 12.6%) — the default sits where published predictors are (a predicted
set 1.5-2x the active set).

Block outputs (o_proj, down_proj / fc2) are scaled on the calibration tokens so each block
adds a fixed share of the embedding's variance to the residual stream; q/k are scaled so
attention logits have a std of ATTN_LOGIT_STD (fairly sharp attention, so its output does
not shrink with position and the FFN input distribution stays the same along a sequence).

Measurement: a second set of random sequences (not used for fitting) runs through the same
forward; synth.json records per layer the fraction of zero FFN activations and the share of
firings carried by the 10% most active neurons, plus sparsity per position quartile.

Measured (2-core VM, `python -m storage.synth PRESET DIR`, defaults sparsity 0.9, hot_skew 1):
the numpy forward above gives 0.897-0.899 zeros on every layer of opt-6.7b, llama-2-7b-relu
and mistral-7b-relu, top-10% share 0.51 (target 0.516); the engine's own forward
(flashinfer.Engine, one other random 64-token sequence) gives 0.897-0.900 on every layer
of all three. Sparsity drifts slowly with position: 0.895 at positions 0-7, 0.9005 at
64-127, 0.905 at 512-999 (1b preset, engine). 0.97 gives 0.968-0.969. Writing takes
~105-130 s per 7B preset (13-14.5 GB, f16) at a peak RSS of ~0.3 GB.

## Streaming and reproducibility

Each tensor is generated in blocks of rows just before they are written, straight into the
shard file whose header was computed beforehand from the shapes; only a few blocks (a
background thread draws the next ones), the calibration activations and small per-layer
vectors are in memory (peak RSS ~0.3 GB for 7B). Tensor `name` draws from `np.random.default_rng([seed, crc32(name)])`, blocks
in order, so the same preset, seed and options give byte-identical files on the same
machine (the calibration matmuls go through BLAS; another BLAS could round a threshold
differently). Everything is written into a hidden sibling directory, fsynced, and renamed
to `out_dir` only when complete.
"""

from __future__ import annotations

import json
import math
import os
import queue
import shutil
import struct
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import NormalDist

import numpy as np

from storage.errors import ConfigValueError, StorageError
from storage.gguf import FLASHINFER_ACT_KEY, gguf_name, gguf_permute_rows  # noqa: F401  (gguf_name: re-exported)

SYNTH_VERSION = 2  # 2: spectrum_decay on the activity-deciding rows
MAX_SHARD_BYTES = 1_000_000_000  # HF's "1GB" (decimal), a shard never holds more unless one tensor does
BLOCK_ELEMS = 1 << 22  # elements generated per block of rows (16 MB as float32)
P_MIN, P_MAX = 1e-4, 0.9  # per-neuron firing probability bounds
ATTN_LOGIT_STD = 5.0
CAL_SEQS, EVAL_SEQS, SEQ_LEN = 4, 2, 64  # random sequences for fitting / for measuring
BOS_ID, EOS_ID, UNK_ID = 1, 2, 0
DTYPES = {"f16": ("F16", 2, "float16"), "bf16": ("BF16", 2, "bfloat16"), "f32": ("F32", 4, "float32")}
# GGUF matrix types (`--gguf-type`) and their bytes per 256 weights of a row: Q8_0 is one f16
# scale + 32 int8 per 32, Q4_0 one f16 scale + 16 bytes of nibbles (ggml-common.h
# block_q8_0/q4_0), Q4_K 144 bytes per 256 and Q6_K 210 (block_q4_K/q6_K; rows of a multiple of
# 256: the "tiny-256" preset)
GGUF_TYPE_BYTES_PER_256 = {"f32": 1024, "f16": 512, "bf16": 512, "q8_0": 272, "q4_0": 144, "q4_k": 144, "q6_k": 210}
GGUF_TYPES = tuple(GGUF_TYPE_BYTES_PER_256)
GGUF_BLOCK_TYPES = ("q8_0", "q4_0")  # quantized in blocks of 32 along a row by gguf-py
GGUF_SUPER_BLOCK_TYPES = ("q4_k", "q6_k")  # quantized by storage/quant.py, written in ggml's blocks
GGUF_ROW_MULTIPLE = {"q4_k": 256, "q6_k": 256}  # weights a row must be a multiple of (else 32)
FFN_MATRICES = ("mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class SynthShape:
    """The shape of a preset model: the fields its HF config.json carries."""

    model_type: str  # "llama" | "mistral" | "opt"
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn: int
    vocab: int
    max_positions: int
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    norm_eps: float = 1e-5
    act: str = "relu"  # the FFN's activation: "relu" (planted zeros) or "silu" (SwiGLU, planted gate signs)

    @property
    def family(self) -> str:
        return "opt" if self.model_type == "opt" else "llama"

    @property
    def head_dim(self) -> int:
        return self.hidden // self.n_heads


PRESETS: dict[str, SynthShape] = {
    "tiny": SynthShape("llama", 64, 2, 4, 4, 256, 512, 512),
    "tiny-opt": SynthShape("opt", 64, 2, 4, 4, 256, 512, 512),  # the OPT path, for fast tests
    "tiny-256": SynthShape("llama", 256, 2, 4, 2, 512, 512, 512),  # rows of 256: Q4_K's super-blocks
    "small": SynthShape("llama", 512, 4, 8, 4, 4096, 1024, 512),  # FFN of ~20 MB at q8: plans whose caches matter
    "1b": SynthShape("llama", 2048, 16, 16, 4, 5632, 32000, 2048),  # TinyLlama-like
    "opt-6.7b": SynthShape("opt", 4096, 32, 32, 32, 16384, 50272, 2048),
    "llama-2-7b-relu": SynthShape("llama", 4096, 32, 32, 32, 11008, 32000, 4096),  # ReluLLaMA / ProSparse
    "mistral-7b-relu": SynthShape("mistral", 4096, 32, 32, 8, 14336, 32000, 32768,
                                  rope_theta=1e6, sliding_window=4096),  # TurboSparse-Mistral
    "tiny-silu": SynthShape("llama", 64, 2, 4, 4, 256, 512, 512, act="silu"),
    "mistral-7b": SynthShape("mistral", 4096, 32, 32, 8, 14336, 32000, 32768,
                             rope_theta=1e6, sliding_window=4096, act="silu"),  # Mistral-7B-v0.1's shape, SwiGLU
}
# SwiGLU presets plant the sign of each neuron's gate, not zeros (SiLU has none), with defaults
# measured on the real SmolLM2-135M-Instruct (1024 tokens of the GPL-3, every layer:
# `python -m bench.locality --gates`): 37% of gate pre-activations are positive (20-61% by
# layer), the 10% of neurons most often positive carry 22% of the positives (15-29%), and a
# neuron's gate varies with a std of 0.5 over tokens (median neuron of the middle layer; 0.35
# first, 0.76 last). The scale matters for SiLU, unlike ReLU: at 0.5 most |silu(g)| lie where
# the curve bends, so a threshold on |silu(g)| keeps negative gates too, as it does on SmolLM2.
SILU_NEGATIVE_SHARE = 0.63
SILU_HOT_SKEW = 0.5
SILU_GATE_STD = 0.5
DEFAULT_SPARSITY = {"relu": 0.9, "silu": SILU_NEGATIVE_SHARE}
DEFAULT_HOT_SKEW = {"relu": 1.0, "silu": SILU_HOT_SKEW}


@dataclass
class SynthReport:
    out_dir: Path
    preset: str
    dtype: str
    seed: int
    sparsity_target: float
    hot_skew: float
    spectrum_decay: float
    n_params: int
    bytes_written: int  # weight bytes (safetensors data), excluding GGUF
    seconds: float
    layer_sparsity: list[float]  # measured fraction of zero FFN activations, per layer
    layer_hot10_share: list[float]  # measured share of firings on the top 10% neurons, per layer
    hot10_share_target: float
    gguf_path: Path | None = None
    gguf_types: tuple[str, str] | None = None  # (FFN matrices, other matrices) of the GGUF

    @property
    def mean_sparsity(self) -> float:
        return float(np.mean(self.layer_sparsity))


# ---- public entry point ------------------------------------------------------------

def synthesize(preset: str, out_dir: str | Path, *, sparsity: float | None = None, hot_skew: float | None = None,
               spectrum_decay: float = 0.75, seed: int = 0, dtype: str = "f16", progress: Progress | None = None, gguf_path: str | Path | None = None,
               gguf_type: str | None = None, gguf_resident_type: str | None = None,
               overwrite: bool = False) -> SynthReport:
    """Write a random-weight HF checkpoint of `preset` whose ReLU FFNs are `sparsity` sparse
    (a SwiGLU preset: whose gates are negative in a `sparsity` share of (token, neuron) pairs).
    sparsity and hot_skew None: the activation's defaults (DEFAULT_SPARSITY, DEFAULT_HOT_SKEW).

    `progress(bytes_done, bytes_total)` is called after every block written. With
    `gguf_path` the same weights are also written as a llama.cpp GGUF (llama/mistral only):
    FFN matrices as `gguf_type`, attention, token_embd and output as `gguf_resident_type`
    (GGUF_TYPES; default: the checkpoint's dtype, and the resident type defaults to the FFN
    one). `gguf_type="q4_0", gguf_resident_type="q8_0"` mirrors the default flash store
    (`flashinfer convert --quant q4 --resident-quant q8`).
    """
    if preset in PRESETS:
        act = PRESETS[preset].act
        sparsity = DEFAULT_SPARSITY[act] if sparsity is None else sparsity
        hot_skew = DEFAULT_HOT_SKEW[act] if hot_skew is None else hot_skew
    shape = _check_args(preset, sparsity, hot_skew, spectrum_decay, dtype)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise StorageError(f"{out_dir}: already exists; delete it, pick another path or pass overwrite=True")
    if gguf_path is not None and shape.family != "llama":
        raise ConfigValueError(f"GGUF output is not available for {preset}: llama.cpp has no OPT support")
    gguf_type = gguf_type or dtype
    gguf_resident_type = gguf_resident_type or gguf_type
    plan = _tensor_plan(shape)
    if gguf_path is not None:
        _check_gguf_types(plan, gguf_type, gguf_resident_type)
    itemsize = DTYPES[dtype][1]
    weight_bytes = sum(math.prod(s) * itemsize for _, s in plan)
    gguf_bytes = 0 if gguf_path is None else sum(
        gguf_tensor_bytes(s, gguf_type if name.endswith(FFN_MATRICES) else gguf_resident_type) if len(s) == 2
        else math.prod(s) * 4 for name, s in plan)
    _check_disk(out_dir, weight_bytes + gguf_bytes + (64 << 20))

    tmp = out_dir.parent / f".{out_dir.name}.synth-tmp-{os.getpid()}"
    gguf_tmp = None if gguf_path is None else Path(gguf_path).with_name(f".{Path(gguf_path).name}.tmp-{os.getpid()}")
    t0 = time.perf_counter()
    gguf = None
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        writer = _ShardedWriter(tmp, plan, dtype, progress)
        if gguf_tmp is not None:
            gguf = _GGUFStream(gguf_tmp, preset, shape, plan, dtype, gguf_type, gguf_resident_type)
            writer.mirror = gguf.write
        measured = _Generator(shape, plan, writer, sparsity, hot_skew, spectrum_decay, seed).run()
        writer.finish()
        if gguf is not None:
            gguf.finish()
            gguf = None
        _write_json(tmp / "config.json", _hf_config(shape, dtype))
        _write_json(tmp / "generation_config.json", {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID})
        tokenizer_json, tokenizer_config = _tokenizer_files(shape)
        (tmp / "tokenizer.json").write_text(tokenizer_json)
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "synth.json", {
            "synth_version": SYNTH_VERSION, "preset": preset, "shape": asdict(shape), "seed": seed, "dtype": dtype,
            "sparsity_target": sparsity, "hot_skew": hot_skew,
            **({"silu": {"sparsity_means": "share of (token, neuron) gate pre-activations <= 0",
                         "gate_std": SILU_GATE_STD,
                         "reproduces": "SmolLM2-135M-Instruct on 1024 tokens of the GPL-3: 37% of gates positive, "
                                       "the hottest 10% of neurons carry 22% of the positives, per-neuron gate std "
                                       "0.5 (middle layer); tokens independent, as SmolLM2's show at these shares "
                                       "(bench/RESULTS.md 2026-12-07, locality)"}} if shape.act == "silu" else {}),
            "spectrum_decay": spectrum_decay, **measured,
        })
        for path in tmp.iterdir():  # shards are synced as they close; this is the small files
            _fsync(path)
        _fsync(tmp)
        if out_dir.exists():  # overwrite: move the old one aside first so a crash never leaves a mix
            trash = out_dir.parent / f".{out_dir.name}.synth-old-{os.getpid()}"
            os.rename(out_dir, trash)
            shutil.rmtree(trash)
        os.rename(tmp, out_dir)
        _fsync(out_dir.parent)
        if gguf_tmp is not None:
            os.replace(gguf_tmp, gguf_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if gguf is not None:
            gguf.close()
        if gguf_tmp is not None:
            gguf_tmp.unlink(missing_ok=True)
        raise
    return SynthReport(
        out_dir=out_dir, preset=preset, dtype=dtype, seed=seed, sparsity_target=sparsity, hot_skew=hot_skew,
        spectrum_decay=spectrum_decay, n_params=sum(math.prod(s) for _, s in plan), bytes_written=weight_bytes, seconds=time.perf_counter() - t0,
        layer_sparsity=measured["measured"]["layer_sparsity"],
        layer_hot10_share=measured["measured"]["layer_hot10_share"],
        hot10_share_target=measured["hot10_share_target"], gguf_path=None if gguf_path is None else Path(gguf_path),
        gguf_types=None if gguf_path is None else (gguf_type, gguf_resident_type),
    )


def _check_args(preset: str, sparsity: float, hot_skew: float, spectrum_decay: float, dtype: str) -> SynthShape:
    if preset not in PRESETS:
        raise ConfigValueError(f"unknown synthetic preset {preset!r} (presets: {', '.join(PRESETS)})")
    if not isinstance(sparsity, (int, float)) or not 0.0 < sparsity < 1.0:
        raise ConfigValueError(f"sparsity must be a fraction strictly between 0 and 1, got {sparsity!r}")
    if not isinstance(hot_skew, (int, float)) or not 0.0 <= hot_skew <= 4.0:
        raise ConfigValueError(f"hot_skew must be between 0 (uniform) and 4, got {hot_skew!r}")
    if not isinstance(spectrum_decay, (int, float)) or not 0.0 <= spectrum_decay <= 2.0:
        raise ConfigValueError(f"spectrum_decay must be between 0 (white rows) and 2, got {spectrum_decay!r}")
    if dtype not in DTYPES:
        raise ConfigValueError(f"unknown dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    return PRESETS[preset]


def gguf_tensor_bytes(shape: tuple[int, int], gguf_type: str) -> int:
    """Bytes of a [rows, cols] matrix stored as `gguf_type` (cols a multiple of 32)."""
    return shape[0] * (shape[1] * GGUF_TYPE_BYTES_PER_256[gguf_type] // 256)


def _check_gguf_types(plan, ffn_type: str, resident_type: str) -> None:
    for option, kind in (("gguf_type", ffn_type), ("gguf_resident_type", resident_type)):
        if kind not in GGUF_TYPES:
            raise ConfigValueError(f"unknown {option} {kind!r} (supported: {', '.join(GGUF_TYPES)})")
    for name, shape in plan:
        multiple = max(GGUF_ROW_MULTIPLE.get(kind, 32) for kind in (ffn_type, resident_type))
        if len(shape) == 2 and shape[1] % multiple:  # every preset's rows are a multiple of 32
            raise ConfigValueError(f"GGUF types {ffn_type}/{resident_type} work on rows of a multiple of {multiple} "
                                   f"weights; {name} has rows of {shape[1]} (the tiny-256 preset has rows of 256)")


def _check_disk(out_dir: Path, needed: int) -> None:
    probe = out_dir.parent
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise StorageError(
            f"{out_dir}: not enough disk space for the synthetic model: needs {needed / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free on {probe}"
        )


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ---- tensors: names and shapes in the order they are generated ----------------------

def _tensor_plan(s: SynthShape) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes of every tensor, in forward order (the order they are written)."""
    d, hd, f = s.hidden, s.head_dim, s.ffn
    q, kv = s.n_heads * hd, s.n_kv_heads * hd
    if s.family == "opt":
        plan = [("model.decoder.embed_tokens.weight", (s.vocab, d)),
                ("model.decoder.embed_positions.weight", (s.max_positions + 2, d))]
        for i in range(s.n_layers):
            p = f"model.decoder.layers.{i}."
            plan += [(p + "self_attn_layer_norm.weight", (d,)), (p + "self_attn_layer_norm.bias", (d,))]
            for proj, rows in (("q_proj", q), ("k_proj", q), ("v_proj", q), ("out_proj", d)):
                plan += [(p + f"self_attn.{proj}.weight", (rows, d)), (p + f"self_attn.{proj}.bias", (rows,))]
            plan += [(p + "final_layer_norm.weight", (d,)), (p + "final_layer_norm.bias", (d,)),
                     (p + "fc1.weight", (f, d)), (p + "fc1.bias", (f,)),
                     (p + "fc2.weight", (d, f)), (p + "fc2.bias", (d,))]
        plan += [("model.decoder.final_layer_norm.weight", (d,)), ("model.decoder.final_layer_norm.bias", (d,))]
        return plan  # OPT ties lm_head to embed_tokens
    plan = [("model.embed_tokens.weight", (s.vocab, d))]
    for i in range(s.n_layers):
        p = f"model.layers.{i}."
        plan += [(p + "input_layernorm.weight", (d,)), (p + "self_attn.q_proj.weight", (q, d)),
                 (p + "self_attn.k_proj.weight", (kv, d)), (p + "self_attn.v_proj.weight", (kv, d)),
                 (p + "self_attn.o_proj.weight", (d, q)), (p + "post_attention_layernorm.weight", (d,)),
                 (p + "mlp.gate_proj.weight", (f, d)), (p + "mlp.up_proj.weight", (f, d)),
                 (p + "mlp.down_proj.weight", (d, f))]
    return plan + [("model.norm.weight", (d,)), ("lm_head.weight", (s.vocab, d))]


# ---- streaming safetensors writer ---------------------------------------------------

def _to_stored(rows: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """(the bytes to write as an array, the stored values widened back to float32)."""
    if dtype == "f16":
        stored = rows.astype("<f2")
        return stored, stored.astype(np.float32)
    if dtype == "bf16":  # round to nearest even, as torch does
        bits = rows.astype(np.float32).view(np.uint32)
        stored = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)).astype("<u2")
        return stored, (stored.astype(np.uint32) << np.uint32(16)).view(np.float32)
    stored = np.ascontiguousarray(rows, dtype="<f4")
    return stored, stored


class _ShardedWriter:
    """Writes the tensors of `plan`, in plan order, block by block into shards whose headers
    are computed up front from the shapes. Refuses anything out of order or of a wrong size."""

    def __init__(self, out: Path, plan: list[tuple[str, tuple[int, ...]]], dtype: str,
                 progress: Progress | None):
        self.out, self.plan, self.dtype, self.progress = out, plan, dtype, progress
        st_dtype, itemsize, _ = DTYPES[dtype]
        self.nbytes = [math.prod(s) * itemsize for _, s in plan]
        self.total = sum(self.nbytes)
        self.done = 0
        self.mirror: Callable[[str, np.ndarray, np.ndarray], None] | None = None  # also feeds a GGUF writer
        shards: list[list[int]] = [[]]
        size = 0
        for i, n in enumerate(self.nbytes):
            if shards[-1] and size + n > MAX_SHARD_BYTES:
                shards.append([])
                size = 0
            shards[-1].append(i)
            size += n
        self.single = len(shards) == 1
        names = (["model.safetensors"] if self.single else
                 [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))])
        self.shard_of = {i: k for k, members in enumerate(shards) for i in members}
        self.shard_names, self.shards = names, shards
        self.headers = []
        for members in shards:
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for i in members:
                name, shape = plan[i]
                end = offset + self.nbytes[i]
                header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, end]}
                offset += self.nbytes[i]
            blob = json.dumps(header, separators=(",", ":")).encode()
            self.headers.append(blob + b" " * (-len(blob) % 8))
        self.index = 0  # tensor being written
        self.written = 0  # its bytes so far
        self.file = None

    def write(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Append a block of rows (float32) to tensor `name`; returns them as stored, widened."""
        if self.index >= len(self.plan) or self.plan[self.index][0] != name:
            expected = self.plan[self.index][0] if self.index < len(self.plan) else "nothing"
            raise AssertionError(f"synth writer: got {name}, expected {expected}")
        stored, widened = _to_stored(rows, self.dtype)
        if self.file is None:
            k = self.shard_of[self.index]
            self.file = open(self.out / self.shard_names[k], "wb")
            self.file.write(struct.pack("<Q", len(self.headers[k])))
            self.file.write(self.headers[k])
        self.file.write(memoryview(stored).cast("B"))
        if self.mirror is not None:
            self.mirror(name, stored, widened)
        self.written += stored.nbytes
        self.done += stored.nbytes
        if self.written > self.nbytes[self.index]:
            raise AssertionError(f"synth writer: {name} got more than its {self.nbytes[self.index]} bytes")
        if self.written == self.nbytes[self.index]:
            self.index += 1
            self.written = 0
            if self.index == len(self.plan) or self.shard_of[self.index] != self.shard_of[self.index - 1]:
                self._close_shard()
        if self.progress is not None:
            self.progress(self.done, self.total)
        return widened

    def _close_shard(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        # the shard is on disk: let the page cache drop it rather than evict everything else
        os.posix_fadvise(self.file.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        self.file.close()
        self.file = None

    def finish(self) -> None:
        if self.index != len(self.plan):
            raise AssertionError(f"synth writer: stopped before {self.plan[self.index][0]}")
        if not self.single:
            weight_map = {self.plan[i][0]: self.shard_names[self.shard_of[i]] for i in range(len(self.plan))}
            _write_json(self.out / "model.safetensors.index.json",
                        {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))})


# ---- firing probabilities -----------------------------------------------------------

def firing_probabilities(n: int, sparsity: float, hot_skew: float, rng: np.random.Generator) -> np.ndarray:
    """p_i ∝ rank_i^-hot_skew over a random ranking, clipped to [P_MIN, P_MAX], mean 1 - sparsity."""
    mean = 1.0 - sparsity
    p_max = max(P_MAX, mean)
    base = np.arange(1, n + 1, dtype=np.float64) ** -float(hot_skew)
    lo, hi = 1e-12, 1e12
    for _ in range(200):  # the clipped mean grows monotonically with the scale: bisect it
        scale = math.sqrt(lo * hi)
        if np.clip(scale * base, P_MIN, p_max).mean() < mean:
            lo = scale
        else:
            hi = scale
    return np.clip(scale * base, P_MIN, p_max)[rng.permutation(n)]


def hot10_share(counts: np.ndarray) -> float:
    """Share of all firings carried by the 10% most active neurons."""
    top = np.sort(counts)[::-1][: max(1, len(counts) // 10)]
    return float(top.sum() / max(counts.sum(), 1e-30))


_INV_CDF = np.vectorize(NormalDist().inv_cdf, otypes=[np.float64])


# ---- the generator: weights block by block, and a numpy forward to calibrate them ----

def _rmsnorm(x: np.ndarray, eps: float) -> np.ndarray:  # weight is ones
    return (x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps)).astype(np.float32)


def _layernorm(x: np.ndarray, eps: float) -> np.ndarray:  # weight ones, bias zeros
    x64 = x.astype(np.float64)
    x64 -= x64.mean(-1, keepdims=True)
    return (x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + eps)).astype(np.float32)


def _row_blocks(rows: int, cols: int):
    """Row ranges of the blocks a matrix is generated in: ~BLOCK_ELEMS elements, whole
    multiples of 256 rows (so whole attention heads, for the GGUF q/k permutation)."""
    step = max(1, BLOCK_ELEMS // cols)
    step = max(256, step - step % 256) if rows > 256 else rows
    for r0 in range(0, rows, step):
        yield r0, min(rows, r0 + step)


class _Noise:
    """N(0, 1) float32 blocks of every matrix in plan order, drawn ahead by a background thread.

    Tensor `name` draws from default_rng([seed, crc32(name)]), its blocks in row order, so
    the values do not depend on anything computed. numpy's normal sampler holds the GIL but
    the casts, matmuls and writes of the consumer release it, so the two overlap (mistral-7b:
    130 s -> 110 s).
    """

    def __init__(self, plan, seed: int, depth: int = 3):
        self.matrices = [(name, shape) for name, shape in plan if len(shape) == 2]
        self.seed = seed
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._produce, name="synth-noise", daemon=True)
        self.thread.start()

    def _produce(self) -> None:
        try:
            for name, (rows, cols) in self.matrices:
                rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
                for r0, r1 in _row_blocks(rows, cols):
                    if not self._put((name, r0, rng.standard_normal((r1 - r0, cols), dtype=np.float32))):
                        return
        except BaseException as e:  # handed to the consumer, which raises it
            self._put(("error", 0, e))

    def _put(self, item) -> bool:
        """Queue `item` unless the consumer has stopped (then False)."""
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def next(self, name: str, r0: int) -> np.ndarray:
        got_name, got_r0, block = self.queue.get()
        if got_name == "error":
            raise block
        if (got_name, got_r0) != (name, r0):
            raise AssertionError(f"synth noise: got {got_name}[{got_r0}:], expected {name}[{r0}:]")
        return block

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class _Generator:
    """Generates every tensor in plan order, runs the calibration forward alongside, and
    sets the thresholds that plant the sparsity."""

    def __init__(self, shape: SynthShape, plan, writer: _ShardedWriter, sparsity: float, hot_skew: float,
                 spectrum_decay: float, seed: int):
        self.s, self.writer, self.sparsity, self.hot_skew, self.seed = shape, writer, sparsity, hot_skew, seed
        self.spectrum_decay = spectrum_decay
        self.shapes = dict(plan)
        self.noise = _Noise(plan, seed)
        meta = np.random.default_rng([seed, 0x5EED])
        n_seq = CAL_SEQS + EVAL_SEQS
        tokens = meta.integers(3, shape.vocab, size=(n_seq, SEQ_LEN))
        tokens[:, 0] = BOS_ID  # as the engine's tokenizer starts every prompt
        self.tokens = tokens.reshape(-1)  # activations are [tokens, features], sequence after sequence
        self.n_cal = CAL_SEQS * SEQ_LEN  # the first n_cal tokens fit thresholds and scales, the rest measure
        self.bias_channel = int(meta.integers(shape.hidden)) if shape.family == "llama" else None
        self.probs = [firing_probabilities(shape.ffn, sparsity, hot_skew, np.random.default_rng([seed, 0xF1E, i]))
                      for i in range(shape.n_layers)]
        # the scale of the residual stream is free (norms remove it); 4 puts o_proj/down_proj at
        # std ~0.015 as in Llama-2-7B, rather than near f16's subnormal range
        self.embed_std = 4.0
        # each of the 2L blocks adds embed_std^2 / L of variance: the residual ends at ~3x the embedding's
        self.block_std = self.embed_std / math.sqrt(shape.n_layers)
        self.zeros_by_layer: list[float] = []
        self.hot_by_layer: list[float] = []
        self.zeros_by_position = np.zeros(SEQ_LEN)

    # -- generation primitives

    def _matrix(self, name: str, std: float, x: np.ndarray | None, edit=None, on_stored=None,
                bias_col_zero: bool = False, bias_row_zero: bool = False) -> np.ndarray | None:
        """Generate N(0, std) rows of `name` block by block, let `edit(r0, block)` plant what
        it must, write them, hand the stored values to `on_stored(r0, stored)`, and return
        x @ W.T computed with the stored values (if x is given)."""
        rows_total, cols = self.shapes[name]
        out = None if x is None else np.empty((x.shape[0], rows_total), np.float32)
        c = self.bias_channel
        for r0, r1 in _row_blocks(rows_total, cols):
            block = self.noise.next(name, r0)
            block *= np.float32(std)
            if bias_col_zero:  # this projection ignores the bias channel
                block[:, c] = 0.0
            if bias_row_zero and r0 <= c < r1:  # this block never writes into the bias channel
                block[c - r0] = 0.0
            if edit is not None:
                edit(r0, block)
            stored = self.writer.write(name, block)
            if on_stored is not None:
                on_stored(r0, stored)
            if out is not None:
                out[:, r0:r1] = x @ stored.T
        return out

    def _vector(self, name: str, values: np.ndarray | float) -> np.ndarray:
        (n,) = self.shapes[name]
        return self.writer.write(name, np.broadcast_to(np.float32(values), (n,)).copy() if np.isscalar(values)
                                 else values.astype(np.float32))

    def _scale_for(self, a: np.ndarray, target_std: float) -> float:
        """Weight std so that rows · a have std target_std over the calibration tokens."""
        return target_std / math.sqrt(float((a[: self.n_cal].astype(np.float64) ** 2).sum(-1).mean()))

    # -- the model
    def run(self) -> dict:
        try:
            return self._run()
        finally:
            self.noise.close()

    def _run(self) -> dict:
        s = self.s
        x = self._embeddings()
        for i in range(s.n_layers):
            x = self._layer(i, x)
        if s.family == "opt":  # lm_head is the embedding: this final norm weight gives logits std ~3
            self._vector("model.decoder.final_layer_norm.weight", 3.0 / (self.embed_std * math.sqrt(s.hidden)))
            self._vector("model.decoder.final_layer_norm.bias", 0.0)
        else:
            self._vector("model.norm.weight", 1.0)
            self._matrix("lm_head.weight", 3.0 / math.sqrt(s.hidden), None)  # logits std ~3
        target = [hot10_share(p) for p in self.probs]
        eval_tokens = EVAL_SEQS * SEQ_LEN
        return {
            "mechanism": ("fc1 bias calibrated per neuron" if s.family == "opt" else
                          "bias channel: constant residual coordinate, gate column calibrated per neuron"),
            "bias_channel": self.bias_channel,
            "hot10_share_target": round(float(np.mean(target)), 4),
            "calibration": {"sequences": CAL_SEQS, "eval_sequences": EVAL_SEQS, "seq_len": SEQ_LEN,
                            "attn_logit_std": ATTN_LOGIT_STD},
            "measured": {
                "what": f"numpy forward of the stored weights on {EVAL_SEQS} random sequences x {SEQ_LEN} tokens "
                        "(not used for calibration), every layer",
                "mean_sparsity": round(float(np.mean(self.zeros_by_layer)), 4),
                "layer_sparsity": [round(v, 4) for v in self.zeros_by_layer],
                "layer_hot10_share": [round(v, 4) for v in self.hot_by_layer],
                "sparsity_by_position_quartile": [
                    round(float(q.mean()) / (eval_tokens // SEQ_LEN * s.ffn * s.n_layers), 4)
                    for q in np.array_split(self.zeros_by_position, 4)],
            },
        }

    def _embeddings(self) -> np.ndarray:
        s = self.s
        x = np.zeros((len(self.tokens), s.hidden), np.float32)
        c = self.bias_channel
        anchor = self.embed_std * math.sqrt(s.hidden)  # the bias channel holds as much energy as the rest

        def set_channel(r0, block):
            block[:, c] = anchor

        def gather(r0, stored):
            hit = (self.tokens >= r0) & (self.tokens < r0 + len(stored))
            x[hit] = stored[self.tokens[hit] - r0]

        if s.family == "llama":
            self._matrix("model.embed_tokens.weight", self.embed_std, None, edit=set_channel, on_stored=gather)
            return x
        self._matrix("model.decoder.embed_tokens.weight", self.embed_std, None, on_stored=gather)

        def add_positions(r0, stored):  # OPT looks position p up at row p + 2
            lo, hi = max(r0, 2), min(r0 + len(stored), SEQ_LEN + 2)
            if lo < hi:
                x.reshape(-1, SEQ_LEN, s.hidden)[:, lo - 2 : hi - 2] += stored[lo - r0 : hi - r0]

        self._matrix("model.decoder.embed_positions.weight", 0.5 * self.embed_std, None, on_stored=add_positions)
        return x

    def _layer(self, i: int, x: np.ndarray) -> np.ndarray:
        s = self.s
        opt = s.family == "opt"
        p = f"model.decoder.layers.{i}." if opt else f"model.layers.{i}."
        attn_p = p + "self_attn."
        norm = (lambda v: _layernorm(v, s.norm_eps)) if opt else (lambda v: _rmsnorm(v, s.norm_eps))

        # attention
        if opt:
            self._vector(p + "self_attn_layer_norm.weight", 1.0)
            self._vector(p + "self_attn_layer_norm.bias", 0.0)
        else:
            self._vector(p + "input_layernorm.weight", 1.0)
        xb = norm(x)
        llama = not opt
        xb_eff = xb.copy()
        if llama:
            xb_eff[:, self.bias_channel] = 0.0
        in_std = self._scale_for(xb_eff, 1.0)  # unit-variance outputs
        qk_std = in_std * math.sqrt(ATTN_LOGIT_STD)  # q·k/sqrt(head_dim) then has std ATTN_LOGIT_STD
        q = self._matrix(attn_p + "q_proj.weight", qk_std, xb, bias_col_zero=llama)
        if opt:
            self._vector(attn_p + "q_proj.bias", 0.0)
        k = self._matrix(attn_p + "k_proj.weight", qk_std, xb, bias_col_zero=llama)
        if opt:
            self._vector(attn_p + "k_proj.bias", 0.0)
        v = self._matrix(attn_p + "v_proj.weight", in_std, xb, bias_col_zero=llama)
        if opt:
            self._vector(attn_p + "v_proj.bias", 0.0)
        attn = self._attention(q, k, v)
        o_name = attn_p + ("out_proj.weight" if opt else "o_proj.weight")
        x = x + self._matrix(o_name, self._scale_for(attn, self.block_std), attn, bias_row_zero=llama)
        if opt:
            self._vector(attn_p + "out_proj.bias", 0.0)

        # FFN
        if opt:
            self._vector(p + "final_layer_norm.weight", 1.0)
            self._vector(p + "final_layer_norm.bias", 0.0)
        else:
            self._vector(p + "post_attention_layernorm.weight", 1.0)
        xb = norm(x)
        hidden = self._ffn_up(i, p, xb)
        down_name = p + ("fc2.weight" if opt else "mlp.down_proj.weight")
        x = x + self._matrix(down_name, self._scale_for(hidden, self.block_std), hidden, bias_row_zero=llama)
        if opt:
            self._vector(p + "fc2.bias", 0.0)
        return x

    def _thresholds(self, pre: np.ndarray, probs: np.ndarray) -> np.ndarray:
        """θ_i with P(pre_i > θ_i) = p_i, from the mean and spread over calibration tokens `pre`."""
        cal = pre.astype(np.float64)
        return cal.mean(0) + cal.std(0) * _INV_CDF(1.0 - probs)

    def _column_scale(self, i: int) -> np.ndarray:
        """Layer i's per-input-column scale of the activity-deciding rows: a power law over a
        random ranking of the columns, mean square 1 (so pre-activations keep their std)."""
        d = self.s.hidden
        rng = np.random.default_rng([self.seed, 0x5BEC, i])
        scale = np.arange(1, d + 1, dtype=np.float64) ** -float(self.spectrum_decay)
        scale /= math.sqrt(float((scale**2).mean()))
        return scale[rng.permutation(d)].astype(np.float32)

    def _ffn_up(self, i: int, p: str, xb: np.ndarray) -> np.ndarray:
        """Write the up (and gate) projection with planted thresholds; return the FFN activation."""
        s = self.s
        probs = self.probs[i]
        col_scale = self._column_scale(i)
        xb_eff = xb.copy()
        if s.family == "llama":
            xb_eff[:, self.bias_channel] = 0.0
        w_std = self._scale_for(xb_eff, 1.0)
        if s.family == "opt":
            bias = np.zeros(s.ffn, np.float32)

            def plant_bias(r0, block):
                block *= col_scale
                bias[r0 : r0 + len(block)] = -self._thresholds(xb[: self.n_cal] @ block.T, probs[r0 : r0 + len(block)])

            pre = self._matrix(p + "fc1.weight", w_std, xb, edit=plant_bias)
            pre += self._vector(p + "fc1.bias", bias)
            self._measure(pre > 0.0)
            return np.maximum(pre, 0.0)
        c = self.bias_channel
        # firing <=> w_i·(x̂/x̂_c) > θ_i: dividing by the (positive) channel value removes rms(x)
        z = xb[: self.n_cal] / xb[: self.n_cal, c : c + 1]

        def plant_channel(r0, block):
            block *= col_scale  # column c is overwritten just below
            block[:, c] = -self._thresholds(z @ block.T, probs[r0 : r0 + len(block)])

        # ReLU only needs the gate's sign; SiLU bends near 0, so its gates get a real model's spread
        gate_std = w_std * (SILU_GATE_STD if s.act == "silu" else 1.0)
        gate = self._matrix(p + "mlp.gate_proj.weight", gate_std, xb, edit=plant_channel, bias_col_zero=True)
        up = self._matrix(p + "mlp.up_proj.weight", w_std, xb, bias_col_zero=True)
        self._measure(gate > 0.0)
        if s.act == "silu":
            return (gate / (1.0 + np.exp(-gate)) * up).astype(np.float32)
        return np.maximum(gate, 0.0) * up

    def _measure(self, firing: np.ndarray) -> None:
        """firing: bool [tokens, n_neurons], the pre-activation (gate or fc1) > 0: ReLU's non-zeros."""
        zero = ~firing[self.n_cal :]
        self.zeros_by_layer.append(float(zero.mean()))
        self.hot_by_layer.append(hot10_share((~zero).sum(0).astype(np.float64)))
        self.zeros_by_position += zero.reshape(EVAL_SEQS, SEQ_LEN, -1).sum((0, 2))

    def _attention(self, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Causal (sliding-window) GQA attention as the engine computes it, RoPE for llama."""
        s = self.s
        n_pos = SEQ_LEN
        n_seq = q.shape[0] // n_pos
        hd = s.head_dim
        q = q.reshape(n_seq, n_pos, s.n_heads, hd)
        k = k.reshape(n_seq, n_pos, s.n_kv_heads, hd)
        v = v.reshape(n_seq, n_pos, s.n_kv_heads, hd)
        if s.family == "llama":
            inv_freq = 1.0 / (s.rope_theta ** (np.arange(0, hd // 2, dtype=np.float64) * 2.0 / hd))
            angle = np.arange(n_pos, dtype=np.float64)[:, None] * inv_freq[None, :]
            cos, sin = np.cos(angle)[None, :, None, :], np.sin(angle)[None, :, None, :]

            def rope(t):
                a, b = t[..., : hd // 2], t[..., hd // 2 :]
                return np.concatenate([a * cos - b * sin, b * cos + a * sin], -1).astype(np.float32)

            q, k = rope(q), rope(k)
        rep = s.n_heads // s.n_kv_heads
        k = np.repeat(k, rep, axis=2)
        v = np.repeat(v, rep, axis=2)
        scores = np.einsum("sthd,sjhd->shtj", q, k) / np.float32(math.sqrt(hd))
        t_idx, j_idx = np.arange(n_pos)[:, None], np.arange(n_pos)[None, :]
        visible = j_idx <= t_idx
        if s.sliding_window:
            visible &= t_idx - j_idx < s.sliding_window
        scores = np.where(visible, scores, -np.inf)
        scores -= scores.max(-1, keepdims=True)
        weights = np.exp(scores)
        weights /= weights.sum(-1, keepdims=True)
        out = np.einsum("shtj,sjhd->sthd", weights, v)
        return out.reshape(n_seq * n_pos, s.n_heads * hd).astype(np.float32)


# ---- config.json --------------------------------------------------------------------

def _hf_config(s: SynthShape, dtype: str) -> dict:
    """config.json with the keys transformers 4.4x writes for this model_type."""
    torch_dtype = DTYPES[dtype][2]
    if s.family == "opt":
        return {
            "_remove_final_layer_norm": False, "activation_dropout": 0.0, "activation_function": "relu",
            "architectures": ["OPTForCausalLM"], "attention_dropout": 0.0, "bos_token_id": BOS_ID,
            "do_layer_norm_before": True, "dropout": 0.1, "enable_bias": True, "eos_token_id": EOS_ID,
            "ffn_dim": s.ffn, "hidden_size": s.hidden, "init_std": 0.02, "layer_norm_elementwise_affine": True,
            "layerdrop": 0.0, "max_position_embeddings": s.max_positions, "model_type": "opt",
            "num_attention_heads": s.n_heads, "num_hidden_layers": s.n_layers, "pad_token_id": None,
            "tie_word_embeddings": True, "torch_dtype": torch_dtype, "transformers_version": "4.46.0",
            "use_cache": True, "vocab_size": s.vocab, "word_embed_proj_dim": s.hidden,
        }
    cfg = {
        "architectures": ["MistralForCausalLM" if s.model_type == "mistral" else "LlamaForCausalLM"],
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": BOS_ID, "eos_token_id": EOS_ID,
        "head_dim": s.head_dim, "hidden_act": s.act, "hidden_size": s.hidden, "initializer_range": 0.02,
        "intermediate_size": s.ffn, "max_position_embeddings": s.max_positions, "mlp_bias": False,
        "model_type": s.model_type, "num_attention_heads": s.n_heads, "num_hidden_layers": s.n_layers,
        "num_key_value_heads": s.n_kv_heads, "pretraining_tp": 1, "rms_norm_eps": s.norm_eps, "rope_scaling": None,
        "rope_theta": s.rope_theta, "tie_word_embeddings": False, "torch_dtype": torch_dtype,
        "transformers_version": "4.46.0", "use_cache": True, "vocab_size": s.vocab,
    }
    if s.model_type == "mistral":  # MistralConfig has no attention_bias / mlp_bias / pretraining_tp / rope_scaling
        for key in ("attention_bias", "mlp_bias", "pretraining_tp", "rope_scaling"):
            del cfg[key]
        cfg["sliding_window"] = s.sliding_window
    return dict(sorted(cfg.items()))


# ---- tokenizer ------------------------------------------------------------------------

def _byte_symbols() -> list[str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits), by byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def _tokenizer_pieces(vocab: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Tokens by id (3 specials, 256 bytes, then synthetic word pieces) and the BPE merges.

    Pieces are "Ġ"/letter prefixes grown one lowercase letter at a time, breadth first
    (ab, Ġa, ..., abc, Ġab, ...), each made by one merge, so English-looking text tokenizes
    into multi-letter pieces and every id decodes to text."""
    tokens = ["<unk>", "<s>", "</s>", *_byte_symbols()]
    letters = "abcdefghijklmnopqrstuvwxyz"
    merges: list[tuple[str, str]] = []
    level = ["Ġ", *letters]
    while len(tokens) < vocab:
        next_level = []
        for prefix in level:
            for ch in letters:
                if len(tokens) == vocab:
                    break
                tokens.append(prefix + ch)
                merges.append((prefix, ch))
                next_level.append(prefix + ch)
        level = next_level
    return tokens[:vocab], merges


def _tokenizer_files(s: SynthShape) -> tuple[str, dict]:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens, merges = _tokenizer_pieces(s.vocab)
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens[:3]])
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)])
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "model_max_length": s.max_positions,
    }
    return tok.to_str(pretty=True), config


# ---- GGUF (llama.cpp) -------------------------------------------------------------------

class _GGUFStream:
    """The same tensors as a llama.cpp GGUF (arch "llama"), streamed block by block.

    Header, metadata and tensor infos go through the `gguf` package's writer; tensor data is
    appended by hand, aligned as its write_tensor_data does, because that takes whole tensors.
    FFN matrices are written as `ffn_type`, the other matrices (attention, token_embd,
    output) as `resident_type` (GGUF_TYPES; the checkpoint's own dtype is copied as is);
    norms are F32 and attn_q/attn_k rows are permuted, all as convert_hf_to_gguf.py writes
    them. Q8_0/Q4_0 blocks come from gguf-py's numpy quantizers (`gguf.quants.quantize`,
    bit-exact with ggml's reference quantize_row_*_ref), applied to each block of rows as it
    is generated: blocks run along a row and a block of rows holds whole rows, so nothing
    larger than one block of rows is ever in memory. llama.cpp's llama graph always
    uses SiLU in the FFN: it runs a ReLU preset's weights with SiLU instead, so in llama.cpp that
    GGUF is for speed baselines (same shapes, same bytes), not for comparing outputs (a SwiGLU
    preset's it runs as written). The
    `flashinfer.hidden_act` key records the activation for `flashinfer convert` (storage/gguf.py),
    which so makes the same store from the GGUF as from the HF directory; llama.cpp ignores
    the key. The tokenizer is GPT-2's byte-level BPE, tokenizer.ggml.pre "gpt-2"."""

    def __init__(self, path: Path, preset: str, s: SynthShape, plan, dtype: str, ffn_type: str, resident_type: str):
        try:
            import gguf
        except ImportError:
            raise ConfigValueError("GGUF output needs the `gguf` package: pip install gguf") from None
        self.gguf = gguf
        self.s, self.dtype = s, dtype
        self.ffn_type, self.resident_type = ffn_type, resident_type
        self.w = w = gguf.GGUFWriter(path, "llama")
        # general.file_type names the bulk of the bytes: the FFN matrices' type
        ftype = {"f16": gguf.LlamaFileType.MOSTLY_F16, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
                 "f32": gguf.LlamaFileType.ALL_F32, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0, "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S,
                 "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K}[ffn_type]
        w.add_name(f"flashinfer-synth-{preset}")
        w.add_context_length(s.max_positions)
        w.add_embedding_length(s.hidden)
        w.add_block_count(s.n_layers)
        w.add_feed_forward_length(s.ffn)
        w.add_head_count(s.n_heads)
        w.add_head_count_kv(s.n_kv_heads)
        w.add_rope_freq_base(s.rope_theta)
        w.add_layer_norm_rms_eps(s.norm_eps)
        w.add_file_type(int(ftype))
        w.add_vocab_size(s.vocab)
        w.add_rope_dimension_count(s.head_dim)
        w.add_string(FLASHINFER_ACT_KEY, s.act)
        if s.sliding_window:
            w.add_sliding_window(s.sliding_window)
        tokens, merges = _tokenizer_pieces(s.vocab)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")  # ByteLevel with GPT-2's split regex, as _tokenizer_files
        w.add_token_list(tokens)
        w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
        w.add_token_merges([f"{a} {b}" for a, b in merges])
        w.add_bos_token_id(BOS_ID)
        w.add_eos_token_id(EOS_ID)
        w.add_unk_token_id(UNK_ID)
        w.add_add_bos_token(True)
        self.nbytes = {}
        for name, shape in plan:
            if len(shape) == 2:
                kind = self.type_of(name)
                nbytes = gguf_tensor_bytes(shape, kind)
                qtype = gguf.GGMLQuantizationType[kind.upper()]
                if kind in GGUF_BLOCK_TYPES + GGUF_SUPER_BLOCK_TYPES:  # the writer takes a quantized shape in bytes per row
                    byte_shape = (shape[0], nbytes // shape[0])
                    w.add_tensor_info(gguf_name(name), byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=qtype)
                else:
                    element = {"f32": np.float32, "f16": np.float16, "bf16": np.uint16}[kind]
                    w.add_tensor_info(gguf_name(name), shape, np.dtype(element), nbytes, raw_dtype=qtype)
            else:
                nbytes = math.prod(shape) * 4
                w.add_tensor_info(gguf_name(name), shape, np.dtype(np.float32), nbytes)
            self.nbytes[name] = nbytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        self.f = w.fout[0]
        self.current, self.written = None, 0

    def type_of(self, name: str) -> str:
        return self.ffn_type if name.endswith(FFN_MATRICES) else self.resident_type

    def write(self, name: str, stored: np.ndarray, widened: np.ndarray) -> None:
        if name != self.current:
            self.w.write_padding(self.f, self.f.tell())
            self.current, self.written = name, 0
        if stored.ndim == 1:
            data = widened.astype("<f4")
        else:
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                stored = gguf_permute_rows(stored, self.s.head_dim)
                widened = gguf_permute_rows(widened, self.s.head_dim)
            kind = self.type_of(name)
            if kind == self.dtype:
                data = stored
            elif kind in GGUF_BLOCK_TYPES:  # from the stored values: the weights the checkpoint holds
                data = self.gguf.quants.quantize(widened, self.gguf.GGMLQuantizationType[kind.upper()])
            elif kind in GGUF_SUPER_BLOCK_TYPES:  # gguf-py has no K-quant quantizer: storage/quant.py's, in ggml's blocks
                from storage import quant
                from storage.gguf import q4k_to_ggml_blocks, q6k_to_ggml_blocks

                scheme, to_blocks = ("q4k", q4k_to_ggml_blocks) if kind == "q4_k" else ("q6k", q6k_to_ggml_blocks)
                data = to_blocks(quant.quantize(np.ascontiguousarray(widened, np.float32), scheme))
            else:
                data = _to_stored(widened, kind)[0]
        self.f.write(memoryview(np.ascontiguousarray(data)).cast("B"))
        self.written += data.nbytes
        if self.written == self.nbytes[name]:
            self.w.write_padding(self.f, self.written)

    def finish(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())
        self.close()

    def close(self) -> None:
        self.w.close()


# ---- command line (python -m storage.synth) -----------------------------------------
