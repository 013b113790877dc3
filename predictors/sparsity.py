"""Sparsity predictors: which FFN neurons of a layer will be active for an FFN input x.

Interface: `predict(layer, x) -> sorted unique int64 neuron ids`, x float32 [dim] or
[T, dim] (then the union over the T tokens). A neuron is *active* when its activation is
non-zero: for ReLU FFNs, when its pre-activation (gate row for gated FFNs, up row
otherwise, plus bias) is > 0.

- DensePredictor: every neuron (the naive baseline: no sparsity used).
- OraclePredictor: computes every pre-activation exactly (the quality ceiling and a test tool;
  it needs the full activation matrices, so it saves no I/O).
- StaticPredictor: the neurons most often active on calibration data (a fixed hot set).
- LowRankPredictor: score = (x A) B + c with rank r (LLM in a flash, section 3.1; Deja Vu),
  active when score > threshold; fitted in predictors/lowrank.py.

Knows nothing of the cache or the engine: everything here is built from arrays.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _rows(x: np.ndarray) -> np.ndarray:
    return x.reshape(1, -1) if x.ndim == 1 else x


class DensePredictor:
    name = "dense"

    def __init__(self, n_neurons: list[int]):
        self._all = [np.arange(n, dtype=np.int64) for n in n_neurons]

    def predict(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self._all[layer]


class OraclePredictor:
    name = "oracle"

    def __init__(self, act_weights: list[np.ndarray], act_biases: list[np.ndarray | None], threshold: float = 0.0):
        """act_weights[l]: float32 [n_neurons, dim] rows whose dot with x decides activity."""
        self.weights = act_weights
        self.biases = act_biases
        self.threshold = threshold

    def pre_activations(self, layer: int, x: np.ndarray) -> np.ndarray:
        z = _rows(x) @ self.weights[layer].T
        if self.biases[layer] is not None:
            z += self.biases[layer]
        return z

    def predict(self, layer: int, x: np.ndarray) -> np.ndarray:
        active = (self.pre_activations(layer, x) > self.threshold).any(axis=0)
        return np.flatnonzero(active)


class StaticPredictor:
    name = "static"

    def __init__(self, hot_sets: list[np.ndarray]):
        self.hot_sets = [np.sort(h).astype(np.int64) for h in hot_sets]

    @classmethod
    def fit(cls, masks: list[np.ndarray], target_recall: float = 0.9) -> "StaticPredictor":
        """masks[l]: bool [tokens, n_neurons] of calibration activity. Keeps, per layer, the most
        frequently active neurons until they cover `target_recall` of all activations."""
        hot = []
        for mask in masks:
            counts = mask.sum(axis=0)
            order = np.argsort(-counts, kind="stable")
            covered = np.cumsum(counts[order]) / max(counts.sum(), 1)
            hot.append(order[: int(np.searchsorted(covered, target_recall)) + 1])
        return cls(hot)

    def predict(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self.hot_sets[layer]

    @property
    def nbytes(self) -> int:
        return sum(h.nbytes for h in self.hot_sets)

    def save(self, path) -> None:
        np.savez(path, n_layers=len(self.hot_sets), **{f"hot{i}": h for i, h in enumerate(self.hot_sets)})

    @classmethod
    def load(cls, path) -> "StaticPredictor":
        with np.load(path) as z:
            return cls([z[f"hot{i}"] for i in range(int(z["n_layers"]))])


@dataclass
class LowRankLayer:
    a: np.ndarray  # float32 [dim, rank]
    b: np.ndarray  # float32 [rank, n_neurons]
    c: np.ndarray  # float32 [n_neurons]
    threshold: float
    fitted_fraction: float = float("nan")  # share of neurons predicted on the threshold tokens (fit time only)
    origin: str = ""  # "fit" (the logistic fit won on the threshold tokens) | "svd" (it did not); fit time only

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes + self.c.nbytes


class LowRankPredictor:
    """score = (x A) B + c per layer. `load(..., quant="q8")` keeps B (the big factor:
    rank x n_neurons, 9 MB per Mistral-7B layer in f32) as q8 codes in the kernels' form,
    3.8x smaller: a Mistral-7B's predictors take 141 MiB of a 2 GB cap instead of 340 MB (A, the
    dim x rank factor, stays float32)."""

    name = "lowrank"

    def __init__(self, layers: list[LowRankLayer], b_q8: list | None = None):
        self.layers = layers
        self.b_q8 = b_q8  # per layer a flashinfer.weights.Matrix of B transposed [n_neurons, rank], or None

    def scores(self, layer: int, x: np.ndarray) -> np.ndarray:
        p = self.layers[layer]
        h = _rows(x) @ p.a
        m = self.b_q8[layer] if self.b_q8 is not None else None
        if m is None:
            return h @ p.b + p.c
        from flashinfer import kernels as K

        out = np.empty((h.shape[0], m.data.shape[0]), np.float32)
        K.matmul_serial(np.ascontiguousarray(h, dtype=np.float32), m.data, m.scales, m.mins, m.group, p.c, out)
        return out

    def predict(self, layer: int, x: np.ndarray) -> np.ndarray:
        active = (self.scores(layer, x) > self.layers[layer].threshold).any(axis=0)
        return np.flatnonzero(active)

    @property
    def nbytes(self) -> int:
        if self.b_q8 is None:
            return sum(p.nbytes for p in self.layers)
        return sum(p.nbytes if m is None else p.a.nbytes + p.c.nbytes + m.data.nbytes + m.scales.nbytes
                   for p, m in zip(self.layers, self.b_q8))

    def save(self, path) -> None:
        if self.b_q8 is not None:
            raise ValueError("a predictor loaded with quant='q8' has no float32 B to save; save the fitted one")
        arrays = {}
        for i, p in enumerate(self.layers):
            arrays |= {f"a{i}": p.a, f"b{i}": p.b, f"c{i}": p.c, f"t{i}": np.float32(p.threshold)}
        np.savez(path, n_layers=len(self.layers), **arrays)

    @classmethod
    def load(cls, path, quant: str | None = None) -> "LowRankPredictor":
        """quant None: float32 as fitted; "q8": B quantized layer by layer as it is read (the
        float32 copy of one layer at a time, never all of them)."""
        if quant not in (None, "q8"):
            raise ValueError(f"predictor quant must be None or 'q8', got {quant!r}")
        from storage import quant as Q

        layers, b_q8 = [], [] if quant else None
        with np.load(path) as z:
            for i in range(int(z["n_layers"])):
                b = z[f"b{i}"]
                if quant and b.shape[0] % Q.DEFAULT_GROUP_SIZE == 0:
                    from flashinfer.weights import NO_SCALES, Matrix

                    qt = Q.quantize(np.ascontiguousarray(b.T), "q8", Q.DEFAULT_GROUP_SIZE)
                    b_q8.append(Matrix(qt.data, qt.scales.view(np.uint16), NO_SCALES, Q.DEFAULT_GROUP_SIZE))
                    b = np.zeros((0, b.shape[1]), np.float32)
                elif quant:  # a rank that is not a multiple of the q8 group: this layer stays float32
                    b_q8.append(None)
                layers.append(LowRankLayer(z[f"a{i}"], b, z[f"c{i}"], float(z[f"t{i}"])))
        return cls(layers, b_q8)


def recall_report(predicted: np.ndarray, mask: np.ndarray, magnitude: np.ndarray) -> dict:
    """Quality of a prediction against calibration truth, per token averaged.

    predicted, mask: bool [tokens, n_neurons]; magnitude: |activation| [tokens, n_neurons].
    recall: share of active neurons predicted; mass_recall: share of sum |a| predicted;
    fraction: share of all neurons predicted (what must be resident)."""
    hits = (predicted & mask).sum()
    return {
        "recall": float(hits / max(mask.sum(), 1)),
        "mass_recall": float((magnitude * predicted).sum() / max(magnitude.sum(), 1e-30)),
        "fraction": float(predicted.mean()),
    }
