"""OPT family: learned positions (offset 2), LayerNorm, biases everywhere, ReLU FFN,
pre-LN (`do_layer_norm_before`, most sizes) or post-LN (OPT-350m style)."""

from __future__ import annotations

from flashinfer.errors import UnsupportedArchitectureError

MODEL_TYPES = ("opt",)

# OPT's learned position table is indexed by position + 2 (fairseq's padding offset).
POSITION_OFFSET = 2

_LAYER_MAP = {
    "attn_norm.weight": "self_attn_layer_norm.weight",
    "attn_norm.bias": "self_attn_layer_norm.bias",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wq.bias": "self_attn.q_proj.bias",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wk.bias": "self_attn.k_proj.bias",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wv.bias": "self_attn.v_proj.bias",
    "attn.wo.weight": "self_attn.out_proj.weight",
    "attn.wo.bias": "self_attn.out_proj.bias",
    "ffn_norm.weight": "final_layer_norm.weight",
    "ffn_norm.bias": "final_layer_norm.bias",
    "ffn.w_up.weight": "fc1.weight",
    "ffn.w_up.bias": "fc1.bias",
    "ffn.w_down.weight": "fc2.weight",
    "ffn.w_down.bias": "fc2.bias",
}


def args_from_hf_config(cfg: dict, source: str) -> dict:
    from flashinfer.arch import eos_ids

    dim = int(cfg["hidden_size"])
    proj_dim = cfg.get("word_embed_proj_dim", dim)
    if proj_dim != dim:
        raise UnsupportedArchitectureError(
            f"{source}: OPT with word_embed_proj_dim ({proj_dim}) != hidden_size ({dim}) "
            "(project_in/project_out, as in OPT-350m) is not supported"
        )
    act = cfg.get("activation_function", "relu")
    if act != "relu":
        raise UnsupportedArchitectureError(f"{source}: OPT activation_function {act!r} is not supported (supported: relu)")
    if not cfg.get("layer_norm_elementwise_affine", True):
        raise UnsupportedArchitectureError(f"{source}: layer_norm_elementwise_affine=false is not supported")
    if not cfg.get("enable_bias", True):
        raise UnsupportedArchitectureError(f"{source}: OPT without biases (enable_bias=false) is not supported")
    norm_before = bool(cfg.get("do_layer_norm_before", True))
    if norm_before and cfg.get("_remove_final_layer_norm", False):
        raise UnsupportedArchitectureError(f"{source}: _remove_final_layer_norm=true is not supported")
    n_heads = int(cfg["num_attention_heads"])
    return dict(
        model_type="opt",
        family="opt",
        vocab_size=int(cfg["vocab_size"]),
        dim=dim,
        n_layers=int(cfg["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=dim // n_heads,
        ffn_dim=int(cfg["ffn_dim"]),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        norm="layer",
        norm_eps=1e-5,  # HF OPT uses nn.LayerNorm's default
        act="relu",
        gated_ffn=False,
        positional="learned",
        learned_pos_offset=POSITION_OFFSET,
        norm_before=norm_before,
        attn_bias=True,
        ffn_bias=True,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg.get("eos_token_id")),
    )


def weight_names(args) -> dict[str, str]:
    names = {
        "tok_embeddings.weight": "model.decoder.embed_tokens.weight",
        "pos_embeddings.weight": "model.decoder.embed_positions.weight",
    }
    if args.norm_before:  # post-LN OPT has no final norm
        names["norm.weight"] = "model.decoder.final_layer_norm.weight"
        names["norm.bias"] = "model.decoder.final_layer_norm.bias"
    if not args.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(args.n_layers):
        for ours, theirs in _LAYER_MAP.items():
            names[f"layers.{i}.{ours}"] = f"model.decoder.layers.{i}.{theirs}"
    return names


def ignored_names(args, hf_names: set[str]) -> set[str]:
    """Names to ignore: a tied model may still carry lm_head.weight."""
    return {"lm_head.weight"} & hf_names if args.tie_embeddings else set()


def normalize_hf_name(name: str) -> str:
    """Some OPT checkpoints (facebook/opt-*) store names without the leading 'model.'."""
    return name if name.startswith("model.") or name.startswith("lm_head") else "model." + name
