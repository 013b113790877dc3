"""Temporal locality of FFN neuron activity: how much of a layer's active set a token shares
with the tokens just before it, and so how much a sliding-window neuron cache must reload.

    python -m bench.locality                      # SmolLM2-135M (1024 tokens) + synthetic 7B (128 tokens)
    python -m bench.locality --skip-synthetic --tokens 512
    python -m bench.locality --gates              # SmolLM2's gate statistics, what synth's SwiGLU presets plant

Why: "LLM in a flash" (section 3.1, windowing) keeps in DRAM the neurons active over the last
w tokens and reads from flash only those a new token adds; for OPT-6.7B it reports ~2.4% of
the FFN reloaded per token at w = 5 while ~10% is active. This bench measures the same
figures for the models we run, per layer:

- active share: mean over tokens t of |A_t| / n (A_t: the neurons active on token t);
- overlap with the token k back: mean over t of |A_t ∩ A_{t-k}| / |A_t|, k = 1..5;
- reload at window w: mean over t of |A_t minus (A_{t-1} ∪ ... ∪ A_{t-w})| / n, what a
  window-w cache reads per token (the paper's "reloaded per token");
- s_agg(k): mean over t of |A_{t-k+1} ∪ ... ∪ A_t| / n, the DRAM a window-k cache holds;
- hot-set skew: the share of all activations carried by the 10% / 20% most often active
  neurons, and the share of neurons never active over the text;
- a baseline: the reload at w = 5 if tokens were independent with the same per-neuron firing
  rates p_i, sum_i p_i (1 - p_i)^5 / n. The gap between it and the measured reload is the
  locality that comes from correlation between neighbouring tokens rather than from skew
  (a few always-on neurons also stay in the window).

Models:
- SmolLM2-135M-Instruct (SwiGLU, no exact zeros): neuron i is active on token t when
  |silu(gate_i . x_t) (up_i . x_t)| exceeds the layer's threshold that leaves 90% (and, a
  second column, 60%) of the layer's (token, neuron) pairs off; over the first --tokens tokens
  of the GPL-3 text Debian ships.
- the synthetic mistral-7b-relu store (storage/synth/: random weights, planted sparsity):
  gated ReLU, so active means gate pre-activation > 0, exactly as the oracle predictor decides
  (calibrate.activation_rows); over --synthetic-tokens tokens of word salad (seed 2). Its
  firing rates are planted (power-law hot set), its locality is whatever random weights and
  a 100-word salad give: a control for how much locality skew alone yields.

`--gates` prints instead, per layer of SmolLM2, what storage/synth/presets.py's SwiGLU presets take
their SILU_* defaults from: the share of gate pre-activations > 0, the share of those carried by
the 10% of neurons most often positive, the per-neuron std of the gate over tokens, and at the
gate predictor's 40% / 50% skipped (one |silu(gate.x)| threshold per layer) the kept set's top-10%
share and how much of it has a negative gate.

The FFN inputs are collected through Model.ffn_input_observer during one Engine.logits pass;
the weights are decoded from the store with flashinfer/calibrate.py's helpers, a layer at a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import numpy as np

from bench.machine import machine_line
from bench.texts import word_salad

GPL3 = Path("/usr/share/common-licenses/GPL-3")
SMOLLM2_STORE = Path("out/models/smollm2-auto")
SYNTHETIC_STORE = Path("out/bench/mistral-7b-relu-q4")
RESULTS_JSON = Path(f"bench/results/{datetime.date.today().isoformat()}-locality.json")
OFF_SHARES = (0.9, 0.6)  # SmolLM2: share of (token, neuron) pairs left off by the magnitude threshold
OVERLAP_LAGS = (1, 2, 3, 4, 5)
RELOAD_WINDOWS = (1, 2, 5, 10)
AGG_WINDOWS = (1, 2, 5, 10, 30)
HOT_SHARES = (0.1, 0.2)
BASELINE_WINDOW = 5  # the paper's window, for the independent-tokens baseline
SALAD_SEED = 2


# ---- collecting FFN inputs -----------------------------------------------------------
def collect_ffn_inputs(engine, token_ids: list[int]) -> list[np.ndarray]:
    """Every layer's normed FFN input for every token, float32 [tokens, dim] per layer, in RAM
    (SmolLM2 1024 tokens: 70 MB; 7B 128 tokens: 67 MB). The forward pass runs in prefill
    chunks, so a layer's observer is called once per chunk with that chunk's rows."""
    chunks = [[] for _ in range(engine.args.n_layers)]
    # xb is the run state's buffer, overwritten by the next layer: keep a copy
    engine.model.ffn_input_observer = lambda layer, xb: chunks[layer].append(np.array(xb, np.float32))
    try:
        engine.logits(token_ids)
    finally:
        engine.model.ffn_input_observer = None
    return [np.concatenate(c) for c in chunks]


def open_engine_inputs(store: Path, token_ids_of, ctx: int, **open_kw) -> tuple[list[int], list[np.ndarray], dict]:
    """(token ids, per-layer FFN inputs, the model config) of a store; `token_ids_of(engine)`
    picks the ids. The engine is closed before the weights are decoded, which frees the 7B's
    ~4 GB of resident weights."""
    from flashinfer import Engine

    with Engine.open(store, ctx=ctx, **open_kw) as engine:
        ids = token_ids_of(engine)
        inputs = collect_ffn_inputs(engine, ids)
        return ids, inputs, engine.args


# ---- activity masks ------------------------------------------------------------------
def swiglu_magnitudes(reader, layer: int, x: np.ndarray) -> np.ndarray:
    """|silu(gate . x) (up . x)| float32 [tokens, n_neurons]: each neuron's activation before W_down.
    W_gate from the bundles, or whole from the layer file in a store converted with --ffn-gate rows."""
    from flashinfer.calibrate import component_values, gate_rows, layer_bundles
    from predictors.sparsity import silu

    spec = reader.manifest.ffn_layers[layer]
    bundles = layer_bundles(reader, layer)
    w_gate = gate_rows(reader, layer) if spec.matrix("gate") else component_values(bundles, spec, "gate")
    w_up = component_values(bundles, spec, "up")
    return np.abs(silu(x @ w_gate.T) * (x @ w_up.T))


def relu_mask(reader, layer: int, x: np.ndarray, gated: bool) -> np.ndarray:
    """bool [tokens, n_neurons]: ReLU's exact non-zeros, pre-activation of the gate (or up) row > 0."""
    from flashinfer.calibrate import activation_rows

    w_act, bias = activation_rows(reader, layer, gated)
    z = x @ w_act.T
    if bias is not None:
        z += bias
    return z > 0


def gate_products(reader, layer: int, x: np.ndarray) -> np.ndarray:
    """gate . x float32 [tokens, n_neurons], W_gate whole or from the bundles (as swiglu_magnitudes)."""
    from flashinfer.calibrate import component_values, gate_rows, layer_bundles

    spec = reader.manifest.ffn_layers[layer]
    w_gate = gate_rows(reader, layer) if spec.matrix("gate") else component_values(layer_bundles(reader, layer),
                                                                                   spec, "gate")
    return x @ w_gate.T


def gate_statistics(store: Path, n_tokens: int) -> list[dict[str, float]]:
    """Per layer of a SwiGLU store over the first n_tokens of the GPL-3: the figures synth plants."""
    from predictors.sparsity import silu
    from storage.reader import StoreReader
    from storage.synth import hot10_share

    ids, inputs, _ = open_engine_inputs(store, lambda e: e.tokenize(GPL3.read_text())[:n_tokens],
                                        ctx=max(1100, n_tokens + 1), kv_cache="f32")
    rows = []
    with StoreReader(store) as reader:
        for layer, x in enumerate(inputs):
            g = gate_products(reader, layer, x)
            positive = g > 0
            row = {"layer": layer, "positive": float(positive.mean()),
                   "hot10_of_positives": hot10_share(positive.sum(0).astype(np.float64)),
                   "gate_std_median": float(np.median(g.std(0)))}
            magnitude = np.abs(silu(g))
            for skipped in (0.4, 0.5):
                kept = magnitude > np.quantile(magnitude, skipped)
                row[f"hot10_kept_{skipped:g}"] = hot10_share(kept.sum(0).astype(np.float64))
                row[f"negative_of_kept_{skipped:g}"] = float((kept & ~positive).sum() / kept.sum())
            rows.append(row)
    return rows


# ---- metrics ---------------------------------------------------------------------------
def window_union(mask: np.ndarray, w: int) -> np.ndarray:
    """Row j: A_j ∪ ... ∪ A_{j+w-1}, i.e. the union of the w tokens ending at t = j + w - 1."""
    union = mask[: len(mask) - w + 1].copy()
    for k in range(1, w):
        union |= mask[k : len(mask) - w + 1 + k]
    return union


def overlap(mask: np.ndarray, k: int) -> float:
    """Mean over t >= k of |A_t ∩ A_{t-k}| / |A_t| (tokens with nothing active left out)."""
    now, before = mask[k:], mask[:-k]
    size = now.sum(axis=1)
    shared = (now & before).sum(axis=1)
    has = size > 0
    return float((shared[has] / size[has]).mean()) if has.any() else float("nan")


def reload(mask: np.ndarray, w: int) -> float:
    """Mean over t >= w of |A_t minus the union of the w tokens before| / n."""
    previous = window_union(mask, w)[:-1]  # row j: tokens j .. j+w-1, the window before t = j + w
    return float((mask[w:] & ~previous).mean())


def layer_metrics(mask: np.ndarray) -> dict[str, float]:
    """All figures of one layer's activity mask bool [tokens, n_neurons] (module docstring)."""
    n_tokens, n = mask.shape
    m = {"active": float(mask.mean())}
    m.update({f"overlap_{k}": overlap(mask, k) for k in OVERLAP_LAGS if k < n_tokens})
    m.update({f"reload_{w}": reload(mask, w) for w in RELOAD_WINDOWS if w < n_tokens})
    m.update({f"s_agg_{k}": float(window_union(mask, k).mean()) for k in AGG_WINDOWS if k <= n_tokens})
    counts = mask.sum(axis=0)
    by_count = np.sort(counts)[::-1]
    total = max(int(counts.sum()), 1)
    m.update({f"hot{round(s * 100)}_share": float(by_count[: int(np.ceil(s * n))].sum() / total) for s in HOT_SHARES})
    m["never_active"] = float((counts == 0).mean())
    p = counts / n_tokens
    m[f"independent_reload_{BASELINE_WINDOW}"] = float((p * (1 - p) ** BASELINE_WINDOW).sum() / n)
    return m


def summary(layers: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, min, max}} over layers."""
    return {key: {"mean": float(np.mean(v)), "min": float(np.min(v)), "max": float(np.max(v))}
            for key in layers[0] if key != "layer" for v in [[layer[key] for layer in layers]]}


# ---- the two models --------------------------------------------------------------------
def measure_smollm2(store: Path, n_tokens: int) -> dict[str, dict]:
    """Per-layer metrics of SmolLM2 at each OFF_SHARES threshold: {column name: record}."""
    from storage.reader import StoreReader

    text = GPL3.read_text()
    ids, inputs, args = open_engine_inputs(store, lambda e: e.tokenize(text)[:n_tokens], ctx=max(1100, n_tokens + 1),
                                           kv_cache="f32")
    if args.act == "relu" or not args.gated_ffn or args.ffn_bias:
        raise SystemExit(f"error: {store}: expected a bias-free SwiGLU model, got act={args.act}, "
                         f"gated={args.gated_ffn}, bias={args.ffn_bias}")
    per_share = {s: [] for s in OFF_SHARES}
    thresholds = {s: [] for s in OFF_SHARES}
    with StoreReader(store) as reader:
        for layer, x in enumerate(inputs):
            mag = swiglu_magnitudes(reader, layer, x)
            for s in OFF_SHARES:
                # one threshold per layer: the layers' activation scales differ by orders of magnitude
                t = float(np.quantile(mag, s))
                thresholds[s].append(t)
                per_share[s].append({"layer": layer, **layer_metrics(mag > t)})
    return {f"SmolLM2 {s:.0%} off": {"store": str(store), "tokens": len(ids), "text": str(GPL3),
                                     "rule": f"|silu(gate.x)(up.x)| > the layer's {s:.0%} quantile",
                                     "thresholds": thresholds[s], "layers": per_share[s]} for s in OFF_SHARES}


def measure_synthetic(store: Path, n_tokens: int) -> dict[str, dict]:
    """Per-layer metrics of the synthetic ReLU 7B, decoded one layer at a time (14336 x 4096
    float32 gate rows: 235 MB each, freed before the next)."""
    from storage.reader import StoreReader

    text = word_salad(4 * n_tokens, seed=SALAD_SEED)  # ~1.3 tokens a word: ample
    ids, inputs, args = open_engine_inputs(store, lambda e: e.tokenize(text)[:n_tokens], ctx=max(256, n_tokens + 1))
    if args.act != "relu":
        raise SystemExit(f"error: {store}: expected a ReLU model, got {args.act}")
    layers = []
    with StoreReader(store) as reader:
        for layer in range(args.n_layers):
            layers.append({"layer": layer, **layer_metrics(relu_mask(reader, layer, inputs[layer], args.gated_ffn))})
            inputs[layer] = None
    rule = "gate" if args.gated_ffn else "up"
    return {"synthetic 7B (ReLU)": {"store": str(store), "tokens": len(ids), "text": f"word_salad seed {SALAD_SEED}",
                                    "rule": f"{rule} pre-activation > 0", "layers": layers}}


# ---- output ------------------------------------------------------------------------------
ROWS = ([("active", "active share")]
        + [(f"overlap_{k}", f"overlap with token t-{k}") for k in OVERLAP_LAGS]
        + [(f"reload_{w}", f"reload / token, window {w}") for w in RELOAD_WINDOWS]
        + [(f"independent_reload_{BASELINE_WINDOW}", f"reload, window {BASELINE_WINDOW}, independent tokens")]
        + [(f"s_agg_{k}", f"s_agg({k})") for k in AGG_WINDOWS]
        + [(f"hot{round(s * 100)}_share", f"activations on top {s:.0%} neurons") for s in HOT_SHARES]
        + [("never_active", "neurons never active")])


def cell(stats: dict[str, float] | None) -> str:
    if stats is None:
        return "—"
    return f"{stats['mean']:.1%} ({stats['min']:.1%}–{stats['max']:.1%})"


def print_table(results: dict[str, dict]) -> None:
    columns = list(results)
    print("\nmean over layers (min–max over layers)\n")
    print("| metric | " + " | ".join(f"{c} ({results[c]['tokens']} tok)" for c in columns) + " |")
    print("|---|" + "---|" * len(columns))
    for key, label in ROWS:
        print(f"| {label} | " + " | ".join(cell(results[c]["summary"].get(key)) for c in columns) + " |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1024, help="SmolLM2: tokens of GPL-3")
    parser.add_argument("--synthetic-tokens", type=int, default=128, help="synthetic 7B: tokens of word salad")
    parser.add_argument("--smollm2-store", type=Path, default=SMOLLM2_STORE)
    parser.add_argument("--synthetic-store", type=Path, default=SYNTHETIC_STORE)
    parser.add_argument("--skip-smollm2", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--json", type=Path, default=RESULTS_JSON, help="where the per-layer numbers go")
    parser.add_argument("--gates", action="store_true",
                        help="SmolLM2's gate statistics (what storage/synth/presets.py's SwiGLU presets plant) instead")
    opts = parser.parse_args(argv)
    if opts.gates:
        rows = gate_statistics(opts.smollm2_store, opts.tokens)
        for key in rows[0]:
            if key != "layer":
                values = [r[key] for r in rows]
                print(f"{key:22s} mean {np.mean(values):.3f}  min {np.min(values):.3f}  max {np.max(values):.3f}  "
                      f"first {values[0]:.3f}  middle {values[len(values) // 2]:.3f}  last {values[-1]:.3f}")
        return 0

    command = "python -m bench.locality " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))
    print(f"command: {command}\nmachine: {machine_line()}\ndate: {datetime.date.today()}")
    started = time.perf_counter()
    results = {}
    if not opts.skip_smollm2:
        results.update(measure_smollm2(opts.smollm2_store, opts.tokens))
    if not opts.skip_synthetic:
        results.update(measure_synthetic(opts.synthetic_store, opts.synthetic_tokens))
    for record in results.values():
        record["summary"] = summary(record["layers"])
    print_table(results)
    elapsed_s = time.perf_counter() - started
    print(f"\nruntime: {elapsed_s:.0f} s")
    opts.json.parent.mkdir(parents=True, exist_ok=True)
    opts.json.write_text(json.dumps({"command": command, "machine": machine_line(), "date": str(datetime.date.today()),
                                     "runtime_s": elapsed_s, "results": results}, indent=1))
    print(f"per-layer numbers: {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
