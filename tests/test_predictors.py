"""Predictors on a planted-sparsity problem with a known answer."""

import numpy as np
import pytest

from flashinfer.weights import kernel_product, q8_matrix
from predictors.lowrank import fit_lowrank_layer, truncated_svd
from predictors.sparsity import (DensePredictor, LowRankPredictor, OraclePredictor, StaticPredictor,
                                 recall_report)


def planted_layer(rng, n_neurons=256, dim=64, tokens=1200, sparsity=0.9):
    """ReLU pre-activations W x + b with biases set so ~sparsity of them are <= 0; x has
    low-rank structure, as hidden states of trained models do."""
    w = rng.standard_normal((n_neurons, dim)).astype(np.float32) / np.sqrt(dim)
    basis = rng.standard_normal((16, dim)).astype(np.float32)
    x = (rng.standard_normal((tokens, 16)) @ basis + 0.1 * rng.standard_normal((tokens, dim))).astype(np.float32)
    z = x @ w.T
    bias = -np.quantile(z, sparsity, axis=0).astype(np.float32)  # each neuron fires on ~10% of tokens
    return w, bias, x, (x @ w.T + bias)


def test_dense_oracle_static():
    rng = np.random.default_rng(0)
    w, bias, x, z = planted_layer(rng)
    assert DensePredictor([256]).predict(0, x[0]).size == 256
    oracle = OraclePredictor([w], [bias])
    np.testing.assert_array_equal(oracle.predict(0, x[3]), np.flatnonzero(z[3] > 0))
    np.testing.assert_array_equal(oracle.predict(0, x[:2]), np.flatnonzero((z[:2] > 0).any(0)))
    static = StaticPredictor.fit([z > 0], target_recall=0.5)
    hot = static.predict(0, x[0])
    counts = (z > 0).sum(0)
    assert counts[hot].sum() >= 0.5 * counts.sum() and counts[hot].min() >= np.sort(counts)[::-1][hot.size]


def test_lowrank_reaches_target_recall_on_held_out_tokens(tmp_path):
    rng = np.random.default_rng(1)
    w, bias, x, z = planted_layer(rng)
    train, test = slice(0, 1000), slice(1000, None)
    layer = fit_lowrank_layer(w, bias, x[train], z[train] > 0, rank=16, target_recall=0.95)
    predictor = LowRankPredictor([layer])
    predicted = predictor.scores(0, x[test]) > layer.threshold
    report = recall_report(predicted, z[test] > 0, np.maximum(z[test], 0))
    assert report["recall"] >= 0.9  # calibrated for 0.95 on the training tokens
    assert report["mass_recall"] >= report["recall"]  # the misses are the weakly active ones
    assert report["fraction"] < 0.3  # ~10% active: the predictor must not just say "all"
    predictor.save(tmp_path / "p.npz")
    again = LowRankPredictor.load(tmp_path / "p.npz")
    np.testing.assert_array_equal(again.predict(0, x[1005]), predictor.predict(0, x[1005]))


@pytest.mark.parametrize("rank", [32, 20])  # 20: not a multiple of the q8 group, that layer stays float32
def test_lowrank_q8_keeps_the_prediction(tmp_path, rank):
    rng = np.random.default_rng(1)
    w, bias, x, z = planted_layer(rng)
    layer = fit_lowrank_layer(w, bias, x[:1000], z[:1000] > 0, rank=rank, target_recall=0.95)
    exact = LowRankPredictor([layer])
    exact.save(tmp_path / "p.npz")
    q8 = LowRankPredictor.load(tmp_path / "p.npz", quantize=q8_matrix, product=kernel_product)
    test = x[1000:]
    a, b = exact.scores(0, test) > layer.threshold, q8.scores(0, test) > layer.threshold
    assert (a != b).mean() < 0.002  # only neurons at the threshold flip
    truth = z[1000:] > 0
    assert abs(recall_report(b, truth, np.maximum(z[1000:], 0))["recall"]
               - recall_report(a, truth, np.maximum(z[1000:], 0))["recall"]) < 0.005
    assert q8.nbytes < (0.5 if rank == 32 else 1.01) * exact.nbytes
    with pytest.raises(ValueError, match="no float32 B"):
        q8.save(tmp_path / "again.npz")


def test_randomized_svd_matches_exact():
    rng = np.random.default_rng(2)
    low = rng.standard_normal((300, 20)) @ rng.standard_normal((20, 200))
    u, s, vt = truncated_svd(low.astype(np.float32), 10)
    exact = np.linalg.svd(low, compute_uv=False)[:10]
    np.testing.assert_allclose(s, exact, rtol=1e-3)
