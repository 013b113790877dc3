"""The end-to-end benchmark: 7B-class models under a DRAM cap, flashinfer side by side with
the naive baseline and llama.cpp, every runtime in the same memory cgroup, cold.

    python -m bench.run                 # mistral-7b-relu q4 under 2GB (builds the store once: ~1 h)
    python -m bench.run --quick         # the 1b preset under 700MB, < 5 minutes once built
    python -m bench.run --models mistral-7b-relu,opt-6.7b --cap 2GB --tokens 128
    python -m bench.run --models mistral-7b   # SwiGLU: naive vs the gate predictor at 40% and 50% skipped
    python -m bench.run --ctx 2048 --kv-cache q8 --recall-of neurons,mass   # a long context; two calibrations

Per model it builds, or reuses from --work: `flashinfer synth` (with a Q4_0 GGUF of the same
weights for llama.cpp), `flashinfer convert --quant q4 --resident-quant q4`, and
`flashinfer calibrate`. Then, each in a fresh memory cgroup of --cap (bench/cgroup.py: the
cap covers the page cache; caches are dropped before each run, so every run reads its
weights from disk):
  - naive: flashinfer, `dense` predictor: every FFN neuron read from flash every token;
  - flashinfer dense: every neuron, FFN layers kept while they fit the cap, the others read one
    ahead of the layer computing (flash_ffn.FlashFFN's read_ahead);
  - flashinfer: `lowrank` predictor, windowed neuron cache, at the device's speed (a row per
    --recall-of calibration: thresholds for 99% of the active neurons, or of their mass; each
    calibration's predictors/ kept beside the store as STORE.lowrank-<of>, put back before its row);
  - flashinfer at 1GB/s: the same with the flash throttled to 1 GB/s;
  - with --auto: `--predictor auto` (flashinfer/auto_predictor.py: dense or lowrank, whichever a
    probe at open reads faster) at the device's speed and at 1 GB/s, beside dense at 1 GB/s;
  - llama.cpp: llama-cpp-python on the Q4_0 GGUF, default mmap, --threads threads;
  - llama.cpp without a cap, for reference (no cgroup; caches dropped first).
A SwiGLU preset (mistral-7b: SiLU, gates planted with SmolLM2's sign share and spread) is
converted with `--ffn-gate rows` and calibrated with `flashinfer calibrate --sparsity S` for each
of --gate-sparsities (each calibration's predictors/ kept beside the store as STORE.gate-S and
put back before its row); its flashinfer rows are flashinfer's dense path (layers kept while they
fit, the others read one ahead) and the gate predictor at each S, instead of lowrank.
Each decodes --tokens tokens after a --prompt-tokens prompt (token ids, the same for all).

Reported per row: decode tokens/s, ms/token split (flashinfer's tracer: I/O, memory
management, compute), bytes read from disk per decode token (/proc/<pid>/io read_bytes:
the same meter for every runtime), the cgroup's peak memory and whether it OOM-killed,
greedy agreement with the naive (dense) run, teacher-forced over its tokens. The roofline
row bounds flashinfer's sparse run from below: bytes read / disk bandwidth + bytes touched
in DRAM / memory bandwidth, both bandwidths measured in this run (bench/roofline.py).

llama.cpp runs SiLU where our synthetic ReLU models have ReLU (bench/llamacpp.py says why), so
its row is a speed comparison on the same shapes and bytes, without an agreement figure.
Its Q4_0 weights are not bit-identical to the store's q4 (storage/quant.py: same size and
decode cost, rounded on a different grid).

Results: a markdown table appended to bench/RESULTS.md (date, machine, disk, command) and
the full records in bench/results/<date>-<models>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from bench import cgroup, roofline
from bench.llamacpp import KV_CACHE_TYPES, llamacpp_argv
from bench.machine import machine_line
from bench.texts import word_salad
from flashinfer.calibrate import RECALL_OF
from storage.units import parse_size

ROOT = Path(__file__).resolve().parent.parent
FI = [sys.executable, "-m", "flashinfer.cli"]


@dataclass(frozen=True)
class Preset:
    name: str
    gguf: bool  # llama.cpp can run it (llama/mistral arch; OPT is not in llama.cpp)
    gated: bool = False  # SwiGLU: the gate predictor (--ffn-gate rows, calibrated per --gate-sparsities)


PRESETS = {p.name: p for p in (Preset("mistral-7b-relu", True), Preset("llama-2-7b-relu", True),
                               Preset("opt-6.7b", False), Preset("1b", True), Preset("mistral-7b", True, gated=True))}
GATE_SPARSITIES = (0.4, 0.5)
DEFAULT_RECALL_OF = ("neurons",)  # ReLU presets: the low-rank calibrations measured (flashinfer calibrate --recall-of)


def kept_calibration(store: Path, tag: str) -> Path:
    """Where a calibration of the store (its whole predictors/ directory, with checksums) is kept,
    beside the store, by tag ("gate-0.4", "lowrank-mass"): `flashinfer calibrate` replaces
    predictors/ each time, and a run compares several."""
    return store.parent / f"{store.name}.{tag}"


def gate_tag(sparsity: float) -> str:
    return f"gate-{sparsity:g}"


def lowrank_tag(recall_of: str) -> str:
    return f"lowrank-{recall_of}"


def keep_calibration(store: Path, tag: str) -> None:
    """Copy the store's predictors/ to kept_calibration(store, tag) (complete, or not there)."""
    kept = kept_calibration(store, tag)
    shutil.copytree(store / "predictors", kept.with_name(kept.name + ".tmp"), dirs_exist_ok=True)
    kept.with_name(kept.name + ".tmp").rename(kept)


def install_calibration(store: Path, tag: str) -> None:
    """Make the calibration kept as `tag` the store's predictors/ (in one step)."""
    from flashinfer.calibrate import PREDICTOR_DIR
    from storage import atomic

    target = store / PREDICTOR_DIR
    staging = atomic.staging_dir(target)
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(kept_calibration(store, tag), staging)
    atomic.replace_dir(staging, target)


def installed_recall_of(store: Path) -> str | None:
    """What the store's installed low-rank calibration set its thresholds for ("neurons" for
    one made before --recall-of existed), or None without one."""
    report = store / "predictors" / "lowrank.json"
    if not (store / "predictors" / "lowrank.npz").exists() or not report.exists():
        return None
    return json.loads(report.read_text()).get("recall_of", "neurons")


def log(msg: str) -> None:
    print(f"[{datetime.datetime.now():%H:%M:%S}] {msg}", file=sys.stderr, flush=True)


def sh(argv: list[str]) -> None:
    log(" ".join(map(str, argv)))
    subprocess.run([str(a) for a in argv], check=True, cwd=ROOT)


def build(preset: Preset, work: Path, calibration_tokens: int | None,
          gate_sparsities: tuple[float, ...] = GATE_SPARSITIES,
          recall_of: tuple[str, ...] = DEFAULT_RECALL_OF) -> tuple[Path, Path | None]:
    """(store, gguf or None), built once into `work` and reused while their files exist.
    calibration_tokens None: no `flashinfer calibrate` (dense runs need no predictor). Each
    calibration (gate: per sparsity; ReLU: per --recall-of) is kept beside the store."""
    store = work / f"{preset.name}-q4"
    gguf = work / f"{preset.name}-q4_0.gguf" if preset.gguf else None
    tags = [gate_tag(s) for s in gate_sparsities] if preset.gated else [lowrank_tag(of) for of in recall_of]
    calibrations = [kept_calibration(store, tag) for tag in tags]
    calibrated = all(path.exists() for path in calibrations)
    converted = (store / "manifest.json").exists() and (gguf is None or gguf.exists())
    if converted and (calibration_tokens is None or calibrated):
        log(f"reusing {store}" + (f" and {gguf}" if gguf else ""))
        return store, gguf
    work.mkdir(parents=True, exist_ok=True)
    hf = work / f"{preset.name}-hf"
    if not converted:
        synth = [*FI, "synth", preset.name, hf, "--overwrite"]
        if gguf is not None:  # 4-bit everywhere, as the store below
            synth += ["--gguf", gguf, "--gguf-type", "q4_0", "--gguf-resident-type", "q4_0"]
        sh(synth)
        # 4-bit resident weights too: a 7B's attention alone is 1.4 GB at q8, too much for 2 GB.
        # From the GGUF when there is one: the store keeps its Q4_0 blocks bit for bit (up, gate,
        # resident), so both runtimes compute with the same weights; the down columns, which run
        # across the file's blocks, are re-quantized to q4 (as many bytes as llama.cpp reads)
        source = [gguf, "--tokenizer", hf] if gguf is not None else [hf]
        # a SwiGLU store keeps W_gate whole, which the gate predictor reads a layer at a time
        layout = ["--ffn-gate", "rows"] if preset.gated else []
        sh([*FI, "convert", *source, store, "--quant", "q4", "--resident-quant", "q4", *layout, "--overwrite"])
        shutil.rmtree(hf)
    if calibration_tokens is not None and not calibrated:
        text = work / f"{preset.name}-calibration.txt"
        text.write_text(word_salad(calibration_tokens * 2, seed=1))
        calibrate = [*FI, "calibrate", store, "--text", text, "--tokens", str(calibration_tokens)]
        for s in gate_sparsities if preset.gated else ():
            if not kept_calibration(store, gate_tag(s)).exists():
                sh([*calibrate, "--sparsity", str(s)])
                keep_calibration(store, gate_tag(s))
        for of in () if preset.gated else recall_of:
            if not kept_calibration(store, lowrank_tag(of)).exists():
                if installed_recall_of(store) != of:  # a store calibrated before is kept as it is
                    sh([*calibrate, "--recall-of", of])
                keep_calibration(store, lowrank_tag(of))
    return store, gguf


def prompt_ids(store: Path, n: int, text: str | None = None) -> list[int]:
    """The first n token ids of `text`, by the store's tokenizer (default: held-out word
    salad, seed 2: not the calibration text)."""
    from flashinfer.tokenizer import Tokenizer

    ids = Tokenizer.from_dir(store).encode(word_salad(4 * n, seed=2) if text is None else text)
    if len(ids) < n:
        raise SystemExit(f"error: {store}: the prompt text gave {len(ids)} tokens, fewer than {n}")
    return ids[:n]


def run_flashinfer(cfg: dict, cap: int | None) -> dict:
    argv = [sys.executable, "-m", "bench.flashinfer_child", json.dumps(cfg)]
    return run_child(argv, cap)


def run_child(argv: list[str], cap: int | None, drop_caches: bool = True) -> dict:
    """Run a bench child (cold: the page cache dropped first, unless drop_caches=False), in a
    cgroup of `cap` bytes or none; its last stdout line (JSON), or an `error` of its last stderr line."""
    if cap is None:
        if drop_caches:
            cgroup.drop_caches()
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
        code, out, err, peak, oom = proc.returncode, proc.stdout, proc.stderr, None, False
    else:
        r = cgroup.run_limited(argv, cap, drop_caches=drop_caches, cwd=ROOT)
        code, out, err, peak, oom = r.returncode, r.stdout, r.stderr, r.peak_bytes, r.oom_killed
    record = {"cgroup_peak_bytes": peak, "oom_killed": oom, "returncode": code}
    if code != 0:
        lines = err.strip().splitlines()
        return record | {"error": "OOM-killed by the cgroup" if oom else (lines[-1] if lines else f"exit {code}")}
    return record | json.loads(out.strip().splitlines()[-1])


def measure_model(preset: Preset, opts, bandwidths) -> list[dict]:
    store, gguf = build(preset, Path(opts.work), opts.calibration_tokens, opts.gate_sparsities, opts.recall_of)
    cap = parse_size(opts.cap)
    prompt = prompt_ids(store, opts.prompt_tokens)
    # the context the KV cache (and so the DRAM plan) is sized for: --ctx, else just the run's tokens
    ctx = opts.ctx or opts.prompt_tokens + opts.tokens + 8
    base = {"store": str(store), "prompt_ids": prompt, "tokens": opts.tokens, "ctx": ctx, "dram": opts.cap,
            "window": opts.window, "kv_cache": opts.kv_cache}
    rows = []
    log(f"{preset.name}: naive baseline (dense predictor)")
    naive = run_flashinfer(base | {"predictor": "dense", "stream_ffn": True}, cap)
    rows.append(naive | {"model": preset.name, "config": "naive (dense from flash)"})
    reference = naive.get("generated_ids")
    # the dense path as flashinfer runs it (layers kept while they fit, the rest read one ahead):
    # what a predictor's rows gain over it is the sparsity's own
    configs = [("flashinfer dense (layers kept, rest read ahead)", base | {"predictor": "dense",
                                                                         "reference_ids": reference})]
    if preset.gated:
        configs += [(f"flashinfer (gate, {s:.0%} skipped)",
                     base | {"predictor": "gate", "reference_ids": reference, "calibration": gate_tag(s)})
                    for s in opts.gate_sparsities]
    else:
        sparse = base | {"predictor": "lowrank", "reference_ids": reference, "calibration": lowrank_tag(opts.recall_of[0])}
        for of in opts.recall_of:
            what = "" if of == "neurons" else f", {of} recall"
            configs.append((f"flashinfer (lowrank{what}, window {opts.window})", sparse | {"calibration": lowrank_tag(of)}))
        if opts.pin is not None:  # the same with another share of the caches kept for the hot set (--pin)
            configs.append((f"flashinfer (lowrank, window {opts.window}, pin {opts.pin})", sparse | {"pin": opts.pin}))
        configs.append(("flashinfer, flash at 1GB/s", sparse | {"flash_bw": "1GB/s"}))
        if opts.auto:  # --predictor auto on this disk and on slower flash, and the dense row it passes over there
            configs += [("flashinfer dense, flash at 1GB/s", base | {"predictor": "dense", "reference_ids": reference,
                                                                      "flash_bw": "1GB/s"}),
                        ("flashinfer auto", sparse | {"predictor": "auto"}),
                        ("flashinfer auto, flash at 1GB/s", sparse | {"predictor": "auto", "flash_bw": "1GB/s"})]
    for name, cfg in configs:
        log(f"{preset.name}: {name}")
        if "calibration" in cfg:
            install_calibration(store, cfg.pop("calibration"))
        row = run_flashinfer(cfg, cap)
        if cfg["predictor"] == "auto" and "auto_choice" in row:
            name += f" -> {row['predictor']}"
            log(row["auto_choice"])
        rows.append(row | {"model": preset.name, "config": name})
    if gguf is not None and not opts.no_llamacpp:
        for name, limit in ((f"llama.cpp, {opts.cap} cgroup", cap), ("llama.cpp, no cap (reference)", None)):
            log(f"{preset.name}: {name}")
            argv = llamacpp_argv(gguf, prompt, opts.tokens, threads=opts.threads, ctx=ctx, kv_cache=opts.kv_cache)
            rows.append(run_child(argv, limit) | {"model": preset.name, "config": name})
    for row in rows:  # the roofline of the sparse runs, from this run's bandwidths
        if row.get("bytes_touched_per_token") and row.get("predictor") in ("lowrank", "gate") and row.get("decode_tok_s"):
            bound = roofline.roofline_ms(row["read_bytes_per_token"], row["bytes_touched_per_token"],
                                         bandwidths.best_disk_bytes_per_s, bandwidths.best_mem_bytes_per_s,
                                         overlap=False)
            row["roofline_ms"] = bound
            row["roofline_ratio"] = (1e3 / row["decode_tok_s"]) / bound
    return rows


def table(rows: list[dict]) -> str:
    naive = {r["model"]: r for r in rows if r["config"].startswith("naive") and "decode_tok_s" in r}
    head = ("| model | configuration | tok/s | vs naive | ms/token (I/O / mem. mgmt / compute) | MB read/token "
            "| peak cgroup MiB | OOM | agreement | roofline ms (achieved/bound) | prefill tok/s |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['config']} | error: {r['error']} | | | | "
                         f"{_mib(r.get('cgroup_peak_bytes'))} | {'yes' if r.get('oom_killed') else 'no'} | | | |")
            continue
        ms = r.get("ms_per_token")
        if isinstance(ms, dict):
            compute = ms["predictor"] + ms["attention"] + ms["ffn_compute"] + ms["other"]
            split = f"{ms['total']:.0f} ({ms['io']:.0f} / {ms['memory_management']:.0f} / {compute:.0f})"
        else:
            split = f"{ms:.0f}" if ms else "-"
        base = naive.get(r["model"])
        ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base and r.get("decode_tok_s") else "-"
        agree = f"{r['agreement']:.3f}" if "agreement" in r else ("1 (reference)" if r["config"].startswith("naive")
                                                                  else "n/a (SiLU)" if r.get("runtime") == "llama.cpp"
                                                                  and not getattr(PRESETS.get(r["model"]), "gated", False) else "-")
        roof = f"{r['roofline_ms']:.0f} ({r['roofline_ratio']:.1f}x)" if "roofline_ms" in r else "-"
        prefill = f"{r['prefill_tok_s']:.1f}" if r.get("prefill_tok_s") else "-"
        lines.append(f"| {r['model']} | {r['config']} | {r['decode_tok_s']:.2f} | {ratio} | {split} | "
                     f"{(r.get('read_bytes_per_token') or 0) / 1e6:.1f} | {_mib(r.get('cgroup_peak_bytes'))} | "
                     f"{'yes' if r.get('oom_killed') else 'no'} | {agree} | {roof} | {prefill} |")
    return "\n".join(lines)


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the 1b preset under 700MB, 32 tokens (< 5 min once built)")
    parser.add_argument("--models", default=None, help="comma-separated presets (default mistral-7b-relu)")
    parser.add_argument("--cap", default=None, help="DRAM cap for every runtime (default 2GB; --quick 700MB)")
    parser.add_argument("--tokens", type=int, default=None, help="decode tokens (default 128; --quick 32)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--window", type=int, default=5)
    parser.add_argument("--pin", type=float, default=None,
                        help="also a flashinfer row with this share of each cache kept for the hot set (--pin; "
                             "the other rows: the engine's default)")
    parser.add_argument("--ctx", type=int, default=None,
                        help="context flashinfer's KV cache and DRAM plan are sized for (default: prompt + tokens + 8); "
                             "llama.cpp's n_ctx is the same")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2, the machine's cores)")
    parser.add_argument("--kv-cache", default="f16", choices=tuple(KV_CACHE_TYPES),
                        help="KV cache type of every runtime (default f16; q8: flashinfer's q8, llama.cpp's q8_0)")
    parser.add_argument("--calibration-tokens", type=int, default=None, help="default 1024 (--quick 512)")
    parser.add_argument("--gate-sparsities", default=",".join(map(str, GATE_SPARSITIES)),
                        help="SwiGLU presets: the gate predictor's skipped shares, one row each (default 0.4,0.5)")
    parser.add_argument("--recall-of", default=",".join(DEFAULT_RECALL_OF),
                        help="ReLU presets: a lowrank row per calibration, comma-separated: neurons (default), "
                             "mass (flashinfer calibrate --recall-of)")
    parser.add_argument("--auto", action="store_true",
                        help="ReLU models: add --predictor auto rows, at this disk's speed and at 1GB/s, and dense at "
                             "1GB/s (what auto chooses between there)")
    parser.add_argument("--work", default=str(ROOT / "out" / "bench"), help="where models are built and kept")
    parser.add_argument("--no-llamacpp", action="store_true")
    parser.add_argument("--build-only", action="store_true", help="build (or check) the models, measure nothing")
    parser.add_argument("--no-record", action="store_true", help="do not append to bench/RESULTS.md")
    opts = parser.parse_args()
    opts.models = opts.models or ("1b" if opts.quick else "mistral-7b-relu")
    opts.cap = opts.cap or ("700MB" if opts.quick else "2GB")
    opts.tokens = opts.tokens or (32 if opts.quick else 128)
    opts.calibration_tokens = opts.calibration_tokens or (512 if opts.quick else 1024)
    try:
        opts.gate_sparsities = tuple(float(v) for v in opts.gate_sparsities.split(","))
    except ValueError:
        parser.error(f"--gate-sparsities must be comma-separated fractions, got {opts.gate_sparsities!r}")
    opts.recall_of = tuple(opts.recall_of.split(","))
    if not opts.recall_of or any(of not in RECALL_OF for of in opts.recall_of):
        parser.error(f"--recall-of takes neurons and/or mass, comma-separated, got {','.join(opts.recall_of)!r}")
    unknown = [m for m in opts.models.split(",") if m not in PRESETS]
    if unknown:
        parser.error(f"unknown model preset {unknown[0]!r}; one of {', '.join(PRESETS)}")
    if opts.build_only:
        for name in opts.models.split(","):
            build(PRESETS[name], Path(opts.work), opts.calibration_tokens, opts.gate_sparsities, opts.recall_of)
        return
    version, why = cgroup.cgroup_support()
    if version is None:
        parser.error(f"no memory cgroup to cap the runs with: {why}")
    command = "python -m bench.run " + " ".join(sys.argv[1:])
    log("measuring disk and DRAM bandwidth (bench/roofline.py)")
    bandwidths = roofline.measure(scratch_dir=opts.work if Path(opts.work).exists() else ".")
    rows = []
    for name in opts.models.split(","):
        rows += measure_model(PRESETS[name], opts, bandwidths)
    date = datetime.date.today().isoformat()
    header = (f"## {date} — end to end under a {opts.cap} cgroup (`bench/run.py`)\n\n"
              f"Machine: {machine_line()}. Disk (O_DIRECT, this run): "
              f"{bandwidths.best_disk_bytes_per_s / 1e9:.2f} GB/s best sequential; DRAM streaming "
              f"{bandwidths.best_mem_bytes_per_s / 1e9:.1f} GB/s. cgroup v{version}, caches dropped before each run.\n"
              f"Command: `{command}` ({opts.tokens} decode tokens after a {opts.prompt_tokens}-token prompt, "
              f"context {opts.ctx or opts.prompt_tokens + opts.tokens + 8}, {opts.kv_cache} KV cache; "
              f"llama.cpp {opts.threads} threads).\n")
    text = header + "\n" + table(rows) + "\n"
    print(text)
    results = ROOT / "bench" / "results"
    results.mkdir(exist_ok=True)
    out = results / f"{date}-{opts.models.replace(',', '+')}{'-quick' if opts.quick else ''}.json"
    out.write_text(json.dumps({"command": command, "machine": machine_line(), "bandwidths": asdict(bandwidths),
                               "rows": [{k: v for k, v in r.items() if k != "plan"} for r in rows]}, indent=1))
    log(f"wrote {out}")
    if not opts.no_record:
        with open(ROOT / "bench" / "RESULTS.md", "a") as f:
            f.write("\n" + text)
        log("appended the table to bench/RESULTS.md")


if __name__ == "__main__":
    main()
