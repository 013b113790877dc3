"""`--predictor auto` (Engine.open(..., predictor="auto")): the FFN source that this disk serves
faster, chosen at open by reading from it.

Under a cap that cannot keep every FFN layer, a token either streams the layers that are not
resident whole (the dense path, read one layer ahead) or reads only its predicted neurons
through the neuron caches (the calibrated low-rank predictor). Which one wins depends on what a
scattered read costs on this disk, and disks differ by an order of magnitude there: on the
2-core VM of bench/RESULTS.md a random 10% of a 7B q4 layer took 74 ms and the whole 99 MB
layer 77-88 ms (the disk serves requests, not bytes: streaming ran 1.5x faster end to end),
while flash whose reads cost their bytes (the paper's, or `--flash-bw 1GB/s`) makes the
selection cost its share and the sparse path faster (the 7B at --flash-bw 1GB/s: 1.85x,
bench/RESULTS.md 2026-12-08). So the choice is measured, not
modelled: a few layers are read both ways through the run's own StoreReader (O_DIRECT, its gap
merging and read sizes, the throttle), and the per-token read time of each plan is estimated
from them.

The sparse path reads what its neuron caches miss: the calibration ran the cache's own policy
over its held-out tokens' predictions at a few cache sizes (lowrank.json's cache_miss_shares),
and the probe reads a random selection of that many neurons at the planned cache size (every
predicted neuron for a calibration made before that table). Compute is left out (the dense
path overlaps its reads with compute, which favours dense, the exact one; measured on the 7B the
estimate overstates the sparse path's reads 1.1-1.5x relative to dense's), and lowrank must win
outright (SPARSE_MARGIN). Only ReLU stores with a calibrated low-rank predictor have a choice: the gate
predictor of a SiLU/GELU model streams whole layers under such a cap too (it saves compute, not
reads, and costs quality), so auto leaves it to be asked for by name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

PROBE_LAYERS = 3  # layers read both ways, spread over those the dense plan streams
PROBE_REPEATS = 2  # each read twice, the faster kept: a shared disk's noise only slows reads
# lowrank where its estimated reads take less than this share of dense's. 1.0, not lower: the
# estimate already leans to dense (the 7B at 2 GB, 2026-12-08: estimated sparse/dense 1.50-1.80 at
# this disk's speed, 0.68-0.87 at --flash-bw 1GB/s; measured end to end 1.58 and 0.54 a token); a
# margin of 0.8 chose dense at 1GB/s, where lowrank ran 1.85x faster.
SPARSE_MARGIN = 1.0


@dataclass(frozen=True)
class PredictorChoice:
    predictor: str  # "dense" or "lowrank": what the engine runs
    reason: str  # one line for the user (the CLI prints it; engine.predictor_choice keeps it)
    dense_ms: float | None = None  # estimated FFN read time per token, layers streamed whole
    sparse_ms: float | None = None  # the same, the neurons each layer's caches would miss read
    probe_s: float = 0.0  # what the measurement took

    def line(self) -> str:
        return f"predictor auto: {self.predictor} ({self.reason})"


def choose_predictor(reader, args, *, ctx: int, cap_bytes: int | None, kv_cache: str, runtime_bytes: int,
                     seed: int = 0) -> PredictorChoice:
    """The predictor `auto` stands for on this store, cap and disk (module docstring)."""
    from flashinfer.calibrate import LOWRANK_FILE, PREDICTOR_DIR, REPORT_FILE
    from flashinfer.engine import _calibrated_share, _plan
    from flashinfer.memory import BudgetError
    from flashinfer.weights import q8_matrix_bytes
    from predictors.sparsity import LowRankPredictor

    layers = reader.manifest.ffn_layers
    if args.act != "relu":
        return PredictorChoice("dense", f"a {args.act} FFN: the gate predictor saves no reads under a cap and "
                                        "costs quality; ask for it with --predictor gate")
    if any(spec.matrix("down") for spec in layers):
        return PredictorChoice("dense", "this store keeps W_down as rows, which neuron reads cannot use "
                                        "(convert with --ffn-down columns for a choice)")
    if not (reader.dir / PREDICTOR_DIR / LOWRANK_FILE).is_file():
        return PredictorChoice("dense", f"no calibrated predictor: `flashinfer calibrate {reader.dir} --text FILE` "
                                        "makes one")
    resident = dense_resident_layers(reader, args, ctx, cap_bytes, kv_cache, runtime_bytes)
    if resident is not None and len(resident) == len(layers):
        return PredictorChoice("dense", "every FFN layer fits in memory: read once, exact")
    capacities = [spec.n_neurons for spec in layers]  # no cap: the caches hold whole layers
    if cap_bytes is not None:
        predictor_bytes = LowRankPredictor.loaded_nbytes(reader.dir / PREDICTOR_DIR / LOWRANK_FILE, q8_matrix_bytes)
        share = _calibrated_share(reader.dir / PREDICTOR_DIR / REPORT_FILE)
        try:
            capacities = _plan(reader, args, ctx, cap_bytes, runtime_bytes, kv_cache, sparse=True,
                               predictor_bytes=predictor_bytes, sparse_share=share).capacities
        except BudgetError:
            if resident is None:  # neither fits: the lowrank refusal says what would
                raise
            return PredictorChoice("dense", "the low-rank predictor's neuron caches do not fit the cap")
    if resident is None:
        return PredictorChoice("lowrank", "the dense path does not fit the cap; the low-rank predictor's caches do")
    streamed = [i for i in range(len(layers)) if i not in set(resident)]
    read_shares, simulated = expected_read_shares(reader, capacities)
    dense_ms, sparse_ms, probe_s = probe_reads(reader, streamed, read_shares, seed)
    dense_token = dense_ms * len(streamed)
    sparse_token = sparse_ms * len(layers)
    what = "the neurons the caches miss" if simulated else "every predicted neuron"
    figures = (f"reads a token, measured: {len(streamed)} whole layers {dense_token:.1f} ms, {what} "
               f"({np.mean(read_shares):.1%} of a layer) in {len(layers)} layers {sparse_token:.1f} ms; "
               f"probe {probe_s:.2f} s")
    if sparse_token < SPARSE_MARGIN * dense_token:
        return PredictorChoice("lowrank", figures, dense_token, sparse_token, probe_s)
    return PredictorChoice("dense", figures, dense_token, sparse_token, probe_s)


def dense_resident_layers(reader, args, ctx: int, cap_bytes: int | None, kv_cache: str,
                          runtime_bytes: int) -> list[int] | None:
    """The FFN layers the dense path would keep resident (the engine's rule: the plan under a
    cap, else the machine's free memory), or None where the dense path does not fit the cap."""
    from flashinfer.engine import _plan
    from flashinfer.memory import BudgetError, dense_resident_layers as resident_of

    plan = None
    if cap_bytes is not None:
        try:
            plan = _plan(reader, args, ctx, cap_bytes, runtime_bytes, kv_cache, sparse=False, predictor_bytes=0,
                         sparse_share=None)
        except BudgetError:
            return None
    return resident_of(reader.manifest.ffn_layers, plan)


def expected_read_shares(reader, capacities: list[int]) -> tuple[list[float], bool]:
    """(per layer the share of its neurons a token reads through neuron caches of `capacities`
    rows, whether the caches' hits are in it): the calibrated predicted share times the share of
    it that the calibration's cache simulation at that size missed (lowrank.json's
    cache_miss_shares, interpolated; default window and pin), or the predicted share alone for a
    report made before the simulation existed."""
    import json

    from flashinfer.calibrate import PREDICTOR_DIR, REPORT_FILE
    from flashinfer.engine import _calibrated_share

    path = reader.dir / PREDICTOR_DIR / REPORT_FILE
    specs = reader.manifest.ffn_layers
    largest = _calibrated_share(path)  # validates the report (a damaged one: FormatError with the fix)
    if largest is None:
        return [1.0] * len(specs), False
    report = json.loads(path.read_text())
    layers = report["layers"]
    if len(layers) != len(specs):
        return [largest] * len(specs), False
    table = report.get("cache_shares")
    simulated = bool(table) and all(len(layer.get("cache_miss_shares") or ()) == len(table) for layer in layers)
    shares = []
    for layer, spec, capacity in zip(layers, specs, capacities):
        miss = float(np.interp(capacity / spec.n_neurons, table, layer["cache_miss_shares"])) if simulated else 1.0
        shares.append(float(layer["fraction"]) * miss)
    return shares, simulated


def probe_reads(reader, layers: list[int], shares: list[float], seed: int = 0) -> tuple[float, float, float]:
    """(ms to read one of `layers` whole, ms to read a random selection of `shares[layer]` of its
    neurons, seconds the probe took): the means over up to PROBE_LAYERS of them, each read
    PROBE_REPEATS times both ways, alternating, the faster of each kept."""
    from storage.reader import aligned_buffer

    t0 = time.perf_counter()
    picks = [layers[int(k)] for k in np.linspace(0, len(layers) - 1, min(PROBE_LAYERS, len(layers)))]
    rng = np.random.default_rng(seed)
    buffer = aligned_buffer(max(reader.layer_file_bytes(i) for i in picks))
    dense, sparse = [], []
    for i in picks:
        n = reader.manifest.ffn_layers[i].n_neurons
        ids = np.sort(rng.choice(n, size=max(1, round(shares[i] * n)), replace=False))
        whole = selection = float("inf")
        for _ in range(PROBE_REPEATS):
            t = time.perf_counter()
            if reader.manifest.ffn_layers[i].compression == "none":
                reader.read_layer(i, buffer)
            else:  # a compressed layer streams as bundles (flash_ffn.FlashFFN)
                reader.read_bundles(i, np.arange(n))
            whole = min(whole, time.perf_counter() - t)
            t = time.perf_counter()
            reader.read_bundles(i, ids)
            selection = min(selection, time.perf_counter() - t)
        dense.append(whole)
        sparse.append(selection)
    del buffer
    return 1e3 * float(np.mean(dense)), 1e3 * float(np.mean(sparse)), time.perf_counter() - t0
