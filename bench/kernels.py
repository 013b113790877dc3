"""Dense matmul kernel: numba parallel=True vs serial, for every store scheme (f32, f16, q8,
q4), decode (1 token) and prefill (16 tokens), Llama-7B FFN shape [11008, 4096].
Ratios in one run.

    python -m bench.kernels
"""

from __future__ import annotations

import time

import numpy as np

from bench.machine import machine_line
from flashinfer import kernels as K
from flashinfer.weights import NO_SCALES
from storage import quant

REPEATS = 5


def best_seconds(fn, *args) -> float:
    fn(*args)  # compile / warm
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    serial = K.matmul_serial  # same source, prange as range
    rng = np.random.default_rng(0)
    print("command: python -m bench.kernels")
    print("machine:", machine_line())
    print(f"{'weights':8} {'tokens':>6} {'serial ms':>10} {'parallel ms':>12} {'speedup':>8} {'parallel GB/s':>14}")
    for dtype in ("f32", "f16", "q8", "q4"):
        qt = quant.quantize(rng.standard_normal((11008, 4096), dtype=np.float32), dtype, 32)
        data = qt.data.view(np.uint16) if dtype == "f16" else qt.data
        scales = qt.scales.view(np.uint16) if qt.scales is not None else NO_SCALES
        weights = (data, scales, NO_SCALES, 32)
        nbytes = data.nbytes + scales.nbytes
        for n_tokens in (1, 16):
            x = rng.standard_normal((n_tokens, 4096)).astype(np.float32)
            out = np.empty((n_tokens, 11008), np.float32)
            no_bias = np.zeros(0, np.float32)
            t_serial = best_seconds(serial, x, *weights, no_bias, out)
            t_parallel = best_seconds(K.matmul, x, *weights, no_bias, out)
            print(f"{dtype:8} {n_tokens:>6} {t_serial * 1e3:>10.2f} {t_parallel * 1e3:>12.2f} "
                  f"{t_serial / t_parallel:>7.2f}x {nbytes / t_parallel / 1e9:>14.1f}")


if __name__ == "__main__":
    main()
