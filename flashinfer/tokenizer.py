"""Text <-> token ids through HF `tokenizers`, and a streaming detokenizer.

`tokenizer.json` is the model's own tokenizer; `tokenizer_config.json` (optional) adds
the BOS/EOS tokens, whether to prepend BOS, and the chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from flashinfer.errors import TokenizerError


class Tokenizer:
    def __init__(self, tokenizer_json: str, config: dict, source: str):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self._tok = HFTokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises plain Exception subclasses from Rust
            raise TokenizerError(f"{source}: cannot load tokenizer ({e})") from None
        self.config = config
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
        return cls(tok_path.read_text(), config, str(tok_path))

    def _special_id(self, token) -> int | None:
        if isinstance(token, dict):  # older configs: {"content": "<s>", ...}
            token = token.get("content")
        return self._tok.token_to_id(token) if token else None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=True).ids
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


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
