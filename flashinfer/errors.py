"""The one exception hierarchy of flashinfer.

Every error a user can cause (a wrong path, a bad config, a damaged checkpoint, a budget
that cannot fit) is a `FlashinferError` whose message names the thing at fault and, where
there is one, the fix. The CLI prints `error: <message>` and exits with code 2; the Python
API raises these exceptions as they are. The root and the storage errors are defined in
`storage.errors` (the lowest layer) and re-exported here.
"""

from __future__ import annotations

from storage.errors import (  # noqa: F401  (re-exported)
    CheckpointError,
    ConfigValueError,
    FlashinferError,
    FormatError,
    QuantError,
    ReadError,
    StorageError,
)


class ModelPathError(FlashinferError):
    """The model path does not exist or is not a model directory / store."""


class ConfigError(FlashinferError):
    """config.json is missing, malformed, or asks for something we do not support."""


class UnsupportedArchitectureError(ConfigError):
    """The model_type or an option of it is not implemented."""


class TokenizerError(FlashinferError):
    """tokenizer.json is missing or cannot be loaded."""


class GenerationError(FlashinferError):
    """Bad generation arguments (empty prompt, context overflow, bad sampling values)."""


class ChatTemplateError(TokenizerError):
    """The model has no chat template, or its template refuses the messages."""


class EngineClosedError(FlashinferError):
    """A call on an engine after close()."""


class EngineBusyError(FlashinferError):
    """A call from the thread that is itself iterating an unfinished stream of the engine
    (it would wait for itself forever)."""
