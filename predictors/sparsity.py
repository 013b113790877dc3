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
- GatePredictor: for SiLU/GELU FFNs, which have no exact zeros: the exact gate of every neuron,
  selected when |act(gate . x)| exceeds its calibrated threshold (CATS). Not exact by design:
  the skipped neurons' small contributions are dropped.

Knows nothing of the cache or the engine: everything here is built from arrays. Products
with weight matrices go through a `Product` the caller passes (the engine passes its
kernels', flashinfer/weights.py `kernel_product`, so a predictor's scores are computed exactly
as the FFN kernels compute the pre-activations it predicts); by default, numpy's float32.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from storage.errors import FormatError

# (x float32 [T, K], weights, bias float32 [N] or empty) -> float32 [T, N] = x @ weights.T + bias
Product = Callable[[np.ndarray, object, np.ndarray], np.ndarray]
NO_BIAS = np.zeros(0, np.float32)


def float_product(x: np.ndarray, w: np.ndarray, bias: np.ndarray) -> np.ndarray:
    z = x @ w.T
    return z + bias if bias.size else z


class _PredictorFile:
    """A predictor .npz opened for reading, each array checked before use: a damaged or
    foreign file raises FormatError naming it and the fix, never numpy's or zipfile's errors.
    `layers`: the store's neurons per layer, which the file must match (None: any)."""

    def __init__(self, path, layers: list[int] | None):
        self.path, self.layers = path, layers
        try:
            self.z = np.load(path, allow_pickle=False)
            self.n_layers = int(self.array("n_layers", (), np.integer))
        except FormatError:
            self.close()
            raise
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as e:
            # zipfile: NotImplementedError for a version or method it lacks, RuntimeError if encrypted
            raise self.damaged(f"not a predictor file ({type(e).__name__}: {e})") from None
        if layers is not None and self.n_layers != len(layers):
            self.close()
            raise self.damaged(f"{self.n_layers} layers, the store has {len(layers)}")

    def damaged(self, what: str) -> FormatError:
        return FormatError(f"{self.path}: {what}; calibrate again (`flashinfer calibrate STORE --text FILE`)")

    def array(self, key: str, shape: tuple, kind=np.floating) -> np.ndarray:
        """z[key], of `shape` (None: any length there) and dtype kind, finite if float."""
        try:
            a = self.z[key]
        except KeyError:
            raise self.damaged(f"array {key!r} is missing") from None
        except Exception as e:  # zipfile/zlib errors of a damaged member
            raise self.damaged(f"array {key!r} does not read ({type(e).__name__}: {e})") from None
        if not isinstance(a, np.ndarray):  # np.load hands out a member without the .npy magic as its bytes
            raise self.damaged(f"member {key!r} is not a numpy array")
        if (a.ndim != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape))
                or not np.issubdtype(a.dtype, kind)):
            raise self.damaged(f"array {key!r} is {a.dtype} {list(a.shape)}, expected {kind.__name__} "
                               f"{['any' if d is None else d for d in shape]}")
        if kind is np.floating and not np.isfinite(a).all():
            raise self.damaged(f"array {key!r} holds NaN or infinity")
        return a

    def neurons(self, layer: int) -> int | None:
        return None if self.layers is None else self.layers[layer]

    def close(self) -> None:
        z = getattr(self, "z", None)
        if z is not None:
            z.close()

    def __enter__(self) -> "_PredictorFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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

    def __init__(self, act_weights: list, act_biases: list[np.ndarray | None], threshold: float = 0.0,
                 product: Product = float_product):
        """act_weights[l]: the [n_neurons, dim] rows whose dot with x decides activity, as
        `product` takes them (float32 arrays for the default)."""
        self.weights = act_weights
        self.biases = [NO_BIAS if b is None else b for b in act_biases]
        self.threshold = threshold
        self.product = product

    def pre_activations(self, layer: int, x: np.ndarray) -> np.ndarray:
        return self.product(np.ascontiguousarray(_rows(x), np.float32), self.weights[layer], self.biases[layer])

    def predict(self, layer: int, x: np.ndarray) -> np.ndarray:
        active = (self.pre_activations(layer, x) > self.threshold).any(axis=0)
        return np.flatnonzero(active)

    @property
    def nbytes(self) -> int:
        """What the rows hold in DRAM, for the planner: each distinct array they are views of,
        once (oracle_from_store's rows are views of whole bundles, which stay alive with them;
        the planner counted 0 and a run whose plan filled its cap peaked over it)."""
        held = {}
        for w in self.weights:
            for a in (w if isinstance(w, tuple) else (w,)):
                if isinstance(a, np.ndarray):
                    base = a
                    while isinstance(base.base, np.ndarray):
                        base = base.base
                    held[id(base)] = base.nbytes
        return sum(held.values())


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
    def load(cls, path, layers: list[int] | None = None) -> "StaticPredictor":
        """`layers`: the store's neurons per layer, which the file must match."""
        hot_sets = []
        with _PredictorFile(path, layers) as f:
            for i in range(f.n_layers):
                hot = f.array(f"hot{i}", (None,), np.integer)
                n = f.neurons(i)
                outside = hot.size and (hot.min() < 0 or (n is not None and hot.max() >= n))
                if outside or np.unique(hot).size != hot.size:
                    raise f.damaged(f"hot set {i} holds neuron ids outside the layer's {n} or twice")
                hot_sets.append(hot.astype(np.int64))
        return cls(hot_sets)


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
    """score = (x A) B + c per layer. `load(..., quantize=, product=)` keeps B (the big factor:
    rank x n_neurons, 9 MB per Mistral-7B layer in f32) transposed in whatever form `quantize`
    makes (the engine: q8 codes in its kernels' form, 3.8x smaller: a Mistral-7B's predictors
    take 141 MiB of a 2 GB cap instead of 340 MB) and multiplies it with `product` (A, the
    dim x rank factor, stays float32)."""

    name = "lowrank"

    def __init__(self, layers: list[LowRankLayer], b_quantized: list | None = None, product: Product = float_product):
        self.layers = layers
        self.b_quantized = b_quantized  # per layer B transposed [n_neurons, rank] as `product` takes it, or None
        self.product = product

    def scores(self, layer: int, x: np.ndarray) -> np.ndarray:
        p = self.layers[layer]
        h = _rows(x) @ p.a
        m = self.b_quantized[layer] if self.b_quantized is not None else None
        if m is None:
            return h @ p.b + p.c
        return self.product(np.ascontiguousarray(h, dtype=np.float32), m, p.c)

    def predict(self, layer: int, x: np.ndarray) -> np.ndarray:
        active = (self.scores(layer, x) > self.layers[layer].threshold).any(axis=0)
        return np.flatnonzero(active)

    @property
    def nbytes(self) -> int:
        if self.b_quantized is None:
            return sum(p.nbytes for p in self.layers)
        return sum(p.nbytes if m is None else p.a.nbytes + p.c.nbytes + m.nbytes
                   for p, m in zip(self.layers, self.b_quantized))

    @staticmethod
    def loaded_nbytes(path, quantized_bytes: Callable[[int, int], int | None] | None = None) -> int:
        """nbytes of load(path, quantize=...), from the .npz's array headers alone: a choice made
        before loading (flashinfer/auto_predictor.py) reads no arrays, whose freed temporaries
        would stay in the RSS a DRAM plan counts. quantized_bytes(rows, k): the bytes `quantize`
        makes of B transposed ([n_neurons, rank]), None where it keeps float32 (None: float32).
        A damaged file raises FormatError, as load does."""
        f32 = np.dtype(np.float32).itemsize
        try:
            shapes = {}
            with zipfile.ZipFile(path) as z:
                for info in z.infolist():
                    with z.open(info) as member:
                        version = np.lib.format.read_magic(member)
                        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                       else np.lib.format.read_array_header_2_0)
                        shapes[info.filename.removesuffix(".npy")] = read_header(member)[0]
            total, i = 0, 0
            while f"a{i}" in shapes:
                (dim, rank), (n,) = shapes[f"a{i}"], shapes[f"c{i}"]
                b = quantized_bytes(n, rank) if quantized_bytes is not None else None
                total += f32 * (dim * rank + n) + (f32 * rank * n if b is None else b)
                i += 1
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, NotImplementedError, RuntimeError) as e:
            raise FormatError(f"{path}: not a predictor file ({type(e).__name__}: {e}); calibrate again "
                              "(`flashinfer calibrate STORE --text FILE`)") from None
        return total

    def save(self, path) -> None:
        if self.b_quantized is not None:
            raise ValueError("a predictor loaded with a quantized B has no float32 B to save; save the fitted one")
        arrays = {}
        for i, p in enumerate(self.layers):
            arrays |= {f"a{i}": p.a, f"b{i}": p.b, f"c{i}": p.c, f"t{i}": np.float32(p.threshold)}
        np.savez(path, n_layers=len(self.layers), **arrays)

    @classmethod
    def load(cls, path, quantize: Callable[[np.ndarray], object] | None = None,
             product: Product = float_product, layers: list[int] | None = None,
             dim: int | None = None) -> "LowRankPredictor":
        """quantize None: float32 as fitted; else B transposed ([n_neurons, rank] float32) is
        passed to `quantize` layer by layer as it is read (one layer's float32 copy at a time,
        never all of them), which returns what `product` multiplies, or None to keep that
        layer float32 (e.g. a rank its scheme's groups do not divide)."""
        fitted, b_quantized = [], [] if quantize else None
        with _PredictorFile(path, layers) as f:
            for i in range(f.n_layers):
                a = f.array(f"a{i}", (dim, None)).astype(np.float32, copy=False)
                b = f.array(f"b{i}", (a.shape[1], f.neurons(i))).astype(np.float32, copy=False)
                c = f.array(f"c{i}", (b.shape[1],)).astype(np.float32, copy=False)
                threshold = float(f.array(f"t{i}", ()))
                m = quantize(np.ascontiguousarray(b.T)) if quantize else None
                if quantize:
                    b_quantized.append(m)
                if m is not None:
                    b = np.zeros((0, b.shape[1]), np.float32)
                fitted.append(LowRankLayer(a, b, c, threshold))
        return cls(fitted, b_quantized, product)


def silu(g: np.ndarray) -> np.ndarray:
    """g * sigmoid(g), float32 (the gate predictor's default activation; the engine passes its kernel's)."""
    return (g / (1.0 + np.exp(-g))).astype(np.float32)


class GatePredictor:
    """Gate thresholding for SwiGLU/GeGLU FFNs (CATS, Lee et al. 2024, with a per-neuron scale as
    in CHESS): the gate of every neuron is computed exactly, c = act(gate . x), and neuron i is
    selected when |c| > its threshold t_i. Calibration sets t_i = T / s_i with s_i the neuron's
    typical |up_i . x| times the norm of its down column, so the test ranks neurons by the size of
    their contribution to the output, |c| s_i > T, and T makes a target share of neurons fall
    under it (s_i = 1: plain CATS). A skipped neuron's up row and down column are neither read
    nor multiplied, so the FFN output loses the skipped neurons' c (up . x) down: small, not zero
    (the method trades that error for I/O and compute; `flashinfer calibrate --sparsity` chooses
    how much, and its report measures it).

    `predict` keeps the coefficients it computed (per layer, until `coefficients(layer)` takes
    them), which the FFN kernel multiplies by up . x: the gate is computed once."""

    name = "gate"

    def __init__(self, gates: list, thresholds: list[np.ndarray], product: Product = float_product,
                 activation: Callable[[np.ndarray], np.ndarray] = None, sparsity: float = float("nan")):
        """gates[l]: layer l's gate rows [n_neurons, dim] as `product` takes them; thresholds[l]:
        float32 [n_neurons]; `activation` maps the gate products [T, n] to coefficients."""
        self.gates = gates
        self.thresholds = [np.ascontiguousarray(t, np.float32) for t in thresholds]
        self.product = product
        self.activation = activation or silu
        self.sparsity = sparsity
        self._coefficients: dict[int, np.ndarray] = {}

    def predict(self, layer: int, x: np.ndarray) -> np.ndarray:
        c = self.coefficients_with(x, self.gates[layer])
        self._coefficients[layer] = c
        return np.flatnonzero((np.abs(c) > self.thresholds[layer]).any(axis=0))

    def coefficients_with(self, x: np.ndarray, gate) -> np.ndarray:
        """act(gate . x) [T, n_neurons] with `gate` the layer's W_gate from wherever it is (the
        dense path's layer buffer: flash_ffn.FlashFFN's gate mode)."""
        return self.activation(self.product(np.ascontiguousarray(_rows(x), np.float32), gate, NO_BIAS))

    def coefficients(self, layer: int) -> np.ndarray:
        """act(gate . x) [T, n_neurons] of the last predict(layer, x), handed over once."""
        return self._coefficients.pop(layer)

    @property
    def nbytes(self) -> int:
        return sum(getattr(g, "nbytes", 0) for g in self.gates) + sum(t.nbytes for t in self.thresholds)

    def save(self, path) -> None:
        """The thresholds only: the gate rows are the store's."""
        np.savez(path, n_layers=len(self.thresholds), sparsity=np.float32(self.sparsity),
                 **{f"t{i}": t for i, t in enumerate(self.thresholds)})

    @staticmethod
    def load_thresholds(path, layers: list[int] | None = None) -> tuple[list[np.ndarray], float]:
        """(per layer the neurons' thresholds float32 [n_neurons], the sparsity they were calibrated
        for) of a gate.npz; `layers`: the store's neurons per layer, which the file must match."""
        thresholds = []
        with _PredictorFile(path, layers) as f:
            sparsity = float(f.array("sparsity", ()))
            for i in range(f.n_layers):
                t = f.array(f"t{i}", (f.neurons(i),)).astype(np.float32)
                if (t < 0).any():
                    raise f.damaged(f"layer {i} has a negative threshold")
                thresholds.append(t)
        if not 0.0 < sparsity < 1.0:
            raise FormatError(f"{path}: sparsity {sparsity} is not in (0, 1); calibrate again "
                              "(`flashinfer calibrate STORE --text FILE --sparsity S`)")
        return thresholds, sparsity


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
