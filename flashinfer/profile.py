"""Tracing what the engine does, per token and per layer (`flashinfer profile`).

The engine calls a `Tracer` at each event: the model around every attention and FFN block,
the FFN source (flashinfer/sparse_ffn.py, flash_ffn.py) around predicting, cache
bookkeeping and flash reads, the engine around each step and sampling. Untraced, every hook
is one `tracer is None` test (bench/sparse.py measures the cost of tracing on and off).

Records
- `LayerRecord`: one layer in one step. A step is the prompt's prefill (step 0, all its
  chunks) or one decode token. Counts: neurons predicted, hits (resident already), misses
  (read on the critical path), read ahead, evicted; bytes read from flash (by the reader's
  own counter, so they add up to `reader.stats.bytes_read`), seconds reading, predicting,
  in cache bookkeeping ("memory management"), in the FFN kernel and in attention; cache
  occupancy and capacity after the step.
- `StepRecord`: one step: phase, tokens, wall seconds, sampling seconds, the token made.
- `Span`: a timed interval for the Chrome trace (thread "compute" or "read-ahead").
- `Trace.run`: per run facts: JIT/compile seconds (first call), prefill seconds, decode
  tokens/s, peak RSS, the DRAM plan and cap, the knobs.

Files: `to_jsonl` writes one JSON object per line, schema in TRACE_SCHEMA below;
`to_chrome_trace` writes the Chrome trace event format (opens in Perfetto / chrome://tracing);
flashinfer/profile_plot.py draws the PNG.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

TRACE_SCHEMA = {
    "run": "first line: facts of the run (model, knobs, jit_s, prefill_s, decode_tok_s, peak_rss_bytes, "
           "cap_bytes, plan) — keys of Trace.run",
    "step": "one per step: step, phase ('prefill'|'decode'), tokens, wall_s, sample_s, token_id",
    "layer": "one per layer per step: step, layer, tokens, predicted, hits, misses, prefetched, evicted, "
             "bytes_read, read_s, predict_s, mm_s, ffn_s, attn_s, occupancy, capacity",
    "summary": "last line: Trace.summary()",
}
COMPUTE_THREAD, READ_AHEAD_THREAD = 1, 2


@dataclass
class LayerRecord:
    step: int
    layer: int
    tokens: int = 0
    predicted: int = 0  # neurons the predictor selected (all of them for the dense path)
    hits: int = 0  # ... already resident
    misses: int = 0  # ... read from flash while the layer waited
    prefetched: int = 0  # neurons read ahead for this layer while the previous one computed
    evicted: int = 0
    bytes_read: int = 0  # from flash, for this layer in this step (read-ahead included)
    read_s: float = 0.0  # waiting for flash (synchronous reads and unfinished read-aheads)
    predict_s: float = 0.0
    mm_s: float = 0.0  # neuron cache bookkeeping: windowing, eviction, row moves
    ffn_s: float = 0.0  # the FFN kernel over resident rows
    attn_s: float = 0.0
    occupancy: int = 0  # cache rows live after the step
    capacity: int = 0


@dataclass
class StepRecord:
    step: int
    phase: str  # "prefill" | "decode"
    tokens: int
    wall_s: float = 0.0
    sample_s: float = 0.0
    token_id: int | None = None


@dataclass
class Span:
    name: str
    start_s: float  # since the trace began
    dur_s: float
    thread: int = COMPUTE_THREAD
    args: dict = field(default_factory=dict)


class Trace:
    """What a Tracer recorded: records, spans and run facts, plus the summary and files."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.steps: list[StepRecord] = []
        self.layers: list[LayerRecord] = []
        self.spans: list[Span] = []
        self.run: dict = {}

    # ---- the summary ------------------------------------------------------------------
    def summary(self) -> dict:
        """Per layer over the decode steps (hit rate, bytes read/token, ms I/O and compute per
        token) and totals: the latency split (I/O, memory management, predictor, attention,
        FFN compute, other) per decode token, tokens/s, prefill, JIT, peak RSS vs cap."""
        decode_steps = {s.step for s in self.steps if s.phase == "decode"}
        n_tok = max(len(decode_steps), 1)
        per_layer = []
        for layer in range(self.n_layers):
            rows = [r for r in self.layers if r.layer == layer and r.step in decode_steps]
            predicted = sum(r.predicted for r in rows)
            per_layer.append({
                "layer": layer,
                "hit_rate": (sum(r.hits for r in rows) / predicted) if predicted else None,
                "predicted_per_token": predicted / n_tok,
                "bytes_read_per_token": sum(r.bytes_read for r in rows) / n_tok,
                "io_ms_per_token": 1e3 * sum(r.read_s for r in rows) / n_tok,
                "compute_ms_per_token": 1e3 * sum(r.ffn_s + r.attn_s + r.predict_s for r in rows) / n_tok,
                "evicted_per_token": sum(r.evicted for r in rows) / n_tok,
                "occupancy": rows[-1].occupancy if rows else 0,
                "capacity": rows[-1].capacity if rows else 0,
            })
        decode_rows = [r for r in self.layers if r.step in decode_steps]
        wall = sum(s.wall_s for s in self.steps if s.step in decode_steps)
        split = {
            "io": sum(r.read_s for r in decode_rows),
            "memory_management": sum(r.mm_s for r in decode_rows),
            "predictor": sum(r.predict_s for r in decode_rows),
            "attention": sum(r.attn_s for r in decode_rows),
            "ffn_compute": sum(r.ffn_s for r in decode_rows),
        }
        split["other"] = max(wall - sum(split.values()), 0.0)  # norms, lm_head, sampling, Python
        predicted = sum(r.predicted for r in decode_rows)
        return {
            "decode_tokens": len(decode_steps),
            "decode_tok_s": len(decode_steps) / wall if wall > 0 else None,
            "ms_per_token": {k: 1e3 * v / n_tok for k, v in split.items()} | {"total": 1e3 * wall / n_tok},
            "hit_rate": (sum(r.hits for r in decode_rows) / predicted) if predicted else None,
            "bytes_read_per_token": sum(r.bytes_read for r in decode_rows) / n_tok,
            "bytes_read_total": sum(r.bytes_read for r in self.layers),
            "prefill_tokens": sum(s.tokens for s in self.steps if s.phase == "prefill"),
            "prefill_s": sum(s.wall_s for s in self.steps if s.phase == "prefill"),
            "jit_s": self.run.get("jit_s"),
            "peak_rss_bytes": self.run.get("peak_rss_bytes"),
            "cap_bytes": self.run.get("cap_bytes"),
            "layers": per_layer,
        }

    # ---- files --------------------------------------------------------------------------
    def to_jsonl(self, path: str | Path) -> None:
        """One JSON object per line, each with a "type" (TRACE_SCHEMA)."""
        with open(path, "w") as f:
            f.write(json.dumps({"type": "run", **self.run}) + "\n")
            by_step: dict[int, list[LayerRecord]] = {}
            for r in self.layers:
                by_step.setdefault(r.step, []).append(r)
            for s in self.steps:
                f.write(json.dumps({"type": "step", **asdict(s)}) + "\n")
                for r in by_step.get(s.step, []):
                    f.write(json.dumps({"type": "layer", **asdict(r)}) + "\n")
            f.write(json.dumps({"type": "summary", **self.summary()}) + "\n")

    def chrome_events(self) -> list[dict]:
        events = [{"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": name}}
                  for tid, name in ((COMPUTE_THREAD, "compute"), (READ_AHEAD_THREAD, "read-ahead"))]
        for s in self.spans:
            events.append({"name": s.name, "cat": s.name.split(" ")[0], "ph": "X", "pid": 1, "tid": s.thread,
                           "ts": round(s.start_s * 1e6, 3), "dur": round(s.dur_s * 1e6, 3), "args": s.args})
        return events

    def to_chrome_trace(self, path: str | Path) -> None:
        """Chrome trace event format: complete ("X") events in microseconds."""
        Path(path).write_text(json.dumps({"traceEvents": self.chrome_events(), "displayTimeUnit": "ms",
                                          "otherData": {"flashinfer": {k: v for k, v in self.run.items()
                                                                       if k != "plan"}}}))


class Tracer:
    """Collects a Trace while the engine runs; the hooks below are what the engine calls."""

    def __init__(self, n_layers: int, capacities: list[int] | None = None):
        self.trace = Trace(n_layers)
        self.capacities = capacities
        self._t0 = time.perf_counter()
        self._step: StepRecord | None = None
        self._step_start = 0.0
        self._current: dict[int, LayerRecord] = {}
        self._lock = threading.Lock()  # read-ahead threads add spans and bytes too

    def now(self) -> float:
        return time.perf_counter()

    # ---- steps --------------------------------------------------------------------------
    def begin_step(self, phase: str, tokens: int) -> None:
        self._step = StepRecord(len(self.trace.steps), phase, tokens)
        self._step_start = self.now()
        self._current = {}

    def end_step(self, token_id: int | None, sample_s: float) -> None:
        step = self._step
        end = self.now()
        step.wall_s, step.sample_s, step.token_id = end - self._step_start, sample_s, token_id
        self.trace.steps.append(step)
        name = "prefill" if step.phase == "prefill" else f"decode {step.step}"
        self.span(name, self._step_start, end, tokens=step.tokens, token_id=token_id)
        with self._lock:
            self.trace.layers.extend(self._current[i] for i in sorted(self._current))
        self._step = None

    def layer(self, layer: int) -> LayerRecord:
        """This step's record of `layer` (created on first use)."""
        record = self._current.get(layer)
        if record is None:
            step = self._step.step if self._step is not None else -1
            record = self._current[layer] = LayerRecord(step, layer)
        return record

    def span(self, name: str, start: float, end: float, thread: int = COMPUTE_THREAD, **args) -> None:
        with self._lock:
            self.trace.spans.append(Span(name, start - self._t0, end - start, thread, args))

    # ---- hooks ----------------------------------------------------------------------------
    def attention(self, layer: int, start: float, end: float, tokens: int) -> None:
        r = self.layer(layer)
        r.attn_s += end - start
        r.tokens += tokens  # prefill: summed over its chunks
        self.span(f"attention L{layer}", start, end)

    def ffn_part(self, layer: int, kind: str, start: float, end: float, **args) -> None:
        """kind: "predict" | "mm" (cache bookkeeping) | "read" (waiting for flash) | "ffn" (kernel)."""
        r = self.layer(layer)
        setattr(r, f"{kind}_s", getattr(r, f"{kind}_s") + (end - start))
        self.span(f"{kind} L{layer}", start, end, **args)

    def neurons(self, layer: int, predicted: int, misses: int, evicted: int, occupancy: int, capacity: int,
                bytes_read: int) -> None:
        r = self.layer(layer)
        r.predicted += predicted
        r.misses += misses
        r.hits += predicted - misses
        r.evicted += evicted
        r.bytes_read += bytes_read
        r.occupancy, r.capacity = occupancy, capacity

    def read_ahead(self, layer: int, step_layer: LayerRecord, neurons: int, bytes_read: int,
                   start: float, end: float) -> None:
        """A background read for `layer` finished (called from the read-ahead thread)."""
        with self._lock:
            step_layer.prefetched += neurons
            step_layer.bytes_read += bytes_read
        self.span(f"read-ahead L{layer}", start, end, READ_AHEAD_THREAD, neurons=neurons, bytes=bytes_read)
