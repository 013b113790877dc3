"""The flash store format, version 2: the spec, as data, next to the code that reads it.

A store is one directory:

    manifest.json          what is where (this module's dataclasses, as JSON)
    resident.bin           tensors kept in DRAM: embeddings, attention, norms, biases, lm_head
    ffn/L{layer}.bin       per layer, the FFN as row-column bundles, one per neuron, then
                           the layer's whole matrices (version 2, see below)
    tokenizer.json, tokenizer_config.json, chat_template.jinja   copied from the checkpoint

All integers are little-endian; all offsets are bytes from the start of their file.

Quantized rows (see storage/quant.py for the arithmetic): a row of K values in scheme
    f32   K float32                    f16  K float16
    q8    K int8, then K/G float16 scales
    q4    K/2 bytes (value 2j in the low nibble, 2j+1 in the high nibble, stored as v+8),
          then K/G float16 scales
    q4a   K/2 bytes (unsigned 0..15), K/G float16 scales, K/G float16 mins
    q4k   K/2 bytes (unsigned 0..15), then scales and mins of K/G + K/128 bytes each: the
          groups' 6-bit values, then each 256-weight super-block's float16 multiplier (ggml's Q4_K)
    q6k   K int8 (codes -32..31), then K/16 int8 scales (groups of 16) and each 256-weight
          super-block's float16 multiplier (ggml's Q6_K)
A 2-D resident tensor [rows, K] is its rows one after another in that layout's planar
form: all data [rows, data_bytes], then all scales [rows, K/G], then all mins (see
`ResidentTensor`); 1-D tensors (norms, biases) are always f32.

FFN bundles (the paper's row-column bundling, section 3.2): for neuron i of a layer, the
bundle holds, at the offsets given by its `BundleComponent`s,
    up      row i of the up projection       [dim]  (fc1 in OPT)
    gate    row i of the gate projection     [dim]  (gated FFNs only)
    down    column i of the down projection  [dim]  (row i of W_down transposed)
    up_bias / gate_bias   one float32        (models with FFN biases)
so a single read fetches everything neuron i needs. Each component starts at a multiple
of 4 bytes; `bundle_bytes` is their padded total. Bundle i lives at byte
i * bundle_bytes of its layer file: the file is a plain [n_neurons, bundle_bytes] array.
Checksums and compression work on chunks of `bundles_per_chunk` consecutive bundles,
chosen so that a chunk is a whole number of 4 KiB pages; the file is padded to 4 KiB,
so every chunk starts 4 KiB-aligned and O_DIRECT can read any chunk-aligned range.
With compression "zstd" each chunk is stored as one zstd frame at `Chunk.offset`
(4 KiB-aligned) and a read must fetch and decompress the whole chunk.

FFN matrices (version 2): a layer may keep a component as a whole matrix after its bundles
instead of inside them (`FFNLayer.matrices`), in the planar layout of a resident tensor:
"down", W_down's rows [dim, n_neurons], for models whose FFN runs densely (SiLU): a GGUF's
down blocks run along the neurons, so only rows keep them exactly, and a dense down-projection
over rows is an integer matmul where columns were a float scatter; "gate", W_gate's rows
[n_neurons, dim], for the gate-threshold sparse FFN of a SiLU model (`--predictor gate`): the
gate is computed for every neuron, so it is read whole (or kept resident) in one long run,
while only the selected neurons' up|down bundles are fetched. Each matrix starts 4 KiB-
aligned and has its own checksum; its bundles then lack that component. Stores without
matrices are written as version 1 (what older readers load).

Checksums are blake2b (16-byte digest, hex) of the uncompressed bytes of each resident
tensor and of each FFN chunk.

Readers must reject a manifest whose `version` is newer than theirs; writers write the
store into `<name>.partial-<pid>` and rename it into place only when it is complete, so a
directory named like a store with a manifest.json is always a complete store.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

from storage import quant, schema
from storage.errors import FormatError, QuantError

FORMAT_NAME = "flashinfer-store"
FORMAT_VERSION = 2  # the newest this code reads; writers write 1 when no version-2 feature is used
MATRICES_VERSION = 2  # the first version with FFNLayer.matrices
MANIFEST = "manifest.json"
RESIDENT_FILE = "resident.bin"
PAGE = 4096  # alignment of chunks and files: O_DIRECT and 4 KiB flash pages
COMPONENT_ALIGN = 4  # so f16 scales and f32 values inside a bundle are aligned
# copied from the model dir into a store as they are (generation_config.json: end-of-turn ids, sampling defaults)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")
SCHEMES = ("f32", "f16", "q8", "q4", "q4a", "q4k", "q6k")
COMPRESSIONS = ("none", "zstd")
COMPONENTS = ("up", "gate", "down", "up_bias", "gate_bias")
MATRICES = ("down", "gate")


def ffn_file(layer: int) -> str:
    return f"ffn/L{layer}.bin"


def lookup_tables(resident: dict) -> list[str]:
    """Resident tensors read a row per token (embedding and learned-position tables), not in
    full each token. Not the token table of a tied model: it is also the lm_head."""
    tied = "lm_head.weight" not in resident
    return [name for name in resident if name.endswith("embeddings.weight")
            and not (tied and name == "tok_embeddings.weight")]


def align_up(n: int, to: int) -> int:
    return -(-n // to) * to


def checksum(data) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def file_checksum(path, block: int = 1 << 20) -> str:
    """checksum() of a whole file, read a block at a time."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


@dataclass(frozen=True)
class ResidentTensor:
    """A tensor in resident.bin. For 2-D quantized tensors the bytes are planar:
    data at `offset` ([rows, data_bytes_per_row]), then scales, then mins."""

    scheme: str
    group_size: int  # 0 for f32/f16
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    checksum: str


@dataclass(frozen=True)
class BundleComponent:
    name: str  # "up" | "gate" | "down" | "up_bias" | "gate_bias"
    scheme: str  # a quant scheme for rows; "f32" for biases
    group_size: int
    length: int  # values: dim for rows, 1 for biases
    offset: int  # within the bundle
    nbytes: int


@dataclass(frozen=True)
class Chunk:
    offset: int  # in the layer file; 4 KiB-aligned
    stored_bytes: int  # on disk (== uncompressed size unless compressed)
    checksum: str  # of the uncompressed bytes


@dataclass(frozen=True)
class FFNMatrix:
    """A whole FFN matrix in its layer file, after the bundles: rows in the planar layout of
    a ResidentTensor (all data, then scales, then mins), at a 4 KiB-aligned `offset`."""

    name: str  # "down": W_down [dim, n_neurons]; "gate": W_gate [n_neurons, dim]
    scheme: str
    group_size: int  # 0 for f32/f16
    shape: tuple[int, int]
    offset: int
    nbytes: int
    checksum: str


@dataclass(frozen=True)
class FFNLayer:
    file: str
    n_neurons: int
    bundle_bytes: int
    components: tuple[BundleComponent, ...]
    bundles_per_chunk: int
    compression: str
    chunks: tuple[Chunk, ...]
    file_bytes: int
    matrices: tuple[FFNMatrix, ...] = ()

    def component(self, name: str) -> BundleComponent | None:
        return next((c for c in self.components if c.name == name), None)

    def matrix(self, name: str) -> FFNMatrix | None:
        return next((m for m in self.matrices if m.name == name), None)


def layer_extent(layer) -> int:
    """The bytes of an FFN layer's bundles and whole matrices as they lie in its file, from
    offset 0 (a matrix starts 4 KiB-aligned after the bundles): what the layer takes resident or
    streamed (flashinfer.memory plans it; StoreReader.read_layer reads it, page-aligned)."""
    return max([layer.n_neurons * layer.bundle_bytes] + [m.offset + m.nbytes for m in layer.matrices])


@dataclass(frozen=True)
class Manifest:
    model_config: dict  # flashinfer ModelArgs fields (storage does not interpret them)
    hf_config: dict  # the checkpoint's config.json, for reference
    resident: dict[str, ResidentTensor]
    resident_bytes: int
    ffn_layers: tuple[FFNLayer, ...]
    quant: dict  # e.g. {"ffn": "q4", "resident": "q8", "group_size": 32}
    source: str = ""  # what it was converted from
    format: str = FORMAT_NAME
    version: int = FORMAT_VERSION
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1)

    @classmethod
    def load(cls, store_dir: Path) -> "Manifest":
        path = Path(store_dir) / MANIFEST
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise FormatError(f"{store_dir}: no {MANIFEST}; not a flashinfer store") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: not valid JSON ({e}); the store is damaged, convert it again") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
            raise FormatError(f"{path}: not a {FORMAT_NAME} manifest")
        version = raw.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise FormatError(f"{path}: version: must be a positive integer, got {version!r}; the manifest is "
                              "damaged, convert the model again")
        if version > FORMAT_VERSION:
            raise FormatError(
                f"{path}: store format version {version} is newer than this flashinfer reads "
                f"({FORMAT_VERSION}); upgrade flashinfer or convert the model again with this version"
            )
        try:
            check_manifest(raw)
        except schema.SchemaError as e:
            raise FormatError(f"{path}: {e}; the manifest is damaged, convert the model again") from None
        return cls(
            model_config=raw["model_config"],
            hf_config=raw["hf_config"],
            resident={k: ResidentTensor(**{**v, "shape": tuple(v["shape"])}) for k, v in raw["resident"].items()},
            resident_bytes=raw["resident_bytes"],
            ffn_layers=tuple(
                FFNLayer(**{
                    **layer,
                    "components": tuple(BundleComponent(**c) for c in layer["components"]),
                    "chunks": tuple(Chunk(**c) for c in layer["chunks"]),
                    "matrices": tuple(FFNMatrix(**{**m, "shape": tuple(m["shape"])}) for m in layer.get("matrices", ())),
                })
                for layer in raw["ffn_layers"]
            ),
            quant=raw["quant"],
            source=raw.get("source", ""),
            format=raw["format"],
            version=version,
            extra=raw.get("extra", {}),
        )


# ---- the manifest's schema, checked before any field is used ------------------------------

def _fields(obj: dict, field: str, cls) -> None:
    """obj has exactly the fields of dataclass `cls` (those with defaults may be absent)."""
    known = {f.name: f for f in fields(cls)}
    for name, f in known.items():
        if f.default is MISSING and f.default_factory is MISSING:
            schema.member(obj, name, field)
    unknown = sorted(set(obj) - set(known))
    if unknown:
        raise schema.SchemaError(f"{field}.{unknown[0]}" if field else unknown[0], "is not a field of this format")


def _checksum(value, field: str) -> str:
    digest = schema.string(value, field)
    if len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
        raise schema.SchemaError(field, f"must be a blake2b digest (32 hex digits), got {digest!r}")
    return digest


def _planar_bytes(scheme: str, group_size: int, dims: tuple[int, ...], field: str) -> int:
    """Bytes of a tensor of `dims` in the planar layout: f32 for 1-D, rows of `scheme` for 2-D."""
    if len(dims) == 1:
        if scheme != "f32" or group_size != 0:
            raise schema.SchemaError(field, f"a 1-D tensor is f32 with group_size 0, got {scheme} / {group_size}")
        return 4 * dims[0]
    if scheme not in quant.GROUPED_SCHEMES and group_size != 0:
        raise schema.SchemaError(f"{field}.group_size", f"{scheme} is not grouped: 0, not {group_size}")
    try:
        return dims[0] * quant.scheme_bytes_per_row(scheme, dims[1], group_size or quant.DEFAULT_GROUP_SIZE)
    except QuantError as e:
        raise schema.SchemaError(field, str(e)) from None


def _check_placed(obj: dict, field: str, cls, file_bytes: int, what: str) -> None:
    """A ResidentTensor / FFNMatrix entry: types, its byte count from scheme and shape, inside its file."""
    _fields(obj, field, cls)
    scheme = schema.string(obj["scheme"], f"{field}.scheme", SCHEMES)
    group = schema.integer(obj["group_size"], f"{field}.group_size")
    dims = schema.shape(obj["shape"], f"{field}.shape", (2,) if cls is FFNMatrix else (1, 2))
    offset = schema.integer(obj["offset"], f"{field}.offset")
    nbytes = schema.integer(obj["nbytes"], f"{field}.nbytes")
    _checksum(obj["checksum"], f"{field}.checksum")
    expected = _planar_bytes(scheme, group, dims, field)
    if nbytes != expected:
        raise schema.SchemaError(f"{field}.nbytes", f"{scheme} {list(dims)} takes {expected} bytes, not {nbytes}")
    if offset % PAGE or offset + nbytes > file_bytes:
        raise schema.SchemaError(f"{field}.offset", f"bytes {offset}..{offset + nbytes} are not a page-aligned "
                                                    f"range inside {what} ({file_bytes} bytes)")


def _check_components(values, field: str, bundle_bytes: int) -> None:
    seen = set()
    for j, c in enumerate(schema.array(values, field)):
        f = f"{field}[{j}]"
        _fields(schema.mapping(c, f), f, BundleComponent)
        name = schema.string(c["name"], f"{f}.name", COMPONENTS)
        if name in seen:
            raise schema.SchemaError(f"{f}.name", f"{name!r} appears twice")
        seen.add(name)
        scheme = schema.string(c["scheme"], f"{f}.scheme", SCHEMES)
        group = schema.integer(c["group_size"], f"{f}.group_size")
        length = schema.integer(c["length"], f"{f}.length", 1)
        offset = schema.integer(c["offset"], f"{f}.offset")
        nbytes = schema.integer(c["nbytes"], f"{f}.nbytes")
        expected = 4 if name.endswith("bias") else _planar_bytes(scheme, group, (1, length), f)
        if name.endswith("bias") and (scheme, length) != ("f32", 1):
            raise schema.SchemaError(f, "a bias is one f32 value")
        if nbytes != expected or offset % COMPONENT_ALIGN or offset + nbytes > bundle_bytes:
            raise schema.SchemaError(f, f"{scheme} x {length} at byte {offset} ({nbytes} bytes) does not fit an "
                                        f"aligned place in a bundle of {bundle_bytes} bytes")
    if "up" not in seen:
        raise schema.SchemaError(field, "has no 'up' component")


def _check_ffn_layer(layer, i: int) -> None:
    field = f"ffn_layers[{i}]"
    _fields(schema.mapping(layer, field), field, FFNLayer)
    schema.string(layer["file"], f"{field}.file", (ffn_file(i),))
    n = schema.integer(layer["n_neurons"], f"{field}.n_neurons", 1)
    bundle_bytes = schema.integer(layer["bundle_bytes"], f"{field}.bundle_bytes", 1)
    per_chunk = schema.integer(layer["bundles_per_chunk"], f"{field}.bundles_per_chunk", 1)
    compression = schema.string(layer["compression"], f"{field}.compression", COMPRESSIONS)
    file_bytes = schema.integer(layer["file_bytes"], f"{field}.file_bytes")
    _check_components(layer["components"], f"{field}.components", bundle_bytes)
    if compression == "none" and n * bundle_bytes > file_bytes:
        raise schema.SchemaError(f"{field}.file_bytes", f"{file_bytes} bytes cannot hold {n} bundles of {bundle_bytes}")
    chunks = schema.array(layer["chunks"], f"{field}.chunks", -(-n // per_chunk))
    for j, chunk in enumerate(chunks):
        f = f"{field}.chunks[{j}]"
        _fields(schema.mapping(chunk, f), f, Chunk)
        offset = schema.integer(chunk["offset"], f"{f}.offset")
        stored = schema.integer(chunk["stored_bytes"], f"{f}.stored_bytes", 1)
        _checksum(chunk["checksum"], f"{f}.checksum")
        bundles = min(per_chunk, n - j * per_chunk)
        if compression == "none" and (offset != j * per_chunk * bundle_bytes or stored != bundles * bundle_bytes):
            raise schema.SchemaError(f, f"must hold bundles {j * per_chunk}..{j * per_chunk + bundles} at byte "
                                        f"{j * per_chunk * bundle_bytes}, got {stored} bytes at {offset}")
        if offset % PAGE or offset + stored > file_bytes:
            raise schema.SchemaError(f, f"bytes {offset}..{offset + stored} are not a page-aligned range inside "
                                        f"the file ({file_bytes} bytes)")
    names = set()
    for j, m in enumerate(schema.array(layer.get("matrices", []), f"{field}.matrices")):
        f = f"{field}.matrices[{j}]"
        _check_placed(schema.mapping(m, f), f, FFNMatrix, file_bytes, "the layer file")
        if m["offset"] < n * bundle_bytes:
            raise schema.SchemaError(f"{f}.offset", f"byte {m['offset']} is not after the layer's {n} bundles of "
                                                    f"{bundle_bytes} bytes")
        name = schema.string(m["name"], f"{f}.name", MATRICES)
        if name in names or any(c["name"] == name for c in layer["components"]):
            raise schema.SchemaError(f"{f}.name", f"component {name!r} is given twice")
        names.add(name)


def check_manifest(raw: dict) -> None:
    """Raise schema.SchemaError at the first field of a parsed manifest.json (format and version
    already checked) whose type, range or size does not hold; the reader then checks the files'
    sizes against it (StoreReader._check_sizes)."""
    _fields(raw, "", Manifest)
    for key in ("model_config", "hf_config", "quant", "extra"):
        schema.mapping(raw.get(key, {}), key)
    schema.string(raw.get("source", ""), "source")
    resident_bytes = schema.integer(raw["resident_bytes"], "resident_bytes")
    for name, t in schema.mapping(raw["resident"], "resident").items():
        field = f"resident[{name!r}]"
        _check_placed(schema.mapping(t, field), field, ResidentTensor, resident_bytes, RESIDENT_FILE)
    for i, layer in enumerate(schema.array(raw["ffn_layers"], "ffn_layers")):
        _check_ffn_layer(layer, i)
