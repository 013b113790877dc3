"""Compile a capped run's kernels in a child process, before the plan is made.

A run under `--dram` holds its whole budget once its caches fill; numba compiling a kernel on
top of that (LLVM peaks near 550 MB) pushed the first run of the Mistral-7B shape to 2112 MiB
of RSS under a 1907 MiB cap (2026-12-07), which a memory cgroup of that size kills. So before
the parent plans and allocates anything large, a child opens the same store with the same
settings but a small footprint — a few cache rows a layer (footprint_rows), one resident FFN layer, a 128-token
context — runs the engine's warm-up over every path (decode, the one-call block, prompts of
1, 2, 4, 8 and 64 tokens), which compiles every kernel into numba's on-disk cache
(the types are the same: sizes are values, not types), and exits, handing its memory back.
The parent then loads the machine code from that cache.

A stamp per configuration (store layout, predictor, KV cache, kernel sources, numba version)
beside numba's cache records that it was done, so later runs skip the child. No child where
numba cannot write its cache (a read-only install: the compile would not be kept) or with
FLASHINFER_PRECOMPILE=0. A child that fails (killed, or an error) costs nothing but time: the
parent compiles in-process, as before, and says so.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

ENV = "FLASHINFER_PRECOMPILE"  # "0": never run the child
FOOTPRINT_ROWS = 64  # neuron-cache rows a layer in the child, at least (a full layer's when it has fewer)


def footprint_rows(n_neurons: int, dim: int) -> int:
    """The child's cache rows for a layer: enough that a prompt's pass over them is long enough
    for the FFN's parallel kernels (flash_ffn.FFN_PARALLEL_MIN_ELEMENTS rows x dim), which a
    capped run's larger caches take; with 64 rows the child compiled only the serial ones."""
    from flashinfer.flash_ffn import FFN_PARALLEL_MIN_ELEMENTS

    return min(n_neurons, max(FOOTPRINT_ROWS, -(-2 * FFN_PARALLEL_MIN_ELEMENTS // dim)))


def cache_dir() -> Path:
    """Where numba keeps flashinfer's compiled kernels (and these stamps)."""
    configured = os.environ.get("NUMBA_CACHE_DIR")
    if configured:
        return Path(configured)
    return Path(__file__).resolve().parent / "kernels" / "__pycache__"


def _stamp(store: Path, options: dict) -> Path:
    import numba

    from flashinfer.kernels import sources_digest

    manifest = json.loads((Path(store) / "manifest.json").read_text())
    digest = hashlib.sha256()
    for part in (json.dumps({"quant": manifest.get("quant"), "model_config": manifest.get("model_config"),
                             "version": manifest.get("version"), "options": options}, sort_keys=True).encode(),
                 numba.__version__.encode(), sources_digest().encode()):
        digest.update(part)
    return cache_dir() / "precompiled" / digest.hexdigest()[:32]


def compile_in_child(store: Path, options: dict, notify=None) -> bool:
    """Run the warm-up of `store` opened with `options` (Engine.open's predictor, window,
    prefetch, stream_ffn, kv_cache) in a child process of small footprint, once per
    configuration. True when the kernels are in numba's cache (now or from before)."""
    if os.environ.get(ENV) == "0" or os.environ.get("NUMBA_DISABLE_JIT") == "1":
        return False
    stamp = _stamp(store, options)
    if stamp.exists():
        return True
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        probe = stamp.parent / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError:  # numba cannot keep what the child compiles either
        return False
    argv = [sys.executable, "-m", "flashinfer.precompile", str(store), json.dumps(options)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        if notify is not None:
            lines = proc.stderr.strip().splitlines()
            why = lines[-1] if lines else f"exit code {proc.returncode} (killed: out of memory?)"
            notify(f"note: compiling the kernels in a child process failed ({why}); compiling in this one, "
                   "whose peak memory may exceed the cap this first time")
        return False
    stamp.write_text(json.dumps(options, sort_keys=True) + "\n")
    return True


def main() -> None:
    from flashinfer.engine import WARM_UP_ENV, Engine
    from flashinfer.model import DEFAULT_CHUNK

    store, options = sys.argv[1], json.loads(sys.argv[2])
    os.environ[WARM_UP_ENV] = "all-paths"  # prompts of every length's kernels too (Engine._warm_up_prompt_paths)
    with Engine.open(store, ctx=2 * DEFAULT_CHUNK, convert=False, _footprint=True, **options):
        pass  # opening warmed the engine up: every kernel compiled (or loaded)


if __name__ == "__main__":
    main()
