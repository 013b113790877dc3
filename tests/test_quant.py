"""storage/quant.py: error bounds, layouts byte by byte, row records, bad arguments."""

import numpy as np
import pytest

from storage import quant
from storage.errors import QuantError

GROUPED = ["q8", "q4", "q4a"]


def normal_weight(shape, seed=0, sigma=3.0):
    return (np.random.default_rng(seed).standard_normal(shape) * sigma).astype(np.float32)


def per_element(group_values: np.ndarray, group_size: int) -> np.ndarray:
    return np.repeat(group_values.astype(np.float32), group_size, axis=1)


# Bounds measured on 5 seeds of [64, 512] N(0, 3^2) (q8 0.54-0.60%, q4 9.8-10.9%,
# q4a 7.8-9.0%, f16 0.02%), set with a little margin.
@pytest.mark.parametrize("scheme,group,max_rel_rms", [
    ("q8", 32, 0.0075), ("q8", 64, 0.0075), ("q4", 32, 0.12), ("q4", 64, 0.12),
    ("q4a", 32, 0.10), ("q4a", 64, 0.10), ("f16", 32, 5e-4),
])
def test_round_trip_error(scheme, group, max_rel_rms):
    w = normal_weight((64, 512))
    qt = quant.quantize(w, scheme, group)
    back = quant.dequantize(qt)
    assert back.dtype == np.float32 and back.shape == w.shape
    rel_rms = np.sqrt(((back - w) ** 2).mean() / (w**2).mean())
    assert rel_rms < max_rel_rms
    if scheme in GROUPED:
        # every element within half a step of its group; for q4a also half an f16 ulp of the min
        # (the min is stored as f16); 1e-6 of the group's max covers float32 rounding
        bound = 0.5 * per_element(qt.scales, group)
        if qt.mins is not None:
            bound += 2.0**-11 * np.abs(per_element(qt.mins, group))
        group_max = per_element(np.abs(w).reshape(64, -1, group).max(axis=2), group)
        assert np.all(np.abs(back - w) <= bound + 1e-6 * group_max)


def test_f32_is_exact_and_f16_is_the_f16_cast():
    w = normal_weight((3, 40))  # ungrouped schemes take any row length
    qt = quant.quantize(w, "f32")
    assert qt.group_size == 0 and qt.scales is None and qt.mins is None
    np.testing.assert_array_equal(quant.dequantize(qt), w)
    qt = quant.quantize(w, "f16", 64)  # the group size is ignored and recorded as 0
    assert qt.group_size == 0 and qt.data.dtype == np.float16
    np.testing.assert_array_equal(quant.dequantize(qt), w.astype(np.float16).astype(np.float32))


def test_q4_layout_byte_by_byte():
    w = np.zeros((1, 32), np.float32)
    w[0, :4] = [7.0, -7.0, 1.0, 0.0]  # max |w| = 7 -> scale 1
    qt = quant.quantize(w, "q4", 32)
    assert qt.data.shape == (1, 16) and qt.data.dtype == np.uint8
    assert qt.scales[0, 0] == np.float16(1.0)
    # stored q+8: 15, 1, 9, 8 ; element 0 low nibble, element 1 high nibble
    assert qt.data[0, 0] == (15 | (1 << 4)) == 0x1F
    assert qt.data[0, 1] == (9 | (8 << 4)) == 0x89
    assert np.all(qt.data[0, 2:] == 0x88)
    # the record: 16 data bytes then the f16 scale 1.0 = 0x3C00, little-endian
    assert quant.row_bytes(qt, 0) == bytes([0x1F, 0x89] + [0x88] * 14 + [0x00, 0x3C])


def test_q8_layout_and_round_half_to_even():
    w = np.zeros((1, 32), np.float32)
    w[0, :6] = [127.0, -63.5, 0.5, 1.5, 2.5, -127.0]  # scale 1; ties go to the even integer
    qt = quant.quantize(w, "q8", 32)
    assert qt.scales[0, 0] == 1.0 and qt.data.dtype == np.int8
    assert list(qt.data[0, :6]) == [127, -64, 0, 2, 2, -127]
    record = quant.row_bytes(qt, 0)
    assert record[:6] == bytes([127, 0xC0, 0, 2, 2, 0x81]) and record[32:] == b"\x00\x3c"
    assert len(record) == quant.scheme_bytes_per_row("q8", 32, 32) == 34


def test_q4a_layout_byte_by_byte():
    w = np.linspace(-1.0, 2.0, 32, dtype=np.float32).reshape(1, 32)  # min -1, span 3 -> scale 0.2
    qt = quant.quantize(w, "q4a", 32)
    assert qt.mins[0, 0] == np.float16(-1.0) and qt.scales[0, 0] == np.float16(0.2)
    s, m = np.float32(qt.scales[0, 0]), np.float32(-1.0)
    expected = np.clip(np.rint((w[0] - m) / s), 0, 15).astype(np.uint8)
    assert expected[0] == 0 and expected[31] == 15
    np.testing.assert_array_equal(qt.data[0], expected[0::2] | (expected[1::2] << 4))
    record = quant.row_bytes(qt, 0)
    scale_bytes = np.float16(0.2).tobytes()  # f16 0.2 = 0x3266
    assert record == qt.data[0].tobytes() + scale_bytes + b"\x00\xbc"  # f16 -1.0 = 0xBC00
    assert scale_bytes == b"\x66\x32"


def test_symmetric_schemes_never_use_the_extra_negative_code():
    w = normal_weight((32, 256), seed=1)
    assert quant.quantize(w, "q8").data.min() >= -127
    nibbles = quant.quantize(w, "q4").data
    assert min((nibbles & 0x0F).min(), (nibbles >> 4).min()) >= 1  # stored -7 + 8


def test_zero_and_constant_groups_have_no_nan():
    w = np.zeros((3, 64), np.float32)
    w[1, 32:] = 1.0
    w[2, :32] = -0.3  # a constant group: q4a span 0 -> scale 0, value = the f16 min
    for scheme in GROUPED:
        qt = quant.quantize(w, scheme, 32)
        assert qt.scales[0, 0] == 0
        back = quant.dequantize(qt)
        assert np.isfinite(back).all()
        np.testing.assert_allclose(back, w, atol=1e-3)
        assert np.all(back[0] == 0)


@pytest.mark.parametrize("scheme", quant.SCHEMES)
@pytest.mark.parametrize("group", [32, 64])
def test_row_bytes_round_trip(scheme, group):
    k = 512 if scheme in ("q4k", "q6k") else 128  # q4k/q6k: whole super-blocks of 256, their own groups
    w = normal_weight((5, k), seed=2)
    if scheme == "q4k" and group != 32:
        with pytest.raises(QuantError, match="group size 64 is not supported for q4k; use 32"):
            quant.quantize(w, scheme, group)
        return
    if scheme == "q6k":
        with pytest.raises(QuantError, match=f"group size {group} is not supported for q6k; use 16"):
            quant.quantize(w, scheme, group)
        group = 16
    qt = quant.quantize(w, scheme, group)
    buf = b"".join(quant.row_bytes(qt, i) for i in range(5))
    assert len(buf) == 5 * quant.scheme_bytes_per_row(scheme, k, group) == 5 * qt.bytes_per_row
    back = quant.rows_from_bytes(buf, scheme, k, group, 5)
    for name in ("data", "scales", "mins"):
        expected, got = getattr(qt, name), getattr(back, name)
        assert (expected is None and got is None) or np.array_equal(expected, got)
    one_row = quant.rows_from_bytes(memoryview(buf)[: qt.bytes_per_row], scheme, k, group, 1)
    np.testing.assert_array_equal(quant.dequantize(one_row), quant.dequantize(qt)[:1])


@pytest.mark.parametrize("scheme", quant.SCHEMES)
def test_row_records_round_trip(scheme):
    k = 256 if scheme in ("q4k", "q6k") else 64
    w = normal_weight((5, k), seed=3)
    group = quant.group_size_of(scheme, 32) or 32  # f32/f16 ignore it
    qt = quant.quantize(w, scheme, group)
    records = quant.row_records(qt)
    assert records.shape == (5, quant.scheme_bytes_per_row(scheme, k, group))
    back = quant.rows_from_records(records, scheme, k, group)
    np.testing.assert_array_equal(quant.dequantize(back), quant.dequantize(qt))


def test_bytes_per_row():
    assert quant.scheme_bytes_per_row("q4", 4096, 32) == 2048 + 256
    assert quant.scheme_bytes_per_row("q4a", 4096, 64) == 2048 + 256
    assert quant.scheme_bytes_per_row("q4a", 4096, 32) == 2048 + 512
    assert quant.scheme_bytes_per_row("q8", 4096, 32) == 4096 + 256
    assert quant.scheme_bytes_per_row("f16", 4096, 32) == 8192
    assert quant.scheme_bytes_per_row("f32", 4096, 0) == 16384
    assert quant.scheme_bytes_per_row("q4k", 4096, 32) == 2048 + 2 * (128 + 32)  # 4.625 bits; ggml's Q4_K 4.5
    assert quant.scheme_bytes_per_row("q6k", 4096) == 4096 + 256 + 32  # 8.5625 bits; ggml's Q6_K 6.5625


def test_bad_arguments_are_named():
    with pytest.raises(QuantError, match=r"shape \(2, 48\) to q4: row length 48 is not a multiple of the q4 group size 32"):
        quant.quantize(np.zeros((2, 48), np.float32), "q4", 32)
    with pytest.raises(QuantError, match=r"row length 96 is not a multiple of the q8 group size 64"):
        quant.scheme_bytes_per_row("q8", 96, 64)
    with pytest.raises(QuantError, match="group size 16 is not supported for q8; use one of 32, 64"):
        quant.quantize(np.zeros((2, 64), np.float32), "q8", 16)
    with pytest.raises(QuantError, match="unknown quantization scheme 'q3'; expected one of f32, f16, q8, q4, q4a, q4k, q6k"):
        quant.quantize(np.zeros((2, 64), np.float32), "q3")
    with pytest.raises(QuantError, match=r"takes a 2-D \[rows, K\] weight, got shape \(64,\)"):
        quant.quantize(np.zeros(64, np.float32), "q8")
    with pytest.raises(QuantError, match="takes a floating-point weight, got int32"):
        quant.quantize(np.zeros((2, 64), np.int32), "q8")
    with pytest.raises(QuantError, match="contains NaN or infinity"):
        quant.quantize(np.full((2, 64), np.nan, np.float32), "q4")
    with pytest.raises(QuantError, match="scales of a tensor of shape \\(1, 32\\) overflow float16"):
        quant.quantize(np.full((1, 32), 1e9, np.float32), "q8")
    with pytest.raises(QuantError, match=r"100 bytes cannot hold 2 q8 rows of 64 weights \(group 32\): expected 2 x 68 = 136"):
        quant.rows_from_bytes(bytes(100), "q8", 64, 32, 2)


def test_quantized_tensor_checks_its_arrays():
    with pytest.raises(QuantError, match=r"needs scales float16 \(1, 2\), got None"):
        quant.QuantizedTensor("q8", 32, (1, 64), np.zeros((1, 64), np.int8), None, None)
    with pytest.raises(QuantError, match=r"needs data uint8 \(1, 32\), got int8 \(1, 64\)"):
        quant.QuantizedTensor("q4", 32, (1, 64), np.zeros((1, 64), np.int8), np.zeros((1, 2), np.float16), None)


def test_bundles_refuse_what_their_kernels_cannot_run():
    # one group size per layer's bundles (q6k's 16 is not it), and q4k's super-blocks run along rows
    from storage.errors import StorageError
    from storage.writer import bundle_layout

    with pytest.raises(StorageError, match=r"an FFN bundle's up cannot be q6k \(groups of 16; a bundle's components "
                                           r"share groups of 32\): use q8, or q6k only for whole matrices"):
        bundle_layout(["up", "down"], 256, {"up": "q6k", "down": "q8"}, 32)
    with pytest.raises(StorageError, match=r"a down column cannot be q4k \(its super-blocks run along rows\); use q8"):
        bundle_layout(["up", "down"], 256, "q4k", 32)
