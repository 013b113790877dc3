"""The KV cache's element type on the real models: what f16 and q8 keys and values cost in
quality and what they buy in speed, against float32, in one process.

    python -m bench.kv_cache                       # smollm2 and gemma3-270m, 1024 tokens of the GPL-3
    python -m bench.kv_cache --models smollm2 --tokens 512 --repeats 5

Per model (its real GGUF from PyPI, converted once into out/models as bench/vs_llamacpp.py does):
  - perplexity of the first --tokens tokens of real English text (bench/vs_llamacpp.english_text)
    with each cache, and how far f16's and q8's logits move from f32's (max |difference|, the
    share of positions whose top token is the same);
  - greedy agreement with f32: 128 tokens after the text's first 16, tokens equal before the
    first difference;
  - decode tok/s at a filled context of each --at length (the prompt prefilled, then --decode
    tokens timed), the caches alternating, best of --repeats;
  - the same perplexity and logit gap for llama.cpp (llama-cpp-python, its type_k/type_v f32,
    f16 and q8_0, the last with flash attention, which llama.cpp needs for a quantized V cache)
    on the same GGUF and tokens: the anchor for what rounding keys and values does.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bench.machine import machine_line
from bench.vs_llamacpp import REAL_MODELS, _llamacpp_logits, english_text, perplexity, real_model_files

KV_TYPES = ("f32", "f16", "q8")
LLAMACPP_KV_TYPES = {"f32": 0, "f16": 1, "q8": 8}  # GGML types: F32, F16, Q8_0


def agreement(engines: dict, prompt: list[int], n: int) -> dict[str, int]:
    """Per cache type, greedy tokens equal to f32's before the first difference (of n)."""
    runs = {kv: engines[kv].generate(prompt, max_tokens=n, temperature=0).token_ids for kv in KV_TYPES}
    same = {}
    for kv in KV_TYPES:
        same[kv] = next((i for i, (a, b) in enumerate(zip(runs["f32"], runs[kv])) if a != b), len(runs[kv]))
    return same


def decode_tok_s(engine, ids: list[int], n: int) -> float:
    """Decode speed after ids are in the KV cache: n greedy tokens timed, the prefill not."""
    model = engine.model
    model.reset()
    model.forward(np.asarray(ids, np.int64))
    token = np.asarray([ids[-1]], np.int64)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = model.forward(token)
        token[0] = int(np.argmax(logits))
    return n / (time.perf_counter() - t0)


def llamacpp_kv(gguf, ids: list[int]) -> dict:
    """llama.cpp's logits of ids with f32, f16 and q8_0 keys and values (LLAMACPP_KV_TYPES)."""
    return {kv: _llamacpp_logits({"gguf": str(gguf), "threads": 2, "kv_type": ggml_type,
                                  "flash_attn": kv == "q8"}, ids)[0]
            for kv, ggml_type in LLAMACPP_KV_TYPES.items()}


def _quality_rows(name: str, who: str, logits: dict, ids: list[int]) -> list[str]:
    ppl = {kv: perplexity(logits[kv], ids) for kv in KV_TYPES}
    gap = {kv: float(np.abs(logits[kv] - logits["f32"]).max()) for kv in KV_TYPES}
    top_same = {kv: float((logits[kv].argmax(1) == logits["f32"].argmax(1)).mean()) for kv in KV_TYPES}
    return [f"| {name} | {who}: perplexity ({len(ids)} tokens) | {ppl['f32']:.3f} | {ppl['f16']:.3f} | {ppl['q8']:.3f} | "
            f"{(ppl['f16'] / ppl['f32'] - 1) * 100:+.2f}% | {(ppl['q8'] / ppl['f32'] - 1) * 100:+.2f}% |",
            f"| {name} | {who}: max \\|logit - f32's\\| ; top-1 equal | | {gap['f16']:.4f} ; {top_same['f16']:.4f} | "
            f"{gap['q8']:.4f} ; {top_same['q8']:.4f} | | |"]


def measure(name: str, opts, text: str) -> list[str]:
    from flashinfer import Engine

    store, gguf = real_model_files(name, None)
    ctx = max(opts.tokens, max(opts.at) + opts.decode) + 16
    engines = {kv: Engine.open(store, ctx=ctx, kv_cache=kv) for kv in KV_TYPES}
    try:
        ids = engines["f32"].tokenize(text)
        if len(ids) < max(opts.tokens, max(opts.at)):
            raise SystemExit(f"error: the text has {len(ids)} tokens, fewer than asked")
        evaluated = ids[: opts.tokens]
        rows = _quality_rows(name, "flashinfer", {kv: engines[kv].logits(evaluated) for kv in KV_TYPES}, evaluated)
        same = agreement(engines, ids[:16], 128)
        speed = {}
        for at in opts.at:
            for _ in range(opts.repeats):
                for kv in KV_TYPES:
                    value = decode_tok_s(engines[kv], ids[:at], opts.decode)
                    speed[kv, at] = max(speed.get((kv, at), 0.0), value)
    finally:
        for engine in engines.values():
            engine.close()
    if not opts.no_llamacpp:
        rows += _quality_rows(name, "llama.cpp", llamacpp_kv(gguf, evaluated), evaluated)
    rows += [f"| {name} | flashinfer: greedy tokens equal to f32's (of 128) | | {same['f16']} | {same['q8']} | | |"]
    rows += [f"| {name} | flashinfer: decode tok/s at {at} tokens of context | {speed['f32', at]:.1f} | {speed['f16', at]:.1f} | "
             f"{speed['q8', at]:.1f} | {speed['f16', at] / speed['f32', at]:.2f}x | {speed['q8', at] / speed['f32', at]:.2f}x |"
             for at in opts.at]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(REAL_MODELS))
    parser.add_argument("--tokens", type=int, default=1024, help="tokens of text the perplexity is over")
    parser.add_argument("--at", default="64,1024", help="context lengths the decode speed is measured at")
    parser.add_argument("--decode", type=int, default=32, help="decode tokens timed")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-llamacpp", action="store_true", help="skip llama.cpp's anchor")
    opts = parser.parse_args()
    opts.at = [int(a) for a in opts.at.split(",")]
    import sys

    text, source = english_text()
    print(f"machine: {machine_line()}\ncommand: python -m bench.kv_cache {' '.join(sys.argv[1:])}\ntext: {source}\n")
    lines = ["| model | measure | f32 KV | f16 KV | q8 KV | f16 vs f32 | q8 vs f32 |", "|---|---|---|---|---|---|---|"]
    for name in opts.models.split(","):
        lines += measure(name, opts, text)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
