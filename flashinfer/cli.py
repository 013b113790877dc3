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


def _cmd_run(args: argparse.Namespace) -> int:
    from flashinfer.engine import Engine

    t0 = time.perf_counter()
    engine = Engine.open(args.model, ctx=args.ctx)
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
            f"finish: {last.finish_reason} | load {load_s:.2f} s incl. JIT {engine.jit_seconds:.2f} s]",
            file=sys.stderr,
        )
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flashinfer",
        description="Run LLMs larger than DRAM from flash (after Apple's 'LLM in a flash').",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="generate text from a prompt", description="Generate text, streamed as it is made.")
    run.add_argument("model", help="Hugging Face model directory (config.json, *.safetensors, tokenizer.json)")
    run.add_argument("--prompt", required=True, help="the prompt text")
    run.add_argument("--max-tokens", type=_positive_int, default=128, help="tokens to generate at most (default 128)")
    run.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    run.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = off)")
    run.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    run.add_argument("--seed", type=int, default=None, help="random seed for sampling")
    run.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    run.add_argument("--ctx", type=_positive_int, default=None, help="context length in tokens (default: model max, <= 4096)")
    run.add_argument("--echo", action="store_true", help="print the prompt before the generated text")
    run.set_defaults(func=_cmd_run)
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
