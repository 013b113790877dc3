"""ModelArgs: the single source of every shape in the engine.

Built from a Hugging Face `config.json` (`ModelArgs.from_hf_config`) by the architecture
module chosen by `model_type` (see `flashinfer/arch/`). Nothing else in the code base
hard-codes a dimension; derived shapes (`q_dim`, `kv_dim`, `n_rep`) are properties here.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from flashinfer.errors import ConfigError, ModelPathError, UnsupportedArchitectureError
from storage import schema

ACTIVATIONS = ("silu", "relu", "gelu_tanh")  # gelu_tanh: GELU with the tanh approximation (Gemma)
# Upper bounds no real model comes near (the largest open models: ~130 layers, dim 16-25k, vocab
# 262k, 128k-token contexts): a damaged config is refused here, before arrays are sized from it
LIMITS = {"vocab_size": 1 << 24, "dim": 1 << 17, "n_layers": 1 << 12, "n_heads": 1 << 12, "n_kv_heads": 1 << 12,
          "head_dim": 1 << 12, "ffn_dim": 1 << 20, "max_seq_len": 1 << 24}


def read_json_object(path: Path) -> dict:
    """A JSON file holding an object (config.json, generation_config.json); ConfigError otherwise."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


@dataclass(frozen=True)
class RopeScaling:
    """HF `rope_scaling` / `rope_parameters`: how RoPE frequencies are stretched."""

    kind: str  # "linear" | "llama3"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelArgs:
    model_type: str
    family: str  # "llama" | "opt" | "qwen2" | "gemma3": which flashinfer/arch module maps the weights
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_seq_len: int
    norm: str  # "rms" | "layer"
    norm_eps: float
    act: str  # one of ACTIVATIONS
    gated_ffn: bool  # SwiGLU-style gate * act(up) (Llama) vs act(up) (OPT)
    positional: str  # "rope" | "learned"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    learned_pos_offset: int = 0  # OPT's embed_positions start at row 2
    sliding_window: int | None = None
    norm_before: bool = True  # pre-LN (all Llama, most OPT) vs post-LN (OPT-350m style)
    attn_bias: bool = False  # biases on q, k, v and o (OPT)
    qkv_bias: bool = False  # biases on q, k and v only (Qwen2)
    ffn_bias: bool = False
    tie_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Gemma 3 (flashinfer/arch/gemma3.py); every other family keeps these defaults
    embed_scale: float = 1.0  # token embeddings are multiplied by this (Gemma: sqrt(hidden_size))
    norm_weight_offset: float = 0.0  # RMSNorm scales by offset + weight (Gemma stores w for 1 + w)
    qk_norm: bool = False  # an RMSNorm over each head of q and of k, before RoPE
    sandwich_norm: bool = False  # each block's output is normed too, before the residual add
    query_scale: float = 1.0  # q is multiplied by this on top of 1/sqrt(head_dim) (query_pre_attn_scalar)
    layer_windows: tuple[int, ...] = ()  # per layer: sliding window, 0 = global (empty: sliding_window everywhere)
    rope_local_theta: float | None = None  # RoPE base of the windowed layers of layer_windows

    # ---- derived shapes -------------------------------------------------------------
    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (GQA group size)."""
        return self.n_heads // self.n_kv_heads

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        from flashinfer.arch import arch_for_model_type

        model_type = cfg.get("model_type")
        if model_type is not None and not isinstance(model_type, str):
            raise ConfigError(f"{source}: model_type must be a string, got {model_type!r}")
        if not model_type:
            raise ConfigError(f"{source}: no 'model_type' key; is this a Hugging Face config.json?")
        arch = arch_for_model_type(model_type, source)
        try:
            args = cls(**arch.args_from_hf_config(cfg, source))
        except KeyError as e:
            raise ConfigError(f"{source}: required key {e.args[0]!r} is missing") from None
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{source}: bad value in config ({e})") from None
        args.validate(source)
        return args

    @classmethod
    def from_model_dir(cls, path: str | Path) -> "ModelArgs":
        path = Path(path)
        config_path = path / "config.json"
        if not path.exists():
            raise ModelPathError(f"{path}: no such file or directory")
        if not config_path.is_file():
            raise ModelPathError(f"{path}: no config.json here; expected a Hugging Face model directory")
        return cls.from_hf_config(read_json_object(config_path), str(config_path))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelArgs":
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        d["eos_token_ids"] = tuple(d.get("eos_token_ids", ()))
        d["layer_windows"] = tuple(d.get("layer_windows", ()))
        return cls(**d)

    def validate(self, source: str = "config") -> None:
        try:
            self._check_types()
        except schema.SchemaError as e:
            raise ConfigError(f"{source}: {e}") from None
        positive = ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: {name} must be a positive integer, got {value!r}")
            if value > LIMITS[name]:
                raise ConfigError(f"{source}: {name} = {value} is beyond any model flashinfer runs (at most "
                                  f"{LIMITS[name]}); the config is damaged")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads ({self.n_heads}) is not a multiple of "
                f"num_key_value_heads ({self.n_kv_heads})"
            )
        if self.positional == "rope" and self.head_dim % 2:
            raise ConfigError(f"{source}: RoPE needs an even head_dim, got {self.head_dim}")
        if self.act not in ACTIVATIONS:
            raise UnsupportedArchitectureError(
                f"{source}: activation {self.act!r} is not supported (supported: {', '.join(ACTIVATIONS)})"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ConfigError(f"{source}: sliding_window must be positive, got {self.sliding_window}")
        if self.layer_windows and (len(self.layer_windows) != self.n_layers
                                   or any(not isinstance(w, int) or w < 0 for w in self.layer_windows)):
            raise ConfigError(f"{source}: layer_types must give each of the {self.n_layers} layers a type, "
                              f"got windows {list(self.layer_windows)}")

    def _check_types(self) -> None:
        """Every field of the type its annotation says, finite where a float: a manifest's
        model_config is read as it is, so a list where an int belongs stops here, not in numpy."""
        from flashinfer.arch import FAMILIES

        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), f.type
            if kind.endswith(" | None"):
                if value is None:
                    continue
                kind = kind[: -len(" | None")]
            if kind == "tuple[int, ...]":
                for i, v in enumerate(value):
                    schema.integer(v, f"{f.name}[{i}]")
            elif kind == "RopeScaling":
                if not isinstance(value, RopeScaling):
                    raise schema.SchemaError(f.name, f"must be a rope scaling object, got {value!r}")
                schema.string(value.kind, f"{f.name}.kind")
                for g in dataclasses.fields(value)[1:]:
                    schema.number(getattr(value, g.name), f"{f.name}.{g.name}", positive=True)
            else:
                check = {"str": schema.string, "bool": schema.boolean, "float": schema.number,
                         "int": lambda v, name: schema.integer(v, name, None)}[kind]
                check(value, f.name)
        schema.string(self.family, "family", tuple(FAMILIES))
        schema.string(self.norm, "norm", ("rms", "layer"))
        schema.string(self.positional, "positional", ("rope", "learned"))
        schema.number(self.norm_eps, "norm_eps", positive=True)
        schema.number(self.rope_theta, "rope_theta", positive=True)
        if self.rope_local_theta is not None:
            schema.number(self.rope_local_theta, "rope_local_theta", positive=True)
        schema.integer(self.learned_pos_offset, "learned_pos_offset")

    def layer_window(self, layer: int) -> int:
        """The sliding window of `layer` in tokens, 0 for global attention."""
        if self.layer_windows:
            return self.layer_windows[layer]
        return self.sliding_window or 0

    def layer_inv_freq(self, layer: int) -> np.ndarray:
        """RoPE inverse frequencies of `layer`: Gemma's windowed layers have a base of their own."""
        if self.rope_local_theta is not None and self.layer_window(layer):
            local = dataclasses.replace(self, rope_theta=self.rope_local_theta, rope_scaling=None)
            return local.rope_inv_freq()
        return self.rope_inv_freq()

    # ---- RoPE ---------------------------------------------------------------------
    def rope_inv_freq(self) -> np.ndarray:
        """Inverse frequencies of RoPE, float64 [head_dim/2], including rope scaling."""
        half = self.head_dim // 2
        inv_freq = 1.0 / (self.rope_theta ** (np.arange(0, half, dtype=np.float64) * 2.0 / self.head_dim))
        s = self.rope_scaling
        if s is None:
            return inv_freq
        if s.kind == "linear":
            return inv_freq / s.factor
        # Llama 3.1: long wavelengths are stretched by `factor`, short ones kept, the band
        # between interpolated (transformers' _compute_llama3_parameters).
        low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2.0 * math.pi / inv_freq
        scaled = np.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1.0 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return np.where(medium, smoothed, scaled)
