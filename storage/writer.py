"""StoreWriter: writes a flash store (storage/format.py) safely, tensor by tensor.

A state machine over a temporary directory `<out>.partial-<pid>` next to the target:
resident tensors and FFN layers are appended as they come (the caller streams them, so a
7B model never sits in RAM), tokenizer files are copied, and `finish()` writes the
manifest last, fsyncs, and swaps the directory into place (storage/atomic.py: an overwritten
store is the old one until that instant). Any exception (including a full disk) removes the
temporary directory, and a SIGKILLed conversion's is removed by the next writer of the same
store: an interrupted conversion never leaves a directory that loads.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import shutil
from pathlib import Path

import numpy as np

from storage import atomic
from storage import format as fmt
from storage import quant
from storage.errors import StorageError

TARGET_CHUNK_BYTES = 256 * 1024  # checksum / compression unit; bench/compression.py measured the trade-off
NEURON_BLOCK = 1024  # neurons quantized at a time: bounds peak RSS while converting
RESIDENT_BLOCK_BYTES = 32 << 20  # float32 rows of a resident matrix quantized at a time (same reason)


def bundle_layout(names, dim: int, scheme: str | dict, group_size: int) -> tuple[list[fmt.BundleComponent], int]:
    """The components of a row-column bundle (in the format's fixed order, each aligned)
    for the FFN arrays `names` ("up", "gate", "down", "up_bias", "gate_bias"), and its size.
    `scheme`: one for every weight component, or a dict by component name (a GGUF's kept
    blocks: up/gate as the file has them, down re-quantized)."""
    schemes = scheme if isinstance(scheme, dict) else {name: scheme for name in ("up", "gate", "down")}
    components, offset = [], 0
    for name in ("up", "gate", "down", "up_bias", "gate_bias"):
        if name not in names:
            continue
        is_bias = name.endswith("bias")
        c_scheme = "f32" if is_bias else schemes[name]
        if name == "down" and c_scheme == "q4k":
            raise StorageError("a down column cannot be q4k (its super-blocks run along rows); use q8, or write "
                               "W_down as rows (convert --ffn-down rows)")
        if c_scheme == "q6k":  # the FFN kernels take one group for a layer's up, gate and down
            raise StorageError(f"an FFN bundle's {name} cannot be q6k (groups of 16; a bundle's components share "
                               "groups of 32): use q8, or q6k only for whole matrices (--resident-quant q6k, or "
                               "a GGUF's Q6_K W_down with --ffn-down rows)")
        c_group = 0 if c_scheme in ("f32", "f16") else group_size
        length = 1 if is_bias else dim
        nbytes = 4 if is_bias else quant.scheme_bytes_per_row(c_scheme, dim, c_group or 32)
        components.append(fmt.BundleComponent(name, c_scheme, c_group, length, offset, nbytes))
        offset = fmt.align_up(offset + nbytes, fmt.COMPONENT_ALIGN)
    return components, offset


def pack_bundles(arrays: dict, components: list[fmt.BundleComponent], bundle_bytes: int) -> np.ndarray:
    """uint8 [n, bundle_bytes]: neuron i's quantized up/gate rows, down column and biases.
    A weight array is float32 (quantized here) or a QuantizedTensor already in its component's
    scheme (kept from the source, written as it is)."""
    up = arrays["up"]
    n = up.shape[0]
    bundles = np.zeros((n, bundle_bytes), np.uint8)
    for c in components:
        values = arrays[c.name]
        if c.name.endswith("bias"):
            bundles[:, c.offset : c.offset + 4] = np.asarray(values, dtype=np.float32).reshape(-1, 1).view(np.uint8)
            continue
        if not isinstance(values, quant.QuantizedTensor):
            values = quant.quantize(np.asarray(values, dtype=np.float32), c.scheme, c.group_size or 32)
        elif values.scheme != c.scheme or values.group_size != c.group_size:
            raise StorageError(f"bundle component {c.name!r} is {c.scheme} (group {c.group_size}); got rows in "
                               f"{values.scheme} (group {values.group_size})")
        bundles[:, c.offset : c.offset + c.nbytes] = quant.row_records(values)
    return bundles


class StoreWriter:
    def __init__(self, out_dir: str | Path, *, model_config: dict, hf_config: dict, quant_config: dict,
                 compression: str = "none", source: str = "", overwrite: bool = False, progress=None):
        self.out_dir = Path(out_dir)
        if compression not in fmt.COMPRESSIONS:
            raise StorageError(f"compression {compression!r} is not one of {', '.join(fmt.COMPRESSIONS)}")
        atomic.remove_stale(self.out_dir)  # what a killed conversion left (and its old store, put back)
        if self.out_dir.exists() and not overwrite:
            raise StorageError(f"{self.out_dir} already exists; choose another path or pass overwrite")
        self.tmp_dir = atomic.staging_dir(self.out_dir)
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

    def add_resident(self, name: str, tensor, scheme: str, group_size: int) -> None:
        """Quantize (2-D) or keep as f32 (1-D) and append to resident.bin, 4 KiB-aligned.

        `tensor` is an array, or anything with `.shape` whose `[start:stop]` gives float32
        rows (e.g. a lazy view of a memory-mapped bf16 checkpoint tensor): 2-D tensors are
        quantized RESIDENT_BLOCK_BYTES of rows at a time, so converting a 500 MB embedding
        does not hold it plus its quantization temporaries in RAM at once."""
        assert self.state == "open", self.state
        shape = tuple(int(d) for d in tensor.shape)
        if len(shape) == 1:
            scheme, group_size = "f32", 0
        group_size = quant.group_size_of(scheme, group_size)
        offset, nbytes, digest = self._write_planar(self._resident_file, name, tensor, scheme, group_size)
        self._resident[name] = fmt.ResidentTensor(
            scheme=scheme, group_size=group_size if scheme not in ("f32", "f16") else 0,
            shape=shape, offset=offset, nbytes=nbytes, checksum=digest)

    def _write_planar(self, f, name: str, tensor, scheme: str, group_size: int) -> tuple[int, int, str]:
        """Append `tensor` to f, 4 KiB-aligned, in the planar layout (a 1-D tensor as f32);
        returns (offset, nbytes, checksum). See add_resident for what `tensor` may be."""
        shape = tuple(int(d) for d in tensor.shape)
        self._pad_to_page(f, name)
        offset = f.tell()
        digest = hashlib.blake2b(digest_size=16)

        def emit(part: np.ndarray) -> None:
            part = np.ascontiguousarray(part).reshape(-1).view(np.uint8)
            digest.update(part)
            self._write(f, part, name)

        # the source's own blocks, not re-rounded (a GGUF's blocks are 32 weights: a store of
        # another group size re-quantizes them)
        as_is = getattr(tensor, "kept_scheme", None) == scheme and (group_size in (0, 32) or scheme in quant.FIXED_GROUPS)
        if len(shape) == 1:
            emit(np.asarray(tensor[0 : shape[0]], dtype=np.float32))
        else:
            # planar layout (all data, then scales, then mins): data goes out block by block,
            # the small scales/mins are kept until the end
            tails: list[list[np.ndarray]] = [[], []]
            step = max(1, RESIDENT_BLOCK_BYTES // (4 * max(1, shape[1])))
            for start in range(0, shape[0], step):
                if as_is:
                    qt = tensor.quantized(slice(start, start + step))
                else:
                    qt = quant.quantize(np.asarray(tensor[start : start + step], dtype=np.float32), scheme, group_size)
                emit(qt.data)
                for kept, part in zip(tails, (qt.scales, qt.mins)):
                    if part is not None:
                        kept.append(part)
            for kept in tails:
                for part in kept:
                    emit(part)
        return offset, f.tell() - offset, digest.hexdigest()

    def add_ffn_layer(self, layer: int, n_neurons: int, dim: int, scheme: str | dict, group_size: int,
                      neuron_block, matrices: dict | None = None) -> None:
        """Write layer `layer`'s bundles. `neuron_block(start, stop)` returns a dict of arrays
        for neurons start..stop-1: "up" [n, dim], optional "gate" [n, dim], "down" [n, dim]
        (columns of W_down), float32 or QuantizedTensor in the component's scheme; optional
        "up_bias"/"gate_bias" [n]. `scheme`: one, or one per weight component (bundle_layout).
        `matrices`: {name: (tensor, scheme)} written whole after the bundles (format.FFNMatrix;
        "down": W_down [dim, n_neurons] as add_resident takes a tensor), whose component
        neuron_block then leaves out."""
        assert self.state == "open" and layer == len(self._ffn_layers), (self.state, layer)
        first = neuron_block(0, min(1, n_neurons))
        components, bundle_bytes = bundle_layout([k for k, v in first.items() if v is not None], dim, scheme, group_size)
        base = fmt.PAGE // math.gcd(bundle_bytes, fmt.PAGE)  # bundles per whole number of pages
        per_chunk = base * max(1, round(TARGET_CHUNK_BYTES / (base * bundle_bytes)))
        block = max(per_chunk, NEURON_BLOCK // per_chunk * per_chunk)

        rel = fmt.ffn_file(layer)
        chunks: list[fmt.Chunk] = []
        with open(self.tmp_dir / rel, "wb") as f:
            for start in range(0, n_neurons, block):
                stop = min(start + block, n_neurons)
                bundles = pack_bundles(neuron_block(start, stop), components, bundle_bytes)
                for c0 in range(0, stop - start, per_chunk):
                    chunk = bundles[c0 : c0 + per_chunk]
                    chunks.append(self._write_chunk(f, chunk, f"{rel} chunk {len(chunks)}"))
            written = []
            for name, (tensor, m_scheme) in (matrices or {}).items():
                if name in first and first[name] is not None:
                    raise StorageError(f"layer {layer}: FFN component {name!r} given both in bundles and as a matrix")
                m_group = quant.group_size_of(m_scheme, group_size)
                offset, nbytes, digest = self._write_planar(f, f"{rel} matrix {name}", tensor, m_scheme, m_group)
                written.append(fmt.FFNMatrix(name, m_scheme, m_group, tuple(int(d) for d in tensor.shape), offset,
                                             nbytes, digest))
            self._pad_to_page(f, rel)  # every read, even of the last chunk, is whole pages
            file_bytes = f.tell()
        self._ffn_layers.append(fmt.FFNLayer(
            file=rel, n_neurons=n_neurons, bundle_bytes=bundle_bytes, components=tuple(components),
            bundles_per_chunk=per_chunk, compression=self.compression, chunks=tuple(chunks), file_bytes=file_bytes,
            matrices=tuple(written)))

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
            ffn_layers=tuple(self._ffn_layers), quant=self.quant_config, source=self.source,
            version=fmt.MATRICES_VERSION if any(layer.matrices for layer in self._ffn_layers) else 1)
        manifest_path = self.tmp_dir / fmt.MANIFEST
        with open(manifest_path, "wb") as f:
            self._write(f, manifest.to_json().encode(), fmt.MANIFEST)
        atomic.fsync_tree(self.tmp_dir)
        atomic.replace_dir(self.tmp_dir, self.out_dir)  # overwrite: the old store until this instant
        self.state = "finished"
        return self.out_dir
