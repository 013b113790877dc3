"""Convert a Hugging Face checkpoint into a flash store (storage/format.py).

The model knowledge lives here (which tensors are FFN, how HF names map to ours); the
byte layout lives in storage/writer.py. Streams: resident tensors one at a time, FFN
layers in blocks of neurons, so converting a 7B checkpoint needs little RAM.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from flashinfer.config import ModelArgs
from flashinfer.errors import ModelPathError
from flashinfer.weights import map_hf_tensors
from storage.format import TOKENIZER_FILES
from storage.quant import check_scheme
from storage.safetensors import Checkpoint, bf16_to_float32
from storage.writer import StoreWriter

DEFAULT_FFN_QUANT = "q4"
DEFAULT_RESIDENT_QUANT = "q8"
DEFAULT_GROUP_SIZE = 32


def _rows_f32(ckpt: Checkpoint, name: str, rows: slice | None = None, cols: slice | None = None) -> np.ndarray:
    """A float32 copy of a block of a (memory-mapped) tensor."""
    arr = ckpt.raw(name)
    if rows is not None:
        arr = arr[rows]
    if cols is not None:
        arr = arr[:, cols]
    if ckpt.tensors[name].dtype == "BF16":
        return bf16_to_float32(np.ascontiguousarray(arr))
    return np.array(arr, dtype=np.float32)


class _LazyRows:
    """A checkpoint tensor that yields float32 rows on slicing: StoreWriter.add_resident
    quantizes a block of rows at a time, so a 500 MB embedding is never copied whole."""

    def __init__(self, ckpt: Checkpoint, name: str):
        self.ckpt, self.name = ckpt, name
        self.shape = ckpt.tensors[name].shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        return _rows_f32(self.ckpt, self.name, rows=rows)


def convert_checkpoint(model_dir: str | Path, out_dir: str | Path, *, quant: str = DEFAULT_FFN_QUANT,
                       resident_quant: str = DEFAULT_RESIDENT_QUANT, group_size: int = DEFAULT_GROUP_SIZE,
                       compression: str = "none", overwrite: bool = False, progress=None) -> Path:
    """Write the store for the HF model in `model_dir` to `out_dir`; returns out_dir."""
    model_dir = Path(model_dir)
    args = ModelArgs.from_model_dir(model_dir)
    for scheme in (quant, resident_quant):
        check_scheme(scheme)
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelPathError(f"{model_dir}: no tokenizer.json; a store carries the model's tokenizer")
    ckpt = Checkpoint.open(model_dir)
    try:
        stored = map_hf_tensors(args, ckpt)
        hf_config = json.loads((model_dir / "config.json").read_text())
        quant_config = {"ffn": quant, "resident": resident_quant, "group_size": group_size}
        with StoreWriter(out_dir, model_config=args.to_dict(), hf_config=hf_config, quant_config=quant_config,
                         compression=compression, source=str(model_dir), overwrite=overwrite,
                         progress=progress) as writer:
            for canonical, name in stored.items():
                if not _in_bundles(canonical):
                    writer.add_resident(canonical, _LazyRows(ckpt, name), resident_quant, group_size)
                    ckpt.release(name)  # keeps peak RSS at one tensor, not the whole checkpoint
            for i in range(args.n_layers):
                writer.add_ffn_layer(i, args.ffn_dim, args.dim, quant, group_size,
                                     _neuron_blocks(ckpt, stored, args, i))
                for canonical, name in stored.items():
                    if canonical.startswith(f"layers.{i}.ffn."):
                        ckpt.release(name)
            for tokenizer_file in TOKENIZER_FILES:
                if (model_dir / tokenizer_file).is_file():
                    writer.copy_file(model_dir / tokenizer_file)
            return writer.finish()
    finally:
        ckpt.close()


def _in_bundles(canonical: str) -> bool:
    """FFN weights and per-neuron biases go into bundles; the down bias ([dim]) stays resident."""
    return ".ffn." in canonical and not canonical.endswith("w_down.bias")


def _neuron_blocks(ckpt: Checkpoint, stored: dict[str, str], args: ModelArgs, layer: int):
    """neuron_block(start, stop) for StoreWriter.add_ffn_layer: rows of up/gate, columns of down."""
    p = f"layers.{layer}.ffn."

    def block(start: int, stop: int) -> dict[str, np.ndarray | None]:
        rows = slice(start, stop)
        arrays = {
            "up": _rows_f32(ckpt, stored[p + "w_up.weight"], rows=rows),
            "down": _rows_f32(ckpt, stored[p + "w_down.weight"], cols=rows).T,
            "gate": _rows_f32(ckpt, stored[p + "w_gate.weight"], rows=rows) if args.gated_ffn else None,
        }
        if args.ffn_bias:
            arrays["up_bias"] = _rows_f32(ckpt, stored[p + "w_up.bias"], rows=rows)
            if args.gated_ffn:
                arrays["gate_bias"] = _rows_f32(ckpt, stored[p + "w_gate.bias"], rows=rows)
        return arrays

    return block
