"""Reading and writing Hugging Face safetensors checkpoints, memory-mapped.

Format (https://github.com/huggingface/safetensors): an 8-byte little-endian u64 N, then N
bytes of JSON header `{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`,
then the data; offsets are relative to the first byte after the header.

Files are memory-mapped, never read whole: a 14 GB checkpoint costs only the pages of the
tensors actually touched. `raw()` hands out zero-copy read-only views in the stored dtype
(bf16 as uint16, since numpy has no bf16); `as_float32()` converts one tensor.
A sharded checkpoint (`model.safetensors.index.json`) is opened as one `Checkpoint`.
Every inconsistency (truncation, a header that lies about sizes, an unknown dtype) raises
`CheckpointError` naming the file and the tensor.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from storage import schema
from storage.errors import CheckpointError

# safetensors dtype -> numpy dtype of the stored bytes (bf16 kept as its raw bits)
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
NUMPY_TO_SAFETENSORS = {np.dtype("<f8"): "F64", np.dtype("<f4"): "F32", np.dtype("<f2"): "F16",
                        np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("<i2"): "I16",
                        np.dtype("i1"): "I8", np.dtype("u1"): "U8", np.dtype("?"): "BOOL"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the reference implementation's own limit
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors spelling: "F32", "BF16", ...
    shape: tuple[int, ...]
    offset: int  # absolute byte offset in the file
    nbytes: int
    path: Path


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    """bf16 is the top half of an f32: shift the 16 bits up and reinterpret (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def _check_no_overlap(tensors: dict[str, TensorInfo], where: str) -> None:
    """No two tensors share a byte (the spec's rule; a header that lies would alias weights)."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values() if t.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise CheckpointError(f"{where}: tensors {first!r} and {second!r} overlap in the file (the header's "
                                  "data_offsets are damaged; re-download or re-save it)")


class SafetensorsFile:
    """One .safetensors file: parsed and checked header, memory-mapped data."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._file = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"{self.path}: cannot open ({e.strerror})") from None
        file_size = os.fstat(self._file.fileno()).st_size
        self.tensors = self._parse_header(file_size)
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if file_size else None

    def _parse_header(self, file_size: int) -> dict[str, TensorInfo]:
        where = str(self.path)
        if file_size < 8:
            raise CheckpointError(f"{where}: truncated safetensors file ({file_size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", self._file.read(8))
        if header_len > MAX_HEADER_BYTES or 8 + header_len > file_size:
            raise CheckpointError(
                f"{where}: header length {header_len} does not fit the file ({file_size} bytes); "
                "the file is truncated or not safetensors"
            )
        try:
            header = json.loads(self._file.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{where}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{where}: header is not a JSON object")
        data_start = 8 + header_len
        data_len = file_size - data_start
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                try:  # the spec: a map of strings to strings
                    for key, value in schema.mapping(entry, "__metadata__").items():
                        schema.string(value, f"__metadata__[{key!r}]")
                except schema.SchemaError as e:
                    raise CheckpointError(f"{where}: header field {e}") from None
                continue
            try:
                schema.mapping(entry, name)
                dtype_name = schema.string(schema.member(entry, "dtype", name), f"{name}.dtype")
                shape = schema.shape(schema.member(entry, "shape", name), f"{name}.shape", range(9), lo=0)
                begin, end = (schema.integer(v, f"{name}.data_offsets[{i}]") for i, v in
                              enumerate(schema.array(schema.member(entry, "data_offsets", name),
                                                     f"{name}.data_offsets", 2)))
            except schema.SchemaError as e:
                raise CheckpointError(f"{where}: tensor {name!r} has a malformed header entry ({e}): "
                                      f"{str(entry)[:200]}") from None
            if dtype_name not in DTYPES:
                raise CheckpointError(
                    f"{where}: tensor {name!r} has dtype {dtype_name!r}, which flashinfer cannot read "
                    f"(readable: {', '.join(DTYPES)})"
                )
            expected = math.prod(shape) * DTYPES[dtype_name].itemsize  # Python ints: no overflow
            if not (begin <= end) or end - begin != expected:
                raise CheckpointError(
                    f"{where}: tensor {name!r} header says shape {list(shape)} {dtype_name} "
                    f"({expected} bytes) but data_offsets [{begin}, {end}] span {end - begin} bytes"
                )
            if end > data_len:
                raise CheckpointError(
                    f"{where}: tensor {name!r} ends at byte {data_start + end} but the file has only "
                    f"{file_size} bytes; the file is truncated (re-download or re-save it)"
                )
            tensors[name] = TensorInfo(name, dtype_name, shape, data_start + begin, end - begin, self.path)
        _check_no_overlap(tensors, where)
        return tensors

    def raw(self, name: str) -> np.ndarray:
        """Zero-copy read-only view of a tensor in its stored dtype (bf16 as uint16)."""
        info = self.tensors[name]
        if info.nbytes == 0:
            return np.zeros(info.shape, DTYPES[info.dtype])
        count = info.nbytes // DTYPES[info.dtype].itemsize
        arr = np.frombuffer(self._mmap, dtype=DTYPES[info.dtype], count=count, offset=info.offset)
        return arr.reshape(info.shape)

    def release(self, name: str) -> None:
        """Drop a tensor's pages from this process's RSS and from the page cache.

        Mapped file pages count in RSS once touched, so streaming a 14 GB checkpoint through
        the mapping would show a 14 GB peak RSS (and evict everyone else's page cache) unless
        each tensor is released after use. Views stay valid: the pages are re-read if touched."""
        info = self.tensors[name]
        if self._mmap is None or info.nbytes == 0:
            return
        start = info.offset - info.offset % mmap.PAGESIZE
        length = info.offset + info.nbytes - start
        if hasattr(mmap, "MADV_DONTNEED"):
            self._mmap.madvise(mmap.MADV_DONTNEED, start, length)
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(self._file.fileno(), start, length, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        # Views handed out keep the mmap alive; closing only the file object is always safe.
        self._file.close()


class Checkpoint:
    """All safetensors files of an HF model directory, addressed by tensor name."""

    def __init__(self, files: list[SafetensorsFile], source: Path):
        self.source = source
        self.files = files
        self.tensors: dict[str, TensorInfo] = {}
        self._owner: dict[str, SafetensorsFile] = {}
        for f in files:
            for name, info in f.tensors.items():
                if name in self.tensors:
                    raise CheckpointError(f"{f.path}: tensor {name!r} also appears in {self.tensors[name].path}")
                self.tensors[name] = info
                self._owner[name] = f

    @classmethod
    def open(cls, model_dir: str | Path) -> "Checkpoint":
        model_dir = Path(model_dir)
        index_path = model_dir / INDEX_NAME
        if index_path.is_file():
            return cls._open_sharded(model_dir, index_path)
        single = model_dir / SINGLE_NAME
        if single.is_file():
            return cls([SafetensorsFile(single)], model_dir)
        others = sorted(model_dir.glob("*.safetensors"))
        if others:
            return cls([SafetensorsFile(p) for p in others], model_dir)
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pth")):
            raise CheckpointError(
                f"{model_dir}: only PyTorch pickle weights (*.bin/*.pth) found; flashinfer reads safetensors "
                "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
            )
        raise CheckpointError(f"{model_dir}: no *.safetensors weight files found")

    @classmethod
    def _open_sharded(cls, model_dir: Path, index_path: Path) -> "Checkpoint":
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from None
        shard_names = sorted(set(weight_map.values()))
        missing = [s for s in shard_names if not (model_dir / s).is_file()]
        if missing:
            raise CheckpointError(f"{index_path}: shard file(s) missing: {', '.join(missing)}")
        ckpt = cls([SafetensorsFile(model_dir / s) for s in shard_names], model_dir)
        for name, shard in weight_map.items():
            info = ckpt.tensors.get(name)
            if info is None or info.path.name != shard:
                raise CheckpointError(f"{index_path}: says tensor {name!r} is in {shard}, but it is not there")
        return ckpt

    def raw(self, name: str) -> np.ndarray:
        return self._owner[name].raw(name)

    def release(self, name: str) -> None:
        self._owner[name].release(name)

    def as_float32(self, name: str) -> np.ndarray:
        """The tensor as float32 (a copy unless it is stored as F32)."""
        info = self.tensors[name]
        arr = self.raw(name)
        if info.dtype == "BF16":
            return bf16_to_float32(arr)
        return arr if info.dtype == "F32" else arr.astype(np.float32)

    def close(self) -> None:
        for f in self.files:
            f.close()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_safetensors(path: str | Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None,
                      bf16: set[str] = frozenset()) -> None:
    """Write tensors to a .safetensors file. Names in `bf16` hold uint16 bf16 bits."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    tensors = {name: np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("<")) for name, arr in tensors.items()}
    offset = 0
    for name, arr in tensors.items():
        dtype = "BF16" if name in bf16 else NUMPY_TO_SAFETENSORS[arr.dtype]
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + arr.nbytes]}
        offset += arr.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # keep tensor data 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for arr in tensors.values():
            f.write(arr.tobytes())
