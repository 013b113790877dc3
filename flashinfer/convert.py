"""Convert a Hugging Face checkpoint or a llama.cpp GGUF file into a flash store (storage/format.py).

The model knowledge lives here (which tensors are FFN, how HF names map to ours); the
byte layout lives in storage/writer.py. Streams: resident tensors one at a time, FFN
layers in blocks of neurons, so converting a 7B checkpoint needs little RAM.

Both sources go through the same `_write_store`, so the store is the same whatever it was
made from: a GGUF file (storage/gguf.py) looks like a checkpoint with HF names and shapes
whose tensors come out dequantized, in HF orientation, block by block.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import numpy as np

from flashinfer.config import ModelArgs
from flashinfer.errors import ConfigError, ModelPathError, TokenizerError, UnsupportedArchitectureError
from flashinfer.generation_config import GENERATION_CONFIG, GenerationConfig
from flashinfer.weights import map_hf_tensors
from storage.format import TOKENIZER_FILES
from storage.quant import check_scheme
from storage.safetensors import Checkpoint, bf16_to_float32
from storage.writer import StoreWriter

DEFAULT_FFN_QUANT = "q4"
DEFAULT_RESIDENT_QUANT = "q8"
DEFAULT_GROUP_SIZE = 32
# --quant / --resident-quant auto (the default): a GGUF tensor whose blocks a store scheme holds
# exactly (storage.gguf.KEPT_SCHEMES: Q8_0, Q5_0 as q8 codes, Q4_0, Q4_1, Q4_K, Q6_K, F16, F32)
# keeps them, bit for bit, so flashinfer and llama.cpp compute with the same weights; another GGUF
# tensor of more than 4 bits (Q5_1, Q5_K) becomes q8, and so does a Q6_K up or gate (a bundle's
# components share groups of 32; q6k's are 16); every other tensor gets the default scheme above. One exception: a
# bundle's down column runs across the file's blocks (they follow W_down's rows), so kept 4-bit
# up/gate rows come with a q8 down column — 8 bits on top of 4-bit values rounds far less than
# a second 4-bit rounding would.
AUTO = "auto"
DOWN_FOR_KEPT_4BIT = "q8"
# Where W_down goes (--ffn-down): "columns", neuron i's column in its bundle, which the sparse
# path needs (a neuron read from flash brings everything it needs); "rows", W_down whole after
# the bundles (storage/format.py, FFNLayer.matrices), in the source's own blocks where it has
# them: a GGUF's down blocks run along the neurons, so only rows keep them unrounded, and a dense
# down-projection over rows is an integer matmul (SmolLM2's FFN in decode: 104 -> ~66 us a layer)
# where columns are a float scatter. "auto": rows for SiLU and GELU models, which run densely
# (every neuron active); columns for ReLU models, which run sparse.
FFN_DOWN_LAYOUTS = ("auto", "columns", "rows")
# Where W_gate goes (--ffn-gate): "bundles", neuron i's row in its bundle; "rows", W_gate whole
# after the bundles (FFNLayer.matrices), for the gate-threshold sparse FFN of a SiLU model
# (--predictor gate): it computes the gate of every neuron, so the gate is read in one long run
# or kept resident, and a bundle holds only the up row and down column a selected neuron needs.
FFN_GATE_LAYOUTS = ("bundles", "rows")
QUANTIZED = ("q8", "q4", "q4a", "q4k")  # the block schemes a bundle's up/gate may keep
ROWS_QUANTIZED = (*QUANTIZED, "q6k")  # and W_down written whole (rows)
BUNDLE_FALLBACK = {"q6k": "q8"}  # kept blocks a bundle cannot hold, and the scheme they are re-rounded into


def down_layout(args: ModelArgs, requested: str, gate: str = "bundles") -> str:
    """"rows" or "columns" for W_down (see FFN_DOWN_LAYOUTS); columns whenever the gate is
    written apart (`gate` "rows": a sparse layout, each neuron's down column in its bundle)."""
    if requested not in FFN_DOWN_LAYOUTS:
        raise ConfigError(f"--ffn-down {requested!r} is not one of {', '.join(FFN_DOWN_LAYOUTS)}")
    if gate not in FFN_GATE_LAYOUTS:
        raise ConfigError(f"--ffn-gate {gate!r} is not one of {', '.join(FFN_GATE_LAYOUTS)}")
    if gate == "rows":
        if requested == "rows":
            raise ConfigError("--ffn-gate rows is the gate predictor's sparse layout, whose bundles carry each "
                              "neuron's down column: drop --ffn-down rows (or pass --ffn-down columns)")
        if not args.gated_ffn:
            raise ConfigError(f"--ffn-gate rows: this model's FFN has no gate (act {args.act}, ungated)")
        if args.ffn_bias:
            raise ConfigError("--ffn-gate rows does not hold FFN biases (no Llama-family model has them); "
                              "convert without --ffn-gate")
        return "columns"
    if requested != AUTO:
        return requested
    return "columns" if args.act == "relu" else "rows"


class _Safetensors:
    """A safetensors checkpoint as the converter reads it (GGUFCheckpoint has the same
    `tensors`, `source`, `rows_f32` and `release`): float32 copies of blocks of rows or
    columns of a memory-mapped tensor."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt, self.tensors, self.source = ckpt, ckpt.tensors, ckpt.source

    def rows_f32(self, name: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
        arr = self.ckpt.raw(name)
        if rows is not None:
            arr = arr[rows]
        if cols is not None:
            arr = arr[:, cols]
        if self.tensors[name].dtype == "BF16":
            return bf16_to_float32(np.ascontiguousarray(arr))
        return np.array(arr, dtype=np.float32)

    def release(self, name: str) -> None:
        self.ckpt.release(name)


class _LazyRows:
    """A checkpoint tensor that yields float32 rows on slicing: StoreWriter.add_resident
    quantizes a block of rows at a time, so a 500 MB embedding is never copied whole.
    `kept_scheme` / `quantized(rows)`: the source's own blocks, when it has exact ones."""

    def __init__(self, src, name: str):
        self.src, self.name = src, name
        self.shape = src.tensors[name].shape
        self.kept_scheme = _kept_scheme(src, name)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return self.src.rows_f32(self.name, rows=rows)

    def quantized(self, rows: slice):
        return self.src.rows_quantized(self.name, rows)


def _kept_scheme(src, name: str) -> str | None:
    """The store scheme holding tensor `name` of `src` exactly (GGUF blocks), or None."""
    kept = getattr(src, "kept_scheme", None)
    return kept(name) if kept is not None and len(src.tensors[name].shape) == 2 else None


def _auto_scheme(src, name: str, default: str) -> str:
    """What --quant auto stores tensor `name` in: its kept scheme, else the source's finer
    fallback (GGUFCheckpoint.fallback_scheme: q8 for 5-6 bit blocks), else `default`."""
    fallback = getattr(src, "fallback_scheme", None)
    return _kept_scheme(src, name) or (fallback(name) if fallback is not None else None) or default


def _check_schemes(quant: str, resident_quant: str) -> None:
    for scheme in (quant, resident_quant):
        if scheme != AUTO:
            check_scheme(scheme)
    if quant == "q6k":
        raise ConfigError("--quant q6k: FFN bundles share groups of 32 across up, gate and down, and q6k's are 16; "
                          "use --quant q8 (or q4k). q6k holds whole matrices: --resident-quant q6k, and a GGUF's "
                          "Q6_K W_down is kept as q6k by --quant auto with --ffn-down rows")


def resident_scheme(src, name: str, requested: str) -> str:
    """The scheme resident tensor `name` is stored in (see AUTO)."""
    if requested != AUTO:
        return requested
    return _auto_scheme(src, name, DEFAULT_RESIDENT_QUANT)


def ffn_schemes(src, stored: dict[str, str], args: ModelArgs, layer: int, requested: str,
                rows: bool = False) -> dict[str, str]:
    """The scheme of each FFN component of `layer` (see AUTO). up and gate always share one:
    the FFN kernel lays out its input once for both. `rows`: W_down is written whole
    (down_layout), in its own kept blocks where the source has them."""
    if requested != AUTO:  # q4k's super-blocks run along rows: a down column takes q8
        return {"up": requested, "gate": requested, "down": requested if rows or requested != "q4k" else "q8"}
    p = f"layers.{layer}.ffn."
    kept = {BUNDLE_FALLBACK.get(scheme, scheme) for scheme in (
        _auto_scheme(src, stored[p + f"w_{c}.weight"], DEFAULT_FFN_QUANT) for c in (("up", "gate") if args.gated_ffn
                                                                                     else ("up",)))}
    scheme = kept.pop() if len(kept) == 1 else None
    if scheme in QUANTIZED:
        up, down_column = scheme, ("q8" if scheme == "q8" else DOWN_FOR_KEPT_4BIT)
    else:  # float, or up and gate in different blocks: one scheme for both (one prepared input)
        up, down_column = DEFAULT_FFN_QUANT, DEFAULT_FFN_QUANT
    if rows:
        down = _auto_scheme(src, stored[p + "w_down.weight"], DEFAULT_FFN_QUANT)
        return {"up": up, "gate": up, "down": down if down in ROWS_QUANTIZED else DEFAULT_FFN_QUANT}
    return {"up": up, "gate": up, "down": down_column}


def convert_checkpoint(model_path: str | Path, out_dir: str | Path, *, quant: str = AUTO,
                       resident_quant: str = AUTO, group_size: int = DEFAULT_GROUP_SIZE,
                       compression: str = "none", overwrite: bool = False, progress=None,
                       tokenizer_dir: str | Path | None = None, ffn_down: str = AUTO,
                       ffn_gate: str = "bundles") -> Path:
    """Write the store for the model at `model_path` to `out_dir`; returns out_dir.

    `model_path` is a Hugging Face model directory or a llama.cpp GGUF file (architecture
    "llama", "qwen2" or "gemma3"; see convert_gguf). `quant` / `resident_quant`: a scheme of storage/quant.py, or
    "auto" (see AUTO: a GGUF's exact blocks kept, else q4 FFN / q8 resident). `tokenizer_dir`,
    if given, holds the tokenizer.json (and optionally tokenizer_config.json) to store instead
    of the model's own. `ffn_down` / `ffn_gate`: where W_down and W_gate go (FFN_DOWN_LAYOUTS,
    FFN_GATE_LAYOUTS)."""
    model_path = Path(model_path)
    if model_path.is_file():
        return convert_gguf(model_path, out_dir, quant=quant, resident_quant=resident_quant, group_size=group_size,
                            compression=compression, overwrite=overwrite, progress=progress,
                            tokenizer_dir=tokenizer_dir, ffn_down=ffn_down, ffn_gate=ffn_gate)
    args = ModelArgs.from_model_dir(model_path)
    _check_schemes(quant, resident_quant)
    tokenizer_files = _tokenizer_dir_files(tokenizer_dir or model_path, args) + _generation_config_file(model_path)
    ckpt = Checkpoint.open(model_path)
    try:
        hf_config = json.loads((model_path / "config.json").read_text())
        return _write_store(_Safetensors(ckpt), args, hf_config, out_dir, tokenizer_files,
                            quant=quant, resident_quant=resident_quant, group_size=group_size,
                            compression=compression, overwrite=overwrite, progress=progress, ffn_down=ffn_down,
                            ffn_gate=ffn_gate)
    finally:
        ckpt.close()


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, quant: str = AUTO,
                 resident_quant: str = AUTO, group_size: int = DEFAULT_GROUP_SIZE,
                 compression: str = "none", overwrite: bool = False, progress=None,
                 tokenizer_dir: str | Path | None = None, ffn_down: str = AUTO,
                 ffn_gate: str = "bundles") -> Path:
    """Write the store for a llama.cpp GGUF file (architecture "llama", "qwen2" or "gemma3", tensors F32, F16,
    BF16, Q8_0 or another type in storage.gguf.SUPPORTED_TYPES) to `out_dir`.

    Q8_0, Q4_0, Q4_1, Q4_K, F16 and F32 tensors keep their exact blocks when their store scheme
    is the one asked for ("auto", the default, asks for it; see AUTO); other tensors are
    dequantized to float32 a block at a time and quantized to `quant` / `resident_quant`
    (for "auto": q8 for Q5/Q6 blocks, else q4 FFN, q8 resident). The config comes
    from the <architecture>.* metadata (storage.gguf.GGUFCheckpoint.hf_config; a llama file's
    FFN is SiLU, as llama.cpp runs it, unless it says `flashinfer.hidden_act`); the tokenizer from `tokenizer_dir` if
    given, else rebuilt from tokenizer.ggml.* (storage.gguf.GGUFCheckpoint.tokenizer_files).
    """
    from storage.gguf import GGUFCheckpoint

    _check_schemes(quant, resident_quant)
    gguf_path = Path(gguf_path)
    if not gguf_path.exists():
        raise ModelPathError(f"{gguf_path}: no such file or directory")
    with GGUFCheckpoint.open(gguf_path) as ckpt, tempfile.TemporaryDirectory(prefix="flashinfer-tok-") as tmp:
        hf_config = ckpt.hf_config()
        args = ModelArgs.from_hf_config(hf_config, f"{gguf_path} (GGUF metadata)")
        if ckpt.rope_freqs is not None:
            _check_rope_freqs(args, ckpt.rope_freqs, gguf_path)
        # every tokenizer file is ready before the store directory is made
        if tokenizer_dir is not None:
            tokenizer_files = _tokenizer_dir_files(tokenizer_dir, args)
            if not any(f.name == "tokenizer_config.json" for f in tokenizer_files):
                tokenizer_files.append(_write_json(Path(tmp) / "tokenizer_config.json", ckpt.tokenizer_config()))
        else:
            tokenizer_json, tokenizer_config = ckpt.tokenizer_files()
            (Path(tmp) / "tokenizer.json").write_text(tokenizer_json)
            tokenizer_files = [Path(tmp) / "tokenizer.json",
                               _write_json(Path(tmp) / "tokenizer_config.json", tokenizer_config)]
        generation_config = ckpt.generation_config()
        if generation_config:
            tokenizer_files.append(_write_json(Path(tmp) / GENERATION_CONFIG, generation_config))
        return _write_store(ckpt, args, hf_config, out_dir, tokenizer_files,
                            quant=quant, resident_quant=resident_quant, group_size=group_size,
                            compression=compression, overwrite=overwrite, progress=progress, ffn_down=ffn_down,
                            ffn_gate=ffn_gate)


def _write_store(src, args: ModelArgs, hf_config: dict, out_dir: str | Path, tokenizer_files: list[Path], *,
                 quant: str, resident_quant: str, group_size: int, compression: str, overwrite: bool,
                 progress, ffn_down: str = AUTO, ffn_gate: str = "bundles") -> Path:
    """Stream every tensor of `src` (a _Safetensors or a GGUFCheckpoint) into a new store."""
    stored = map_hf_tensors(args, src)
    rows = down_layout(args, ffn_down, ffn_gate) == "rows"
    gate_rows = ffn_gate == "rows"
    quant_config = {"ffn": quant, "resident": resident_quant, "group_size": group_size,
                    "ffn_down": "rows" if rows else "columns"} | ({"ffn_gate": "rows"} if gate_rows else {})
    with StoreWriter(out_dir, model_config=args.to_dict(), hf_config=hf_config, quant_config=quant_config,
                     compression=compression, source=str(src.source), overwrite=overwrite,
                     progress=progress) as writer:
        for canonical, name in stored.items():
            if not _in_bundles(canonical):
                scheme = resident_scheme(src, name, resident_quant)
                writer.add_resident(canonical, _LazyRows(src, name), scheme, group_size if scheme != "f32" else 0)
                src.release(name)  # keeps peak RSS at one tensor, not the whole checkpoint
        for i in range(args.n_layers):
            schemes = ffn_schemes(src, stored, args, i, quant, rows)
            down, gate = stored[f"layers.{i}.ffn.w_down.weight"], stored.get(f"layers.{i}.ffn.w_gate.weight")
            matrices = ({"down": (_LazyRows(src, down), schemes["down"])} if rows else {}) | (
                {"gate": (_LazyRows(src, gate), schemes["gate"])} if gate_rows else {})
            writer.add_ffn_layer(i, args.ffn_dim, args.dim, schemes, group_size,
                                 _neuron_blocks(src, stored, args, i, schemes, group_size, rows, gate_rows),
                                 matrices=matrices or None)
            for canonical, name in stored.items():
                if canonical.startswith(f"layers.{i}.ffn."):
                    src.release(name)
        for path in tokenizer_files:
            writer.copy_file(path)
        return writer.finish()


def _tokenizer_dir_files(tokenizer_dir: str | Path, args: ModelArgs) -> list[Path]:
    """The tokenizer files of `tokenizer_dir` to copy into the store, checked against the model."""
    tokenizer_dir = Path(tokenizer_dir)
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise ModelPathError(f"{tokenizer_dir}: no tokenizer.json; a store carries the model's tokenizer")
    from tokenizers import Tokenizer

    try:
        n_tokens = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")).get_vocab_size(with_added_tokens=True)
    except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
        raise TokenizerError(f"{tokenizer_dir / 'tokenizer.json'}: cannot load tokenizer ({e})") from None
    if n_tokens > args.vocab_size:
        raise TokenizerError(f"{tokenizer_dir / 'tokenizer.json'}: has {n_tokens} tokens but the model only "
                             f"{args.vocab_size} embeddings; it does not belong to these weights")
    from flashinfer.tokenizer import Tokenizer as ModelTokenizer

    ModelTokenizer.from_dir(tokenizer_dir)  # its config and chat template(s) are sound before a store is begun
    return [tokenizer_dir / name for name in TOKENIZER_FILES
            if name != GENERATION_CONFIG and (tokenizer_dir / name).is_file()]


def _generation_config_file(model_dir: Path) -> list[Path]:
    """The model's generation_config.json (end-of-turn ids, sampling defaults), checked, if it has one."""
    if GenerationConfig.from_dir(model_dir).source is None:
        return []
    return [model_dir / GENERATION_CONFIG]


def _write_json(path: Path, obj: dict) -> Path:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
    return path


def _check_rope_freqs(args: ModelArgs, rope_freqs: np.ndarray, source: Path) -> None:
    """A GGUF's rope_freqs.weight divides each RoPE frequency; flashinfer runs Llama 3's
    rope scaling (config.py), which must reproduce those divisors."""
    base = dataclasses.replace(args, rope_scaling=None).rope_inv_freq()
    ours = base / args.rope_inv_freq()
    if rope_freqs.shape != ours.shape or not np.allclose(rope_freqs, ours, rtol=1e-5):
        raise UnsupportedArchitectureError(
            f"{source}: rope_freqs.weight holds RoPE frequency divisors that Llama 3's rope scaling "
            f"(factor {args.rope_scaling.factor:g}, low/high freq factors 1/4, original context "
            f"{args.rope_scaling.original_max_position_embeddings}) does not reproduce; not supported")


def _in_bundles(canonical: str) -> bool:
    """FFN weights and per-neuron biases go into bundles; the down bias ([dim]) stays resident."""
    return ".ffn." in canonical and not canonical.endswith("w_down.bias")


def _neuron_blocks(src, stored: dict[str, str], args: ModelArgs, layer: int, schemes: dict[str, str],
                   group_size: int, down_rows: bool = False, gate_rows: bool = False):
    """neuron_block(start, stop) for StoreWriter.add_ffn_layer: rows of up/gate (the source's
    own blocks where they are kept: its scheme, and groups of 32 as a GGUF's blocks), columns of
    down (none when W_down is written whole, `down_rows`; no gate rows when W_gate is, `gate_rows`)."""
    p = f"layers.{layer}.ffn."

    def rows_of(component: str, rows: slice):
        name = stored[p + f"w_{component}.weight"]
        kept = _kept_scheme(src, name)
        if kept == schemes[component] and (kept in ("f32", "f16") or group_size == 32):
            return src.rows_quantized(name, rows)
        return src.rows_f32(name, rows=rows)

    def block(start: int, stop: int) -> dict:
        rows = slice(start, stop)
        arrays = {
            "up": rows_of("up", rows),
            "down": None if down_rows else src.rows_f32(stored[p + "w_down.weight"], cols=rows).T,
            "gate": rows_of("gate", rows) if args.gated_ffn and not gate_rows else None,
        }
        if args.ffn_bias:
            arrays["up_bias"] = src.rows_f32(stored[p + "w_up.bias"], rows=rows)
            if args.gated_ffn:
                arrays["gate_bias"] = src.rows_f32(stored[p + "w_gate.bias"], rows=rows)
        return arrays

    return block
