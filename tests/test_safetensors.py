"""Checkpoint reading: dtypes, sharding, and a clear error for each kind of damage."""

import json
import struct

import numpy as np
import pytest

from storage.errors import CheckpointError
from storage.safetensors import Checkpoint, SafetensorsFile, bf16_to_float32, write_safetensors


def test_round_trip_dtypes_and_bf16(tmp_path):
    f32 = np.arange(6, dtype=np.float32).reshape(2, 3) - 2.5
    f16 = f32.astype(np.float16)
    bf16_bits = (f32.view(np.uint32) >> 16).astype(np.uint16)  # exact for these values
    write_safetensors(tmp_path / "model.safetensors", {"a": f32, "b": f16, "c": bf16_bits}, bf16={"c"})
    ckpt = Checkpoint.open(tmp_path)
    assert {n: i.dtype for n, i in ckpt.tensors.items()} == {"a": "F32", "b": "F16", "c": "BF16"}
    np.testing.assert_array_equal(ckpt.raw("a"), f32)
    np.testing.assert_array_equal(ckpt.as_float32("b"), f32)
    np.testing.assert_array_equal(ckpt.as_float32("c"), f32)
    assert not ckpt.raw("a").flags.writeable  # zero-copy view of the read-only map


def test_bf16_conversion_is_exact_bit_shift():
    bits = np.array([0x3F80, 0xC000, 0x0000, 0x7F7F], np.uint16)
    np.testing.assert_array_equal(bf16_to_float32(bits), [1.0, -2.0, 0.0, np.float32(3.3895314e38)])


def _write_sharded(tmp_path):
    write_safetensors(tmp_path / "s1.safetensors", {"a": np.ones(3, np.float32)})
    write_safetensors(tmp_path / "s2.safetensors", {"b": np.zeros(2, np.float32)})
    index = {"metadata": {}, "weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_sharded(tmp_path):
    _write_sharded(tmp_path)
    ckpt = Checkpoint.open(tmp_path)
    assert sorted(ckpt.tensors) == ["a", "b"]
    np.testing.assert_array_equal(ckpt.raw("b"), [0, 0])


def test_missing_shard_is_named(tmp_path):
    _write_sharded(tmp_path)
    (tmp_path / "s2.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"shard file\(s\) missing: s2.safetensors"):
        Checkpoint.open(tmp_path)


def test_truncated_file_names_file_and_tensor(tmp_path):
    path = tmp_path / "model.safetensors"
    write_safetensors(path, {"w": np.ones((16, 16), np.float32)})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors: tensor 'w' ends at byte \d+ .* truncated"):
        SafetensorsFile(path)


def test_header_lying_about_size(tmp_path):
    path = tmp_path / "model.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 32]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 32)
    with pytest.raises(CheckpointError, match=r"tensor 'w' header says shape \[4, 4\] F32 \(64 bytes\) but .* 32 bytes"):
        SafetensorsFile(path)


def test_header_length_beyond_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match="header length 10000 does not fit the file"):
        SafetensorsFile(path)


def test_unknown_dtype(tmp_path):
    path = tmp_path / "model.safetensors"
    header = json.dumps({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0")
    with pytest.raises(CheckpointError, match=r"dtype 'F8_E4M3', which flashinfer cannot read"):
        SafetensorsFile(path)


def test_not_json_and_tiny_file(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 4) + b"nope")
    with pytest.raises(CheckpointError, match="header is not valid JSON"):
        SafetensorsFile(path)
    path.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match="truncated safetensors file"):
        SafetensorsFile(path)


def test_no_weights_and_pickle_only(tmp_path):
    with pytest.raises(CheckpointError, match="no \\*.safetensors weight files"):
        Checkpoint.open(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"x")
    with pytest.raises(CheckpointError, match="only PyTorch pickle weights"):
        Checkpoint.open(tmp_path)
