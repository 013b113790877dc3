"""What this machine allows at best: disk and DRAM bandwidth, and the per-token lower bound
they put on a runtime that reads `bytes_read` from disk and streams `bytes_touched` from
DRAM for every token. Measured in the same run as the benchmark it bounds, because on a
shared VM both move with the neighbours' load.

    python -m bench.roofline [--file MODEL.gguf] [--size 1GiB] [--mem 1GiB]

Disk: sequential reads of a file with O_DIRECT (storage.reader.open_direct, the store
reader's own), in 4 MiB blocks (a streaming reader's best case) and in 256 KiB blocks, the
store's chunk size, with one thread and with the store reader's thread count. Without
`--file` a scratch file of `--size` random bytes is written next to the working directory
and removed afterwards. Where the file system has no O_DIRECT the file is evicted from the
page cache first and after every block, so the figure is still the device's.

DRAM: a Numba sum over a float32 buffer much larger than the last-level cache (1 GiB by
default), on every core (prange) and on one, best of 3 passes: the rate at which a decode
step can stream weights it already holds.

Bound: `roofline_ms` = max(bytes_read / disk, bytes_touched / mem) per token (the best
figures measured: `Bandwidths.best_disk_bytes_per_s`, `best_mem_bytes_per_s`), the time
if reading overlapped computing perfectly; `overlap=False` gives their sum, the bound for a
runtime that waits for its reads before it computes (flashinfer without --prefetch,
llama.cpp faulting mmap pages).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

from bench.machine import machine_line
from storage.reader import DEFAULT_IO_THREADS, aligned_buffer, open_direct
from storage.units import parse_size

MiB = 1 << 20
DISK_BLOCKS = (4 * MiB, 256 * 1024)  # streaming reads; the store's checksum chunk (storage/format.py)
DEFAULT_FILE_BYTES = 1 << 30
DEFAULT_MEM_BYTES = 1 << 30  # >> any L3 on this class of machine (32 MiB here)
REPEATS = 3


def roofline_ms(bytes_read: float, bytes_touched: float, disk_bytes_per_s: float, mem_bytes_per_s: float,
                *, overlap: bool = True) -> float:
    """Lower bound on the milliseconds per token of a runtime that reads `bytes_read` from
    disk and streams `bytes_touched` from DRAM per token: the slower of the two when reads
    overlap compute (`overlap`), their sum when they do not."""
    if disk_bytes_per_s <= 0 or mem_bytes_per_s <= 0:
        raise ValueError(f"bandwidths must be positive, got disk {disk_bytes_per_s}, mem {mem_bytes_per_s} B/s")
    if bytes_read < 0 or bytes_touched < 0:
        raise ValueError(f"byte counts cannot be negative, got read {bytes_read}, touched {bytes_touched}")
    disk_s, mem_s = bytes_read / disk_bytes_per_s, bytes_touched / mem_bytes_per_s
    return 1e3 * (max(disk_s, mem_s) if overlap else disk_s + mem_s)


# ---- disk ------------------------------------------------------------------------------

def _evict(fd: int) -> None:
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def disk_read_bytes_per_s(path: str | os.PathLike, block_bytes: int, *, threads: int = 1,
                          max_bytes: int | None = None) -> float:
    """Bytes per second reading `path` from the start in `block_bytes` blocks, bypassing the
    page cache; `threads` readers take blocks in turn (queue depth `threads`)."""
    size = os.path.getsize(path)
    if max_bytes is not None:
        size = min(size, max_bytes)
    n_blocks = size // block_bytes  # whole blocks only: O_DIRECT reads are aligned
    if n_blocks < threads:
        raise ValueError(f"{path}: {size} bytes hold fewer than {threads} blocks of {block_bytes} bytes")
    fd, direct = open_direct(path)
    try:
        if not direct:
            _evict(fd)
        buffers = [aligned_buffer(block_bytes) for _ in range(threads)]

        def reader(worker: int) -> None:
            view = memoryview(buffers[worker])
            for block in range(worker, n_blocks, threads):
                offset = block * block_bytes
                done = 0
                while done < block_bytes:
                    n = os.preadv(fd, [view[done:]], offset + done)
                    if n <= 0:
                        raise OSError(f"{path}: short read at byte {offset + done}")
                    done += n
                if not direct:
                    os.posix_fadvise(fd, offset, block_bytes, os.POSIX_FADV_DONTNEED)

        t0 = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(reader, range(threads)))
        return n_blocks * block_bytes / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def write_scratch_file(directory: str | os.PathLike, nbytes: int) -> Path:
    """A file of `nbytes` incompressible bytes, synced and evicted from the page cache."""
    fd, name = tempfile.mkstemp(prefix=".roofline-", dir=directory)
    rng = np.random.default_rng(0)
    try:
        chunk = 64 * MiB
        for start in range(0, nbytes, chunk):
            os.write(fd, rng.integers(0, 256, min(chunk, nbytes - start), dtype=np.uint8).tobytes())
        os.fsync(fd)
        _evict(fd)
    finally:
        os.close(fd)
    return Path(name)


# ---- DRAM ------------------------------------------------------------------------------

@njit(cache=True, nogil=True, fastmath=True)
def _sum_serial(values):
    total = np.float32(0.0)
    for i in range(values.size):
        total += values[i]
    return total


@njit(cache=True, nogil=True, fastmath=True, parallel=True)
def _sum_parallel(values, n_parts):
    part = (values.size + n_parts - 1) // n_parts
    partial = np.zeros(n_parts, np.float32)
    for p in prange(n_parts):
        stop = min(values.size, (p + 1) * part)
        acc = np.float32(0.0)
        for i in range(p * part, stop):
            acc += values[i]
        partial[p] = acc
    return partial.sum()


def mem_read_bytes_per_s(nbytes: int = DEFAULT_MEM_BYTES, *, parallel: bool = True, repeats: int = REPEATS) -> float:
    """Best-of-`repeats` bytes per second of a streaming sum over an `nbytes` float32 buffer."""
    values = np.ones(max(nbytes // 4, 1), np.float32)  # written once, so every page is real
    n_parts = numba.get_num_threads()
    run = (lambda: _sum_parallel(values, n_parts)) if parallel else (lambda: _sum_serial(values))
    run()  # compile (or load from cache) outside the timing
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - t0)
    return values.nbytes / best


# ---- all figures at once -----------------------------------------------------------------

@dataclass(frozen=True)
class Bandwidths:
    disk_4mib_bytes_per_s: float  # sequential O_DIRECT, one thread
    disk_256kib_bytes_per_s: float  # the store's chunk size, one thread
    disk_256kib_threads_bytes_per_s: float  # the same with the store reader's thread count
    mem_bytes_per_s: float  # streaming sum, every core
    mem_one_core_bytes_per_s: float
    file: str
    file_bytes_read: int
    mem_buffer_bytes: int

    # The bound takes the best figure measured: on a shared machine one core can stream
    # faster than two that contend with a neighbour (measured 19.5 vs 11.6 GB/s).
    @property
    def best_disk_bytes_per_s(self) -> float:
        return max(self.disk_4mib_bytes_per_s, self.disk_256kib_bytes_per_s, self.disk_256kib_threads_bytes_per_s)

    @property
    def best_mem_bytes_per_s(self) -> float:
        return max(self.mem_bytes_per_s, self.mem_one_core_bytes_per_s)


def measure(file: str | os.PathLike | None = None, *, file_bytes: int = DEFAULT_FILE_BYTES,
            mem_bytes: int = DEFAULT_MEM_BYTES, scratch_dir: str | os.PathLike = ".") -> Bandwidths:
    """Every figure of this module: disk on `file` (or a scratch file of `file_bytes`), DRAM."""
    scratch = None if file is not None else write_scratch_file(scratch_dir, file_bytes)
    path = Path(file) if file is not None else scratch
    try:
        read = min(os.path.getsize(path), file_bytes)
        disk = [disk_read_bytes_per_s(path, block, max_bytes=read) for block in DISK_BLOCKS]
        disk_threads = disk_read_bytes_per_s(path, DISK_BLOCKS[1], threads=DEFAULT_IO_THREADS, max_bytes=read)
    finally:
        if scratch is not None:
            scratch.unlink()
    return Bandwidths(disk_4mib_bytes_per_s=disk[0], disk_256kib_bytes_per_s=disk[1],
                      disk_256kib_threads_bytes_per_s=disk_threads,
                      mem_bytes_per_s=mem_read_bytes_per_s(mem_bytes),
                      mem_one_core_bytes_per_s=mem_read_bytes_per_s(mem_bytes, parallel=False),
                      file=str(file) if file is not None else f"scratch file in {scratch_dir}",
                      file_bytes_read=read, mem_buffer_bytes=mem_bytes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--file", default=None, help="file to read (default: a scratch file of --size)")
    parser.add_argument("--size", default="1GiB", help="bytes of the file to read (default 1GiB)")
    parser.add_argument("--mem", default="1GiB", help="DRAM buffer to stream (default 1GiB)")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON line")
    opts = parser.parse_args()
    bw = measure(opts.file, file_bytes=parse_size(opts.size), mem_bytes=parse_size(opts.mem))
    if opts.json:
        print(json.dumps({**asdict(bw), "best_disk_bytes_per_s": bw.best_disk_bytes_per_s,
                          "best_mem_bytes_per_s": bw.best_mem_bytes_per_s}))
        return
    print("command: python -m bench.roofline " + " ".join(
        f"--{k} {v}" for k, v in (("file", opts.file), ("size", opts.size), ("mem", opts.mem)) if v)
        + (" --json" if opts.json else ""))
    print("machine:", machine_line())
    print(f"disk, {bw.file}, {bw.file_bytes_read / 2**20:.0f} MiB, O_DIRECT sequential:")
    print(f"  4 MiB blocks, 1 thread      {bw.disk_4mib_bytes_per_s / 1e9:6.2f} GB/s")
    print(f"  256 KiB blocks, 1 thread    {bw.disk_256kib_bytes_per_s / 1e9:6.2f} GB/s")
    print(f"  256 KiB blocks, {DEFAULT_IO_THREADS} threads   {bw.disk_256kib_threads_bytes_per_s / 1e9:6.2f} GB/s")
    print(f"DRAM, streaming sum over {bw.mem_buffer_bytes / 2**20:.0f} MiB, best of {REPEATS}:")
    print(f"  {numba.get_num_threads()} threads                   {bw.mem_bytes_per_s / 1e9:6.2f} GB/s")
    print(f"  1 thread                    {bw.mem_one_core_bytes_per_s / 1e9:6.2f} GB/s")
    print("per-token lower bound = max(bytes read / best disk, bytes touched / best DRAM); e.g. 100 MB read, "
          f"4 GB touched: {roofline_ms(100e6, 4e9, bw.best_disk_bytes_per_s, bw.best_mem_bytes_per_s):.0f} ms")


if __name__ == "__main__":
    main()
