"""Run what people have: a GGUF file or a Hugging Face dir becomes a flash store once, in a cache.

`store_for(source)` returns the store to open for `source`: the source itself if it is a store;
otherwise a store under the cache dir, converted on first use with convert's defaults and
reused after. The cache entry is named by the source's name and a key over what the store is
made of: the source's resolved path, the size and mtime of its files, the conversion options
and the store format. A source that changes on disk (or a flashinfer that writes another
format) gets a new entry; the older one is left for the user to remove (its path is printed).

The cache dir is $FLASHINFER_CACHE, else $XDG_CACHE_HOME/flashinfer, else ~/.cache/flashinfer.
A conversion holds a lock file beside its entry, so two processes opening the same new source
convert it once; the store writer renames a finished store into place (storage/writer.py), so
an interrupted conversion (Ctrl-C, a full disk, SIGKILL) leaves no entry that later loads.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from flashinfer.errors import ModelPathError

GGUF_MAGIC = b"GGUF"
CACHE_ENV = "FLASHINFER_CACHE"


@dataclass(frozen=True)
class ConvertOptions:
    """The `flashinfer convert` options a cached store is made with (convert's defaults)."""

    quant: str = "auto"
    resident_quant: str = "auto"
    group_size: int = 32
    ffn_down: str = "auto"
    compression: str = "none"
    ffn_gate: str = "bundles"  # "rows" for the gate predictor (Engine.open(..., predictor="gate"))


def cache_root() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "flashinfer"


def source_kind(path: Path) -> str:
    """"store", "gguf" or "hf" for an existing path; a ModelPathError for anything else."""
    from storage.format import MANIFEST

    if not path.exists():
        raise ModelPathError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / MANIFEST).is_file() or ".partial-" in path.name:
            return "store"  # a .partial- dir is refused by the reader, with why
        if (path / "config.json").is_file():
            return "hf"
        raise ModelPathError(f"{path}: no config.json here and no manifest.json; expected a flash store, a Hugging "
                             "Face model directory or a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise ModelPathError(f"{path}: cannot read ({e.strerror})") from None
    if magic != GGUF_MAGIC:
        raise ModelPathError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC!r}); expected a "
                             "flash store, a Hugging Face model directory or a .gguf file")
    return "gguf"


def cache_key(source: Path, options: ConvertOptions) -> str:
    """Hex digest over the source's identity (resolved path, each file's name, size and mtime)
    and everything else the store depends on."""
    from storage.format import MATRICES_VERSION

    source = source.resolve()
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file()
                                                      and not p.name.startswith("."))
    chosen = asdict(options)
    if chosen["ffn_gate"] == ConvertOptions.ffn_gate:  # added later: entries made before keep their key
        del chosen["ffn_gate"]
    identity = {"source": str(source), "format": MATRICES_VERSION, "options": chosen,
                "files": [(p.name, (st := p.stat()).st_size, st.st_mtime_ns) for p in files]}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def cache_entry(source: Path, options: ConvertOptions, root: Path | None = None) -> Path:
    stem = source.resolve().name.removesuffix(".gguf")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stem)[:80] or "model"
    return (root or cache_root()) / f"{safe}-{cache_key(source, options)}"


def store_for(source: str | Path, store: str | Path | None = None, options: ConvertOptions = ConvertOptions(),
              progress=None, notify=None) -> Path:
    """The flash store to open for `source` (see the module docstring).

    store: where the converted store goes (and is found next time) instead of the cache.
    progress: a callable(done_bytes) for the conversion (flashinfer.progress.Progress).
    notify: a callable(str) told, in one line, when a conversion starts and where it goes."""
    source = Path(source)
    kind = source_kind(source)
    if kind == "store":
        if store is not None:
            raise ModelPathError(f"{source} is already a flash store; --store names where a GGUF file or a "
                                 "Hugging Face dir is converted to")
        return source
    target = Path(store) if store is not None else cache_entry(source, options)
    from storage.format import MANIFEST

    if (target / MANIFEST).is_file():
        if store is not None:  # a cache entry is keyed by its source already
            _check_same_source(target, source)
        return target
    _check_writable(target.parent, explicit=store is not None)
    with _lock(target):
        if (target / MANIFEST).is_file():  # another process converted it while we waited
            return target
        if target.exists():
            raise ModelPathError(f"{target}: exists but holds no flash store (no manifest.json); remove it or "
                                 "pass another --store DIR")
        if notify is not None:
            notify(f"converting {source} into {target} (once; later runs reuse it)")
        from flashinfer.convert import convert_checkpoint

        t0 = time.perf_counter()
        convert_checkpoint(source.resolve(), target, quant=options.quant, resident_quant=options.resident_quant,
                           group_size=options.group_size, compression=options.compression,
                           ffn_down=options.ffn_down, ffn_gate=options.ffn_gate, progress=progress)
        if notify is not None:
            notify(f"converted in {time.perf_counter() - t0:.1f} s")
    return target


def _check_same_source(store: Path, source: Path) -> None:
    """A --store DIR that holds another model's store is refused (a cache entry is keyed by its source)."""
    from storage.format import MANIFEST

    try:
        recorded = json.loads((store / MANIFEST).read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return  # the reader says what is wrong with the manifest when it opens the store
    if not isinstance(recorded, str):
        return
    recorded_path = Path(recorded)
    # the manifest holds the path as the converting command was given it: relative to a cwd we do not know
    same = recorded_path.resolve() == source.resolve() if recorded_path.is_absolute() else \
        recorded_path.name == source.resolve().name
    if not same:
        raise ModelPathError(f"{store}: holds the store of {recorded}, not of {source}; pass another --store DIR "
                             "(or remove that one)")


def _check_writable(parent: Path, explicit: bool) -> None:
    where = "--store DIR's parent" if explicit else f"the cache dir (set ${CACHE_ENV} or pass --store DIR)"
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelPathError(f"{parent}: cannot create {where}: {e.strerror}") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ModelPathError(f"{parent}: {where} is not writable")


class _lock:
    """An exclusive flock on `<target>.lock` while one process makes `target` (the conversion of
    a cache entry; flashinfer/fetch.py's download of a model)."""

    def __init__(self, target: Path, what: str = "conversion"):
        self.path = target.with_name(target.name + ".lock")
        self.what = what

    def __enter__(self):
        try:
            self.fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
        except OSError as e:
            raise ModelPathError(f"{self.path}: cannot create the {self.what} lock: {e.strerror}") from None
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        # the (empty) lock file stays: unlinking it would let a waiter lock a name no longer there
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
