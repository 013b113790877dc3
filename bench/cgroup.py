"""Run a benchmark child under a memory cap that covers the whole process, page cache included.

A DRAM cap measured as RSS would let a runtime cheat: llama.cpp memory-maps the model and
lets the kernel keep every page it touched in the page cache, which RSS counts only while
mapped and only partly. A memory cgroup charges a page to the group that faulted it in,
whether anonymous memory or file cache, so the cap holds for every runtime alike: the
kernel reclaims the group's cache when it reaches the limit and OOM-kills the group when
nothing is left to reclaim.

    support, reason = cgroup_support()       # (1 | 2 | None, why not)
    run = run_limited([sys.executable, "-m", "bench.llamacpp", ...], 2 * 2**30)
    run.returncode, run.peak_bytes, run.oom_killed, json.loads(run.stdout)

Each run gets a fresh cgroup (a unique name) with `limit_bytes`; swap is capped too
(cgroup v1 `memory.memsw.limit_in_bytes` = the limit, v2 `memory.swap.max` = 0), so the
child cannot page out around the cap. The child joins the group before it execs: a
`/bin/sh` wrapper writes its own pid into `cgroup.procs` and then execs the command
(unlike a `preexec_fn`, safe when the parent has threads). Whatever happens, every process
left in the group is killed and the group removed afterwards.

Reported (read before the group is removed):
  peak_bytes  v1 `memory.max_usage_in_bytes`; v2 `memory.peak` (Linux 5.19+), else the
              largest `memory.current` sampled every 20 ms (may miss a short spike).
  oom_killed  v1 `oom_kill` of `memory.oom_control` (Linux 4.13+), else "killed by SIGKILL
              after usage reached the limit"; v2 `oom_kill` of `memory.events`.
              Not `memory.failcnt` > 0 alone: reclaiming page cache at the limit raises it
              too, which is the cap working, not an OOM.

Start every capped run cold. A page already in the page cache stays charged to the group
that first read it (its parent once that group is gone), v1 and v2 alike: a warm run maps
the model's cached pages without being charged for them, so the cap does not hold it
(measured: llama.cpp on a 630 MB GGUF peaks at 650 MiB in its group cold, 45 MiB warm).
`drop_caches()` (sync, then `echo 3 > /proc/sys/vm/drop_caches`, root; run_limited's
default) empties the page cache of the whole machine so a model is really read from disk;
`evict_from_page_cache(path)` does it for one file (posix_fadvise, no root needed).
`proc_read_bytes()` is the common meter every runtime's child reports at exit:
`read_bytes` of /proc/self/io, the bytes this process caused to be fetched from storage
(page-cache hits do not count, O_DIRECT reads and mmap faults do).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from storage.errors import FlashinferError

PEAK_SAMPLE_S = 0.02  # memory.current polling period where memory.peak is missing (v2 < 5.19)
# The wrapper that puts the child in the group before exec: $0 is the cgroup.procs path.
JOIN_AND_EXEC = 'echo $$ > "$0" || exit 125; exec "$@"'
JOIN_FAILED = 125  # the wrapper's exit code when it could not join the group


class CgroupError(FlashinferError):
    """No usable memory cgroup, or a cgroup file that cannot be written."""


@dataclass(frozen=True)
class LimitedRun:
    argv: list[str]
    returncode: int  # negative: killed by that signal (-9 for an OOM kill or a timeout)
    stdout: str
    stderr: str
    wall_s: float
    peak_bytes: int | None  # peak memory charged to the group (anonymous + page cache)
    oom_killed: bool
    timed_out: bool
    limit_bytes: int
    cgroup_version: int


# ---- finding the memory cgroup hierarchy ----------------------------------------------

@dataclass(frozen=True)
class _Hierarchy:
    version: int
    parent: Path  # where our groups are made


def _mounts() -> list[tuple[str, str, list[str]]]:
    """(mount point, fs type, options) of every cgroup file system."""
    found = []
    with open("/proc/self/mounts") as f:
        for line in f:
            _, point, fstype, options, *_ = line.split()
            if fstype in ("cgroup", "cgroup2"):
                found.append((point.replace("\\040", " "), fstype, options.split(",")))
    return found


def _own_cgroup(version: int) -> str:
    """This process's cgroup path in the v1 memory hierarchy or the v2 unified one."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if (version == 1 and "memory" in controllers.split(",")) or (version == 2 and controllers == ""):
                return path
    return "/"


def _v2_memory_enabled(group: Path) -> bool:
    """True if children of `group` get the memory controller, enabling it if we may."""
    control = group / "cgroup.subtree_control"
    try:
        if "memory" in control.read_text().split():
            return True
        control.write_text("+memory")  # EBUSY for a non-root group with processes of its own
        return True
    except OSError:
        return False


def _find_hierarchy() -> tuple[_Hierarchy | None, str]:
    try:
        mounts = _mounts()
    except OSError as e:
        return None, f"cannot read /proc/self/mounts ({e})"
    for point, fstype, options in mounts:
        if fstype == "cgroup" and "memory" in options:
            # Inside our own group, so the sandbox that holds us also holds the children.
            own = Path(point) / _own_cgroup(1).lstrip("/")
            return _Hierarchy(1, own if own.is_dir() else Path(point)), ""
    for point, fstype, _ in mounts:
        if fstype == "cgroup2":
            root = Path(point)
            if "memory" not in (root / "cgroup.controllers").read_text().split():
                return None, f"cgroup v2 at {root} has no memory controller"
            own = root / _own_cgroup(2).lstrip("/")
            for parent in dict.fromkeys((own, root)):  # v2: no processes in a group with children
                if parent.is_dir() and _v2_memory_enabled(parent):
                    return _Hierarchy(2, parent), ""
            return None, (f"cgroup v2: cannot enable the memory controller for children of {own} "
                          f"or {root} (a group with processes of its own cannot delegate it)")
    return None, "no cgroup file system with a memory controller is mounted"


class _Group:
    """One fresh memory cgroup with a limit; remove() kills what is left in it and deletes it."""

    def __init__(self, hierarchy: _Hierarchy, limit_bytes: int):
        self.version = hierarchy.version
        self.path = hierarchy.parent / f"flashinfer-bench-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            self.path.mkdir()
        except OSError as e:
            raise CgroupError(f"cannot create the memory cgroup {self.path}: {e.strerror} "
                              "(memory caps need root and a writable cgroup hierarchy)") from None
        try:
            if self.version == 1:
                self._write("memory.limit_in_bytes", limit_bytes)
                if (self.path / "memory.memsw.limit_in_bytes").exists():  # memory + swap: no paging around the cap
                    self._write("memory.memsw.limit_in_bytes", limit_bytes)
            else:
                self._write("memory.max", limit_bytes)
                if (self.path / "memory.swap.max").exists():
                    self._write("memory.swap.max", 0)
        except BaseException:
            self.remove()
            raise

    def _write(self, name: str, value: int) -> None:
        try:
            (self.path / name).write_text(str(value))
        except OSError as e:
            raise CgroupError(f"cannot write {value} to {self.path / name}: {e.strerror}") from None

    def _read(self, name: str) -> str | None:
        try:
            return (self.path / name).read_text()
        except OSError:
            return None

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def current_bytes(self) -> int | None:
        text = self._read("memory.usage_in_bytes" if self.version == 1 else "memory.current")
        return int(text) if text else None

    def peak_bytes(self) -> int | None:
        return read_peak_bytes(self.path, self.version)

    def oom_kills(self) -> int | None:
        return read_oom_kills(self.path, self.version)

    def pids(self) -> list[int]:
        text = self._read("cgroup.procs")
        return [int(p) for p in text.split()] if text else []

    def kill_all(self) -> None:
        if self.version == 2 and (self.path / "cgroup.kill").exists():
            self._write("cgroup.kill", 1)
            return
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        """Kill every process still in the group and delete it (retrying while they die)."""
        deadline = time.monotonic() + 5.0
        while True:
            try:
                self.kill_all()
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as e:  # EBUSY until the killed processes are gone
                if time.monotonic() > deadline:
                    raise CgroupError(f"cannot remove the memory cgroup {self.path}: {e.strerror} "
                                      f"(processes left: {self.pids()})") from None
                time.sleep(0.01)


def _keyed_counter(text: str | None, key: str) -> int | None:
    """The value of `key N` in a flat keyed file (memory.events, memory.oom_control)."""
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key:
            return int(value)
    return None


def read_oom_kills(group: Path, version: int) -> int | None:
    """How many processes the kernel OOM-killed in `group`; None where the kernel does not say."""
    name = "memory.oom_control" if version == 1 else "memory.events"
    try:
        return _keyed_counter((group / name).read_text(), "oom_kill")
    except OSError:
        return None


def read_peak_bytes(group: Path, version: int) -> int | None:
    """The group's peak memory (anonymous + page cache); None where the kernel keeps none."""
    try:
        return int((group / ("memory.max_usage_in_bytes" if version == 1 else "memory.peak")).read_text())
    except (OSError, ValueError):
        return None


# ---- public API ------------------------------------------------------------------------

def cgroup_support() -> tuple[int | None, str]:
    """(1 or 2, "") if run_limited can work here, else (None, the reason): tests skip with it.

    Creates and removes a probe group, so a read-only or undelegated hierarchy says so here."""
    hierarchy, reason = _find_hierarchy()
    if hierarchy is None:
        return None, reason
    try:
        _Group(hierarchy, 1 << 30).remove()
    except CgroupError as e:
        return None, str(e)
    return hierarchy.version, ""


def drop_caches() -> None:
    """Write dirty pages out and empty the machine's page cache, so the next read is cold."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError as e:
        raise CgroupError(f"cannot drop the page cache (/proc/sys/vm/drop_caches: {e.strerror}); "
                          "it needs root. Run as root, or pass drop_caches=False and evict the model "
                          "files with evict_from_page_cache(path)") from None


_drop_machine_page_cache = drop_caches  # run_limited's argument of the same name hides it


def evict_from_page_cache(path: str | os.PathLike) -> None:
    """Drop one file's pages from the page cache (written out first, so none are dirty)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fdatasync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def proc_read_bytes(pid: int | str = "self") -> int:
    """`read_bytes` of /proc/PID/io: bytes this process had fetched from storage so far."""
    with open(f"/proc/{pid}/io") as f:
        for line in f:
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    raise CgroupError(f"/proc/{pid}/io has no read_bytes line (kernel without task I/O accounting)")


def run_limited(argv: list[str], limit_bytes: int, *, drop_caches: bool = True, timeout: float | None = None,
                env: dict[str, str] | None = None, cwd: str | os.PathLike | None = None) -> LimitedRun:
    """Run `argv` to completion in a fresh memory cgroup capped at `limit_bytes`, page cache included.

    stdout and stderr are captured as text. With `drop_caches` the machine's page cache is
    emptied first (root). A run past `timeout` seconds is killed (`timed_out`)."""
    if limit_bytes <= 0:
        raise CgroupError(f"the memory limit must be a positive number of bytes, got {limit_bytes}")
    hierarchy, reason = _find_hierarchy()
    if hierarchy is None:
        raise CgroupError(f"cannot cap memory: {reason}")
    if drop_caches:
        _drop_machine_page_cache()
    group = _Group(hierarchy, limit_bytes)
    try:
        sampled_peak = [0]
        stop_sampling = threading.Event()
        sampler = None
        if group.peak_bytes() is None:  # v2 before Linux 5.19: poll memory.current
            def sample() -> None:
                while not stop_sampling.wait(PEAK_SAMPLE_S):
                    sampled_peak[0] = max(sampled_peak[0], group.current_bytes() or 0)
            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
        t0 = time.perf_counter()
        proc = subprocess.Popen(["/bin/sh", "-c", JOIN_AND_EXEC, str(group.procs_file), *argv],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        # Read the pipes in threads and wait for the child itself, not for EOF: a grandchild
        # left running holds the pipes open, and is killed with the group below.
        outputs = {}
        readers = [threading.Thread(target=lambda k=k, f=f: outputs.__setitem__(k, f.read()), daemon=True)
                   for k, f in (("stdout", proc.stdout), ("stderr", proc.stderr))]
        for reader in readers:
            reader.start()
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            proc.kill()  # the wrapper, in case it had not joined the group yet
            proc.wait()
        wall_s = time.perf_counter() - t0
        group.kill_all()
        for reader in readers:
            reader.join()
        proc.stdout.close()
        proc.stderr.close()
        stdout, stderr = outputs["stdout"], outputs["stderr"]
        if sampler is not None:
            stop_sampling.set()
            sampler.join()
        if proc.returncode == JOIN_FAILED and "cgroup.procs" in stderr:
            raise CgroupError(f"the child could not join {group.path}: {stderr.strip()}")
        peak = group.peak_bytes()
        if peak is None and sampler is not None:
            peak = sampled_peak[0] or None
        oom_kills = group.oom_kills()
        if oom_kills is None:  # v1 before Linux 4.13: SIGKILLed with the group at its limit
            oom_killed = proc.returncode == -signal.SIGKILL and not timed_out and (peak or 0) >= limit_bytes
        else:
            oom_killed = oom_kills > 0
        return LimitedRun(argv=list(argv), returncode=proc.returncode, stdout=stdout, stderr=stderr,
                          wall_s=wall_s, peak_bytes=peak, oom_killed=oom_killed, timed_out=timed_out,
                          limit_bytes=limit_bytes, cgroup_version=group.version)
    finally:
        group.remove()
