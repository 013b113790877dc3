"""--predictor auto (flashinfer/auto_predictor.py): dense unless a calibrated low-rank predictor
reads less time's worth on this disk under this cap; the probe reads the store both ways."""

import random

import pytest

from bench.texts import WORDS
from flashinfer import Engine, auto_predictor
from flashinfer.auto_predictor import PROBE_REPEATS, SPARSE_MARGIN, PredictorChoice, choose_predictor, probe_reads
from flashinfer.calibrate import calibrate_store
from flashinfer.convert import convert_checkpoint
from flashinfer.errors import GenerationError
from flashinfer.flash_ffn import FlashFFN
from flashinfer.model import ModelArgs
from flashinfer.sparse_ffn import SparseFFN
from storage.reader import StoreReader
from storage.synth import synthesize


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    """(calibrated ReLU store, the same uncalibrated, a SiLU store)"""
    root = tmp_path_factory.mktemp("auto")
    synthesize("tiny", root / "relu", sparsity=0.9, seed=3)
    plain = convert_checkpoint(root / "relu", root / "plain", quant="q8", resident_quant="q8")
    calibrated = convert_checkpoint(root / "relu", root / "calibrated", quant="q8", resident_quant="q8")
    rng = random.Random(1)
    calibrate_store(calibrated, " ".join(rng.choice(WORDS) for _ in range(1200)), max_tokens=800, rank=16)
    synthesize("tiny-silu", root / "silu", seed=3)
    silu = convert_checkpoint(root / "silu", root / "silu-store", quant="q8", resident_quant="q8")
    return calibrated, plain, silu


def choose(store, cap_bytes=None):
    with StoreReader(store) as reader:
        args = ModelArgs.from_dict(reader.manifest.model_config)
        return choose_predictor(reader, args, ctx=64, cap_bytes=cap_bytes, kv_cache="f16", runtime_bytes=0)


def test_without_a_calibrated_predictor_auto_is_dense_and_says_how_to_make_one(stores):
    _, plain, _ = stores
    choice = choose(plain)
    assert choice.predictor == "dense" and f"flashinfer calibrate {plain} --text FILE" in choice.reason


def test_a_silu_model_is_dense_under_auto(stores):
    choice = choose(stores[2])
    assert choice.predictor == "dense" and "--predictor gate" in choice.reason


def test_with_room_for_every_layer_auto_is_dense_without_a_probe(stores, monkeypatch):
    monkeypatch.setattr(auto_predictor, "probe_reads", lambda *a, **k: pytest.fail("probed"))
    choice = choose(stores[0])
    assert (choice.predictor, choice.dense_ms) == ("dense", None) and "fits" in choice.reason


@pytest.mark.parametrize("dense_layer_ms,sparse_layer_ms,expected", [
    (10.0, 1.0, "lowrank"),  # reads that cost their bytes: a selection is cheap
    (10.0, 9.0, "dense"),  # a disk that serves requests: a scattered selection costs a whole layer
    (10.0, 5.5, "dense"),  # 2 layers' selections 11 ms vs 1 layer whole 10 ms
    (10.0, 4.9, "lowrank"),  # 9.8 ms < 10
])
def test_the_faster_plan_per_token_decides(stores, monkeypatch, dense_layer_ms, sparse_layer_ms, expected):
    """The dense plan streams one of the two layers; lowrank reads both layers' selections."""
    assert SPARSE_MARGIN == 1.0
    monkeypatch.setattr(auto_predictor, "dense_resident_layers", lambda *a: [0])
    probed = []
    monkeypatch.setattr(auto_predictor, "probe_reads", lambda reader, layers, shares, seed=0:
                        probed.append(layers) or (dense_layer_ms, sparse_layer_ms, 0.01))
    choice = choose(stores[0])
    assert probed == [[1]]  # only the layer the dense plan streams
    assert (choice.dense_ms, choice.sparse_ms) == (dense_layer_ms * 1, sparse_layer_ms * 2)
    assert choice.predictor == expected


def test_when_dense_does_not_fit_but_lowrank_does_auto_is_lowrank(stores, monkeypatch):
    monkeypatch.setattr(auto_predictor, "dense_resident_layers", lambda *a: None)
    monkeypatch.setattr(auto_predictor, "probe_reads", lambda *a, **k: pytest.fail("probed"))
    assert choose(stores[0], cap_bytes=2**40).predictor == "lowrank"


def test_the_probe_reads_each_layer_whole_and_a_selection_of_its_share(stores):
    with StoreReader(stores[0]) as reader:
        whole = sum(reader.layer_file_bytes(i) for i in (0, 1))
        dense_ms, sparse_ms, seconds = probe_reads(reader, [0, 1], [0.25, 0.25])
        read = reader.stats.bytes_read
    assert dense_ms > 0 and sparse_ms > 0 and seconds > 0
    # each layer twice whole, plus its selections (at least their bundles, gaps read through)
    assert read >= PROBE_REPEATS * whole * 1.25


@pytest.mark.parametrize("chosen", ["dense", "lowrank"])
def test_engine_runs_what_auto_chose_and_says_so(stores, monkeypatch, chosen):
    monkeypatch.setattr(auto_predictor, "choose_predictor",
                        lambda *a, **k: PredictorChoice(chosen, "as the test says"))
    said = []
    with Engine.open(stores[0], predictor="auto", notify=said.append) as engine:
        assert engine.predictor_choice.predictor == chosen
        assert isinstance(engine.model.flash_ffn, SparseFFN if chosen == "lowrank" else FlashFFN)
        ids = engine.generate("the time of day", max_tokens=6, temperature=0).token_ids
    assert said == [f"predictor auto: {chosen} (as the test says)"]
    with Engine.open(stores[0], predictor=chosen) as named:
        assert named.predictor_choice is None
        assert named.generate("the time of day", max_tokens=6, temperature=0).token_ids == ids


def test_auto_with_the_naive_baseline_is_refused(stores):
    with pytest.raises(GenerationError, match="stream_ffn is the naive baseline"):
        Engine.open(stores[0], predictor="auto", stream_ffn=True)


def test_the_predictor_is_sized_from_its_file_as_it_loads(tmp_path):
    """auto sizes the low-rank predictor for its plan without loading it: the same bytes as loaded
    (B in q8 where the rank is a multiple of the q8 group, float32 where not)."""
    import numpy as np

    from flashinfer.weights import q8_matrix, q8_matrix_bytes
    from predictors.sparsity import LowRankLayer, LowRankPredictor
    from storage.errors import FormatError

    rng = np.random.default_rng(0)
    layers = [LowRankLayer(rng.standard_normal((64, r), dtype=np.float32), rng.standard_normal((r, n), dtype=np.float32),
                           rng.standard_normal(n, dtype=np.float32), 0.5) for r, n in ((32, 96), (16, 80))]
    path = tmp_path / "lowrank.npz"
    LowRankPredictor(layers).save(path)
    loaded = LowRankPredictor.load(path, quantize=q8_matrix)
    assert [m is None for m in loaded.b_quantized] == [False, True]
    assert LowRankPredictor.loaded_nbytes(path, q8_matrix_bytes) == loaded.nbytes
    assert LowRankPredictor.loaded_nbytes(path) == LowRankPredictor.load(path).nbytes
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FormatError, match="calibrate again"):
        LowRankPredictor.loaded_nbytes(path)


def test_the_cache_simulation_counts_what_the_cache_would_read():
    import numpy as np

    from flashinfer.cache import simulated_miss_share

    same = np.zeros((10, 50), bool)
    same[:, :8] = True  # the same 8 neurons every token: read once
    assert simulated_miss_share(same, capacity=10, window=5, pin_capacity=0) == pytest.approx(1 / 10)
    drifting = np.zeros((10, 50), bool)
    for t in range(10):
        drifting[t, 5 * t : 5 * t + 5] = True  # new neurons every token: every one read
    assert simulated_miss_share(drifting, capacity=50, window=5, pin_capacity=0) == 1.0
    # a cache smaller than a token's set reads the overflow every token (scratch), keeps the rest
    assert simulated_miss_share(same, capacity=4, window=5, pin_capacity=0) == pytest.approx((8 + 9 * 4) / 80)


def test_calibration_reports_what_each_cache_size_would_read_and_auto_uses_it(stores):
    import json

    from flashinfer.calibrate import CACHE_TABLE_SHARES, PREDICTOR_DIR, REPORT_FILE
    from flashinfer.auto_predictor import expected_read_shares

    store = stores[0]
    report = json.loads((store / PREDICTOR_DIR / REPORT_FILE).read_text())
    assert report["cache_shares"] == list(CACHE_TABLE_SHARES)
    for layer in report["layers"]:
        misses = layer["cache_miss_shares"]
        assert len(misses) == len(CACHE_TABLE_SHARES) and all(0 < m <= 1 for m in misses)
        assert all(b <= a + 0.02 for a, b in zip(misses, misses[1:]))  # a larger cache reads no more
    with StoreReader(store) as reader:
        n = [spec.n_neurons for spec in reader.manifest.ffn_layers]
        shares, simulated = expected_read_shares(reader, [int(0.2 * k) for k in n])
    assert simulated
    assert shares == pytest.approx([layer["fraction"] * layer["cache_miss_shares"][2] for layer in report["layers"]],
                                   rel=0.05)  # 0.2 of a layer, up to int() rounding


def test_a_report_without_the_cache_table_charges_every_predicted_neuron(stores, tmp_path):
    import json
    import shutil

    from flashinfer.auto_predictor import expected_read_shares
    from flashinfer.calibrate import PREDICTOR_DIR, REPORT_FILE

    old = shutil.copytree(stores[0], tmp_path / "old")
    path = old / PREDICTOR_DIR / REPORT_FILE
    report = json.loads(path.read_text())
    report.pop("cache_shares")
    path.write_text(json.dumps(report))
    with StoreReader(old, verify=False) as reader:
        shares, simulated = expected_read_shares(reader, [1] * len(report["layers"]))
    assert not simulated and shares == [layer["fraction"] for layer in report["layers"]]
