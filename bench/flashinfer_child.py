"""One flashinfer measurement, run as a child process (by bench/run.py inside a memory cgroup,
by bench/vs_llamacpp.py without one).

    python -m bench.flashinfer_child '{"store": "out/bench/mistral-7b-relu-q4", "dram": "2GB",
                                        "predictor": "lowrank", "prompt_ids": [...], "tokens": 128}'

Prints one JSON line: decode tokens/s, the latency split per token from the tracer (I/O,
memory management, predictor, attention, FFN compute, other), hit rate, bytes read per token
both as the engine counted them and as the kernel counted them for this process
(/proc/self/io read_bytes: the meter every runtime in bench/run.py is read with), peak RSS,
the generated token ids, and, given `reference_ids` (the dense run's tokens), the greedy
agreement with them, teacher-forced token by token as in decoding.

Optional keys: predictor (dense; auto: the row reports what it chose and its probe's figures), window (5), flash_bw, ctx (256), prefetch (false), stream_ffn (false), pin (the engine's default),
warm_tokens (2: compiles or loads the kernels and touches the resident weights before the measured run),
trace (true; false: the engine untraced, as an application runs it, and no tracer figures:
ms_per_token, hit rate, engine bytes and bytes touched are left out).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from bench.cgroup import proc_read_bytes  # the meter every runtime's child reports

WARM_PROMPT_TOKENS = 32  # bench/run.py's default prompt, so a default run warms up as before


def teacher_forced_agreement(engine, prompt_ids: list[int], reference_ids: list[int]) -> float:
    """Share of positions where this engine's greedy token equals the reference's, feeding the
    reference's tokens one at a time (the decode path, not a prefill chunk). The prompt but its
    last token goes in as a prefill, as generate() (and so the reference's run) takes it: one token
    at a time, a 2048-token context's prompt took ~30 min at 7B under the cap."""
    engine.model.reset()
    context = list(prompt_ids)
    if len(context) > 1:
        engine.model.forward(np.array(context[:-1]))
    same = 0
    last = context[-1]
    for ref in reference_ids:
        logits = engine.model.forward(np.array([last]))
        same += int(int(np.argmax(logits)) == ref)
        last = ref
    return same / max(len(reference_ids), 1)


def dram_bytes_touched(store: str, summary: dict, predictor_bytes: int = 0) -> float:
    """Bytes a decode step reads from DRAM: every resident matrix but the embedding table (one
    row of it; all of it when it is also the lm_head), the FFN bundles of the neurons
    computed, and the predictor. The roofline's memory term (bench/roofline.py)."""
    manifest = json.loads((Path(store) / "manifest.json").read_text())
    tied = "output.weight" not in manifest["resident"] and "lm_head.weight" not in manifest["resident"]
    resident = sum(t["nbytes"] for name, t in manifest["resident"].items()
                   if tied or "embed" not in name)
    bundles = sum(row["predicted_per_token"] * layer["bundle_bytes"]
                  for row, layer in zip(summary["layers"], manifest["ffn_layers"]))
    # whole FFN matrices (W_gate of a --ffn-gate rows store): the gate predictor multiplies every
    # layer's each token, resident or streamed through buffers the predictor's bytes count
    matrices = sum(m["nbytes"] for layer in manifest["ffn_layers"] for m in layer.get("matrices", []))
    if matrices:
        predictor_bytes = max(predictor_bytes, matrices)
    return resident + bundles + predictor_bytes


def measure(cfg: dict) -> dict:
    from flashinfer import Engine
    from flashinfer.memory import peak_rss_bytes

    t_open = time.perf_counter()
    trace = cfg.get("trace", True)
    engine = Engine.open(cfg["store"], ctx=cfg.get("ctx", 256), predictor=cfg.get("predictor", "dense"),
                         window=cfg.get("window", 5), dram=cfg.get("dram"), prefetch=cfg.get("prefetch", False),
                         flash_bw=cfg.get("flash_bw"), stream_ffn=cfg.get("stream_ffn", False),
                         kv_cache=cfg.get("kv_cache", "f16"), **({"pin": cfg["pin"]} if "pin" in cfg else {}))
    with engine:
        open_s = time.perf_counter() - t_open
        prompt = [int(t) for t in cfg["prompt_ids"]]
        engine.eos_ids = set()  # a benchmark decodes exactly `tokens` tokens, as llama.cpp's side does
        # the warm-up (first calls, the OS's first touches) on the prompt's head: a long prompt's
        # whole prefill would add minutes to every row and measure nothing more
        engine.generate(prompt[:WARM_PROMPT_TOKENS], max_tokens=cfg.get("warm_tokens", 2), temperature=0.0)
        read_start = proc_read_bytes()
        read_prefilled = None
        last = None
        for last in engine.stream(prompt, max_tokens=cfg["tokens"], temperature=0.0, trace=trace):
            if read_prefilled is None:  # the first token comes out of the prompt's pass
                read_prefilled = proc_read_bytes()
        read_end = proc_read_bytes()
        steps = max(last.usage.completion_tokens - 1, 1)
        choice = engine.predictor_choice
        prefill_tok_s, decode_tok_s = last.timings.rates(last.usage)
        out = {
            "runtime": "flashinfer",
            "predictor": choice.predictor if choice else cfg.get("predictor", "dense"),  # auto: what it chose
            "open_s": open_s,
            "jit_s": engine.jit_seconds,
            "prompt_tokens": last.usage.prompt_tokens,
            "decode_steps": steps,
            "prefill_s": last.timings.prompt_s,
            "prefill_tok_s": prefill_tok_s,
            "decode_tok_s": decode_tok_s,
            "read_bytes_prefill": read_prefilled - read_start,
            "read_bytes_per_token": (read_end - read_prefilled) / steps,  # decode only, as bench/llamacpp.py
            "peak_rss_bytes": peak_rss_bytes(),
            "cap_bytes": engine.memory_plan.cap_bytes if engine.memory_plan else None,
            "predictor_bytes": engine.memory_plan.predictor_bytes if engine.memory_plan else None,
            "plan": engine.memory_plan.table() if engine.memory_plan else None,
            "generated_ids": [int(t) for t in last.token_ids],
        }
        if choice:
            out |= {"auto_choice": choice.line(), "auto_probe_s": choice.probe_s, "auto_dense_ms": choice.dense_ms,
                    "auto_sparse_ms": choice.sparse_ms}
        if trace:
            summary = engine.last_trace.summary()
            out |= {
                "ms_per_token": summary["ms_per_token"],
                "hit_rate": summary["hit_rate"],
                "engine_bytes_per_token": summary["bytes_read_per_token"],
                "bytes_touched_per_token": dram_bytes_touched(
                    cfg["store"], summary, engine.memory_plan.predictor_bytes if engine.memory_plan else 0),
            }
        if cfg.get("reference_ids"):
            out["agreement"] = teacher_forced_agreement(engine, prompt, [int(t) for t in cfg["reference_ids"]])
    return out


def main() -> None:
    print(json.dumps(measure(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
