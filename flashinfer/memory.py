"""The DRAM budget planner: `--dram 2GB` is a cap for the whole process.

Before the first token the planner sizes every part from the store and the settings —
the Python + numba runtime (measured: the process's RSS when planning starts), resident
weights (memory-mapped, they count once touched), the KV cache (from ctx), scratch
activations, the reader's staging buffers, the predictor, and, with what is left, the
neuron caches (an equal share of rows per layer, capped at the layer's size); on the dense
path, as many whole FFN layers as fit stay resident after their first read (the rest stream
from flash every token). It refuses
a configuration that cannot fit and says what would (a shorter context, a lower-bit
store, a larger cap). After generation, the process's peak RSS is compared with the cap.

Not counted: JIT compilation (LLVM peaks near 550 MB). A capped run compiles its kernels in a
child process before it plans (flashinfer/precompile.py), once per configuration; the parent
loads the machine code from numba's on-disk cache (`@njit(cache=True)`).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass, field

import numpy as np
import psutil

from flashinfer.config import ModelArgs
from flashinfer.kernels.attention import KV_DTYPES, kv_q8_block
from flashinfer.errors import FlashinferError
from flashinfer.read_ahead import SLOTS
from storage.format import layer_extent

# Rows of an Engine.logits result the plan holds ([rows, vocab] float32); a longer result under a
# cap is refused unless the caller passes its own buffer (Engine.logits(out=...))
LOGITS_PLAN_ROWS = 64
RUNTIME_HEADROOM = 64 * 2**20  # allocator slack, numba's per-call temporaries, Python objects made while running
# The machine code of the kernels, loaded from numba's cache by the warm-up, after the runtime is
# measured: 55 MB (sparse path) and 77 MB (dense path, with its one-call blocks) of RSS on the
# tiny model (2026-12-07), the same kernels at any size. Uncounted, it ate the headroom: the 7B
# under 2 GB peaked 31-57 MiB over its plan, and in a 2 GB cgroup the kernel then evicted clean
# file pages (the libraries' code) and faulted them back every token: 240 ms of a 1.8 s token.
COMPILED_KERNELS_BYTES = 80 * 2**20
# With no calibrated share (oracle), a sparse cache smaller than this share of a layer is refused.
# With one, REQUIRED_MARGIN x the share decides alone: this floor predates the overflow that keeps
# a cache's hits (sparse_ffn.py), and it refused the 7B's mass-recall predictor (11.7% a token)
# at ctx 2048 under 2 GB with room for 13.6% caches (2026-12-07).
MIN_CACHE_SHARE = 0.15
# Cache rows per predicted-active neuron (the calibration's largest per-layer share per token).
# Below REQUIRED_MARGIN most of a token's own selection streams through the overflow scratch
# every token (sparse_ffn.py) and the cache buys little: refused. Between it and ADVISED_MARGIN
# the run goes ahead with a warning: the window keeps little of earlier tokens, the hit rate
# drops and more is read per token. (1.1 until the overflow stopped emptying the cache.)
REQUIRED_MARGIN = 0.75
ADVISED_MARGIN = 1.5


class BudgetError(FlashinferError):
    """The DRAM cap cannot hold this configuration."""


@dataclass
class MemoryPlan:
    cap_bytes: int
    runtime_bytes: int
    resident_bytes: int
    kv_bytes: int
    scratch_bytes: int
    io_bytes: int
    predictor_bytes: int
    logits_bytes: int = 0  # an Engine.logits result of LOGITS_PLAN_ROWS rows
    cache_bytes: int = 0
    capacities: list[int] = field(default_factory=list)  # neuron-cache rows per layer
    warning: str | None = None  # a plan that runs but below the advised cache size says so
    # dense path: the FFN layers kept in DRAM after their first read, and their bytes
    resident_layers: list[int] = field(default_factory=list)
    ffn_resident_bytes: int = 0
    n_layers: int = 0
    kv_cache: str = "f16"  # the KV cache's element type (KV_ELEMENT_BYTES)
    resident_quant: str | None = None  # the store's resident scheme (its manifest's quant["resident"])

    @property
    def total_bytes(self) -> int:
        return (self.runtime_bytes + COMPILED_KERNELS_BYTES + self.resident_bytes + self.kv_bytes
                + self.scratch_bytes + self.io_bytes + self.predictor_bytes + self.logits_bytes + self.cache_bytes
                + self.ffn_resident_bytes + RUNTIME_HEADROOM)

    def table(self) -> str:
        rows = [("python + numba runtime (measured)", self.runtime_bytes),
                ("compiled kernels (loaded at warm-up)", COMPILED_KERNELS_BYTES), ("resident weights", self.resident_bytes),
                (f"KV cache ({self.kv_cache})", self.kv_bytes), ("activations scratch", self.scratch_bytes),
                ("flash read buffers", self.io_bytes), ("predictor", self.predictor_bytes),
                (f"logits() result ({LOGITS_PLAN_ROWS} rows)", self.logits_bytes),
                ("neuron caches", self.cache_bytes),
                (f"FFN resident ({len(self.resident_layers)} of {self.n_layers} layers)", self.ffn_resident_bytes),
                ("headroom", RUNTIME_HEADROOM)]
        lines = [f"  {name:36} {b / 2**20:9.1f} MiB" for name, b in rows]
        lines.append(f"  {'total':36} {self.total_bytes / 2**20:9.1f} MiB of {self.cap_bytes / 2**20:.1f} MiB cap")
        if self.capacities:
            lines.append(f"  cache rows per layer: {min(self.capacities)}..{max(self.capacities)}")
        if self.warning:
            lines.append(f"  warning: {self.warning}")
        return "DRAM plan:\n" + "\n".join(lines)


KV_ELEMENT_BYTES = {name: np.dtype(dtype).itemsize for name, dtype in KV_DTYPES.items()}
SMALLER_KV_CACHES = {"f32": ("f16", "q8"), "f16": ("q8",), "q8": ()}  # in the order a refusal suggests them
NEURON_MAP_BYTES = 4 + 8 + 8 + 1  # a neuron cache's per-neuron arrays (cache.NeuronCache; tested equal)
FOUR_BIT_SCHEMES = ("q4", "q4a", "q4k")  # a store resident in these has no lower-bit store to suggest


def kv_cache_bytes(args: ModelArgs, ctx: int, kv_cache: str = "f16") -> int:
    """Keys and values of every layer for ctx positions, in the KV cache's element type (q8: its
    codes and a float32 scale per kv_q8_block channels)."""
    per_position = args.kv_dim * KV_ELEMENT_BYTES[kv_cache]
    if kv_cache == "q8":
        per_position += 4 * (args.kv_dim // kv_q8_block(args.head_dim))
    return 2 * args.n_layers * ctx * per_position


def resident_in_dram_bytes(manifest, ctx: int) -> int:
    """Resident weights a run of `ctx` tokens brings into DRAM: every tensor in full except the
    lookup tables (embeddings, learned positions; storage.format.lookup_tables), mapped with
    no read-around, of which each distinct token touches a page of its row's data and one of
    its scales (q8/q4 store them apart)."""
    from storage.format import PAGE, lookup_tables

    total = manifest.resident_bytes
    resident = getattr(manifest, "resident", {})
    for name in lookup_tables(resident):
        t = resident[name]
        rows = t.shape[0]
        per_row = PAGE * (2 + (t.nbytes // rows) // PAGE)  # pages one row can straddle, data and scales
        total -= t.nbytes - min(t.nbytes, min(ctx, rows) * per_row)
    return total


def plan_memory(cap_bytes: int, args: ModelArgs, manifest, ctx: int, *, sparse: bool, predictor_bytes: int,
                io_buffer_bytes: int, scratch_bytes: int, sparse_share: float | None = None,
                runtime_bytes: int | None = None, stream_ffn: bool = False, kv_cache: str = "f16") -> MemoryPlan:
    """Size everything under `cap_bytes`. `sparse_share`: the mean share of a layer's neurons
    the predictor selects per token (from calibration) — the cache must hold well over that.
    `runtime_bytes`: what the process holds before the model (default: its RSS now).
    `stream_ffn`: the dense path keeps no FFN layer resident (the naive baseline).
    `kv_cache`: the KV cache's element type ("f16" or "f32")."""
    runtime = psutil.Process().memory_info().rss if runtime_bytes is None else runtime_bytes
    layers = manifest.ffn_layers
    # the dense path streams each layer through a layer-sized buffer, two when it reads the next
    # layer while one computes (flash_ffn.FlashFFN's read_ahead; the naive stream_ffn waits for
    # each read); the sparse path reads straight into the neuron caches' free rows
    # (NeuronCache.free_rows), so it needs none
    layer_buffer = 0 if sparse else max(ffn_layer_bytes(spec) for spec in layers) * (1 if stream_ffn else SLOTS)
    plan = MemoryPlan(cap_bytes=cap_bytes, runtime_bytes=runtime, resident_bytes=resident_in_dram_bytes(manifest, ctx),
                      kv_bytes=kv_cache_bytes(args, ctx, kv_cache), scratch_bytes=scratch_bytes,
                      io_bytes=io_buffer_bytes + layer_buffer, predictor_bytes=predictor_bytes, kv_cache=kv_cache,
                      logits_bytes=LOGITS_PLAN_ROWS * args.vocab_size * 4,
                      resident_quant=(getattr(manifest, "quant", None) or {}).get("resident"))
    plan.n_layers = len(layers)
    left = cap_bytes - plan.total_bytes
    if not sparse:
        if left < 0:
            raise BudgetError(_refusal(plan, args, ctx, -left))
        ffn_bytes = [ffn_layer_bytes(spec) for spec in layers]
        if stream_ffn:
            return plan
        if sum(ffn_bytes) <= left + layer_buffer:  # everything resident: no streaming buffer at all
            plan.io_bytes -= layer_buffer
            plan.resident_layers = list(range(len(layers)))
        else:
            plan.resident_layers = resident_layers_within(layers, left)
        plan.ffn_resident_bytes = sum(ffn_bytes[i] for i in plan.resident_layers)
        return plan
    per_row = [spec.bundle_bytes + 4 for spec in layers]  # + row_to_id
    # per neuron (cache.NeuronCache): id_to_row int32, last_active and counts int64, pinned
    fixed_maps = sum(spec.n_neurons * NEURON_MAP_BYTES for spec in layers)
    all_rows_bytes = sum(spec.n_neurons * r for spec, r in zip(layers, per_row))
    budget = left - fixed_maps
    share = budget / all_rows_bytes
    needed = min(1.0, REQUIRED_MARGIN * sparse_share) if sparse_share else MIN_CACHE_SHARE
    if share < needed:
        short = int(needed * all_rows_bytes) - budget
        raise BudgetError(_refusal(plan, args, ctx, short, cache_share=needed))
    advised = min(1.0, ADVISED_MARGIN * (sparse_share or 0.0))
    if share < advised:
        more = int(advised * all_rows_bytes) - budget
        plan.warning = (f"neuron caches of {share:.0%} of each layer hold {share / sparse_share:.1f}x a token's "
                        f"selection ({sparse_share:.0%}); the window keeps little, expect a low hit rate "
                        f"(--dram {(cap_bytes + more) / 1e9 + 0.05:.2f}GB would give the advised {advised:.0%})")
    plan.capacities = [min(spec.n_neurons, int(spec.n_neurons * share)) for spec in layers]
    plan.cache_bytes = sum(c * r for c, r in zip(plan.capacities, per_row)) + fixed_maps
    return plan


def ffn_layer_bytes(spec) -> int:
    """The bundles and whole matrices of one FFN layer (a manifest FFNLayer), as they lie in its
    file: what it takes resident or streamed (storage.format.layer_extent)."""
    return layer_extent(spec)


def resident_layers_within(layers, budget_bytes: int) -> list[int]:
    """The FFN layers (manifest FFNLayers, from the first) whose bundles fit together in budget_bytes."""
    chosen, used = [], 0
    for i, n in enumerate(ffn_layer_bytes(spec) for spec in layers):
        if used + n > budget_bytes:
            break
        chosen.append(i)
        used += n
    return chosen


def dense_resident_layers(layers, plan) -> list[int]:
    """The FFN layers the dense path keeps resident: the memory plan's under a cap (plan not
    None), else those that fit in what the machine has free (free_memory_budget)."""
    return plan.resident_layers if plan is not None else resident_layers_within(layers, free_memory_budget())


# With no --dram, a dense run keeps FFN layers resident in what the machine has free, less
# this much for everything else on it (and the page cache the store's reads go through).
FREE_MEMORY_RESERVE = 1 << 30


def free_memory_budget() -> int:
    """Bytes a run with no cap may keep resident: available memory less FREE_MEMORY_RESERVE."""
    return max(0, psutil.virtual_memory().available - FREE_MEMORY_RESERVE)


def _refusal(plan: MemoryPlan, args: ModelArgs, ctx: int, short_bytes: int, cache_share: float | None = None) -> str:
    what = f"neuron caches of {cache_share:.0%} of each layer" if cache_share else "the dense path"
    hints = []
    for smaller in SMALLER_KV_CACHES[plan.kv_cache]:  # the first that would make up the shortfall
        if plan.kv_bytes - kv_cache_bytes(args, ctx, smaller) >= short_bytes:
            hints.append(f"--kv-cache {smaller}")
            break
    if plan.kv_bytes > short_bytes:
        per_token = kv_cache_bytes(args, 1, plan.kv_cache)
        hints.append(f"--ctx {max(16, ctx - -(-short_bytes // per_token))}")
    hints.append(f"--dram {(plan.cap_bytes + short_bytes) / 1e9 + 0.05:.2f}GB")
    if plan.resident_bytes > short_bytes and plan.resident_quant not in FOUR_BIT_SCHEMES:
        hints.append("a store with lower-bit resident weights (flashinfer convert --resident-quant q4)")
    return (f"a DRAM cap of {plan.cap_bytes / 1e6:.0f} MB cannot hold this model with {what}: "
            f"{short_bytes / 1e6:.0f} MB short. Would fit: {' or '.join(hints)}.\n{plan.table()}")


def release_freed_heap() -> None:
    """Return the C heap's freed memory to the OS (glibc's malloc_trim; elsewhere nothing).
    Laying the resident matrices out (weights.interleave_rows) frees temporaries of each matrix
    that stay in the heap's RSS: 50 MB on the Mistral-7B shape at q4, measured 2026-12-07
    (1170 -> 1121 MiB before its warm-up), which no plan line holds."""
    import ctypes

    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return
    trim(0)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far.

    Linux: VmHWM of /proc/self/status, the high-water mark of this program's own memory.
    Not ru_maxrss: that survives exec, so a child started by a big parent (a pytest run at
    550 MB) reports the parent's size as its own peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux, bytes on macOS
