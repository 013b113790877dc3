"""Every tokenizer.ggml.pre flashinfer rebuilds as tokenizer.json (storage/gguf.py BPE_PRE_TOKENIZERS)
tokenizes as llama.cpp does: tests/fixtures/pretokenizers/reference.json holds llama.cpp's ids of a
set of texts for each pre name, made on one byte-level BPE vocabulary (SmolLM2-135M-Instruct's plus
recorded extra tokens and merges) by make_reference.py there; this test needs no llama.cpp.

The vocabulary's GGUF is rebuilt from SmolLM2's (out/models, fetched if missing; the test is
skipped, saying why, when it can be neither found nor fetched) and opened once: GGUFReader takes
~1.5 s over its 50k tokens and merges, so each pre name is tried by setting tokenizer.ggml.pre in
the opened file's metadata and rebuilding the tokenizer from it (tokenizer_files, the converter's path).
"""

import json
from pathlib import Path

import pytest

pytest.importorskip("gguf")

from flashinfer.errors import FlashinferError  # noqa: E402
from flashinfer.fetch import fetch  # noqa: E402
from flashinfer.tokenizer import Tokenizer  # noqa: E402
from storage.errors import CheckpointError  # noqa: E402
from storage.gguf import BPE_PRE_TOKENIZERS, UNSUPPORTED_PRE_TOKENIZERS, GGUFCheckpoint  # noqa: E402
from tests.fixtures.pretokenizers.make_reference import reference_vocab, write_vocab_gguf  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = json.loads((ROOT / "tests" / "fixtures" / "pretokenizers" / "reference.json").read_text())
CASES = [(pre, group) for group in REFERENCE["groups"] for pre in group["pre"]]


@pytest.fixture(scope="module")
def vocab_gguf(tmp_path_factory):
    try:
        base = fetch("smollm2", ROOT / "out" / "models")
    except FlashinferError as e:
        pytest.skip(f"SmolLM2's GGUF is not in out/models and cannot be fetched: {e}")
    path = tmp_path_factory.mktemp("pretokenizers") / "vocab.gguf"
    write_vocab_gguf(path, "smollm", *reference_vocab(base, REFERENCE))
    with GGUFCheckpoint.open(path) as ckpt:
        yield ckpt


@pytest.fixture(scope="module")
def tokenizer_for(vocab_gguf):
    built = {}

    def get(pre: str) -> Tokenizer:
        entry = BPE_PRE_TOKENIZERS[pre]
        if entry not in built:  # names with one table entry rebuild the same tokenizer: build it once
            vocab_gguf.metadata["tokenizer.ggml.pre"] = pre
            built[entry] = Tokenizer(*vocab_gguf.tokenizer_files(), pre)
        return built[entry]

    return get


def test_the_reference_covers_every_pre_name_in_the_table():
    assert sorted(pre for pre, _ in CASES) == sorted(BPE_PRE_TOKENIZERS)  # else rerun make_reference.py
    assert not set(BPE_PRE_TOKENIZERS) & set(UNSUPPORTED_PRE_TOKENIZERS)


@pytest.mark.parametrize(("pre", "group"), CASES, ids=[pre for pre, _ in CASES])
def test_pre_tokenizer_tokenizes_as_llama_cpp(tokenizer_for, pre, group):
    tokenizer = tokenizer_for(pre)
    for text, ids in zip(REFERENCE["texts"], group["ids"], strict=True):
        assert tokenizer.encode(text, add_special_tokens=False) == ids, text
        assert tokenizer.decode(ids, skip_special_tokens=False) == text
    assert tokenizer.add_bos == group["add_bos"]  # llama.cpp's default: the file does not say


def _tiny_gguf(path: Path, pre: str | None) -> Path:
    return write_vocab_gguf(path, pre, ["<s>", "</s>", "a", "b", "ab"], [3, 3, 1, 1, 1], ["a b"])


def test_an_unknown_pre_tokenizer_asks_for_the_tokenizer_dir(tmp_path):
    with GGUFCheckpoint.open(_tiny_gguf(tmp_path / "unknown.gguf", "no-such-pre")) as ckpt, \
            pytest.raises(CheckpointError, match=r"unknown.gguf: .*'no-such-pre' is not known.*--tokenizer DIR"):
        ckpt.tokenizer_files()
    # one llama.cpp knows but flashinfer cannot rebuild says why
    with GGUFCheckpoint.open(_tiny_gguf(tmp_path / "gemma4.gguf", "gemma4")) as ckpt, \
            pytest.raises(CheckpointError, match=r"'gemma4' cannot be rebuilt .*U\+2581.*--tokenizer DIR"):
        ckpt.tokenizer_files()


def test_a_file_without_a_pre_tokenizer_gets_llama_cpps_default(tmp_path):
    with GGUFCheckpoint.open(_tiny_gguf(tmp_path / "none.gguf", None)) as none, \
            GGUFCheckpoint.open(_tiny_gguf(tmp_path / "default.gguf", "default")) as default:
        assert none.tokenizer_files() == default.tokenizer_files()
        assert Tokenizer(*none.tokenizer_files(), "none").encode("abba", add_special_tokens=False) == [4, 3, 2]
