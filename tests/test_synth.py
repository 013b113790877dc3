"""storage/synth/: synthetic HF checkpoints with planted FFN sparsity, checked through the engine."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage import synth
from storage.errors import ConfigValueError, StorageError
from storage.safetensors import Checkpoint

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return synth.synthesize("tiny", tmp_path_factory.mktemp("synth") / "tiny").out_dir


def _files(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


def _engine_sparsity(model_dir: Path, n_seq: int = 4, seq_len: int = 64, seed: int = 123):
    """Per layer: fraction of zero FFN activations and the top-10% firing share, measured in
    the engine's own forward pass (Model._ffn wrapped to read the activation buffer)."""
    from flashinfer import Engine
    from flashinfer.model import Model

    with Engine.open(model_dir) as engine:
        model = engine.model
        zeros, total, fired = {}, {}, {}

        def ffn(i, layer, xb, out):
            Model._ffn(model, i, layer, xb, out)
            hidden = model.state.hidden[: xb.shape[0]]
            zeros[i] = zeros.get(i, 0) + int((hidden == 0).sum())
            total[i] = total.get(i, 0) + hidden.size
            fired[i] = fired.get(i, 0) + (hidden != 0).sum(0)

        model._ffn = ffn
        rng = np.random.default_rng(seed)
        for _ in range(n_seq):
            engine.logits([synth.BOS_ID, *rng.integers(3, engine.args.vocab_size, seq_len - 1).tolist()])
    layers = sorted(zeros)
    return [zeros[i] / total[i] for i in layers], [synth.hot10_share(fired[i].astype(float)) for i in layers]


# ---- the tiny model end to end ---------------------------------------------------------

def test_tiny_files_config_and_generation(tiny_dir):
    from flashinfer import Engine
    from flashinfer.config import ModelArgs

    names = {p.name for p in tiny_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "synth.json"} <= names
    args = ModelArgs.from_hf_config(json.loads((tiny_dir / "config.json").read_text()))
    assert (args.model_type, args.act, args.dim, args.n_layers, args.ffn_dim, args.vocab_size) == (
        "llama", "relu", 64, 2, 256, 512)
    with Engine.open(tiny_dir) as engine:
        result = engine.generate("hello world", max_tokens=5)
        assert result.usage.completion_tokens + (result.finish_reason == "stop") >= 1
        assert engine.tokenizer.vocab_size == args.vocab_size
    ckpt = Checkpoint.open(tiny_dir)
    assert ckpt.tensors["model.layers.0.mlp.gate_proj.weight"].shape == (256, 64)
    assert ckpt.tensors["model.layers.0.mlp.down_proj.weight"].shape == (64, 256)
    assert ckpt.tensors["lm_head.weight"].dtype == "F16"


def test_tiny_sparsity_through_the_engine(tiny_dir):
    report = json.loads((tiny_dir / "synth.json").read_text())
    assert report["sparsity_target"] == 0.9
    assert all(abs(v - 0.9) < 0.02 for v in report["measured"]["layer_sparsity"])
    sparsity, hot = _engine_sparsity(tiny_dir)
    assert all(abs(v - 0.9) < 0.05 for v in sparsity), sparsity
    assert all(h > 0.35 for h in hot), hot  # hot_skew 1: about half the firings on the top 10%


def test_swiglu_preset_plants_smollm2s_gate_signs_and_spread(tmp_path):
    """tiny-silu: SiLU in config.json, 63% negative gates and SmolLM2's hot share by default, the
    gates' spread 0.5 per neuron; measured in the engine's forward (the gate products)."""
    from flashinfer import Engine
    from flashinfer.model import Model

    report = synth.synthesize("tiny-silu", tmp_path / "silu")
    cfg = json.loads((report.out_dir / "config.json").read_text())
    meta = json.loads((report.out_dir / "synth.json").read_text())
    assert cfg["hidden_act"] == "silu" and meta["sparsity_target"] == synth.SILU_NEGATIVE_SHARE
    assert meta["hot_skew"] == synth.SILU_HOT_SKEW and "SmolLM2" in meta["silu"]["reproduces"]
    assert all(abs(v - 0.63) < 0.03 for v in report.layer_sparsity)
    gates = {}
    with Engine.open(report.out_dir) as engine:
        model = engine.model

        def ffn(i, layer, xb, out):  # the gate's pre-activations, from the stored weights
            gates.setdefault(i, []).append(xb @ Checkpoint.open(report.out_dir).as_float32(
                f"model.layers.{i}.mlp.gate_proj.weight").T)
            Model._ffn(model, i, layer, xb, out)

        model._ffn = ffn
        rng = np.random.default_rng(7)
        for _ in range(4):
            engine.logits([synth.BOS_ID, *rng.integers(3, engine.args.vocab_size, 63).tolist()])
    for i, chunks in gates.items():
        g = np.concatenate(chunks)
        assert abs((g <= 0).mean() - 0.63) < 0.04, i
        assert 0.35 < np.median(g.std(0)) < 0.7, i  # SILU_GATE_STD: where |silu| bends
        assert 0.15 < synth.hot10_share((g > 0).sum(0).astype(float)) < 0.3, i  # SmolLM2: 0.22


def test_hot_skew_zero_is_uniform_and_high_sparsity(tmp_path):
    flat = synth.synthesize("tiny", tmp_path / "flat", hot_skew=0.0, sparsity=0.97)
    sparsity, hot = _engine_sparsity(flat.out_dir)
    assert all(abs(v - 0.97) < 0.02 for v in sparsity), sparsity
    assert all(h < 0.3 for h in hot), hot  # uniform firing: the top 10% carry little more than 10%


def _top_energy(model_dir: Path, name: str, top: int, skip_column: int | None) -> float:
    """Share of the squared singular values of tensor `name` in its `top` largest."""
    w = Checkpoint.open(model_dir).as_float32(name).astype(np.float64)
    if skip_column is not None:  # the bias channel holds thresholds, not weights
        w = np.delete(w, skip_column, axis=1)
    s2 = np.linalg.svd(w, compute_uv=False) ** 2
    return float(s2[:top].sum() / s2.sum())


def test_spectrum_decay_gives_the_gate_low_rank_structure(tmp_path, tiny_dir):
    """What a low-rank predictor relies on: with the default decay the top 8 of 64 singular
    values of every gate carry most of its energy; white rows (decay 0) spread it evenly."""
    white = synth.synthesize("tiny", tmp_path / "white", spectrum_decay=0.0).out_dir
    report = json.loads((tiny_dir / "synth.json").read_text())
    assert report["spectrum_decay"] == 0.75 and report["synth_version"] == 2
    channel = report["bias_channel"]
    for layer in range(2):
        name = f"model.layers.{layer}.mlp.gate_proj.weight"
        decayed, flat = _top_energy(tiny_dir, name, 8, channel), _top_energy(white, name, 8, channel)
        assert decayed > 0.6 and flat < 0.35, (layer, decayed, flat)
        up = _top_energy(tiny_dir, f"model.layers.{layer}.mlp.up_proj.weight", 8, channel)
        assert up < 0.35, up  # only the rows that decide activity are shaped
    with pytest.raises(ConfigValueError, match="spectrum_decay"):
        synth.synthesize("tiny", tmp_path / "bad", spectrum_decay=-1.0)


def test_opt_path_bias_planted_sparsity(tmp_path):
    from flashinfer.config import ModelArgs

    out = synth.synthesize("tiny-opt", tmp_path / "opt", sparsity=0.9).out_dir
    args = ModelArgs.from_model_dir(out)
    assert (args.family, args.tie_embeddings, args.norm_before) == ("opt", True, True)
    ckpt = Checkpoint.open(out)
    assert ckpt.tensors["model.decoder.embed_positions.weight"].shape == (512 + 2, 64)
    assert "lm_head.weight" not in ckpt.tensors
    sparsity, _ = _engine_sparsity(out)
    assert all(abs(v - 0.9) < 0.05 for v in sparsity), sparsity


def test_reproducible_and_seed_matters(tmp_path, tiny_dir):
    again = synth.synthesize("tiny", tmp_path / "again").out_dir
    assert _files(again) == _files(tiny_dir)
    other = synth.synthesize("tiny", tmp_path / "other", seed=1).out_dir
    assert _files(other)["model.safetensors"] != _files(tiny_dir)["model.safetensors"]


def test_sharded_output_loads_like_the_single_file(tmp_path, tiny_dir, monkeypatch):
    from flashinfer import Engine

    monkeypatch.setattr(synth.writing, "MAX_SHARD_BYTES", 100_000)  # where the writer reads it
    sharded = synth.synthesize("tiny", tmp_path / "sharded").out_dir
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 3 and not (sharded / "model.safetensors").exists()
    assert all(p.stat().st_size < 100_000 + 4096 for p in shards)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    ids = [1, 5, 77, 300, 9]
    with Engine.open(sharded) as a, Engine.open(tiny_dir) as b:
        np.testing.assert_array_equal(a.logits(ids), b.logits(ids))


@pytest.mark.parametrize("dtype, stored", [("bf16", "BF16"), ("f32", "F32")])
def test_other_dtypes(tmp_path, dtype, stored):
    from flashinfer import Engine

    out = synth.synthesize("tiny", tmp_path / dtype, dtype=dtype).out_dir
    assert Checkpoint.open(out).tensors["model.embed_tokens.weight"].dtype == stored
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == {"bf16": "bfloat16", "f32": "float32"}[dtype]
    with Engine.open(out) as engine:
        assert np.isfinite(engine.logits([1, 2, 3])).all()


# ---- every preset's names, shapes and config, without writing 14 GB --------------------

@pytest.mark.parametrize("preset", list(synth.PRESETS))
def test_preset_names_shapes_and_config_match_the_engine(preset):
    from flashinfer.arch import FAMILIES
    from flashinfer.config import ModelArgs
    from flashinfer.weights import weight_shapes

    shape = synth.PRESETS[preset]
    args = ModelArgs.from_hf_config(synth._hf_config(shape, "f16"), preset)
    assert (args.dim, args.n_layers, args.n_heads, args.n_kv_heads, args.ffn_dim, args.vocab_size) == (
        shape.hidden, shape.n_layers, shape.n_heads, shape.n_kv_heads, shape.ffn, shape.vocab)
    assert args.act == shape.act
    plan = dict(synth._tensor_plan(shape))
    arch = FAMILIES[args.family]
    wanted = arch.weight_names(args)
    assert set(plan) == set(wanted.values())
    shapes = weight_shapes(args)
    assert all(plan[hf] == shapes[canonical] for canonical, hf in wanted.items())


def test_7b_presets_are_the_published_shapes():
    opt, llama, mistral = (synth.PRESETS[p] for p in ("opt-6.7b", "llama-2-7b-relu", "mistral-7b-relu"))
    n_params = {p: sum(int(np.prod(s)) for _, s in synth._tensor_plan(synth.PRESETS[p])) for p in synth.PRESETS}
    assert round(n_params["opt-6.7b"] / 1e9, 2) == 6.66  # facebook/opt-6.7b
    assert round(n_params["llama-2-7b-relu"] / 1e9, 2) == 6.74  # Llama-2-7b
    assert round(n_params["mistral-7b-relu"] / 1e9, 2) == 7.24  # Mistral-7B
    cfg = synth._hf_config(mistral, "f16")
    assert (cfg["rope_theta"], cfg["sliding_window"], cfg["num_key_value_heads"]) == (1e6, 4096, 8)
    assert synth._hf_config(opt, "f16")["max_position_embeddings"] == 2048
    assert synth._hf_config(llama, "f16")["intermediate_size"] == 11008


def test_tokenizer_has_exactly_vocab_size_tokens_that_all_decode():
    from tokenizers import Tokenizer

    for vocab in (512, 50272):
        text, config = synth._tokenizer_files(synth.SynthShape("opt", 64, 1, 4, 4, 64, vocab, 64))
        tok = Tokenizer.from_str(text)
        assert tok.get_vocab_size(with_added_tokens=True) == vocab
        assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [synth.UNK_ID, synth.BOS_ID, synth.EOS_ID]
        assert config["bos_token"] == "<s>" and config["eos_token"] == "</s>"
        pieces = [tok.id_to_token(i) for i in range(vocab)]
        assert None not in pieces and len(set(pieces)) == vocab
        assert isinstance(tok.decode(list(range(vocab))), str)
        assert len(tok.encode("the cat sat on the mat").ids) < len("the cat sat on the mat")  # merges apply


# ---- errors ----------------------------------------------------------------------------

def test_bad_arguments_are_named(tmp_path):
    with pytest.raises(ConfigValueError, match=r"unknown synthetic preset 'gpt-5'.*tiny.*mistral-7b-relu"):
        synth.synthesize("gpt-5", tmp_path / "x")
    for bad in (0.0, 1.0, 1.5, -0.1):
        with pytest.raises(ConfigValueError, match="sparsity must be a fraction strictly between 0 and 1"):
            synth.synthesize("tiny", tmp_path / "x", sparsity=bad)
    with pytest.raises(ConfigValueError, match="dtype"):
        synth.synthesize("tiny", tmp_path / "x", dtype="q4")
    with pytest.raises(ConfigValueError, match="llama.cpp has no OPT support"):
        synth.synthesize("tiny-opt", tmp_path / "x", gguf_path=tmp_path / "x.gguf")
    assert not (tmp_path / "x").exists()


def test_existing_output_is_refused_unless_overwrite(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(StorageError, match="already exists"):
        synth.synthesize("tiny", out)
    assert (out / "keep").exists()
    synth.synthesize("tiny", out, overwrite=True)
    assert not (out / "keep").exists() and (out / "synth.json").exists()


def test_not_enough_disk_space(tmp_path, monkeypatch):
    monkeypatch.setattr(synth.writing.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12, 1000))
    with pytest.raises(StorageError, match=r"not enough disk space.*needs 14\.\d\d GB.*0\.00 GB free"):
        synth.synthesize("mistral-7b-relu", tmp_path / "m")


def test_interrupted_synth_leaves_nothing(tmp_path):
    calls = []

    def progress(done, total):
        calls.append(done)
        if done > total // 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        synth.synthesize("tiny", tmp_path / "m", progress=progress)
    assert list(tmp_path.iterdir()) == []
    assert calls == sorted(calls)


def test_progress_reaches_the_total(tmp_path):
    seen = []
    report = synth.synthesize("tiny", tmp_path / "m", progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (report.bytes_written, report.bytes_written)
    assert report.bytes_written == sum(i.nbytes for i in Checkpoint.open(report.out_dir).tensors.values())


def test_firing_probabilities():
    rng = np.random.default_rng(0)
    for skew in (0.0, 1.0, 2.0):
        p = synth.firing_probabilities(11008, 0.95, skew, rng)
        assert p.mean() == pytest.approx(0.05, rel=1e-6)
        assert p.min() >= synth.P_MIN and p.max() <= synth.P_MAX
    assert synth.hot10_share(synth.firing_probabilities(1000, 0.9, 0.0, rng)) == pytest.approx(0.1)
    assert 0.45 < synth.hot10_share(synth.firing_probabilities(11008, 0.9, 1.0, rng)) < 0.6


# ---- GGUF ---------------------------------------------------------------------------------

def test_gguf_holds_the_same_weights_as_llama_cpp_expects(tmp_path):
    gguf = pytest.importorskip("gguf")
    report = synth.synthesize("tiny", tmp_path / "m", gguf_path=tmp_path / "m.gguf")
    assert report.gguf_path == tmp_path / "m.gguf" and not list(tmp_path.glob(".*"))
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama" and fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 4 and fields["llama.rope.dimension_count"] == 16
    assert len(fields["tokenizer.ggml.tokens"]) == 512 and fields["tokenizer.ggml.bos_token_id"] == synth.BOS_ID
    ckpt = Checkpoint.open(report.out_dir)
    tensors = {t.name: t for t in reader.tensors}
    assert set(tensors) == {synth.gguf_name(n) for n in ckpt.tensors}
    for name in ckpt.tensors:
        got = np.asarray(tensors[synth.gguf_name(name)].data)
        want = ckpt.as_float32(name)
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            want = synth.gguf_permute_rows(want, 16)
        np.testing.assert_array_equal(got.astype(np.float32), want, err_msg=name)
        assert tensors[synth.gguf_name(name)].tensor_type.name == ("F16" if want.ndim == 2 else "F32")


def test_gguf_types_are_ggml_blocks_of_the_checkpoint_weights(tmp_path):
    """--gguf-type q4_0 / --gguf-resident-type q8_0: FFN matrices are what ggml's reference
    quantizer (gguf-py, bit-exact with quantize_row_q4_0_ref) makes of the checkpoint's f16
    weights, the other matrices Q8_0, norms F32; the file is the size the disk check expects."""
    gguf = pytest.importorskip("gguf")
    report = synth.synthesize("tiny", tmp_path / "m", gguf_path=tmp_path / "m.gguf", gguf_type="q4_0",
                              gguf_resident_type="q8_0")
    assert report.gguf_types == ("q4_0", "q8_0")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    assert reader.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q4_0
    tensors = {t.name: t for t in reader.tensors}
    ckpt = Checkpoint.open(report.out_dir)
    data_bytes = 0
    for name in ckpt.tensors:
        t = tensors[synth.gguf_name(name)]
        want = ckpt.as_float32(name)
        if want.ndim == 1:
            assert t.tensor_type.name == "F32"
            np.testing.assert_array_equal(np.asarray(t.data), want, err_msg=name)
            continue
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            want = synth.gguf_permute_rows(want, 16)
        qtype = gguf.GGMLQuantizationType.Q4_0 if name.endswith(synth.FFN_MATRICES) else gguf.GGMLQuantizationType.Q8_0
        assert t.tensor_type == qtype, name
        np.testing.assert_array_equal(np.asarray(t.data), gguf.quants.quantize(want, qtype), err_msg=name)
        assert t.n_bytes == synth.gguf_tensor_bytes(want.shape, qtype.name.lower())
        data_bytes += t.n_bytes
    assert data_bytes == sum(synth.gguf_tensor_bytes(s, "q4_0" if n.endswith(synth.FFN_MATRICES) else "q8_0")
                             for n, s in synth._tensor_plan(synth.PRESETS["tiny"]) if len(s) == 2)


def test_gguf_type_defaults_to_the_checkpoint_dtype_and_refuses_unknown_types(tmp_path):
    gguf = pytest.importorskip("gguf")
    report = synth.synthesize("tiny", tmp_path / "m", dtype="bf16", gguf_path=tmp_path / "m.gguf",
                              gguf_resident_type="f16")
    assert report.gguf_types == ("bf16", "f16")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    assert types["blk.0.ffn_up.weight"] == "BF16" and types["blk.0.attn_q.weight"] == "F16"
    assert types["output.weight"] == "F16" and types["blk.0.ffn_norm.weight"] == "F32"
    with pytest.raises(ConfigValueError, match="unknown gguf_type 'q5_k'"):
        synth.synthesize("tiny", tmp_path / "x", gguf_path=tmp_path / "x.gguf", gguf_type="q5_k")
    with pytest.raises(ConfigValueError, match="multiple of 256 weights; .* has rows of 64 .*tiny-256"):
        synth.synthesize("tiny", tmp_path / "x", gguf_path=tmp_path / "x.gguf", gguf_type="q4_k")


def test_gguf_permutation_turns_hf_rope_into_llama_cpp_rope():
    """HF rotates element i of a head with i + d/2; llama.cpp's LLAMA rope rotates 2i with
    2i+1. Permuted rows must give the same rotated vector, permuted the same way, so q·k holds."""
    rng = np.random.default_rng(0)
    head_dim, n_heads, pos, theta = 8, 2, 5, 10000.0
    w = rng.standard_normal((head_dim * n_heads, 6))
    x = rng.standard_normal(6)
    ang = pos / theta ** (np.arange(head_dim // 2) * 2 / head_dim)

    def hf_rope(v):
        a, b = v[..., : head_dim // 2], v[..., head_dim // 2 :]
        return np.concatenate([a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)], -1)

    def llama_cpp_rope(v):
        a, b = v[..., 0::2], v[..., 1::2]
        out = np.empty_like(v)
        out[..., 0::2], out[..., 1::2] = a * np.cos(ang) - b * np.sin(ang), b * np.cos(ang) + a * np.sin(ang)
        return out

    hf = hf_rope((w @ x).reshape(n_heads, head_dim))
    cpp = llama_cpp_rope((synth.gguf_permute_rows(w, head_dim) @ x).reshape(n_heads, head_dim))
    np.testing.assert_allclose(synth.gguf_permute_rows(hf.reshape(-1, 1), head_dim).reshape(n_heads, head_dim), cpp)


# ---- slow: a 7B preset streams under 1 GB RSS -------------------------------------------

@pytest.mark.slow
def test_mistral_7b_streams_in_bounded_memory(tmp_path):
    out = tmp_path / "mistral"
    script = ("import resource, sys; from flashinfer.cli import main; main(['synth'] + sys.argv[1:]); "
              "print('PEAK_KB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")
    proc = subprocess.run([sys.executable, "-c", script, "mistral-7b-relu", str(out), "--quiet"],
                          cwd=REPO, capture_output=True, text=True, timeout=1800)
    try:
        assert proc.returncode == 0, proc.stderr
        peak_kb = int(proc.stdout.split("PEAK_KB")[1])
        assert peak_kb < 1 << 20, f"peak RSS {peak_kb / 1024:.0f} MB"
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) >= 14
        assert all((out / s).stat().st_size <= synth.MAX_SHARD_BYTES + (1 << 20) for s in shards)
        measured = json.loads((out / "synth.json").read_text())["measured"]
        assert all(abs(v - 0.9) < 0.02 for v in measured["layer_sparsity"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
