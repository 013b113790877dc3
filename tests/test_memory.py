"""The DRAM budget planner, and the cap measured on a real run in a child process."""

import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from flashinfer.config import ModelArgs
from flashinfer.memory import BudgetError, kv_cache_bytes, plan_memory
from flashinfer.model import RunState
from storage.synth import synthesize
from tests.test_config import MISTRAL
from tests.conftest import roomy_cap

MISTRAL_7B = ModelArgs.from_hf_config(MISTRAL | {"hidden_act": "relu"})
# a q4 FFN store of Mistral-7B: 14336 neurons x 6912-byte bundles per layer; q4 resident ~0.85 GB
MANIFEST_7B = SimpleNamespace(resident_bytes=850_000_000,
                              ffn_layers=[SimpleNamespace(n_neurons=14336, bundle_bytes=6912, matrices=())] * 32)


def plan(cap, ctx, share=0.1, sparse=True, stream_ffn=False, kv_cache="f16"):
    return plan_memory(cap, MISTRAL_7B, MANIFEST_7B, ctx, sparse=sparse, predictor_bytes=40_000_000,
                       io_buffer_bytes=5 * 2**20, scratch_bytes=RunState.scratch_bytes(MISTRAL_7B, ctx),
                       sparse_share=share, runtime_bytes=150 * 2**20,  # a flashinfer process measures ~150 MB
                       stream_ffn=stream_ffn, kv_cache=kv_cache)


def test_scratch_estimate_equals_what_runstate_allocates():
    args = ModelArgs.from_hf_config(MISTRAL | {"num_hidden_layers": 2, "hidden_size": 256, "intermediate_size": 512,
                                               "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000})
    for kv_cache in ("f16", "f32", "q8"):
        state = RunState(args, ctx=64, chunk=16, kv_cache=kv_cache)
        assert state.nbytes - kv_cache_bytes(args, 64, kv_cache) == RunState.scratch_bytes(args, 64, chunk=16)


def test_an_f16_kv_cache_leaves_a_long_context_room_for_neurons():
    """Mistral-7B's KV cache at 2048 tokens: 512 MiB as float32, 256 MiB as halves (the default).
    At 2 GB the f32 one leaves too little for the neuron caches; the refusal names --kv-cache f16."""
    assert kv_cache_bytes(MISTRAL_7B, 2048, "f32") == 512 * 2**20 == 2 * kv_cache_bytes(MISTRAL_7B, 2048)
    halves = plan(2_000_000_000, ctx=2048, share=0.2)
    assert halves.kv_bytes == 256 * 2**20 and "KV cache (f16)" in halves.table()
    with pytest.raises(BudgetError) as e:
        plan(2_000_000_000, ctx=2048, share=0.2, kv_cache="f32")
    assert "Would fit: --kv-cache f16 or --ctx " in str(e.value) and "KV cache (f32)" in str(e.value)


def test_a_q8_kv_cache_is_the_refusals_next_suggestion_after_f16():
    """At 2048 tokens the 7B's q8 cache is 144 MiB (int8 codes and a float32 scale per 32
    channels), 0.5625x of f16's; where f16 leaves a plan short by less than the difference, the
    refusal names --kv-cache q8 (and f32's names f16 first, when halving is enough)."""
    assert kv_cache_bytes(MISTRAL_7B, 2048, "q8") == 144 * 2**20
    f16 = plan(2_000_000_000, ctx=2048, share=0.05)
    q8 = plan(2_000_000_000, ctx=2048, share=0.05, kv_cache="q8")
    assert f16.kv_bytes - q8.kv_bytes == 112 * 2**20 and "KV cache (q8)" in q8.table()
    # a share of each layer that fits with q8 keys and values, not with halves
    share = next(s / 1000 for s in range(400, 0, -1) if _fits(ctx=2048, share=s / 1000, kv_cache="q8"))
    with pytest.raises(BudgetError) as e:
        plan(2_000_000_000, ctx=2048, share=share)
    assert "Would fit: --kv-cache q8 or --ctx " in str(e.value)


def _fits(**kw) -> bool:
    try:
        plan(2_000_000_000, **kw)
        return True
    except BudgetError:
        return False


def test_a_refusal_suggests_lower_bit_resident_weights_only_where_there_are_some():
    """A store resident in q4 already has no lower-bit store to convert to (the 7B's refusal said so)."""
    for resident, suggested in (("q8", True), ("q4", False)):
        manifest = SimpleNamespace(**vars(MANIFEST_7B), quant={"ffn": "q4", "resident": resident})
        with pytest.raises(BudgetError) as e:
            plan_memory(1_200_000_000, MISTRAL_7B, manifest, 512, sparse=True, predictor_bytes=40_000_000,
                        io_buffer_bytes=5 * 2**20, scratch_bytes=RunState.scratch_bytes(MISTRAL_7B, 512),
                        sparse_share=0.1, runtime_bytes=150 * 2**20)
        assert ("--resident-quant q4" in str(e.value)) == suggested


def test_7b_fits_2gb_with_a_short_context():
    p = plan(2_000_000_000, ctx=512)
    assert p.total_bytes <= p.cap_bytes
    assert all(0.15 * 14336 <= c < 14336 for c in p.capacities)  # the FFN (3.2 GB) does not fit whole
    assert "neuron caches" in p.table() and "KV cache" in p.table()


def test_7b_with_long_context_is_refused_with_what_would_fit():
    """Caches must hold REQUIRED_MARGIN (0.75) of a token's calibrated selection: 15% of each
    layer for a predictor that selects 20%."""
    with pytest.raises(BudgetError) as e:
        plan(2_000_000_000, ctx=4096, share=0.2)
    message = str(e.value)
    assert message.startswith("a DRAM cap of 2000 MB cannot hold this model with neuron caches of 15% of each layer")
    assert "Would fit: --ctx " in message and "--dram " in message


def test_the_cache_floor_applies_only_without_a_calibrated_share():
    """A calibrated selection of 8% a token needs caches of 6% (REQUIRED_MARGIN); with no share
    (the oracle: none is known ahead) the planner keeps its 15% floor (MIN_CACHE_SHARE)."""
    small = plan(2_000_000_000, ctx=4096, share=0.08)
    assert all(c < 0.15 * 14336 for c in small.capacities) and "warning" in small.table()
    with pytest.raises(BudgetError, match="neuron caches of 15% of each layer"):
        plan(2_000_000_000, ctx=4096, share=None)


@pytest.mark.parametrize("tied", [False, True])
def test_lookup_tables_count_only_the_rows_a_context_touches(tied):
    from flashinfer.memory import resident_in_dram_bytes
    from storage.format import lookup_tables

    table = SimpleNamespace(shape=(32000, 4096), nbytes=32000 * 2304)  # q4: 2048 data + 256 scale bytes a row
    resident = {"tok_embeddings.weight": table, "layers.0.attn.wq.weight": SimpleNamespace(shape=(4096, 4096))}
    if not tied:
        resident["lm_head.weight"] = table
    manifest = SimpleNamespace(resident_bytes=300_000_000, resident=resident)
    touched = resident_in_dram_bytes(manifest, ctx=256)
    if tied:  # the table is the lm_head too: read in full every token
        assert lookup_tables(resident) == [] and touched == 300_000_000
    else:  # 256 tokens touch at most a data page and a scales page each
        assert lookup_tables(resident) == ["tok_embeddings.weight"]
        assert touched == 300_000_000 - table.nbytes + 256 * 2 * 4096


def test_between_required_and_advised_margin_runs_with_a_warning():
    ok = plan(2_000_000_000, ctx=512, share=0.1)
    assert ok.warning is None
    tight = plan(2_000_000_000, ctx=512, share=0.2)  # caches ~22%: 0.75x of 20% fits, 1.5x does not
    assert tight.warning.startswith("neuron caches of 2") and "expect a low hit rate" in tight.warning
    assert "warning:" in tight.table()
    with pytest.raises(BudgetError, match="neuron caches of 30%"):
        plan(2_000_000_000, ctx=512, share=0.4)  # 0.75 x 40% = 30% cannot fit


def test_dense_path_needs_room_for_one_layer():
    with pytest.raises(BudgetError, match="with the dense path"):
        plan(600_000_000, ctx=512, sparse=False)


def test_dense_path_keeps_the_ffn_layers_that_fit_resident():
    layer = 14336 * 6912  # 99 MB
    some = plan(2_000_000_000, ctx=512, sparse=False)
    assert 0 < len(some.resident_layers) < 32 and some.resident_layers == list(range(len(some.resident_layers)))
    assert some.ffn_resident_bytes == len(some.resident_layers) * layer and some.total_bytes <= some.cap_bytes
    assert some.cap_bytes - some.total_bytes < layer  # one more layer would not have fit
    assert f"FFN resident ({len(some.resident_layers)} of 32 layers)" in some.table()
    whole = plan(6_000_000_000, ctx=512, sparse=False)  # 3.2 GB of FFN fits: no streaming buffer either
    assert whole.resident_layers == list(range(32)) and whole.io_bytes == 5 * 2**20
    assert plan(6_000_000_000, ctx=512, sparse=False, stream_ffn=True).resident_layers == []


def test_generation_in_a_child_process_stays_under_the_cap(tmp_path):
    """Peak RSS of a whole process (Python, numba, weights, caches) measured after generating."""
    synthesize("tiny", tmp_path / "m", sparsity=0.9)
    code = f"""
import sys
from flashinfer import Engine
from flashinfer.convert import convert_checkpoint
from flashinfer.memory import peak_rss_bytes
store = convert_checkpoint({str(tmp_path / 'm')!r}, {str(tmp_path / 's')!r}, quant="q8", resident_quant="q8", overwrite=True)
with Engine.open(store, predictor="oracle", dram="400MB", window=3) as engine:
    engine.generate("hello there", max_tokens=32)
    print(engine.memory_plan.cap_bytes, engine.memory_plan.total_bytes, peak_rss_bytes())
"""
    # The first run on a machine compiles the numba kernels, and LLVM alone peaks near 550 MB:
    # the cap is for inference, so compile into numba's on-disk cache in a process of its own first.
    warm = code.replace('dram="400MB", ', "").replace("engine.memory_plan.cap_bytes, engine.memory_plan.total_bytes, ", "")
    # The measured child then loads every kernel from the on-disk cache, whatever earlier tests
    # compiled into it (a cache of its own cost ~15 s of compiling again in the suite).
    subprocess.run([sys.executable, "-c", warm], capture_output=True, text=True, check=True)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    cap, planned, peak = map(int, out.split())
    assert planned <= cap and peak <= cap


def test_a_plan_that_fills_the_cap_holds_in_a_child_process(tmp_path):
    """A cap at which the neuron caches get about half of each layer: the plan then fills the
    cap to within 2% (the caches take what is left), and the process's measured peak RSS after
    32 tokens stays under it. A part of the process the plan does not count (beyond its 64 MiB
    headroom) would show here as a peak over the cap."""
    synthesize("small", tmp_path / "m", sparsity=0.9)  # an FFN of ~20 MB: well above the runtime's jitter
    store = tmp_path / "s"
    code = f"""
import sys
from flashinfer import Engine
from flashinfer.memory import peak_rss_bytes
with Engine.open({str(store)!r}, predictor="oracle", dram=sys.argv[1], window=3) as engine:
    engine.generate("hello there", max_tokens=32)
    p = engine.memory_plan
    full = sum(s.n_neurons * (s.bundle_bytes + 4) + s.n_neurons * 12 for s in engine.model.flash_ffn.reader.manifest.ffn_layers)
    print(p.cap_bytes, p.total_bytes, p.cache_bytes, full, peak_rss_bytes())
"""
    from flashinfer.convert import convert_checkpoint

    convert_checkpoint(tmp_path / "m", store, quant="q8", resident_quant="q8")
    run = lambda cap: list(map(int, subprocess.run([sys.executable, "-c", code, cap], capture_output=True, text=True,
                                                     check=True).stdout.split()))
    _, total, caches, full, _ = run("400MB")  # loose: caches hold whole layers; also fills numba's disk cache
    cap = total - caches + full // 2
    cap, planned, caches, full, peak = run(str(cap))
    assert 0.98 * cap <= planned <= cap and caches < full  # the caches got what was left, not whole layers
    assert peak <= cap


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory):
    from flashinfer.convert import convert_checkpoint

    tmp = tmp_path_factory.mktemp("tiny")
    synthesize("tiny", tmp / "m", sparsity=0.9)
    return convert_checkpoint(tmp / "m", tmp / "s", quant="q8", resident_quant="q8")


def test_a_capped_logits_result_beyond_the_plan_needs_a_buffer_of_the_callers(tiny_store, tmp_path):
    from flashinfer import Engine
    from flashinfer.errors import GenerationError
    from flashinfer.memory import LOGITS_PLAN_ROWS

    ids = list(range(1, 101))
    with Engine.open(tiny_store, dram=roomy_cap(), ctx=128) as engine:
        plan = engine.memory_plan
        assert plan.logits_bytes == LOGITS_PLAN_ROWS * 512 * 4 and f"logits() result ({LOGITS_PLAN_ROWS} rows)" in plan.table()
        assert engine.logits(ids[:LOGITS_PLAN_ROWS]).shape == (LOGITS_PLAN_ROWS, 512)
        with pytest.raises(GenerationError) as e:
            engine.logits(ids)
        assert str(e.value) == ("logits of 100 tokens take 0 MB, more than the 0 MB the DRAM plan holds for them: pass "
                                "out=, a float32 array of shape (100, 512) of your own (an np.memmap of a file keeps it "
                                "off the cap), or ask for <= 64 tokens")
        out = np.lib.format.open_memmap(tmp_path / "logits.npy", mode="w+", dtype=np.float32, shape=(100, 512))
        assert engine.logits(ids, out=out) is out
        np.testing.assert_array_equal(out[:LOGITS_PLAN_ROWS], engine.logits(ids[:LOGITS_PLAN_ROWS]))
        with pytest.raises(GenerationError, match=r"out must be a float32 array of shape \(100, 512\)"):
            engine.logits(ids, out=np.empty((100, 512), np.float64))
    with Engine.open(tiny_store, ctx=128) as engine:  # no cap: no limit
        assert engine.logits(ids).shape == (100, 512)


def test_each_new_sequence_drops_the_token_tables_pages_under_a_cap(tiny_store, monkeypatch):
    """The plan counts the rows one context touches (resident_in_dram_bytes); a server's life
    touches more, so a capped engine drops the table's pages when a sequence starts."""
    from flashinfer import Engine
    from storage.reader import StoreReader

    released = []
    original = StoreReader.release_resident
    monkeypatch.setattr(StoreReader, "release_resident", lambda self, name: released.append(name) or original(self, name))
    with Engine.open(tiny_store, dram=roomy_cap(), ctx=128) as engine:
        released.clear()
        for prompt in ("one", "two", "three"):
            engine.generate(prompt, max_tokens=2, temperature=0)
        assert released == ["tok_embeddings.weight"] * 3
    with Engine.open(tiny_store, ctx=128) as engine:  # no cap: the pages stay
        released.clear()  # (opening releases the pages of matrices it lays out, capped or not)
        engine.generate("one", max_tokens=2, temperature=0)
    assert released == []
