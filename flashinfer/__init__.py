"""flashinfer: run LLMs larger than DRAM from flash (after Apple's "LLM in a flash").

`from flashinfer import Engine` is the API apps embed; see flashinfer/engine.py.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Engine", "GenerationResult", "Response", "__version__"]


def __getattr__(name: str):
    # Lazy, so `flashinfer --help` and `import flashinfer.errors` do not load numba.
    if name in ("Engine", "GenerationResult", "Response"):
        from flashinfer import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'flashinfer' has no attribute {name!r}")
