"""flashinfer/read_ahead.py: a layer read while the one before computes, and the dense path that
streams its FFN layers through it (flash_ffn.FlashFFN's read_ahead)."""

import threading

import numpy as np
import pytest

from flashinfer.read_ahead import ReadAhead
from tests.conftest import FIXTURES


class Flash:
    """read(key, buffer) writes key into the buffer; records which reads ran on which thread."""

    def __init__(self, fail: int | None = None):
        self.reads: list[tuple[int, bool]] = []  # (key, on the caller's thread)
        self.fail = fail
        self.caller = threading.get_ident()

    def read(self, key: int, buffer: np.ndarray) -> None:
        self.reads.append((key, threading.get_ident() == self.caller))
        if key == self.fail:
            raise OSError(f"read of {key} failed")
        buffer[:] = key


def test_each_item_is_read_once_one_ahead_in_the_background():
    flash = Flash()
    ahead = ReadAhead(8, flash.read, lambda k: (k + 1) % 3)
    try:
        for key in [0, 1, 2, 0, 1, 2]:  # two tokens of three layers
            assert (ahead.get(key) == key).all() and ahead.last_fresh
            assert (ahead.get(key) == key).all() and not ahead.last_fresh  # asked again: no read
        ahead.get(0)
    finally:
        ahead.close()
    assert [k for k, _ in flash.reads] == [0, 1, 2, 0, 1, 2, 0, 1]
    assert flash.reads[0][1] and not any(sync for _, sync in flash.reads[1:])  # only the first waited
    assert ahead.nbytes == 2 * 4096  # two buffers, each rounded up to a page (O_DIRECT)


def test_a_jump_reads_what_is_asked_into_the_buffer_not_in_use():
    flash = Flash()
    ahead = ReadAhead(4, flash.read, lambda k: k + 1)
    try:
        first = ahead.get(5)  # 6 being read into the other buffer
        jumped = ahead.get(0)  # not 6: read now, into the buffer 6 went to (5's is then 1's)
        assert (jumped == 0).all() and jumped is not first
        assert (ahead.get(1) == 1).all()  # the read-ahead after the jump
    finally:
        ahead.close()
    assert [k for k, _ in flash.reads] == [5, 6, 0, 1, 2]


def test_a_failed_read_ahead_raises_in_the_get_that_needs_it():
    ahead = ReadAhead(4, Flash(fail=1).read, lambda k: k + 1)
    try:
        ahead.get(0)
        with pytest.raises(OSError, match="read of 1 failed"):
            ahead.get(1)
        assert (ahead.get(2) == 2).all()  # and the next get reads again
    finally:
        ahead.close()


def test_dense_layers_streamed_one_ahead_compute_what_waiting_reads_do(tmp_path):
    from flashinfer import Engine
    from flashinfer.convert import convert_checkpoint
    from flashinfer.flash_ffn import FlashFFN

    store = convert_checkpoint(FIXTURES / "llama", tmp_path / "store")
    ids = list(range(3, 40))
    with Engine.open(store, stream_ffn=True) as engine:  # the naive path: one buffer, each read waits
        assert engine.model.flash_ffn._ahead is None
        expected = engine.logits(ids)
        tokens = engine.generate(ids[:8], max_tokens=8, temperature=0).token_ids
        naive = engine.model.flash_ffn
        for resident in (frozenset(), frozenset({1})):  # every layer streamed, or one kept
            engine.model.flash_ffn = FlashFFN(naive.reader, engine.args, resident, read_ahead=True)
            try:
                # a resident layer's matrices are laid out in lanes (another order of summing)
                np.testing.assert_allclose(engine.logits(ids), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
                assert engine.generate(ids[:8], max_tokens=8, temperature=0).token_ids == tokens
                result = engine.generate(ids[:8], max_tokens=4, temperature=0, trace=True)
                per_token = engine.last_trace.summary()["bytes_read_per_token"]
                streamed = [spec for i, spec in enumerate(naive.layers) if i not in resident]
                if len(streamed) > 1:  # each streamed layer read every token
                    assert per_token >= sum(spec.n_neurons * spec.bundle_bytes for spec in streamed) > 0
                else:  # a lone streamed layer stays in its buffer: nothing read after the first token
                    assert per_token == 0
                assert result.usage.completion_tokens == 4
            finally:
                engine.model.flash_ffn.close()
        engine.model.flash_ffn = naive
