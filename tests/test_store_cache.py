"""flashinfer/store_cache.py: a GGUF file or an HF dir runs as it is, through a store converted
once into the cache; generation_config.json's end-of-turn ids and sampling defaults; the chat
REPL and the kept prefix behind it."""

import json
import os
import shutil

import numpy as np
import pytest

from flashinfer import Engine
from flashinfer.cli import main
from flashinfer.errors import ConfigError, ModelPathError
from flashinfer.generation_config import GenerationConfig
from flashinfer.repl import chat_loop
from flashinfer.store_cache import cache_entry, cache_root, store_for, ConvertOptions
from storage import synth
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("cache-src")
    return synth.synthesize("tiny", root / "hf", gguf_path=root / "m.gguf").gguf_path


def test_a_gguf_file_runs_through_a_store_converted_once(tiny_gguf, tmp_path):
    notices = []
    with Engine.open(tiny_gguf, notify=notices.append) as engine:
        text = engine.generate("hello world", max_tokens=4).text
        store = engine.source
    assert store.parent == cache_root() and store == cache_entry(tiny_gguf, ConvertOptions())
    assert notices[0].startswith(f"converting {tiny_gguf} into {store}") and notices[1].startswith("converted in")
    assert (store / "manifest.json").is_file()
    notices.clear()
    with Engine.open(tiny_gguf, notify=notices.append) as engine:  # reused: no conversion
        assert engine.source == store and engine.generate("hello world", max_tokens=4).text == text
    assert notices == []


def test_the_cache_key_follows_the_source_and_the_options(tiny_gguf, tmp_path):
    copy = tmp_path / "m.gguf"
    shutil.copy2(tiny_gguf, copy)
    first = cache_entry(copy, ConvertOptions())
    assert cache_entry(copy, ConvertOptions(quant="q8")) != first
    os.utime(copy, ns=(0, 0))  # a changed file (its mtime) is a new entry
    assert cache_entry(copy, ConvertOptions()) != first
    assert cache_entry(FIXTURES / "llama", ConvertOptions()).name.startswith("llama-")


def test_store_dir_is_used_and_another_models_store_is_refused(tiny_gguf, tmp_path):
    out = tmp_path / "st"
    assert store_for(FIXTURES / "llama", out) == out and (out / "manifest.json").is_file()
    assert store_for(FIXTURES / "llama", out) == out  # found, not converted again
    with pytest.raises(ModelPathError, match="holds the store of .*llama, not of"):
        store_for(tiny_gguf, out)
    with pytest.raises(ModelPathError, match="already a flash store"):
        store_for(out, tmp_path / "other")


def test_a_store_made_from_a_relative_path_is_found_from_another_directory(tiny_gguf, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_gguf.parent)
    out = store_for(tiny_gguf.name, tmp_path / "st")
    assert json.loads((out / "manifest.json").read_text())["source"] == str(tiny_gguf.resolve())
    monkeypatch.chdir(tmp_path)
    assert store_for(tiny_gguf, "st") == out.relative_to(tmp_path)  # the same model: reused, not refused


def test_an_unwritable_cache_is_one_clear_line(tiny_gguf, tmp_path, monkeypatch, capsys):
    (tmp_path / "file").write_text("not a directory")
    monkeypatch.setenv("FLASHINFER_CACHE", str(tmp_path / "file" / "cache"))
    assert main(["run", str(tiny_gguf), "--prompt", "hi", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot create the cache dir (set $FLASHINFER_CACHE or pass --store DIR)" in err[0]


def test_not_a_model(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\0" * 64)
    with pytest.raises(ModelPathError, match="not a GGUF file"):
        Engine.open(tmp_path / "x.bin")
    with pytest.raises(ModelPathError, match="convert=True"):
        Engine.open(FIXTURES / "llama", dram="1GB", convert=False)


def test_cli_runs_an_hf_dir_from_a_store(tmp_path, capsys):
    out = tmp_path / "st"
    assert main(["run", str(FIXTURES / "llama"), "--prompt", "hello", "--max-tokens", "3", "--store", str(out)]) == 0
    assert (out / "manifest.json").is_file() and (out / "generation_config.json").is_file()
    assert f"converting {FIXTURES / 'llama'} into {out}" in capsys.readouterr().err


# ---- generation_config.json ---------------------------------------------------------
def _with_generation_config(tmp_path, config: dict):
    model = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama", model)
    (model / "generation_config.json").write_text(json.dumps(config))
    return model


def test_generation_config_end_of_turn_ids_stop_generation(engines, tmp_path):
    free = engines("llama").generate("hello", max_tokens=6)
    assert free.finish_reason == "length"
    model = _with_generation_config(tmp_path, {"eos_token_id": [2, free.token_ids[2]]})
    with Engine.open(model) as engine:
        cut = engine.generate("hello", max_tokens=6)
    assert cut.token_ids == free.token_ids[:2] and cut.finish_reason == "stop"


def test_generation_config_sampling_defaults_apply_unless_overridden(tmp_path):
    cfg = GenerationConfig.from_dir(_with_generation_config(
        tmp_path, {"do_sample": True, "temperature": 0.6, "top_p": 0.9}))
    assert cfg.resolve(None, None, None) == (params := cfg.sampling)
    assert (params.temperature, params.top_k, params.top_p) == (0.6, 50, 0.9)  # transformers' top_k default
    assert cfg.resolve(0, None, 1.0).temperature == 0.0
    greedy = GenerationConfig.from_dir(_with_generation_config(tmp_path / "g", {"temperature": 0.6}))
    assert greedy.resolve(None, None, None).temperature == 0.0  # without do_sample, greedy (as transformers)
    assert GenerationConfig.from_dir(tmp_path / "none").source is None


@pytest.mark.parametrize("config, message", [
    ({"eos_token_id": "2"}, "eos_token_id must be a token id"),
    ({"do_sample": "yes"}, "do_sample must be true or false"),
    ({"do_sample": True, "temperature": "hot"}, "temperature must be a number"),
    ({"do_sample": True, "top_p": 2.0}, "top_p must be in"),
    ([], "expected a JSON object"),
])
def test_bad_generation_config_names_file_and_field(tmp_path, config, message):
    model = _with_generation_config(tmp_path, config)
    with pytest.raises(ConfigError, match=message) as e:
        GenerationConfig.from_dir(model)
    assert "generation_config.json" in str(e.value)


def test_a_gguf_store_carries_llama_cpps_end_of_generation_ids(tiny_gguf):
    store = store_for(tiny_gguf)
    from storage.gguf import GGUFCheckpoint

    with GGUFCheckpoint.open(tiny_gguf) as ckpt:
        eos = ckpt.meta("tokenizer.ggml.eos_token_id")
    assert eos in GenerationConfig.from_dir(store).eos_token_ids


# ---- a kept prefix and the chat loop --------------------------------------------------
def test_a_kept_prefix_computes_only_the_new_tokens_and_changes_nothing(engines):
    engine = engines("llama")
    prompt = engine.tokenize("hello there")
    first = engine.generate(prompt, max_tokens=5)
    follow = prompt + first.token_ids[:-1] + engine.tokenize("and more")[1:]
    fresh = engine.generate(follow, max_tokens=5)
    fed = []
    forward = engine.model.forward
    engine.model.forward = lambda ids, *a: fed.append(len(ids)) or forward(ids, *a)
    try:
        engine.reuse_prefix = True
        engine.generate(prompt, max_tokens=5)
        kept = engine.generate(follow, max_tokens=5)
        assert fed[5] == len(follow) - (len(prompt) + 4)  # the second prefill: only what is new
        again = engine.generate(follow, max_tokens=5)  # the same prompt again: its last token only
        assert fed[10] == 1
    finally:
        engine.reuse_prefix = False
        del engine.model.forward
    assert kept.token_ids == fresh.token_ids == again.token_ids


def test_chat_loop_streams_replies_keeps_history_and_resets(engines, capsys):
    engine = engines("llama")
    lines = iter(["hi", "and you?", "/reset", "hi", "/exit"])
    prompts = []
    tokenize_chat = engine.tokenize_chat
    engine.tokenize_chat = lambda messages: prompts.append([m["role"] for m in messages]) or tokenize_chat(messages)
    try:
        assert chat_loop(engine, read=lambda _: next(lines), max_tokens=4) == 0
    finally:
        del engine.tokenize_chat
        engine.reuse_prefix = False
    assert prompts == [["user"], ["user", "assistant", "user"], ["user"]]
    out, err = capsys.readouterr()
    assert out.count("\n") == 3 and "(history cleared)" in err and err.count("tok/s") == 3
    direct = engine.chat([{"role": "user", "content": "hi"}], max_tokens=4).text
    assert out.splitlines()[0] == direct == out.splitlines()[2]


def test_chat_loop_ends_at_end_of_input_and_refuses_a_model_without_template(tmp_path, engines):
    def eof(_):
        raise EOFError

    assert chat_loop(engines("llama"), read=eof) == 0
    from flashinfer.errors import ChatTemplateError

    model = tmp_path / "m"
    shutil.copytree(FIXTURES / "llama", model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    with Engine.open(model) as engine, pytest.raises(ChatTemplateError):
        chat_loop(engine, read=eof)


def test_bf16_matrices_load_as_f16_not_float32(engines):
    layer = engines("llama_bf16").model.weights.layers[0]
    assert layer.wq.data.dtype == np.uint16
