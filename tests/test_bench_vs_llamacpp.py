"""bench/vs_llamacpp.py's pure parts: the perplexity both runtimes are scored with, the best-of-N
pick and the table (ratios, the relative perplexity difference, a failed run's row)."""

import math

import numpy as np
import pytest

from bench import vs_llamacpp as vs

LOG3 = math.log(3)


def test_perplexity_of_hand_made_logits():
    # row i scores ids[i + 1]: each target has probability 3/4, so the perplexity is 4/3;
    # the last row scores a token that is not there and is ignored
    ids = [0, 1, 0]
    logits = np.array([[0.0, LOG3], [LOG3, 0.0], [1e4, -1e4]], np.float32)
    assert vs.perplexity(logits, ids) == pytest.approx(4 / 3, rel=1e-6)
    assert vs.perplexity(logits, ids, rows=1) == pytest.approx(4 / 3, rel=1e-6)  # chunking changes nothing


def test_perplexity_is_shift_invariant_and_uniform_means_vocab_size():
    ids = [3, 1, 4, 1, 5]
    uniform = np.full((5, 7), 1000.0, np.float32)  # large logits: the log-softmax must not overflow
    assert vs.perplexity(uniform, ids) == pytest.approx(7.0, rel=1e-9)
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 7)).astype(np.float32)
    assert vs.perplexity(logits + 50, ids) == pytest.approx(vs.perplexity(logits, ids), rel=1e-5)


def test_perplexity_needs_a_row_per_id():
    with pytest.raises(ValueError):
        vs.perplexity(np.zeros((2, 4)), [0, 1, 2])
    with pytest.raises(ValueError):
        vs.perplexity(np.zeros((1, 4)), [0])


def record(runtime, metric, value, repeat=0, model="m"):
    return {"model": model, "metric": metric, "runtime": runtime, "repeat": repeat, vs.METRICS[metric][1]: value}


def test_best_of_n_is_the_fastest_run_and_skips_failures():
    runs = [record("flashinfer", "decode", 10.0, 0), record("flashinfer", "decode", 12.5, 1),
            {"model": "m", "metric": "decode", "runtime": "flashinfer", "repeat": 2, "error": "boom"}]
    assert vs.best(runs)["repeat"] == 1
    assert vs.best(runs[2:])["error"] == "boom"  # every run failed: the failure is reported
    assert vs.best([]) is None
    assert vs.best([record("llama.cpp", "perplexity", 9.0), record("llama.cpp", "perplexity", 8.0, 1)])["repeat"] == 1


def test_table_ratios_relative_perplexity_difference_and_a_failed_row():
    records = [
        record("flashinfer", "decode", 30.0, 0), record("llama.cpp", "decode", 60.0, 0),
        record("flashinfer", "decode", 40.0, 1), record("llama.cpp", "decode", 50.0, 1),
        record("flashinfer", "prefill", 100.0), {"model": "m", "metric": "prefill", "runtime": "llama.cpp",
                                                 "repeat": 0, "error": "RuntimeError: a|b"},
        record("flashinfer", "perplexity", 10.5), record("llama.cpp", "perplexity", 10.0),
    ]
    rows = vs.summarize(records)
    assert [(r["model"], r["metric"]) for r in rows] == [("m", "decode"), ("m", "prefill"), ("m", "perplexity")]
    lines = vs.table(rows).splitlines()
    assert lines[0] == "| model | metric | flashinfer | llama.cpp | ratio (flashinfer / llama.cpp) |"
    assert set(lines[1]) == {"|", "-"}
    assert lines[2] == "| m | decode tok/s | 40.0 | 60.0 | 0.67x |"  # best of each side, not of one repeat
    assert lines[3] == "| m | prefill tok/s | 100.0 | error: RuntimeError: a\\|b | - |"
    assert lines[4] == "| m | perplexity | 10.500 | 10.000 | +5.00% |"
    assert "relative difference" in lines[-1]


@pytest.mark.parametrize("gpl3", [vs.GPL3, "/nonexistent/GPL-3"])
def test_english_text_is_long_enough_for_the_default_perplexity(gpl3, monkeypatch):
    monkeypatch.setattr(vs, "GPL3", vs.Path(gpl3))
    text, source = vs.english_text()
    assert len(text.split()) > 1024  # more words than the default --ppl-tokens needs tokens
    expected = str(gpl3) if vs.Path(gpl3).is_file() else "docstrings of the Python stdlib modules"
    assert source.startswith(expected)


def test_no_llama_cpp_exits_2_with_one_line(monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError("no llama_cpp")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    assert vs.main(["--models", "smollm2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'flashinfer[bench]'" in err[0]
