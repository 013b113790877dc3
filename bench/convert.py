"""Peak RSS and speed of `flashinfer convert` on a synthetic 7B checkpoint (streams, so RSS
must stay far below the 2 GB cap even though the checkpoint is 14.5 GB).

    python -m bench.convert [--preset mistral-7b-relu] [--quant q4] [--resident-quant q8]

Synthesizes the checkpoint under out/ once (about 2 minutes), then converts it in a child
process and reads that process's peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import machine_line


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="mistral-7b-relu")
    parser.add_argument("--quant", default="q4")
    parser.add_argument("--resident-quant", default="q8")
    opts = parser.parse_args()
    checkpoint = Path("out") / opts.preset
    store = Path("out") / f"{opts.preset}-{opts.quant}"
    if not (checkpoint / "config.json").is_file():
        subprocess.run([sys.executable, "-m", "flashinfer.cli", "synth", opts.preset, str(checkpoint)], check=True)
    cmd = [sys.executable, "-m", "flashinfer.cli", "convert", str(checkpoint), str(store), "--overwrite",
           "--quant", opts.quant, "--resident-quant", opts.resident_quant]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    seconds = time.perf_counter() - t0
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    in_gb = sum(p.stat().st_size for p in checkpoint.glob("*.safetensors")) / 1e9
    out_gb = sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 1e9
    print(f"command: python -m bench.convert --preset {opts.preset} --quant {opts.quant} "
          f"--resident-quant {opts.resident_quant}")
    print("machine:", machine_line())
    print(f"checkpoint {in_gb:.2f} GB -> store {out_gb:.2f} GB in {seconds:.0f} s "
          f"({in_gb / seconds * 1e3:.0f} MB/s read); peak RSS of the converter {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
