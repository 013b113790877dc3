"""flashinfer profile: the tracer's records add up, the files it writes are valid, sweeps and errors."""

import json
import random

import pytest

from bench.texts import WORDS
from flashinfer import Engine
from flashinfer.calibrate import calibrate_store
from flashinfer.cli import main
from flashinfer.convert import convert_checkpoint
from flashinfer.errors import ConfigError
from flashinfer.profile_report import parse_sweep
from storage.synth import synthesize
from tests.conftest import FIXTURES


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("profile")
    synthesize("tiny", root / "model", sparsity=0.9, seed=3)
    path = convert_checkpoint(root / "model", root / "store", quant="q8", resident_quant="q8")
    rng = random.Random(1)
    calibrate_store(path, " ".join(rng.choice(WORDS) for _ in range(1200)), max_tokens=800, rank=16)
    return path


PROMPT = "the time of day is one that"


@pytest.mark.parametrize("knobs", [{"predictor": "lowrank", "window": 2},
                                   {"predictor": "lowrank", "window": 3, "prefetch": True},
                                   {"predictor": "dense", "stream_ffn": True}],
                         ids=["lowrank", "lowrank+prefetch", "dense streamed"])
def test_trace_totals_add_up(store, knobs):
    with Engine.open(store, **knobs) as engine:
        reader = engine.model.flash_ffn.reader
        before = reader.stats.bytes_read
        result = engine.generate(PROMPT, max_tokens=12, trace=True)
        read = reader.stats.bytes_read - before
        trace = engine.last_trace
        assert engine.model.tracer is None and engine.model.flash_ffn.tracer is None  # detached after the run
    assert read > 0 and sum(r.bytes_read for r in trace.layers) == read  # the reader's own counter
    assert all(r.hits + r.misses == r.predicted for r in trace.layers)
    assert all(r.capacity == 0 or 0 < r.occupancy <= r.capacity for r in trace.layers)
    n_steps = 1 + result.usage.completion_tokens - 1  # prefill, then one step per token after the first
    assert [s.phase for s in trace.steps] == ["prefill"] + ["decode"] * (n_steps - 1)
    assert len(trace.layers) == n_steps * engine.args.n_layers
    summary = trace.summary()
    assert summary["decode_tokens"] == n_steps - 1 and summary["prefill_tokens"] == len(engine.tokenize(PROMPT))
    assert summary["bytes_read_total"] == read
    ms = summary["ms_per_token"]
    parts = sum(v for k, v in ms.items() if k != "total")
    assert parts == pytest.approx(ms["total"], rel=1e-6) or ms["other"] == 0.0  # the split covers the wall time
    if knobs["predictor"] == "dense":
        assert summary["hit_rate"] == 0.0  # the naive baseline reads every neuron every token
    if knobs.get("prefetch"):
        assert sum(r.prefetched for r in trace.layers) > 0


def test_dense_run_that_fits_reads_nothing_per_token(store, capsys):
    # no cap and a model the machine holds: every FFN layer stays resident after the warm-up read
    with Engine.open(store) as engine, Engine.open(store, stream_ffn=True) as streamed:
        ffn = engine.model.flash_ffn
        assert ffn.resident == set(range(engine.args.n_layers)) and len(ffn.resident_bundles) == engine.args.n_layers
        before = ffn.reader.stats.bytes_read
        result = engine.generate(PROMPT, max_tokens=8, trace=True)
        assert ffn.reader.stats.bytes_read == before  # not a byte from flash after opening
        assert result.token_ids == streamed.generate(PROMPT, max_tokens=8).token_ids  # the same computation
        summary = engine.last_trace.summary()
        assert summary["bytes_read_total"] == 0 and summary["hit_rate"] == 1.0
    assert main(["profile", str(store), "--prompt", PROMPT, "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert f"dense FFN: {engine.args.n_layers} of {engine.args.n_layers} layers resident" in out
    assert "nothing is read from flash per token" in out
    assert "one compiled call" in out  # the profile says it traces the per-kernel path


def test_untraced_runs_leave_no_trace_and_same_tokens(store):
    with Engine.open(store, predictor="lowrank") as engine:
        plain = engine.generate(PROMPT, max_tokens=10)
        assert engine.last_trace is None
        traced = engine.generate(PROMPT, max_tokens=10, trace=True)
    assert plain.token_ids == traced.token_ids  # tracing observes, never changes the computation


def test_in_memory_model_traces_attention_and_ffn():
    with Engine.open(FIXTURES / "llama") as engine:
        engine.generate("Hello", max_tokens=4, trace=True)
        trace = engine.last_trace
    assert all(r.attn_s > 0 and r.ffn_s > 0 and r.bytes_read == 0 for r in trace.layers)
    assert trace.summary()["hit_rate"] is None  # nothing predicted: no cache


def test_files_jsonl_chrome_and_png(store, tmp_path, capsys):
    from flashinfer.memory import peak_rss_bytes

    paths = {k: tmp_path / name for k, name in (("trace", "t.jsonl"), ("chrome", "c.json"), ("plot", "p.png"))}
    # the cap is for this whole process, and a full pytest run has already grown it: room above its peak
    cap_mb = peak_rss_bytes() // 10**6 + 400
    argv = ["profile", str(store), "--prompt", PROMPT, "--max-tokens", "8", "--predictor", "lowrank",
            "--dram", f"{cap_mb}MB", "--trace", str(paths["trace"]), "--chrome-trace", str(paths["chrome"])]
    has_mpl = True
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        has_mpl = False
    if has_mpl:
        argv += ["--plot", str(paths["plot"])]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "hit rate" in out and "latency per decode token" in out and "within the" in out and "JIT/compile" in out
    assert "dense FFN" not in out  # a sparse run's residency is its cache rows, not the dense path's layers

    lines = [json.loads(line) for line in paths["trace"].read_text().splitlines()]
    assert lines[0]["type"] == "run" and lines[-1]["type"] == "summary"
    assert {line["type"] for line in lines} == {"run", "step", "layer", "summary"}
    layer_lines = [line for line in lines if line["type"] == "layer"]
    assert all({"step", "layer", "predicted", "hits", "misses", "bytes_read", "read_s"} <= set(x) for x in layer_lines)
    assert lines[0]["cap_bytes"] == cap_mb * 10**6 and lines[0]["jit_s"] > 0

    chrome = json.loads(paths["chrome"].read_text())
    events = [e for e in chrome["traceEvents"] if e["ph"] == "X"]
    assert events and all({"name", "ph", "ts", "dur", "pid", "tid"} <= set(e) for e in events)
    assert all(e["dur"] >= 0 and e["ts"] >= 0 for e in events)
    names = {e["name"].split(" ")[0] for e in events}
    assert {"prefill", "decode", "attention", "predict", "read", "ffn"} <= names

    if has_mpl:
        data = paths["plot"].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_json_summary_for_scripts(store, capsys):
    assert main(["profile", str(store), "--prompt", PROMPT, "--max-tokens", "6", "--predictor", "lowrank",
                 "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"run", "summary", "text"} and len(data["summary"]["layers"]) == 2


def test_sweep_rows_in_order_and_refusals(store, capsys):
    argv = ["profile", str(store), "--prompt", PROMPT, "--max-tokens", "6", "--predictor", "lowrank"]
    assert main(argv + ["--sweep", "window=4,1,2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "peak RSS MiB" in lines[0]  # each setting runs in a process of its own
    rows = [line.split() for line in lines[1:4]]
    assert [r[0] for r in rows] == ["4", "1", "2"]
    # 8GB, not a tight cap: the plan counts this process's RSS, and in a full pytest run that is several hundred MB
    assert main(argv + ["--sweep", "dram=100MB,8GB", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["value"] for r in data["rows"]] == ["100MB", "8GB"]
    assert "cannot hold this model" in data["rows"][0]["error"] and "summary" in data["rows"][1]


@pytest.mark.parametrize("text, message", [
    ("window=abc", "window values must be positive integers, got 'abc'"),
    ("window=0", "positive integers"),
    ("colour=1,2", "KEY one of window, dram, predictor, flash-bw"),
    ("window", "expected KEY=V1,V2"),
    ("dram=", "no values"),
    ("dram=lots", "dram"),
])
def test_bad_sweeps_are_clear_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        parse_sweep(text)


def test_cli_argument_errors(store, capsys):
    assert main(["profile", str(store), "--sweep", "window=abc", "--prompt", "x"]) == 2
    assert "window values must be positive integers" in capsys.readouterr().err
    assert main(["profile", str(store), "--max-tokens", "4"]) == 2
    assert "--prompt TEXT or --prompt-file FILE" in capsys.readouterr().err
    assert main(["profile", str(store), "--prompt", "x", "--sweep", "window=1,2", "--plot", "p.png"]) == 2
    assert "describe one run" in capsys.readouterr().err


def test_prompt_file(store, tmp_path, capsys):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text(PROMPT)
    assert main(["profile", str(store), "--prompt-file", str(prompt), "--max-tokens", "4", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["prefill_tokens"] == data["run"]["prompt_tokens"] > 1
