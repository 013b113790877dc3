"""FFN computed from the store's row-column bundles (storage/format.py).

`bundle_views` turns a uint8 [n, bundle_bytes] block of bundles, straight from the reader
or from the neuron cache, into the component arrays the `ffn_rows` kernel takes: no copy,
just strided views. `FlashFFN` is the dense FFN from a store: a layer it keeps resident is
read from flash once (the first token) and stays in DRAM; any other layer is streamed, every
neuron read from flash for every token (the paper's naive baseline). Which layers stay is
the caller's budget decision (flashinfer/memory.py, `resident_layers`).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from flashinfer import kernels as K
from flashinfer.config import ModelArgs
from flashinfer.memory import ffn_layer_bytes
from flashinfer.weights import EMPTY, NO_SCALES, Matrix, interleave_rows, matrix_from_quantized
from storage import quant
from storage.format import BundleComponent, FFNLayer
from storage.reader import ReadStats, aligned_buffer, planar_tensor

_DATA_DTYPE = {"f32": np.float32, "f16": np.uint16, "q8": np.int8, "q4": np.uint8, "q4a": np.uint8, "q4k": np.uint8}


class BundleViews(NamedTuple):
    up: Matrix
    gate: Matrix  # zero rows for ungated FFNs; a layer keeping W_gate whole (--ffn-gate rows): that
    # matrix when the layer's matrices were given (the dense path, rows in neuron order), else zero rows
    down: Matrix  # the bundles' down columns [n, dim], or W_down's rows [dim, n] (down_rows)
    up_bias: np.ndarray  # EMPTY without biases
    gate_bias: np.ndarray
    group: int
    down_rows: bool  # down is the layer's whole W_down (format.FFNMatrix), computed by kernels.ffn_down_rows


def _component_matrix(bundles: np.ndarray, c: BundleComponent) -> Matrix:
    """A component's fields (storage/quant.py's row record) as the kernels take them: f16 bits
    and f16 scales as uint16; q4k's packed scale bytes as they are."""
    data_bytes, scale_bytes, min_bytes = quant.field_bytes(c.scheme, c.length, c.group_size)
    at = c.offset + data_bytes
    data = bundles[:, c.offset : at].view(_DATA_DTYPE[c.scheme])
    if not scale_bytes:  # f32, f16
        return Matrix(data)
    scales = bundles[:, at : at + scale_bytes]
    mins = bundles[:, at + scale_bytes : at + scale_bytes + min_bytes]
    if c.scheme != "q4k":
        scales, mins = scales.view(np.uint16), (mins.view(np.uint16) if min_bytes else NO_SCALES)
    return Matrix(data, scales, mins, c.group_size)


def bundle_views(bundles: np.ndarray, layer: FFNLayer, matrices: np.ndarray | None = None) -> BundleViews:
    """The component views of a layer's bundles [n, bundle_bytes]; `matrices`: the bytes of the
    layer file after its bundles (FFNLayer.matrices, offsets relative to the bundles' end),
    where the layer keeps W_down as rows."""
    up = _component_matrix(bundles, layer.component("up"))
    gate_spec = layer.component("gate")
    gate = _component_matrix(bundles, gate_spec) if gate_spec else Matrix(np.zeros((0, 0), up.data.dtype))

    def bias(name: str) -> np.ndarray:
        c = layer.component(name)
        return EMPTY if c is None else bundles[:, c.offset : c.offset + 4].view(np.float32)[:, 0]

    def whole(m) -> Matrix:
        at = m.offset - layer.n_neurons * layer.bundle_bytes
        return matrix_from_quantized(planar_tensor(matrices[at : at + m.nbytes], m.scheme, m.group_size, m.shape))

    rows, gate_rows = layer.matrix("down"), layer.matrix("gate")
    down = _component_matrix(bundles, layer.component("down")) if rows is None else whole(rows)
    if gate_rows is not None and matrices is not None:
        gate = whole(gate_rows)
    return BundleViews(up, gate, down, bias("up_bias"), bias("gate_bias"), up.group, rows is not None)


def interleave_in_place(m: Matrix) -> Matrix:
    """m with its rows in lanes (weights.interleave_rows: codes, scales and mins, the same bytes
    each) in the memory they occupy (a resident layer's buffer: no second copy kept), or m itself
    where the kernels take its rows plain."""
    woven = interleave_rows(m)
    if woven is m:
        return m
    placed = []
    for old, new in zip((m.data, m.scales, m.mins), (woven.data, woven.scales, woven.mins)):
        if old.size:
            old.reshape(-1)[:] = new.reshape(-1)  # reshape(-1) of a contiguous array: a view
        placed.append(old.reshape(new.shape))
    return m._replace(data=placed[0], scales=placed[1], mins=placed[2])


def interleave_dense_layer(bundles: np.ndarray, views: BundleViews) -> BundleViews:
    """A resident layer of the dense rows path (views.down_rows) as matrices in lanes in its own
    buffer: W_down's rows laid out where they lie (interleave_in_place), and the bundles' up and
    gate rows, strided views a neuron apart, rewritten over the bundles [n, bundle_bytes] as whole
    matrices (codes in lanes, then scales, mins and biases, each contiguous), which
    the same bytes hold. The views as they were where a matrix would stay plain (weights.
    interleave_rows) or the gate is a layer matrix of its own (--ffn-gate rows)."""
    views = views._replace(down=interleave_in_place(views.down))
    gated = views.gate.data.shape[0] > 0
    rows = [views.up] + ([views.gate] if gated else [])
    if views.down.data.ndim != 3 or not all(np.may_share_memory(m.data, bundles) for m in rows):
        return views
    woven = [interleave_rows(m) for m in rows]
    if any(w is m for w, m in zip(woven, rows)):
        return views
    # copies first: every field below is read out of the bundles the writes overwrite
    fields = [np.ascontiguousarray(a) for m in woven for a in (m.data, m.scales, m.mins)]
    fields += [np.ascontiguousarray(views.up_bias), np.ascontiguousarray(views.gate_bias)]
    region, at, placed = bundles.reshape(-1), 0, []
    for a in fields:
        at = -(-at // 64) * 64  # each field on a cache line
        if at + a.nbytes > region.size:  # cannot happen: the bundles hold these bytes and more
            return views
        region[at : at + a.nbytes] = a.reshape(-1).view(np.uint8)
        placed.append(region[at : at + a.nbytes].view(a.dtype).reshape(a.shape))
        at += a.nbytes
    matrices = [m._replace(data=placed[3 * i], scales=placed[3 * i + 1], mins=placed[3 * i + 2])
                for i, m in enumerate(woven)]
    return views._replace(up=matrices[0], gate=matrices[1] if gated else views.gate, up_bias=placed[-2],
                          gate_bias=placed[-1])


def layer_matrix_bytes(layer: FFNLayer) -> int:
    """Bytes of the layer file from the end of its bundles to the end of its last matrix."""
    return ffn_layer_bytes(layer) - layer.n_neurons * layer.bundle_bytes


# rows * dim from which the FFN over bundles runs on all cores. Measured in a real decode
# (SmolLM2-135M, q4 bundles of 1536 x 576 per layer, all resident, 2 cores, alternating in one
# process): serial 35 tok/s, FFN parallel 50; the lm_head on both cores too (kernels.matmul's
# PARALLEL_MIN_WORK) 52; every matmul of a layer as well 45. An older measurement (the
# workqueue layer, a busy second core) halved tokens/s with a parallel FFN: numba now runs
# on OpenMP, whose threads spin between regions instead of sleeping.
FFN_PARALLEL_MIN_ELEMENTS = 1 << 19


class PartialSums:
    """Per-thread scratch of ffn_rows_parallel, grown to the largest chunk of tokens seen."""

    def __init__(self, dim: int):
        import numba

        self.array = np.zeros((numba.get_num_threads(), 1, dim), np.float32)

    def get(self, n_tokens: int) -> np.ndarray:
        if self.array.shape[1] < n_tokens:
            self.array = np.zeros((self.array.shape[0], n_tokens, self.array.shape[2]), np.float32)
        return self.array


class HiddenScratch:
    """The hidden activations [T, n] (and the up products of gated FFNs) of ffn_down_rows: the
    model's RunState.hidden / .up once the model hands them over (use), else grown here."""

    def __init__(self):
        self.hidden = self.up = np.zeros((0, 0), np.float32)

    def use(self, hidden: np.ndarray, up: np.ndarray) -> None:
        self.hidden, self.up = hidden, up

    def ensure(self, n_tokens: int, n_neurons: int, gated: bool) -> None:
        if self.hidden.shape[0] < n_tokens or self.hidden.shape[1] < n_neurons:
            self.hidden = np.zeros((n_tokens, n_neurons), np.float32)
        if gated and (self.up.shape[0] < n_tokens or self.up.shape[1] < n_neurons):
            self.up = np.zeros((n_tokens, n_neurons), np.float32)


def ffn_over_bundles(x: np.ndarray, n_rows: int, views: BundleViews, act: int, out: np.ndarray,
                     partial: PartialSums | None = None, scratch: "HiddenScratch | None" = None) -> None:
    """The FFN over bundle rows 0..n_rows-1; split over threads (`partial` given) from
    FFN_PARALLEL_MIN_ELEMENTS rows x dim on (see there). A layer with W_down as rows runs
    as three matmuls (kernels.ffn_down_rows) with `scratch`'s hidden activations."""
    v = views
    if v.down_rows:
        scratch.ensure(x.shape[0], n_rows, v.gate.data.shape[0] > 0)
        K.ffn_down_rows(x, v.up, v.up_bias, v.gate, v.gate_bias, v.down, act, scratch.up, scratch.hidden, out)
        return
    operands = (x, n_rows, v.up.data, v.up.scales, v.up.mins, v.gate.data, v.gate.scales, v.gate.mins,
                v.down.data, v.down.scales, v.down.mins, v.up_bias, v.gate_bias, v.group, act)
    if partial is not None and n_rows * x.shape[1] >= FFN_PARALLEL_MIN_ELEMENTS:
        K.ffn_rows_parallel(*operands, partial.get(x.shape[0]), out)
    else:
        K.ffn_rows(*operands, out)


def ffn_over_selected(x: np.ndarray, n_rows: int, ids: np.ndarray, coefs: np.ndarray, threshold: np.ndarray,
                      views: BundleViews, out: np.ndarray, partial: PartialSums | None = None) -> None:
    """The gate-threshold FFN over bundle rows 0..n_rows-1 (up rows and down columns; row r holds
    neuron ids[r]): kernels.ffn_rows_coef with coefs = act(gate.x) [T, n_neurons] and each neuron's
    threshold on |coef| (float32 [n_neurons]), split over
    threads from FFN_PARALLEL_MIN_ELEMENTS rows x dim on, as ffn_over_bundles is."""
    v = views
    operands = (x, n_rows, ids, coefs, threshold, v.up.data, v.up.scales, v.up.mins, v.down.data,
                v.down.scales, v.down.mins, v.up_bias, v.group)
    if partial is not None and n_rows * x.shape[1] >= FFN_PARALLEL_MIN_ELEMENTS:
        K.ffn_rows_coef_parallel(*operands, partial.get(x.shape[0]), out)
    else:
        K.ffn_rows_coef(*operands, out)


class FlashFFN:
    """The dense FFN from a store: layers in `resident` read once and kept in DRAM, the others
    streamed from flash every token (the paper's naive baseline when none is resident).

    With `read_ahead`, a streamed layer is read while the one before it computes (two layer
    buffers, flashinfer/read_ahead.py): the token's reads run back to back instead of waiting for
    each layer's compute. Without, one buffer and each read waits its turn (the naive baseline).

    With `gate` (a predictors.sparsity.GatePredictor's thresholds, on a --ffn-gate rows store) the
    layer's W_gate, read with it, decides per token which neurons' up and down run
    (ffn_over_selected): the gate predictor under a cap too small to keep every layer. Its
    selections (40-60% of a layer) are too dense for neuron-by-neuron reads to save bytes -- the
    reader reads through the gaps between misses -- so whole layers stream in long reads, one
    ahead, and as many as fit stay resident: what a cache of neurons would have held, without
    its misses scattered over every layer."""

    def __init__(self, reader, args: ModelArgs, resident: frozenset[int] = frozenset(), read_ahead: bool = False,
                 gate=None):
        self.reader = reader
        self.layers = reader.manifest.ffn_layers
        self.act = K.ACTS[args.act]
        self.all_ids = [np.arange(layer.n_neurons, dtype=np.int64) for layer in self.layers]
        self.resident = frozenset(resident)
        self.gate = gate
        self.row_ids = [np.arange(layer.n_neurons, dtype=np.int32) for layer in self.layers] if gate else None
        # layer -> its bundles once read (resident layers only); filled by the first forward
        self.resident_bundles: dict[int, np.ndarray] = {}
        streamed_layers = [i for i in range(len(self.layers)) if i not in self.resident]
        streamed = [reader.layer_file_bytes(i) for i in streamed_layers]  # ffn_layer_bytes, page-aligned
        self._ahead = None
        if read_ahead and streamed_layers:
            from flashinfer.read_ahead import ReadAhead

            after = {layer: streamed_layers[(k + 1) % len(streamed_layers)] for k, layer in enumerate(streamed_layers)}
            self._ahead = ReadAhead(max(streamed), lambda layer, whole: self._read_layer(layer, whole), after.get,
                                    "ffn-read")
            self._ahead_views: dict[tuple[int, int], BundleViews] = {}  # (layer, buffer) -> views
        # one streamed layer at a time, page-aligned for read_layer's O_DIRECT reads
        self.buffer = aligned_buffer(0 if self._ahead else max(streamed, default=0))
        self.hidden = HiddenScratch()  # for layers that keep W_down as rows
        # layer -> the component views of its bundles (resident: its own array; streamed: the
        # buffer), made once: building them per token cost 1.3 ms of a 22 ms SmolLM2 token
        self._views: dict[int, BundleViews] = {}
        self.partial = PartialSums(args.dim)
        self.tracer = None  # flashinfer.profile.Tracer while a traced generation runs

    @property
    def nbytes(self) -> int:
        ahead = self._ahead.nbytes if self._ahead is not None else 0
        return self.buffer.nbytes + ahead + sum(b.nbytes for b in self.resident_bundles.values())

    def _split(self, layer: int, whole: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(bundles [n_neurons, bundle_bytes], whole matrices' bytes): views of a layer's buffer."""
        spec = self.layers[layer]
        n_bundle_bytes = spec.n_neurons * spec.bundle_bytes
        return (whole[:n_bundle_bytes].reshape(spec.n_neurons, spec.bundle_bytes),
                whole[n_bundle_bytes : n_bundle_bytes + layer_matrix_bytes(spec)])

    def _read_layer(self, layer: int, whole: np.ndarray, counter=None) -> None:
        """Read layer `layer`'s bundles and whole matrices into `whole`, as they lie in its file:
        in long reads straight into it (StoreReader.read_layer), or bundle by bundle where the
        layer is compressed."""
        spec = self.layers[layer]
        if spec.compression == "none":
            self.reader.read_layer(layer, whole, counter)
            return
        bundles, matrices = self._split(layer, whole)
        self.reader.read_bundles(layer, self.all_ids[layer], out=bundles, counter=counter)
        for m in spec.matrices:
            at = m.offset - spec.n_neurons * spec.bundle_bytes
            self.reader.read_matrix(layer, m.name, out=matrices[at : at + m.nbytes], counter=counter)

    def _bundles(self, layer: int, counter) -> tuple[BundleViews, bool]:
        """(the views of the layer's bundles, whether they were read from flash now)."""
        spec = self.layers[layer]
        if layer in self.resident_bundles:
            return self._views[layer], False
        if self._ahead is not None and layer not in self.resident:
            whole = self._ahead.get(layer)  # read while the layer before computed
            key = (layer, 0 if whole is self._ahead.buffers[0] else 1)
            if key not in self._ahead_views:
                bundles, matrices = self._split(layer, whole)
                self._ahead_views[key] = bundle_views(bundles, spec, matrices)
            if counter is not None and self._ahead.last_fresh:
                counter.bytes_read += self.reader.layer_file_bytes(layer)
            return self._ahead_views[key], self._ahead.last_fresh
        whole = aligned_buffer(self.reader.layer_file_bytes(layer)) if layer in self.resident else self.buffer
        bundles, matrices = self._split(layer, whole)
        if layer in self.resident or layer not in self._views:
            self._views[layer] = bundle_views(bundles, spec, matrices)
        self._read_layer(layer, whole, counter)
        if layer in self.resident:
            self.resident_bundles[layer] = whole
            if self._views[layer].down_rows:  # read once, then streamed from DRAM every token: in lanes
                self._views[layer] = interleave_dense_layer(bundles, self._views[layer])
        return self._views[layer], True

    def close(self) -> None:
        if self._ahead is not None:
            self._ahead.close()

    def resident_views(self, layer: int) -> BundleViews | None:
        """The views of a resident layer's bundles once read (None before, and for streamed
        layers, and in gate mode, whose FFN is not the dense one kernels.decode_layer computes):
        what kernels.decode_layer computes the FFN from."""
        return self._views[layer] if layer in self.resident_bundles and self.gate is None else None

    def runs_parallel(self, layer: int, dim: int) -> bool:
        """Whether ffn_over_bundles splits this layer over threads (the same test)."""
        return self.layers[layer].n_neurons * dim >= FFN_PARALLEL_MIN_ELEMENTS

    def forward(self, layer: int, x: np.ndarray, out: np.ndarray) -> None:
        spec = self.layers[layer]
        tr = self.tracer
        counter = None if tr is None else ReadStats()
        t0 = 0.0 if tr is None else tr.now()
        views, was_read = self._bundles(layer, counter)
        read_end = t1 = 0.0 if tr is None else tr.now()
        selected = spec.n_neurons
        if self.gate is None:
            ffn_over_bundles(x, spec.n_neurons, views, self.act, out, self.partial, self.hidden)
        else:  # the gate decides from the layer's own W_gate which neurons' up and down run
            coefs = self.gate.coefficients_with(x, views.gate)
            if tr is not None:
                selected = int((np.abs(coefs) > self.gate.thresholds[layer]).any(axis=0).sum())
                t1 = tr.now()
                tr.ffn_part(layer, "predict", read_end, t1, neurons=selected)
            ffn_over_selected(x, spec.n_neurons, self.row_ids[layer], coefs, self.gate.thresholds[layer], views,
                              out, self.partial)
        if tr is None:
            return
        t2 = tr.now()
        if was_read:
            tr.ffn_part(layer, "read", t0, read_end, neurons=spec.n_neurons, bytes=counter.bytes_read)
        tr.ffn_part(layer, "ffn", t1, t2, rows=spec.n_neurons)
        loaded = selected if was_read else 0
        resident_rows = spec.n_neurons if layer in self.resident else 0
        tr.neurons(layer, selected, loaded, 0, resident_rows, resident_rows, counter.bytes_read)
