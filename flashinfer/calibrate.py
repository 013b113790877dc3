"""`flashinfer calibrate`: fit the low-rank sparsity predictors of a store on real text.

1. Run the dense model over the calibration text (FFN streamed from the store, so it works
   under a small DRAM budget) and record every layer's FFN input x — to files in a scratch
   directory inside the store, not to RAM (7B, 2048 tokens: 1 GB of inputs).
2. Layer by layer: read the layer's inputs and bundles, decode the rows that decide activity
   (gate for gated FFNs, up otherwise), compute the true pre-activations z = W x + b, and
   hand (x, z > 0) to predictors.lowrank to fit (rank `rank`, `last_rank` for the last
   `last_layers` layers, where the paper too spends more), its threshold set for `target_recall`
   of the active neurons (`recall_of="neurons"`) or of their activation mass (`"mass"`: each
   active neuron weighted by what it adds to the layer's output, |act| x |up.x| x |down column|);
   report recall, mass recall and predicted/active on held-out tokens.
   The static hot set (predictors.sparsity.StaticPredictor) is fitted on the same masks.
3. Save predictors/lowrank.npz, predictors/static.npz, a JSON report and checksums.json (each
   file's size and blake2b) into the store as one directory, written aside and swapped in
   (storage/atomic.py): a calibration killed at any instant leaves the old predictors or the new
   ones, never a mix. `flashinfer check` verifies them (verify_predictors).

Only ReLU-family models have exact zeros to predict. SiLU/GELU models get the gate predictor
instead (`calibrate_gate`, `--sparsity S`): per neuron, a threshold on |act(gate . x)| such that
a share S of the calibration tokens' neurons fall under theirs (CATS, scaled per neuron by its
typical contribution: predictors.sparsity.GatePredictor); the report gives, on held-out tokens,
the share really skipped and the share of the FFN's output mass |act(gate.x) (up.x)| |down| kept. The store must keep W_gate apart (`flashinfer convert --ffn-gate rows`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from flashinfer.errors import FlashinferError, FormatError
from storage import atomic
from storage.format import file_checksum

PREDICTOR_DIR = "predictors"
LOWRANK_FILE = "lowrank.npz"
REPORT_FILE = "lowrank.json"
STATIC_FILE = "static.npz"
CHECKSUMS_FILE = "checksums.json"
GATE_FILE = "gate.npz"  # the gate predictor's per-layer thresholds (SiLU/GELU models)
GATE_REPORT_FILE = "gate.json"
GATE_ALLOCATIONS = ("global", "uniform")
GATE_LEVEL_SAMPLE = 256  # calibration tokens per layer pooled for the global level (memory: 7B, 32 x 256 x 14336 floats)
DEFAULT_GATE_SPARSITY = 0.4  # share of FFN neurons skipped (CATS' operating point: ~+1% perplexity on 7B models)
STATIC_COVERAGE = 0.9  # the hot set keeps the most frequent neurons until they carry 90% of firings
HELD_OUT_SHARE = 0.2  # last 20% of the calibration tokens measure recall on text the fit did not see
THRESHOLD_SHARE = 0.15  # the 15% before them pick each layer's threshold (predictors/lowrank.py says why)
# neuron-cache sizes (shares of a layer) at which the report gives the share of predicted neurons a
# cache with the engine's default window and pin would still read (cache.simulated_miss_share)
CACHE_TABLE_SHARES = (0.1, 0.15, 0.2, 0.3, 0.5)


@dataclass
class LayerReport:
    layer: int
    recall: float  # share of active neurons predicted (held-out tokens)
    mass_recall: float  # share of the active neurons' activation mass predicted (activation_mass)
    fraction: float  # share of neurons predicted per token
    active: float  # share of neurons active per token (fraction / active: what the predictor over-reads)
    predictor_bytes: int
    rank: int
    origin: str  # "fit" or "svd": which factors won on the threshold tokens (predictors/lowrank.py)
    static_recall: float  # the static hot set on the same held-out tokens
    static_fraction: float
    # per CACHE_TABLE_SHARES: the share of the predicted neurons still read from flash by a cache
    # of that size (held-out tokens, default window and pin; empty in reports made before it)
    cache_miss_shares: tuple[float, ...] = ()


def collect_ffn_inputs(engine, token_ids: list[int], scratch: Path) -> list[Path]:
    """Every layer's FFN input for every token, as float32 [tokens, dim] files in `scratch`
    (one per layer, appended as the forward pass produces them). Returns their paths."""
    n_layers = engine.args.n_layers
    paths = [scratch / f"ffn_input_L{i}.f32" for i in range(n_layers)]
    files = [open(p, "wb") for p in paths]
    model = engine.model
    model.ffn_input_observer = lambda layer, x: files[layer].write(np.ascontiguousarray(x, np.float32).data)
    try:
        ctx = model.ctx
        for start in range(0, len(token_ids), ctx):
            model.reset()
            model.forward(np.asarray(token_ids[start : start + ctx], np.int64))
    finally:
        model.ffn_input_observer = None
        model.reset()
        for f in files:
            f.close()
    return paths


def _start_calibration(engine, text: str, max_tokens: int, out_dir: Path) -> tuple[list[int], Path]:
    """(the calibration's token ids, an empty scratch directory for its FFN inputs), after clearing
    what a killed calibration left (its scratch and staged predictors)."""
    token_ids = engine.tokenize(text)[:max_tokens]
    if len(token_ids) < 64:
        raise FlashinferError(f"calibration text gives {len(token_ids)} tokens; give at least 64 (ideally 1000+)")
    atomic.remove_stale(out_dir)
    scratch = atomic.scratch_dir(out_dir)
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    return token_ids, scratch


def layer_rank(layer: int, n_layers: int, rank: int, last_rank: int | None, last_layers: int) -> int:
    """The predictor rank of `layer`: `last_rank` for the last `last_layers` layers."""
    return last_rank if last_rank is not None and layer >= n_layers - last_layers else rank


def layer_bundles(reader, layer: int) -> np.ndarray:
    """Every bundle of a layer, uint8 [n_neurons, bundle_bytes]."""
    return reader.read_bundles(layer, np.arange(reader.manifest.ffn_layers[layer].n_neurons))


def component_values(bundles: np.ndarray, spec, name: str) -> np.ndarray:
    """Component `name` (up, gate, down) of a layer's bundles as float32 [n_neurons, dim]."""
    from storage import quant

    c = spec.component(name)
    rows = quant.rows_from_records(np.ascontiguousarray(bundles[:, c.offset : c.offset + c.nbytes]),
                                   c.scheme, c.length, c.group_size or 32)
    return quant.dequantize(rows)


def activation_rows(reader, layer: int, gated: bool, bundles: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The rows deciding activity (gate or up) as float32 [n_neurons, dim], and their bias."""
    spec = reader.manifest.ffn_layers[layer]
    bundles = layer_bundles(reader, layer) if bundles is None else bundles
    b = spec.component("gate_bias" if gated else "up_bias")
    bias = None if b is None else np.ascontiguousarray(bundles[:, b.offset : b.offset + 4]).view(np.float32)[:, 0].copy()
    return component_values(bundles, spec, "gate" if gated else "up"), bias


def down_column_norms(reader, layer: int, bundles: np.ndarray | None = None) -> np.ndarray:
    """|W_down[:, i]| per neuron, float32 [n_neurons]: what a unit activation of neuron i adds to
    the layer's output. From the bundles' down columns, or from W_down kept whole as rows
    [dim, n_neurons] (--ffn-down rows). `bundles`: the layer's, when the caller has read them."""
    from storage import quant

    spec = reader.manifest.ffn_layers[layer]
    if spec.component("down") is None:
        return np.linalg.norm(quant.dequantize(reader.matrix_tensor(layer, "down")), axis=0).astype(np.float32)
    bundles = layer_bundles(reader, layer) if bundles is None else bundles
    return np.linalg.norm(component_values(bundles, spec, "down"), axis=1).astype(np.float32)


def activation_mass(reader, layer: int, gated: bool, bundles: np.ndarray, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """What each neuron adds to the layer's output per token, float32 [tokens, n_neurons]:
    relu(z) x |down column| (ungated), x |up . x| too (gated ReLU); 0 where inactive."""
    mass = np.maximum(z, 0) * down_column_norms(reader, layer, bundles)
    if gated:
        mass *= np.abs(x @ component_values(bundles, reader.manifest.ffn_layers[layer], "up").T)
    return mass


RECALL_OF = ("neurons", "mass")


def calibrate_store(store: str | Path, text: str, *, max_tokens: int = 2048, rank: int = 128,
                    last_rank: int | None = None, last_layers: int | None = None, target_recall: float = 0.99,
                    recall_of: str = "neurons", progress=None) -> list[LayerReport]:
    """Fit and save the store's predictors; `last_rank` defaults to 2 x `rank` for the last
    `last_layers` (default an eighth of the layers, at least 1). `recall_of`: what
    `target_recall` is a share of, the active neurons or their activation mass (RECALL_OF)."""
    from flashinfer.engine import Engine
    from predictors.lowrank import fit_lowrank_layer
    from predictors.sparsity import LowRankPredictor, StaticPredictor, recall_report

    if recall_of not in RECALL_OF:
        raise FlashinferError(f"recall_of {recall_of!r} is not one of {', '.join(RECALL_OF)}")
    store = Path(store)
    out_dir = store / PREDICTOR_DIR
    with Engine.open(store) as engine:
        n_layers = engine.args.n_layers
        if engine.args.act != "relu":
            raise FlashinferError(
                f"{store}: calibration fits predictors of exact zeros, which only ReLU-family FFNs have "
                f"(this model uses {engine.args.act}); calibrate its gate thresholds instead "
                f"(`flashinfer calibrate {store} --text FILE --sparsity 0.4`) or run it with --predictor dense"
            )
        last_layers = max(1, n_layers // 8) if last_layers is None else last_layers
        last_rank = 2 * rank if last_rank is None else last_rank
        if not 0 <= last_layers <= n_layers:
            raise FlashinferError(f"last_layers {last_layers}: this model has {n_layers} layers")
        token_ids, scratch = _start_calibration(engine, text, max_tokens, out_dir)
        try:
            input_paths = collect_ffn_inputs(engine, token_ids, scratch)
            split = int(len(token_ids) * (1 - HELD_OUT_SHARE))
            fit_end = int(len(token_ids) * (1 - HELD_OUT_SHARE - THRESHOLD_SHARE))
            layers, hot_sets, reports = [], [], []
            for i, path in enumerate(input_paths):
                x = np.fromfile(path, np.float32).reshape(len(token_ids), engine.args.dim)
                reader, gated = engine.model.flash_ffn.reader, engine.args.gated_ffn
                bundles = layer_bundles(reader, i)
                w_act, bias = activation_rows(reader, i, gated, bundles)
                z = x @ w_act.T + (0 if bias is None else bias)
                mass = activation_mass(reader, i, gated, bundles, x[fit_end:], z[fit_end:])  # threshold and held-out tokens
                del bundles
                r_i = layer_rank(i, n_layers, rank, last_rank, last_layers)
                threshold_data = (x[fit_end:split], z[fit_end:split] > 0)
                if recall_of == "mass":
                    threshold_data += (mass[: split - fit_end],)
                layer = fit_lowrank_layer(w_act, bias, x[:fit_end], z[:fit_end] > 0, rank=r_i, target_recall=target_recall,
                                          threshold_data=threshold_data)
                hot = StaticPredictor.fit([z[:split] > 0], STATIC_COVERAGE).hot_sets[0]
                layers.append(layer)
                hot_sets.append(hot)
                held_x, held_z = x[split:], z[split:]
                held_active, held_mass = held_z > 0, mass[split - fit_end :]
                predicted = LowRankPredictor([layer]).scores(0, held_x) > layer.threshold
                r = recall_report(predicted, held_active, held_mass)
                static_mask = np.zeros(held_z.shape[1], bool)
                static_mask[hot] = True
                st = recall_report(np.broadcast_to(static_mask, held_z.shape), held_active, held_mass)
                reports.append(LayerReport(i, r["recall"], r["mass_recall"], r["fraction"], float(held_active.mean()),
                                           layer.nbytes, r_i, layer.origin, st["recall"], st["fraction"],
                                           cache_miss_shares(predicted)))
                path.unlink()  # done with this layer's inputs: free the disk as we go
                if progress is not None:
                    progress(i + 1, n_layers)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    report = {"tokens": len(token_ids), "held_out_tokens": len(token_ids) - split, "rank": rank,
              "last_rank": last_rank, "last_layers": last_layers, "target_recall": target_recall, "recall_of": recall_of,
              "static_coverage": STATIC_COVERAGE, "cache_shares": CACHE_TABLE_SHARES,
              "layers": [asdict(r) for r in reports]}
    save_predictors(store, {LOWRANK_FILE: LowRankPredictor(layers).save, STATIC_FILE: StaticPredictor(hot_sets).save,
                            REPORT_FILE: lambda p: Path(p).write_text(json.dumps(report, indent=1))})
    return reports


def cache_miss_shares(predicted: np.ndarray) -> tuple[float, ...]:
    """Per CACHE_TABLE_SHARES, the share of `predicted` (bool [tokens, n_neurons]) a neuron cache of
    that size with the engine's default window and pin reads from flash."""
    from flashinfer.cache import simulated_miss_share
    from flashinfer.engine import DEFAULT_PIN, DEFAULT_WINDOW

    n = predicted.shape[1]
    shares = []
    for share in CACHE_TABLE_SHARES:
        capacity = max(1, int(share * n))
        shares.append(simulated_miss_share(predicted, capacity, DEFAULT_WINDOW, int(DEFAULT_PIN * capacity)))
    return tuple(shares)


@dataclass
class GateLayerReport:
    layer: int
    threshold: float  # T, on |act(gate . x)| s_i (predictors.sparsity.GatePredictor)
    skipped: float  # share of neurons under it per token (held-out tokens)
    fraction: float  # share kept (1 - skipped): what the planner sizes the neuron caches for
    mass_recall: float  # share of sum |act(gate.x) (up.x)| |down| the kept neurons carry (held-out tokens)


def _gate_activation(act: str):
    """The FFN's activation in numpy float32 (calibration only; the engine runs its kernels')."""
    from predictors.sparsity import silu

    if act == "silu":
        return silu
    if act == "gelu_tanh":
        return lambda g: (0.5 * g * (1.0 + np.tanh(0.7978845608028654 * (g + 0.044715 * g ** 3)))).astype(np.float32)
    raise FlashinferError(f"no gate activation for {act!r}")


def gate_rows(reader, layer: int) -> np.ndarray:
    """W_gate of a layer that keeps it whole (--ffn-gate rows) as float32 [n_neurons, dim]."""
    from storage import quant

    return quant.dequantize(reader.matrix_tensor(layer, "gate"))




def check_sparsity(sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 < sparsity < 1.0:
        raise FlashinferError(f"--sparsity {sparsity!r}: the share of FFN neurons to skip must lie strictly between "
                              "0 and 1 (e.g. 0.4)")
    return float(sparsity)


def calibrate_gate(store: str | Path, text: str, *, sparsity: float = DEFAULT_GATE_SPARSITY, max_tokens: int = 2048,
                   allocation: str = "global", progress=None) -> list[GateLayerReport]:
    """Calibrate and save the gate predictor's thresholds of a SiLU/GELU store (module docstring):
    thresholds from the first 80% of the tokens, the report from the last 20%. `allocation`: "global"
    (one level over every layer's scores relative to the layer's output mass: the layers' skipped
    shares differ, their mean is `sparsity`) or "uniform" (each layer skips `sparsity`)."""
    from flashinfer.engine import Engine, _check_gate_store
    from predictors.sparsity import GatePredictor

    sparsity = check_sparsity(sparsity)
    if allocation not in GATE_ALLOCATIONS:
        raise FlashinferError(f"allocation {allocation!r} is not one of {', '.join(GATE_ALLOCATIONS)}")
    store = Path(store)
    out_dir = store / PREDICTOR_DIR
    with Engine.open(store) as engine:
        args = engine.args
        reader = engine.model.flash_ffn.reader
        _check_gate_store(reader, args)
        act = _gate_activation(args.act)
        token_ids, scratch = _start_calibration(engine, text, max_tokens, out_dir)
        try:
            input_paths = collect_ffn_inputs(engine, token_ids, scratch)
            split = int(len(token_ids) * (1 - HELD_OUT_SHARE))
            sample = np.linspace(0, split - 1, min(split, GATE_LEVEL_SAMPLE)).astype(np.int64)

            # Each pass computes a layer's products again rather than keeping them: a 7B's held-out
            # c and up.x alone would take 1.5 GB.
            def layer_terms(i: int):
                x = np.fromfile(input_paths[i], np.float32).reshape(len(token_ids), args.dim)
                c = act(x @ gate_rows(reader, i).T)
                spec, bundles = reader.manifest.ffn_layers[i], layer_bundles(reader, i)  # read once for up and down
                u = x @ component_values(bundles, spec, "up").T
                down_norms = down_column_norms(reader, i, bundles)
                # s_i: neuron i's typical |up . x| times its down column's norm (predictors.sparsity.GatePredictor)
                scale = np.maximum(np.abs(u[:split]).mean(axis=0) * down_norms, 1e-30).astype(np.float32)
                return c, u, down_norms, scale

            # pass 1: each layer's scores |c| s_i relative to its mean output mass per token, so that one
            # level over all layers skips most where a layer's mass is concentrated in few neurons
            masses, levels, pooled = [], [], []  # levels: relative to the layer's mass
            for i in range(args.n_layers):
                c, u, down_norms, scale = layer_terms(i)
                mass = float((np.abs(c[:split] * u[:split]) * down_norms).sum(axis=1).mean()) or 1e-30
                masses.append(mass)
                if allocation == "global":
                    pooled.append((np.abs(c[sample]) * scale / mass).reshape(-1))
                else:
                    levels.append(float(np.quantile(np.abs(c[:split]) * scale / mass, sparsity)))
                if progress is not None:
                    progress(i + 1, 2 * args.n_layers)
            if allocation == "global":
                levels = [float(np.quantile(np.concatenate(pooled), sparsity))] * args.n_layers
                pooled.clear()
            thresholds, reports = [], []
            for i in range(args.n_layers):  # pass 2: the thresholds, and what they do on held-out tokens
                c, u, down_norms, scale = layer_terms(i)
                level = levels[i] * masses[i]
                neuron_thresholds = (level / scale).astype(np.float32)
                held_c = c[split:]
                mass = np.abs(held_c * u[split:]) * down_norms
                kept = np.abs(held_c) > neuron_thresholds
                thresholds.append(neuron_thresholds)
                reports.append(GateLayerReport(i, level, float(1.0 - kept.mean()), float(kept.mean()),
                                               float((mass * kept).sum() / max(mass.sum(), 1e-30))))
                input_paths[i].unlink()
                if progress is not None:
                    progress(args.n_layers + i + 1, 2 * args.n_layers)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    report = {"tokens": len(token_ids), "held_out_tokens": len(token_ids) - split, "sparsity": sparsity,
              "allocation": allocation, "layers": [asdict(r) for r in reports]}
    save_predictors(store, {GATE_FILE: GatePredictor([], thresholds, sparsity=sparsity).save,
                            GATE_REPORT_FILE: lambda p: Path(p).write_text(json.dumps(report, indent=1))})
    return reports


def save_predictors(store: Path, writers: dict) -> Path:
    """Make store/predictors hold exactly the files `writers` write ({name: write(path)}) plus
    checksums.json, in one step (see the module docstring)."""
    target = Path(store) / PREDICTOR_DIR
    staging = atomic.staging_dir(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        for name, write in writers.items():
            write(staging / name)
        sums = {name: {"bytes": (staging / name).stat().st_size, "blake2b": file_checksum(staging / name)}
                for name in writers}
        (staging / CHECKSUMS_FILE).write_text(json.dumps({"files": sums}, indent=1))
        atomic.fsync_tree(staging)
        atomic.replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return target


def verify_predictors(store: Path) -> str | None:
    """Check store/predictors against its checksums.json: a line for `flashinfer check`, None
    without predictors; FormatError naming the first file missing, of another size or damaged."""
    from storage import schema

    folder = Path(store) / PREDICTOR_DIR
    if not folder.is_dir():
        return None
    sums_path = folder / CHECKSUMS_FILE
    fix = f"calibrate again (`flashinfer calibrate {store} --text FILE`)"
    if not sums_path.is_file():
        return (f"predictors: {', '.join(sorted(p.name for p in folder.iterdir()))} without checksums (calibrated by "
                f"an older flashinfer; {fix} to add them)")
    try:
        files = schema.mapping(schema.member(schema.mapping(json.loads(sums_path.read_text()), ""), "files", ""),
                               "files")
        expected = {name: (schema.member(schema.mapping(v, f"files.{name}"), "bytes", f"files.{name}"),
                           schema.member(v, "blake2b", f"files.{name}")) for name, v in files.items()}
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError and SchemaError are ValueErrors
        raise FormatError(f"{sums_path}: not a predictor checksum file ({e}); {fix}") from None
    for name, (size, digest) in expected.items():
        path = folder / name
        if not path.is_file():
            raise FormatError(f"{path}: missing (checksums.json lists it); {fix}")
        if path.stat().st_size != size:
            raise FormatError(f"{path}: {path.stat().st_size} bytes, checksums.json says {size}; {fix}")
        if file_checksum(path) != digest:
            raise FormatError(f"{path}: checksum mismatch, the file is damaged; {fix}")
    return f"predictors: {', '.join(expected)} (checksums match)"
