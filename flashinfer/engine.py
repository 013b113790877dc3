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
        self.last_trace = None  # the Trace of the last generate(..., trace=True)
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
            windowed neuron cache; small models only, see flashinfer/sparse_ffn.py), "lowrank"
            (fitted by `flashinfer calibrate`) or "static" (the calibration's fixed hot set).
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
        elif predictor in ("lowrank", "static"):
            predictor_obj, sparse_share = _load_calibrated(reader, predictor)
        else:
            raise GenerationError(f"predictor {predictor!r} is not available "
                                  "(available: dense, oracle, lowrank, static)")
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
                raise GenerationError("prefetch needs a sparse predictor (lowrank, static or oracle): the dense path "
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
        trace: bool = False,
    ) -> GenerationResult | Iterator[str]:
        """Generate a continuation. temperature 0 is greedy. With stream=True returns an
        iterator of text pieces; otherwise a GenerationResult. With trace=True the run is
        traced per token and layer (flashinfer/profile.py); when it ends, `engine.last_trace`
        holds the Trace (`.summary()`, `.to_chrome_trace(path)`, `.to_jsonl(path)`)."""
        responses = self.stream(prompt, max_tokens, temperature, top_k, top_p, seed, stop, trace)
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
        trace: bool = False,
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
        return self._stream(ids, max_tokens, params, seed, stops, self._new_tracer() if trace else None)

    def _new_tracer(self):
        from flashinfer.profile import Tracer

        return Tracer(self.args.n_layers)

    def _attach(self, tracer) -> None:
        """Point the model's and the FFN source's hooks at `tracer` (None detaches)."""
        self.model.tracer = tracer
        if self.model.flash_ffn is not None:
            self.model.flash_ffn.tracer = tracer

    def _stream(self, ids, max_tokens, params, seed, stops, tracer=None) -> Iterator[Response]:
        with self._lock:
            try:
                self._attach(tracer)
                yield from self._steps(ids, max_tokens, params, seed, stops, tracer)
            finally:
                self._attach(None)

    def _steps(self, ids, max_tokens, params, seed, stops, tracer) -> Iterator[Response]:
        model = self.model
        model.reset()
        t0 = time.perf_counter()
        if tracer is not None:
            tracer.begin_step("prefill", len(ids))
        logits = model.forward(ids)
        t1 = time.perf_counter()
        rng = np.random.default_rng(seed)
        decoder = StreamDecoder(self.tokenizer)
        held = ""  # text that may be the start of a stop string
        generated: list[int] = []
        finish = "length"
        hit_stop_string = False
        while True:
            ts = time.perf_counter()
            token = sample(logits, params, rng)
            if tracer is not None:
                tracer.end_step(token, time.perf_counter() - ts)
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
            if tracer is not None:
                tracer.begin_step("decode", 1)
            logits = model.forward(np.array([token], np.int64))
        t2 = time.perf_counter()
        tail = ""
        if not hit_stop_string:  # what was held back, and any bytes of an unfinished character
            tail, _, hit_stop_string = _split_at_stop(held + decoder.flush(), stops, final=True)
            finish = "stop" if hit_stop_string else finish
        usage = Usage(len(ids), len(generated))
        timings = Timings(prompt_s=t1 - t0, decode_s=t2 - t1)
        if tracer is not None:
            self.last_trace = self._finish_trace(tracer, usage, timings)
        yield Response(tail, None, finish, usage, timings, tuple(generated))

    def _finish_trace(self, tracer, usage: Usage, timings: Timings):
        from flashinfer.memory import peak_rss_bytes

        trace = tracer.trace
        ffn = self.model.flash_ffn
        plan = self.memory_plan
        trace.run.update({
            "model": str(self.source), "n_layers": self.args.n_layers,
            "predictor": getattr(getattr(ffn, "predictor", None), "name", "dense" if ffn is not None else "in-memory"),
            "window": getattr(ffn.caches[0], "window", None) if hasattr(ffn, "caches") else None,
            "prefetch": getattr(ffn, "prefetch", False),
            "jit_s": self.jit_seconds, "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens, "prefill_s": timings.prompt_s,
            "decode_tok_s": timings.rates(usage)[1], "peak_rss_bytes": peak_rss_bytes(),
            "cap_bytes": None if plan is None else plan.cap_bytes,
            "plan": None if plan is None else plan.table(),
        })
        return trace

    # ---- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        for r in self._resources:
            r.close()
        self._resources = []

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _load_calibrated(reader, kind: str):
    """The calibrated predictor `kind` ("lowrank" | "static") of a store, and the largest
    share of a layer's neurons it selects per token (what the DRAM planner sizes for)."""
    import json

    from flashinfer.calibrate import LOWRANK_FILE, PREDICTOR_DIR, REPORT_FILE, STATIC_FILE
    from predictors.sparsity import LowRankPredictor, StaticPredictor

    path = reader.dir / PREDICTOR_DIR / (LOWRANK_FILE if kind == "lowrank" else STATIC_FILE)
    if not path.is_file():
        raise GenerationError(f"{reader.dir}: no calibrated {kind} predictor ({PREDICTOR_DIR}/{path.name}); "
                              f"run `flashinfer calibrate {reader.dir} --text FILE` first")
    if kind == "static":
        static = StaticPredictor.load(path)
        neurons = [spec.n_neurons for spec in reader.manifest.ffn_layers]
        return static, max(len(h) / n for h, n in zip(static.hot_sets, neurons))
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
