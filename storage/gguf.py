"""Reading a llama.cpp GGUF file (architecture "llama" or "qwen2") as a Hugging Face checkpoint.

The converter (flashinfer/convert.py) needs three things from a model file: its config,
its tensors under HF names as float32 blocks, and its tokenizer. `GGUFCheckpoint` gives
them for a GGUF file, parsed by the `gguf` package's reader (llama.cpp's gguf-py):

    with GGUFCheckpoint.open("model.gguf") as ckpt:
        cfg = ckpt.hf_config()                      # config.json keys, from llama.* / qwen2.* metadata
        ckpt.tensors["model.layers.0.mlp.up_proj.weight"].shape   # HF shape
        up = ckpt.rows_f32("model.layers.0.mlp.up_proj.weight", rows=slice(0, 1024))
        tokenizer_json, tokenizer_config = ckpt.tokenizer_files()

Where GGUF differs from an HF checkpoint:
- names: llama.cpp's (`blk.{i}.attn_q.weight`, see GGUF_NAMES), mapped both ways here;
- dims are listed fastest first: ne[0] is the row length, so an HF [rows, cols] matrix has
  ne = [cols, rows] and its bytes are the same row-major rows;
- in a llama file attn_q / attn_k rows are permuted within each head (convert_hf_to_gguf.py's
  LlamaModel.permute: llama.cpp's rope pairs elements 2i and 2i+1, HF pairs i and i + d/2);
  `rows_f32` undoes it by reading GGUF row `gguf_row_of_hf_row(j)` for HF row j. A qwen2 file
  keeps HF's rows (llama.cpp runs it with NEOX rope, HF's pairing) and adds q/k/v biases;
- weights may be block-quantized (Q8_0: 32 values per 34-byte block, k-quants: 256 per
  block, along a row); `rows_f32` dequantizes with gguf-py's numpy reference dequantizers
  only the blocks a request covers (a column range is widened to whole blocks, then trimmed);
- the FFN activation is not recorded: llama.cpp's llama graph is always SiLU-gated. Files
  written by storage/synth.py carry `flashinfer.hidden_act` ("relu"); llama.cpp ignores it.

GGUFReader parses the header (metadata and tensor table); its values are copied out and the
reader dropped (it holds a numpy view per array element). Tensor data is read through our own
read-only mmap, so `release(name)` can drop a tensor's pages from RSS and the page cache as
storage/safetensors.py does: converting streams one tensor (or block of neurons) at a time.
Every problem raises CheckpointError naming the file (and the tensor or key at fault).
"""

from __future__ import annotations

import mmap
import os
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage.errors import CheckpointError

# the GGUF architectures this module maps: Qwen2 is llama's graph with q/k/v biases, its q/k rows
# not permuted (llama.cpp runs it with NEOX rope, HF's rotate_half)
ARCHITECTURES = ("llama", "qwen2")
HF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
FLASHINFER_ACT_KEY = "flashinfer.hidden_act"  # our own key: the FFN activation the weights were made for
# tensor types rows_f32 dequantizes (through gguf-py's numpy reference code, tested upstream
# against ggml); i-quants, ternary and fp4 types are refused until they are tested here
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1",
                   "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
SUPPORTED_TOKENIZERS = ("gpt2", "llama")
# GGUF tensor types whose values a store scheme holds exactly (storage/quant.py: the same
# dequantization formula on the same codes and f16 scales, only the nibble order differs):
# converting keeps their codes instead of rounding the dequantized weights a second time
KEPT_SCHEMES = {"F32": "f32", "F16": "f16", "Q8_0": "q8", "Q4_0": "q4", "Q4_1": "q4a", "Q4_K": "q4k"}
MORE_THAN_4_BITS = ("Q5_0", "Q5_1", "Q5_K", "Q6_K")
Q4_K_BLOCK_BYTES = 144  # d, dmin (f16), 12 bytes of 6-bit scales and mins, 128 bytes of nibbles
# tokenizer.ggml.pre values whose pre-tokenizer we can write as tokenizer.json; the regexes
# are llama.cpp's (llama-vocab.cpp), which are those of the HF tokenizers they came from
# (applied in turn, each piece split further by the next: llama.cpp's regex_exprs list)
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
BPE_PRE_TOKENIZERS = {
    "gpt-2": None,  # GPT-2's own regex: what tokenizers' ByteLevel(use_regex=True) applies
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                  r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",),  # Llama 3
    # SmolLM / SmolLM2: every digit a piece of its own, then GPT-2's regex (HF: Digits + ByteLevel)
    "smollm": (r"\p{N}", GPT2_REGEX),
}
# gguf TokenType values
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6
# control tokens llama.cpp treats as the end of a generation by their text (llama-vocab.cpp, special_eog_ids)
END_OF_TURN = frozenset(("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                         "<EOT>", "_<EOT>", "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<|return|>", "<|call|>"))

# ---- names --------------------------------------------------------------------------------

# HF suffix after model.layers.{i}. -> llama.cpp's after blk.{i}., as convert_hf_to_gguf.py maps LlamaForCausalLM
GGUF_NAMES = {
    "input_layernorm.weight": "attn_norm.weight", "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight", "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",  # Qwen2's
}
GGUF_GLOBAL_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                     "lm_head.weight": "output.weight"}
_HF_SUFFIX = {v: k for k, v in GGUF_NAMES.items()}
_HF_GLOBAL = {v: k for k, v in GGUF_GLOBAL_NAMES.items()}
ROPE_FREQS = "rope_freqs.weight"  # Llama 3.1 rope scaling, written as per-frequency divisors
PERMUTED = ("attn_q.weight", "attn_k.weight")


def gguf_name(name: str) -> str:
    """llama.cpp's name of an HF llama tensor."""
    if name in GGUF_GLOBAL_NAMES:
        return GGUF_GLOBAL_NAMES[name]
    _, _, layer, suffix = name.split(".", 3)  # model.layers.{i}.{suffix}
    return f"blk.{layer}.{GGUF_NAMES[suffix]}"


def hf_name(name: str) -> str | None:
    """The HF name of a llama.cpp llama tensor, None for a name outside the table."""
    if name in _HF_GLOBAL:
        return _HF_GLOBAL[name]
    parts = name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _HF_SUFFIX:
        return f"model.layers.{parts[1]}.{_HF_SUFFIX[parts[2]]}"
    return None


def q4k_from_ggml_blocks(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ggml Q4_K blocks uint8 [rows, super-blocks, 144] as storage.quant's q4k arrays (data,
    scales, mins): the same d, dmin, 6-bit scales/mins and nibbles, unpacked and reordered (ggml
    packs the 6-bit values into 12 bytes and puts element l and 32 + l of each 64 in byte l)."""
    from storage import quant

    rows, n_super, _ = blocks.shape
    d, dmin = blocks[:, :, 0:2], blocks[:, :, 2:4]
    packed = blocks[:, :, 4:16].astype(np.uint8)
    lo, hi, mixed = packed[:, :, 0:4], packed[:, :, 4:8], packed[:, :, 8:12]
    sc = np.concatenate([lo & 0x3F, (mixed & 0x0F) | ((lo >> 2) & 0x30)], axis=2)  # ggml's get_scale_min_k4
    m = np.concatenate([hi & 0x3F, (mixed >> 4) | ((hi >> 2) & 0x30)], axis=2)
    qs = blocks[:, :, 16:].reshape(rows, n_super, 4, 1, 32)
    values = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(rows, n_super * quant.SUPER_BLOCK)
    return (quant.pack_nibbles(values), np.concatenate([sc.reshape(rows, -1), d.reshape(rows, -1)], axis=1),
            np.concatenate([m.reshape(rows, -1), dmin.reshape(rows, -1)], axis=1))


def q4k_to_ggml_blocks(qt) -> np.ndarray:
    """A storage.quant q4k QuantizedTensor as ggml Q4_K blocks uint8 [rows, K / 256 * 144] (the
    inverse of q4k_from_ggml_blocks: what a GGUF writer stores)."""
    from storage import quant

    rows, k = qt.shape
    n_super, n_groups = k // quant.SUPER_BLOCK, k // 32
    sc = qt.scales[:, :n_groups].reshape(rows, n_super, 8)
    m = qt.mins[:, :n_groups].reshape(rows, n_super, 8)
    packed = np.concatenate([sc[:, :, :4] | ((sc[:, :, 4:] >> 4) << 6), m[:, :, :4] | ((m[:, :, 4:] >> 4) << 6),
                             (sc[:, :, 4:] & 0x0F) | ((m[:, :, 4:] & 0x0F) << 4)], axis=2).astype(np.uint8)
    values = np.empty((rows, k), np.uint8)
    values[:, 0::2], values[:, 1::2] = qt.data & 0x0F, qt.data >> 4
    halves = values.reshape(rows, n_super, 4, 2, 32)
    qs = (halves[:, :, :, 0] | (halves[:, :, :, 1] << 4)).reshape(rows, n_super, 128)
    d = qt.scales[:, n_groups:].reshape(rows, n_super, 2)
    dmin = qt.mins[:, n_groups:].reshape(rows, n_super, 2)
    return np.concatenate([d, dmin, packed, qs], axis=2).reshape(rows, -1)


def gguf_permute_rows(rows: np.ndarray, head_dim: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute on whole heads: HF pairs element i of a
    head with i + head_dim/2 (rotate_half); llama.cpp's LLAMA rope pairs 2i with 2i+1."""
    n = rows.shape[0] // head_dim
    return rows.reshape(n, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def gguf_row_of_hf_row(hf_rows: np.ndarray, head_dim: int) -> np.ndarray:
    """The GGUF row holding HF row j of a permuted q/k matrix: the inverse of
    gguf_permute_rows as an index, so any range of HF rows reads only its own rows."""
    half = head_dim // 2
    within = hf_rows % head_dim
    return hf_rows - within + 2 * (within % half) + within // half


# ---- the file -----------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFTensor:
    """One tensor: `shape` in HF orientation, `offset`/`nbytes` of its data in the file."""

    name: str  # llama.cpp's name (errors speak of what the file holds)
    hf_name: str
    type_name: str  # GGMLQuantizationType name: "F16", "Q8_0", ...
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    path: Path
    block_size: int  # values per quantization block along a row (1 for float types)
    block_bytes: int


def _import_gguf():
    try:
        import gguf
    except ImportError:
        raise CheckpointError("reading GGUF files needs the `gguf` package (llama.cpp's gguf-py): "
                              "pip install gguf") from None
    return gguf


class GGUFCheckpoint:
    """A GGUF file as the converter reads a checkpoint: `tensors` by HF name, `source`,
    `rows_f32`, `release`, `close`, plus `hf_config()` and `tokenizer_files()`."""

    def __init__(self, path: Path, metadata: dict, tensor_infos: list[tuple], big_endian: bool = False):
        self.path = self.source = path
        self.metadata = metadata  # every key/value of the file, as Python values
        self.big_endian = big_endian
        self.tensors: dict[str, GGUFTensor] = {}
        self.rope_freqs: np.ndarray | None = None  # Llama 3.1's rope scaling divisors, if the file has them
        self.head_dim = 0
        self.arch = "llama"  # general.architecture, once _check_model has accepted it
        self._tensor_infos = tensor_infos
        self._file = open(path, "rb")
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    @classmethod
    def open(cls, path: str | Path) -> "GGUFCheckpoint":
        gguf = _import_gguf()
        path = Path(path)
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot open ({e.strerror})") from None
        if magic != b"GGUF":
            raise CheckpointError(f"{path}: not a GGUF file (it does not start with the GGUF magic); "
                                  "expected a llama.cpp .gguf file or a Hugging Face model directory")
        try:
            # GGUFReader keeps a numpy view per array element (~1 KB each, 0.5 GB for Llama 3's
            # 128k tokens and 280k merges): take plain values and let it go before any tensor is read
            reader = gguf.GGUFReader(path)
            metadata = {k: f.contents() for k, f in reader.fields.items()}
            tensor_infos = [(t.name, t.tensor_type, [int(d) for d in t.shape], int(t.data_offset), int(t.n_bytes))
                            for t in reader.tensors]
            big_endian = reader.byte_order != "I"
            del reader
        except (ValueError, IndexError, KeyError, OverflowError, TypeError) as e:
            # GGUFReader slices its memmap: a short file shows up as short arrays failing to
            # index or reshape; a tensor type id this gguf version does not know, as a ValueError
            if "GGMLQuantizationType" in str(e):
                raise CheckpointError(
                    f"{path}: a tensor has a type id the installed gguf package does not know ({e}); "
                    f"flashinfer converts {', '.join(SUPPORTED_TYPES)}") from None
            raise CheckpointError(f"{path}: damaged or truncated GGUF file ({path.stat().st_size} bytes), cannot "
                                  f"parse its header and tensor table{_reader_reason(e)}; re-download or re-export it"
                                  ) from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
        ckpt = cls(path, metadata, tensor_infos, big_endian)
        try:
            ckpt._check_model()
            ckpt._index_tensors(gguf.GGML_QUANT_SIZES)
        except BaseException:
            ckpt.close()
            raise
        return ckpt

    def _check_model(self) -> None:
        """Refuse what the llama family cannot run, before anything is read."""
        if self.big_endian:
            raise CheckpointError(f"{self.path}: a big-endian GGUF file; flashinfer reads little-endian GGUF only")
        if int(self.meta("split.count", 1) or 1) > 1:
            raise CheckpointError(f"{self.path}: one part of a split GGUF (split.count={self.meta('split.count')}); "
                                  "merge the parts first (llama-gguf-split --merge)")
        arch = self.meta("general.architecture")
        if arch not in ARCHITECTURES:
            raise CheckpointError(f"{self.path}: GGUF architecture {arch!r} is not supported "
                                  f"(supported: {', '.join(ARCHITECTURES)})")
        self.arch = a = arch
        if int(self.meta(f"{a}.expert_count", 0) or 0) > 0:
            raise CheckpointError(f"{self.path}: a mixture-of-experts llama ({self.meta(f'{a}.expert_count')} "
                                  "experts) is not supported")
        dim, n_heads = self._need(f"{a}.embedding_length"), self._need(f"{a}.attention.head_count")
        n_kv_heads = self.meta(f"{a}.attention.head_count_kv", n_heads)
        if not all(isinstance(v, int) and v > 0 for v in (dim, n_heads, n_kv_heads)):
            raise CheckpointError(f"{self.path}: {a}.embedding_length, .attention.head_count and head_count_kv "
                                  f"must be positive integers, got {dim!r}, {n_heads!r}, {n_kv_heads!r} "
                                  "(per-layer head counts are not supported)")
        self.head_dim = int(self.meta(f"{a}.attention.key_length", dim // n_heads))
        if int(self.meta(f"{a}.attention.value_length", self.head_dim)) != self.head_dim:
            raise CheckpointError(f"{self.path}: {a}.attention.value_length != key_length is not supported")
        rope_dims = int(self.meta(f"{a}.rope.dimension_count", self.head_dim))
        if rope_dims != self.head_dim:
            raise CheckpointError(f"{self.path}: rope on {rope_dims} of {self.head_dim} head dims "
                                  "(partial rotary) is not supported")

    def _index_tensors(self, quant_sizes) -> None:
        unknown = []
        for name, tensor_type, ne, offset, nbytes in self._tensor_infos:
            type_name = tensor_type.name
            if name == ROPE_FREQS:
                if type_name != "F32":
                    raise CheckpointError(f"{self.path}: tensor {name!r} has type {type_name}, expected F32")
                self.rope_freqs = np.frombuffer(self._mmap, np.float32, ne[0], offset).copy()
                continue
            hf = hf_name(name)
            if hf is None:
                unknown.append(name)
                continue
            if type_name not in SUPPORTED_TYPES:
                raise CheckpointError(
                    f"{self.path}: tensor {name!r} has type {type_name}, which flashinfer cannot convert "
                    f"(supported: {', '.join(SUPPORTED_TYPES)}); re-quantize the GGUF to Q8_0 or F16 "
                    "(llama-quantize) or convert the Hugging Face checkpoint instead")
            if len(ne) > 2:
                raise CheckpointError(f"{self.path}: tensor {name!r} has {len(ne)} dims {ne}; expected at most 2")
            block_size, block_bytes = quant_sizes[tensor_type]
            self.tensors[hf] = GGUFTensor(name, hf, type_name, tuple(reversed(ne)), offset, nbytes, self.path,
                                          block_size, block_bytes)
        if unknown:
            shown = ", ".join(unknown[:8]) + (f" and {len(unknown) - 8} more" if len(unknown) > 8 else "")
            raise CheckpointError(f"{self.path}: {len(unknown)} tensor(s) that are not part of a plain llama "
                                  f"model flashinfer converts: {shown}")

    # ---- metadata -------------------------------------------------------------------
    def meta(self, key: str, default=None):
        return self.metadata.get(key, default)

    def _need(self, key: str):
        value = self.meta(key)
        if value is None:
            raise CheckpointError(f"{self.path}: metadata key {key!r} is missing")
        return value

    def hf_config(self) -> dict:
        """config.json keys (as transformers writes them for LlamaForCausalLM / Qwen2ForCausalLM) from the metadata."""
        a = self.arch
        n_heads = self._need(f"{a}.attention.head_count")
        tokens = self.meta("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens)
        elif "model.embed_tokens.weight" in self.tensors:
            vocab = self.tensors["model.embed_tokens.weight"].shape[0]
        else:
            raise CheckpointError(f"{self.path}: no token list and no token_embd.weight: cannot tell the vocab size")
        # llama.cpp ends generation at any of these (Llama 3 instruct: <|eot_id|>)
        eos = [self.meta(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
        eos = list(dict.fromkeys(i for i in eos if i is not None))
        act = self.meta(FLASHINFER_ACT_KEY, "silu")  # llama.cpp's llama graph: always SiLU
        return {
            "architectures": [HF_ARCHITECTURES[a]],
            "model_type": a,
            "hidden_size": int(self._need(f"{a}.embedding_length")),
            "num_hidden_layers": int(self._need(f"{a}.block_count")),
            "intermediate_size": int(self._need(f"{a}.feed_forward_length")),
            "num_attention_heads": int(n_heads),
            "num_key_value_heads": int(self.meta(f"{a}.attention.head_count_kv", n_heads)),
            "head_dim": self.head_dim,
            "max_position_embeddings": int(self.meta(f"{a}.context_length", 2048)),
            "rms_norm_eps": _f32(self.meta(f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
            "rope_theta": _f32(self.meta(f"{a}.rope.freq_base", 10000.0)),
            "rope_scaling": self._rope_scaling(),
            "sliding_window": self.meta(f"{a}.attention.sliding_window"),  # Mistral's; llama.cpp may ignore it
            "hidden_act": act,
            "vocab_size": vocab,
            "tie_word_embeddings": "lm_head.weight" not in self.tensors,
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.meta("tokenizer.ggml.bos_token_id"),
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
        }

    def _rope_scaling(self) -> dict | None:
        a = self.arch
        kind, factor = self.meta(f"{a}.rope.scaling.type"), self.meta(f"{a}.rope.scaling.factor")
        if kind is None and self.meta(f"{a}.rope.scale_linear") is not None:  # the key before rope.scaling.*
            kind, factor = "linear", self.meta(f"{a}.rope.scale_linear")
        if self.rope_freqs is not None:
            # convert_hf_to_gguf.py writes Llama 3.1's scaling only as the per-frequency
            # divisors: propose Llama 3's parameters; flashinfer/convert.py checks that they
            # reproduce the divisors before it trusts them
            original_ctx = int(self.meta(f"{a}.rope.scaling.original_context_length", 8192))
            return {"rope_type": "llama3", "factor": float(self.rope_freqs.max()), "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0, "original_max_position_embeddings": original_ctx}
        if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
            return None
        if kind == "linear":
            return {"rope_type": "linear", "factor": _f32(factor)}
        raise CheckpointError(f"{self.path}: rope scaling {kind!r} is not supported (supported: none, linear, "
                              "and Llama 3's rope_freqs)")

    # ---- tensor data ----------------------------------------------------------------
    def rows_f32(self, name: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        """HF tensor `name` (or a range of its rows / columns; of its elements for a vector) as
        float32 in HF orientation: dequantized, q/k rows un-permuted, never a view of the file.
        Touches only the bytes it needs."""
        t = self.tensors[name]
        if len(t.shape) == 1:
            n_rows, n_cols = 1, t.shape[0]
            rows, cols = None, rows if cols is None else cols
        else:
            n_rows, n_cols = t.shape
        r0, r1, _ = (rows or slice(None)).indices(n_rows)
        c0, c1, _ = (cols or slice(None)).indices(n_cols)
        if r1 <= r0 or c1 <= c0:
            return np.zeros((max(r1 - r0, 0), max(c1 - c0, 0)) if len(t.shape) == 2 else max(c1 - c0, 0), np.float32)
        data, picked = self._file_rows(t, n_rows, n_cols, r0, r1)
        b0, b1 = c0 // t.block_size, -(-c1 // t.block_size)  # whole blocks around the columns
        blocks = np.ascontiguousarray(picked[:, b0 * t.block_bytes : b1 * t.block_bytes])
        values = _dequantize(blocks, t.type_name)
        if np.may_share_memory(values, data):  # F32 comes back as a view of the mapping
            values = values.copy()
        values = values[:, c0 - b0 * t.block_size : c1 - b0 * t.block_size]
        return values.reshape(-1) if len(t.shape) == 1 else values

    def kept_scheme(self, name: str) -> str | None:
        """The store scheme that holds tensor `name` exactly as the file does, or None."""
        return KEPT_SCHEMES.get(self.tensors[name].type_name)

    def fallback_scheme(self, name: str) -> str | None:
        """For a tensor no scheme keeps exactly: q8 where the file spends more than 4 bits a
        weight (Q5_x, Q6_K: a Q4_K_M file's attn_v and ffn_down), so --quant auto rounds it onto
        a finer grid than its own instead of a coarser one; None otherwise (the caller's default)."""
        return "q8" if self.tensors[name].type_name in MORE_THAN_4_BITS else None

    def rows_quantized(self, name: str, rows: slice | None = None):
        """Rows of 2-D tensor `name` (HF orientation, q/k un-permuted) as a storage.quant
        QuantizedTensor in kept_scheme(name), bit for bit the file's values: Q8_0 blocks are q8
        (the same int8 codes and f16 scale), Q4_K blocks q4k (q4k_from_ggml_blocks), Q4_0 blocks
        q4 and Q4_1 blocks q4a (the same nibbles,
        scales and mins; ggml puts element j and j+16 in byte j, the store 2j and 2j+1)."""
        from storage import quant

        t = self.tensors[name]
        scheme = self.kept_scheme(name)
        if scheme is None or len(t.shape) != 2:
            raise CheckpointError(f"{self.path}: tensor {t.name!r} ({t.type_name}) has no exact store scheme")
        n_rows, n_cols = t.shape
        r0, r1, _ = (rows or slice(None)).indices(n_rows)
        _, picked = self._file_rows(t, n_rows, n_cols, r0, r1)
        n = max(r1 - r0, 0)
        if scheme in ("f32", "f16"):
            values = np.ascontiguousarray(picked).view("<f4" if scheme == "f32" else "<f2").reshape(n, n_cols)
            return quant.QuantizedTensor(scheme, 0, (n, n_cols), values.copy(), None, None)
        if scheme == "q4k":
            data, scales, mins = q4k_from_ggml_blocks(np.ascontiguousarray(picked).reshape(n, -1, Q4_K_BLOCK_BYTES))
            return quant.QuantizedTensor("q4k", 32, (n, n_cols), data, scales, mins)
        blocks = np.ascontiguousarray(picked).reshape(n, n_cols // 32, t.block_bytes)
        scales = blocks[:, :, 0:2].copy().view("<f2")[:, :, 0]
        if scheme == "q8":
            codes = blocks[:, :, 2:].copy().view(np.int8).reshape(n, n_cols)
            return quant.QuantizedTensor("q8", 32, (n, n_cols), codes, scales, None)
        mins = blocks[:, :, 2:4].copy().view("<f2")[:, :, 0] if scheme == "q4a" else None
        packed = blocks[:, :, 4 if scheme == "q4a" else 2:]  # [n, groups, 16]
        values = np.concatenate([packed & 0x0F, packed >> 4], axis=2)  # elements 0..15, then 16..31
        return quant.QuantizedTensor(scheme, 32, (n, n_cols), quant.pack_nibbles(values.reshape(n, n_cols)), scales, mins)

    def _file_rows(self, t, n_rows: int, n_cols: int, r0: int, r1: int) -> tuple[np.ndarray, np.ndarray]:
        """(the tensor's bytes in the mapping [n_rows, row bytes], its rows r0..r1-1 in HF order:
        q/k rows un-permuted, the others a view)."""
        row_bytes = n_cols // t.block_size * t.block_bytes
        data = np.frombuffer(self._mmap, np.uint8, n_rows * row_bytes, t.offset).reshape(n_rows, row_bytes)
        if self.arch == "llama" and t.name.endswith(PERMUTED):
            return data, data[gguf_row_of_hf_row(np.arange(r0, r1), self.head_dim)]
        return data, data[r0:r1]

    def release(self, name: str) -> None:
        """Drop a tensor's pages from RSS and the page cache (see storage/safetensors.py)."""
        t = self.tensors[name]
        start = t.offset - t.offset % mmap.PAGESIZE
        length = t.offset + t.nbytes - start
        if length <= 0:
            return
        if hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, length)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file.fileno(), start, length, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        # arrays handed out are copies, so the mapping can go
        try:
            self._mmap.close()
        except BufferError:  # a view is still alive somewhere: leave the mapping to the GC
            pass
        self._file.close()

    def __enter__(self) -> "GGUFCheckpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- tokenizer ------------------------------------------------------------------
    def tokenizer_files(self) -> tuple[str, dict]:
        """(tokenizer.json text, tokenizer_config.json dict) rebuilt from tokenizer.ggml.*:
        "gpt2" (byte-level BPE from tokens + merges) and "llama" (SentencePiece BPE from
        tokens + scores, with byte fallback) as transformers' converters write them."""
        tokens = self.meta("tokenizer.ggml.tokens")
        if tokens is None:
            raise CheckpointError(f"{self.path}: no tokenizer in the GGUF (tokenizer.ggml.tokens); "
                                  "pass --tokenizer DIR with the model's tokenizer.json")
        embedded = self.meta("tokenizer.huggingface.json")
        kind = self.meta("tokenizer.ggml.model")
        types = self.meta("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
        if embedded is not None:
            tokenizer_json = embedded
        elif kind == "gpt2":
            tokenizer_json = self._bpe_tokenizer(tokens, types)
        elif kind == "llama":
            tokenizer_json = self._spm_tokenizer(tokens, types)
        else:
            raise CheckpointError(f"{self.path}: tokenizer.ggml.model {kind!r} cannot be rebuilt as tokenizer.json "
                                  f"(supported: {', '.join(SUPPORTED_TOKENIZERS)}); "
                                  "pass --tokenizer DIR with the model's tokenizer.json")
        return tokenizer_json, self.tokenizer_config(tokens)

    def tokenizer_config(self, tokens: list[str] | None = None) -> dict:
        """tokenizer_config.json: the BOS/EOS/UNK strings, whether to prepend BOS, the chat template."""
        tokens = tokens if tokens is not None else self.meta("tokenizer.ggml.tokens") or []

        def token(key: str) -> str | None:
            i = self.meta(f"tokenizer.ggml.{key}_token_id")
            return tokens[i] if i is not None and 0 <= i < len(tokens) else None

        # llama.cpp prepends BOS by default for SentencePiece vocabularies only
        add_bos = self.meta("tokenizer.ggml.add_bos_token", self.meta("tokenizer.ggml.model") == "llama")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token("bos"), "eos_token": token("eos"),
                  "unk_token": token("unknown"), "add_bos_token": bool(add_bos),
                  "model_max_length": int(self.meta(f"{self.arch}.context_length", 2048))}
        template = self.meta("tokenizer.chat_template")
        if template is not None:
            config["chat_template"] = template
        return {k: v for k, v in config.items() if v is not None}

    def generation_config(self) -> dict:
        """generation_config.json: the end-of-generation ids as llama.cpp finds them (llama-vocab.cpp):
        the EOS, EOT and EOM ids of the metadata, and control tokens spelled as a known end of turn
        (a chat model's <|im_end|> ends its turn while its EOS may be <|endoftext|>)."""
        tokens = self.meta("tokenizer.ggml.tokens") or []
        types = self.meta("tokenizer.ggml.token_type") or []
        ids = {self.meta(f"tokenizer.ggml.{key}_token_id") for key in ("eos", "eot", "eom")}
        ids = {i for i in ids if isinstance(i, int) and 0 <= i < len(tokens)}
        ids |= {i for i, (text, kind) in enumerate(zip(tokens, types)) if kind == TOKEN_CONTROL and text in END_OF_TURN}
        return {"eos_token_id": sorted(ids)} if ids else {}

    def _bpe_tokenizer(self, tokens: list[str], types: list[int]) -> str:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        pre = self.meta("tokenizer.ggml.pre", "default")
        if pre not in BPE_PRE_TOKENIZERS:
            raise CheckpointError(
                f"{self.path}: BPE pre-tokenizer tokenizer.ggml.pre={pre!r} is not known to flashinfer "
                f"(known: {', '.join(BPE_PRE_TOKENIZERS)}); pass --tokenizer DIR with the model's tokenizer.json")
        merges = []
        for m in self.meta("tokenizer.ggml.merges") or []:
            pair = m.split(" ")
            if len(pair) != 2:
                raise CheckpointError(f"{self.path}: tokenizer.ggml.merges entry {m!r} is not 'left right'")
            merges.append((pair[0], pair[1]))
        # Llama 3's tokenizer.json sets ignore_merges (a word that is a token is not re-merged),
        # and so does llama.cpp for its pre-tokenizer
        model = models.BPE(vocab=_vocab(tokens), merges=merges, ignore_merges=pre == "llama-bpe")
        tok = Tokenizer(model)
        regexes = BPE_PRE_TOKENIZERS[pre]
        if regexes is None:
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        else:
            tok.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False) for regex in regexes]
                + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        tok.decoder = decoders.ByteLevel()
        _add_special(tok, tokens, types)
        return tok.to_str(pretty=True)

    def _spm_tokenizer(self, tokens: list[str], types: list[int]) -> str:
        """transformers' LlamaConverter (legacy normalizer, as llama.cpp tokenizes: a space
        before the text and after every special token)."""
        from tokenizers import Tokenizer, decoders, models, normalizers

        scores = self.meta("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(tokens):
            raise CheckpointError(f"{self.path}: a SentencePiece vocabulary needs tokenizer.ggml.scores, "
                                  "one per token")
        unk_id = self.meta("tokenizer.ggml.unknown_token_id")
        if unk_id is None:
            unk_id = next((i for i, t in enumerate(types) if t == TOKEN_UNKNOWN), None)
        model = models.BPE(vocab=_vocab(tokens), merges=spm_merges(tokens, scores),
                           unk_token=None if unk_id is None else tokens[unk_id], fuse_unk=True, byte_fallback=True)
        tok = Tokenizer(model)
        add_prefix = bool(self.meta("tokenizer.ggml.add_space_prefix", True))
        replace = normalizers.Replace(" ", "▁")
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), replace]) if add_prefix else replace
        steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if add_prefix else []))
        _add_special(tok, tokens, types)
        return tok.to_str(pretty=True)


def _reader_reason(e: Exception) -> str:
    """GGUFReader's own message when it raised one on purpose ("Sorry, file appears to be
    version 9 ..."); nothing when numpy failed on a short array (that says only "truncated")."""
    frames = traceback.extract_tb(e.__traceback__)
    return f" ({e})" if frames and (frames[-1].line or "").startswith("raise") else ""


def _f32(value) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.99999974e-06)."""
    return float(str(np.float32(value)))


def _dequantize(blocks: np.ndarray, type_name: str) -> np.ndarray:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    return dequantize(blocks, GGMLQuantizationType[type_name])


def _vocab(tokens: list[str]) -> dict[str, int]:
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)  # a repeated string keeps its first id (the model never emits the others)
    return vocab


def _add_special(tok, tokens: list[str], types: list[int]) -> None:
    """Control and unknown tokens are special (never split, skipped in decoding); user-defined
    ones are matched whole in text, as llama.cpp does."""
    from tokenizers import AddedToken

    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)]
    user = [AddedToken(tokens[i], special=False, normalized=False)
            for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
    if special:
        tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)


def spm_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """BPE merges of a SentencePiece BPE vocabulary, as transformers' generate_merges makes
    them: every split (l, r) of a piece into two pieces, ranked by the piece's score (the
    higher the earlier; llama.cpp's SPM tokenizer merges the best-scoring pair first too)."""
    vocab = _vocab(tokens)
    merges = []
    for piece, score in zip(tokens, scores):
        local = [(piece[:k], piece[k:], score) for k in range(1, len(piece))
                 if piece[:k] in vocab and piece[k:] in vocab]
        merges += sorted(local, key=lambda m: (vocab[m[0]], vocab[m[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]
