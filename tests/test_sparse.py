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
        monkeypatch.setattr("flashinfer.kernels.PARALLEL_MIN_ELEMENTS", 0)
    golden = load_golden(name)
    ids = golden["prompt_ids"].tolist()
    store = stores(name, "q8", "q8")
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


def test_predictor_knob_errors(stores):  # noqa: F811
    with pytest.raises(GenerationError, match="predictor 'magic' is not available"):
        Engine.open(stores("opt", "q8", "q8"), predictor="magic")
    with pytest.raises(GenerationError, match="window must be a positive number"):
        Engine.open(stores("opt", "q8", "q8"), predictor="oracle", window=0)
    with pytest.raises(ModelPathError, match="apply to a flash store"):
        Engine.open(FIXTURES / "opt", predictor="oracle")
