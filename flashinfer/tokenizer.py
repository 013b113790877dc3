"""Text <-> token ids through HF `tokenizers`, and a streaming detokenizer.

`tokenizer.json` is the model's own tokenizer; `tokenizer_config.json` (optional) adds
the BOS/EOS tokens, whether to prepend BOS, and the chat template — or `chat_template.jinja`
beside it does (transformers >= 4.43 saves the template there).
"""

from __future__ import annotations

import json
from pathlib import Path

from flashinfer.errors import TokenizerError

CHAT_TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.43 saves a chat template


class Tokenizer:
    def __init__(self, tokenizer_json: str, config: dict, source: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
            raise TokenizerError(f"{source}: cannot load tokenizer ({e})") from None
        self.config = _checked_config(config, source)
        self.source = source
        self.bos_id = self._special_id(config.get("bos_token"))
        self.eos_id = self._special_id(config.get("eos_token"))
        self.add_bos = bool(config.get("add_bos_token", False))
        self.chat_template = config.get("chat_template")

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        path = Path(path)
        tok_path = path / "tokenizer.json"
        if not tok_path.is_file():
            raise TokenizerError(
                f"{path}: no tokenizer.json (flashinfer reads HF fast tokenizers; save one with "
                "AutoTokenizer.from_pretrained(...).save_pretrained(dir))"
            )
        config = {}
        config_path = path / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise TokenizerError(f"{config_path}: not valid JSON ({e})") from None
        jinja = path / CHAT_TEMPLATE_FILE
        if jinja.is_file():
            try:
                template = jinja.read_text()
            except UnicodeDecodeError as e:
                raise TokenizerError(f"{jinja}: not UTF-8 text ({e})") from None
            if config.get("chat_template") not in (None, template):
                raise TokenizerError(
                    f"{path}: two different chat templates, {CHAT_TEMPLATE_FILE} and tokenizer_config.json's "
                    f"chat_template; delete the one the model was not trained with")
            config = {**config, "chat_template": template}
        return cls(tok_path.read_text(), config, str(tok_path))

    def _special_id(self, token) -> int | None:
        if isinstance(token, dict):  # older configs: {"content": "<s>", ...}
            token = token.get("content")
        return self._tok.token_to_id(token) if token else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def special_tokens(self) -> dict[str, str]:
        """bos_token, eos_token, ... as strings: the variables chat templates refer to."""
        tokens = {name: self.config.get(name) for name in SPECIAL_TOKENS}
        tokens = {name: t.get("content") if isinstance(t, dict) else t for name, t in tokens.items()}
        return {name: t for name, t in tokens.items() if isinstance(t, str)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. add_special_tokens=False encodes text that already holds its
        special tokens (a rendered chat template writes its own BOS): none are added."""
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        if not add_special_tokens:
            return ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        """Render chat messages with the model's chat_template (flashinfer/chat.py)."""
        from flashinfer.chat import check_messages, pick_template, render_chat

        template = pick_template(self.chat_template, str(Path(self.source).parent))
        return render_chat(template, check_messages(messages), self.special_tokens, add_generation_prompt)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def _checked_config(config, source: str) -> dict:
    """tokenizer_config.json's fields this module reads, of the types it reads them as: a
    special token is a string, {"content": string} (older configs) or null; add_bos_token a bool."""
    where = str(Path(source).with_name("tokenizer_config.json"))
    if not isinstance(config, dict):
        raise TokenizerError(f"{where}: expected a JSON object, got {type(config).__name__}")
    for name in SPECIAL_TOKENS:
        token = config.get(name)
        content = token.get("content") if isinstance(token, dict) else token
        if content is not None and not isinstance(content, str):
            raise TokenizerError(f"{where}: {name} must be a string, {{\"content\": string}} or null, got {token!r}")
    if config.get("add_bos_token") is not None and not isinstance(config["add_bos_token"], bool):
        raise TokenizerError(f"{where}: add_bos_token must be true or false, got {config['add_bos_token']!r}")
    return config


class StreamDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character.

    Byte-level tokens can end in the middle of a multi-byte character; decoding then yields
    U+FFFD. We hold such tokens back until the character completes. Decoding a short window
    (from `prefix` on) rather than the whole text keeps each step O(1), and diffing against
    the window's previous decode keeps leading-space rules of SentencePiece tokenizers right.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids up to here have been emitted

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        if after.endswith("\ufffd") or len(after) <= len(before):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before) :]

    def flush(self) -> str:
        """Whatever is still held back at the end (an incomplete character decodes as U+FFFD)."""
        before = self.tokenizer.decode(self.ids[self.prefix : self.read])
        after = self.tokenizer.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
