"""Sparse FFN from flash: predict, load only the missing neurons into the layer's neuron
cache, compute over the cache's packed rows (LLM in a flash, sections 3.1-3.3).

Per layer and chunk of tokens:
    ids = predictor.predict(layer, x)          the neurons likely active for these tokens
    to_load, _ = cache.step(ids)               windowing and eviction (flashinfer/cache.py)
    reader.read_bundles(layer, to_load, out=cache.free_rows(len(to_load))); cache.commit(to_load)
    out = FFN over cache rows 0..n-1           rows not active cost no down-projection (ReLU)
"""

from __future__ import annotations

import numpy as np

from flashinfer import kernels as K
from flashinfer.cache import NeuronCache
from flashinfer.config import ModelArgs
from flashinfer.flash_ffn import PartialSums, bundle_views, ffn_over_bundles


class SparseFFN:
    def __init__(self, reader, args: ModelArgs, predictor, capacities: list[int], window: int):
        self.reader = reader
        self.predictor = predictor
        self.layers = reader.manifest.ffn_layers
        self.act = K.ACT_SILU if args.act == "silu" else K.ACT_RELU
        self.caches = [NeuronCache(spec.n_neurons, spec.bundle_bytes, cap, window)
                       for spec, cap in zip(self.layers, capacities)]
        self.views = [bundle_views(cache.rows, spec) for cache, spec in zip(self.caches, self.layers)]
        self.partial = PartialSums(args.dim)
        self.loaded = 0  # neurons read from flash since the last reset (stats)
        self.predicted = 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def forward(self, layer: int, x: np.ndarray, out: np.ndarray) -> None:
        cache = self.caches[layer]
        ids = self.predictor.predict(layer, x)
        to_load, _ = cache.step(ids)
        if to_load.size:  # read straight into the cache's free rows: no staging copy
            self.reader.read_bundles(layer, to_load, out=cache.free_rows(to_load.size))
            cache.commit(to_load)
        self.loaded += int(to_load.size)
        self.predicted += int(ids.size)
        ffn_over_bundles(x, cache.n, self.views[layer], self.act, out, self.partial)

    def reset(self) -> None:
        """Forget everything resident (a new sequence starts cold)."""
        for cache in self.caches:
            cache.reset()


def oracle_from_store(reader, args: ModelArgs):
    """The exact predictor: every layer's activation-deciding rows (gate for gated FFNs, up
    otherwise) dequantized to float32. Costs n_layers * n_neurons * dim * 4 bytes of RAM, so
    it is a quality ceiling and a test tool for small models, not a way to save I/O."""
    from predictors.sparsity import OraclePredictor
    from storage import quant

    weights, biases = [], []
    for layer, spec in enumerate(reader.manifest.ffn_layers):
        bundles = reader.read_bundles(layer, np.arange(spec.n_neurons))
        c = spec.component("gate" if args.gated_ffn else "up")
        rows = quant.rows_from_records(np.ascontiguousarray(bundles[:, c.offset : c.offset + c.nbytes]),
                                       c.scheme, c.length, c.group_size or 32)
        weights.append(quant.dequantize(rows))
        b = spec.component("gate_bias" if args.gated_ffn else "up_bias")
        biases.append(None if b is None else np.ascontiguousarray(bundles[:, b.offset : b.offset + 4]).view(np.float32)[:, 0])
    return OraclePredictor(weights, biases)
