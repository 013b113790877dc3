"""How good |act(gate . x)| is as a proxy of a SwiGLU neuron's contribution, and whether cheap
corrections close the gap (issue 15: the gate predictor misses its quality target on SmolLM2
while the exact-contribution oracle meets it). Offline numpy on a store made with --ffn-gate rows:

    python -m bench.gate_proxy                       # SmolLM2-135M (bench.gate_quality's store)
    python -m bench.gate_proxy --layers 3,15,27 --sparsity 0.4

Per layer, on held-out tokens (FFN inputs of the GPL-3's first 1024 tokens; statistics from the
same calibration docstrings as bench.gate_quality), at `--sparsity` of the neurons skipped:
  - err: the relative error of the FFN output, mean over tokens of ||y - y_kept|| / ||y||,
    for the gate predictor's test (|c| s_i, predictors.sparsity.GatePredictor) and for the
    oracle (each neuron's exact |c (up . x)| |down|, which needs every up row);
  - corr: the mean over neurons of |corr(gate . x, up . x)|: how much of up . x the gate
    itself tells (a per-neuron regression of |up . x| on the gate can use no more);
  - lowrank r: the skipped neurons not dropped but estimated, c (up . x)~ with up . x from a
    rank-r factorisation of W_up (whitened by the inputs' covariance), and their down columns
    exact ("exact down": what a layout reading every down column would allow) or rank r too
    (what a predictor kept resident could hold).
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench.gate_quality import CALIBRATION_MODULES, gate_store
from bench.machine import machine_line
from bench.texts import stdlib_docstrings
from bench.vs_llamacpp import GPL3

RANKS = (64, 128)


def relative_error(y: np.ndarray, approx: np.ndarray) -> float:
    return float(np.linalg.norm(y - approx, axis=1).mean() / np.linalg.norm(y, axis=1).mean())


def layer_row(w_gate, w_up, w_down, act, x_cal, x_eval, sparsity: float) -> dict:
    """w_down: [dim, n_neurons] (its columns are the neurons')."""
    g_cal, u_cal, g, u = x_cal @ w_gate.T, x_cal @ w_up.T, x_eval @ w_gate.T, x_eval @ w_up.T
    c_cal, c = act(g_cal), act(g)
    down_norms = np.linalg.norm(w_down, axis=0)
    y = (c * u) @ w_down.T
    scale = np.abs(u_cal).mean(axis=0) * down_norms  # s_i, as calibrate_gate sets it
    kept = np.abs(c) * scale > np.quantile(np.abs(c_cal) * scale, sparsity)
    exact = np.abs(c * u) * down_norms
    oracle_kept = exact > np.quantile(np.abs(c_cal * u_cal) * down_norms, sparsity)
    corr = np.mean([abs(np.corrcoef(g_cal[:, j], u_cal[:, j])[0, 1]) for j in range(g_cal.shape[1])])
    row = {"skipped": float(1 - kept.mean()), "err_gate": relative_error(y, (c * u * kept) @ w_down.T),
           "err_oracle": relative_error(y, (c * u * oracle_kept) @ w_down.T), "corr_gate_up": float(corr)}
    cov = x_cal.T @ x_cal / len(x_cal)
    chol = np.linalg.cholesky(cov + 1e-6 * np.trace(cov) / len(cov) * np.eye(len(cov)))
    left, sv, right = np.linalg.svd(w_up @ chol, full_matrices=False)
    d_left, d_sv, d_right = np.linalg.svd(w_down, full_matrices=False)
    for r in RANKS:
        # W_up ~ A B^T with B = L^-T V_r: up . x ~ (x B) A^T, best in the inputs' metric
        a, b = left[:, :r] * sv[:r], np.linalg.solve(chol.T, right[:r].T)
        u_est = (x_eval @ b) @ a.T
        down_r = (d_left[:, :r] * d_sv[:r]) @ d_right[:r]
        row[f"err_lowrank{r}_exact_down"] = relative_error(y, (c * np.where(kept, u, u_est)) @ w_down.T)
        row[f"err_lowrank{r}"] = relative_error(y, (c * u * kept) @ w_down.T + (c * u_est * ~kept) @ down_r.T)
    return row


def main(argv: list[str] | None = None) -> int:
    from flashinfer import Engine
    from flashinfer.calibrate import (_gate_activation, collect_ffn_inputs, component_values, gate_rows,
                                      layer_bundles)

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None, help="a store made with --ffn-gate rows (default SmolLM2)")
    parser.add_argument("--sparsity", type=float, default=0.4)
    parser.add_argument("--layers", default=None, help="comma-separated layers (default every third)")
    parser.add_argument("--cal-tokens", type=int, default=2048)
    parser.add_argument("--eval-tokens", type=int, default=1024)
    opts = parser.parse_args(argv)
    print(f"command: python -m bench.gate_proxy {' '.join(map(shlex.quote, argv or sys.argv[1:]))}\n"
          f"machine: {machine_line()}\ndate: {datetime.date.today()}")
    store, _ = gate_store(opts.store)
    with Engine.open(store) as engine, tempfile.TemporaryDirectory() as tmp:
        reader, args = engine.model.flash_ffn.reader, engine.args
        act = _gate_activation(args.act)
        cal_ids = engine.tokenize(stdlib_docstrings(CALIBRATION_MODULES))[: opts.cal_tokens]
        eval_ids = engine.tokenize(GPL3.read_text())[: opts.eval_tokens]
        inputs = {}
        for name, ids in (("cal", cal_ids), ("eval", eval_ids)):
            (Path(tmp) / name).mkdir()
            inputs[name] = (collect_ffn_inputs(engine, ids, Path(tmp) / name), len(ids))
        layers = ([int(i) for i in opts.layers.split(",")] if opts.layers else list(range(0, args.n_layers, 3)))
        print(f"store: {store}; {opts.sparsity:.0%} of each layer's neurons skipped; held-out: {len(eval_ids)} "
              f"tokens of {GPL3}\n")
        header = ["layer", "skipped", "err gate", "err oracle", "|corr(g,u)|"]
        header += [f"lowrank{r} exact down" for r in RANKS] + [f"lowrank{r}" for r in RANKS]
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for i in layers:
            spec, bundles = reader.manifest.ffn_layers[i], layer_bundles(reader, i)
            x = {k: np.fromfile(paths[i], np.float32).reshape(n, args.dim) for k, (paths, n) in inputs.items()}
            row = layer_row(gate_rows(reader, i), component_values(bundles, spec, "up"),
                            component_values(bundles, spec, "down").T, act, x["cal"], x["eval"], opts.sparsity)
            cells = [row["skipped"], row["err_gate"], row["err_oracle"], row["corr_gate_up"]]
            cells += [row[f"err_lowrank{r}_exact_down"] for r in RANKS] + [row[f"err_lowrank{r}"] for r in RANKS]
            print(f"| {i} | " + " | ".join(f"{v:.3f}" for v in cells) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
