"""`flashinfer calibrate`: fit the low-rank sparsity predictors of a store on real text.

1. Run the dense model over the calibration text (FFN streamed from the store, so it works
   under a small DRAM budget) and record every layer's FFN input x.
2. Layer by layer: read the layer's bundles, decode the rows that decide activity (gate for
   gated FFNs, up otherwise), compute the true pre-activations z = W x + b, and hand
   (x, z > 0) to predictors.lowrank to fit; report recall on held-out tokens.
3. Save predictors/lowrank.npz (and a JSON report) into the store, atomically.

Only ReLU-family models have exact zeros to predict; SiLU models are refused.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flashinfer.errors import FlashinferError

PREDICTOR_DIR = "predictors"
LOWRANK_FILE = "lowrank.npz"
REPORT_FILE = "lowrank.json"
HELD_OUT_SHARE = 0.2  # last 20% of the calibration tokens measure recall on text the fit did not see
THRESHOLD_SHARE = 0.15  # the 15% before them pick each layer's threshold (predictors/lowrank.py says why)


@dataclass
class LayerReport:
    layer: int
    recall: float  # share of active neurons predicted (held-out tokens)
    mass_recall: float  # share of sum |activation| predicted
    fraction: float  # share of neurons predicted per token
    predictor_bytes: int


def collect_ffn_inputs(engine, token_ids: list[int]) -> list[np.ndarray]:
    """Every layer's FFN input for every token: float32 [tokens, dim] per layer."""
    n_layers = engine.args.n_layers
    inputs: list[list[np.ndarray]] = [[] for _ in range(n_layers)]
    model = engine.model
    model.ffn_input_observer = lambda layer, x: inputs[layer].append(x.copy())
    try:
        ctx = model.ctx
        for start in range(0, len(token_ids), ctx):
            model.reset()
            model.forward(np.asarray(token_ids[start : start + ctx], np.int64))
    finally:
        model.ffn_input_observer = None
        model.reset()
    return [np.concatenate(chunks) for chunks in inputs]


def activation_rows(reader, layer: int, gated: bool) -> tuple[np.ndarray, np.ndarray | None]:
    """The rows deciding activity (gate or up) as float32 [n_neurons, dim], and their bias."""
    from storage import quant

    spec = reader.manifest.ffn_layers[layer]
    bundles = reader.read_bundles(layer, np.arange(spec.n_neurons))
    c = spec.component("gate" if gated else "up")
    rows = quant.rows_from_records(np.ascontiguousarray(bundles[:, c.offset : c.offset + c.nbytes]),
                                   c.scheme, c.length, c.group_size or 32)
    b = spec.component("gate_bias" if gated else "up_bias")
    bias = None if b is None else np.ascontiguousarray(bundles[:, b.offset : b.offset + 4]).view(np.float32)[:, 0].copy()
    return quant.dequantize(rows), bias


def calibrate_store(store: str | Path, text: str, *, max_tokens: int = 2048, rank: int = 128,
                    target_recall: float = 0.99, progress=None) -> list[LayerReport]:
    from flashinfer.engine import Engine
    from predictors.lowrank import fit_lowrank_layer
    from predictors.sparsity import LowRankPredictor, recall_report

    store = Path(store)
    with Engine.open(store) as engine:
        if engine.args.act != "relu":
            raise FlashinferError(
                f"{store}: calibration fits predictors of exact zeros, which only ReLU-family FFNs have "
                f"(this model uses {engine.args.act}); run it with --predictor dense"
            )
        token_ids = engine.tokenize(text)[:max_tokens]
        if len(token_ids) < 64:
            raise FlashinferError(f"calibration text gives {len(token_ids)} tokens; give at least 64 (ideally 1000+)")
        inputs = collect_ffn_inputs(engine, token_ids)
        split = int(len(token_ids) * (1 - HELD_OUT_SHARE))
        fit_end = int(len(token_ids) * (1 - HELD_OUT_SHARE - THRESHOLD_SHARE))
        layers, reports = [], []
        for i, x in enumerate(inputs):
            w_act, bias = activation_rows(engine.model.flash_ffn.reader, i, engine.args.gated_ffn)
            z = x @ w_act.T + (0 if bias is None else bias)
            layer = fit_lowrank_layer(w_act, bias, x[:fit_end], z[:fit_end] > 0, rank=rank, target_recall=target_recall,
                                      threshold_data=(x[fit_end:split], z[fit_end:split] > 0))
            layers.append(layer)
            held_x, held_z = x[split:], z[split:]
            predicted = LowRankPredictor([layer]).scores(0, held_x) > layer.threshold
            r = recall_report(predicted, held_z > 0, np.maximum(held_z, 0))
            reports.append(LayerReport(i, r["recall"], r["mass_recall"], r["fraction"], layer.nbytes))
            if progress is not None:
                progress(i + 1, len(inputs))
    out_dir = store / PREDICTOR_DIR
    out_dir.mkdir(exist_ok=True)
    tmp = out_dir / f".{LOWRANK_FILE}.tmp-{os.getpid()}.npz"
    LowRankPredictor(layers).save(tmp)
    os.replace(tmp, out_dir / LOWRANK_FILE)
    report = {"tokens": len(token_ids), "held_out_tokens": len(token_ids) - split, "rank": rank,
              "target_recall": target_recall, "layers": [asdict(r) for r in reports]}
    (out_dir / REPORT_FILE).write_text(json.dumps(report, indent=1))
    return reports
