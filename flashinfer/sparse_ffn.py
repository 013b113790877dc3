"""Sparse FFN from flash: predict, load only the missing neurons into the layer's neuron
cache, compute over the cache's packed rows (LLM in a flash, sections 3.1-3.3).

Per layer and chunk of tokens:
    ids = predictor.predict(layer, x)          the neurons likely active for these tokens
    to_load, _ = cache.step(ids)               windowing and eviction (flashinfer/cache.py)
    reader.read_bundles(layer, to_load, out=cache.free_rows(len(to_load))); cache.commit(to_load)
    out = FFN over cache rows 0..n-1           rows not active cost no down-projection (ReLU)

With the gate predictor (SiLU/GELU models, predictors.sparsity.GatePredictor) the prediction is
the exact gate of every neuron, thresholded; the bundles hold up rows and down columns only, and
the FFN over the cache multiplies each resident neuron whose |act(gate.x)| clears the threshold
(flash_ffn.ffn_over_selected): a resident neuron under it costs nothing, as a missing one does.

When the predicted set is larger than the cache (a prefill chunk of many tokens, or a token
above the mean share the planner sized for, under a tight cap), the cache keeps its hits and
takes as many misses as its other rows make room for; the rest (the overflow) is read into a
scratch area of OVERFLOW_SCRATCH_BYTES, a piece at a time, and its FFN added to the output:
exact, and the cache stays warm. (It used to empty the cache and stream the whole set through
it in pieces, so every token above the mean re-read its layer's hits.) Truncating the set
would silently drop active neurons.

With `prefetch`, layer l also guesses layer l+1's neurons from its own input (PowerInfer-2's
trick: the residual stream changes little from one layer to the next) and a background
thread reads the missing ones into layer l+1's cache while layer l's FFN and layer l+1's
attention compute. Layer l+1 then reads synchronously only what the guess missed. The
numba kernels release the GIL, so the read really overlaps. `stats` counts both.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from flashinfer import kernels as K
from flashinfer.cache import NeuronCache
from flashinfer.config import ModelArgs
from flashinfer.flash_ffn import PartialSums, bundle_views, ffn_over_bundles, ffn_over_selected
from storage.reader import ReadStats


KEEP = 1 << 40  # a window no token count reaches
# where a predicted set's overflow (what the cache cannot hold) is read and computed, a piece
# at a time; the planner counts it with the read buffers. 4 MiB: ~600 bundles of a 7B q4 layer,
# reads long enough for the disk's sequential rate
OVERFLOW_SCRATCH_BYTES = 4 << 20


@dataclass
class SparseStats:
    """Counts since the last reset, summed over layers and tokens."""

    predicted: int = 0  # neurons the predictor selected
    loaded: int = 0  # neurons read from flash on the critical path (the layer waited for them)
    overflow: int = 0  # ... of which read into the scratch area, past what the cache could hold
    prefetched: int = 0  # neurons read ahead for the next layer
    prefetch_used: int = 0  # ... of which that layer's predictor then selected
    wait_seconds: float = 0.0  # time layers spent waiting for flash (reads and unfinished read-aheads)

    @property
    def hit_rate(self) -> float:
        """Share of predicted neurons found resident without waiting for a read."""
        return 1.0 - self.loaded / self.predicted if self.predicted else 1.0


class SparseFFN:
    def __init__(self, reader, args: ModelArgs, predictor, capacities: list[int], window: int,
                 prefetch: bool = False, pin: float = 0.0):
        """pin: the share of each cache (that cannot hold its whole layer) kept for the layer's
        hot set, the neurons predicted most often (cache.NeuronCache's pin_capacity)."""
        self.reader = reader
        self.predictor = predictor
        self.layers = reader.manifest.ffn_layers
        self.act = K.ACTS[args.act]
        # the gate predictor hands over act(gate.x) of every neuron, which the FFN kernel multiplies
        # by up.x (its bundles hold no gate rows); the others' neurons compute their own activation
        self.gated_by_coefficients = hasattr(predictor, "coefficients")
        # a cache that can hold its whole layer never drops a neuron: once read, it stays (the
        # window only saves DRAM, which such a layer does not need)
        self.caches = [NeuronCache(spec.n_neurons, spec.bundle_bytes, cap, window if cap < spec.n_neurons else KEEP,
                                   int(pin * cap) if cap < spec.n_neurons else 0)
                       for spec, cap in zip(self.layers, capacities)]
        self.views = [bundle_views(cache.rows, spec) for cache, spec in zip(self.caches, self.layers)]
        # With the gate predictor, a layer whose cache holds it whole is read whole the first time it
        # runs, in long reads (its neurons one by one, as first selected, cost a 4 KiB request each:
        # 8 ms of a 30 ms SmolLM2 token), and keeps its rows across sequences: the gate path's output
        # never depends on what is resident (every selected neuron is loaded, every other skipped).
        # The ReLU predictors still load neuron by neuron from cold, which the tests and `profile`
        # measure; whether they should read whole layers too belongs to the cache-policy work (issue 14).
        self.whole_layer = [self.gated_by_coefficients and cap >= spec.n_neurons
                            for spec, cap in zip(self.layers, capacities)]
        self.partial = PartialSums(args.dim)
        self.stats = SparseStats()
        self.prefetch = prefetch
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch") if prefetch else None
        self._pending: dict[int, tuple[Future, np.ndarray]] = {}  # layer -> read-ahead in flight
        self._piece_out: np.ndarray | None = None  # the overflow's FFN output, added to the layer's
        bundle_bytes = max((spec.bundle_bytes for spec in self.layers), default=1)
        self._scratch = np.empty((max(1, OVERFLOW_SCRATCH_BYTES // bundle_bytes), bundle_bytes), np.uint8)
        self._scratch_views: dict[int, object] = {}  # layer -> bundle_views of the scratch rows, made once
        self.tracer = None  # flashinfer.profile.Tracer while a traced generation runs

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.caches)

    def forward(self, layer: int, x: np.ndarray, out: np.ndarray) -> None:
        cache, stats, tr = self.caches[layer], self.stats, self.tracer
        clock = time.perf_counter
        t0 = clock()
        prefetched = self._finish_prefetch(layer)
        whole = cache.missing(np.arange(cache.capacity)) if self.whole_layer[layer] and cache.n < cache.capacity \
            else None
        if whole is not None:  # the first use of a layer the cache holds whole: read it all, once
            whole_counter = None if tr is None else ReadStats()
            self.reader.read_bundles(layer, whole, out=cache.free_rows(whole.size), counter=whole_counter)
            cache.commit_unpredicted(whole)
            stats.loaded += int(whole.size)
        t1 = clock()
        ids = self.predictor.predict(layer, x)
        coefs = self.predictor.coefficients(layer) if self.gated_by_coefficients else None
        t2 = clock()
        to_load, evicted = cache.step(ids, reuse_rows=True)
        t3 = clock()
        counter = None if tr is None else ReadStats()
        if to_load.size:  # straight into the rows the evictions freed, then past n: no row moves
            rows = cache.load_rows(to_load.size)
            try:
                self.reader.read_bundles(layer, to_load, out=cache.rows, counter=counter, rows=rows)
            except BaseException:
                cache.drop_replaced()  # rows 0..n-1 hold what they say again; the error is the caller's
                raise
            cache.commit_rows(to_load, rows)
        t4 = clock()
        overflow = cache.missing(ids)  # what did not fit beside the hits and the hot set: from a scratch read
        stats.wait_seconds += (t1 - t0) + (t4 - t3)
        stats.loaded += int(to_load.size + overflow.size)
        stats.overflow += int(overflow.size)
        stats.predicted += int(ids.size)
        if prefetched is not None:
            stats.prefetch_used += int(np.intersect1d(prefetched, ids, assume_unique=True).size)
        if self.prefetch and layer + 1 < len(self.caches):
            self._start_prefetch(layer + 1, x)
        t5 = clock()
        if coefs is None:
            ffn_over_bundles(x, cache.n, self.views[layer], self.act, out, self.partial)
        else:
            ffn_over_selected(x, cache.n, cache.row_to_id, coefs, self.predictor.thresholds[layer], self.views[layer],
                              out, self.partial)
        if overflow.size:
            self._add_overflow(layer, x, overflow, out, counter, coefs)
        if tr is not None:
            t6 = clock()
            if whole is not None:
                tr.ffn_part(layer, "read", t0, t1, neurons=int(whole.size), bytes=whole_counter.bytes_read,
                            whole_layer=True)
                counter.bytes_read += whole_counter.bytes_read
            elif prefetched is not None:
                tr.ffn_part(layer, "read", t0, t1, waited_for="read-ahead")
            tr.ffn_part(layer, "predict", t1, t2, neurons=int(ids.size))
            tr.ffn_part(layer, "mm", t2, t3, evicted=int(evicted.size))
            tr.ffn_part(layer, "read", t3, t4, neurons=int(to_load.size), bytes=counter.bytes_read)
            if t5 > t4:  # guessing the next layer's neurons and queueing the read-ahead
                tr.ffn_part(layer, "predict", t4, t5, read_ahead_for=layer + 1)
            # the overflow's reads and kernels interleave: they count in "ffn", its neurons as loaded
            tr.ffn_part(layer, "ffn", t5, t6, rows=cache.n, overflow=int(overflow.size))
            tr.neurons(layer, int(ids.size), int(to_load.size + overflow.size), int(evicted.size), cache.n,
                       cache.capacity, counter.bytes_read)

    def _add_overflow(self, layer: int, x: np.ndarray, overflow: np.ndarray, out: np.ndarray, counter,
                      coefs: np.ndarray | None = None) -> None:
        """out += the FFN of the `overflow` neurons, read into the scratch area a piece at a time."""
        t0 = time.perf_counter()
        if self._piece_out is None or self._piece_out.shape[0] < x.shape[0]:
            self._piece_out = np.empty((x.shape[0], out.shape[1]), np.float32)
        piece_out = self._piece_out[: x.shape[0]]
        spec = self.layers[layer]
        scratch = self._scratch[:, : spec.bundle_bytes]
        views = self._scratch_views.get(layer)
        if views is None:
            views = self._scratch_views[layer] = bundle_views(scratch, spec)
        for start in range(0, overflow.size, scratch.shape[0]):
            piece = overflow[start : start + scratch.shape[0]]
            self.reader.read_bundles(layer, piece, out=scratch, counter=counter)
            if coefs is None:
                ffn_over_bundles(x, piece.size, views, self.act, piece_out, self.partial)
            else:
                ffn_over_selected(x, piece.size, piece, coefs, self.predictor.thresholds[layer], views, piece_out,
                                  self.partial)
            out += piece_out
        self.stats.wait_seconds += time.perf_counter() - t0  # mostly reads

    def _start_prefetch(self, layer: int, x: np.ndarray) -> None:
        cache = self.caches[layer]
        fetch = cache.make_room_for_prefetch(self.predictor.predict(layer, x))
        if fetch.size:
            rows = cache.free_rows(fetch.size)  # nothing else touches these rows until committed
            tracer = self.tracer  # this step's record is taken here, on the compute thread
            traced = None if tracer is None else (tracer, tracer.layer(layer))
            self._pending[layer] = (self._io.submit(self._read_ahead, layer, fetch, rows, traced), fetch)
            self.stats.prefetched += int(fetch.size)

    def _read_ahead(self, layer: int, ids: np.ndarray, rows: np.ndarray, traced) -> None:
        """Runs on the read-ahead thread; `traced` is (tracer, its record of `layer`) or None."""
        if traced is None:
            self.reader.read_bundles(layer, ids, rows)
            return
        tracer, record = traced
        counter = ReadStats()
        t0 = time.perf_counter()
        self.reader.read_bundles(layer, ids, rows, counter=counter)
        tracer.read_ahead(layer, record, int(ids.size), counter.bytes_read, t0, time.perf_counter())

    def _finish_prefetch(self, layer: int) -> np.ndarray | None:
        pending = self._pending.pop(layer, None)
        if pending is None:
            return None
        future, ids = pending
        future.result()  # re-raises a read error here, in the layer that needs the rows
        self.caches[layer].commit_prefetched(ids)
        return ids

    def reset(self) -> None:
        """Forget what is resident (a new sequence starts cold), except in caches that hold their
        whole layer (whole_layer)."""
        for layer in list(self._pending):  # wait for reads still writing into free rows; uncommitted, so
            wait([self._pending.pop(layer)[0]])  # a failed one (its error was not ours to raise) loses nothing
        for cache, whole in zip(self.caches, self.whole_layer):
            if not whole:  # a cache that holds its whole layer keeps it: it is full, whatever ran before
                cache.reset()
        self.stats = SparseStats()

    def close(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)


def oracle_from_store(reader, args: ModelArgs):
    """The exact predictor: every layer's activation-deciding rows (gate for gated FFNs, up
    otherwise) kept as the store holds them and multiplied by the same kernels as the FFN, so
    it selects exactly the neurons the FFN kernel finds active. Holds every layer's bundles
    (the whole FFN) in RAM, so it is a quality ceiling and a test tool for small models, not a
    way to save I/O."""
    from flashinfer.weights import kernel_product
    from predictors.sparsity import OraclePredictor

    weights, biases = [], []
    for layer, spec in enumerate(reader.manifest.ffn_layers):
        views = bundle_views(reader.read_bundles(layer, np.arange(spec.n_neurons)), spec)
        weights.append(views.gate if args.gated_ffn else views.up)
        biases.append(views.gate_bias if args.gated_ffn else views.up_bias)
    return OraclePredictor(weights, biases, product=kernel_product)
