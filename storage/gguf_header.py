"""A bounds check of a GGUF file's header, walked before gguf-py's GGUFReader sees it.

GGUFReader trusts the header's counts: a string length, an array count or a tensor count of
2**60 in a damaged file makes it loop building Python objects until the process is killed for
memory (seen fuzzing it: issue 16). This walk reads the same fields (GGUF v2/v3: magic, version,
tensor count, metadata count, then each key/value and each tensor info) with every count and
length bounded by the bytes left in the file, so nothing is sized from an unchecked field, and
names the first field that cannot be. It checks layout only; GGUFReader still parses the values.
"""

from __future__ import annotations

import struct
from pathlib import Path

from storage.errors import CheckpointError

# GGUF value types (gguf.GGUFValueType) and their sizes; 8 is a string, 9 an array
SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NESTING = 4  # arrays of arrays: llama.cpp writes none; deeper is damage, not a model
VERSIONS = (2, 3)  # GGUFReader's; version 1 had 32-bit counts and is refused by GGUFReader itself


class _Walk:
    def __init__(self, raw: memoryview, path: Path, endian: str):
        self.raw, self.path, self.endian, self.at = raw, path, endian, 0

    def fail(self, field: str, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: damaged or truncated GGUF file ({len(self.raw)} bytes): {field} "
                               f"{problem}; re-download or re-export it")

    def take(self, n: int, field: str) -> int:
        if n > len(self.raw) - self.at:
            raise self.fail(field, f"needs {n} bytes at byte {self.at}, past the end of the file")
        start, self.at = self.at, self.at + n
        return start

    def u32(self, field: str) -> int:
        return struct.unpack_from(self.endian + "I", self.raw, self.take(4, field))[0]

    def u64(self, field: str) -> int:
        return struct.unpack_from(self.endian + "Q", self.raw, self.take(8, field))[0]

    def count(self, field: str, each_min: int) -> int:
        """A u64 count of items of at least `each_min` bytes, which the rest of the file must hold."""
        n = self.u64(field)
        if n * each_min > len(self.raw) - self.at:
            raise self.fail(field, f"is {n}, more than the {len(self.raw) - self.at} bytes left can hold")
        return n

    def string(self, field: str) -> bytes:
        n = self.count(f"{field} (length)", 1)
        return bytes(self.raw[self.take(n, field) : self.at])

    def value(self, kind: int, field: str, depth: int = 0) -> None:
        if kind in SCALAR_BYTES:
            self.take(SCALAR_BYTES[kind], field)
        elif kind == STRING:
            self.take(self.count(f"{field} (string length)", 1), field)
        elif kind == ARRAY:
            if depth >= MAX_NESTING:
                raise self.fail(field, f"nests arrays more than {MAX_NESTING} deep")
            item = self.u32(f"{field} (array type)")
            if item in SCALAR_BYTES:
                self.take(self.count(f"{field} (array length)", SCALAR_BYTES[item]) * SCALAR_BYTES[item], field)
            elif item in (STRING, ARRAY):
                for i in range(self.count(f"{field} (array length)", 8)):  # each item starts with 8 bytes
                    self.value(item, f"{field}[{i}]", depth + 1)
            else:
                raise self.fail(field, f"has array items of unknown type {item}")
        else:
            raise self.fail(field, f"has unknown value type {kind}")


def check_header(path: str | Path) -> None:
    """Raise CheckpointError naming the first header field of GGUF `path` that does not fit in
    the file; return quietly for a sound header or a version GGUFReader refuses on its own."""
    path = Path(path)
    with open(path, "rb") as f:
        raw = memoryview(f.read())  # a header is parsed whole anyway; tensor data is a small share of reads
    endian = "<"
    if len(raw) >= 8 and struct.unpack_from("<I", raw, 4)[0] & 0xFFFF == 0:  # gguf-py's test for a swapped file
        endian = ">"
    walk = _Walk(raw, path, endian)
    walk.take(4, "the magic")
    if walk.u32("the version") not in VERSIONS:
        return
    # a tensor info is at least a name length, n_dims, one dim, type and offset: 32 bytes
    n_tensors = walk.count("the tensor count", 32)
    n_kv = walk.count("the metadata count", 12)  # key length and value type at least
    for i in range(n_kv):
        key = walk.string(f"metadata key {i}").decode("utf-8", "replace")
        walk.value(walk.u32(f"metadata {key!r} (type)"), f"metadata {key!r}")
    for i in range(n_tensors):
        name = walk.string(f"tensor info {i} (name)").decode("utf-8", "replace")
        n_dims = walk.u32(f"tensor {name!r} (dimension count)")
        if not 1 <= n_dims <= MAX_DIMS:
            raise walk.fail(f"tensor {name!r}", f"has {n_dims} dimensions (GGUF allows 1..{MAX_DIMS})")
        size = 1
        for d in range(n_dims):
            size *= walk.u64(f"tensor {name!r} (dimension {d})")
        if size > len(raw) * 8:  # no GGML type packs more than 8 elements in a byte
            raise walk.fail(f"tensor {name!r}", f"has {size} elements, more than a {len(raw)}-byte file can hold")
        walk.u32(f"tensor {name!r} (type)")
        walk.u64(f"tensor {name!r} (offset)")
