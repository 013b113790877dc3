"""bench/roofline.py: the per-token bound's arithmetic, and that the bandwidth meters measure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import roofline

REPO = Path(__file__).resolve().parent.parent
MiB = 1 << 20


def test_the_bound_is_the_slower_of_disk_and_dram_or_their_sum():
    # 100 MB at 1 GB/s = 100 ms of disk; 4 GB at 20 GB/s = 200 ms of DRAM
    assert roofline.roofline_ms(100e6, 4e9, 1e9, 20e9) == pytest.approx(200.0)
    assert roofline.roofline_ms(100e6, 4e9, 1e9, 20e9, overlap=False) == pytest.approx(300.0)
    assert roofline.roofline_ms(1e9, 1e9, 1e9, 20e9) == pytest.approx(1000.0)  # disk-bound
    assert roofline.roofline_ms(0, 0, 1e9, 20e9) == 0.0


def test_the_bound_refuses_nonsense():
    with pytest.raises(ValueError, match="positive"):
        roofline.roofline_ms(1, 1, 0, 1e9)
    with pytest.raises(ValueError, match="negative"):
        roofline.roofline_ms(-1, 1, 1e9, 1e9)


def test_measured_disk_bandwidths_are_positive(tmp_path):
    path = roofline.write_scratch_file(tmp_path, 8 * MiB)
    assert path.stat().st_size == 8 * MiB
    for block, threads in ((4 * MiB, 1), (256 * 1024, 1), (256 * 1024, 4)):
        assert roofline.disk_read_bytes_per_s(path, block, threads=threads) > 0


def test_a_file_smaller_than_the_readers_is_refused(tmp_path):
    path = roofline.write_scratch_file(tmp_path, 1 * MiB)
    with pytest.raises(ValueError, match="fewer than 4 blocks"):
        roofline.disk_read_bytes_per_s(path, 4 * MiB, threads=4)


def test_the_command_reports_every_figure_and_removes_its_scratch_file(tmp_path):
    """In a child: compiling the parallel DRAM kernel would leave LLVM's memory in this
    process, and later tests plan DRAM caps from this process's RSS."""
    proc = subprocess.run([sys.executable, "-m", "bench.roofline", "--size", "8MiB", "--mem", "16MiB", "--json"],
                          cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    bw = json.loads(proc.stdout)
    for key in ("disk_4mib_bytes_per_s", "disk_256kib_bytes_per_s", "disk_256kib_threads_bytes_per_s",
                "mem_bytes_per_s", "mem_one_core_bytes_per_s"):
        assert bw[key] > 0, key
    assert bw["file_bytes_read"] == 8 * MiB and bw["mem_buffer_bytes"] == 16 * MiB
    assert bw["best_mem_bytes_per_s"] == max(bw["mem_bytes_per_s"], bw["mem_one_core_bytes_per_s"])
    assert list(tmp_path.iterdir()) == []
