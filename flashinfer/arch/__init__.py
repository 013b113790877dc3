"""Architecture families: one module per family, chosen by HF `model_type`.

Each module provides:
- `MODEL_TYPES`: the HF `model_type` values it handles;
- `args_from_hf_config(cfg, source) -> dict` of `ModelArgs` fields;
- `weight_names(args) -> dict[canonical name, HF name]` for every tensor the model needs;
- `normalize_hf_name(name) -> str`: one spelling for names some checkpoints write differently;
- `ignored_names(args, hf_names) -> set[str]`: HF names to skip (buffers, tied duplicates).

Canonical names are the engine's own (`layers.{i}.attn.wq.weight`, ...); see
`flashinfer/weights.py` for their shapes.
"""

from __future__ import annotations

from types import ModuleType

from flashinfer.arch import gemma3, llama, opt, qwen2
from flashinfer.errors import UnsupportedArchitectureError

FAMILIES: dict[str, ModuleType] = {"llama": llama, "opt": opt, "qwen2": qwen2, "gemma3": gemma3}
_BY_MODEL_TYPE = {mt: mod for mod in FAMILIES.values() for mt in mod.MODEL_TYPES}


def arch_for_model_type(model_type: str, source: str = "config.json") -> ModuleType:
    try:
        return _BY_MODEL_TYPE[model_type]
    except KeyError:
        supported = ", ".join(sorted(_BY_MODEL_TYPE))
        raise UnsupportedArchitectureError(
            f"{source}: model_type {model_type!r} is not supported (supported: {supported})"
        ) from None


def eos_ids(value) -> tuple[int, ...]:
    """HF writes eos_token_id as an int, a list of ints, or null."""
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
