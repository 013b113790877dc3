"""What the gate predictor costs in quality on a real model (issue 15): SmolLM2-135M-Instruct, the
real Q4_1 GGUF from PyPI, converted with `--ffn-gate rows`.

    python -m bench.gate_quality                          # 0 / 30 / 40 / 50 / 60% of FFN neurons skipped
    python -m bench.gate_quality --sparsities 0.4 --no-llamacpp

For each sparsity S: `calibrate_gate` sets each layer's threshold on |silu(gate . x)| so that a
share S of the calibration tokens' neurons fall under it; then, on held-out text,
  - perplexity over the first --ppl-tokens tokens (Engine.logits, prefill chunks);
  - greedy agreement with the dense FFN of the same store over --agree-tokens tokens: teacher-forced
    (each position fed the dense run's tokens, the share of positions where the argmax is the same)
    and free-running (how many tokens the two greedy continuations share before they part);
  - the share of FFN neurons really skipped per decode token (the SparseFFN's counts).
Row "dense" is the same store with every neuron (S = 0). Rows "oracle" are a ceiling, not a method:
each neuron's exact contribution |act(gate.x) (up.x)| |down| decides (ContributionOracle), which
tells how much of the loss is the gate's fault as a proxy. llama.cpp's perplexity on the same token
ids is the anchor (the GGUF's own weights; the store's down columns are q8, see flashinfer/convert.py).

Calibration text: docstrings of Python stdlib modules (CALIBRATION_MODULES); evaluation text: the
GPL-3 Debian ships (/usr/share/common-licenses/GPL-3): disjoint sources. The store's predictors end
calibrated at --keep (default 0.4), the CLI's default.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from bench import run
from bench.flashinfer_child import teacher_forced_agreement
from bench.machine import machine_line
from bench.texts import stdlib_docstrings
from bench.vs_llamacpp import GPL3, MODELS_DIR, _llamacpp_logits, perplexity
from flashinfer.fetch import fetch

CALIBRATION_MODULES = ("argparse", "subprocess", "pathlib", "collections", "json", "unittest", "logging", "typing")
DEFAULT_SPARSITIES = (0.3, 0.4, 0.5, 0.6)
AGREE_PROMPT_TOKENS = 16


def gate_store(store: Path | None) -> tuple[Path, Path]:
    """(store, gguf): SmolLM2's GGUF fetched and converted with --ffn-gate rows once (out/models)."""
    gguf = fetch("smollm2", MODELS_DIR, log=run.log)
    store = store or MODELS_DIR / "smollm2-gate"
    if not (store / "manifest.json").exists():
        run.sh([*run.FI, "convert", gguf, store, "--ffn-gate", "rows"])
    return store, gguf


class ContributionOracle:
    """Not a method, a ceiling: the gate predictor's engine path with each neuron's exact output
    contribution |act(gate.x) (up.x)| |down| as the test (which needs up.x of every neuron, the
    reads the predictor exists to skip). Per layer a level from the calibration tokens' inputs at
    the same sparsity. Installed over an engine's GatePredictor: it zeroes the coefficients of the
    neurons under the level and sets every threshold to 0, so the kernel skips exactly those."""

    def __init__(self, engine, calibration_ids: list[int], sparsity: float):
        import tempfile

        from flashinfer.calibrate import collect_ffn_inputs, down_column_norms
        from flashinfer.flash_ffn import bundle_views
        from flashinfer.weights import kernel_product

        ffn = engine.model.flash_ffn
        self.predictor, reader = ffn.predictor, ffn.reader
        self.product = kernel_product
        self.ups = [bundle_views(reader.read_bundles(i, np.arange(spec.n_neurons)), spec).up
                    for i, spec in enumerate(ffn.layers)]
        self.down_norms = [down_column_norms(reader, i) for i in range(len(ffn.layers))]
        with tempfile.TemporaryDirectory() as tmp:
            paths = collect_ffn_inputs(engine, calibration_ids, Path(tmp))
            self.levels = [float(np.quantile(self.contribution(i, np.fromfile(p, np.float32).reshape(
                len(calibration_ids), -1))[1], sparsity)) for i, p in enumerate(paths)]
        for t in self.predictor.thresholds:
            t[:] = 0.0
        self.gate_predict = self.predictor.predict
        self.predictor.predict = self.predict

    def contribution(self, layer: int, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x = np.ascontiguousarray(x.reshape(-1, x.shape[-1]), np.float32)
        c = self.predictor.activation(self.product(x, self.predictor.gates[layer], np.zeros(0, np.float32)))
        return c, np.abs(c * self.product(x, self.ups[layer], np.zeros(0, np.float32))) * self.down_norms[layer]

    def predict(self, layer: int, x: np.ndarray) -> np.ndarray:
        c, score = self.contribution(layer, x)
        c[score <= self.levels[layer]] = 0.0
        self.predictor._coefficients[layer] = c
        return np.flatnonzero((c != 0).any(axis=0))


def measure(store: Path, predictor: str, eval_ids: list[int], prompt: list[int], reference: list[int] | None,
            n_agree: int, oracle: tuple[list[int], float] | None = None) -> dict:
    """`oracle`: (calibration ids, sparsity) to measure the ContributionOracle instead."""
    from flashinfer import Engine

    with Engine.open(store, predictor=predictor, ctx=max(len(eval_ids), len(prompt) + n_agree) + 8) as engine:
        if oracle is not None:
            ContributionOracle(engine, *oracle)
        ppl = perplexity(engine.logits(eval_ids), eval_ids)
        greedy = engine.generate(prompt, max_tokens=n_agree, temperature=0).token_ids
        row = {"perplexity": ppl, "greedy": greedy}
        if reference is not None:
            ffn = engine.model.flash_ffn
            ffn.reset()
            row["teacher_forced"] = teacher_forced_agreement(engine, prompt, reference)
            decoded = len(prompt) - 1 + len(reference)  # decode steps of teacher_forced_agreement
            total = sum(spec.n_neurons for spec in ffn.layers) * decoded
            row["skipped"] = 1.0 - ffn.stats.predicted / total
            same = 0
            for a, b in zip(greedy, reference):
                if a != b:
                    break
                same += 1
            row["free_prefix"] = same
        return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", type=Path, default=None, help="a SmolLM2 store made with --ffn-gate rows")
    parser.add_argument("--sparsities", default=",".join(map(str, DEFAULT_SPARSITIES)))
    parser.add_argument("--cal-tokens", type=int, default=2048)
    parser.add_argument("--ppl-tokens", type=int, default=1024)
    parser.add_argument("--agree-tokens", type=int, default=128)
    parser.add_argument("--allocations", default="global,uniform",
                        help="how calibrate_gate shares the skipped neurons among layers (global, uniform)")
    parser.add_argument("--keep", type=float, default=0.4, help="the sparsity the store is left calibrated at")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--no-oracle", dest="oracle", action="store_false",
                        help="skip the ceiling rows (ContributionOracle: each neuron's exact contribution decides)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here too")
    opts = parser.parse_args(argv)
    from flashinfer import Engine
    from flashinfer.calibrate import calibrate_gate

    command = "python -m bench.gate_quality " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))
    print(f"command: {command}\nmachine: {machine_line()}\ndate: {datetime.date.today()}")
    store, gguf = gate_store(opts.store)
    if not GPL3.is_file():
        raise SystemExit(f"error: the evaluation text {GPL3} is missing (Debian's base-files ships it)")
    calibration = stdlib_docstrings(CALIBRATION_MODULES)
    with Engine.open(store) as engine:
        eval_ids = engine.tokenize(GPL3.read_text())[: opts.ppl_tokens]
        cal_count = min(len(engine.tokenize(calibration)), opts.cal_tokens)
    prompt = eval_ids[:AGREE_PROMPT_TOKENS]
    print(f"store: {store}\ncalibration: {cal_count} tokens of docstrings of {', '.join(CALIBRATION_MODULES)}\n"
          f"evaluation: the first {len(eval_ids)} tokens of {GPL3}; agreement: {opts.agree_tokens} greedy tokens "
          f"after its first {AGREE_PROMPT_TOKENS}")
    dense = measure(store, "dense", eval_ids, prompt, None, opts.agree_tokens)
    rows = [{"config": "dense (0%)", "sparsity": 0.0, **dense, "teacher_forced": 1.0, "free_prefix": opts.agree_tokens,
             "skipped": 0.0}]
    sparsities = [float(s) for s in opts.sparsities.split(",") if s]
    for s in sparsities:
        for allocation in opts.allocations.split(","):
            calibrate_gate(store, calibration, sparsity=s, max_tokens=opts.cal_tokens, allocation=allocation)
            row = measure(store, "gate", eval_ids, prompt, dense["greedy"], opts.agree_tokens)
            rows.append({"config": f"gate {s:.0%}, {allocation}", "sparsity": s, **row})
    oracle_ids = None
    if opts.oracle:
        with Engine.open(store) as engine:
            oracle_ids = engine.tokenize(calibration)[: opts.cal_tokens]
    for s in sparsities if opts.oracle else ():
        row = measure(store, "gate", eval_ids, prompt, dense["greedy"], opts.agree_tokens, (oracle_ids, s))
        rows.append({"config": f"oracle {s:.0%} (ceiling: exact contributions)", "sparsity": s, **row})
    if opts.keep not in sparsities[-1:]:
        calibrate_gate(store, calibration, sparsity=opts.keep, max_tokens=opts.cal_tokens)
    anchor = None
    if not opts.no_llamacpp:
        logits, _ = _llamacpp_logits({"gguf": str(gguf), "threads": 2}, eval_ids)
        anchor = perplexity(logits, eval_ids)
    base = rows[0]["perplexity"]
    print("\n| config | FFN neurons skipped (decode, measured) | perplexity | vs dense | teacher-forced agreement "
          "| greedy tokens equal before the first difference |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['skipped']:.1%} | {r['perplexity']:.3f} | {r['perplexity'] / base - 1:+.2%} | "
              f"{r['teacher_forced']:.3f} | {r['free_prefix']} of {opts.agree_tokens} |")
    if anchor is not None:
        print(f"| llama.cpp, the same GGUF | 0% | {anchor:.3f} | {anchor / base - 1:+.2%} | | |")
    if opts.json:
        opts.json.write_text(json.dumps({"command": command, "rows": [{k: v for k, v in r.items() if k != "greedy"}
                                                                     for r in rows], "llamacpp": anchor}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
