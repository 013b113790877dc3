"""ModelArgs from HF config.json: families, options, and clear errors for the unsupported."""

import json
import math

import numpy as np
import pytest

from flashinfer.config import ModelArgs
from flashinfer.errors import ConfigError, ModelPathError, UnsupportedArchitectureError

LLAMA = {
    "model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
    "num_attention_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
    "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2,
}
MISTRAL = {
    "model_type": "mistral", "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 32000, "sliding_window": 4096,
    "rope_theta": 1e6, "max_position_embeddings": 32768, "hidden_act": "silu",
}
OPT = {
    "model_type": "opt", "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32, "num_attention_heads": 32,
    "vocab_size": 50272, "max_position_embeddings": 2048, "do_layer_norm_before": True, "word_embed_proj_dim": 4096,
    "activation_function": "relu", "enable_bias": True, "eos_token_id": 2, "bos_token_id": 2,
}


def test_llama2_7b():
    a = ModelArgs.from_hf_config(LLAMA)
    assert (a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.ffn_dim) == (4096, 32, 32, 32, 128, 11008)
    assert (a.norm, a.act, a.gated_ffn, a.positional, a.tie_embeddings) == ("rms", "silu", True, "rope", False)
    assert a.eos_token_ids == (2,) and a.sliding_window is None


def test_mistral_gqa_window_theta():
    a = ModelArgs.from_hf_config(MISTRAL)
    assert (a.n_kv_heads, a.n_rep, a.kv_dim, a.sliding_window, a.rope_theta) == (8, 4, 1024, 4096, 1e6)


def test_relu_llama_and_tied():
    a = ModelArgs.from_hf_config(LLAMA | {"hidden_act": "relu", "tie_word_embeddings": True})
    assert a.act == "relu" and a.tie_embeddings


def test_opt():
    a = ModelArgs.from_hf_config(OPT)
    assert (a.family, a.norm, a.act, a.gated_ffn, a.positional, a.learned_pos_offset) == ("opt", "layer", "relu", False, "learned", 2)
    assert a.attn_bias and a.ffn_bias and a.tie_embeddings and a.norm_before
    assert not ModelArgs.from_hf_config(OPT | {"do_layer_norm_before": False}).norm_before


def test_llama3_rope_scaling_matches_transformers_formula():
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
    a = ModelArgs.from_hf_config(LLAMA | {"rope_theta": 500000.0, "rope_scaling": scaling})
    base = 1.0 / 500000.0 ** (np.arange(0, 128, 2) / 128)
    got = a.rope_inv_freq()
    for b, g in zip(base, got):
        wavelen = 2 * math.pi / b
        if wavelen < 8192 / 4:
            assert g == pytest.approx(b)
        elif wavelen > 8192 / 1:
            assert g == pytest.approx(b / 8)
        else:
            smooth = (8192 / wavelen - 1) / (4 - 1)
            assert g == pytest.approx((1 - smooth) * b / 8 + smooth * b)
    # transformers >= 5 spelling
    b = ModelArgs.from_hf_config(LLAMA | {"rope_parameters": scaling | {"rope_theta": 500000.0}})
    np.testing.assert_array_equal(b.rope_inv_freq(), got)


def test_linear_rope_scaling():
    a = ModelArgs.from_hf_config(LLAMA | {"rope_scaling": {"type": "linear", "factor": 2.0}})
    np.testing.assert_allclose(a.rope_inv_freq(), 1.0 / 10000 ** (np.arange(0, 128, 2) / 128) / 2)


@pytest.mark.parametrize("cfg,message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported (supported: gemma3_text, llama, mistral, opt, qwen2)"),
    (LLAMA | {"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    (LLAMA | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling type 'yarn' is not supported"),
    (OPT | {"word_embed_proj_dim": 512}, "word_embed_proj_dim"),
])
def test_unsupported_is_named(cfg, message):
    with pytest.raises(UnsupportedArchitectureError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ModelArgs.from_hf_config(cfg)


def test_bad_configs():
    with pytest.raises(ConfigError, match="required key 'hidden_size' is missing"):
        ModelArgs.from_hf_config({k: v for k, v in LLAMA.items() if k != "hidden_size"})
    with pytest.raises(ConfigError, match=r"num_attention_heads \(32\) is not a multiple of num_key_value_heads \(5\)"):
        ModelArgs.from_hf_config(LLAMA | {"num_key_value_heads": 5})
    with pytest.raises(ConfigError, match="no 'model_type' key"):
        ModelArgs.from_hf_config({})


def test_model_dir_errors(tmp_path):
    with pytest.raises(ModelPathError, match="no such file or directory"):
        ModelArgs.from_model_dir(tmp_path / "nope")
    with pytest.raises(ModelPathError, match="no config.json here"):
        ModelArgs.from_model_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        ModelArgs.from_model_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert ModelArgs.from_model_dir(tmp_path).dim == 4096


def test_dict_round_trip():
    a = ModelArgs.from_hf_config(LLAMA | {"rope_scaling": {"type": "linear", "factor": 2.0}})
    assert ModelArgs.from_dict(json.loads(json.dumps(a.to_dict()))) == a
