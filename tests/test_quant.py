"""storage/quant.py: layouts byte by byte, error bounds, records, bad arguments."""

import numpy as np
import pytest

from storage import quant
from storage.errors import QuantError

rng = np.random.default_rng(0)


@pytest.mark.parametrize("scheme,group,max_rel_rms", [("q8", 32, 0.01), ("q4", 32, 0.15), ("q4", 64, 0.17),
                                                      ("q4a", 32, 0.12), ("f16", 0, 1e-3)])
def test_round_trip_error(scheme, group, max_rel_rms):
    w = rng.standard_normal((16, 128)).astype(np.float32)
    qt = quant.quantize(w, scheme, group or 32)
    back = quant.dequantize(qt)
    rel_rms = np.sqrt(((back - w) ** 2).mean() / (w**2).mean())
    assert rel_rms < max_rel_rms
    if scheme in ("q8", "q4", "q4a"):
        # every element within half a quantization step (+ f16 rounding of the scale's effect)
        step = np.repeat(qt.scales.astype(np.float32), qt.group_size, axis=1)
        assert np.all(np.abs(back - w) <= step * 0.5 + 1e-3 * np.abs(w) + 1e-6)


def test_q4_layout_byte_by_byte():
    w = np.zeros((1, 32), np.float32)
    w[0, :4] = [7.0, -7.0, 1.0, 0.0]  # max |w| = 7 -> scale 1
    qt = quant.quantize(w, "q4", 32)
    assert qt.scales[0, 0] == np.float16(1.0)
    # stored q+8: 15, 1, 9, 8 ; element 0 low nibble, element 1 high nibble
    assert qt.data[0, 0] == (15 | (1 << 4))
    assert qt.data[0, 1] == (9 | (8 << 4))
    assert np.all(qt.data[0, 2:] == 8 | (8 << 4))


def test_q8_and_q4a_layout():
    w = np.zeros((1, 32), np.float32)
    w[0, :2] = [127.0, -63.5]
    qt = quant.quantize(w, "q8", 32)
    assert qt.scales[0, 0] == 1.0 and qt.data[0, 0] == 127 and qt.data[0, 1] in (-64, -63)
    w = np.linspace(-1.0, 2.0, 32, dtype=np.float32).reshape(1, 32)
    qt = quant.quantize(w, "q4a", 32)
    assert qt.mins[0, 0] == np.float16(-1.0) and qt.scales[0, 0] == np.float16(0.2)
    assert qt.data[0, 0] & 0x0F == 0 and qt.data[0, 15] >> 4 == 15


def test_zero_groups_have_no_nan():
    w = np.zeros((2, 64), np.float32)
    w[1, 32:] = 1.0
    for scheme in ("q8", "q4", "q4a"):
        back = quant.dequantize(quant.quantize(w, scheme, 32))
        assert np.isfinite(back).all()
        np.testing.assert_allclose(back, w, atol=1e-3)


@pytest.mark.parametrize("scheme", ["f32", "f16", "q8", "q4", "q4a"])
def test_row_records_round_trip(scheme):
    from storage.writer import _row_records

    w = rng.standard_normal((5, 64)).astype(np.float32)
    qt = quant.quantize(w, scheme, 32)
    records = _row_records(qt)
    assert records.shape == (5, quant.scheme_bytes_per_row(scheme, 64, 32))
    back = quant.rows_from_records(records, scheme, 64, 32)
    np.testing.assert_array_equal(quant.dequantize(back), quant.dequantize(qt))


def test_bytes_per_row():
    assert quant.scheme_bytes_per_row("q4", 4096, 32) == 2048 + 256
    assert quant.scheme_bytes_per_row("q4a", 4096, 64) == 2048 + 256
    assert quant.scheme_bytes_per_row("q8", 4096, 32) == 4096 + 256
    assert quant.scheme_bytes_per_row("f16", 4096, 32) == 8192


def test_bad_arguments_are_named():
    with pytest.raises(QuantError, match=r"row length 48 is not a multiple of the q4 group size 32"):
        quant.quantize(np.zeros((2, 48), np.float32), "q4", 32)
    with pytest.raises(QuantError, match="group size 16 is not supported"):
        quant.quantize(np.zeros((2, 64), np.float32), "q8", 16)
    with pytest.raises(QuantError, match="unknown quantization scheme 'q3'"):
        quant.quantize(np.zeros((2, 64), np.float32), "q3")
