"""Qwen2 / Qwen2.5: the Llama graph with biases on the q, k and v projections (none on o, none
in the MLP), RoPE base 1e6 and tied embeddings in the small models.

Its sliding-window attention (`use_sliding_window`, on the layers from `max_window_layers`
on) is off in every released Qwen2/2.5 checkpoint; a config that turns it on is refused
rather than run with full attention."""

from __future__ import annotations

from flashinfer.arch import llama
from flashinfer.errors import UnsupportedArchitectureError

MODEL_TYPES = ("qwen2",)
_QKV_BIAS = {f"attn.w{p}.bias": f"self_attn.{p}_proj.bias" for p in "qkv"}


def args_from_hf_config(cfg: dict, source: str) -> dict:
    if cfg.get("use_sliding_window"):
        raise UnsupportedArchitectureError(
            f"{source}: use_sliding_window is true (sliding attention on layers from max_window_layers="
            f"{cfg.get('max_window_layers')} on); flashinfer runs Qwen2 with full attention only")
    args = llama.args_from_hf_config({**cfg, "use_sliding_window": False}, source)
    return args | {"family": "qwen2", "qkv_bias": True, "attn_bias": False, "ffn_bias": False}


def weight_names(args) -> dict[str, str]:
    names = llama.weight_names(args)
    for i in range(args.n_layers):
        for ours, theirs in _QKV_BIAS.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


normalize_hf_name = llama.normalize_hf_name
ignored_names = llama.ignored_names
