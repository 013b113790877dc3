"""Engine: the library API the CLI, the server and users' apps call.

    from flashinfer import Engine
    with Engine.open("tests/fixtures/llama") as eng:
        print(eng.generate("Once upon a time", max_tokens=16).text)
        for piece in eng.generate("Once upon a time", max_tokens=16, stream=True):
            print(piece, end="", flush=True)
        print(eng.chat([{"role": "user", "content": "hi"}], max_tokens=16).text)

The engine runs its parallel kernels on numba's threads and sets numpy's BLAS to one thread
for the whole process (flashinfer/kernels/__init__.py, one_blas_thread: two thread pools
on two cores slowed both down).

One engine holds one model, one KV cache and one set of buffers, so calls from several
threads are serialised by a lock: each call holds it for the whole generation, and a stream
holds it from its first step until it is exhausted or closed (abandon one with `.close()`,
or `contextlib.closing`). A second engine on the same store would double the DRAM; the
server puts a bounded queue in front of this lock instead (flashinfer/server/).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, overload

import numpy as np
import psutil

from flashinfer.config import ModelArgs
from flashinfer.chat import Message
from flashinfer.errors import EngineBusyError, EngineClosedError, FormatError, GenerationError, ModelPathError
from flashinfer.generation_config import GenerationConfig
from flashinfer.model import Model, RunState
from flashinfer.sampling import check_seed, is_int, sample
from flashinfer.tokenizer import StreamDecoder, Tokenizer

DEFAULT_MAX_CTX = 4096  # KV cache positions unless the caller asks otherwise
# Share of each neuron cache kept for the hot set (Engine.open's pin). bench.sparse --pins 0,0.5,0.8 on the
# Mistral-7B shape (lowrank, 32 tokens, 2026-12-07): MB read per token at 2 / 2.5 / 3 GB 748 / 522 / 382 with
# the window alone, 722 / 492 / 337 at 0.5, 688 / 503 / 348 at 0.8; tokens/s within the machine's noise
DEFAULT_PIN = 0.5
DEFAULT_WINDOW = 5  # tokens a loaded neuron stays cached after it was last predicted
WARM_UP_ENV = "FLASHINFER_WARM_UP"  # "first-token": Engine.open warms only the first decode token (see _warm_up)


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
    """One streaming step: one generated token and the text it completes (often "" while a
    multi-byte character or a possible stop string is held back). The last one has no
    token; it carries the held-back rest and why generation ended."""

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
        self._lock = threading.Lock()  # held for a whole generation (see the module docstring)
        self._owner: int | None = None  # the thread holding _lock, to refuse a self-deadlock
        self._closed = False
        self.generation_config = GenerationConfig.from_dir(source)
        # config.json's EOS, the tokenizer's, and generation_config.json's end-of-turn ids (instruct models)
        self.eos_ids = (set(args.eos_token_ids) | set(self.generation_config.eos_token_ids)
                        | ({tokenizer.eos_id} if tokenizer.eos_id is not None else set()))
        self.memory_plan = None  # set by open() when a DRAM cap is given
        self.predictor_choice = None  # what predictor="auto" chose and why (flashinfer/auto_predictor.py)
        self.last_trace = None  # the Trace of the last generate(..., trace=True)
        # reuse_prefix: a prompt that starts with the previous sequence (its prompt and what it
        # generated, as a chat's next turn does) computes only its new tokens: the KV cache and the
        # neuron caches are kept. Off by default: outputs then never depend on an earlier call
        # (prefill and decode round differently, so a kept prefix can move a near-tie).
        self.reuse_prefix = False
        self._kv_ids: list[int] = []  # the tokens whose keys and values the KV cache holds, in order
        self.jit_seconds = self._warm_up()

    # ---- opening ------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path, ctx: int | None = None, flash_bw: str | float | None = None,
             flash_latency: str | float | None = None, verify: bool = False, predictor: str = "dense",
             window: int = DEFAULT_WINDOW, dram: str | int | None = None, prefetch: bool = False,
             stream_ffn: bool = False, store: str | Path | None = None, convert: bool | None = None,
             progress=None, notify=None, kv_cache: str = "f16", pin: float = DEFAULT_PIN,
             _footprint: bool = False) -> "Engine":
        """Open a flash store (made by `flashinfer convert`), a llama.cpp GGUF file or a Hugging
        Face model directory (config.json, *.safetensors, tokenizer.json).

        A GGUF file is converted once into a store in the cache dir and run from there
        (flashinfer/store_cache.py: $FLASHINFER_CACHE, else $XDG_CACHE_HOME/flashinfer). An HF
        dir is too when `convert` is True or a store-only knob (flash_bw, predictor, dram, ...)
        or `store` is given; otherwise (convert None) it is loaded as it is, in its own float
        precision (bfloat16 matrices as float16, flashinfer/weights.py). convert=False never
        converts.
        store: the directory to convert into (and find next time) instead of the cache.
        progress / notify: a callable(done_bytes) and a callable(message) for a conversion.

        ctx: KV cache length in tokens (default: the model's maximum, capped at 4096).
        kv_cache: the KV cache's element type: "f16" (default; llama.cpp's too: half the bytes of
            a long context, attention reads them widened), "f32" (keys and values as computed) or
            "q8" (int8 codes with a float32 scale per 32 channels of a position, as llama.cpp's
            q8_0: 0.56x of f16's bytes, for a long context under a tight cap).
        flash_bw / flash_latency: emulate slower flash for a store ("1GB/s", "50us").
        verify: check every checksum of a store before running.
        predictor: for a store, which FFN neurons to load per token: "auto" (dense or lowrank,
            whichever this disk reads faster under this cap, measured at open by reading a few
            layers both ways: flashinfer/auto_predictor.py; the choice and its figures are
            `engine.predictor_choice`), "dense" (every neuron: the FFN layers the cap
            leaves room for kept, the others read every token) or "oracle" (exactly the active ones, through the
            windowed neuron cache; small models only, see flashinfer/sparse_ffn.py), "lowrank"
            (fitted by `flashinfer calibrate`) or "static" (the calibration's fixed hot set); for
            SiLU/GELU models "gate": the exact gate of every neuron, thresholded per layer at a
            calibrated |act(gate.x)| (`flashinfer calibrate --sparsity`; store converted with
            --ffn-gate rows): skipped neurons cost no read and no work, at a measured quality cost.
        window: tokens a loaded neuron stays cached after it was last predicted active.
        pin: share of each neuron cache kept for its layer's hot set, the neurons predicted most
            often in the sequence, never evicted once read (sparse predictors; 0: the window alone;
            default 0.5: fewer bytes read per token than the window alone at every cap measured).
        prefetch: read layer l+1's guessed neurons in the background while layer l computes
            (sparse predictors only; see flashinfer/sparse_ffn.py).
        dram: a cap for the whole process ("2GB"); the planner sizes the neuron caches under
            it or refuses with what would fit (flashinfer/memory.py). The plan is `engine.memory_plan`.
        stream_ffn: with the dense predictor, read every FFN layer from flash every token (the
            paper's naive baseline). By default a dense run keeps as many FFN layers resident
            after their first read as the cap (or, with no cap, the machine's free memory) holds.
        """
        from flashinfer.store_cache import ConvertOptions, source_kind, store_for

        path = Path(path)
        _check_kv_cache(kv_cache)
        if not isinstance(pin, (int, float)) or not 0.0 <= pin <= 1.0:
            raise GenerationError(f"pin must be a share of the neuron cache in [0, 1], got {pin!r}")
        kind = source_kind(path)
        store_only = (flash_bw is not None or flash_latency is not None or predictor != "dense" or dram is not None
                      or prefetch or stream_ffn)
        if kind == "hf" and not convert and not store_only and store is None:
            return cls._open_hf(path, ctx, kv_cache)
        if kind != "store" and convert is False:
            if kind == "gguf":
                raise ModelPathError(f"{path}: a GGUF file runs from a flash store; open it with convert=True "
                                     "(or convert it first: flashinfer convert)")
            raise ModelPathError(f"{path}: flash_bw, flash_latency, predictor, dram, prefetch, stream_ffn and store "
                                 "apply to a flash store; open with convert=True (or convert the model first: "
                                 "flashinfer convert)")
        # the gate predictor reads W_gate whole: a GGUF or HF model converts into that layout for it
        options = ConvertOptions(ffn_gate="rows") if predictor == "gate" else ConvertOptions()
        path = store_for(path, store, options, progress=progress, notify=notify)
        choice = None
        if predictor == "auto":  # measured on this disk before anything is compiled or planned for it
            if stream_ffn:
                raise GenerationError("stream_ffn is the naive baseline of the dense predictor; ask for "
                                      "predictor='dense' with it, not 'auto'")
            choice = cls._choose_predictor(path, ctx, flash_bw, flash_latency, dram, kv_cache)
            predictor = choice.predictor
            prefetch = prefetch and predictor != "dense"  # prefetch applies to a sparse choice
            if notify is not None:
                notify(choice.line())
        if dram is not None and not _footprint:  # compile outside the cap, before the plan (flashinfer/precompile.py)
            from flashinfer.precompile import compile_in_child

            compile_in_child(path, {"predictor": predictor, "window": window, "prefetch": prefetch,
                                    "stream_ffn": stream_ffn, "kv_cache": kv_cache}, notify)
        engine = cls._open_store(path, ctx, flash_bw, flash_latency, verify, predictor, window, dram, prefetch,
                                 stream_ffn, kv_cache, _footprint, pin)
        engine.predictor_choice = choice
        return engine

    @classmethod
    def _choose_predictor(cls, path: Path, ctx, flash_bw, flash_latency, dram, kv_cache: str):
        """What predictor="auto" runs on this store, cap and disk (flashinfer/auto_predictor.py)."""
        from flashinfer.auto_predictor import choose_predictor
        from storage.reader import StoreReader
        from storage.throttle import Throttle
        from storage.units import parse_size

        with StoreReader(path, throttle=Throttle.for_options(flash_bw, flash_latency)) as reader:
            try:
                args = ModelArgs.from_dict(reader.manifest.model_config)
            except (TypeError, ValueError):  # _open_store reports it with the fix
                from flashinfer.auto_predictor import PredictorChoice

                return PredictorChoice("dense", "the store's model_config is unreadable")
            return choose_predictor(reader, args, ctx=cls._check_ctx(args, ctx),
                                    cap_bytes=None if dram is None else parse_size(dram), kv_cache=kv_cache,
                                    runtime_bytes=psutil.Process().memory_info().rss)

    @classmethod
    def _open_hf(cls, path: Path, ctx: int | None, kv_cache: str = "f16") -> "Engine":
        from flashinfer.weights import load_hf_weights
        from storage.safetensors import Checkpoint

        args = ModelArgs.from_model_dir(path)
        tokenizer = cls._tokenizer_for(path, args)
        ctx = cls._check_ctx(args, ctx)
        checkpoint = Checkpoint.open(path)
        try:
            model = Model(args, load_hf_weights(args, checkpoint), ctx, kv_cache=kv_cache)
        except BaseException:
            checkpoint.close()
            raise
        return cls(args, tokenizer, model, [checkpoint], path)

    @classmethod
    def _open_store(cls, path: Path, ctx, flash_bw, flash_latency, verify: bool, predictor: str,
                    window: int, dram, prefetch: bool, stream_ffn: bool = False, kv_cache: str = "f16",
                    footprint: bool = False, pin: float = DEFAULT_PIN) -> "Engine":
        from flashinfer.errors import ConfigError
        from flashinfer.weights import check_store_layout, load_store_weights
        from storage.reader import StoreReader
        from storage.throttle import Throttle

        reader = StoreReader(path, verify=verify, throttle=Throttle.for_options(flash_bw, flash_latency))
        try:
            try:
                args = ModelArgs.from_dict(reader.manifest.model_config)
                args.validate(str(path / "manifest.json"))
            except (TypeError, ValueError) as e:
                raise ConfigError(f"{path / 'manifest.json'}: model_config does not describe a model ({e})") from None
            check_store_layout(args, reader.manifest, str(path / "manifest.json"))
            tokenizer = cls._tokenizer_for(path, args)
            ctx = cls._check_ctx(args, ctx)
            flash_ffn, plan = cls._flash_ffn(reader, args, predictor, window, dram, ctx, prefetch, stream_ffn,
                                             kv_cache, footprint, pin)
            model = Model(args, load_store_weights(args, reader), ctx, flash_ffn=flash_ffn, kv_cache=kv_cache)
        except BaseException:
            reader.close()
            raise
        resources = [r for r in (flash_ffn, reader) if hasattr(r, "close")]  # the read-ahead thread first
        if plan is not None:  # the plan counts a context's rows of each lookup table (memory.resident_in_dram_bytes)
            from storage.format import lookup_tables

            tables = lookup_tables(reader.manifest.resident)
            model.release_lookup_pages = lambda: [reader.release_resident(name) for name in tables]
        engine = cls(args, tokenizer, model, resources, path)
        engine.memory_plan = plan
        return engine

    @staticmethod
    def _flash_ffn(reader, args: ModelArgs, predictor: str, window: int, dram, ctx: int, prefetch: bool = False,
                   stream_ffn: bool = False, kv_cache: str = "f16", footprint: bool = False,
                   pin: float = DEFAULT_PIN):
        """The FFN source for a store, and the memory plan when a DRAM cap is given. footprint:
        the kernels' types at a small size (flashinfer/precompile.py's child): footprint_rows
        cache rows a layer, or the first FFN layer resident and the others streamed."""
        from flashinfer.flash_ffn import FlashFFN
        from flashinfer.memory import dense_resident_layers, ffn_layer_bytes, free_memory_budget
        from flashinfer.sparse_ffn import SparseFFN, oracle_from_store
        from storage.units import parse_size

        if not isinstance(window, int) or window < 1:
            raise GenerationError(f"window must be a positive number of tokens, got {window!r}")
        layers = reader.manifest.ffn_layers
        if predictor == "gate":
            _check_gate_store(reader, args)
        if predictor in ("oracle", "lowrank", "static") and args.act != "relu":
            # they select neurons whose activation is exactly zero otherwise; silu(g) and gelu(g) are
            # zero nowhere, so skipping any neuron changes the output (issue 15: a gate threshold)
            raise GenerationError(
                f"{reader.dir}: the {predictor} predictor skips neurons whose activation is exactly zero, which "
                f"only ReLU-family FFNs have; this model's FFN uses {args.act}, non-zero for every neuron: run it "
                "with --predictor dense, or --predictor gate (a calibrated threshold on |silu(gate)|)")
        if predictor != "dense" and any(spec.matrix("down") for spec in layers):
            raise GenerationError(
                f"{reader.dir}: this store keeps W_down as whole rows (converted for the dense FFN of a "
                f"{args.act} model); the {predictor} predictor reads single neurons, each with its down column "
                "in its bundle: convert the model again with `flashinfer convert MODEL OUT --ffn-down columns`")
        sparse_share = None
        layered = False  # the gate predictor streaming whole layers (below)
        runtime_bytes = psutil.Process().memory_info().rss  # before the predictor, which the plan counts itself
        if predictor == "dense":
            predictor_obj = None
        elif predictor == "oracle":
            predictor_obj = oracle_from_store(reader, args)
        elif predictor in ("lowrank", "static"):
            predictor_obj, sparse_share = _load_calibrated(reader, predictor)
        elif predictor == "gate":
            # under a cap that cannot keep every layer whole: layers streamed with their W_gate
            # (flash_ffn.FlashFFN's gate mode) instead of neuron caches. (The precompile child runs
            # the neuron-cache path: its kernels include every one the gate mode calls.)
            # With no cap, the same rule as the dense path's: what the machine has free.
            if footprint:
                layered = False
            elif dram is not None:
                layered = not _gate_layers_fit(reader, args, ctx, cap_bytes=parse_size(dram),
                                               runtime_bytes=runtime_bytes, kv_cache=kv_cache)
            else:
                layered = sum(ffn_layer_bytes(spec) for spec in layers) > free_memory_budget()
            predictor_obj, sparse_share = _load_gate_predictor(reader, args, gates=not layered)
        else:
            raise GenerationError(f"predictor {predictor!r} is not available "
                                  "(available: dense, oracle, lowrank, static, gate)")
        plan = None
        capacities = [spec.n_neurons for spec in layers]
        if dram is not None:
            plan = _plan(reader, args, ctx, parse_size(dram), runtime_bytes, kv_cache,
                         sparse=predictor_obj is not None and not layered,
                         predictor_bytes=getattr(predictor_obj, "nbytes", 0), sparse_share=sparse_share,
                         overflow_scratch=predictor_obj is not None, stream_ffn=stream_ffn)
            capacities = plan.capacities or capacities
        if stream_ffn and predictor_obj is not None:
            raise GenerationError("stream_ffn applies to the dense predictor: a sparse one reads through its neuron cache")
        if predictor_obj is None or layered:
            if prefetch:
                raise GenerationError("prefetch needs a sparse predictor (lowrank, static or oracle): the dense path "
                                      "reads every neuron anyway, and so does the gate predictor under a cap that "
                                      "cannot keep every layer (whole layers stream, read one ahead)")
            if stream_ffn:
                resident = []
            elif footprint:  # a resident layer's one-call block and a streamed layer's kernels both compile
                resident = [0]
            else:
                resident = dense_resident_layers(layers, plan)
            # the streamed layers are read one ahead (two buffers, counted by the plan), except in
            # the naive baseline, which waits for each read as the paper's does
            return FlashFFN(reader, args, frozenset(resident), read_ahead=not stream_ffn,
                            gate=predictor_obj if layered else None), plan
        if footprint:
            from flashinfer.precompile import footprint_rows

            capacities = [footprint_rows(spec.n_neurons, args.dim) for spec in layers]
        return SparseFFN(reader, args, predictor_obj, capacities, window, prefetch=prefetch, pin=pin), plan

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
        array types, so the first token's latency is not JIT time. Returns the seconds spent.

        Three kernel sets: a decode token through the per-kernel path (which also reads a
        resident FFN in), the next one through the one-call block (kernels.decode_layer) where
        the blocks take it once their FFN is resident, and a prompt of several tokens. Warming
        the first alone left the other two to the first chat turn: cold, 5 s of prefill compile
        and 49 s of decode_layer's on SmolLM2 (2026-12-03). FLASHINFER_WARM_UP=first-token keeps
        to the first set (the default test suite: most of its engines never decode twice, and each
        model type's decode_layer is a compile of its own)."""
        t0 = time.perf_counter()
        mode = os.environ.get(WARM_UP_ENV)
        self.model.reset()
        self.model.forward(np.zeros(1, np.int64))
        if mode == "first-token":
            self.model.reset()
            return time.perf_counter() - t0
        if self.model.fuses_decode():
            self.model.forward(np.zeros(1, np.int64))
        self.model.reset()
        self.model.forward(np.zeros(2, np.int64))
        if mode == "all-paths":  # flashinfer/precompile.py's child: every kernel a prompt of any length picks
            self._warm_up_prompt_paths()
        self.model.reset()
        return time.perf_counter() - t0

    def _warm_up_prompt_paths(self) -> None:
        """Prompts of 4, 8 and a whole chunk of tokens: the kernels chosen by a prompt's length
        (serial or parallel matmuls by work, rows reused from 4 tokens on, attention through BLAS
        from 8) are monotone in it, so these and the 1- and 2-token passes cover every length
        (a 16-token prompt compiled 144 more numba functions after the standard warm-up); and a
        chunk's logits at every position, as Engine.logits asks."""
        from flashinfer import kernels as K

        for n in (K.ROW_REUSE_MIN_TOKENS, K.ATTENTION_BLAS_MIN_TOKENS, self.model.state.chunk):
            if n <= self.model.ctx:  # distinct tokens: a sparse layer's selection is their union, as a prompt's
                self.model.reset()
                self.model.forward(np.arange(n, dtype=np.int64) % self.args.vocab_size)
        # Engine.logits: the head over every position of a chunk (its own matmul path: a capped
        # process compiled 31 functions on its first logits() of 16 tokens, 2026-12-07)
        n = min(self.model.state.chunk, self.model.ctx)
        self.model.reset()
        self.model.forward(np.arange(n, dtype=np.int64) % self.args.vocab_size,
                           np.empty((n, self.args.vocab_size), np.float32))

    @property
    def ctx(self) -> int:
        """Context length in tokens: prompt plus generated tokens fit in it."""
        return self.model.ctx

    # ---- holding the engine --------------------------------------------------------
    @contextmanager
    def _hold(self) -> Iterator[None]:
        """Hold the engine for one call or one stream. Other threads wait their turn; the
        thread that already holds it (through a stream it has not finished) gets an error,
        since waiting for itself would never end."""
        if self._owner == threading.get_ident():
            raise EngineBusyError("this thread is iterating an unfinished stream of this engine; exhaust it or "
                                  "close() it before another call (calls from other threads wait their turn)")
        with self._lock:
            self._check_open()
            self._owner = threading.get_ident()
            try:
                yield
            finally:
                self._owner = None

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosedError(f"the engine of {self.source} is closed; open a new one with Engine.open()")

    # ---- text ---------------------------------------------------------------------
    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text`, with the BOS token the model expects."""
        if not isinstance(text, str):
            raise GenerationError(f"tokenize takes a string, got {type(text).__name__}")
        return self.tokenizer.encode(text)

    def detokenize(self, token_ids: Sequence[int]) -> str:
        """Text of `token_ids` (special tokens left out)."""
        return self.tokenizer.decode(self._check_ids(token_ids))

    def apply_chat_template(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text chat() feeds the model: `messages` ([{"role": ..., "content": ...}])
        rendered with the model's chat_template from tokenizer_config.json. A model without
        one raises ChatTemplateError (flashinfer/chat.py says why there is no fallback)."""
        return self.tokenizer.apply_chat_template(messages, add_generation_prompt)

    def tokenize_chat(self, messages: Sequence[Message]) -> list[int]:
        """Token ids chat() feeds the model (the template writes its own special tokens)."""
        return self.tokenizer.encode(self.apply_chat_template(messages), add_special_tokens=False)

    def _check_ids(self, token_ids: Sequence[int]) -> list[int]:
        if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence | np.ndarray):
            raise GenerationError(f"expected a string or a sequence of token ids, got {type(token_ids).__name__}")
        ids = list(token_ids)
        not_ints = [t for t in ids if not is_int(t)]
        if not_ints:
            raise GenerationError(f"token ids must be integers, got {not_ints[:5]!r}")
        bad = [int(t) for t in ids if not 0 <= t < self.args.vocab_size]
        if bad:
            raise GenerationError(f"token id(s) {bad[:5]} outside the vocabulary [0, {self.args.vocab_size})")
        return [int(t) for t in ids]

    def _prompt_ids(self, prompt: str | Sequence[int]) -> np.ndarray:
        ids = self.tokenize(prompt) if isinstance(prompt, str) else self._check_ids(prompt)
        if not ids:
            raise GenerationError("the prompt is empty (no tokens)")
        if len(ids) >= self.model.ctx:
            raise GenerationError(
                f"the prompt has {len(ids)} tokens, the context holds {self.model.ctx}; shorten it or open with a larger ctx"
            )
        return np.asarray(ids, dtype=np.int64)

    # ---- evaluation ---------------------------------------------------------------
    def logits(self, token_ids: Sequence[int], out: np.ndarray | None = None) -> np.ndarray:
        """Logits float32 [len(token_ids), vocab] of the whole sequence, from an empty cache.
        out: a float32 array of that shape to fill and return (e.g. an np.memmap): under a DRAM
        cap, a result of more than memory.LOGITS_PLAN_ROWS rows is not in the plan and needs one."""
        ids = self._prompt_ids(token_ids)
        shape = (len(ids), self.args.vocab_size)
        if out is None:
            plan = self.memory_plan
            if plan is not None and len(ids) * self.args.vocab_size * 4 > plan.logits_bytes:
                raise GenerationError(
                    f"logits of {len(ids)} tokens take {len(ids) * self.args.vocab_size * 4 / 1e6:.0f} MB, more than "
                    f"the {plan.logits_bytes / 1e6:.0f} MB the DRAM plan holds for them: pass out=, a float32 array of "
                    f"shape {shape} of your own (an np.memmap of a file keeps it off the cap), or ask for "
                    f"<= {plan.logits_bytes // (self.args.vocab_size * 4)} tokens")
            out = np.empty(shape, np.float32)
        elif out.shape != shape or out.dtype != np.float32:
            raise GenerationError(f"out must be a float32 array of shape {shape}, got {out.dtype} {out.shape}")
        with self._hold():
            self.model.reset()
            self.model.forward(ids, out)
        return out

    # ---- generation ---------------------------------------------------------------
    @overload
    def generate(self, prompt: str | Sequence[int], max_tokens: int = ..., temperature: float | None = ...,
                 top_k: int | None = ..., top_p: float | None = ..., seed: int | None = ...,
                 stop: str | Sequence[str] | None = ..., stream: Literal[False] = ...,
                 trace: bool = ...) -> GenerationResult: ...

    @overload
    def generate(self, prompt: str | Sequence[int], max_tokens: int = ..., temperature: float | None = ...,
                 top_k: int | None = ..., top_p: float | None = ..., seed: int | None = ...,
                 stop: str | Sequence[str] | None = ..., *, stream: Literal[True],
                 trace: bool = ...) -> Iterator[str]: ...

    def generate(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
        trace: bool = False,
    ) -> GenerationResult | Iterator[str]:
        """Generate a continuation of `prompt` (text, or token ids).

        max_tokens: tokens to generate at most; generation also ends at EOS, at a stop
            string (not included in the text) or when the context is full.
        temperature: 0 is greedy; top_k (0 = off) and top_p (1 = off) filter what is sampled.
            Each left as None takes the model's default from generation_config.json
            (flashinfer/generation_config.py); a model without one decodes greedily.
        seed: makes sampling reproducible (the same seed gives the same tokens).
        stream: False returns a GenerationResult (text, token_ids, finish_reason, usage);
            True returns an iterator of text pieces that holds the engine while it is
            iterated (close it to stop early).
        trace: trace the run per token and layer (flashinfer/profile.py); when it ends,
            `engine.last_trace` holds the Trace (`.summary()`, `.to_chrome_trace(path)`,
            `.to_jsonl(path)`).
        Bad arguments raise GenerationError before anything runs.
        """
        responses = self.stream(prompt, max_tokens, temperature, top_k, top_p, seed, stop, trace)
        if stream:
            return _texts(responses)
        pieces, last = [], None
        for last in responses:
            pieces.append(last.text)
        return GenerationResult("".join(pieces), list(last.token_ids), last.finish_reason, last.usage, last.timings)

    @overload
    def chat(self, messages: Sequence[Message], max_tokens: int = ..., temperature: float | None = ...,
             top_k: int | None = ..., top_p: float | None = ..., seed: int | None = ...,
             stop: str | Sequence[str] | None = ..., stream: Literal[False] = ...) -> GenerationResult: ...

    @overload
    def chat(self, messages: Sequence[Message], max_tokens: int = ..., temperature: float | None = ...,
             top_k: int | None = ..., top_p: float | None = ..., seed: int | None = ...,
             stop: str | Sequence[str] | None = ..., *, stream: Literal[True]) -> Iterator[str]: ...

    def chat(
        self,
        messages: Sequence[Message],
        max_tokens: int = 256,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> GenerationResult | Iterator[str]:
        """The assistant's reply to `messages` ([{"role": "user", "content": "hi"}, ...]),
        prompted through the model's chat template (see apply_chat_template). Otherwise as
        generate(); the reply ends at the model's end-of-turn token (its EOS)."""
        return self.generate(self.tokenize_chat(messages), max_tokens, temperature, top_k, top_p, seed, stop,
                             stream=stream)

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        temperature: float | None = None,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        trace: bool = False,
    ) -> Iterator[Response]:
        """Like generate(stream=True) but yields one Response per generated token, and a last
        one that carries finish_reason, usage and timings. Arguments are checked here, before
        the first step; the engine is held from the first step until the end or close()."""
        self._check_open()
        ids = self._prompt_ids(prompt)
        params = self.generation_config.resolve(temperature, top_k, top_p)
        if not is_int(max_tokens) or max_tokens < 1:
            raise GenerationError(f"max_tokens must be a positive integer, got {max_tokens!r}")
        seed = check_seed(seed)
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and not isinstance(stops, Sequence):
            raise GenerationError(f"stop must be a string or a list of strings, got {stop!r}")
        stops = list(stops or [])
        if any(not isinstance(s, str) or not s for s in stops):
            raise GenerationError(f"stop must be non-empty strings, got {stops!r}")
        return self._stream(ids, int(max_tokens), params, seed, stops, self._new_tracer() if trace else None)

    def _new_tracer(self):
        from flashinfer.profile import Tracer

        return Tracer(self.args.n_layers)

    def _attach(self, tracer) -> None:
        """Point the model's and the FFN source's hooks at `tracer` (None detaches)."""
        self.model.tracer = tracer
        if self.model.flash_ffn is not None:
            self.model.flash_ffn.tracer = tracer

    def _stream(self, ids, max_tokens, params, seed, stops, tracer=None) -> Iterator[Response]:
        with self._hold():
            try:
                self._attach(tracer)
                yield from self._steps(ids, max_tokens, params, seed, stops, tracer)
            finally:
                self._attach(None)

    def _kept_prefix(self, ids: np.ndarray) -> int:
        """How many leading tokens of `ids` the KV cache already holds (reuse_prefix), at most all but
        the last (whose logits start the generation); 0 resets the model."""
        if not self.reuse_prefix or not self._kv_ids:
            return 0
        n = min(len(self._kv_ids), len(ids) - 1)
        same = np.asarray(self._kv_ids[:n], np.int64) == ids[:n]
        return n if same.all() else int(np.argmin(same))  # the first position that differs

    def _steps(self, ids, max_tokens, params, seed, stops, tracer) -> Iterator[Response]:
        model = self.model
        kept = self._kept_prefix(ids)
        self._kv_ids = []  # until this sequence is in the cache, nothing there is known to be kept
        if kept:
            model.n_past = kept
        else:
            model.reset()
        t0 = time.perf_counter()
        if tracer is not None:
            tracer.begin_step("prefill", len(ids) - kept)
        logits = model.forward(ids[kept:])
        kv_ids = [int(t) for t in ids]
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
            yield Response(emit, token)
            self._resumed()
            if hit_stop_string:
                finish = "stop"
                break
            if len(generated) >= max_tokens or model.n_past >= model.ctx:
                break
            if tracer is not None:
                tracer.begin_step("decode", 1)
            logits = model.forward(np.array([token], np.int64))
            kv_ids.append(token)
        self._kv_ids = kv_ids
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
            # a FlashFFN in gate mode holds its predictor as `gate`
            "predictor": getattr(getattr(ffn, "predictor", None) or getattr(ffn, "gate", None), "name",
                                 "dense" if ffn is not None else "in-memory"),
            "window": getattr(ffn.caches[0], "window", None) if hasattr(ffn, "caches") else None,
            "prefetch": getattr(ffn, "prefetch", False),
            "jit_s": self.jit_seconds, "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens, "prefill_s": timings.prompt_s,
            "decode_tok_s": timings.rates(usage)[1], "peak_rss_bytes": peak_rss_bytes(),
            "cap_bytes": None if plan is None else plan.cap_bytes,
            "plan": None if plan is None else plan.table(),
            # the dense path's resident layers (FlashFFN); a sparse run's caches are in the layer rows
            "resident_ffn_layers": sorted(ffn.resident) if hasattr(ffn, "resident") else None,
        })
        return trace

    def _resumed(self) -> None:
        """A paused stream goes on: maybe in another thread than the one that started it
        (which now holds the engine), maybe after this thread closed the engine."""
        self._owner = threading.get_ident()
        self._check_open()

    # ---- lifetime -----------------------------------------------------------------
    def close(self) -> None:
        """Release the model's files (and the read-ahead thread). Waits for a generation in
        another thread to finish; a stream this thread left unfinished fails on its next step."""
        if self._owner == threading.get_ident():  # our own paused stream: no step is running
            self._release()
            return
        with self._lock:
            self._release()

    def _release(self) -> None:
        self._closed = True
        for r in self._resources:
            r.close()
        self._resources = []

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _texts(responses: Iterator[Response]) -> Iterator[str]:
    """The non-empty text pieces of a stream; closing this closes the stream (frees the engine)."""
    try:
        for response in responses:
            if response.text:
                yield response.text
    finally:
        responses.close()


def _check_kv_cache(kv_cache) -> None:
    from flashinfer.memory import KV_ELEMENT_BYTES

    if kv_cache not in KV_ELEMENT_BYTES:
        raise GenerationError(f"kv_cache must be one of {', '.join(KV_ELEMENT_BYTES)}, got {kv_cache!r}")


def _load_calibrated(reader, kind: str):
    """The calibrated predictor `kind` ("lowrank" | "static") of a store, and the largest
    share of a layer's neurons it selects per token (what the DRAM planner sizes for)."""
    from flashinfer.calibrate import LOWRANK_FILE, PREDICTOR_DIR, REPORT_FILE, STATIC_FILE
    from predictors.sparsity import LowRankPredictor, StaticPredictor

    path = reader.dir / PREDICTOR_DIR / (LOWRANK_FILE if kind == "lowrank" else STATIC_FILE)
    if not path.is_file():
        raise GenerationError(f"{reader.dir}: no calibrated {kind} predictor ({PREDICTOR_DIR}/{path.name}); "
                              f"run `flashinfer calibrate {reader.dir} --text FILE` first")
    neurons = [spec.n_neurons for spec in reader.manifest.ffn_layers]
    if kind == "static":
        static = StaticPredictor.load(path, layers=neurons)
        return static, max(len(h) / n for h, n in zip(static.hot_sets, neurons))
    from flashinfer.weights import kernel_product, q8_matrix

    # B in q8 (predictors/sparsity.py says why), multiplied by the engine's own kernels
    dim = reader.manifest.ffn_layers[0].component("up").length if neurons else None
    predictor = LowRankPredictor.load(path, quantize=q8_matrix, product=kernel_product, layers=neurons, dim=dim)
    return predictor, _calibrated_share(path.with_name(REPORT_FILE))


def _check_gate_store(reader, args: ModelArgs) -> None:
    """The gate predictor needs a SiLU/GELU model whose store keeps W_gate apart (--ffn-gate rows)."""
    if args.act == "relu":
        raise GenerationError(
            f"{reader.dir}: the gate predictor thresholds SiLU/GELU gates, which have no exact zeros; this model's "
            "FFN is ReLU, whose zeros the lowrank predictor finds: calibrate it (`flashinfer calibrate STORE --text "
            "FILE`) and run with --predictor lowrank")
    if not all(spec.matrix("gate") for spec in reader.manifest.ffn_layers):
        raise GenerationError(
            f"{reader.dir}: the gate predictor reads each layer's W_gate whole and only the selected neurons' up "
            "rows and down columns; this store keeps the gate in its bundles. Convert the model again with "
            "`flashinfer convert MODEL OUT --ffn-gate rows`, then `flashinfer calibrate OUT --text FILE --sparsity 0.4`")


def _gate_layers_fit(reader, args: ModelArgs, ctx: int, *, cap_bytes: int, runtime_bytes: int,
                     kv_cache: str) -> bool:
    """Whether the gate predictor's neuron caches can hold every layer whole under the cap, with
    every layer's W_gate resident beside them: then each layer is read once and kept (SparseFFN).
    Otherwise layers stream whole, with their W_gate, one read ahead, and as many as fit stay
    resident (flash_ffn.FlashFFN's gate mode): a selection of 40-60% of a layer is read through
    its gaps anyway, so a cache of neurons smaller than the layer saves no bytes over that."""
    from flashinfer.calibrate import GATE_REPORT_FILE, PREDICTOR_DIR
    from flashinfer.memory import BudgetError

    layers = reader.manifest.ffn_layers
    predictor_bytes = sum(spec.matrix("gate").nbytes + 4 * spec.n_neurons for spec in layers)
    try:
        plan = _plan(reader, args, ctx, cap_bytes, runtime_bytes, kv_cache, sparse=True,
                     predictor_bytes=predictor_bytes,
                     sparse_share=_calibrated_share(reader.dir / PREDICTOR_DIR / GATE_REPORT_FILE))
    except BudgetError:
        return False
    return all(c >= spec.n_neurons for c, spec in zip(plan.capacities, layers))


def _plan(reader, args: ModelArgs, ctx: int, cap_bytes: int, runtime_bytes: int, kv_cache: str, *, sparse: bool,
          predictor_bytes: int, sparse_share: float | None, overflow_scratch: bool | None = None,
          stream_ffn: bool = False):
    """flashinfer.memory.plan_memory for a store's FFN source. A predictor's path also reads what
    its caches cannot hold into a scratch area (sparse_ffn.py), counted with the read buffers
    (overflow_scratch; default: when sparse)."""
    from flashinfer.memory import plan_memory
    from flashinfer.sparse_ffn import OVERFLOW_SCRATCH_BYTES

    scratch = sparse if overflow_scratch is None else overflow_scratch
    return plan_memory(cap_bytes, args, reader.manifest, ctx, sparse=sparse, predictor_bytes=predictor_bytes,
                       io_buffer_bytes=reader.io_buffer_bytes + (OVERFLOW_SCRATCH_BYTES if scratch else 0),
                       scratch_bytes=RunState.scratch_bytes(args, ctx), sparse_share=sparse_share,
                       runtime_bytes=runtime_bytes, stream_ffn=stream_ffn, kv_cache=kv_cache)


def _load_gate_predictor(reader, args: ModelArgs, gates: bool = True):
    """The gate predictor of a store: every layer's W_gate read from its layer file and kept in DRAM
    (the planner counts it as the predictor's bytes; gates=False: none, the layers' own buffers hold
    it, flash_ffn.FlashFFN's gate mode), multiplied by the engine's kernels, and the calibrated
    thresholds; with the largest kept share of a layer the calibration measured."""
    from flashinfer import kernels as K
    from flashinfer.calibrate import GATE_FILE, GATE_REPORT_FILE, PREDICTOR_DIR
    from flashinfer.weights import kernel_product, matrix_from_quantized
    from predictors.sparsity import GatePredictor

    path = reader.dir / PREDICTOR_DIR / GATE_FILE
    if not path.is_file():
        raise GenerationError(f"{reader.dir}: no calibrated gate thresholds ({PREDICTOR_DIR}/{GATE_FILE}); run "
                              f"`flashinfer calibrate {reader.dir} --text FILE --sparsity 0.4` first")
    thresholds, sparsity = GatePredictor.load_thresholds(path, [spec.n_neurons for spec in reader.manifest.ffn_layers])
    gates = [matrix_from_quantized(reader.matrix_tensor(layer, "gate")) for layer in range(args.n_layers)] \
        if gates else []
    act = K.ACTS[args.act]

    def activation(g):
        K.activate_(g, act)
        return g

    predictor = GatePredictor(gates, thresholds, kernel_product, activation, sparsity)
    return predictor, _calibrated_share(path.with_name(GATE_REPORT_FILE))


def _calibrated_share(report_path):
    """The largest share of a layer's neurons the calibration report measured, or None."""
    import json

    if not report_path.is_file():
        return None
    try:
        layers = json.loads(report_path.read_text())["layers"]
        shares = [float(layer["fraction"]) for layer in layers]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise FormatError(f"{report_path}: not a calibration report ({type(e).__name__}: {e}); "
                          f"calibrate again (`flashinfer calibrate STORE --text FILE`)") from None
    if not shares or not all(0.0 <= s <= 1.0 for s in shares):
        raise FormatError(f"{report_path}: layer fractions must lie in 0..1, got {shares[:4]}; calibrate again")
    return max(shares)


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
