"""The synthetic models' shapes (PRESETS), the tensors each has, and the figures measured on a
real model that the SwiGLU presets reproduce."""

from __future__ import annotations

from dataclasses import dataclass

BOS_ID, EOS_ID, UNK_ID = 1, 2, 0


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
