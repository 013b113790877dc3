"""Sparse inference from flash: the oracle predictor through the neuron cache equals dense."""

import numpy as np
import pytest

from flashinfer import Engine
from flashinfer.errors import GenerationError, ModelPathError
from tests.conftest import FIXTURES, load_golden
from tests.test_store import stores  # noqa: F401  (module-scoped store fixture)


@pytest.mark.parametrize("name", ["relu_llama", "opt", "opt_postln"])
@pytest.mark.parametrize("window,threads,prefetch", [(1, "serial", False), (4, "serial", False),
                                                     (4, "parallel", False), (1, "serial", True), (4, "serial", True)])
def test_oracle_equals_dense_for_relu_models(stores, name, window, threads, prefetch, monkeypatch):  # noqa: F811
    if threads == "parallel":  # the fixtures are too small for ffn_rows_parallel otherwise
        monkeypatch.setattr("flashinfer.flash_ffn.FFN_PARALLEL_MIN_ELEMENTS", 0)
    golden = load_golden(name)
    ids = golden["prompt_ids"].tolist()
    # f16: float dots. With q8/q4 the int8 activation blocks round each layer's input, so the
    # sparse path's other summation order (cache rows, not neuron ids) can flip a code and the
    # two agree to a quantization step, not to float rounding (test_oracle_tracks_dense_on_q8)
    store = stores(name, "f16", "f16")
    with Engine.open(store) as dense, Engine.open(store, predictor="oracle", window=window, prefetch=prefetch) as sparse:
        np.testing.assert_allclose(sparse.logits(ids), dense.logits(ids), atol=1e-4, rtol=0)
        # token by token (decode), where sparsity pays: loads fewer neurons than dense would
        dense.model.reset()
        dense_steps = [dense.model.forward(np.array([t])).copy() for t in ids]
        sparse.model.reset()
        ffn = sparse.model.flash_ffn
        sparse_steps = [sparse.model.forward(np.array([t])).copy() for t in ids]
        np.testing.assert_allclose(sparse_steps, dense_steps, atol=1e-4, rtol=0)
        n_neurons = sum(spec.n_neurons for spec in ffn.layers)
        assert 0 < ffn.stats.loaded < n_neurons * len(ids)
        if prefetch:  # the oracle of layer l+1 on layer l's input guesses some of l+1's neurons
            assert 0 < ffn.stats.prefetch_used <= ffn.stats.prefetched


@pytest.mark.parametrize("name", ["relu_llama", pytest.param("opt", marks=pytest.mark.slow)])  # opt: ~25 s cold
def test_oracle_tracks_dense_on_q8(stores, name):  # noqa: F811
    ids = load_golden(name)["prompt_ids"].tolist()
    store = stores(name, "q8", "q8")
    with Engine.open(store) as dense, Engine.open(store, predictor="oracle") as sparse:
        np.testing.assert_allclose(sparse.logits(ids), dense.logits(ids), atol=1e-4, rtol=0)  # same order: exact
        dense.model.reset()
        sparse.model.reset()
        d = np.array([dense.model.forward(np.array([t])).copy() for t in ids])
        s = np.array([sparse.model.forward(np.array([t])).copy() for t in ids])
    assert np.abs(d - s).max() < 0.1 and (d.argmax(1) == s.argmax(1)).mean() >= 0.95


@pytest.mark.parametrize("capacity", [3, 10])
@pytest.mark.parametrize("scratch_bundles", [2, None])  # None: the default scratch, one piece
def test_a_predicted_set_larger_than_the_cache_keeps_its_hits(stores, capacity, scratch_bundles,  # noqa: F811
                                                              monkeypatch):
    """A prefill chunk predicts the union of its tokens' neurons, and a decode token may predict
    more than the mean the planner sized for: either can exceed the cache. The FFN must still be
    exact (not truncated), the cache keep its hits (not be emptied for the set), and only the
    overflow go through the scratch area."""
    from flashinfer import sparse_ffn
    from flashinfer.sparse_ffn import SparseFFN

    golden = load_golden("relu_llama")
    ids = golden["prompt_ids"].tolist()
    store = stores("relu_llama", "q8", "q8")
    with Engine.open(store) as dense, Engine.open(store, predictor="oracle") as sparse:
        old = sparse.model.flash_ffn
        if scratch_bundles:  # several pieces of overflow per layer
            monkeypatch.setattr(sparse_ffn, "OVERFLOW_SCRATCH_BYTES", scratch_bundles * old.layers[0].bundle_bytes)
        tight = SparseFFN(old.reader, sparse.args, old.predictor, [capacity] * len(old.layers), window=2)
        sparse.model.flash_ffn = tight
        np.testing.assert_allclose(sparse.logits(ids), dense.logits(ids), atol=1e-4, rtol=0)
        assert tight.stats.loaded == tight.stats.predicted > capacity * len(old.layers)  # a cold prefill
        assert all(cache.n == capacity for cache in tight.caches)  # filled, then kept
        dense.model.reset()
        sparse.model.reset()
        stats = tight.stats
        for t in ids:
            expected = dense.model.forward(np.array([t])).copy()
            np.testing.assert_allclose(sparse.model.forward(np.array([t])), expected, atol=1e-4, rtol=0)
            for cache in tight.caches:
                cache.check()
        assert stats.overflow > 0  # tokens above the capacity: their overflow streamed...
        assert stats.loaded < stats.predicted  # ...beside the hits the cache kept


def test_predictor_knob_errors(stores):  # noqa: F811
    with pytest.raises(GenerationError, match="predictor 'magic' is not available"):
        Engine.open(stores("opt", "q8", "q8"), predictor="magic")
    with pytest.raises(GenerationError, match="window must be a positive number"):
        Engine.open(stores("opt", "q8", "q8"), predictor="oracle", window=0)
    with pytest.raises(ModelPathError, match="apply to a flash store"):
        Engine.open(FIXTURES / "opt", predictor="oracle", convert=False)
