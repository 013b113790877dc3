"""Kernels, numba parallel=True vs serial, ratios in one run:
- dense matmul for every store scheme (f32, f16, q8, q4), decode (1 token) and prefill
  (16 tokens), Llama-7B FFN shape [11008, 4096];
- the sparse FFN over cached bundle rows (ffn_rows vs ffn_rows_parallel), Mistral-7B
  bundles (gated, dim 4096), 10% and 30% of a layer's 14336 neurons resident, ReLU with
  90% of the rows inactive.

    python -m bench.kernels
    python -m bench.kernels --against HEAD~1   # the same cases, this tree's kernels vs a git revision's
    python -m bench.kernels --against HEAD~1 --store out/models/smollm2-auto   # a real store's decode token
    python -m bench.kernels --store out/models/smollm2-auto --plain   # its matrices plain vs as the engine lays them out

`--against REV` loads the kernels as they were at REV (flashinfer/kernels.py, or the
flashinfer/kernels/ package from its split on) into the same process and times both on the
same operands, alternating, so a change to a kernel is measured as a ratio on a noisy shared
machine.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import tempfile
import types
import time
from pathlib import Path

import numpy as np

from bench.machine import machine_line
from flashinfer import kernels as K
from flashinfer.weights import NO_SCALES
from storage import quant

REPEATS = 5


def best_seconds(fn, *args) -> float:
    fn(*args)  # compile / warm
    times = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", metavar="REV", help="compare with flashinfer/kernels.py at this git revision")
    parser.add_argument("--store", metavar="STORE", help="with --against: only a decode token of STORE's blocks "
                        "(resident, one compiled call each) and its head, REV's kernels vs this tree's")
    parser.add_argument("--plain", action="store_true", help="with --store (no --against): a decode token of STORE "
                        "with its matrices plain vs laid out as the engine lays them out (rows in lanes), this tree's kernels")
    opts = parser.parse_args()
    if opts.store and not (opts.against or opts.plain):
        parser.error("--store needs --against REV or --plain")
    if opts.plain:
        if not opts.store or opts.against:
            parser.error("--plain goes with --store and without --against")
        store_layouts(opts.store)
    elif opts.store:
        store_decode_against(opts.against, opts.store)
    elif opts.against:
        compare_against(opts.against)
    else:
        serial_vs_parallel()


def kernels_at(rev: str):
    """The kernels as of git revision `rev`, imported as a module (or package) of its own name.
    The package's modules import each other relatively, so its copy is self-contained."""
    root = Path(__file__).resolve().parent.parent
    name = "kernels_" + "".join(c if c.isalnum() else "_" for c in rev)
    tmp = Path(tempfile.mkdtemp(prefix="kernels-"))
    tree = subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", rev, "flashinfer/"], capture_output=True,
                          text=True, check=True).stdout.split()
    if "flashinfer/kernels.py" in tree:
        path = tmp / f"{name}.py"
        path.write_text(_git_show(root, rev, "flashinfer/kernels.py"))
        spec = importlib.util.spec_from_file_location(name, path)
    else:
        package = tmp / name
        package.mkdir()
        files = subprocess.run(["git", "-C", str(root), "ls-tree", "--name-only", rev, "flashinfer/kernels/"],
                               capture_output=True, text=True, check=True).stdout.split()
        for file in files:
            if file.endswith(".py"):
                (package / Path(file).name).write_text(_git_show(root, rev, file))
        spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                      submodule_search_locations=[str(package)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def layout_at(rev: str):
    """weights.interleave_rows as of `rev` (the identity where it had none), run against this
    tree's other modules: the layout REV's kernels take, for --against."""
    source = _git_show(Path(__file__).resolve().parent.parent, rev, "flashinfer/weights.py")
    if "def interleave_rows" not in source:
        return lambda m: m
    module = types.ModuleType("weights_" + "".join(c if c.isalnum() else "_" for c in rev))
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:flashinfer/weights.py", "exec"), module.__dict__)
    return module.interleave_rows


def _git_show(root: Path, rev: str, path: str) -> str:
    return subprocess.run(["git", "-C", str(root), "show", f"{rev}:{path}"], capture_output=True, text=True,
                          check=True).stdout


def best_pair(old, new, old_args, new_args, repeats: int = 7) -> tuple[float, float]:
    """Best-of times of two functions, alternating so both see the same machine load."""
    old(*old_args), new(*new_args)
    t_old, t_new = [], []
    for _ in range(repeats):
        for fn, args, times in ((old, old_args, t_old), (new, new_args, t_new)):
            t0 = time.perf_counter()
            fn(*args)
            times.append(time.perf_counter() - t0)
    return min(t_old), min(t_new)


def compare_against(rev: str) -> None:
    old_k = kernels_at(rev)
    rng = np.random.default_rng(0)
    print(f"command: python -m bench.kernels --against {rev}")
    print("machine:", machine_line())
    print(f"matmul [11008, 4096]: {rev} vs this tree")
    print(f"{'weights':8} {'tokens':>6} {'kernel':>14} {rev + ' ms':>12} {'now ms':>9} {'speedup':>8} {'now GB/s':>9}")
    for dtype in ("f32", "f16", "q8", "q4"):
        qt = quant.quantize(rng.standard_normal((11008, 4096), dtype=np.float32), dtype, 32)
        data = qt.data.view(np.uint16) if dtype == "f16" else qt.data
        scales = qt.scales.view(np.uint16) if qt.scales is not None else NO_SCALES
        nbytes = data.nbytes + scales.nbytes
        for n_tokens in (1, 16):
            x = rng.standard_normal((n_tokens, 4096)).astype(np.float32)
            args = (x, data, scales, NO_SCALES, 32, np.zeros(0, np.float32), np.empty((n_tokens, 11008), np.float32))
            for name in ("matmul_serial", "matmul"):
                t_old, t_new = best_pair(getattr(old_k, name), getattr(K, name), args, args)
                print(f"{dtype:8} {n_tokens:>6} {name:>14} {t_old * 1e3:>12.2f} {t_new * 1e3:>9.2f} "
                      f"{t_old / t_new:>7.2f}x {nbytes / t_new / 1e9:>9.1f}")
    print(f"\nsmall matmuls (SmolLM2-135M's: dim 576), one token, serial: {rev} vs this tree")
    for scheme in ("q8", "q4", "q4a"):
        for n_rows in (576, 1536):
            qt = quant.quantize(rng.standard_normal((n_rows, 576), dtype=np.float32), scheme, 32)
            mins = qt.mins.view(np.uint16) if qt.mins is not None else NO_SCALES
            x = rng.standard_normal((1, 576)).astype(np.float32)
            args = (x, qt.data, qt.scales.view(np.uint16), mins, 32, np.zeros(0, np.float32),
                    np.empty((1, n_rows), np.float32))
            t_old, t_new = best_pair(old_k.matmul_serial, K.matmul_serial, args, args, repeats=41)
            nbytes = qt.data.nbytes + qt.scales.nbytes + (qt.mins.nbytes if qt.mins is not None else 0)
            print(f"{scheme + ' [' + str(n_rows) + ', 576]':34} {1:>6} {t_old * 1e3:>12.3f} {t_new * 1e3:>9.3f} "
                  f"{t_old / t_new:>7.2f}x {nbytes / t_new / 1e9:>9.1f}")
    print(f"\nmatmuls streamed from DRAM, one token (distinct matrices, as a model's layers are): {rev} vs this tree")
    print(f"{'case':34} {'kernel':>14} {rev + ' ms':>12} {'now ms':>9} {'speedup':>8} {'now GB/s':>9}")
    for label, matrices, x, n_bytes in streamed_matmuls(rng):
        out = np.empty((1, matrices[0][0].shape[0]), np.float32)
        for name in ("matmul_serial", "matmul"):
            def run_all(fn):
                for data, scales, mins in matrices:
                    fn(x, data, scales, mins, 32, np.zeros(0, np.float32), out)
            t_old, t_new = best_pair(lambda: run_all(getattr(old_k, name)), lambda: run_all(getattr(K, name)), (), (),
                                     repeats=11)
            print(f"{label:34} {name:>14} {t_old * 1e3:>12.2f} {t_new * 1e3:>9.2f} {t_old / t_new:>7.2f}x "
                  f"{n_bytes / t_new / 1e9:>9.1f}")
    print(f"\nFFN over bundle rows (ffn_rows, serial): {rev} vs this tree")
    print(f"{'case':34} {'tokens':>6} {rev + ' ms':>12} {'now ms':>9} {'speedup':>8} {'now GB/s':>9}")
    for label, operands, n_bytes in ffn_shapes(rng):
        t_old, t_new = best_pair(old_k.ffn_rows, K.ffn_rows, operands, operands)
        print(f"{label:34} {operands[0].shape[0]:>6} {t_old * 1e3:>12.2f} {t_new * 1e3:>9.2f} {t_old / t_new:>7.2f}x "
              f"{n_bytes / t_new / 1e9:>9.1f}")
    print("\nmatmul over a strided component of bundles (the neuron cache's gate rows), serial")
    for label, operands, n_bytes in strided_matmuls(rng):
        t_old, t_new = best_pair(old_k.matmul_serial, K.matmul_serial, operands, operands)
        print(f"{label:34} {operands[0].shape[0]:>6} {t_old * 1e3:>12.2f} {t_new * 1e3:>9.2f} {t_old / t_new:>7.2f}x "
              f"{n_bytes / t_new / 1e9:>9.1f}")


def store_decode_against(rev: str, store: str, repeats: int = 15, contexts: tuple[int, ...] = (16, 200, 1000)) -> None:
    """A decode token of a real store, REV's kernels vs this tree's on the same operands, alternating:
    every block's decode_layer (the one compiled call a resident block takes) after a prompt of
    each of `contexts` tokens, then the final norm and the head; each pass streams the model's
    weights from DRAM as a token does. Python around the calls (sampling, the engine loop) is
    left out; one line more says what numba's dispatcher costs a token's blocks. Where REV's
    kernels do not compute this tree's products on the layout this tree's engine gives its
    matrices (rows in lanes: weights.interleave_rows), REV gets them laid out by its own
    weights.interleave_rows (plain copies where it had none), and the output says so."""
    from numba.core.errors import TypingError

    from flashinfer.engine import Engine
    from flashinfer.flash_ffn import BundleViews
    from flashinfer.weights import Matrix, plain_rows

    old_k = kernels_at(rev)

    rev_layout = layout_at(rev)

    def plain_ffn(v):  # a resident FFN's matrices plain (flash_ffn's layout undone)
        if not isinstance(v, BundleViews):
            return v
        return v._replace(down=plain_rows(v.down), up=plain_rows(v.up), gate=plain_rows(v.gate))

    def plain(v):  # and the engine's resident matrices too
        return plain_rows(v) if isinstance(v, Matrix) else plain_ffn(v)

    def rev_laid(v):  # every matrix as REV's own weights.interleave_rows lays it out
        if isinstance(v, Matrix):
            return rev_layout(plain_rows(v))
        return plain_ffn(v)._replace(**{f: rev_layout(plain_rows(getattr(v, f))) for f in ("down", "up", "gate")}) \
            if isinstance(v, BundleViews) else v

    def takes_layout(k, m, reference=None) -> bool:  # REV's kernels on m give this tree's product on reference (m)
        ref = m if reference is None else reference
        width = plain_rows(ref).data.shape[1] * (2 if ref.data.dtype == np.uint8 else 1)
        x = np.random.default_rng(0).standard_normal((1, width)).astype(np.float32)
        got, want = (np.full((1, ref.rows), np.nan, np.float32) for _ in range(2))
        try:
            k.matmul(x, m.data, m.scales, m.mins, m.group, np.zeros(0, np.float32), got)
        except TypingError:
            return False
        K.matmul(x, ref.data, ref.scales, ref.mins, ref.group, np.zeros(0, np.float32), want)
        return bool(np.allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max()))

    print(f"command: python -m bench.kernels --against {rev} --store {store}")
    print("machine:", machine_line())
    with Engine.open(store, ctx=max(contexts) + 1) as engine:
        model, weights, state = engine.model, engine.model.weights, engine.model.state
        no_bias = np.zeros(0, np.float32)
        heads = {K: weights.lm_head, old_k: weights.lm_head}
        print(f"{'part':24} {'context':>7} {rev + ' ms':>12} {'now ms':>9} {'speedup':>8}")
        for context in contexts:
            model.reset()
            model.forward(np.arange(context) % 1000 + 100)
            if any(operands is None for operands in model._fused_operands):
                raise SystemExit(f"{store}: not every block runs as one compiled call (a block kind decode_layer "
                                 "does not take, or an FFN that is not resident)")
            start = model.n_past
            if context == contexts[0]:
                operands = {k: [(b, a) for _, b, a in model._fused_operands] for k in (K, old_k)}
                if not hasattr(old_k, "NO_DOWN_ROWS"):  # REV's decode_layer types 2-D FFN scratch for every block
                    operands[old_k] = [(b, tuple(state.hidden if a is K.NO_DOWN_ROWS else a for a in after))
                                       for b, after in operands[old_k]]

            def blocks(k):
                for before, after in operands[k]:
                    k.decode_layer(*before, start, *after)

            def blocks_called(calls):  # the machine code Model.forward calls (kernels.compiled_call)
                for call, before, after in calls:
                    call(*before, start, *after)

            def token(k):
                blocks(k)
                model._norm(state.x[:1], weights.norm_w, weights.norm_b, state.xb[:1])
                head = heads[k]
                k.matmul(state.xb[:1], head.data, head.scales, head.mins, head.group, no_bias, state.logits)

            if context == contexts[0] and not takes_layout(old_k, weights.lm_head):
                # REV predates this tree's layout: its own (weights.interleave_rows at REV), else plain copies
                undo, told = rev_laid, "its own layout (weights.interleave_rows at REV)"
                if not takes_layout(old_k, rev_laid(weights.lm_head), weights.lm_head):
                    undo, told = plain, "plain copies"
                operands[old_k] = [(tuple(map(undo, b)), tuple(map(undo, a))) for b, a in operands[K]]
                heads[old_k] = undo(weights.lm_head)
                print(f"({rev}'s kernels do not take this tree's layout: they run on {told})")
            for label, fn in (("blocks", blocks), ("token (blocks + head)", token)):
                t_old, t_new = best_pair(fn, fn, (old_k,), (K,), repeats=repeats)
                print(f"{label:24} {context:>7} {t_old * 1e3:>12.3f} {t_new * 1e3:>9.3f} {t_old / t_new:>7.2f}x")
            if context == contexts[0]:
                # what a block's call costs in Python: through numba's dispatcher (it types all 46
                # arguments each call) against the compiled call Model.forward keeps, this tree's kernels both
                t_dispatch, t_called = best_pair(blocks_called, blocks_called,
                                                 ([(K.decode_layer, b, a) for _, b, a in model._fused_operands],),
                                                 (model._fused_operands,), repeats=repeats)
                print(f"{'blocks, dispatcher':24} {context:>7} {t_dispatch * 1e3:>12.3f} {t_called * 1e3:>9.3f} "
                      f"{t_dispatch / t_called:>7.2f}x  (this tree's kernels: through numba's dispatcher, then as "
                      "Model.forward calls them)")


def store_layouts(store: str, repeats: int = 15, context: int = 16) -> None:
    """A decode token of a real store (every block's one compiled call, then the final norm and the
    head), two engines in one process, alternating: every matrix plain (weights.interleave_rows made
    the identity while the first opens) against the layout Engine.open gives them (rows in lanes
    where the kernels take it). This tree's kernels both."""
    from unittest import mock

    from flashinfer import flash_ffn, weights
    from flashinfer.engine import Engine

    print(f"command: python -m bench.kernels --store {store} --plain")
    print("machine:", machine_line())
    identity = lambda m: m  # noqa: E731
    # open reads every resident FFN layer (its warm-up tokens): flash_ffn lays them out then
    with mock.patch.object(weights, "interleave_rows", identity), mock.patch.object(flash_ffn, "interleave_rows", identity):
        plain = Engine.open(store, ctx=context + 2)
    laid_out = Engine.open(store, ctx=context + 2)
    tokens = {}
    with plain, laid_out:
        for engine in (plain, laid_out):
            model = engine.model
            model.reset()
            model.forward(np.arange(context) + 100)
            model.forward(np.array([7]))  # every block's compiled call resolved
            if any(operands is None for operands in model._fused_operands):
                raise SystemExit(f"{store}: not every block runs as one compiled call")
            tokens[engine] = model.n_past

        def token(engine):
            model, w, s = engine.model, engine.model.weights, engine.model.state
            for call, before, after in model._fused_operands:
                call(*before, tokens[engine], *after)
            model._norm(s.x[:1], w.norm_w, w.norm_b, s.xb[:1])
            K.matmul(s.xb[:1], w.lm_head.data, w.lm_head.scales, w.lm_head.mins, w.lm_head.group,
                     np.zeros(0, np.float32), s.logits)

        def woven(engine):  # matrices of the first block laid out in lanes
            layer, ffn = engine.model.weights.layers[0], engine.model.flash_ffn.resident_views(0)
            return sum(m.data.ndim == 3 for m in (layer.wq, layer.wk, layer.wv, layer.wo, ffn.up, ffn.gate, ffn.down))

        t_plain, t_laid = best_pair(token, token, (plain,), (laid_out,), repeats=repeats)
        print(f"{'token (blocks + head)':24} {'plain ms':>9} {'laid out ms':>12} {'speedup':>8}")
        print(f"{'context ' + str(context):24} {t_plain * 1e3:>9.3f} {t_laid * 1e3:>12.3f} {t_plain / t_laid:>7.2f}x"
              f"  (block 0's matrices in lanes: {woven(plain)} plain, {woven(laid_out)} laid out)")


def _bundles(rng, dim: int, n_rows: int, scheme: str, active: float):
    """Bundle views of n_rows random neurons (gated), `active` of them with a positive gate for a positive x."""
    from flashinfer import flash_ffn
    from storage import format as fmt
    from storage.writer import bundle_layout, pack_bundles

    weights = {name: rng.standard_normal((n_rows, dim), dtype=np.float32) for name in ("up", "gate", "down")}
    inactive = rng.random(n_rows) >= active
    weights["gate"][inactive] = -np.abs(weights["gate"][inactive])
    weights["gate"][~inactive] = np.abs(weights["gate"][~inactive])
    components, bundle_bytes = bundle_layout(weights, dim, scheme, 32)
    bundles = pack_bundles(weights, components, bundle_bytes)
    layer = fmt.FFNLayer(file="", n_neurons=n_rows, bundle_bytes=bundle_bytes, components=tuple(components),
                         bundles_per_chunk=1, compression="none", chunks=(), file_bytes=0)
    return flash_ffn.bundle_views(bundles, layer), bundles.nbytes


def ffn_shapes(rng):
    """(label, ffn_rows operands with out, bytes of the bundles) for a 7B ReLU layer's cached share
    and a SmolLM2-135M SiLU layer (dim 576, all 1536 neurons resident, all active)."""
    cases = (("7B ReLU 20% cached, 50% active", 4096, 2867, K.ACT_RELU, 0.5),
             ("SmolLM2 SiLU layer, all active", 576, 1536, K.ACT_SILU, 1.0))
    for scheme in ("q8", "q4"):
        for label, dim, n_rows, act, active in cases:
            v, n_bytes = _bundles(rng, dim, n_rows, scheme, active)
            for n_tokens in (1, 16):
                x = np.abs(rng.standard_normal((n_tokens, dim))).astype(np.float32)
                yield (f"{scheme} {label}", (x, n_rows, v.up.data, v.up.scales, v.up.mins, v.gate.data, v.gate.scales,
                       v.gate.mins, v.down.data, v.down.scales, v.down.mins, v.up_bias, v.gate_bias, v.group, act,
                       np.empty((n_tokens, dim), np.float32)), n_bytes)


def streamed_matmuls(rng, total_bytes: int = 100 << 20):
    """(label, [(data, scales, mins)] of distinct matrices totalling ~total_bytes, an input row,
    their bytes): SmolLM2-135M's gate/up and down shapes in q4a, its q8 head, a 7B-wide q4a row.
    Each pass over the list streams it from DRAM, as a decode token streams a model's layers."""
    for label, scheme, n_rows, k in (("q4a [1536, 576] (gate, up)", "q4a", 1536, 576),
                                     ("q4a [576, 1536] (down)", "q4a", 576, 1536),
                                     ("q4a [1536, 4096]", "q4a", 1536, 4096),
                                     ("q8 [49152, 576] (head)", "q8", 49152, 576)):
        qt = quant.quantize(rng.standard_normal((n_rows, k), dtype=np.float32), scheme, 32)
        one = qt.data.nbytes + qt.scales.nbytes + (qt.mins.nbytes if qt.mins is not None else 0)
        matrices = []
        for _ in range(max(2, total_bytes // one)):  # copies: distinct memory, the same values
            mins = qt.mins.view(np.uint16).copy() if qt.mins is not None else NO_SCALES
            matrices.append((qt.data.copy(), qt.scales.view(np.uint16).copy(), mins))
        x = rng.standard_normal((1, k)).astype(np.float32)
        yield label, matrices, x, one * len(matrices)


def strided_matmuls(rng):
    for scheme in ("q8", "q4"):
        v, _ = _bundles(rng, 4096, 2867, scheme, 0.5)
        g = v.gate
        x = rng.standard_normal((1, 4096)).astype(np.float32)
        yield (f"{scheme} gate rows of 2867 bundles", (x, g.data, g.scales, g.mins, 32, np.zeros(0, np.float32),
                                                        np.empty((1, 2867), np.float32)), g.data.nbytes + g.scales.nbytes)


def serial_vs_parallel() -> None:
    serial = K.matmul_serial  # same source, prange as range
    rng = np.random.default_rng(0)
    print("command: python -m bench.kernels")
    print("machine:", machine_line())
    print(f"{'weights':8} {'tokens':>6} {'serial ms':>10} {'parallel ms':>12} {'speedup':>8} {'parallel GB/s':>14}")
    for dtype in ("f32", "f16", "q8", "q4"):
        qt = quant.quantize(rng.standard_normal((11008, 4096), dtype=np.float32), dtype, 32)
        data = qt.data.view(np.uint16) if dtype == "f16" else qt.data
        scales = qt.scales.view(np.uint16) if qt.scales is not None else NO_SCALES
        weights = (data, scales, NO_SCALES, 32)
        nbytes = data.nbytes + scales.nbytes
        for n_tokens in (1, 16):
            x = rng.standard_normal((n_tokens, 4096)).astype(np.float32)
            out = np.empty((n_tokens, 11008), np.float32)
            no_bias = np.zeros(0, np.float32)
            t_serial = best_seconds(serial, x, *weights, no_bias, out)
            t_parallel = best_seconds(K.matmul, x, *weights, no_bias, out)
            print(f"{dtype:8} {n_tokens:>6} {t_serial * 1e3:>10.2f} {t_parallel * 1e3:>12.2f} "
                  f"{t_serial / t_parallel:>7.2f}x {nbytes / t_parallel / 1e9:>14.1f}")
    four_bit_schemes(rng)
    six_bit_scheme(rng)
    sparse_ffn_rows(rng)


def four_bit_schemes(rng) -> None:
    """q4k (ggml's Q4_K, scales decoded in the block loop) against q4a (f16 scale and min per 32)
    on the same weights, alternating, both kernels: what keeping a Q4_K file's blocks costs."""
    scheme_pair(rng, "q4a", "q4k")


def six_bit_scheme(rng) -> None:
    """q6k (ggml's Q6_K: int8 codes, an int8 scale per 16 applied in integers) against q8 (f16
    scale per 32) on the same weights: what keeping a Q6_K file's W_down and attn_v costs."""
    scheme_pair(rng, "q8", "q6k")


def scheme_pair(rng, base: str, other: str) -> None:
    """matmul [11008, 4096] in two schemes of the same weights, alternating, both kernels."""
    from flashinfer.weights import matrix_from_quantized

    print(f"\nmatmul [11008, 4096], the same weights as {base} and {other}, alternating")
    print(f"{'kernel':14} {'tokens':>6} {base + ' ms':>9} {other + ' ms':>9} {other + '/' + base:>8} "
          f"{other + ' GB/s':>9}")
    w = rng.standard_normal((11008, 4096), dtype=np.float32)
    q_base, q_other = (quant.quantize(w, scheme) for scheme in (base, other))
    m_base, m_other = matrix_from_quantized(q_base), matrix_from_quantized(q_other)
    nbytes = m_other.nbytes
    for n_tokens in (1, 16):
        x = rng.standard_normal((n_tokens, 4096)).astype(np.float32)
        out = np.empty((n_tokens, 11008), np.float32)
        no_bias = np.zeros(0, np.float32)
        for name in ("matmul_serial", "matmul"):
            kernel = getattr(K, name)
            t_a, t_k = best_pair(kernel, kernel, (x, *m_base, no_bias, out), (x, *m_other, no_bias, out))
            print(f"{name:14} {n_tokens:>6} {t_a * 1e3:>9.2f} {t_k * 1e3:>9.2f} {t_k / t_a:>7.2f}x "
                  f"{nbytes / t_k / 1e9:>9.1f}")


def ffn_cases(rng, shares=(0.1, 0.3)):
    """(scheme, ffn_rows operands without `out`, out, bundle bytes) for Mistral-7B-shaped bundles."""
    from flashinfer import flash_ffn
    from storage import format as fmt
    from storage.writer import bundle_layout, pack_bundles

    dim, n_neurons = 4096, 14336
    for scheme in ("f16", "q8", "q4"):
        for share in shares:
            n_rows = int(n_neurons * share)
            weights = {name: rng.standard_normal((n_rows, dim), dtype=np.float32) for name in ("up", "gate", "down")}
            inactive = rng.random(n_rows) < 0.9
            weights["gate"][inactive] = -np.abs(weights["gate"][inactive])  # negative pre-activations
            x = np.abs(rng.standard_normal((1, dim))).astype(np.float32)  # ... for a positive input
            components, bundle_bytes = bundle_layout(weights, dim, scheme, 32)
            bundles = pack_bundles(weights, components, bundle_bytes)
            layer = fmt.FFNLayer(file="", n_neurons=n_rows, bundle_bytes=bundle_bytes, components=tuple(components),
                                 bundles_per_chunk=1, compression="none", chunks=(), file_bytes=0)
            v = flash_ffn.bundle_views(bundles, layer)
            operands = (x, n_rows, v.up.data, v.up.scales, v.up.mins, v.gate.data, v.gate.scales, v.gate.mins,
                        v.down.data, v.down.scales, v.down.mins, v.up_bias, v.gate_bias, v.group, K.ACT_RELU)
            yield scheme, operands, np.empty((1, dim), np.float32), bundles.nbytes


def sparse_ffn_rows(rng) -> None:
    import numba

    dim = 4096
    print(f"\nsparse FFN over cached rows (ffn_rows), gated, dim {dim}, 90% of rows inactive")
    print(f"{'bundles':8} {'rows':>6} {'serial ms':>10} {'parallel ms':>12} {'speedup':>8} {'parallel GB/s':>14}")
    slices = np.zeros((numba.get_num_threads(), 1, dim), np.float32)
    for scheme, operands, out, nbytes in ffn_cases(rng):
        t_serial = best_seconds(K.ffn_rows, *operands, out)
        t_parallel = best_seconds(K.ffn_rows_parallel, *operands, slices, out)
        print(f"{scheme:8} {operands[1]:>6} {t_serial * 1e3:>10.2f} {t_parallel * 1e3:>12.2f} "
              f"{t_serial / t_parallel:>7.2f}x {nbytes / t_parallel / 1e9:>14.1f}")


if __name__ == "__main__":
    main()
