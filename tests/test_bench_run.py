"""bench/run.py's flashinfer child and its table: the measurement path of the end-to-end benchmark."""

import json
import subprocess
import sys

import pytest

from bench import run as bench_run
from flashinfer.convert import convert_checkpoint
from storage.synth import synthesize
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_run")
    synthesize("tiny", root / "model", sparsity=0.9, seed=3)
    return convert_checkpoint(root / "model", root / "store", quant="q4", resident_quant="q4")


def child(cfg: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "bench.flashinfer_child", json.dumps(cfg)], capture_output=True,
                          text=True, cwd=FIXTURES.parent.parent)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # ~24 s cold: a child process compiling its own kernels; the suite's 10-minute bound
def test_child_reports_what_the_table_needs_and_oracle_agrees_with_dense(store):
    base = {"store": str(store), "prompt_ids": [1, 5, 9, 13, 17], "tokens": 6, "ctx": 32, "dram": "2GB"}
    dense = child(base | {"predictor": "dense", "stream_ffn": True})
    assert len(dense["generated_ids"]) == 6  # exactly `tokens`, EOS or not
    assert dense["decode_steps"] == 5 and dense["decode_tok_s"] > 0
    assert dense["engine_bytes_per_token"] > 0 and dense["bytes_touched_per_token"] > 0
    assert set(dense["ms_per_token"]) >= {"io", "memory_management", "attention", "ffn_compute", "total"}
    assert dense["peak_rss_bytes"] <= dense["cap_bytes"]
    oracle = child(base | {"predictor": "oracle", "reference_ids": dense["generated_ids"]})
    assert oracle["generated_ids"] == dense["generated_ids"]
    assert oracle["agreement"] == 1.0  # the oracle loads exactly the active neurons: dense logits
    assert oracle["bytes_touched_per_token"] < dense["bytes_touched_per_token"]  # fewer FFN rows computed


def test_table_rows_ratios_and_errors():
    rows = [
        {"model": "m", "config": "naive (dense from flash)", "decode_tok_s": 2.0, "read_bytes_per_token": 3e9,
         "ms_per_token": {"io": 400, "memory_management": 0, "predictor": 0, "attention": 50, "ffn_compute": 40,
                          "other": 10, "total": 500}, "cgroup_peak_bytes": 2**30, "oom_killed": False},
        {"model": "m", "config": "flashinfer", "decode_tok_s": 8.0, "read_bytes_per_token": 1e8, "agreement": 0.9,
         "ms_per_token": {"io": 60, "memory_management": 5, "predictor": 10, "attention": 30, "ffn_compute": 10,
                          "other": 10, "total": 125}, "cgroup_peak_bytes": 2**30, "oom_killed": False,
         "roofline_ms": 50.0, "roofline_ratio": 2.5, "prefill_tok_s": 41.25},
        {"model": "m", "config": "llama.cpp", "runtime": "llama.cpp", "decode_tok_s": 1.0, "ms_per_token": 1000.0,
         "read_bytes_per_token": 2e9, "cgroup_peak_bytes": 2**31, "oom_killed": False},
        {"model": "m", "config": "llama.cpp, killed", "error": "OOM-killed by the cgroup", "cgroup_peak_bytes": 2**31,
         "oom_killed": True},
    ]
    lines = bench_run.table(rows).splitlines()
    assert lines[0].startswith("| model |") and set(lines[1]) == {"|", "-"}
    assert "| 8.00 | 4.00x | 125 (60 / 5 / 60) | 100.0 |" in lines[3] and "| 0.900 | 50 (2.5x) | 41.2 |" in lines[3]
    assert all(line.count("|") == lines[0].count("|") for line in lines)  # every row fills every column
    assert "| 1.00 | 0.50x | 1000 |" in lines[4] and "n/a (SiLU)" in lines[4]
    assert "error: OOM-killed by the cgroup" in lines[5] and "| yes |" in lines[5]
