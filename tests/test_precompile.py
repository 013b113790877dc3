"""A capped run compiles its kernels in a child process before it plans (flashinfer/precompile.py)."""

import os
import subprocess
import sys

import pytest

from flashinfer import Engine
from flashinfer import precompile
from storage.synth import synthesize
from tests.conftest import roomy_cap


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from flashinfer.convert import convert_checkpoint

    tmp = tmp_path_factory.mktemp("precompile")
    synthesize("tiny", tmp / "m", sparsity=0.9)
    return convert_checkpoint(tmp / "m", tmp / "s", quant="q8", resident_quant="q8")


def test_a_capped_open_compiles_in_a_child_once(store, tmp_path, monkeypatch):
    monkeypatch.setattr(precompile, "cache_dir", lambda: tmp_path)  # stamps of this test only
    children = []
    run = subprocess.run
    monkeypatch.setattr(precompile.subprocess, "run", lambda argv, **kw: children.append(argv) or run(argv, **kw))
    options = {"predictor": "oracle", "window": 3, "prefetch": False, "stream_ffn": False, "kv_cache": "f16"}
    with Engine.open(store, predictor="oracle", dram=roomy_cap(), window=3) as engine:
        assert engine.generate("hello", max_tokens=2).usage.completion_tokens == 2
    assert len(children) == 1 and children[0][1:3] == ["-m", "flashinfer.precompile"]
    assert precompile._stamp(store, options).exists()
    with Engine.open(store, predictor="oracle", dram=roomy_cap(), window=3):
        pass
    assert len(children) == 1  # stamped: no second child
    with Engine.open(store, predictor="oracle", dram=roomy_cap(), window=3, kv_cache="f32"):
        pass
    assert len(children) == 2  # another configuration: its kernels differ (the KV cache's type)
    with Engine.open(store, predictor="oracle", window=3):
        pass
    assert len(children) == 2  # no cap: compiled in the process, as always


def test_a_failed_child_is_said_and_the_parent_compiles(store, tmp_path, monkeypatch):
    monkeypatch.setattr(precompile, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(precompile.subprocess, "run",
                        lambda argv, **kw: subprocess.CompletedProcess(argv, -9, "", ""))
    said = []
    with Engine.open(store, predictor="oracle", dram=roomy_cap(), window=3, notify=said.append) as engine:
        assert engine.generate("hello", max_tokens=2).usage.completion_tokens == 2
    assert said == ["note: compiling the kernels in a child process failed (exit code -9 (killed: out of memory?)); "
                    "compiling in this one, whose peak memory may exceed the cap this first time"]
    assert not list(tmp_path.glob("precompiled/*"))  # not stamped: the next run tries again


def test_no_child_when_disabled_or_when_numba_cannot_keep_the_compile(store, tmp_path, monkeypatch):
    monkeypatch.setattr(precompile.subprocess, "run", lambda argv, **kw: pytest.fail("no child expected"))
    monkeypatch.setenv(precompile.ENV, "0")
    assert precompile.compile_in_child(store, {}) is False
    monkeypatch.delenv(precompile.ENV)
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    monkeypatch.setattr(precompile, "cache_dir", lambda: read_only)
    if os.access(read_only, os.W_OK):  # root writes anywhere: a file where the directory should be
        monkeypatch.setattr(precompile, "cache_dir", lambda: tmp_path / "file")
        (tmp_path / "file").write_text("")
    assert precompile.compile_in_child(store, {}) is False


@pytest.mark.slow
def test_with_a_cold_numba_cache_the_capped_process_compiles_nothing(store, tmp_path):
    """Every kernel compiled in the child (numba's compile events in the parent: none) — the
    point: LLVM's ~550 MB peak then never adds to a process that holds its budget."""
    code = f"""
from numba.core import event
from flashinfer import Engine
with event.install_recorder("numba:compile") as rec:
    with Engine.open({str(store)!r}, predictor="oracle", dram="1GB", window=3) as engine:
        engine.generate("hello there", max_tokens=4)
        engine.logits(list(range(3, 19)))  # every position's logits: the head's own matmul path
print(len(rec.buffer))
"""
    env = os.environ | {"NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    env.pop("FLASHINFER_WARM_UP", None)  # the full warm-up: prefill and decode kernels both
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env).stdout
    assert out.split()[-1] == "0"
