"""Sparse decoding from flash under a DRAM cap: tokens/s, neuron-cache hit rate, bytes read
per token, time waiting for flash, and peak RSS of the whole process, for the naive dense
baseline (every FFN neuron read every token) and the sparse path with and without
read-ahead, side by side in one run. Each configuration runs in its own child process so
its peak RSS is its own.

    python -m bench.sparse --store out/1b-relu-q8 --dram 600MB --tokens 64

The store needs a calibrated predictor (flashinfer calibrate STORE --text FILE) for
`lowrank`. Reads use O_DIRECT, so every byte counted came from the disk.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

from bench.machine import machine_line

PROMPT = "the time of the day when we are"

CHILD = """
import json, sys, time
from flashinfer import Engine
from flashinfer.memory import peak_rss_bytes
cfg = json.loads(sys.argv[1])
with Engine.open(cfg["store"], ctx=256, predictor=cfg["predictor"], window=cfg["window"], dram=cfg["dram"],
                 prefetch=cfg["prefetch"], flash_bw=cfg["flash_bw"]) as engine:
    engine.generate(cfg["prompt"], max_tokens=4)  # warm: JIT, resident pages
    ffn, reader = engine.model.flash_ffn, engine.model.flash_ffn.reader
    reader.stats.__init__()
    t0 = time.perf_counter()
    result = engine.generate(cfg["prompt"], max_tokens=cfg["tokens"], temperature=0.0)
    seconds = time.perf_counter() - t0
    n = result.usage.completion_tokens + result.usage.prompt_tokens
    stats = getattr(ffn, "stats", None)
    out = {"decode_tok_s": result.usage.completion_tokens / result.timings.decode_s,
           "tokens": result.usage.completion_tokens, "seconds": seconds,
           "mb_per_token": reader.stats.bytes_read / n / 1e6,
           "peak_rss_mb": peak_rss_bytes() / 2**20,
           "cap_mb": engine.memory_plan.cap_bytes / 2**20 if engine.memory_plan else None,
           "token_ids": list(result.token_ids)}
    if stats is not None:
        out |= {"hit_rate": stats.hit_rate, "wait_ms_per_token": stats.wait_seconds / n * 1e3,
                "predicted_per_token": stats.predicted / n,
                "prefetch_used": stats.prefetch_used / stats.prefetched if stats.prefetched else None}
    print(json.dumps(out))
"""


def run(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="out/1b-relu-q8")
    parser.add_argument("--dram", default="600MB")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--predictor", default="lowrank")
    parser.add_argument("--flash-bw", default=None, help="throttle, e.g. 1GB/s (default: the disk's own speed)")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline (slow on 7B stores)")
    opts = parser.parse_args()
    base = {"store": opts.store, "prompt": PROMPT, "tokens": opts.tokens, "window": opts.window,
            "flash_bw": opts.flash_bw}
    configs = [] if opts.no_dense else [("dense (naive baseline)", base | {"predictor": "dense", "dram": opts.dram,
                                                                            "prefetch": False})]
    configs += [(f"{opts.predictor}", base | {"predictor": opts.predictor, "dram": opts.dram, "prefetch": False}),
                (f"{opts.predictor} + prefetch", base | {"predictor": opts.predictor, "dram": opts.dram, "prefetch": True})]
    command = (f"python -m bench.sparse --store {opts.store} --dram {opts.dram} --tokens {opts.tokens} "
               f"--window {opts.window} --predictor {opts.predictor}"
               + (f" --flash-bw {opts.flash_bw}" if opts.flash_bw else "") + (" --no-dense" if opts.no_dense else ""))
    print("command:", command)
    print("machine:", machine_line())
    print(f"{'configuration':24} {'tok/s':>7} {'vs dense':>8} {'hit rate':>8} {'MB/token':>9} {'wait ms/tok':>11} "
          f"{'prefetch used':>13} {'peak RSS MiB':>12} {'cap MiB':>8}")
    results, first = {}, None
    for name, cfg in configs:
        r = results[name] = run(cfg)
        if "error" in r:
            print(f"{name:24} error: {r['error']}")
            continue
        first = first or r
        ratio = r["decode_tok_s"] / first["decode_tok_s"]
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{name:24} {r['decode_tok_s']:>7.2f} {ratio:>7.2f}x {fmt(r.get('hit_rate'), '>8.3f')} "
              f"{r['mb_per_token']:>9.1f} {fmt(r.get('wait_ms_per_token'), '>11.1f')} "
              f"{fmt(r.get('prefetch_used'), '>13.2f')} {r['peak_rss_mb']:>12.0f} {fmt(r['cap_mb'], '>8.0f')}")
    dense = results.get("dense (naive baseline)")
    if dense and "error" not in dense:
        for name, r in results.items():
            if "error" not in r and name != "dense (naive baseline)":
                agree = sum(a == b for a, b in zip(r["token_ids"], dense["token_ids"])) / max(1, len(dense["token_ids"]))
                print(f"greedy tokens identical to dense, {name}: {agree:.3f}")


if __name__ == "__main__":
    main()
