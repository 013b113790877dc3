"""Numpy reference quantizers: the spec the numba quantized kernels are tested against.

Everything here is plain numpy and written for clarity, not speed. Another program must be
able to reimplement these layouts from this docstring alone.

Schemes
-------
``f32``  float32, stored as is.            ``f16``  float16 (IEEE half), round-to-nearest-even.
``q8``   int8, symmetric, one f16 scale per group.
``q4``   4-bit, symmetric, one f16 scale per group.
``q4a``  4-bit, asymmetric, one f16 scale and one f16 min per group.
``q4k``  ggml's Q4_K: 4-bit, asymmetric, super-blocks of 256 weights (8 groups of 32), each group
         with a 6-bit scale and min, each super-block with an f16 multiplier of each (d, dmin).
``q6k``  ggml's Q6_K: 6-bit codes -32..31 held in int8, super-blocks of 256 weights (16 groups of
         16), each group with an int8 scale, each super-block with an f16 multiplier d.

Groups
------
A weight is 2-D, ``[rows, K]``, row-major (for a linear layer ``[out, in]``). Groups are G
consecutive elements along the LAST axis, G in {32, 64} (q4k: 32; q6k: 16): group ``g`` of row ``r`` is
``w[r, g*G:(g+1)*G]``. K must be a positive multiple of G. (Groups run along the input
dimension because that is what one row's dot product consumes; a kernel walks a row group by
group with one scale in a register.) f16/f32 have no groups; their ``group_size`` is 0.

Quantization (float32 math throughout; ``rint`` is round-half-to-even)
------------------------------------------------------------------------
q8:  ``s16 = f16(max|w_g| / 127)``,  ``s = f32(s16)``,
     ``q = clip(rint(w / s), -127, 127)`` (0 when s == 0);   ``w' = q * s``.
     -128 is never produced, so kernels may negate freely.
q4:  ``s16 = f16(max|w_g| / 7)``, ``q = clip(rint(w / s), -8, 7)`` (0 when s == 0);
     stored as the nibble ``q + 8`` (0..15 holds -8..7);  ``w' = (nibble - 8) * s``.
q4a: ``m16 = f16(min w_g)``, ``m = f32(m16)``, ``s16 = f16(max(max w_g - m, 0) / 15)``,
     ``q = clip(rint((w - m) / s), 0, 15)`` (0 when s == 0);  ``w' = q * s + m``.
q4k (groups of 32 inside super-blocks of 256; K a multiple of 256; ggml's Q4_K arithmetic):
     per group ``s_g = (max w_g - min(min w_g, 0)) / 15`` and ``n_g = -min(min w_g, 0)``; per
     super-block ``d16 = f16(max s_g / 63)``, ``dmin16 = f16(max n_g / 63)``, ``sc_g =
     clip(rint(s_g / d), 0, 63)``, ``m_g = clip(rint(n_g / dmin), 0, 63)`` (0 where d or dmin is 0);
     then ``q = clip(rint((w + dmin m_g) / (d sc_g)), 0, 15)`` (0 where d sc_g == 0);
     ``w' = (d sc_g) q - dmin m_g``, products in float32 (exact: 11 x 6 bits). ggml's own
     quantizer searches each group's scale and min (make_qkx2_quants); this one takes the range,
     so a float checkpoint quantized here differs from llama-quantize's file, while a GGUF's Q4_K
     blocks convert to q4k exactly (its d, dmin, 6-bit scales/mins and nibbles, reordered).
q6k (groups of 16 inside super-blocks of 256; K a multiple of 256; ggml's Q6_K arithmetic):
     per group ``s_g = v_g / -32`` with v_g the group's value of largest magnitude (ggml aims it
     at level -32); per super-block ``d16 = f16(t / -128)`` with t the s_g of largest magnitude,
     ``sc_g = clip(rint(s_g / d), -128, 127)`` (0 where d is 0); then ``q = clip(rint(w / (d sc_g)), -32, 31)`` (0 where d sc_g == 0);
     ``w' = (d sc_g) q``, products in float32 in that order (gguf-py's and ggml's). Like q4k's,
     this quantizer takes the range where ggml's (make_qx_quants) searches the scale; a GGUF's
     Q6_K blocks convert to q6k exactly (its d, int8 scales and 6-bit codes, the codes unpacked
     into one int8 each: 8 bits a weight where ggml packs 6).
Against GGML (llama.cpp): ``q8`` keeps Q8_0's scale rule (max|w| -> 127, f16 scale, 32 per
group; Q8_0 divides by the unrounded scale and rounds half away from zero), so a Q8_0 GGUF
converts to a q8 store exactly. ``q4`` is NOT Q4_0: Q4_0 aims the signed extreme at level -8
(``d = w_max / -8``, all 16 levels, ``q = trunc(w/d + 8.5)``), q4 aims max|w| at +7; both
dequantize as ``(nibble - 8) * scale`` but on different grids, so converting a Q4_0 GGUF
re-rounds every group (at most half a q4 step per weight; tests/test_gguf.py measures it).
Q4_0 also packs element j and j+16 of a block into byte j, not 2j and 2j+1.
The scale is rounded to f16 BEFORE the division, so dequantization with the stored f16 scale
reproduces exactly the values quantization aimed at. An all-zero group gets scale 0 and
quantizes to zeros (no NaN). Non-finite weights, and weights whose scale or min would not fit
an f16 (|w| beyond ~65504 * qmax), raise ``QuantError``.

Arrays of a ``QuantizedTensor`` (shape ``[rows, K]``, ``n_groups = K // G``)
-----------------------------------------------------------------------------
f32:  data float32 [rows, K];             scales None;  mins None.
f16:  data float16 [rows, K];             scales None;  mins None.
q8:   data int8    [rows, K];             scales float16 [rows, n_groups];  mins None.
q4:   data uint8   [rows, K // 2];        scales float16 [rows, n_groups];  mins None.
q4a:  data uint8   [rows, K // 2];        scales float16 [rows, n_groups];
                                          mins   float16 [rows, n_groups].
q4k:  data uint8   [rows, K // 2];        scales uint8 [rows, n_groups + K // 128]: the groups'
                                          6-bit scales sc_g, then each super-block's d as f16 bytes;
                                          mins uint8 likewise: the m_g, then each dmin as f16 bytes.
q6k:  data int8    [rows, K] (q, -32..31); scales int8 [rows, K // 16 + K // 128]: the groups'
                                          sc_g, then each super-block's d as f16 bytes;  mins None.
4-bit packing: byte ``j`` of a row holds element ``2j`` in its LOW nibble (bits 0-3) and
element ``2j+1`` in its HIGH nibble (bits 4-7): ``byte = e[2j] | (e[2j+1] << 4)``.

Row record (the bytes of one row, contiguous, as written into the store)
------------------------------------------------------------------------
``[data][scales][mins]``, all little-endian, no padding:
  data:   f32: 4K bytes; f16: 2K bytes; q8/q6k: K bytes (int8); q4/q4a/q4k: K/2 bytes (packed as above)
  scales: q8/q4/q4a only, n_groups little-endian f16 (2 bytes each), group 0 first; q4k: its
          uint8 array as above (K/32 + K/128 bytes); q6k: its int8 array (K/16 + K/128 bytes)
  mins:   q4a only, n_groups little-endian f16; q4k: its uint8 array
so ``scheme_bytes_per_row`` is 4K, 2K, K + 2K/G, K/2 + 2K/G, K/2 + 4K/G respectively, and for
q4k K/2 + K/16 + K/64 (4.625 bits a weight; ggml's Q4_K packs the 6-bit values into 4.5), and
for q6k K + K/16 + K/128 (8.5625 bits a weight, q8's 8.5 plus the multipliers; ggml's 6.5625).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from storage.errors import QuantError

SCHEMES = ("f32", "f16", "q8", "q4", "q4a", "q4k", "q6k")
GROUPED_SCHEMES = ("q8", "q4", "q4a", "q4k", "q6k")
NIBBLE_SCHEMES = ("q4", "q4a", "q4k")
SUPER_BLOCK = 256  # q4k/q6k: weights per super-block (ggml's QK_K)
SUPER_BLOCK_SCHEMES = ("q4k", "q6k")
Q4K_SCALE_MAX = np.float32(63.0)  # 6-bit scales and mins
Q6K_GROUP = 16  # q6k: weights per int8 scale
Q6K_CODE_MIN, Q6K_CODE_MAX = -32, 31
Q6K_SCALE_MIN = -128  # q6k: the int8 scale the largest group scale is aimed at
GROUP_SIZES = (32, 64)
DEFAULT_GROUP_SIZE = 32

# Largest |q| the symmetric schemes aim max|w| at; q4 keeps -8 as clip headroom only.
Q8_MAX = np.float32(127.0)
Q4_MAX = np.float32(7.0)
Q4A_LEVELS = np.float32(15.0)
Q4_OFFSET = 8  # q4 symmetric nibble = q + 8

DATA_DTYPES = {"f32": np.dtype("<f4"), "f16": np.dtype("<f2"), "q8": np.dtype("i1"),
               "q4": np.dtype("u1"), "q4a": np.dtype("u1"), "q4k": np.dtype("u1"), "q6k": np.dtype("i1")}
SCALE_DTYPE = np.dtype("<f2")
SCALE_DTYPES = {"q4k": np.dtype("u1"), "q6k": np.dtype("i1")}  # the scales/mins arrays' dtype where it is not SCALE_DTYPE


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A 2-D weight in one scheme; see the module docstring for the exact array layouts."""

    scheme: str
    group_size: int  # 0 for f16/f32 (no groups)
    shape: tuple[int, int]  # the logical [rows, K] of the float weight
    data: np.ndarray
    scales: np.ndarray | None
    mins: np.ndarray | None

    def __post_init__(self) -> None:
        _check_layout(self)

    @property
    def bytes_per_row(self) -> int:
        return scheme_bytes_per_row(self.scheme, self.shape[1], self.group_size)


def check_scheme(scheme: str) -> None:
    if scheme not in SCHEMES:
        raise QuantError(f"unknown quantization scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")


FIXED_GROUPS = {"q4k": 32, "q6k": Q6K_GROUP}  # schemes whose group is part of the format


def group_size_of(scheme: str, requested: int) -> int:
    """The group a tensor stored in `scheme` gets when `requested` is asked for (a store's
    --group-size): 0 for f32/f16, the scheme's own for q4k/q6k, else `requested`."""
    check_scheme(scheme)
    if scheme not in GROUPED_SCHEMES:
        return 0
    return FIXED_GROUPS.get(scheme, requested)


def _group_size_for(scheme: str, group_size: int) -> int:
    """The group size a tensor of `scheme` records: the validated G, or 0 if ungrouped."""
    check_scheme(scheme)
    if scheme not in GROUPED_SCHEMES:
        return 0
    fixed = FIXED_GROUPS.get(scheme)
    if (group_size not in GROUP_SIZES and fixed is None) or (fixed is not None and group_size != fixed):
        use = str(fixed) if fixed is not None else f"one of {', '.join(map(str, GROUP_SIZES))}"
        raise QuantError(f"group size {group_size!r} is not supported for {scheme}; use {use}")
    return group_size


def _check_row_length(scheme: str, shape: tuple[int, ...], group_size: int) -> None:
    row_length = shape[-1]
    if row_length < 1:
        raise QuantError(f"cannot store a tensor of shape {tuple(shape)} as {scheme}: its rows are empty")
    if group_size and row_length % group_size:
        raise QuantError(f"cannot quantize a tensor of shape {tuple(shape)} to {scheme}: row length "
                         f"{row_length} is not a multiple of the {scheme} group size {group_size} "
                         f"(groups run along the last axis)")
    if scheme in SUPER_BLOCK_SCHEMES and row_length % SUPER_BLOCK:
        use = "q4a" if scheme == "q4k" else "q8"
        raise QuantError(f"cannot quantize a tensor of shape {tuple(shape)} to {scheme}: row length {row_length} "
                         f"is not a multiple of its super-block of {SUPER_BLOCK}; use {use}")


def _expected_arrays(scheme: str, rows: int, row_length: int, group_size: int):
    """(data shape, scales shape or None, mins shape or None) of a [rows, row_length] tensor."""
    data_cols = row_length // 2 if scheme in NIBBLE_SCHEMES else row_length
    if scheme == "q4k":  # the 6-bit values, then the super-blocks' f16 multipliers as bytes
        group_shape = (rows, row_length // group_size + 2 * (row_length // SUPER_BLOCK))
        return (rows, data_cols), group_shape, group_shape
    if scheme == "q6k":  # the int8 scales, then the super-blocks' f16 multipliers as bytes
        return (rows, data_cols), (rows, row_length // group_size + 2 * (row_length // SUPER_BLOCK)), None
    group_shape = (rows, row_length // group_size) if group_size else None
    return (rows, data_cols), group_shape, group_shape if scheme == "q4a" else None


def _check_layout(qt: QuantizedTensor) -> None:
    group_size = _group_size_for(qt.scheme, qt.group_size)
    if group_size != qt.group_size:
        raise QuantError(f"{qt.scheme} is not grouped; its group_size must be 0, not {qt.group_size}")
    if len(qt.shape) != 2:
        raise QuantError(f"a QuantizedTensor is 2-D, got shape {qt.shape}")
    _check_row_length(qt.scheme, qt.shape, group_size)
    data_shape, scales_shape, mins_shape = _expected_arrays(qt.scheme, *qt.shape, group_size)
    for name, array, shape, dtype in (("data", qt.data, data_shape, DATA_DTYPES[qt.scheme]),
                                      ("scales", qt.scales, scales_shape, scale_dtype(qt.scheme)),
                                      ("mins", qt.mins, mins_shape, scale_dtype(qt.scheme))):
        if shape is None:
            if array is not None:
                raise QuantError(f"{qt.scheme} tensor of shape {qt.shape} has {name}, but the scheme has none")
        elif array is None or array.shape != shape or array.dtype != dtype:
            got = "None" if array is None else f"{array.dtype} {array.shape}"
            raise QuantError(f"{qt.scheme} tensor of shape {qt.shape} (group {group_size}) needs {name} "
                             f"{dtype} {shape}, got {got}")


def scale_dtype(scheme: str) -> np.dtype:
    """The dtype of a scheme's scales and mins arrays."""
    return SCALE_DTYPES.get(scheme, SCALE_DTYPE)


def field_bytes(scheme: str, K: int, group_size: int | None = None) -> tuple[int, int, int]:
    """Bytes of (data, scales, mins) in one row record of K weights (0 where the scheme has none):
    the widths of a bundle component's fields and of a planar tensor's planes, per row.
    group_size None: the scheme's default (group_size_of)."""
    group_size = _group_size_for(scheme, group_size_of(scheme, DEFAULT_GROUP_SIZE) if group_size is None else group_size)
    _check_row_length(scheme, (K,), group_size)
    data_shape, scales_shape, mins_shape = _expected_arrays(scheme, 1, K, group_size)
    return (data_shape[1] * DATA_DTYPES[scheme].itemsize,
            *(0 if shape is None else shape[1] * scale_dtype(scheme).itemsize for shape in (scales_shape, mins_shape)))


def scheme_bytes_per_row(scheme: str, K: int, group_size: int | None = None) -> int:
    """Bytes of one row record (data + scales + mins) for a row of K weights."""
    return sum(field_bytes(scheme, K, group_size))


def _as_float32_matrix(w: np.ndarray) -> np.ndarray:
    w = np.asarray(w)
    if w.ndim != 2:
        raise QuantError(f"quantize takes a 2-D [rows, K] weight, got shape {w.shape}")
    if not np.issubdtype(w.dtype, np.floating):
        raise QuantError(f"quantize takes a floating-point weight, got {w.dtype} of shape {w.shape}")
    w = np.ascontiguousarray(w, dtype=np.float32)
    if not np.isfinite(w).all():
        raise QuantError(f"weight of shape {w.shape} contains NaN or infinity; it cannot be quantized")
    return w


def _to_f16(values: np.ndarray, what: str, scheme: str, shape: tuple[int, int]) -> np.ndarray:
    with np.errstate(over="ignore"):
        values16 = values.astype(SCALE_DTYPE)
    if not np.isfinite(values16).all():
        raise QuantError(f"{scheme} {what} of a tensor of shape {shape} overflow float16 "
                         f"(largest {float(np.abs(values).max()):.6g}); weights are too large for {scheme}")
    return values16


def _divide_or_zero(numerator: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """numerator / scale per group, 0 where the scale is 0 (an all-zero or constant group)."""
    scale = scale[..., None]
    return np.divide(numerator, scale, out=np.zeros_like(numerator), where=scale > 0)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """[rows, K] of 0..15 -> [rows, K//2] uint8, element 2j low nibble, 2j+1 high nibble."""
    values = values.astype(np.uint8)
    return values[:, 0::2] | (values[:, 1::2] << 4)


def _unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    rows, half = packed.shape
    values = np.empty((rows, half * 2), dtype=np.uint8)
    values[:, 0::2] = packed & 0x0F
    values[:, 1::2] = packed >> 4
    return values


def quantize(w: np.ndarray, scheme: str, group_size: int | None = None) -> QuantizedTensor:
    """Quantize a 2-D float weight [rows, K] along its last axis (see the module docstring);
    group_size None: the scheme's default (32, q6k's 16; none for f32/f16)."""
    group_size = _group_size_for(scheme, group_size_of(scheme, DEFAULT_GROUP_SIZE) if group_size is None else group_size)
    w = _as_float32_matrix(w)
    shape = (int(w.shape[0]), int(w.shape[1]))
    _check_row_length(scheme, shape, group_size)
    if scheme == "f32":
        return QuantizedTensor(scheme, 0, shape, w.copy(), None, None)
    if scheme == "f16":
        return QuantizedTensor(scheme, 0, shape, _to_f16(w, "weights", scheme, shape), None, None)

    groups = w.reshape(shape[0], shape[1] // group_size, group_size)
    if scheme == "q4k":
        return _quantize_q4k(groups, shape)
    if scheme == "q6k":
        return _quantize_q6k(groups, shape)
    if scheme == "q4a":
        mins16 = _to_f16(groups.min(axis=2), "group mins", scheme, shape)
        group_min = mins16.astype(np.float32)
        span = np.maximum(groups.max(axis=2) - group_min, np.float32(0))
        scales16 = _to_f16(span / Q4A_LEVELS, "scales", scheme, shape)
        shifted = groups - group_min[..., None]
        q = np.clip(np.rint(_divide_or_zero(shifted, scales16.astype(np.float32))), 0, 15)
        return QuantizedTensor(scheme, group_size, shape, pack_nibbles(q.reshape(shape)), scales16, mins16)

    q_max = Q8_MAX if scheme == "q8" else Q4_MAX
    scales16 = _to_f16(np.abs(groups).max(axis=2) / q_max, "scales", scheme, shape)
    q = np.rint(_divide_or_zero(groups, scales16.astype(np.float32))).reshape(shape)
    if scheme == "q8":
        return QuantizedTensor(scheme, group_size, shape, np.clip(q, -127, 127).astype(np.int8), scales16, None)
    nibbles = np.clip(q, -8, 7) + Q4_OFFSET
    return QuantizedTensor(scheme, group_size, shape, pack_nibbles(nibbles), scales16, None)


def _quantize_q4k(groups: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
    rows, k = shape
    low = np.minimum(groups.min(axis=2), np.float32(0))  # ggml's mins never go above 0
    span = groups.max(axis=2) - low  # [rows, groups]
    per_super = (rows, k // SUPER_BLOCK, SUPER_BLOCK // 32)
    d16 = _to_f16(span.reshape(per_super).max(axis=2) / np.float32(15) / Q4K_SCALE_MAX, "super-block scales", "q4k", shape)
    dmin16 = _to_f16((-low).reshape(per_super).max(axis=2) / Q4K_SCALE_MAX, "super-block mins", "q4k", shape)
    d, dmin = d16.astype(np.float32), dmin16.astype(np.float32)
    sc = np.clip(np.rint(_divide_or_zero((span / np.float32(15)).reshape(per_super), d)), 0, 63).astype(np.uint8)
    m = np.clip(np.rint(_divide_or_zero((-low).reshape(per_super), dmin)), 0, 63).astype(np.uint8)
    scales = (d[..., None] * sc).reshape(rows, -1)  # float32 products, exact
    offsets = (dmin[..., None] * m).reshape(rows, -1)
    q = np.clip(np.rint(_divide_or_zero(groups + offsets[..., None], scales)), 0, 15)
    return QuantizedTensor("q4k", 32, shape, pack_nibbles(q.reshape(shape)),
                           np.concatenate([sc.reshape(rows, -1), d16.view(np.uint8)], axis=1),
                           np.concatenate([m.reshape(rows, -1), dmin16.view(np.uint8)], axis=1))


def _quantize_q6k(groups: np.ndarray, shape: tuple[int, int]) -> QuantizedTensor:
    rows, k = shape
    per_super = (rows, k // SUPER_BLOCK, SUPER_BLOCK // Q6K_GROUP)
    # ggml's signs: the value of largest magnitude goes to level -32, the largest scale to -128
    peak = np.take_along_axis(groups, np.abs(groups).argmax(axis=2)[..., None], axis=2)[..., 0]
    s = (peak / np.float32(Q6K_CODE_MIN)).reshape(per_super)
    top = np.take_along_axis(s, np.abs(s).argmax(axis=2)[..., None], axis=2)[..., 0]
    d16 = _to_f16(top / np.float32(Q6K_SCALE_MIN), "super-block scales", "q6k", shape)
    d = d16.astype(np.float32)
    sc = np.clip(np.rint(np.divide(s, d[..., None], out=np.zeros_like(s), where=d[..., None] != 0)), -128, 127)
    scales = (d[..., None] * sc.astype(np.float32)).reshape(rows, -1, 1)  # float32 products, exact
    q = np.rint(np.divide(groups, scales, out=np.zeros_like(groups), where=scales != 0))
    q = np.clip(q, Q6K_CODE_MIN, Q6K_CODE_MAX).astype(np.int8).reshape(shape)
    return QuantizedTensor("q6k", Q6K_GROUP, shape, q,
                           np.concatenate([sc.astype(np.int8).reshape(rows, -1), d16.view(np.int8)], axis=1), None)


def q6k_group_scales(qt: QuantizedTensor) -> np.ndarray:
    """The scale d sc_g float32 [rows, K/16] of each group of a q6k tensor (float32 products)."""
    rows, k = qt.shape
    n_groups = k // Q6K_GROUP
    sc = qt.scales[:, :n_groups].astype(np.float32).reshape(rows, k // SUPER_BLOCK, -1)
    return (_multipliers(qt.scales, n_groups)[..., None] * sc).reshape(rows, n_groups)


def _multipliers(packed: np.ndarray, n_groups: int) -> np.ndarray:
    """float32 [rows, K/256]: the f16 super-block multipliers stored as bytes after a q4k/q6k
    row's n_groups group values."""
    return np.ascontiguousarray(packed[:, n_groups:]).view(SCALE_DTYPE).astype(np.float32)


def q4k_group_values(qt: QuantizedTensor) -> tuple[np.ndarray, np.ndarray]:
    """(scale, min) float32 [rows, K/32] of each group of a q4k tensor: d sc_g and -dmin m_g."""
    rows, k = qt.shape
    n_groups = k // 32
    out = []
    for packed, sign in ((qt.scales, 1), (qt.mins, -1)):
        six_bit = packed[:, :n_groups].astype(np.float32).reshape(rows, k // SUPER_BLOCK, -1)
        out.append((sign * _multipliers(packed, n_groups)[..., None] * six_bit).reshape(rows, n_groups))
    return out[0], out[1]


def dequantize(qt: QuantizedTensor) -> np.ndarray:
    """The float32 [rows, K] weight a QuantizedTensor stands for."""
    if qt.scheme in ("f32", "f16"):
        return qt.data.astype(np.float32)
    if qt.scheme == "q4k":
        scales, mins = q4k_group_values(qt)
        rows, k = qt.shape
        q = _unpack_nibbles(qt.data).astype(np.float32).reshape(rows, k // 32, 32)
        return (q * scales[..., None] + mins[..., None]).reshape(rows, k)
    if qt.scheme == "q6k":
        rows, k = qt.shape
        q = qt.data.astype(np.float32).reshape(rows, k // Q6K_GROUP, Q6K_GROUP)
        return (q6k_group_scales(qt)[..., None] * q).reshape(rows, k)
    rows, row_length = qt.shape
    if qt.scheme == "q8":
        q = qt.data.astype(np.float32)
    else:
        q = _unpack_nibbles(qt.data).astype(np.float32)
        if qt.scheme == "q4":
            q -= Q4_OFFSET
    groups = q.reshape(rows, row_length // qt.group_size, qt.group_size)
    values = groups * qt.scales.astype(np.float32)[..., None]
    if qt.mins is not None:
        values += qt.mins.astype(np.float32)[..., None]
    return values.reshape(rows, row_length)


def _bytes_of(array: np.ndarray | None, dtype: np.dtype, rows: int) -> list[np.ndarray]:
    if array is None:
        return []
    return [np.ascontiguousarray(array, dtype=dtype).view(np.uint8).reshape(rows, -1)]


def row_records(qt: QuantizedTensor) -> np.ndarray:
    """All row records as a uint8 [rows, bytes_per_row] array (layout in the module docstring)."""
    rows = qt.shape[0]
    parts = (_bytes_of(qt.data, DATA_DTYPES[qt.scheme], rows) + _bytes_of(qt.scales, scale_dtype(qt.scheme), rows)
             + _bytes_of(qt.mins, scale_dtype(qt.scheme), rows))
    return np.concatenate(parts, axis=1)


def row_bytes(qt: QuantizedTensor, i: int) -> bytes:
    """The record of row i: [data][scales][mins] as in the module docstring, little-endian."""
    rows = qt.shape[0]
    if not 0 <= i < rows:
        raise IndexError(f"row {i} out of range for a {qt.scheme} tensor of shape {qt.shape}")
    one_row = QuantizedTensor(qt.scheme, qt.group_size, (1, qt.shape[1]), qt.data[i:i + 1],
                              None if qt.scales is None else qt.scales[i:i + 1],
                              None if qt.mins is None else qt.mins[i:i + 1])
    return row_records(one_row).tobytes()


def rows_from_records(records: np.ndarray, scheme: str, K: int, group_size: int) -> QuantizedTensor:
    """Decode a uint8 [n_rows, bytes_per_row] array of row records (the inverse of row_records).

    The arrays of the result are copies, so `records` may be reused afterwards.
    """
    bytes_per_row = scheme_bytes_per_row(scheme, K, group_size)
    group_size = _group_size_for(scheme, group_size)
    records = np.asarray(records)
    if records.dtype != np.uint8 or records.ndim != 2 or records.shape[1] != bytes_per_row:
        raise QuantError(f"{scheme} row records of {K} weights (group {group_size}) are uint8 "
                         f"[n_rows, {bytes_per_row}], got {records.dtype} {records.shape}")
    arrays = []
    start = 0
    for width, dtype in zip(field_bytes(scheme, K, group_size), (DATA_DTYPES[scheme], scale_dtype(scheme), scale_dtype(scheme))):
        arrays.append(np.ascontiguousarray(records[:, start:start + width]).view(dtype) if width else None)
        start += width
    return QuantizedTensor(scheme, group_size, (records.shape[0], K), *arrays)


def rows_from_bytes(buf, scheme: str, K: int, group_size: int, n_rows: int) -> QuantizedTensor:
    """Decode n_rows consecutive row records from buf (bytes, memoryview, mmap or uint8 array)."""
    bytes_per_row = scheme_bytes_per_row(scheme, K, group_size)
    flat = np.frombuffer(buf, dtype=np.uint8)
    if flat.size != n_rows * bytes_per_row:
        raise QuantError(f"{flat.size} bytes cannot hold {n_rows} {scheme} rows of {K} weights "
                         f"(group {group_size}): expected {n_rows} x {bytes_per_row} = "
                         f"{n_rows * bytes_per_row} bytes")
    return rows_from_records(flat.reshape(n_rows, bytes_per_row), scheme, K, group_size)
