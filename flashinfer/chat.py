"""Chat messages -> prompt text, through the model's own chat template.

A chat model was trained on one exact conversation format, which its `tokenizer_config.json`
carries as a Jinja template (`chat_template`). We render it the way HF `transformers`'
`apply_chat_template` does (a sandboxed environment with trim_blocks/lstrip_blocks, the
`raise_exception` and `strftime_now` helpers, a `tojson` that keeps non-ASCII, the special
token strings as variables), so the prompt is byte for byte what the model saw in training.

A model without a template gets an error rather than a made-up format: base models
were never trained on one, and a guessed format silently gives poor answers.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from datetime import datetime

from flashinfer.errors import ChatTemplateError, GenerationError

Message = Mapping[str, object]  # {"role": "user", "content": "hi"}, as in OpenAI's chat API


def check_messages(messages: Sequence[Message]) -> list[dict]:
    """Validate OpenAI-style messages; returns copies whose content is a plain string
    (a list of {"type": "text", "text": ...} parts is joined, as text-only servers do)."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise GenerationError("messages must be a non-empty list of {'role': ..., 'content': ...} objects")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise GenerationError(f"messages[{i}] must be an object with 'role' and 'content', got {message!r}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role:
            raise GenerationError(f"messages[{i}].role must be a non-empty string, got {role!r}")
        checked.append({**message, "content": _content_text(content, i)})
    return checked


def _content_text(content: object, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence) and not isinstance(content, bytes):
        parts = []
        for part in content:
            if not (isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise GenerationError(f"messages[{i}].content: only text parts ({{'type': 'text', 'text': ...}}) "
                                      f"are supported, got {part!r}")
            parts.append(part["text"])
        return "".join(parts)
    raise GenerationError(f"messages[{i}].content must be a string or a list of text parts, got {content!r}")


def pick_template(chat_template: object, source: str) -> str:
    """The template text: a string, or the "default" one of a list of named templates."""
    if isinstance(chat_template, str) and chat_template:
        return chat_template
    if isinstance(chat_template, list):
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    if chat_template is None:
        raise ChatTemplateError(
            f"{source}: the model has no chat_template in tokenizer_config.json, so there is no chat format "
            "to follow; use generate() with a prompt in the model's own format, or add a chat_template"
        )
    raise ChatTemplateError(f"{source}: chat_template must be a string or a list with a 'default' template")


def render_chat(template: str, messages: Sequence[Message], special_tokens: Mapping[str, str],
                add_generation_prompt: bool = True) -> str:
    """Render checked messages with the template; template errors become ChatTemplateError."""
    import jinja2

    try:
        compiled = _compile(template)
        return compiled.render(messages=messages, add_generation_prompt=add_generation_prompt, **special_tokens)
    except jinja2.TemplateError as e:  # a syntax error, or the template's own raise_exception(...)
        raise ChatTemplateError(f"chat template: {e}") from None


@functools.lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    import jinja2

    raise jinja2.TemplateError(message)
