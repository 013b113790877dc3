"""OpenAI's HTTP API as data: request bodies in, checked `GenerationRequest`s out; response,
chunk and error objects back. No HTTP here (flashinfer/server/app.py does that), so every
rule is testable with plain dicts.

Checked to OpenAI's documented ranges (temperature 0..2, top_p 0..1, n = 1, ...) with a 400
naming the field; prompt + max_tokens must fit the engine's context (OpenAI's
`context_length_exceeded`). Parameters flashinfer does not implement (n > 1, logprobs,
penalties, tools, ...) are refused when set to anything but their neutral value, rather
than silently ignored; fields we do not know are ignored, as client libraries send extras.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from numbers import Real

from flashinfer.errors import FlashinferError
from flashinfer.sampling import is_int

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP_STRINGS = 4  # OpenAI's limit


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class GenerationRequest:
    """One checked /v1/completions or /v1/chat/completions request, ready for Engine.stream."""

    chat: bool
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with the token counts
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    created: int = field(default_factory=lambda: int(time.time()))


def parse_completion(body: object, engine, model_name: str) -> GenerationRequest:
    """A /v1/completions body: prompt is a string or token ids (or a list of one of either)."""
    body = _object(body)
    _check_model(body, model_name)
    _refuse_unsupported(body, {"echo": (False,), "suffix": ("",), "best_of": (1,), "logprobs": ()})
    prompt = _required(body, "prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        prompt_ids = engine.tokenize(prompt)
    elif isinstance(prompt, list) and prompt and all(is_int(t) for t in prompt):
        prompt_ids = _token_ids(prompt, engine)
    else:
        raise APIError(400, "prompt must be a non-empty string or a list of token ids (one prompt per request)",
                       "prompt")
    return _request(body, engine, prompt_ids, chat=False, prompt_param="prompt",
                    default_max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS)


def parse_chat(body: object, engine, model_name: str) -> GenerationRequest:
    """A /v1/chat/completions body; the messages go through the model's chat template."""
    body = _object(body)
    _check_model(body, model_name)
    _refuse_unsupported(body, {"logprobs": (False,), "top_logprobs": (0,), "tools": ([],), "functions": ([],),
                               "tool_choice": ("none",), "response_format": ({"type": "text"},)})
    messages = _required(body, "messages")
    try:
        prompt_ids = engine.tokenize_chat(messages)
    except FlashinferError as e:  # bad messages, no template, or the template refuses them
        raise APIError(400, str(e), "messages") from None
    if "max_completion_tokens" in body and body["max_completion_tokens"] is not None:
        body = {**body, "max_tokens": body["max_completion_tokens"]}  # the newer name
    return _request(body, engine, prompt_ids, chat=True, prompt_param="messages", default_max_tokens=None)


def _request(body: dict, engine, prompt_ids: list[int], chat: bool, prompt_param: str,
             default_max_tokens: int | None) -> GenerationRequest:
    ctx = engine.ctx
    if not prompt_ids:
        raise APIError(400, f"{prompt_param} gives no tokens (and this model adds no BOS)", prompt_param)
    if len(prompt_ids) >= ctx:
        raise APIError(400, f"the prompt has {len(prompt_ids)} tokens and this model's context holds {ctx}; "
                            "shorten it", prompt_param, "context_length_exceeded")
    room = ctx - len(prompt_ids)
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = room if default_max_tokens is None else min(default_max_tokens, room)
    elif not is_int(max_tokens) or max_tokens < 1:
        raise APIError(400, f"max_tokens must be a positive integer, got {max_tokens!r}", "max_tokens")
    elif max_tokens > room:
        raise APIError(400, f"max_tokens is {max_tokens} but the context holds {ctx} tokens and the prompt uses "
                            f"{len(prompt_ids)}: ask for at most {room}, or shorten the prompt",
                       "max_tokens", "context_length_exceeded")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise APIError(400, "stream_options must be an object", "stream_options")
    return GenerationRequest(
        chat=chat,
        prompt_ids=prompt_ids,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        top_k=_integer(body, "top_k", 0, 0),  # not OpenAI's; vLLM and llama.cpp take it too
        stop=_stop(body.get("stop")),
        seed=_integer(body, "seed", None, 0),
        stream=_bool(body, "stream"),
        include_usage=_bool(stream_options, "include_usage"),
    )


def _object(body: object) -> dict:
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def _required(body: dict, name: str):
    if body.get(name) is None:
        raise APIError(400, f"missing required field '{name}'", name)
    return body[name]


def _check_model(body: dict, model_name: str) -> None:
    model = _required(body, "model")
    if model != model_name:
        raise APIError(404, f"the model {model!r} does not exist; this server serves {model_name!r}", "model",
                       "model_not_found")


def _refuse_unsupported(body: dict, neutral_values: dict[str, tuple]) -> None:
    common = {"n": (1,), "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},)}
    for name, neutral in {**common, **neutral_values}.items():
        value = body.get(name)
        if value is not None and value not in neutral:
            raise APIError(400, f"{name}={value!r} is not supported by flashinfer (leave it out)", name)


def _number(body: dict, name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, Real) or isinstance(value, bool) or not (low < value if low_open else low <= value) \
            or not value <= high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise APIError(400, f"{name} must be a number in {interval}, got {value!r}", name)
    return float(value)


def _integer(body: dict, name: str, default: int | None, low: int) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if not is_int(value) or value < low:
        raise APIError(400, f"{name} must be an integer >= {low}, got {value!r}", name)
    return int(value)


def _bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise APIError(400, f"{name} must be true or false, got {value!r}", name)
    return value


def _stop(stop: object) -> list[str]:
    stops = [stop] if isinstance(stop, str) else stop
    if stops is None:
        return []
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, f"stop must be a non-empty string or a list of them, got {stop!r}", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"stop takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return stops


def _token_ids(prompt: list, engine) -> list[int]:
    vocab = engine.args.vocab_size
    bad = [t for t in prompt if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token id(s) {bad[:5]} outside the vocabulary [0, {vocab})", "prompt")
    return [int(t) for t in prompt]


# ---- responses ------------------------------------------------------------------
def usage_object(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def response_object(req: GenerationRequest, model: str, text: str, finish_reason: str, usage: dict) -> dict:
    """The whole (not streamed) answer: a text_completion or a chat.completion."""
    if req.chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish_reason}
        return _envelope(req, model, "chat.completion", [choice]) | {"usage": usage}
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return _envelope(req, model, "text_completion", [choice]) | {"usage": usage}


def chunk_object(req: GenerationRequest, model: str, text: str | None, finish_reason: str | None = None,
                 role: bool = False) -> dict:
    """One streamed piece: choices[0].text (completions) or choices[0].delta (chat)."""
    if req.chat:
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _envelope(req, model, "chat.completion.chunk", [choice])
    choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
    return _envelope(req, model, "text_completion", [choice])


def usage_chunk(req: GenerationRequest, model: str, usage: dict) -> dict:
    """The last chunk when stream_options.include_usage is set: no choices, the token counts."""
    return _envelope(req, model, "chat.completion.chunk" if req.chat else "text_completion", []) | {"usage": usage}


def _envelope(req: GenerationRequest, model: str, object_type: str, choices: list) -> dict:
    prefix = "chatcmpl-" if req.chat else "cmpl-"
    return {"id": prefix + req.id, "object": object_type, "created": req.created, "model": model, "choices": choices}


def model_object(model: str, created: int) -> dict:
    return {"id": model, "object": "model", "created": created, "owned_by": "flashinfer"}
