"""StoreWriter: writes a flash store (storage/format.py) safely, tensor by tensor.

A state machine over a temporary directory `<out>.partial-<pid>` next to the target:
resident tensors and FFN layers are appended as they come (the caller streams them, so a
7B model never sits in RAM), tokenizer files are copied, and `finish()` writes the
manifest last and renames the directory into place. Any exception (including a full
disk) removes the temporary directory: an interrupted conversion never leaves a directory
that loads.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import shutil
from pathlib import Path

import numpy as np

from storage import format as fmt
from storage import quant
from storage.errors import StorageError

TARGET_CHUNK_BYTES = 256 * 1024  # checksum / compression unit; bench/compression.py measured the trade-off
NEURON_BLOCK = 1024  # neurons quantized at a time: bounds peak RSS while converting


def _planar_bytes(qt: quant.QuantizedTensor) -> list[np.ndarray]:
    """Resident layout: all data, then all scales, then all mins."""
    parts = [qt.data, qt.scales, qt.mins]
    return [np.ascontiguousarray(p).reshape(-1).view(np.uint8) for p in parts if p is not None]


class StoreWriter:
    def __init__(self, out_dir: str | Path, *, model_config: dict, hf_config: dict, quant_config: dict,
                 compression: str = "none", source: str = "", overwrite: bool = False, progress=None):
        self.out_dir = Path(out_dir)
        if compression not in fmt.COMPRESSIONS:
            raise StorageError(f"compression {compression!r} is not one of {', '.join(fmt.COMPRESSIONS)}")
        if self.out_dir.exists() and not overwrite:
            raise StorageError(f"{self.out_dir} already exists; choose another path or pass overwrite")
        self.tmp_dir = self.out_dir.with_name(f"{self.out_dir.name}.partial-{os.getpid()}")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        (self.tmp_dir / "ffn").mkdir(parents=True)
        self.model_config, self.hf_config, self.quant_config = model_config, hf_config, quant_config
        self.compression = compression
        self.source = source
        self.progress = progress  # callback(bytes written so far)
        self.bytes_written = 0
        self._resident_file = open(self.tmp_dir / fmt.RESIDENT_FILE, "wb")
        self._resident: dict[str, fmt.ResidentTensor] = {}
        self._ffn_layers: list[fmt.FFNLayer] = []
        self.state = "open"

    # ---- context manager: abort on any exception --------------------------------------
    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def abort(self) -> None:
        if not self._resident_file.closed:
            self._resident_file.close()
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self.state = "aborted"

    # ---- writing ------------------------------------------------------------------
    def _write(self, f, data, what: str) -> None:
        view = memoryview(data).cast("B")
        try:
            f.write(view)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
                raise StorageError(
                    f"{self.tmp_dir}: no space left while writing {what} ({e.strerror}); "
                    "free disk space (the store needs about the model's size at the chosen quantization) and convert again"
                ) from None
            raise StorageError(f"{self.tmp_dir}: cannot write {what} ({e.strerror})") from None
        self.bytes_written += len(view)
        if self.progress is not None:
            self.progress(self.bytes_written)

    def _pad_to_page(self, f, what: str) -> None:
        pad = -f.tell() % fmt.PAGE
        if pad:
            self._write(f, bytes(pad), what)

    def add_resident(self, name: str, tensor: np.ndarray, scheme: str, group_size: int) -> None:
        """Quantize (2-D) or keep as f32 (1-D) and append to resident.bin, 4 KiB-aligned."""
        assert self.state == "open", self.state
        tensor = np.asarray(tensor, dtype=np.float32)
        if tensor.ndim == 1:
            scheme, group_size = "f32", 0
        qt = quant.quantize(tensor, scheme, group_size) if tensor.ndim == 2 else None
        parts = _planar_bytes(qt) if qt is not None else [np.ascontiguousarray(tensor).view(np.uint8)]
        f = self._resident_file
        self._pad_to_page(f, name)
        offset = f.tell()
        digest = hashlib.blake2b(digest_size=16)
        for part in parts:
            digest.update(part)
            self._write(f, part, name)
        self._resident[name] = fmt.ResidentTensor(
            scheme=scheme, group_size=group_size if scheme not in ("f32", "f16") else 0,
            shape=tuple(tensor.shape), offset=offset, nbytes=f.tell() - offset, checksum=digest.hexdigest())

    def add_ffn_layer(self, layer: int, n_neurons: int, dim: int, scheme: str, group_size: int,
                      neuron_block) -> None:
        """Write layer `layer`'s bundles. `neuron_block(start, stop)` returns a dict of float32
        arrays for neurons start..stop-1: "up" [n, dim], optional "gate" [n, dim], "down"
        [n, dim] (columns of W_down), optional "up_bias"/"gate_bias" [n]."""
        assert self.state == "open" and layer == len(self._ffn_layers), (self.state, layer)
        if scheme in ("f32", "f16"):
            group_size = 0
        first = neuron_block(0, min(1, n_neurons))
        components, offset = [], 0
        for name in ("up", "gate", "down", "up_bias", "gate_bias"):
            if first.get(name) is None:
                continue
            is_bias = name.endswith("bias")
            c_scheme, c_group, length = ("f32", 0, 1) if is_bias else (scheme, group_size, dim)
            nbytes = 4 if is_bias else quant.scheme_bytes_per_row(scheme, dim, group_size or 32)
            components.append(fmt.BundleComponent(name, c_scheme, c_group, length, offset, nbytes))
            offset = fmt.align_up(offset + nbytes, fmt.COMPONENT_ALIGN)
        bundle_bytes = offset
        base = fmt.PAGE // math.gcd(bundle_bytes, fmt.PAGE)  # bundles per whole number of pages
        per_chunk = base * max(1, round(TARGET_CHUNK_BYTES / (base * bundle_bytes)))
        block = max(per_chunk, NEURON_BLOCK // per_chunk * per_chunk)

        rel = fmt.ffn_file(layer)
        chunks: list[fmt.Chunk] = []
        with open(self.tmp_dir / rel, "wb") as f:
            for start in range(0, n_neurons, block):
                stop = min(start + block, n_neurons)
                arrays = neuron_block(start, stop)
                bundles = np.zeros((stop - start, bundle_bytes), np.uint8)
                for c in components:
                    values = np.asarray(arrays[c.name], dtype=np.float32)
                    if c.name.endswith("bias"):
                        bundles[:, c.offset : c.offset + 4] = values.reshape(-1, 1).view(np.uint8)
                    else:
                        bundles[:, c.offset : c.offset + c.nbytes] = quant.row_records(quant.quantize(values, scheme, group_size or 32))
                for c0 in range(0, stop - start, per_chunk):
                    chunk = bundles[c0 : c0 + per_chunk]
                    chunks.append(self._write_chunk(f, chunk, f"{rel} chunk {len(chunks)}"))
            self._pad_to_page(f, rel)  # every read, even of the last chunk, is whole pages
            file_bytes = f.tell()
        self._ffn_layers.append(fmt.FFNLayer(
            file=rel, n_neurons=n_neurons, bundle_bytes=bundle_bytes, components=tuple(components),
            bundles_per_chunk=per_chunk, compression=self.compression, chunks=tuple(chunks), file_bytes=file_bytes))

    def _write_chunk(self, f, chunk: np.ndarray, what: str) -> fmt.Chunk:
        raw = np.ascontiguousarray(chunk).reshape(-1)
        digest = fmt.checksum(raw)
        if self.compression == "zstd":
            import zstandard

            self._pad_to_page(f, what)
            stored = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(raw.tobytes())
        else:
            stored = raw
        offset = f.tell()
        self._write(f, stored, what)
        return fmt.Chunk(offset=offset, stored_bytes=f.tell() - offset, checksum=digest)

    def copy_file(self, src: str | Path) -> None:
        shutil.copy2(src, self.tmp_dir / Path(src).name)

    def finish(self) -> Path:
        """Write the manifest, fsync, and rename the store into place."""
        assert self.state == "open", self.state
        self._pad_to_page(self._resident_file, fmt.RESIDENT_FILE)
        self._resident_file.close()
        manifest = fmt.Manifest(
            model_config=self.model_config, hf_config=self.hf_config, resident=self._resident,
            resident_bytes=os.path.getsize(self.tmp_dir / fmt.RESIDENT_FILE),
            ffn_layers=tuple(self._ffn_layers), quant=self.quant_config, source=self.source)
        manifest_path = self.tmp_dir / fmt.MANIFEST
        with open(manifest_path, "wb") as f:
            self._write(f, manifest.to_json().encode(), fmt.MANIFEST)
        for path in [*self.tmp_dir.rglob("*")]:
            if path.is_file():
                with open(path, "rb") as fh:
                    os.fsync(fh.fileno())
        if self.out_dir.exists():  # overwrite: move the old store aside first, delete it after
            trash = self.out_dir.with_name(f"{self.out_dir.name}.old-{os.getpid()}")
            os.rename(self.out_dir, trash)
            os.rename(self.tmp_dir, self.out_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.rename(self.tmp_dir, self.out_dir)
        self.state = "finished"
        return self.out_dir
