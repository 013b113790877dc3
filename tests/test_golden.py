"""The Numba forward pass against HF transformers (golden fixtures, tests/fixtures/make_fixtures.py)."""

import numpy as np
import pytest

from tests.conftest import GOLDEN_MODELS, load_golden

LOGIT_TOLERANCE = 1e-3  # max |difference| vs the reference, float32


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_logits_match_transformers(engines, name):
    golden = load_golden(name)
    logits = engines(name).logits(golden["prompt_ids"].tolist())
    assert logits.shape == golden["logits"].shape and logits.dtype == np.float32
    assert np.abs(logits - golden["logits"]).max() <= LOGIT_TOLERANCE


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_greedy_continuation_matches_transformers(engines, name):
    golden = load_golden(name)
    result = engines(name).generate(golden["prompt_ids"].tolist(), max_tokens=len(golden["greedy_ids"]))
    assert result.token_ids == golden["greedy_ids"].tolist()
    assert result.finish_reason == "length"


@pytest.mark.parametrize("name", ["llama", "opt"])
def test_prefill_in_chunks_equals_one_pass(engines, name):
    """Chunked prefill (KV cache reuse across chunks) must give the same logits as token-by-token."""
    golden = load_golden(name)
    engine = engines(name)
    ids = golden["prompt_ids"]
    model = engine.model
    model.reset()
    step_logits = np.stack([model.forward(ids[i : i + 1]).copy() for i in range(len(ids))])
    np.testing.assert_allclose(step_logits, golden["logits"], atol=1e-3, rtol=0)


def test_tokenizer_round_trip(engines):
    engine = engines("llama")
    golden = load_golden("llama")
    text = str(golden["prompt_text"])
    assert engine.tokenize(text) == golden["prompt_ids"].tolist()
    assert engine.detokenize(engine.tokenize(text)) == text
