"""Writing a synthetic checkpoint: `synthesize`, the streamed safetensors shards, config.json,
the tokenizer, synth.json and the llama.cpp GGUF.

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
import shutil
import struct
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from storage.errors import ConfigValueError, StorageError
from storage.gguf import FLASHINFER_ACT_KEY, gguf_name, gguf_permute_rows  # noqa: F401  (gguf_name: re-exported)
from storage.synth.planting import _Generator
from storage.synth.presets import (
    BOS_ID,
    DEFAULT_HOT_SKEW,
    DEFAULT_SPARSITY,
    EOS_ID,
    PRESETS,
    SILU_GATE_STD,
    UNK_ID,
    SynthShape,
    _tensor_plan,
)

SYNTH_VERSION = 2  # 2: spectrum_decay on the activity-deciding rows
MAX_SHARD_BYTES = 1_000_000_000  # HF's "1GB" (decimal), a shard never holds more unless one tensor does
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
