"""Gemma 3 (text): the Llama graph with Gemma's differences, as transformers' Gemma3ForCausalLM
(`model_type` gemma3_text) runs them:
- GeGLU: gelu_pytorch_tanh(gate x) * up x;
- RMSNorm scales by (1 + w) (norm_weight_offset 1: the stored w is kept as it is);
- an RMSNorm over each head of q and of k before RoPE (q_norm, k_norm);
- four norms a block: input, post-attention (on the attention's output, before the residual
  add), pre-FFN and post-FFN (sandwich_norm);
- token embeddings times sqrt(hidden_size), tied lm_head;
- scores scaled by query_pre_attn_scalar**-0.5 (query_scale folds it into q);
- `layer_types`: sliding-window layers (window `sliding_window`, RoPE base of their own,
  `rope_parameters.sliding_attention`) between global ones (`rope_parameters.full_attention`).
Logit soft-capping (Gemma 2's) and bidirectional attention are refused: Gemma 3 has neither.
"""

from __future__ import annotations

import math

from flashinfer.arch import llama
from flashinfer.errors import UnsupportedArchitectureError

MODEL_TYPES = ("gemma3_text",)
_ACT_ALIASES = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
_LAYER_MAP = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn.wq.weight": "self_attn.q_proj.weight",
    "attn.wk.weight": "self_attn.k_proj.weight",
    "attn.wv.weight": "self_attn.v_proj.weight",
    "attn.wo.weight": "self_attn.o_proj.weight",
    "attn.q_norm.weight": "self_attn.q_norm.weight",
    "attn.k_norm.weight": "self_attn.k_norm.weight",
    "attn_post_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "ffn_post_norm.weight": "post_feedforward_layernorm.weight",
    "ffn.w_gate.weight": "mlp.gate_proj.weight",
    "ffn.w_up.weight": "mlp.up_proj.weight",
    "ffn.w_down.weight": "mlp.down_proj.weight",
}
LAYER_TYPES = ("sliding_attention", "full_attention")


def _rope_theta(cfg: dict, layer_type: str, source: str) -> float:
    params = (cfg.get("rope_parameters") or {}).get(layer_type) or {}
    if params.get("rope_type", "default") != "default":
        raise UnsupportedArchitectureError(
            f"{source}: rope_parameters.{layer_type} of type {params['rope_type']!r} is not supported for "
            "gemma3_text (supported: default)")
    legacy = {"full_attention": cfg.get("rope_theta", 1_000_000.0),
              "sliding_attention": cfg.get("rope_local_base_freq", 10_000.0)}
    return float(params.get("rope_theta", legacy[layer_type]))


def args_from_hf_config(cfg: dict, source: str) -> dict:
    from flashinfer.arch import eos_ids

    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if cfg.get(key) is not None:
            raise UnsupportedArchitectureError(f"{source}: {key} is set; flashinfer runs Gemma 3, which has none")
    if cfg.get("use_bidirectional_attention") or cfg.get("attention_bias"):
        raise UnsupportedArchitectureError(f"{source}: bidirectional attention and attention biases are not "
                                           "supported for gemma3_text")
    act = cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in _ACT_ALIASES:
        raise UnsupportedArchitectureError(f"{source}: hidden_activation {act!r} is not supported for gemma3_text "
                                           f"(supported: {', '.join(_ACT_ALIASES)})")
    n_layers = int(cfg["num_hidden_layers"])
    layer_types = cfg.get("layer_types") or [
        "sliding_attention" if (i + 1) % int(cfg.get("sliding_window_pattern", 6)) else "full_attention"
        for i in range(n_layers)]
    unknown = sorted(set(layer_types) - set(LAYER_TYPES))
    if unknown:
        raise UnsupportedArchitectureError(f"{source}: layer_types {unknown} are not supported "
                                           f"(supported: {', '.join(LAYER_TYPES)})")
    window = int(cfg.get("sliding_window") or 4096)
    dim, n_heads = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or 256)
    return dict(
        model_type=cfg["model_type"],
        family="gemma3",
        vocab_size=int(cfg["vocab_size"]),
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=head_dim,
        ffn_dim=int(cfg["intermediate_size"]),
        max_seq_len=int(cfg.get("max_position_embeddings", 131_072)),
        norm="rms",
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        act=_ACT_ALIASES[act],
        gated_ffn=True,
        positional="rope",
        rope_theta=_rope_theta(cfg, "full_attention", source),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids(cfg.get("eos_token_id")),
        embed_scale=math.sqrt(dim),
        norm_weight_offset=1.0,
        qk_norm=True,
        sandwich_norm=True,
        query_scale=math.sqrt(head_dim / float(cfg.get("query_pre_attn_scalar", head_dim))),
        layer_windows=tuple(window if t == "sliding_attention" else 0 for t in layer_types),
        rope_local_theta=_rope_theta(cfg, "sliding_attention", source),
    )


def weight_names(args) -> dict[str, str]:
    return llama.names_with_layers(args, _LAYER_MAP)


normalize_hf_name = llama.normalize_hf_name
ignored_names = llama.ignored_names
