"""bench/cgroup.py: a child under a memory cgroup is capped (page cache included), OOM kills
are reported, peaks are plausible, and the group is gone afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench import cgroup

VERSION, REASON = cgroup.cgroup_support()
needs_cgroup = pytest.mark.skipif(VERSION is None, reason=f"no usable memory cgroup: {REASON}")
MiB = 1 << 20


def write_random(path, nbytes: int) -> None:
    """In 8 MiB pieces: the test process's RSS is what later tests plan DRAM caps from."""
    with open(path, "wb") as f:
        for _ in range(nbytes // (8 * MiB)):
            f.write(os.urandom(8 * MiB))


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def our_groups() -> list[str]:
    """Groups this test process made that still exist."""
    hierarchy, _ = cgroup._find_hierarchy()
    prefix = f"flashinfer-bench-{os.getpid()}-"
    return [p.name for p in hierarchy.parent.iterdir() if p.name.startswith(prefix)]


@needs_cgroup
def test_allocating_past_the_limit_is_oom_killed_and_reported():
    # touches 256 MiB of anonymous memory (bytearray zero-fills) under a 96 MiB cap
    run = cgroup.run_limited(python("b = bytearray(256 << 20); print('survived')"), 96 * MiB, drop_caches=False,
                             timeout=30)
    assert run.oom_killed
    assert run.returncode == -9
    assert "survived" not in run.stdout
    assert run.peak_bytes is not None and run.peak_bytes <= 96 * MiB
    assert not run.timed_out and run.cgroup_version == VERSION and run.limit_bytes == 96 * MiB
    assert our_groups() == []


@needs_cgroup
def test_a_child_under_the_limit_reports_a_plausible_peak():
    run = cgroup.run_limited(python("b = bytearray(64 << 20); print(len(b))"), 512 * MiB, drop_caches=False,
                             timeout=30)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == str(64 << 20)
    assert not run.oom_killed
    # 64 MiB touched plus the interpreter (~10 MiB), well under the cap
    assert 64 * MiB <= run.peak_bytes < 200 * MiB
    assert run.wall_s > 0
    assert our_groups() == []


# A child that reads the file argv[1] 1 MiB at a time into one buffer: its RSS stays small while
# the page cache (charged to its group) grows by the file.
READ_ALL = ("import os, sys\nfd = os.open(sys.argv[1], os.O_RDONLY); buf = bytearray(1 << 20)\n"
            "while os.readv(fd, [buf]): pass\n")


def cold_file(tmp_path, nbytes: int):
    """A file of random bytes, none of it in the page cache."""
    path = tmp_path / "blob"
    write_random(path, nbytes)
    cgroup.evict_from_page_cache(path)
    return path


@needs_cgroup
def test_page_cache_of_a_cold_read_is_charged_to_the_group(tmp_path):
    path = cold_file(tmp_path, 96 * MiB)
    code = ("import json; from bench.cgroup import proc_read_bytes\n" + READ_ALL
            + "print(json.dumps({'read_bytes': proc_read_bytes()}))")
    run = cgroup.run_limited([sys.executable, "-c", code, str(path)], 1024 * MiB, drop_caches=False, timeout=30)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["read_bytes"] >= 96 * MiB  # it really came from disk
    baseline = cgroup.run_limited(python("pass"), 1024 * MiB, drop_caches=False, timeout=30)
    assert run.peak_bytes - baseline.peak_bytes >= 90 * MiB


@needs_cgroup
def test_the_cap_reclaims_page_cache_instead_of_killing(tmp_path):
    """Reading a file larger than the cap is legal: the kernel drops the group's old cache pages."""
    path = cold_file(tmp_path, 128 * MiB)
    run = cgroup.run_limited([sys.executable, "-c", READ_ALL + "print('done')", str(path)], 64 * MiB,
                             drop_caches=False, timeout=30)
    assert run.returncode == 0 and run.stdout.strip() == "done", run.stderr
    assert not run.oom_killed
    assert run.peak_bytes <= 64 * MiB


@needs_cgroup
def test_timeout_kills_the_child_and_removes_the_group():
    run = cgroup.run_limited(python("import time; time.sleep(60)"), 256 * MiB, drop_caches=False, timeout=0.5)
    assert run.timed_out and not run.oom_killed
    assert run.returncode == -9
    assert run.wall_s < 5
    assert our_groups() == []


@needs_cgroup
def test_grandchildren_are_killed_with_the_group():
    code = ("import subprocess, sys\n"
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('ok')")
    run = cgroup.run_limited(python(code), 256 * MiB, drop_caches=False, timeout=30)
    assert run.returncode == 0 and run.stdout.strip() == "ok"
    assert not run.timed_out and run.wall_s < 5  # returns when the child exits, not when its pipes close
    assert our_groups() == []


@needs_cgroup
def test_a_non_positive_limit_is_refused():
    with pytest.raises(cgroup.CgroupError, match="positive"):
        cgroup.run_limited(python("pass"), 0, drop_caches=False)


def test_counters_are_read_from_v1_and_v2_files(tmp_path):
    """The files each version's kernel writes, as they look (no cgroup needed)."""
    v1, v2 = tmp_path / "v1", tmp_path / "v2"
    v1.mkdir(), v2.mkdir()
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 2\n")
    (v1 / "memory.max_usage_in_bytes").write_text("104857600\n")
    (v2 / "memory.events").write_text("low 0\nhigh 0\nmax 17\noom 1\noom_kill 1\noom_group_kill 0\n")
    (v2 / "memory.peak").write_text("52428800\n")
    assert cgroup.read_oom_kills(v1, 1) == 2 and cgroup.read_peak_bytes(v1, 1) == 100 * MiB
    assert cgroup.read_oom_kills(v2, 2) == 1 and cgroup.read_peak_bytes(v2, 2) == 50 * MiB
    (v2 / "memory.peak").unlink()  # Linux < 5.19
    (v1 / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\n")  # Linux < 4.13
    assert cgroup.read_peak_bytes(v2, 2) is None and cgroup.read_oom_kills(v1, 1) is None


def test_proc_read_bytes_is_a_count():
    assert cgroup.proc_read_bytes() >= 0
    assert cgroup.proc_read_bytes(os.getpid()) >= 0


@pytest.mark.slow  # empties the whole machine's page cache: other work on the machine runs cold after it
@pytest.mark.skipif(os.geteuid() != 0, reason="drop_caches needs root")
def test_drop_caches_makes_the_next_read_cold(tmp_path):
    path = tmp_path / "blob"
    write_random(path, 32 * MiB)
    path.read_bytes()  # cached now
    cgroup.drop_caches()
    code = ("import sys; from bench.cgroup import proc_read_bytes\n"
            "open(sys.argv[1], 'rb').read(); print(proc_read_bytes())")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True)
    assert int(out.stdout) >= 32 * MiB
