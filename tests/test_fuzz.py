"""Property-based fuzzing of every parser of bytes from outside (issue 16): mutations of valid
files (wrong JSON types, values out of range, missing and unknown keys, bit flips, truncation,
length fields set to 0 / -1 / huge) must each end in a FlashinferError or a correct load and a
generated token, within a time bound; never a raw Python or numpy exception, never a crash.

Parsers: a safetensors header and its length prefix, config.json, tokenizer_config.json,
generation_config.json, a store's manifest.json, the calibrated predictors (lowrank.npz,
static.npz, lowrank.json), a GGUF's header, metadata and tensor table. Examples per parser:
the hypothesis profile's max_examples (tests/conftest.py: "ci" in `make test`, deterministic;
"thorough" in `make test-all`).
"""

from __future__ import annotations

import io
import json
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flashinfer import Engine
from flashinfer.calibrate import LOWRANK_FILE, PREDICTOR_DIR, REPORT_FILE, STATIC_FILE
from flashinfer.convert import convert_checkpoint
from flashinfer.errors import FlashinferError
from predictors.sparsity import LowRankLayer, LowRankPredictor, StaticPredictor
from tests.conftest import FIXTURES

TIME_BOUND_S = 20.0  # one example: open, load and a token (measured: milliseconds)
FUNCTION_SCOPED = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]

# JSON values of every type and a few hostile sizes, put where a field was
HOSTILE = st.one_of(
    st.none(), st.booleans(), st.sampled_from([0, 1, 2, 3, -1, 63, 64, 65, 2**31, 2**63, 10**30]),
    st.integers(-(2**70), 2**70), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=6),
    st.lists(st.integers(-3, 70), max_size=3), st.just([[1, 2]]), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _paths(obj, path=()):
    """Every place in a JSON value: (path of keys/indices) for each dict entry and list element."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield path + (k,)
            yield from _paths(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield path + (i,)
            yield from _paths(v, path + (i,))


@st.composite
def json_mutations(draw, base: dict):
    """base with one place replaced by a hostile value, deleted, or given an unknown sibling key;
    or a numeric value nudged (types right, sizes wrong)."""
    obj = json.loads(json.dumps(base))
    places = list(_paths(obj))
    path = draw(st.sampled_from(places))
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    key, value = path[-1], parent[path[-1]]
    kind = draw(st.sampled_from(["replace", "delete", "unknown", "nudge"]))
    if kind == "nudge" and isinstance(value, (int, float)) and not isinstance(value, bool):
        parent[key] = draw(st.sampled_from([value + 1, value - 1, value * 2, value // 2, -value]))
    elif kind == "delete" and isinstance(parent, dict):
        del parent[key]
    elif kind == "unknown" and isinstance(parent, dict):
        parent["zz_" + str(key)] = draw(HOSTILE)
    else:
        parent[key] = draw(HOSTILE)
    return obj


@st.composite
def byte_mutations(draw, size: int, hot_end: int):
    """(kind, position, value) for a file of `size` bytes whose structure lies in bytes < hot_end:
    a flipped bit, an 8-byte field set to 0 / all ones / a huge count, or a truncation."""
    kind = draw(st.sampled_from(["flip", "field", "truncate"]))
    if kind == "truncate":
        return kind, draw(st.integers(0, size - 1)), None
    position = draw(st.integers(0, hot_end - 1))
    if kind == "flip":
        return kind, position, draw(st.integers(0, 7))
    return kind, min(position, size - 8), draw(st.sampled_from([0, 2**64 - 1, 2**63, 2**32, 2**31 - 1, 1 << 40]))


def _mutated_bytes(data: bytes, mutation) -> bytes:
    kind, position, value = mutation
    if kind == "truncate":
        return data[:position]
    out = bytearray(data)
    if kind == "flip":
        out[position] ^= 1 << value
    else:
        out[position:position + 8] = struct.pack("<Q", value)
    return bytes(out)


def _clean(open_and_use) -> None:
    """open_and_use() ends in success or a FlashinferError, in time; anything else fails the example."""
    start = time.perf_counter()
    try:
        open_and_use()
    except FlashinferError as e:
        assert str(e).strip(), "an error without a message"
    assert time.perf_counter() - start < TIME_BOUND_S


def _generate(path: Path, **options) -> None:
    with Engine.open(path, **options) as engine:
        engine.generate("hello", max_tokens=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return convert_checkpoint(FIXTURES / "llama", tmp_path_factory.mktemp("fuzz") / "store")


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory) -> Path:
    """A ReLU store with predictors of the right shapes (random factors: fuzzing needs the files'
    structure, not a good fit)."""
    store = convert_checkpoint(FIXTURES / "relu_llama", tmp_path_factory.mktemp("fuzz") / "relu")
    with Engine.open(store) as engine:
        a = engine.args
    rng = np.random.default_rng(0)
    layers = [LowRankLayer(rng.standard_normal((a.dim, 8), np.float32), rng.standard_normal((8, a.ffn_dim), np.float32),
                           np.zeros(a.ffn_dim, np.float32), 0.5) for _ in range(a.n_layers)]
    out = store / PREDICTOR_DIR
    out.mkdir()
    LowRankPredictor(layers).save(out / LOWRANK_FILE)
    StaticPredictor([np.arange(0, a.ffn_dim, 3) for _ in range(a.n_layers)]).save(out / STATIC_FILE)
    (out / REPORT_FILE).write_text(json.dumps({"layers": [{"fraction": 0.3}] * a.n_layers}))
    for predictor in ("lowrank", "static"):
        _generate(store, predictor=predictor)  # the unmutated files load
    return store


def _case(base: Path, tmp_path: Path) -> Path:
    case = tmp_path / "case"
    shutil.rmtree(case, ignore_errors=True)
    shutil.copytree(base, case)
    return case


# ---- JSON files ---------------------------------------------------------------------------

HF_JSON = {name: json.loads((FIXTURES / "llama" / name).read_text())
           for name in ("config.json", "tokenizer_config.json", "generation_config.json")}


@pytest.mark.parametrize("name", list(HF_JSON))
@settings(suppress_health_check=FUNCTION_SCOPED)
@given(data=st.data())
def test_hf_json_files(tmp_path, name, data):
    case = _case(FIXTURES / "llama", tmp_path)
    (case / name).write_text(json.dumps(data.draw(json_mutations(HF_JSON[name]))))
    _clean(lambda: _generate(case))


@settings(suppress_health_check=FUNCTION_SCOPED)
@given(data=st.data())
def test_store_manifest(tmp_path, store, data):
    case = _case(store, tmp_path)
    manifest = json.loads((store / "manifest.json").read_text())
    (case / "manifest.json").write_text(json.dumps(data.draw(json_mutations(manifest))))
    _clean(lambda: _generate(case))


@settings(suppress_health_check=FUNCTION_SCOPED)
@given(data=st.data())
def test_calibration_report(tmp_path, calibrated, data):
    case = _case(calibrated, tmp_path)
    report = json.loads((calibrated / PREDICTOR_DIR / REPORT_FILE).read_text())
    (case / PREDICTOR_DIR / REPORT_FILE).write_text(json.dumps(data.draw(json_mutations(report))))
    _clean(lambda: _generate(case, predictor="lowrank"))


# ---- predictor arrays ---------------------------------------------------------------------

ARRAYS = st.sampled_from([np.zeros(0, np.float32), np.float32(np.nan), np.full((64, 8), np.inf, np.float32),
                          np.zeros((3, 3), np.float32), np.arange(5), np.array([-1, 2]), np.array([1, 1]),
                          np.array([10**6]), np.array(["x"]), np.zeros((64, 9), np.float64), np.int64(10**6),
                          np.int64(-1), np.int64(0), np.bool_(True)])


@pytest.mark.parametrize("file, predictor", [(LOWRANK_FILE, "lowrank"), (STATIC_FILE, "static")])
@settings(suppress_health_check=FUNCTION_SCOPED)
@given(data=st.data())
def test_predictor_files(tmp_path, calibrated, file, predictor, data):
    """An array replaced by one of another shape, dtype or value, or removed; or the file's bytes
    flipped or cut (zip structure, npy headers, compressed members)."""
    case = _case(calibrated, tmp_path)
    path = case / PREDICTOR_DIR / file
    raw = path.read_bytes()
    if data.draw(st.booleans()):
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        key = data.draw(st.sampled_from(sorted(arrays)))
        if data.draw(st.booleans()):
            del arrays[key]
        else:
            arrays[key] = data.draw(ARRAYS)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        path.write_bytes(buf.getvalue())
    else:  # zip headers, npy headers and data alike
        path.write_bytes(_mutated_bytes(raw, data.draw(byte_mutations(len(raw), len(raw)))))
    _clean(lambda: _generate(case, predictor=predictor))


# ---- safetensors --------------------------------------------------------------------------

@settings(suppress_health_check=FUNCTION_SCOPED)
@given(data=st.data())
def test_safetensors_header(tmp_path, data):
    case = _case(FIXTURES / "llama", tmp_path)
    raw = (case / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header, body = json.loads(raw[8:8 + n]), raw[8 + n:]
    if data.draw(st.booleans()):
        text = json.dumps(data.draw(json_mutations(header))).encode()
        mutated = struct.pack("<Q", len(text)) + text + body
    else:  # the length prefix and the header's bytes
        mutated = _mutated_bytes(raw, data.draw(byte_mutations(len(raw), 8 + n)))
    (case / "model.safetensors").write_bytes(mutated)
    _clean(lambda: _generate(case))


# ---- GGUF ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> tuple[Path, int]:
    """(a GGUF of the llama fixture with a byte-level BPE vocabulary, where its tensor data starts)."""
    pytest.importorskip("gguf")
    from tests.test_gguf import _write_gguf

    path = _write_gguf(tmp_path_factory.mktemp("fuzz") / "m.gguf", FIXTURES / "llama",
                       tokenizer=(["a", "b", "ab", "<s>", "</s>"], ["a b"]))
    from storage.gguf import GGUFCheckpoint

    with GGUFCheckpoint.open(path) as ckpt:
        data_start = min(t.offset for t in ckpt.tensors.values())
        ckpt.hf_config()
        ckpt.tokenizer_files()
    return path, data_start


@settings(suppress_health_check=FUNCTION_SCOPED)
@given(data=st.data())
def test_gguf_header(tmp_path, gguf_file, data):
    from storage.gguf import GGUFCheckpoint

    original, data_start = gguf_file
    raw = original.read_bytes()
    path = tmp_path / "m.gguf"
    path.write_bytes(_mutated_bytes(raw, data.draw(byte_mutations(len(raw), data_start))))

    def use():
        with GGUFCheckpoint.open(path) as ckpt:
            ckpt.hf_config()
            ckpt.tokenizer_files()
            for name, t in ckpt.tensors.items():
                ckpt.rows_f32(name, rows=slice(0, 2))
                if ckpt.kept_scheme(name) and len(t.shape) == 2:
                    ckpt.rows_quantized(name, slice(0, 2))

    _clean(use)


# ---- what the errors say ------------------------------------------------------------------

def _error(open_and_use) -> str:
    with pytest.raises(FlashinferError) as e:
        open_and_use()
    return str(e.value)


def _edit_json(path: Path, edit) -> None:
    obj = json.loads(path.read_text())
    edit(obj)
    path.write_text(json.dumps(obj))


def test_manifest_errors_name_the_field(tmp_path, store):
    case = _case(store, tmp_path)
    _edit_json(case / "manifest.json", lambda m: m["resident"]["tok_embeddings.weight"].update(shape="384x64"))
    err = _error(lambda: _generate(case))
    assert "manifest.json: resident['tok_embeddings.weight'].shape: must be a JSON list, got '384x64'" in err
    assert "the manifest is damaged, convert the model again" in err

    case = _case(store, tmp_path)
    _edit_json(case / "manifest.json", lambda m: m["ffn_layers"][0]["matrices"][0].update(offset=0))
    assert "ffn_layers[0].matrices[0].offset: byte 0 is not after the layer's 192 bundles" in _error(lambda: _generate(case))


def test_a_model_config_that_disagrees_with_the_tensors_is_refused(tmp_path, store):
    case = _case(store, tmp_path)
    _edit_json(case / "manifest.json", lambda m: m["model_config"].update(dim=128))
    err = _error(lambda: _generate(case))
    assert "resident tensor 'tok_embeddings.weight' is [384, 64], not [384, 128]" in err
    assert "model_config and the tensors disagree" in err


def test_config_sizes_beyond_any_model_are_refused(tmp_path):
    case = _case(FIXTURES / "llama", tmp_path)
    _edit_json(case / "config.json", lambda c: c.update(num_hidden_layers=10**15))  # 10**30: "must fit in 64 bits"
    assert f"config.json: n_layers = {10**15} is beyond any model flashinfer runs" in _error(lambda: _generate(case))


def test_overlapping_safetensors_are_refused(tmp_path):
    case = _case(FIXTURES / "llama", tmp_path)
    raw = (case / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    a, b = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])[:2]
    size = header[a]["data_offsets"][1] - header[a]["data_offsets"][0]
    header[b] = {**header[b], "dtype": header[a]["dtype"], "shape": header[a]["shape"],
                 "data_offsets": [header[a]["data_offsets"][0], header[a]["data_offsets"][0] + size]}
    text = json.dumps(header).encode()
    (case / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    assert f"tensors {a!r} and {b!r} overlap in the file" in _error(lambda: _generate(case))


def test_a_special_token_of_the_wrong_type_is_named(tmp_path):
    case = _case(FIXTURES / "llama", tmp_path)
    _edit_json(case / "tokenizer_config.json", lambda c: c.update(bos_token=[1, 2]))
    assert 'tokenizer_config.json: bos_token must be a string, {"content": string} or null, got [1, 2]' in _error(
        lambda: _generate(case))


def test_damaged_predictor_files_ask_for_calibration(tmp_path, calibrated):
    case = _case(calibrated, tmp_path)
    path = case / PREDICTOR_DIR / LOWRANK_FILE
    path.write_bytes(path.read_bytes()[:100])
    err = _error(lambda: _generate(case, predictor="lowrank"))
    assert f"{path}: not a predictor file" in err and "calibrate again (`flashinfer calibrate STORE --text FILE`)" in err

    case = _case(calibrated, tmp_path)
    path = case / PREDICTOR_DIR / STATIC_FILE
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["hot0"] = np.array([0, 10**6])
    np.savez(path, **arrays)
    assert "hot set 0 holds neuron ids outside the layer's" in _error(lambda: _generate(case, predictor="static"))


def test_a_gguf_vocabulary_that_makes_no_tokenizer_is_named(tmp_path):
    pytest.importorskip("gguf")
    from storage.gguf import GGUFCheckpoint
    from tests.test_gguf import _write_gguf

    path = _write_gguf(tmp_path / "m.gguf", FIXTURES / "llama", tokenizer=(["a", "c"], ["a b"]))
    with GGUFCheckpoint.open(path) as ckpt:
        err = _error(ckpt.tokenizer_files)
    assert "m.gguf: its vocabulary does not make a tokenizer" in err and "--tokenizer DIR" in err


def test_a_gguf_count_past_the_file_is_named_before_gguf_py_loops_on_it(tmp_path, gguf_file):
    """GGUFReader sizes its loops from the header's counts: 2**60 tensors ran it out of memory."""
    from storage.gguf import GGUFCheckpoint

    raw = bytearray(gguf_file[0].read_bytes())
    path = tmp_path / "m.gguf"
    path.write_bytes(raw[:8] + struct.pack("<Q", 2**60) + raw[16:])
    err = _error(lambda: GGUFCheckpoint.open(path))
    assert f"m.gguf: damaged or truncated GGUF file ({len(raw)} bytes): the tensor count is 1152921504606846976, " \
           f"more than the {len(raw) - 16} bytes left can hold; re-download or re-export it" in err
    path.write_bytes(raw[:24] + struct.pack("<Q", 2**40) + raw[32:])  # the first metadata key's length
    assert "metadata key 0 (length) is 1099511627776, more than the" in _error(lambda: GGUFCheckpoint.open(path))


def test_an_integer_beyond_64_bits_is_named(tmp_path, store):
    """The thorough profile found a model_config sliding_window of 2**63, which reached a numba
    kernel ('OverflowError: int too big to convert')."""
    case = _case(store, tmp_path)
    _edit_json(case / "manifest.json", lambda m: m["model_config"].update(sliding_window=2**63))
    assert "sliding_window: must fit in 64 bits, got 9223372036854775808" in _error(lambda: _generate(case))
