"""llama.cpp (through llama-cpp-python) as a benchmark child: token ids in, greedy token ids
out, and the same meters every runtime of the comparison reports.

    python -m bench.llamacpp MODEL.gguf --prompt-ids 1,72,305 --max-tokens 32 --threads 2 [--no-mmap] [--extra-bufts]

prints one JSON line (RESULT_FIELDS) and exits. Run it under a cap with bench.cgroup:
`run_limited(llamacpp_argv(...), limit)`. Install with `pip install 'flashinfer[bench]'`
(compiles llama.cpp, ~10 min on 2 cores: CMAKE_BUILD_PARALLEL_LEVEL=2).

What is measured: the prompt is evaluated in one `Llama.eval` (logits of the last position
only, `logits_all=False`); each next token is the argmax of those logits (greedy, what
temperature 0 means in both runtimes, so no sampler is involved) and is evaluated alone.
`decode_steps` = max_tokens - 1 single-token evals are timed (the first token comes from
the prompt's logits). read_bytes is /proc/self/io's, sampled before and after load,
prompt and decode, so `read_bytes_per_token` is what decoding fetched from storage per
step; peak RSS is VmHWM, and RssAnon/RssFile at the end say whether the weights stayed
file-backed (mmap) or were copied into anonymous memory.

With mmap (the default, as the benchmark issue asks) llama.cpp maps the file with
MAP_POPULATE (src/llama-mmap.cpp:480, prefetch of the whole file requested by
src/llama-model.cpp:1812 `ml.init_mappings(true, ...)`), so a cold load reads the whole
GGUF (`read_bytes_load` ≈ the file) and decode faults back only what the cap made the
kernel drop. Threads: on a 2-core machine shared with other work, ggml's OpenMP barriers
wait for the scheduler at every graph node; measured on the 1b Q4_0 GGUF (630 MB, warm):
1 thread 10.4 tok/s, 2 threads 1.5 tok/s; on tiny 0.08 vs ~200 ms a token. Measure both.

## llama.cpp runs SiLU on our ReLU models: same bytes, a different function

The synthetic models (storage/synth/) are ReLU-gated Llama/Mistral (`hidden_act: relu`):
FFN = down(relu(gate x) * up x). llama.cpp's `llama` architecture cannot be told so:
- its graph hard-codes the activation: `build_ffn(..., LLM_FFN_SILU, LLM_FFN_PAR, il)` in
  llama.cpp src/models/llama.cpp (lines 189-194 in the copy vendored by llama-cpp-python
  0.3.36), i.e. silu(gate x) * up x, whatever the GGUF says;
- the one GGUF key for an FFN activation, `{arch}.hidden_activation` (LLM_KV_HIDDEN_ACT,
  src/llama-arch.cpp:229, mapped by llm_ffn_op_type_from_string in src/llama-model.cpp,
  which knows "relu"/"reglu"), is read only by the modern-bert and dflash graphs
  (src/models/modern-bert.cpp:19, src/models/dflash.cpp:15), never for `llama`;
- no other llama-shaped architecture runs a gated ReLU: LLM_FFN_RELU appears only in the
  t5 (ungated) and smallthinker (MoE) graphs.
So on our weights llama.cpp computes a different function. The comparison stays valid for
speed — the same tensors, bytes, matmul shapes and memory traffic per token; SiLU vs ReLU
is an elementwise op on the 14336-wide FFN activation, noise next to the matmuls — but
not for output agreement: its tokens are not expected to match flashinfer's, and the JSON
says so (`activation_matches: false`, from the `flashinfer.hidden_act` key synth writes).
On a SiLU model (no such key) `activation_matches` is true and the ids can be compared.

## Extra buffer types (weight repacking, AMX) are off unless --extra-bufts

llama.cpp's default (`llama_model_params.use_extra_bufts = true`) hands matrices to the
CPU backend's extra buffer types, which copy them out of the mmap into anonymous memory
at load:
- CPU_REPACK: every Q4_0 matrix whose row count is a multiple of 8 is repacked to q4_0_8x8
  when the CPU has AVX2 (ggml/src/ggml-cpu/repack.cpp, the GGML_TYPE_Q4_0 branch of
  ggml_repack_get_optimal_repack_type): a 7B Q4_0 (3.8 GB) then lives in RAM and cannot
  stay under a 2 GB cap, whatever mmap says;
- AMX: Q4_0/Q4_1/Q8_0 and k-quant matrices go to the AMX buffer where the CPU reports AMX
  (qtype_has_amx_kernels, ggml/src/ggml-cpu/amx/common.h; this CPU reports amx_int8),
  and on this VM its kernel dies at its first tile instruction (`ldtilecfg` in
  ggml_backend_amx_mul_mat raises a general protection fault — the hypervisor does not
  enable the AMX tile state), so any batch of 2 or more tokens crashes the process.
So the harness runs llama.cpp with `use_extra_bufts = false` (llama.cpp's own
`--no-repack`), weights mmap-ed and paged from the file like every runtime under the cap;
`--extra-bufts` restores llama.cpp's default. `rss_anon_bytes` shows where weights live.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from bench.cgroup import proc_read_bytes

LLAMA_ACTIVATION = "silu"  # src/models/llama.cpp: LLM_FFN_SILU, LLM_FFN_PAR (see the docstring)
FLASHINFER_ACT_KEY = "flashinfer.hidden_act"  # storage.gguf.FLASHINFER_ACT_KEY, not imported: the child stays light
RESULT_FIELDS = (
    "runtime", "llama_cpp_version", "model", "model_bytes", "threads", "mmap", "extra_bufts", "ctx", "kv_cache",
    "model_activation", "llamacpp_activation", "activation_matches",
    "load_s", "prompt_tokens", "prefill_s", "prefill_tok_s", "generated_ids", "decode_steps", "decode_s",
    "decode_tok_s", "ms_per_token", "read_bytes_load", "read_bytes_prefill", "read_bytes_decode",
    "read_bytes_per_token", "peak_rss_bytes", "rss_anon_bytes", "rss_file_bytes",
)


def activation_report(metadata: dict[str, str]) -> dict:
    """What the model's FFN activation is, what llama.cpp will compute, and whether they agree.

    `metadata` is the GGUF's key/values as strings (Llama.metadata). A GGUF without
    flashinfer.hidden_act is taken to be SiLU, as llama.cpp and storage/gguf.py take it."""
    arch = metadata.get("general.architecture")
    model_act = metadata.get(FLASHINFER_ACT_KEY, "silu")
    llama_act = LLAMA_ACTIVATION if arch == "llama" else None  # other graphs: not checked here
    return {"model_activation": model_act, "llamacpp_activation": llama_act,
            "activation_matches": None if llama_act is None else model_act == llama_act}


def _status_bytes(*keys: str) -> dict[str, int]:
    """kB fields of /proc/self/status (VmHWM, RssAnon, RssFile) in bytes."""
    found = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in keys:
                found[key] = int(value.split()[0]) * 1024
    return found


@contextlib.contextmanager
def _extra_bufts(enabled: bool):
    """Llama() takes no use_extra_bufts: while it loads, hand it default model params with
    that flag cleared (llama.cpp's own --no-repack), then restore the library function."""
    import llama_cpp.llama_cpp as lib

    if enabled:
        yield
        return
    defaults = lib.llama_model_default_params

    def without_extra_bufts():
        params = defaults()
        params.use_extra_bufts = False
        return params

    lib.llama_model_default_params = without_extra_bufts
    try:
        yield
    finally:
        lib.llama_model_default_params = defaults


# --kv-cache: llama.cpp's KV cache types by flashinfer's names (GGML F32, F16, Q8_0); q8_0 values
# need llama.cpp's flash attention, so a q8 run turns it on (for keys and values alike)
KV_CACHE_TYPES = {"f32": 0, "f16": 1, "q8": 8}


def run(model: str, prompt_ids: list[int], max_tokens: int, *, threads: int = 2, mmap: bool = True,
        extra_bufts: bool = False, ctx: int | None = None, kv_cache: str = "f16") -> dict:
    """Load `model`, evaluate `prompt_ids`, greedily generate `max_tokens`; the RESULT_FIELDS.
    kv_cache: the KV cache's type, KV_CACHE_TYPES (f16 is llama.cpp's default)."""
    import llama_cpp
    import numpy as np

    if not prompt_ids:
        raise ValueError("the prompt needs at least one token id")
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
    ctx = ctx or len(prompt_ids) + max_tokens
    if ctx < len(prompt_ids) + max_tokens:
        raise ValueError(f"a context of {ctx} tokens cannot hold {len(prompt_ids)} prompt + {max_tokens} new tokens")

    read0 = proc_read_bytes()
    t0 = time.perf_counter()
    with _extra_bufts(extra_bufts):
        kv = KV_CACHE_TYPES[kv_cache]
        llm = llama_cpp.Llama(model_path=model, n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                              use_mmap=mmap, logits_all=False, verbose=False, type_k=kv, type_v=kv,
                              **({"flash_attn": True} if kv_cache == "q8" else {}))
    load_s = time.perf_counter() - t0
    read_loaded = proc_read_bytes()
    n_vocab = llm.n_vocab()
    bad = [i for i in prompt_ids if not 0 <= i < n_vocab]
    if bad:
        raise ValueError(f"prompt ids {bad[:5]} are outside the model's vocabulary of {n_vocab}")

    def next_token() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    t0 = time.perf_counter()
    llm.eval(prompt_ids)
    generated = [next_token()]
    prefill_s = time.perf_counter() - t0
    read_prefilled = proc_read_bytes()
    t0 = time.perf_counter()
    for _ in range(max_tokens - 1):
        llm.eval([generated[-1]])
        generated.append(next_token())
    decode_s = time.perf_counter() - t0
    read_decoded = proc_read_bytes()
    steps = max_tokens - 1
    status = _status_bytes("VmHWM", "RssAnon", "RssFile")
    metadata = dict(llm.metadata)
    llm.close()
    return {
        "runtime": "llama.cpp", "llama_cpp_version": llama_cpp.__version__, "model": str(model),
        "model_bytes": os.path.getsize(model), "threads": threads, "mmap": mmap, "extra_bufts": extra_bufts, "ctx": ctx, "kv_cache": kv_cache,
        **activation_report(metadata),
        "load_s": load_s, "prompt_tokens": len(prompt_ids), "prefill_s": prefill_s,
        "prefill_tok_s": len(prompt_ids) / prefill_s, "generated_ids": generated, "decode_steps": steps,
        "decode_s": decode_s, "decode_tok_s": steps / decode_s if steps else None,
        "ms_per_token": 1e3 * decode_s / steps if steps else None,
        "read_bytes_load": read_loaded - read0, "read_bytes_prefill": read_prefilled - read_loaded,
        "read_bytes_decode": read_decoded - read_prefilled,
        "read_bytes_per_token": (read_decoded - read_prefilled) / steps if steps else None,
        "peak_rss_bytes": status["VmHWM"], "rss_anon_bytes": status["RssAnon"], "rss_file_bytes": status["RssFile"],
    }


def llamacpp_argv(model: str | os.PathLike, prompt_ids: list[int], max_tokens: int, *, threads: int = 2,
                  mmap: bool = True, extra_bufts: bool = False, ctx: int | None = None, kv_cache: str = "f16") -> list[str]:
    """The command line that runs `run(...)` as a child (for bench.cgroup.run_limited)."""
    argv = [sys.executable, "-m", "bench.llamacpp", str(model), "--prompt-ids", ",".join(map(str, prompt_ids)),
            "--max-tokens", str(max_tokens), "--threads", str(threads)]
    if not mmap:
        argv.append("--no-mmap")
    if extra_bufts:
        argv.append("--extra-bufts")
    if ctx:
        argv += ["--ctx", str(ctx)]
    if kv_cache != "f16":
        argv += ["--kv-cache", kv_cache]
    return argv


def _ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"token ids are integers separated by commas, got {text!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a .gguf file")
    parser.add_argument("--prompt-ids", type=_ids, required=True, help="prompt token ids, e.g. 1,72,305")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--ctx", type=int, default=None, help="context size (default: prompt + max tokens)")
    parser.add_argument("--kv-cache", default="f16", choices=tuple(KV_CACHE_TYPES), help="KV cache type (default f16)")
    parser.add_argument("--no-mmap", dest="mmap", action="store_false", help="read the weights into RAM at load")
    parser.add_argument("--extra-bufts", action="store_true",
                        help="llama.cpp's default: repack Q4_0 / use AMX, copying those weights into RAM "
                             "(crashes on this VM; see the module docstring)")
    opts = parser.parse_args(argv)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("error: llama-cpp-python is not installed: pip install 'flashinfer[bench]'", file=sys.stderr)
        return 2
    if not os.path.isfile(opts.model):
        print(f"error: {opts.model}: no such GGUF file", file=sys.stderr)
        return 2
    try:
        result = run(opts.model, opts.prompt_ids, opts.max_tokens, threads=opts.threads, mmap=opts.mmap,
                     extra_bufts=opts.extra_bufts, ctx=opts.ctx, kv_cache=opts.kv_cache)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
