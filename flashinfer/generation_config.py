"""generation_config.json: a model's own end-of-turn tokens and sampling defaults.

Instruct models list their end-of-turn ids here (Llama-3: `eos_token_id: [128001, 128008,
128009]`, where config.json names only one), and many ship sampling defaults (`do_sample`,
`temperature`, `top_k`, `top_p`) that transformers applies when the caller gives none. The
engine does the same: an argument left as None takes the model's default, and a model whose
file says nothing (or `do_sample: false`) decodes greedily.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from flashinfer.config import read_json_object
from flashinfer.errors import ConfigError, GenerationError
from flashinfer.sampling import SamplingParams, is_int, is_real

GENERATION_CONFIG = "generation_config.json"
GREEDY = SamplingParams()


@dataclass(frozen=True)
class GenerationConfig:
    eos_token_ids: tuple[int, ...] = ()
    sampling: SamplingParams = field(default=GREEDY)  # what temperature/top_k/top_p None mean
    source: str | None = None  # the file it came from, None if the model has none

    @classmethod
    def from_dir(cls, path: str | Path) -> "GenerationConfig":
        """The generation_config.json of a model dir or store; the empty config if there is none."""
        file = Path(path) / GENERATION_CONFIG
        if not file.is_file():
            return cls()
        data = read_json_object(file)
        return cls(_eos_ids(data.get("eos_token_id"), file), _sampling(data, file), str(file))

    def resolve(self, temperature, top_k, top_p) -> SamplingParams:
        """Caller values, each None replaced by the model's default; checked."""
        d = self.sampling
        return SamplingParams.checked(d.temperature if temperature is None else temperature,
                                      d.top_k if top_k is None else top_k, d.top_p if top_p is None else top_p)


def _eos_ids(value, file: Path) -> tuple[int, ...]:
    if value is None:
        return ()
    ids = [value] if is_int(value) else value
    if not isinstance(ids, list) or not all(is_int(i) and i >= 0 for i in ids):
        raise ConfigError(f"{file}: eos_token_id must be a token id or a list of them, got {value!r}")
    return tuple(int(i) for i in ids)


def _sampling(data: dict, file: Path) -> SamplingParams:
    """transformers' rule: without do_sample true the model decodes greedily, whatever
    temperature it lists; with it, temperature defaults to 1, top_k to 50, top_p to 1."""
    do_sample = data.get("do_sample", False)
    if not isinstance(do_sample, bool):
        raise ConfigError(f"{file}: do_sample must be true or false, got {do_sample!r}")
    if not do_sample:
        return GREEDY
    values = {"temperature": data.get("temperature", 1.0), "top_k": data.get("top_k", 50),
              "top_p": data.get("top_p", 1.0)}
    for name, value in values.items():
        ok = is_int(value) if name == "top_k" else is_real(value)
        if value is None:
            values[name] = {"temperature": 1.0, "top_k": 0, "top_p": 1.0}[name]
        elif not ok:
            raise ConfigError(f"{file}: {name} must be a number, got {value!r}")
    try:
        return SamplingParams.checked(values["temperature"], values["top_k"], values["top_p"])
    except GenerationError as e:
        raise ConfigError(f"{file}: {e}") from None
