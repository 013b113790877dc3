"""Flash reader throughput: bundle reads of 1%, 5%, 20% (and 100%) of a 7B-shaped FFN layer,
page cache bypassed (device speed) vs throttled to 1 GB/s, and over 1-8 reader threads.

Builds (once) a store of two Mistral-7B-shaped FFN layers (14336 neurons, dim 4096, q4,
6912-byte bundles, ~99 MB per layer) with random weights under out/bench-io/, then times
`StoreReader.read_bundles` on random neuron sets. Reads go to disk: the reader opens the
layer files with O_DIRECT, and the bench drops the files from the page cache first.

    python -m bench.io [--repeats 5]
    python -m bench.io --threads 4,16,32 --gaps 64KiB,256KiB --shares 0.1,0.2,1 --no-throttle

--gaps sets the reader's gap rule (read through a gap of unwanted bundles smaller than it:
storage/reader.py DEFAULT_GAP_BYTES). ms/read is what a layer waits for a read of that share:
when it is the same for a 10% and a 100% share, the disk is bound by requests, not bytes, and a
sparse selection spread over a layer costs as much as the layer.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from bench.machine import machine_line
from storage.reader import StoreReader
from storage.throttle import Throttle
from storage.writer import StoreWriter

STORE = Path("out/bench-io")
N_NEURONS, DIM, N_LAYERS = 14336, 4096, 2


def build_store() -> Path:
    if (STORE / "manifest.json").is_file():
        return STORE
    STORE.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def block(start: int, stop: int) -> dict:
        n = stop - start
        return {name: rng.standard_normal((n, DIM), dtype=np.float32) for name in ("up", "gate", "down")}

    with StoreWriter(STORE, model_config={}, hf_config={}, quant_config={"ffn": "q4"}, overwrite=True) as w:
        for layer in range(N_LAYERS):
            w.add_ffn_layer(layer, N_NEURONS, DIM, "q4", 32, block)
        w.finish()
    return STORE


def drop_cache(store: Path) -> None:
    for path in (store / "ffn").iterdir():
        fd = os.open(path, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def measure(reader: StoreReader, fraction: float, repeats: int, rng) -> tuple[float, float, int]:
    """(GB/s of wanted bundle bytes, GB/s transferred, requests per read) over `repeats` reads."""
    n = max(1, int(N_NEURONS * fraction))
    wanted = transferred = requests = 0
    elapsed = 0.0
    for i in range(repeats):
        ids = np.sort(rng.choice(N_NEURONS, n, replace=False))
        before = (reader.stats.bytes_read, reader.stats.bytes_wanted, reader.stats.requests)
        t0 = time.perf_counter()
        reader.read_bundles(i % N_LAYERS, ids)
        elapsed += time.perf_counter() - t0
        transferred += reader.stats.bytes_read - before[0]
        wanted += reader.stats.bytes_wanted - before[1]
        requests += reader.stats.requests - before[2]
    return wanted / elapsed / 1e9, transferred / elapsed / 1e9, requests // repeats


def main() -> None:
    import sys

    from storage.units import parse_size

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", default="1,2,4,8", help="reader threads to try (comma-separated)")
    parser.add_argument("--gaps", default="64KiB", help="gap rules to try (comma-separated sizes; default the reader's)")
    parser.add_argument("--shares", default="0.01,0.05,0.2,1", help="shares of a layer read (comma-separated)")
    parser.add_argument("--no-throttle", action="store_true", help="skip the rows throttled to 1 GB/s")
    opts = parser.parse_args()
    store = build_store()
    print("command: python -m bench.io " + " ".join(sys.argv[1:]))
    print("machine:", machine_line())
    print(f"layer: {N_NEURONS} neurons x {DIM} dim, q4 bundles; reads with O_DIRECT after dropping the page cache")
    print(f"{'threads':>7} {'gap':>6} {'throttle':>9} {'share':>6} {'MB/read':>8} {'req/read':>8} {'ms/read':>8} "
          f"{'wanted GB/s':>11} {'disk GB/s':>9}")
    rng = np.random.default_rng(1)
    for threads in (int(t) for t in opts.threads.split(",")):
        for gap in opts.gaps.split(","):
            for bw in (None, "1GB/s"):
                if bw and (threads != 4 or opts.no_throttle):
                    continue
                throttle = Throttle.for_options(bw)
                drop_cache(store)
                with StoreReader(store, io_threads=threads, throttle=throttle, gap_bytes=parse_size(gap)) as reader:
                    bundle = reader.manifest.ffn_layers[0].bundle_bytes
                    for fraction in (float(f) for f in opts.shares.split(",")):
                        wanted_bw, disk_bw, requests = measure(reader, fraction, opts.repeats, rng)
                        mb = N_NEURONS * fraction * bundle / 1e6
                        print(f"{threads:>7} {gap:>6} {bw or 'off':>9} {fraction:>6.0%} {mb:>8.1f} {requests:>8} "
                              f"{mb / 1e3 / wanted_bw * 1e3:>8.1f} {wanted_bw:>11.2f} {disk_bw:>9.2f}")


if __name__ == "__main__":
    main()
