"""Decoding from a store: the fused decode step against the per-kernel path, and stores that keep
W_down as whole rows (format version 2) against ones that keep it as bundle columns."""

import json

import numpy as np
import pytest

from flashinfer import Engine
from flashinfer import kernels as K
from flashinfer.convert import convert_checkpoint
from flashinfer.errors import GenerationError
from storage import format as fmt
from tests.conftest import FIXTURES, decode_fused_and_per_kernel, load_golden
from tests.test_store import QUANT_BOUNDS, _cli_error, stores  # noqa: F401  (module-scoped store fixture)


# GQA + window (W_down as rows, and as columns); Gemma 3's q/k norms, query scale, sandwich norms
# and per-layer windows; ReLU; LayerNorm + biases
@pytest.mark.parametrize("name,down,ffn,resident,kv_cache", [
    # rows at q4 / q8: what `flashinfer run HF_DIR` converts a SiLU model to (kernels compiled once per suite)
    ("mistral", "rows", "q4", "q8", "f16"), ("mistral", "columns", "q4a", "q4", "f16"), ("gemma3", "rows", "q4", "q8", "f16"),
    ("relu_llama", "auto", "q4a", "q4", "f16"), ("opt", "auto", "q8", "q8", "f16"),
    ("mistral", "rows", "q4", "q8", "q8"),  # int8 keys and values with their scales (kernels.LayerKV)
    # cold compiles of their own (~34 s, ~38 s) for the suite's 10-minute bound: opt q8 and
    # relu_llama q4a stay, and relu_llama's q4a shares mistral's columns block
    pytest.param("opt", "auto", "q4a", "q4", "f16", marks=pytest.mark.slow),
    pytest.param("relu_llama", "auto", "q8", "q8", "f16", marks=pytest.mark.slow)])
def test_fused_decode_step_equals_the_per_kernel_path(stores, name, down, ffn, resident, kv_cache,  # noqa: F811
                                                     monkeypatch):
    # kernels.decode_layer (a decode step of a block as one compiled call, used once a block's
    # FFN is resident) gives the logits of model.py's per-kernel path, token by token
    monkeypatch.setenv("FLASHINFER_FUSED_DECODE", "1")  # the suite's default is "0" (tests/conftest.py)
    ids = load_golden(name)["prompt_ids"].tolist()[:12]
    with Engine.open(stores(name, ffn, resident, down=down), kv_cache=kv_cache) as engine:
        model = engine.model
        assert any(model._fusable)
        fused, per_kernel = decode_fused_and_per_kernel(model, ids)
        # the fused steps after each block's first called its machine code, not numba's dispatcher
        # (kernels.compiled_call found the compiled signature: the per-call typing is skipped)
        calls = [operands[0] for operands in model._fused_operands if operands is not None]
        assert calls and all(call is not K.decode_layer for call in calls)
        if K.simd.NATIVE_F16 and K.simd.HAS_VNNI:  # attention's integer matrices ran in lanes (weights.interleave_rows),
            assert model.weights.layers[0].wq.data.ndim == 3  # and a resident W_down's rows (flash_ffn)
            views = model.flash_ffn.resident_views(0)
            assert not views.down_rows or views.down.data.ndim == 3
    np.testing.assert_allclose(fused, per_kernel, rtol=1e-5, atol=1e-5)


def test_the_full_warm_up_runs_what_a_first_turn_runs(stores, monkeypatch):  # noqa: F811
    # Engine.open's default warm-up (the suite runs "first-token", tests/conftest.py): a decode
    # token through the per-kernel path, one through the one-call block (decode_layer, which the
    # blocks take once their FFN is resident), and a two-token prompt, so a first chat turn
    # compiles nothing (before, its first decode token compiled decode_layer: 49 s cold on
    # SmolLM2). The store is the first case above, whose kernels this file has compiled.
    import gc

    from numba.core.registry import CPUDispatcher

    from flashinfer.model import Model

    def signatures():  # type(), not isinstance: gc also holds dead weak proxies (left by tests that
        # compile closures), and isinstance on one raises ReferenceError
        return {id(d): len(d.signatures) for d in gc.get_objects()
                if issubclass(type(d), CPUDispatcher) and d.py_func.__module__.startswith("flashinfer.kernels")}

    monkeypatch.setenv("FLASHINFER_FUSED_DECODE", "1")
    forwarded, forward = [], Model.forward
    monkeypatch.setattr(Model, "forward", lambda self, tokens, *a: forwarded.append(len(tokens)) or forward(self, tokens, *a))
    for mode, calls in (("first-token", [1]), (None, [1, 1, 2])):
        if mode:
            monkeypatch.setenv("FLASHINFER_WARM_UP", mode)
        else:
            monkeypatch.delenv("FLASHINFER_WARM_UP")
        forwarded.clear()
        with Engine.open(stores("mistral", "q4", "q8", down="rows")) as engine:
            assert forwarded == calls
            fused = [op is not None for op, fusable in zip(engine.model._fused_operands, engine.model._fusable) if fusable]
            assert fused and all(fused) == (mode is None)  # the warm-up took the one-call block
            before = signatures()
            engine.generate("The quick brown fox", max_tokens=3, temperature=0.0)
        if mode is None:
            assert {k: v for k, v in signatures().items() if v != before.get(k, 0)} == {}


# ---- W_down as rows (convert --ffn-down rows, format version 2) ---------------------------


@pytest.mark.parametrize("ffn,resident", [("q8", "q8"), ("q4a", "q8")])
def test_down_rows_and_down_columns_give_the_same_model(stores, ffn, resident):  # noqa: F811
    # a SiLU model (the default there: rows) against the bundles' columns: the same weights up to
    # the down-projection's rounding (columns quantize along dim, rows along the neurons, and rows
    # quantize the hidden activations into int8 blocks), both within the scheme's bound of f32
    golden = load_golden("mistral")
    ids = golden["prompt_ids"].tolist()
    rows, columns = stores("mistral", ffn, resident), stores("mistral", ffn, resident, down="columns")
    rows_manifest, columns_manifest = fmt.Manifest.load(rows), fmt.Manifest.load(columns)
    assert rows_manifest.version == fmt.MATRICES_VERSION and columns_manifest.version == 1
    spec = rows_manifest.ffn_layers[0]
    assert spec.matrix("down").shape == (spec.components[0].length, spec.n_neurons)
    assert spec.component("down") is None and columns_manifest.ffn_layers[0].component("down") is not None
    logits = {}
    for path in (rows, columns):
        with Engine.open(path) as engine:
            logits[path] = engine.logits(ids)
    max_bound, mean_bound = QUANT_BOUNDS[(ffn, resident)]
    for path in (rows, columns):
        diff = np.abs(logits[path] - golden["logits"])
        assert diff.max() <= max_bound and diff.mean() <= mean_bound


def _down_rows_store(tmp_path):
    return convert_checkpoint(FIXTURES / "llama", tmp_path / "rows", quant="q4a", resident_quant="q8", ffn_down="rows")


def test_flipped_byte_in_a_down_matrix(tmp_path, capsys):
    store = _down_rows_store(tmp_path)
    down = fmt.Manifest.load(store).ffn_layers[1].matrix("down")
    path = store / "ffn" / "L1.bin"
    raw = bytearray(path.read_bytes())
    raw[down.offset + 7] ^= 0x10
    path.write_bytes(bytes(raw))
    err = _cli_error(capsys, "check", str(store))
    assert str(path) in err and "checksum mismatch in matrix 'down'" in err


def test_down_matrix_outside_its_file(tmp_path, capsys):
    store = _down_rows_store(tmp_path)
    manifest = json.loads((store / fmt.MANIFEST).read_text())
    manifest["ffn_layers"][0]["matrices"][0]["offset"] += manifest["ffn_layers"][0]["file_bytes"]
    (store / fmt.MANIFEST).write_text(json.dumps(manifest))
    err = _cli_error(capsys, "run", str(store), "--prompt", "hi")
    assert "ffn_layers[0].matrices[0].offset" in err and "not a page-aligned range inside the layer file" in err


def test_sparse_predictor_on_down_rows_names_the_reconversion(tmp_path):
    store = convert_checkpoint(FIXTURES / "relu_llama", tmp_path / "relu-rows", quant="q8", resident_quant="q8",
                               ffn_down="rows")
    with pytest.raises(GenerationError, match="--ffn-down columns"):
        Engine.open(store, predictor="oracle")
    with pytest.raises(GenerationError, match="uses silu, non-zero for every neuron"):  # SiLU: no sparse predictor
        Engine.open(_down_rows_store(tmp_path), predictor="oracle")


def test_down_rows_stream_under_a_cap_like_resident(tmp_path):
    # the dense path reads a streamed layer's matrix with its bundles every token; the same logits
    store = _down_rows_store(tmp_path)
    ids = load_golden("llama")["prompt_ids"].tolist()[:20]
    with Engine.open(store) as resident, Engine.open(store, stream_ffn=True) as streamed:
        np.testing.assert_allclose(streamed.logits(ids), resident.logits(ids), rtol=1e-5, atol=1e-5)
        assert streamed.model.flash_ffn.reader.stats.bytes_read >= sum(
            spec.matrix("down").nbytes for spec in streamed.model.flash_ffn.layers)
