"""zstd on FFN chunks: compression ratio and decompression speed for f16, q8 and q4 bundles,
against the disk's read speed, to decide whether compression pays.

Compression pays for a chunk only if reading the compressed bytes plus decompressing them
is faster than reading the raw bytes: ratio r, disk bandwidth D, decompression speed Z
(output bytes/s): pays when 1/(r*D) + 1/Z < 1/D.

    python -m bench.compression
"""

from __future__ import annotations

import time

import numpy as np
import zstandard

from bench.machine import machine_line
from storage import quant

DIM, NEURONS = 4096, 64  # one 256 KiB-ish chunk of Llama-7B-shaped bundles
DISK_BYTES_PER_S = 1.7e9  # this machine: sequential O_DIRECT in 4 MiB blocks (bench/io.py)


def chunk_bytes(scheme: str, rng) -> bytes:
    # weights of trained LLMs are close to normal with a few outliers; a Student-t keeps the tails
    w = (rng.standard_t(5, size=(NEURONS * 3, DIM)) * 0.02).astype(np.float32)
    return quant.row_records(quant.quantize(w, scheme, 32)).tobytes()


def main() -> None:
    rng = np.random.default_rng(0)
    print("command: python -m bench.compression")
    print("machine:", machine_line())
    print(f"{'scheme':6} {'level':>5} {'ratio':>6} {'decompress GB/s':>15} {'effective read GB/s':>20} {'raw read GB/s':>13}")
    for scheme in ("f16", "q8", "q4"):
        raw = chunk_bytes(scheme, rng)
        for level in (1, 3, 9):
            packed = zstandard.ZstdCompressor(level=level).compress(raw)
            d = zstandard.ZstdDecompressor()
            d.decompress(packed)
            t0 = time.perf_counter()
            repeats = 20
            for _ in range(repeats):
                d.decompress(packed)
            speed = len(raw) * repeats / (time.perf_counter() - t0)
            ratio = len(raw) / len(packed)
            effective = len(raw) / (len(packed) / DISK_BYTES_PER_S + len(raw) / speed)
            print(f"{scheme:6} {level:>5} {ratio:>6.3f} {speed / 1e9:>15.2f} {effective / 1e9:>20.2f} {DISK_BYTES_PER_S / 1e9:>13.2f}")


if __name__ == "__main__":
    main()
