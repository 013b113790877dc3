"""Llama family: Llama 2/3, Mistral (GQA, sliding window), ReLU-fied Llama (ReluLLaMA,
ProSparse, TurboSparse-Mistral). RMSNorm, RoPE, SwiGLU-style gated FFN with SiLU or ReLU."""

from __future__ import annotations

from flashinfer.errors import ConfigError, UnsupportedArchitectureError

MODEL_TYPES = ("llama", "mistral")

_ACT_ALIASES = {"silu": "silu", "swish": "silu", "relu": "relu"}

_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
}
_ATTN_BIAS = {f"attn.w{p}.bias": f"self_attn.{p}_proj.bias" for p in "qkv"} | {"attn.wo.bias": "self_attn.o_proj.bias"}
_FFN_BIAS = {
    "ffn.w_gate.bias": "mlp.gate_proj.bias",
    "ffn.w_up.bias": "mlp.up_proj.bias",
    "ffn.w_down.bias": "mlp.down_proj.bias",
}


def _rope(cfg: dict, source: str):
    from flashinfer.config import RopeScaling

    # transformers >= 5 writes `rope_parameters` (incl. rope_theta); older, `rope_scaling`.
    params = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ConfigError(f"{source}: rope_parameters / rope_scaling must be a JSON object, got {params!r}")
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    if cfg.get("partial_rotary_factor", 1.0) != 1.0:
        raise UnsupportedArchitectureError(f"{source}: partial_rotary_factor != 1 is not supported")
    if kind == "default":
        return theta, None
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    raise UnsupportedArchitectureError(
        f"{source}: rope scaling type {kind!r} is not supported (supported: default, linear, llama3)"
    )


def args_from_hf_config(cfg: dict, source: str) -> dict:
    from flashinfer.arch import eos_ids

    hidden_act = cfg.get("hidden_act", "silu")
    if hidden_act not in _ACT_ALIASES:
        raise UnsupportedArchitectureError(
            f"{source}: hidden_act {hidden_act!r} is not supported for {cfg['model_type']} (supported: silu, relu)"
        )
    n_heads = int(cfg["num_attention_heads"])
    dim = int(cfg["hidden_size"])
    theta, scaling = _rope(cfg, source)
    window = cfg.get("sliding_window")
    if cfg.get("use_sliding_window") is False:  # Qwen-style switch; Mistral omits it
        window = None
    return dict(
        model_type=cfg["model_type"],
        family="llama",
        vocab_size=int(cfg["vocab_size"]),
        dim=dim,
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or dim // n_heads),
        ffn_dim=int(cfg["intermediate_size"]),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        norm="rms",
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        act=_ACT_ALIASES[hidden_act],
        gated_ffn=True,
        positional="rope",
        rope_theta=theta,
        rope_scaling=scaling,
        sliding_window=int(window) if window else None,
        attn_bias=bool(cfg.get("attention_bias", False)),
        ffn_bias=bool(cfg.get("mlp_bias", False)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg.get("eos_token_id")),
    )


def weight_names(args) -> dict[str, str]:
    layer_map = dict(_LAYER_MAP)
    if args.attn_bias:
        layer_map |= _ATTN_BIAS
    if args.ffn_bias:
        layer_map |= _FFN_BIAS
    return names_with_layers(args, layer_map)


def names_with_layers(args, layer_map: dict[str, str]) -> dict[str, str]:
    """Canonical -> HF names of a `model.layers.{i}.` checkpoint (Llama's layout, which Qwen2 and
    Gemma 3 share): embeddings, final norm, lm_head unless tied, and `layer_map` per layer."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not args.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(args.n_layers):
        for ours, theirs in layer_map.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    return names


def normalize_hf_name(name: str) -> str:
    return name


def ignored_names(args, hf_names: set[str]) -> set[str]:
    """Names to ignore: old checkpoints carry RoPE buffers; tied models may keep lm_head."""
    ignored = {n for n in hf_names if n.endswith("rotary_emb.inv_freq")}
    if args.tie_embeddings:
        ignored |= {"lm_head.weight"} & hf_names
    return ignored
