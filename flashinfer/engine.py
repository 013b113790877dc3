"""Engine: the library API the CLI, the server and users' apps call.

    from flashinfer import Engine
    with Engine.open("tests/fixtures/llama") as eng:
        print(eng.generate("Once upon a time", max_tokens=16).text)
        for piece in eng.generate("Once upon a time", max_tokens=16, stream=True):
            print(piece, end="", flush=True)

One engine holds one model, one KV cache and one set of buffers; calls from several
threads are serialised by a lock (a stream holds it until it is exhausted or closed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from flashinfer.config import ModelArgs
from flashinfer.errors import GenerationError, ModelPathError
from flashinfer.model import Model, RunState
from flashinfer.sampling import SamplingParams, sample
from flashinfer.tokenizer import StreamDecoder, Tokenizer

DEFAULT_MAX_CTX = 4096  # KV cache positions unless the caller asks otherwise


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Timings:
    prompt_s: float = 0.0  # prefill wall time
    decode_s: float = 0.0  # wall time of all decode steps

    def rates(self, usage: Usage) -> tuple[float, float]:
        """(prompt tokens/s, decode tokens/s); decode counts the steps after the first token."""
        prompt = usage.prompt_tokens / self.prompt_s if self.prompt_s > 0 else 0.0
        steps = max(usage.completion_tokens - 1, 0)
        decode = steps / self.decode_s if self.decode_s > 0 else 0.0
        return prompt, decode


@dataclass(frozen=True)
class Response:
    """One streaming step: a text piece; the last one also carries why generation ended."""

    text: str
    token_id: int | None
    finish_reason: str | None = None  # "stop" (EOS or a stop string) | "length"
    usage: Usage | None = None
    timings: Timings | None = None
    token_ids: tuple[int, ...] | None = None  # on the last response: every generated id


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # generated ids only
    finish_reason: str
    usage: Usage
    timings: Timings = field(default_factory=Timings)


class Engine:
    def __init__(self, args: ModelArgs, tokenizer: Tokenizer, model: Model, resources: list, source: Path):
        self.args = args
        self.tokenizer = tokenizer
        self.model = model
        self.source = source
        self._resources = resources  # things with close(): checkpoint files, store reader, read-ahead thread
        self._lock = threading.Lock()
        self.eos_ids = set(args.eos_token_ids) | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set())
        self.memory_plan = None  # set by open() when a DRAM cap is given
        self.jit_seconds = self._warm_up()

    # ---- opening ------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, ctx: int | None = None, flash_bw: str | float | None = None,
             flash_latency: str | float | None = None, verify: bool = False, predictor: str = "dense",
             window: int = 5, dram: str | int | None = None, prefetch: bool = False) -> "Engine":
        """Open a flash store (made by `flashinfer convert`) or a Hugging Face model directory
        (config.json, *.safetensors, tokenizer.json).

        ctx: KV cache length in tokens (default: the model's maximum, capped at 4096).
        flash_bw / flash_latency: emulate slower flash for a store ("1GB/s", "50us").
        verify: check every checksum of a store before running.
        predictor: for a store, which FFN neurons to load per token: "dense" (all, read every
            token: the naive baseline) or "oracle" (exactly the active ones, through the
            windowed neuron cache; small models only, see flashinfer/sparse_ffn.py) or "lowrank"
            (fitted by `flashinfer calibrate`).
        window: tokens a loaded neuron stays cached after it was last predicted active.
        prefetch: read layer l+1's guessed neurons in the background while layer l computes
            (sparse predictors only; see flashinfer/sparse_ffn.py).
        dram: a cap for the whole process ("2GB"); the planner sizes the neuron caches under
            it or refuses with what would fit (flashinfer/memory.py). The plan is `engine.memory_plan`.
        """
        from storage.format import MANIFEST

        path = Path(path)
        if not path.exists():
            raise ModelPathError(f"{path}: no such file or directory")
        if not path.is_dir():
            raise ModelPathError(f"{path}: not a directory; expected a flash store or a Hugging Face model directory")
        if (path / MANIFEST).is_file() or ".partial-" in path.name:
            return cls._open_store(path, ctx, flash_bw, flash_latency, verify, predictor, window, dram, prefetch)
        if flash_bw is not None or flash_latency is not None or predictor != "dense" or dram is not None or prefetch:
            raise ModelPathError(f"{path}: flash_bw, flash_latency, predictor, dram and prefetch apply to a flash store; "
                                 "convert the model first (flashinfer convert)")
        return cls._open_hf(path, ctx)

    @classmethod
    def _open_hf(cls, path: Path, ctx: int | None) -> "Engine":
        from flashinfer.weights import load_hf_weights
        from storage.safetensors import Checkpoint

        args = ModelArgs.from_model_dir(path)
        tokenizer = cls._tokenizer_for(path, args)
        ctx = cls._check_ctx(args, ctx)
        checkpoint = Checkpoint.open(path)
        try:
            model = Model(args, load_hf_weights(args, checkpoint), ctx)
        except BaseException:
            checkpoint.close()
            raise
        return cls(args, tokenizer, model, [checkpoint], path)

    @classmethod
    def _open_store(cls, path: Path, ctx, flash_bw, flash_latency, verify: bool, predictor: str,
                    window: int, dram, prefetch: bool) -> "Engine":
        from flashinfer.errors import ConfigError
        from flashinfer.weights import load_store_weights
        from storage.reader import StoreReader
        from storage.throttle import Throttle

        throttle = Throttle.from_strings(flash_bw, flash_latency) if flash_bw or flash_latency else None
        reader = StoreReader(path, verify=verify, throttle=throttle)
        try:
            try:
                args = ModelArgs.from_dict(reader.manifest.model_config)
                args.validate(str(path / "manifest.json"))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{path / 'manifest.json'}: model_config does not describe a model ({e})") from None
            tokenizer = cls._tokenizer_for(path, args)
            ctx = cls._check_ctx(args, ctx)
            flash_ffn, plan = cls._flash_ffn(reader, args, predictor, window, dram, ctx, prefetch)
            model = Model(args, load_store_weights(args, reader), ctx, flash_ffn=flash_ffn)
        except BaseException:
            reader.close()
            raise
        resources = [r for r in (flash_ffn, reader) if hasattr(r, "close")]  # the read-ahead thread first
        engine = cls(args, tokenizer, model, resources, path)
        engine.memory_plan = plan
        return engine

    @staticmethod
    def _flash_ffn(reader, args: ModelArgs, predictor: str, window: int, dram, ctx: int, prefetch: bool = False):
        """The FFN source for a store, and the memory plan when a DRAM cap is given."""
        from flashinfer.flash_ffn import FlashFFN
        from flashinfer.memory import plan_memory
        from flashinfer.sparse_ffn import SparseFFN, oracle_from_store
        from storage.units import parse_size

        if not isinstance(window, int) or window < 1:
            raise GenerationError(f"window must be a positive number of tokens, got {window!r}")
        layers = reader.manifest.ffn_layers
        sparse_share = None
        if predictor == "dense":
            predictor_obj = None
        elif predictor == "oracle":
            predictor_obj = oracle_from_store(reader, args)
        elif predictor == "lowrank":
            predictor_obj, sparse_share = _load_lowrank(reader)
        else:
            raise GenerationError(f"predictor {predictor!r} is not available (available: dense, oracle, lowrank)")
        plan = None
        capacities = [spec.n_neurons for spec in layers]
        if dram is not None:
            plan = plan_memory(parse_size(dram), args, reader.manifest, ctx, sparse=predictor_obj is not None,
                               predictor_bytes=getattr(predictor_obj, "nbytes", 0),
                               io_buffer_bytes=reader.io_buffer_bytes, scratch_bytes=RunState.scratch_bytes(args, ctx),
                               sparse_share=sparse_share)
            capacities = plan.capacities or capacities
        if predictor_obj is None:
            if prefetch:
                raise GenerationError("prefetch needs a sparse predictor (lowrank or oracle): the dense path "
                                      "reads every neuron anyway")
            return FlashFFN(reader, args), plan
        return SparseFFN(reader, args, predictor_obj, capacities, window, prefetch=prefetch), plan

    @staticmethod
    def _tokenizer_for(path: Path, args: ModelArgs) -> Tokenizer:
        tokenizer = Tokenizer.from_dir(path)
        if tokenizer.vocab_size > args.vocab_size:
            raise ModelPathError(
                f"{path}: tokenizer has {tokenizer.vocab_size} tokens but the model only {args.vocab_size} "
                "embeddings; tokenizer.json does not belong to these weights"
            )
        return tokenizer

    @staticmethod
    def _check_ctx(args: ModelArgs, ctx: int | None) -> int:
        if ctx is None:
            return min(args.max_seq_len, DEFAULT_MAX_CTX)
        if not isinstance(ctx, int) or ctx < 1:
            raise GenerationError(f"ctx must be a positive number of tokens, got {ctx!r}")
        if ctx > args.max_seq_len:
            raise GenerationError(f"ctx {ctx} exceeds the model's max_position_embeddings ({args.max_seq_len})")
        return ctx

    def _warm_up(self) -> float:
        """Compile (or load from numba's on-disk cache) every kernel with the model's exact
        array types, so the first token's latency is not JIT time. Returns the seconds spent."""
        t0 = time.perf_counter()
        self.model.reset()
        self.model.forward(np.zeros(1, np.int64))
        self.model.reset()
        return time.perf_counter() - t0

    # ---- text ---------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids))

    def _prompt_ids(self, prompt: str | Sequence[int]) -> np.ndarray:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        else:
            ids = [int(t) for t in prompt]
            bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
            if bad:
                raise GenerationError(f"token id(s) {bad[:5]} outside the vocabulary [0, {self.args.vocab_size})")
        if not ids:
            raise GenerationError("the prompt is empty (no tokens)")
        if len(ids) >= self.model.ctx:
            raise GenerationError(
                f"the prompt has {len(ids)} tokens, the context holds {self.model.ctx}; shorten it or open with a larger ctx"
            )
        return np.asarray(ids, dtype=np.int64)

    # ---- evaluation ---------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """Logits float32 [len(token_ids), vocab] of the whole sequence, from an empty cache."""
        ids = self._prompt_ids(token_ids)
        out = np.empty((len(ids), self.args.vocab_size), np.float32)
        with self._lock:
            self.model.reset()
            self.model.forward(ids, out)
        return out

    # ---- generation ---------------------------------------------------------------
    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> GenerationResult | Iterator[str]:
        """Generate a continuation. temperature 0 is greedy. With stream=True returns an
        iterator of text pieces; otherwise a GenerationResult."""
        responses = self.stream(prompt, max_tokens, temperature, top_k, top_p, seed, stop)
        if stream:
            return (r.text for r in responses if r.text)
        pieces, last = [], None
        for last in responses:
            pieces.append(last.text)
        return GenerationResult("".join(pieces), list(last.token_ids), last.finish_reason, last.usage, last.timings)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
    ) -> Iterator[Response]:
        """Like generate(stream=True) but yields Response records; the last one carries
        finish_reason, usage and timings. Arguments are checked before the first step."""
        ids = self._prompt_ids(prompt)
        params = SamplingParams(float(temperature), int(top_k), float(top_p))
        params.validate()
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise GenerationError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise GenerationError(f"stop must be non-empty strings, got {stops!r}")
        return self._stream(ids, max_tokens, params, seed, stops)

    def _stream(self, ids, max_tokens, params, seed, stops) -> Iterator[Response]:
        with self._lock:
            model = self.model
            model.reset()
            t0 = time.perf_counter()
            logits = model.forward(ids)
            t1 = time.perf_counter()
            rng = np.random.default_rng(seed)
            decoder = StreamDecoder(self.tokenizer)
            held = ""  # text that may be the start of a stop string
            generated: list[int] = []
            finish = "length"
            hit_stop_string = False
            while True:
                token = sample(logits, params, rng)
                if token in self.eos_ids:
                    finish = "stop"
                    break
                generated.append(token)
                held += decoder.push(token)
                emit, held, hit_stop_string = _split_at_stop(held, stops)
                if hit_stop_string:
                    finish = "stop"
                    if emit:
                        yield Response(emit, token)
                    break
                if emit:
                    yield Response(emit, token)
                if len(generated) >= max_tokens or model.n_past >= model.ctx:
                    break
                logits = model.forward(np.array([token], np.int64))
            t2 = time.perf_counter()
            tail = ""
            if not hit_stop_string:  # what was held back, and any bytes of an unfinished character
                tail, _, hit_stop_string = _split_at_stop(held + decoder.flush(), stops, final=True)
                finish = "stop" if hit_stop_string else finish
            usage = Usage(len(ids), len(generated))
            timings = Timings(prompt_s=t1 - t0, decode_s=t2 - t1)
            yield Response(tail, None, finish, usage, timings, tuple(generated))

    # ---- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        for r in self._resources:
            r.close()
        self._resources = []

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_lowrank(reader):
    """The calibrated predictor of a store and the share of neurons it selects per token."""
    import json

    from flashinfer.calibrate import LOWRANK_FILE, PREDICTOR_DIR, REPORT_FILE
    from predictors.sparsity import LowRankPredictor

    path = reader.dir / PREDICTOR_DIR / LOWRANK_FILE
    if not path.is_file():
        raise GenerationError(f"{reader.dir}: no calibrated predictor ({PREDICTOR_DIR}/{LOWRANK_FILE}); "
                              f"run `flashinfer calibrate {reader.dir} --text FILE` first")
    report_path = path.with_name(REPORT_FILE)
    share = None
    if report_path.is_file():
        layers = json.loads(report_path.read_text())["layers"]
        share = max(layer["fraction"] for layer in layers)
    return LowRankPredictor.load(path), share


def _split_at_stop(text: str, stops: list[str], final: bool = False) -> tuple[str, str, bool]:
    """Split `text` into (safe to emit, held back, stop string found).

    Text before the first stop string is emitted and generation ends. Otherwise the longest
    tail that could still grow into a stop string is held back (unless `final`)."""
    if not stops:
        return text, "", False
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    if first >= 0:
        return text[:first], "", True
    if final:
        return text, "", False
    keep = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                keep = max(keep, n)
                break
    return text[: len(text) - keep], text[len(text) - keep :], False
