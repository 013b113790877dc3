import os
from pathlib import Path

import numpy as np
import pytest
from hypothesis import settings

# tests/test_fuzz.py: a bounded, deterministic run in `make test`; many more examples in `make test-all`
settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("thorough", max_examples=600, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("FLASHINFER_HYPOTHESIS_PROFILE", "ci"))

# Engine.open warms only the first decode token here: most of the suite's engines never decode a
# second one, and the full warm-up compiles each model type's one-call block (~20-50 s cold);
# test_engine's warm-up test runs the default
os.environ.setdefault("FLASHINFER_WARM_UP", "first-token")
# ... and decodes through the per-kernel path: each model type's one-call block (kernels.decode_layer)
# is a cold compile of 20-80 s; tests/test_store_decode.py turns it on to check it against that
# path for every model family, and the real model's test runs it as users do
os.environ.setdefault("FLASHINFER_FUSED_DECODE", "0")

FIXTURES = Path(__file__).parent / "fixtures"
GOLDEN_MODELS = ["llama", "mistral", "relu_llama", "qwen2", "gemma3", "opt", "opt_postln", "llama_bf16", "llama_f16_sharded"]


@pytest.fixture(autouse=True, scope="session")
def _store_cache(tmp_path_factory):
    """Stores converted from GGUF files and HF dirs by `run`/`chat`/... go to a temporary cache
    (subprocesses inherit it), never the user's ~/.cache."""
    os.environ["FLASHINFER_CACHE"] = str(tmp_path_factory.mktemp("flashinfer-cache"))


def interrupt_after(n_calls: int):
    """A convert progress callback that raises KeyboardInterrupt (as Ctrl-C would) on its
    n-th call: the conversion stops midway through writing the store."""
    calls = []

    def progress(done_bytes):
        calls.append(done_bytes)
        if len(calls) == n_calls:
            raise KeyboardInterrupt

    return progress


def load_golden(name: str) -> dict:
    with np.load(FIXTURES / name / "golden.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="session")
def engines():
    """Engines opened once per test session, by fixture name and KV cache element type (opening
    compiles nothing twice)."""
    from flashinfer import Engine

    opened = {}

    def get(name: str, kv_cache: str = "f16"):
        if (name, kv_cache) not in opened:
            opened[name, kv_cache] = Engine.open(FIXTURES / name, kv_cache=kv_cache)
        return opened[name, kv_cache]

    yield get
    for engine in opened.values():
        engine.close()


def roomy_cap() -> int:
    """A DRAM cap (bytes) for an engine opened inside the test process: the process's RSS now
    plus 1 GiB. A fixed cap broke in a clean clone, where a pytest worker had grown to 2.5 GB by
    the time these tests ran (the plan counts the whole process)."""
    import psutil

    return psutil.Process().memory_info().rss + 2**30


# The files whose cold runs are longest (numba compiles; tests/ durations, 2026-12-08: test_kernels
# ~440 s, test_store ~250, test_store_decode ~200, test_real_model ~70), collected first: `make test`
# hands whole files to its two processes in collection order (--dist loadfile), so the small files
# fill in behind the long ones instead of one long file starting last on a process and running alone.
LONGEST_FILES_FIRST = ("test_kernels.py", "test_store.py", "test_store_decode.py", "test_real_model.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the order within a file stays


def decode_fused_and_per_kernel(model, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """The logits of `ids` decoded one token at a time from an empty context, through the one-call
    blocks (kernels.decode_layer) and then through model.py's per-kernel path: [len(ids), vocab] each.
    Leaves every block on the per-kernel path."""
    runs = []
    for fused in (True, False):
        model._fusable = [fused] * len(model._fusable)
        model.reset()
        runs.append(np.array([model.forward(np.array([t])).copy() for t in ids]))
    return runs[0], runs[1]
