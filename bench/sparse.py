"""Sparse decoding from flash under a DRAM cap: tokens/s, neuron-cache hit rate, bytes read
per token, time waiting for flash, and peak RSS of the whole process, for the naive dense
baseline (every FFN neuron read every token) and the sparse path with and without
read-ahead, and with tracing on (what `flashinfer profile` costs), side by side in one run. Each configuration runs in its own child process so
its peak RSS is its own.

    python -m bench.sparse --store out/1b-relu-q8 --dram 600MB --tokens 64
    python -m bench.sparse ... --against HEAD~1   # also the sparse rows with the code of a git revision
    python -m bench.sparse ... --pins 0,0.5,0.8    # only the sparse path, a row per hot-set share (--pin)

The store needs a calibrated predictor (flashinfer calibrate STORE --text FILE) for
`lowrank`. Reads use O_DIRECT, so every byte counted came from the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import subprocess
import sys

from bench.machine import machine_line

PROMPT = "the time of the day when we are"

CHILD = """
import json, sys
import numpy as np
from flashinfer import Engine, flash_ffn, kernels
from flashinfer.memory import peak_rss_bytes
cfg = json.loads(sys.argv[1])
if cfg.get("parallel_ffn"):  # the default FFN over cached rows is serial (flashinfer/flash_ffn.py says why)
    flash_ffn.FFN_PARALLEL_MIN_ELEMENTS = 1 << 18
if cfg.get("serial_matmul"):  # the lm_head and prefill matmuls too (decode's per-layer ones already are)
    kernels.PARALLEL_MIN_WORK = 2**62
if cfg.get("parallel_matmul"):  # every resident matmul on all cores (the default before 2026-11-25)
    kernels.PARALLEL_MIN_WORK = 1 << 18
with Engine.open(cfg["store"], ctx=256, predictor=cfg["predictor"], window=cfg["window"], dram=cfg["dram"],
                 prefetch=cfg["prefetch"], flash_bw=cfg["flash_bw"], **({"pin": cfg["pin"]} if "pin" in cfg else {})) as engine:
    engine.generate(cfg["prompt"], max_tokens=4)  # warm: JIT, resident pages
    ffn, reader = engine.model.flash_ffn, engine.model.flash_ffn.reader
    reader.stats.__init__()
    result = engine.generate(cfg["prompt"], max_tokens=cfg["tokens"], temperature=0.0, trace=cfg.get("trace", False))
    n = result.usage.completion_tokens + result.usage.prompt_tokens
    stats = getattr(ffn, "stats", None)
    out = {"decode_tok_s": result.usage.completion_tokens / result.timings.decode_s,
           "tokens": result.usage.completion_tokens,
           "mb_per_token": reader.stats.bytes_read / n / 1e6,
           "peak_rss_mb": peak_rss_bytes() / 2**20,
           "cap_mb": engine.memory_plan.cap_bytes / 2**20 if engine.memory_plan else None}
    if stats is not None:
        out |= {"hit_rate": stats.hit_rate, "wait_ms_per_token": stats.wait_seconds / n * 1e3,
                "predicted_per_token": stats.predicted / n,
                "prefetch_used": stats.prefetch_used / stats.prefetched if stats.prefetched else None}
    if cfg.get("heldout"):  # token by token over held-out text, as in decoding: next-token NLL and greedy picks
        ids = engine.tokenize(open(cfg["heldout"]).read())[: cfg["heldout_tokens"] + 1]
        engine.model.reset()
        nll, picks = [], []
        for t, nxt in zip(ids[:-1], ids[1:]):
            logits = engine.model.forward(np.array([t])).astype(np.float64)
            top = logits.max()
            nll.append(top + np.log(np.exp(logits - top).sum()) - logits[nxt])
            picks.append(int(logits.argmax()))
        out["perplexity"], out["picks"] = float(np.exp(np.mean(nll))), picks
    print(json.dumps(out))
"""


def run(cfg: dict, code_dir: str | None = None) -> dict:
    """One configuration in a child process; `code_dir`: a checkout whose flashinfer it imports
    (PYTHONPATH comes before the editable install's finder)."""
    env = None if code_dir is None else {**os.environ, "PYTHONPATH": code_dir}
    # cwd too: `python -c` puts the working directory first on sys.path (paths in cfg are absolute)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env,
                          cwd=code_dir)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worktree_at(rev: str) -> str:
    """A detached git worktree of `rev` (made once, under /tmp) for --against."""
    sha = subprocess.run(["git", "rev-parse", "--short", rev], capture_output=True, text=True, check=True).stdout.strip()
    path = Path(tempfile.gettempdir()) / f"flashinfer-{sha}"
    if not path.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], capture_output=True, check=True)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="out/1b-relu-q8")
    parser.add_argument("--dram", default="600MB")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--predictor", default="lowrank")
    parser.add_argument("--flash-bw", default=None, help="throttle, e.g. 1GB/s (default: the disk's own speed)")
    parser.add_argument("--heldout", default=None, metavar="FILE",
                        help="text not used for calibration: perplexity and greedy agreement with dense over it")
    parser.add_argument("--heldout-tokens", type=int, default=128)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline (slow on 7B stores)")
    parser.add_argument("--against", metavar="REV", help="also run the sparse rows with the code at this git revision")
    parser.add_argument("--pins", default=None, metavar="SHARES",
                        help="comma-separated hot-set shares of the cache (--pin): the sparse row once for each, "
                             "instead of the usual configurations")
    opts = parser.parse_args()
    base = {"store": os.path.abspath(opts.store), "prompt": PROMPT, "tokens": opts.tokens, "window": opts.window,
            "flash_bw": opts.flash_bw, "heldout": opts.heldout and os.path.abspath(opts.heldout),
            "heldout_tokens": opts.heldout_tokens}
    sparse = base | {"predictor": opts.predictor, "dram": opts.dram, "prefetch": False}
    configs = [] if opts.no_dense else [("dense (naive baseline)", base | {"predictor": "dense", "dram": opts.dram,
                                                                            "prefetch": False})]
    configs += [(f"{opts.predictor}", sparse),
                (f"{opts.predictor}, all matmuls serial", sparse | {"serial_matmul": True}),
                (f"{opts.predictor}, all matmuls parallel", sparse | {"parallel_matmul": True}),
                (f"{opts.predictor}, parallel FFN", sparse | {"parallel_ffn": True}),
                (f"{opts.predictor} + prefetch", sparse | {"prefetch": True}),
                (f"{opts.predictor}, traced (profile)", sparse | {"trace": True})]
    if opts.pins:  # the cache policy alone: a row per hot-set share, the rest equal
        configs = configs[:1] + [(f"{opts.predictor}, pin {pin}", sparse | {"pin": float(pin)})
                                 for pin in opts.pins.split(",")]
    if opts.against:  # each sparse row once more with the revision's code, next to this tree's
        old = worktree_at(opts.against)
        configs = [c for name, cfg in configs for c in
                   ([(name, cfg)] + ([(f"{name} @{opts.against}", cfg | {"code_dir": old})]
                                     if cfg["predictor"] != "dense" and "serial" not in name and "parallel" not in name
                                     else []))]
    command = (f"python -m bench.sparse --store {opts.store} --dram {opts.dram} --tokens {opts.tokens} "
               f"--window {opts.window} --predictor {opts.predictor}"
               + (f" --flash-bw {opts.flash_bw}" if opts.flash_bw else "") + (" --no-dense" if opts.no_dense else "")
               + (f" --heldout {opts.heldout} --heldout-tokens {opts.heldout_tokens}" if opts.heldout else "")
               + (f" --against {opts.against}" if opts.against else "") + (f" --pins {opts.pins}" if opts.pins else ""))
    print("command:", command)
    print("machine:", machine_line())
    print(f"{'configuration':34} {'tok/s':>6} {'ratio':>6} {'hit rate':>8} {'MB/token':>8} {'wait ms/tok':>11} "
          f"{'prefetch used':>13} {'agreement':>9} {'ppl':>8} {'peak RSS MiB':>12} {'cap MiB':>7}")
    first, reference = None, None
    for name, cfg in configs:
        r = run({k: v for k, v in cfg.items() if k != "code_dir"}, cfg.get("code_dir"))
        if "error" in r:
            print(f"{name:34} error: {r['error']}")
            continue
        first = first or r
        if cfg["predictor"] == "dense" and "picks" in r:
            reference = np.array(r["picks"])
        if reference is not None and "picks" in r:
            r["agreement"] = float(np.mean(np.array(r["picks"]) == reference))
        fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
        print(f"{name:34} {r['decode_tok_s']:>6.2f} {r['decode_tok_s'] / first['decode_tok_s']:>5.2f}x "
              f"{fmt(r.get('hit_rate'), '>8.3f')} {r['mb_per_token']:>8.1f} {fmt(r.get('wait_ms_per_token'), '>11.1f')} "
              f"{fmt(r.get('prefetch_used'), '>13.2f')} {fmt(r.get('agreement'), '>9.3f')} "
              f"{fmt(r.get('perplexity'), '>8.1f')} {r['peak_rss_mb']:>12.0f} "
              f"{fmt(r['cap_mb'], '>7.0f')}")
    print("ratio: decode tokens/s over the first row. wait: time layers spent waiting for flash. agreement / ppl: "
          "token by token over the held-out text, share of positions where the greedy token equals the dense "
          "path's, and perplexity of the text (random-weight model: only the difference to dense means anything).")


if __name__ == "__main__":
    main()
