"""The gate predictor of SiLU models (issue 15): the store layout that keeps W_gate apart
(`convert --ffn-gate rows`), the thresholded FFN kernel against its numpy twin, calibration, the
engine's path, and every refusal."""

import json
from pathlib import Path

import numpy as np
import pytest

from flashinfer import Engine
from flashinfer import kernels as K
from flashinfer.calibrate import calibrate_gate
from flashinfer.cli import main
from flashinfer.convert import convert_checkpoint
from flashinfer.errors import ConfigError, FlashinferError, FormatError, GenerationError
from storage import quant
from storage.format import Manifest
from tests import reference as ref
from tests.conftest import FIXTURES
from tests.test_kernels import _bundle_views, randn, seen_input

TEXT = ("The quick brown fox jumps over the lazy dog while the five boxing wizards jump quickly. " * 30)


# ---- the kernel ------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,down_scheme", [("q8", "q8"), ("q4a", "q8"), ("f16", "f16")])
@pytest.mark.parametrize("n_tokens", [1, 5])
def test_ffn_rows_coef_matches_its_twin(scheme, down_scheme, n_tokens):
    from flashinfer.flash_ffn import PartialSums, ffn_over_selected

    n, dim, rows = 80, 64, 50
    weights = {"up": randn(rows, dim), "down": randn(rows, dim)}
    v = _bundle_views(weights, {"up": scheme, "down": down_scheme})
    ids = np.random.default_rng(1).permutation(n)[:rows].astype(np.int32)  # row r holds neuron ids[r]
    coefs = randn(n_tokens, n)
    thresholds = np.abs(randn(n)).astype(np.float32) * 0.7  # about half the neurons skipped per token
    x = randn(n_tokens, dim)
    deq = lambda w, s: quant.dequantize(quant.quantize(w, s, 32))  # noqa: E731
    expected = ref.ffn_coef(seen_input(x, scheme), ids, coefs, thresholds, deq(weights["up"], scheme),
                            np.zeros(0, np.float32), deq(weights["down"], down_scheme))
    for partial in (None, PartialSums(dim)):
        out = np.full((n_tokens, dim), np.nan, np.float32)
        ffn_over_selected(x, rows, ids, coefs, thresholds, v, out, partial)
        np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    # every neuron under its threshold: nothing is computed, the output is zero
    out = np.full((n_tokens, dim), np.nan, np.float32)
    ffn_over_selected(x, rows, ids, coefs, np.full(n, np.inf, np.float32), v, out)
    assert not out.any()


def test_activate_in_place_is_the_ffn_activation():
    g = randn(3, 40)
    a = g.copy()
    K.activate_(a, K.ACT_SILU)
    np.testing.assert_allclose(a, ref.silu(g), rtol=1e-5, atol=1e-6)


# ---- the store layout --------------------------------------------------------------------

@pytest.fixture(scope="module")
def gate_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("gate")
    store = convert_checkpoint(FIXTURES / "llama", root / "gate", quant="q8", resident_quant="q8", ffn_gate="rows")
    columns = convert_checkpoint(FIXTURES / "llama", root / "columns", quant="q8", resident_quant="q8",
                                 ffn_down="columns")
    return store, columns


def test_gate_rows_layout_keeps_w_gate_after_the_bundles(gate_store):
    store, columns = gate_store
    m = Manifest.load(store)
    assert m.version == 2 and m.quant["ffn_gate"] == "rows" and m.quant["ffn_down"] == "columns"
    for layer in m.ffn_layers:
        assert [c.name for c in layer.components] == ["up", "down"]
        gate = layer.matrix("gate")
        assert gate is not None and gate.shape == (layer.n_neurons, layer.components[0].length)
    # bundles a third smaller: a selected neuron reads its up row and down column only
    assert m.ffn_layers[0].bundle_bytes < Manifest.load(columns).ffn_layers[0].bundle_bytes
    # the dense FFN of the gate layout computes what the bundled layout does
    ids = list(range(5, 40))
    with Engine.open(store) as a, Engine.open(columns) as b:
        np.testing.assert_allclose(a.logits(ids), b.logits(ids), rtol=1e-4, atol=1e-4)


def test_gate_rows_refuses_what_it_cannot_lay_out(tmp_path):
    with pytest.raises(ConfigError, match="drop --ffn-down rows"):
        convert_checkpoint(FIXTURES / "llama", tmp_path / "a", ffn_gate="rows", ffn_down="rows")
    with pytest.raises(ConfigError, match="this model's FFN has no gate"):
        convert_checkpoint(FIXTURES / "opt", tmp_path / "b", ffn_gate="rows")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---- calibration and the engine ----------------------------------------------------------

@pytest.fixture(scope="module")
def calibrated(gate_store):
    store, _ = gate_store
    return store, calibrate_gate(store, TEXT, sparsity=0.4, max_tokens=600)


def test_calibration_skips_the_share_asked_for_on_held_out_tokens(calibrated):
    store, reports = calibrated
    report = json.loads((store / "predictors" / "gate.json").read_text())
    assert report["sparsity"] == 0.4 and len(report["layers"]) == len(reports) == 2
    for r in reports:  # thresholds from the first 80% of the tokens, measured on the last 20%
        assert 0.25 < r.skipped < 0.55 and r.fraction == pytest.approx(1 - r.skipped)
        assert 0.5 < r.mass_recall < 1.0  # the skipped neurons carried some of the output, not most
    assert main(["check", str(store)]) == 0


def test_gate_predictor_skips_neurons_and_is_exact_when_nothing_is_skipped(calibrated):
    store, _ = calibrated
    ids = list(range(3, 30))
    with Engine.open(store) as dense:
        expected = dense.logits(ids)
        reference = dense.generate(ids[:8], max_tokens=6, temperature=0).token_ids
    with Engine.open(store, predictor="gate") as engine:
        ffn = engine.model.flash_ffn
        assert ffn.predictor.name == "gate"
        engine.generate(ids[:8], max_tokens=6, temperature=0)
        n = sum(spec.n_neurons for spec in ffn.layers)
        skipped = 1 - ffn.stats.predicted / (n * (1 + 5))  # the prefill chunk's union, then 5 decode steps
        assert 0.1 < skipped < 0.6
        sparse = engine.logits(ids)
        assert not np.allclose(sparse, expected, atol=1e-3)  # skipping changes the output...
        for t in ffn.predictor.thresholds:
            t[:] = -1.0  # ...and with no neuron under its threshold the gate path is the dense FFN
        np.testing.assert_allclose(engine.logits(ids), expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())
        assert engine.generate(ids[:8], max_tokens=6, temperature=0).token_ids == reference


def test_cli_calibrates_and_runs_the_gate_predictor(calibrated, tmp_path, capsys):
    store, _ = calibrated
    text = tmp_path / "cal.txt"
    text.write_text(TEXT)
    assert main(["calibrate", str(store), "--text", str(text), "--tokens", "600", "--sparsity", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "threshold" in out and "mass kept" in out and "skipping 30%" in out
    assert main(["run", str(store), "--prompt", "the fox", "--max-tokens", "4", "--predictor", "gate"]) == 0
    for bad in ("0", "1", "1.5", "-0.2"):
        assert main(["calibrate", str(store), "--text", str(text), "--sparsity", bad]) == 2
        assert "must lie strictly between 0 and 1" in capsys.readouterr().err


# ---- refusals --------------------------------------------------------------------------

def test_gate_predictor_refusals(gate_store, tmp_path, capsys):
    store, columns = gate_store
    with pytest.raises(GenerationError, match=r"keeps the gate in its bundles. Convert the model again with "
                                              r"`flashinfer convert MODEL OUT --ffn-gate rows`"):
        Engine.open(columns, predictor="gate")
    fresh = convert_checkpoint(FIXTURES / "llama", tmp_path / "fresh", quant="q8", resident_quant="q8",
                               ffn_gate="rows")
    with pytest.raises(GenerationError, match=r"no calibrated gate thresholds .*--sparsity 0.4` first"):
        Engine.open(fresh, predictor="gate")
    relu = convert_checkpoint(FIXTURES / "relu_llama", tmp_path / "relu", quant="q8", resident_quant="q8")
    with pytest.raises(GenerationError, match="this model's FFN is ReLU, whose zeros the lowrank predictor finds"):
        Engine.open(relu, predictor="gate")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    assert main(["calibrate", str(relu), "--text", str(text), "--sparsity", "0.4"]) == 2
    assert "--sparsity applies to SiLU/GELU models" in capsys.readouterr().err
    with pytest.raises(FlashinferError, match="keeps the gate in its bundles"):
        calibrate_gate(columns, TEXT)


def test_damaged_thresholds_are_refused(calibrated, tmp_path):
    from predictors.sparsity import GatePredictor

    store, _ = calibrated
    np.savez(tmp_path / "short.npz", n_layers=1, sparsity=np.float32(0.4), t0=np.zeros(3, np.float32))
    with pytest.raises(FormatError, match="1 layers, the store has 2"):
        GatePredictor.load_thresholds(tmp_path / "short.npz", [192, 192])
    np.savez(tmp_path / "bad.npz", n_layers=1, sparsity=np.float32(1.5), t0=np.zeros(3, np.float32))
    with pytest.raises(FormatError, match=r"sparsity 1.5 is not in \(0, 1\)"):
        GatePredictor.load_thresholds(tmp_path / "bad.npz", [3])


def test_a_model_opened_for_the_gate_predictor_converts_into_its_layout():
    # an HF dir (or a GGUF) with predictor="gate" converts once into the cache with --ffn-gate rows,
    # then names the calibration that store needs
    with pytest.raises(GenerationError) as e:
        Engine.open(FIXTURES / "llama", predictor="gate")
    message = str(e.value)
    assert "no calibrated gate thresholds" in message and "--sparsity 0.4` first" in message
    store = Path(message.split(": no calibrated")[0])
    assert Manifest.load(store).quant["ffn_gate"] == "rows"
    made = (store / "manifest.json").stat().st_mtime_ns
    with pytest.raises(GenerationError, match=str(store)):  # found in the cache, not converted again
        Engine.open(FIXTURES / "llama", predictor="gate")
    assert (store / "manifest.json").stat().st_mtime_ns == made
    # convert's default options name another entry: a cached store is made with one set of options
    from flashinfer.store_cache import ConvertOptions, cache_entry

    assert cache_entry(FIXTURES / "llama", ConvertOptions()) != store
    assert cache_entry(FIXTURES / "llama", ConvertOptions(ffn_gate="rows")) == store


def test_with_room_for_every_neuron_the_gate_path_reads_each_layer_once(calibrated):
    # no cap: each layer is read whole on first use (long reads, not one request per neuron) and
    # kept across sequences, so a second generation reads nothing and computes what the first did
    store, _ = calibrated
    with Engine.open(store, predictor="gate") as engine:
        ffn = engine.model.flash_ffn
        assert all(ffn.whole_layer) and all(c.n == c.capacity for c in ffn.caches)  # the warm-up read them
        first = engine.generate("the fox", max_tokens=8, temperature=0)
        assert ffn.stats.loaded == 0 and ffn.stats.hit_rate == 1.0
        assert engine.generate("the fox", max_tokens=8, temperature=0).token_ids == first.token_ids
        assert ffn.stats.loaded == 0 and all(c.n == c.capacity for c in ffn.caches)


def test_rows_committed_without_a_prediction_stay_in_the_window():
    from flashinfer.cache import NeuronCache

    cache = NeuronCache(8, 4, 8, window=3)
    cache.step(np.array([1, 2]))
    cache.commit(np.array([1, 2]))
    cache.commit_unpredicted(np.array([0, 5]))  # read up front, never predicted
    _, evicted = cache.step(np.array([1]))
    assert evicted.size == 0  # the initial stamp would have put 0 and 5 out of the window here
    for _ in range(3):
        _, evicted = cache.step(np.array([1]))
    assert set(cache.resident_ids()) == {1} and cache.check() is None


# ---- under a cap that cannot keep every layer: whole layers streamed with their W_gate ------

def test_streamed_layers_compute_what_the_cached_path_does(calibrated, monkeypatch):
    from flashinfer import engine as engine_module
    from flashinfer.flash_ffn import FlashFFN
    from tests.conftest import roomy_cap

    store, _ = calibrated
    ids = list(range(3, 30))
    with Engine.open(store, predictor="gate") as engine:
        expected, tokens = engine.logits(ids), engine.generate(ids[:8], max_tokens=6, temperature=0).token_ids
    monkeypatch.setattr(engine_module, "_gate_layers_fit", lambda *a, **k: False)
    with Engine.open(store, predictor="gate", dram=roomy_cap()) as engine:
        ffn = engine.model.flash_ffn
        assert isinstance(ffn, FlashFFN) and ffn.gate is not None and ffn.gate.gates == []
        assert ffn.resident == frozenset(range(len(ffn.layers)))  # a roomy cap: every layer stays
        assert engine.memory_plan.predictor_bytes == sum(t.nbytes for t in ffn.gate.thresholds)
        np.testing.assert_allclose(engine.logits(ids), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        assert engine.generate(ids[:8], max_tokens=6, temperature=0).token_ids == tokens
        result = engine.generate(ids[:8], max_tokens=6, temperature=0, trace=True)
        layers = engine.last_trace.summary()["layers"]
        assert all(0.3 < row["predicted_per_token"] / spec.n_neurons < 0.9 for row, spec in zip(layers, ffn.layers))
        assert result.token_ids == tokens
        from flashinfer.profile_report import summary_table

        trace = engine.last_trace
        assert trace.run["predictor"] == "gate"
        assert "gate predictor over whole FFN layers: 2 of 2 layers resident" in summary_table(trace.summary(), trace.run)
    with Engine.open(store, predictor="gate", dram=roomy_cap()) as engine:  # the same, streamed one ahead
        kept = engine.model.flash_ffn
        engine.model.flash_ffn = FlashFFN(kept.reader, engine.args, frozenset(), read_ahead=True, gate=kept.gate)
        np.testing.assert_allclose(engine.logits(ids), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
        assert engine.generate(ids[:8], max_tokens=6, temperature=0).token_ids == tokens


def test_the_gate_path_streams_layers_when_the_cap_cannot_keep_them_all(tmp_path, monkeypatch):
    from flashinfer.config import ModelArgs
    from flashinfer.engine import _gate_layers_fit
    from storage import synth
    from storage.reader import StoreReader

    monkeypatch.setitem(synth.PRESETS, "tiny-silu-6", synth.SynthShape("llama", 64, 6, 4, 4, 256, 512, 512, act="silu"))
    synth.synthesize("tiny-silu-6", tmp_path / "hf")
    store = convert_checkpoint(tmp_path / "hf", tmp_path / "store", quant="q8", resident_quant="q8", ffn_gate="rows")
    with StoreReader(store) as reader:
        args = ModelArgs.from_dict(reader.manifest.model_config)
        fit = lambda cap: _gate_layers_fit(reader, args, 64, cap_bytes=cap, runtime_bytes=0, kv_cache="f16")  # noqa: E731
        assert fit(1 << 40) and not fit(1 << 20)
        lo, hi = 1 << 20, 1 << 40  # the least cap that keeps every layer whole, gates and all
        while hi - lo > 1:
            lo, hi = (lo, (lo + hi) // 2) if fit((lo + hi) // 2) else ((lo + hi) // 2, hi)
        layers = reader.manifest.ffn_layers
        whole = sum(spec.n_neurons * (spec.bundle_bytes + 4) + spec.matrix("gate").nbytes for spec in layers)
        assert hi > whole  # it takes the layers' bundles and gates (and more: runtime, KV, buffers)
        assert not fit(hi - whole // 12)  # a sixth of a layer short: the layers stream


def test_with_no_cap_and_little_free_memory_the_gate_path_streams_layers(calibrated, monkeypatch):
    from flashinfer import memory
    from flashinfer.flash_ffn import FlashFFN

    store, _ = calibrated
    ids = list(range(3, 30))
    with Engine.open(store, predictor="gate") as engine:
        expected = engine.logits(ids)
    layer_bytes = memory.ffn_layer_bytes(Manifest.load(store).ffn_layers[0])
    monkeypatch.setattr(memory, "free_memory_budget", lambda: layer_bytes + 1)  # room for one layer
    with Engine.open(store, predictor="gate") as engine:
        ffn = engine.model.flash_ffn
        assert isinstance(ffn, FlashFFN) and ffn.gate is not None and ffn.resident == frozenset({0})
        np.testing.assert_allclose(engine.logits(ids), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
