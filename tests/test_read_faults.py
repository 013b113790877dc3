"""Read faults mid-generation (issue 16): I/O errors, end-of-file and partial reads injected into
the store reader's positioned reads (StoreReader.preadv). A failed read ends the generation with
a ReadError naming the file and the fix; the neuron caches stay consistent (NeuronCache.check);
the same engine then generates exactly what a clean run does. A partial read is no fault at all:
the reader reads on. Each trial strikes at a seeded random read of a clean run's reads."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager

import numpy as np
import pytest

from flashinfer import Engine
from flashinfer.errors import ReadError
from flashinfer.sparse_ffn import SparseFFN
from tests.conftest import load_golden
from tests.test_store import stores  # noqa: F401  (module-scoped store fixture)

MAX_TOKENS = 6
KINDS = ("eio", "enospc", "eof", "partial")
# the dense path streaming every layer every token, and the sparse path through neuron caches
# of half a layer (a window of 1 token: they evict and read every token), with and without
# read-ahead on its own thread
CONFIGS = ("dense-streamed", "oracle", "oracle-prefetch")


class InjectedReads:
    """Stands in for a reader's preadv: counts reads, and from read number `at` on (until
    disarmed) fails every one as `kind` says; "partial" reads half the bytes asked, once."""

    def __init__(self, real):
        self.real, self.calls, self.at, self.kind, self.injected = real, 0, None, None, 0

    def arm(self, at: int, kind: str) -> None:
        self.calls, self.at, self.kind = 0, at, kind

    def disarm(self) -> None:
        self.at = None

    def __call__(self, fd, buffers, offset):
        self.calls += 1
        if self.at is None or self.calls <= self.at:
            return self.real(fd, buffers, offset)
        self.injected += 1
        if self.kind == "eof":
            return 0
        if self.kind == "partial":
            self.at = None  # once: the reader must ask again for the rest
            half = memoryview(buffers[0])[: max(1, len(buffers[0]) // 2)]
            return self.real(fd, [half], offset)
        code = {"eio": errno.EIO, "enospc": errno.ENOSPC}[self.kind]
        raise OSError(code, os.strerror(code))


def _caches_consistent(engine) -> None:
    for cache in getattr(engine.model.flash_ffn, "caches", []):
        cache.check()


def _trials(engine, ids, kinds, per_kind: int, seed: int) -> dict:
    """Run seeded faulty generations on `engine`; returns counts. Each ends in ReadError (or, for a
    partial read, in the clean text), then a clean generation must equal the first clean one."""
    reader = engine.model.flash_ffn.reader
    faults = reader.preadv = InjectedReads(reader.preadv)
    clean = engine.generate(ids, max_tokens=MAX_TOKENS, temperature=0).token_ids
    n_reads = faults.calls
    assert n_reads > MAX_TOKENS  # every config reads from flash during the generation
    rng = np.random.default_rng(seed)
    counts = {"faults": 0, "errors": 0, "recovered": 0}
    for kind in kinds:
        for at in rng.integers(0, n_reads, per_kind):
            faults.arm(int(at), kind)
            if kind == "partial":
                assert engine.generate(ids, max_tokens=MAX_TOKENS, temperature=0).token_ids == clean
            else:
                with pytest.raises(ReadError) as e:
                    engine.generate(ids, max_tokens=MAX_TOKENS, temperature=0)
                message = str(e.value)
                assert f"{reader.dir}/ffn/" in message and f"flashinfer check {reader.dir}" in message
                assert ("short read" if kind == "eof" else os.strerror(errno.EIO if kind == "eio" else errno.ENOSPC)
                        ) in message
                counts["errors"] += 1
            faults.disarm()
            _caches_consistent(engine)
            assert engine.generate(ids, max_tokens=MAX_TOKENS, temperature=0).token_ids == clean
            counts["recovered"] += 1
    counts["faults"] = faults.injected
    return counts


@contextmanager
def _engine(store, config: str):
    if config == "dense-streamed":
        with Engine.open(store, stream_ffn=True) as engine:
            yield engine
        return
    with Engine.open(store, predictor="oracle") as engine:
        old = engine.model.flash_ffn
        tight = SparseFFN(old.reader, engine.args, old.predictor, [spec.n_neurons // 2 for spec in old.layers],
                          window=1, prefetch=config == "oracle-prefetch")
        engine.model.flash_ffn = tight
        try:
            yield engine
        finally:
            tight.close()


@pytest.mark.parametrize("config", CONFIGS)
def test_a_read_fault_ends_the_generation_and_the_engine_recovers(stores, config):  # noqa: F811
    ids = load_golden("relu_llama")["prompt_ids"].tolist()
    with _engine(stores("relu_llama", "q8", "q8"), config) as engine:
        counts = _trials(engine, ids, KINDS, per_kind=2, seed=CONFIGS.index(config))
    assert counts["errors"] == 6 and counts["recovered"] == 8 and counts["faults"] >= 8


@pytest.mark.slow
@pytest.mark.parametrize("config", CONFIGS)
def test_many_read_faults(stores, config):  # noqa: F811
    ids = load_golden("relu_llama")["prompt_ids"].tolist()
    with _engine(stores("relu_llama", "q8", "q8"), config) as engine:
        counts = _trials(engine, ids, KINDS, per_kind=25, seed=100 + CONFIGS.index(config))
    assert counts["errors"] == 75 and counts["recovered"] == 100
    print(f"{config}: {counts}")
