"""What a prefill leaves in the neuron caches: bytes read by a 64-token prompt (one chunk, whose
predicted union is larger than the caches under a tight cap) and by the decode tokens after it,
with the hit rate, this tree against a git revision, each in a child process of its own.

    python -m bench.prefill_cache --store out/demo/1b-relu-q8 --dram 900MB --against HEAD~1

The store needs calibrated predictors (flashinfer calibrate); the prompt is real text from
--text (default: the demo's calibration text, tokens 5000..5063).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from bench.machine import machine_line
from bench.sparse import worktree_at

CHILD = """
import json, sys, time
import numpy as np
from flashinfer import Engine
cfg = json.loads(sys.argv[1])
with Engine.open(cfg["store"], predictor="lowrank", dram=cfg["dram"], window=5, ctx=256) as engine:
    ids = engine.tokenize(open(cfg["text"]).read())[5000 : 5000 + cfg["prompt_tokens"]]
    engine.generate(ids[:8], max_tokens=2)  # warm: JIT, resident pages
    reader, ffn = engine.model.flash_ffn.reader, engine.model.flash_ffn
    engine.model.reset()
    reader.stats.__init__()
    logits = engine.model.forward(np.array(ids))
    prefill_mb = reader.stats.bytes_read / 1e6
    token, start = int(logits.argmax()), reader.stats.bytes_read
    ffn.stats.__init__()
    t0 = time.perf_counter()
    for _ in range(cfg["decode_tokens"]):
        token = int(engine.model.forward(np.array([token])).argmax())
    seconds = time.perf_counter() - t0
    print(json.dumps({"prefill_mb": prefill_mb, "decode_mb": (reader.stats.bytes_read - start) / 1e6 / cfg["decode_tokens"],
                      "hit_rate": ffn.stats.hit_rate, "tok_s": cfg["decode_tokens"] / seconds}))
"""


def run(cfg: dict, code_dir: str | None) -> dict:
    env = None if code_dir is None else {**os.environ, "PYTHONPATH": code_dir}
    # cwd too: `python -c` puts the working directory first on sys.path (paths in cfg are absolute)
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg)], capture_output=True, text=True, env=env,
                          cwd=code_dir)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="out/demo/1b-relu-q8")
    parser.add_argument("--dram", default="900MB")
    parser.add_argument("--text", default="out/demo/calibration.txt")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--decode-tokens", type=int, default=16)
    parser.add_argument("--against", metavar="REV", help="the same with the code at this git revision")
    opts = parser.parse_args()
    cfg = {"store": os.path.abspath(opts.store), "dram": opts.dram, "text": os.path.abspath(opts.text), "prompt_tokens": opts.prompt_tokens,
           "decode_tokens": opts.decode_tokens}
    print(f"command: python -m bench.prefill_cache --store {opts.store} --dram {opts.dram} --text {opts.text} "
          f"--prompt-tokens {opts.prompt_tokens} --decode-tokens {opts.decode_tokens}"
          + (f" --against {opts.against}" if opts.against else ""))
    print("machine:", machine_line())
    print(f"{'code':16} {'prefill MB':>10} {'decode MB/token':>15} {'hit rate':>8} {'decode tok/s':>12}")
    rows = [("this tree", None)] + ([(opts.against, worktree_at(opts.against))] if opts.against else [])
    for name, code_dir in rows:
        r = run(cfg, code_dir)
        if "error" in r:
            print(f"{name:16} error: {r['error']}")
            continue
        print(f"{name:16} {r['prefill_mb']:>10.0f} {r['decode_mb']:>15.1f} {r['hit_rate']:>8.3f} {r['tok_s']:>12.2f}")


if __name__ == "__main__":
    main()
