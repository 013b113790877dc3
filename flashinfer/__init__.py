"""flashinfer: run LLMs larger than DRAM from flash (after Apple's "LLM in a flash").

`from flashinfer import Engine` is the API apps embed; see flashinfer/engine.py. Every
error a caller can cause is a `FlashinferError` (flashinfer/errors.py).
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Engine", "FlashinferError", "GenerationResult", "Response", "Usage", "__version__"]

_ENGINE_NAMES = ("Engine", "GenerationResult", "Response", "Usage")


def __getattr__(name: str):
    # Lazy, so `flashinfer --help` and `import flashinfer.errors` do not load numba.
    if name in _ENGINE_NAMES:
        from flashinfer import engine

        return getattr(engine, name)
    if name == "FlashinferError":
        from flashinfer.errors import FlashinferError

        return FlashinferError
    raise AttributeError(f"module 'flashinfer' has no attribute {name!r}")
