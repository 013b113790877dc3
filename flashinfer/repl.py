"""`flashinfer chat`: an interactive conversation with a model, streamed as it is written.

The history is re-rendered through the model's chat template every turn, and the engine's
reuse_prefix keeps what the KV cache already holds, so a turn computes only its new tokens
(not the whole conversation again). Commands: /reset (forget the history), /help, /exit;
Ctrl-D leaves, Ctrl-C stops the reply being written (and drops it from the history).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from flashinfer.errors import GenerationError

HELP = "/reset forgets the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops a reply"


def chat_loop(engine, read: Callable[[str], str] = input, out=None, err=None, system: str | None = None,
              max_tokens: int = 512, **sampling) -> int:
    """Converse until end of input or /exit; returns the exit code (0)."""
    out = out or sys.stdout
    err = err or sys.stderr
    engine.apply_chat_template([{"role": "user", "content": "hi"}])  # no template: the error now, not after a line
    engine.reuse_prefix = True
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    print(f"chatting with {engine.source} (context {engine.ctx} tokens); {HELP}", file=err)
    while True:
        try:
            line = read("> ")
        except EOFError:
            print(file=err)
            return 0
        except KeyboardInterrupt:
            print(file=err)
            continue
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            history = list(start)
            print("(history cleared)", file=err)
            continue
        if text == "/help":
            print(HELP, file=err)
            continue
        history.append({"role": "user", "content": line})
        reply = _reply(engine, history, out, err, max_tokens, sampling)
        if reply is None:
            history.pop()
        else:
            history.append({"role": "assistant", "content": reply})


def _reply(engine, history: list[dict], out, err, max_tokens: int, sampling: dict) -> str | None:
    """Stream one reply; its text, or None if it was interrupted or the context is full."""
    try:
        ids = engine.tokenize_chat(history)
        room = engine.ctx - len(ids)
        if room < 2:
            raise GenerationError(f"the conversation has {len(ids)} tokens and fills the context of {engine.ctx}")
        steps = engine.stream(ids, max_tokens=min(max_tokens, room - 1), **sampling)
    except GenerationError as e:
        print(f"error: {e}; /reset starts over (or open with a larger --ctx)", file=err)
        return None
    pieces, last = [], None
    try:
        for last in steps:
            pieces.append(last.text)
            out.write(last.text)
            out.flush()
    except KeyboardInterrupt:
        steps.close()
        out.write("\n")
        print("(stopped; the reply is not kept)", file=err)
        return None
    out.write("\n")
    decode_rate = last.timings.rates(last.usage)[1]
    print(f"[{last.usage.completion_tokens} tokens, {decode_rate:.1f} tok/s; prompt {last.usage.prompt_tokens} tokens"
          f"{'' if last.finish_reason == 'stop' else ', cut at --max-tokens'}]", file=err)
    return "".join(pieces)
