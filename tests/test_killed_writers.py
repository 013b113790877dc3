"""Killed writers (issue 16): `flashinfer convert` and `flashinfer calibrate` SIGKILLed at seeded
random instants, in a subprocess. Afterwards the store (or its predictors) is the old one, the
new one complete, or (where there was none) absent: never one that loads with partial contents;
the next writer clears what the killed one left. storage/atomic.py does the swapping."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from flashinfer.calibrate import CHECKSUMS_FILE, PREDICTOR_DIR, REPORT_FILE, verify_predictors
from flashinfer.cli import main
from flashinfer.convert import convert_checkpoint
from flashinfer.errors import FlashinferError
from storage import atomic
from storage.reader import StoreReader
from tests.conftest import FIXTURES

# imports before "ready", so the kill instants fall in the work, not in Python's start-up
CHILD = ("import sys\nimport flashinfer.calibrate, flashinfer.convert, flashinfer.engine\n"
         "from flashinfer.cli import main\nprint('ready', flush=True)\nsys.exit(main(sys.argv[1:]))\n")


def _run(argv: list[str], kill_after: float | None = None) -> float:
    """Run the CLI in a child; SIGKILL it `kill_after` seconds after its imports (if it still runs).
    Returns the seconds it ran after them."""
    child = subprocess.Popen([sys.executable, "-c", CHILD, *argv], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, text=True, cwd=Path(__file__).parent.parent)
    assert child.stdout.readline().strip() == "ready"
    t0 = time.monotonic()
    try:
        child.wait(kill_after)
    except subprocess.TimeoutExpired:
        child.send_signal(signal.SIGKILL)
        child.wait()
    elapsed = time.monotonic() - t0
    if kill_after is None:
        assert child.returncode == 0
    return elapsed


def _siblings(target: Path) -> list[str]:
    return sorted(p.name for p in target.parent.glob(f"{target.name}.*"))


def _kill_trials(n_trials: int, seed: int, duration: float, argv: list[str], prepare, outcome) -> dict:
    """n_trials kills at uniform instants over a clean run's `duration`; each trial starts with
    prepare(trial) and ends with outcome(trial) -> a label. Returns the count of each label."""
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for trial, delay in enumerate(rng.uniform(0, duration, n_trials)):
        prepare(trial)
        _run(argv, kill_after=float(delay))
        label = outcome(trial)
        counts[label] = counts.get(label, 0) + 1
    return counts


# ---- convert ---------------------------------------------------------------------------------

def _manifest(store: Path) -> str:
    with StoreReader(store, verify=True):  # every checksum, every size
        pass
    return (store / "manifest.json").read_text()


def _convert_trials(tmp_path: Path, n_trials: int, seed: int) -> dict:
    old = convert_checkpoint(FIXTURES / "llama", tmp_path / "old", quant="f16", resident_quant="f16")
    target = tmp_path / "store"
    argv = ["convert", str(FIXTURES / "llama"), str(target), "--quant", "q8", "--overwrite"]
    duration = _run(argv)
    new_manifest, old_manifest = _manifest(target), _manifest(old)
    assert new_manifest != old_manifest

    def prepare(trial: int) -> None:
        shutil.rmtree(target, ignore_errors=True)
        if trial % 2:  # odd trials overwrite an old store
            shutil.copytree(old, target)

    def outcome(trial: int) -> str:
        for name in _siblings(target):  # what a killed writer leaves never loads
            with pytest.raises(FlashinferError, match="left by an interrupted conversion"):
                StoreReader(target.with_name(name))
        if not target.exists():
            assert trial % 2 == 0, "an old store vanished"  # renameat2 swaps: there is never a gap
            return "absent"
        got = _manifest(target)
        assert got in (old_manifest, new_manifest), "a store that is neither the old nor the new one"
        return "new" if got == new_manifest else "old"

    counts = _kill_trials(n_trials, seed, duration, argv, prepare, outcome)
    shutil.rmtree(target, ignore_errors=True)
    assert main(argv) == 0  # the next conversion clears what the killed ones left
    assert _siblings(target) == [] and _manifest(target) == new_manifest
    return counts


TRIALS = [4, pytest.param(20, marks=pytest.mark.slow)]


@pytest.mark.parametrize("trials", TRIALS)
def test_a_killed_conversion_leaves_the_old_store_or_none(tmp_path, trials):
    counts = _convert_trials(tmp_path, n_trials=trials, seed=trials)
    print(f"convert killed {trials} times: {counts}")
    assert sum(counts.values()) == trials and (trials < 20 or len(counts) >= 2)


# ---- calibrate -------------------------------------------------------------------------------

def _predictors(store: Path) -> str | None:
    """The report's rank of the store's predictors, checked whole (None: there are none)."""
    folder = store / PREDICTOR_DIR
    if not folder.exists():
        return None
    assert verify_predictors(store).endswith("(checksums match)")  # complete, and all from one calibration
    assert {p.name for p in folder.iterdir()} == {"lowrank.npz", "static.npz", REPORT_FILE, CHECKSUMS_FILE}
    return str(json.loads((folder / REPORT_FILE).read_text())["rank"])


def _calibrate_trials(tmp_path: Path, n_trials: int, seed: int) -> dict:
    text = tmp_path / "text.txt"
    text.write_text(" ".join(["the river ran past the old mill and the wheel turned"] * 30))
    base = convert_checkpoint(FIXTURES / "relu_llama", tmp_path / "base", quant="q8", resident_quant="q8")
    calibrated = tmp_path / "calibrated"
    shutil.copytree(base, calibrated)
    assert main(["calibrate", str(calibrated), "--text", str(text), "--rank", "8", "--tokens", "200"]) == 0
    store = tmp_path / "store"
    argv = ["calibrate", str(store), "--text", str(text), "--rank", "16", "--tokens", "200"]
    shutil.copytree(base, store)
    duration = _run(argv)
    assert _predictors(store) == "16" and _predictors(calibrated) == "8"

    def prepare(trial: int) -> None:
        shutil.rmtree(store)
        shutil.copytree(calibrated if trial % 2 else base, store)  # odd trials replace rank-8 predictors

    def outcome(trial: int) -> str:
        rank = _predictors(store)
        if rank is None:
            assert trial % 2 == 0, "the old predictors vanished"
        leftovers = [p.name for p in store.iterdir() if p.name.startswith(f"{PREDICTOR_DIR}.")]
        assert all(".partial-" in n or ".scratch-" in n or ".old-" in n for n in leftovers)
        return {None: "absent", "8": "old", "16": "new"}[rank]

    counts = _kill_trials(n_trials, seed, duration, argv, prepare, outcome)
    assert main(argv) == 0 and _predictors(store) == "16"  # the next calibration clears what was left
    assert [p.name for p in store.iterdir() if p.name.startswith(f"{PREDICTOR_DIR}.")] == []
    return counts


@pytest.mark.parametrize("trials", TRIALS)
def test_a_killed_calibration_leaves_the_old_predictors_or_none(tmp_path, trials):
    counts = _calibrate_trials(tmp_path, n_trials=trials, seed=trials)
    print(f"calibrate killed {trials} times: {counts}")
    assert sum(counts.values()) == trials and (trials < 20 or len(counts) >= 2)


# ---- the swap itself -------------------------------------------------------------------------

@pytest.mark.parametrize("exchange", [True, False])
def test_replace_dir_with_and_without_renameat2(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    target = tmp_path / "t"
    target.mkdir()
    (target / "f").write_text("old")
    new = atomic.staging_dir(target)
    new.mkdir()
    (new / "f").write_text("new")
    atomic.replace_dir(new, target)
    assert (target / "f").read_text() == "new" and _siblings(target) == []


def test_remove_stale_puts_back_an_old_copy_and_spares_live_writers(tmp_path):
    target = tmp_path / "t"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for name in (f"t.old-{dead}", f"t.partial-{dead}", f"t.scratch-{dead}", f"t.partial-{os.getpid()}",
                 f"t.partial-{dead}x", "t.backup"):
        (tmp_path / name).mkdir()
    (tmp_path / f"t.old-{dead}" / "f").write_text("old")
    atomic.remove_stale(target)
    assert (target / "f").read_text() == "old"  # killed between its two renames: the old store comes back
    assert _siblings(target) == sorted(["t.backup", f"t.partial-{dead}x", f"t.partial-{os.getpid()}"])
