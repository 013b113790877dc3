"""bench/llamacpp.py: llama.cpp as a benchmark child on a tiny synthetic GGUF — token ids in,
greedy ids out, sane meters, and an honest activation report (llama.cpp runs SiLU)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from bench import cgroup
from bench.llamacpp import activation_report, llamacpp_argv, RESULT_FIELDS

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install 'flashinfer[bench]')")

from storage import synth  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
PROMPT = [synth.BOS_ID, 72, 305, 17, 400, 9]
N = 8
# One thread: on a 2-core machine shared with other work, llama.cpp's OpenMP barriers wait for the
# scheduler at every graph node (measured on tiny: 0.08 ms a token on 1 thread, ~200 ms on 2).
THREADS = 1


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    root = tmp_path_factory.mktemp("llamacpp")
    f16 = synth.synthesize("tiny", root / "hf", gguf_path=root / "f16.gguf").gguf_path
    q4 = synth.synthesize("tiny", root / "hf-q4", gguf_path=root / "q4.gguf", gguf_type="q4_0",
                          gguf_resident_type="q8_0").gguf_path
    return {"f16": f16, "q4_0": q4}


def child(argv: list[str]) -> dict:
    proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["f16", "q4_0"])
def test_the_child_generates_n_greedy_ids_and_reports_sane_meters(ggufs, kind):
    out = child(llamacpp_argv(ggufs[kind], PROMPT, N, threads=THREADS))
    assert set(out) == set(RESULT_FIELDS)
    ids = out["generated_ids"]
    assert len(ids) == N and all(isinstance(i, int) and 0 <= i < 512 for i in ids)
    assert out["prompt_tokens"] == len(PROMPT) and out["decode_steps"] == N - 1
    assert out["decode_tok_s"] > 0 and out["ms_per_token"] == pytest.approx(1e3 / out["decode_tok_s"])
    assert out["load_s"] > 0 and out["prefill_s"] > 0
    for key in ("read_bytes_load", "read_bytes_prefill", "read_bytes_decode"):
        assert out[key] >= 0
    assert out["peak_rss_bytes"] >= out["rss_anon_bytes"] > 0
    assert out["model_bytes"] == ggufs[kind].stat().st_size and out["mmap"] and not out["extra_bufts"]
    # synth's models are ReLU-gated; llama.cpp's llama graph is SiLU: a different function
    assert out["model_activation"] == "relu" and out["llamacpp_activation"] == "silu"
    assert out["activation_matches"] is False


def test_a_q8_kv_cache_run_is_llamacpps_q8_0_and_still_generates(tmp_path):
    """--kv-cache q8 (bench/run.py's choice for every runtime) reaches llama.cpp as q8_0 keys
    and values with flash attention, which a quantized V cache needs (without it, or with heads
    narrower than q8_0's 32-element block, as tiny's 16, llama.cpp fails to create its context)."""
    gguf = synth.synthesize("tiny-256", tmp_path / "hf", gguf_path=tmp_path / "q4.gguf", gguf_type="q4_0",
                            gguf_resident_type="q8_0").gguf_path
    out = child(llamacpp_argv(gguf, PROMPT, N, threads=THREADS, kv_cache="q8"))
    assert out["kv_cache"] == "q8" and len(out["generated_ids"]) == N


def test_greedy_ids_do_not_depend_on_how_the_weights_are_loaded(ggufs):
    mapped = child(llamacpp_argv(ggufs["q4_0"], PROMPT, N, threads=THREADS))
    read_in = child(llamacpp_argv(ggufs["q4_0"], PROMPT, N, threads=THREADS, mmap=False))
    assert not read_in["mmap"]
    assert read_in["generated_ids"] == mapped["generated_ids"]


def test_activation_report_says_when_outputs_can_be_compared():
    assert activation_report({"general.architecture": "llama"})["activation_matches"] is True  # plain SiLU Llama
    relu = activation_report({"general.architecture": "llama", "flashinfer.hidden_act": "relu"})
    assert relu == {"model_activation": "relu", "llamacpp_activation": "silu", "activation_matches": False}
    assert activation_report({"general.architecture": "gemma"})["activation_matches"] is None


def test_bad_arguments_are_one_clear_line(ggufs, tmp_path):
    proc = subprocess.run(llamacpp_argv(ggufs["f16"], [99999], 2), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "outside the model's vocabulary of 512" in proc.stderr
    proc = subprocess.run(llamacpp_argv(tmp_path / "none.gguf", [1], 2), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "no such GGUF file" in proc.stderr


@pytest.mark.skipif(cgroup.cgroup_support()[0] is None, reason="no usable memory cgroup")
def test_the_child_runs_under_a_memory_cap(ggufs):
    run = cgroup.run_limited(llamacpp_argv(ggufs["q4_0"], PROMPT, N, threads=THREADS), 512 << 20,
                             drop_caches=False, timeout=120, cwd=REPO)
    assert run.returncode == 0 and not run.oom_killed, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(out["generated_ids"]) == N
    assert run.peak_bytes >= out["rss_anon_bytes"]  # its anonymous memory is charged to the group
