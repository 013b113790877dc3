"""`flashinfer run` end to end, and one clear line + exit code 2 for each kind of bad input."""

import json
import shutil
import struct
import subprocess
import sys

import pytest

from flashinfer.cli import main
from tests.conftest import FIXTURES


def test_run_prints_tokens_and_speed_line(capsys):
    assert main(["run", str(FIXTURES / "llama"), "--prompt", "hello", "--max-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert "decode 8 tokens" in err and "tok/s" in err and "prompt 4 tokens" in err  # <s> + 3 BPE tokens


def test_console_script_and_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "flashinfer.cli", "run", str(tmp_path / "missing"), "--prompt", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr == f"error: {tmp_path / 'missing'}: no such file or directory\n"


def _copy_fixture(tmp_path, name="llama"):
    dst = tmp_path / name
    shutil.copytree(FIXTURES / name, dst)
    return dst


def _run_error(capsys, path) -> str:
    """The one error line of `flashinfer run` on a broken model (after the notice that it converts)."""
    assert main(["run", str(path), "--prompt", "hi", "--max-tokens", "2"]) == 2
    lines = capsys.readouterr().err.splitlines()
    if lines and lines[0].startswith(f"converting {path} into "):
        lines = lines[1:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in lines[0], lines
    return lines[0]


def test_dir_without_config(tmp_path, capsys):
    assert "no config.json here" in _run_error(capsys, tmp_path)


def test_truncated_weights(tmp_path, capsys):
    model = _copy_fixture(tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    err = _run_error(capsys, model)
    assert str(weights) in err and "truncated" in err


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * max(0, n - len(blob))
    assert len(blob) == n, "edited header must keep its length"
    path.write_bytes(raw[:8] + blob + raw[8 + n :])


def test_header_lying_about_sizes(tmp_path, capsys):
    model = _copy_fixture(tmp_path)
    weights = model / "model.safetensors"

    def lie(header):
        name = next(k for k in header if k.endswith("q_proj.weight"))
        header[name]["shape"] = [header[name]["shape"][0] // 2, header[name]["shape"][1]]

    _rewrite_header(weights, lie)
    err = _run_error(capsys, model)
    assert str(weights) in err and "header says shape" in err


def test_unknown_dtype(tmp_path, capsys):
    model = _copy_fixture(tmp_path)
    weights = model / "model.safetensors"

    def odd_dtype(header):
        name = next(k for k in header if k.endswith("q_proj.weight"))
        header[name]["dtype"] = "C64"

    _rewrite_header(weights, odd_dtype)
    err = _run_error(capsys, model)
    assert str(weights) in err and "dtype 'C64'" in err


def test_config_that_does_not_match_weights(tmp_path, capsys):
    model = _copy_fixture(tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (model / "config.json").write_text(json.dumps(cfg))
    err = _run_error(capsys, model)
    assert "lacks 9 tensor(s) the config needs: model.layers.2." in err


def test_debug_shows_traceback(tmp_path):
    with pytest.raises(Exception, match="no such file"):
        main(["--debug", "run", str(tmp_path / "missing"), "--prompt", "x"])


def test_help_is_fast_and_lazy():
    code = "import sys, flashinfer.cli; flashinfer.cli.build_parser(); print('numba' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_choice_lists_match_the_library():
    """The CLI spells these out to keep --help import-free; they must not drift."""
    from flashinfer import cli
    from storage import quant, synth

    assert cli.SCHEMES == quant.SCHEMES
    assert cli.SYNTH_PRESETS == tuple(synth.PRESETS)
    assert cli.GGUF_TYPES == synth.GGUF_TYPES
    from flashinfer.fetch import MODELS

    assert cli.PYPI_MODELS == tuple(MODELS)


def test_synth_command(tmp_path, capsys):
    assert main(["synth", "tiny", str(tmp_path / "m"), "--sparsity", "0.9"]) == 0
    out = capsys.readouterr().out
    assert "random weights, not a language model" in out
    measured = float(out.split("measured mean ")[1].split(";")[0])
    assert abs(measured - 0.9) < 0.05
    from flashinfer import Engine

    # the checkpoint runs (as it is: `run` would convert it to q4/q8 first, a compile of its own)
    with Engine.open(tmp_path / "m") as engine:
        assert engine.generate("hi", max_tokens=3).usage.completion_tokens == 3
