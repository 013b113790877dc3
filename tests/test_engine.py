"""Engine API: sampling, stop strings, streaming, UTF-8 pieces, argument errors."""

import numpy as np
import pytest

from flashinfer.engine import _split_at_stop
from flashinfer.errors import FlashinferError, GenerationError
from flashinfer.sampling import SamplingParams, logits_to_probs
from flashinfer.tokenizer import StreamDecoder

PROMPT = "The river ran past the old mill"


def test_seeded_sampling_is_reproducible_and_seed_matters(engines):
    engine = engines("llama")
    kwargs = dict(max_tokens=12, temperature=1.0, top_p=0.95)
    a = engine.generate(PROMPT, seed=7, **kwargs)
    b = engine.generate(PROMPT, seed=7, **kwargs)
    c = engine.generate(PROMPT, seed=8, **kwargs)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


def test_top_k_1_and_tiny_top_p_are_greedy(engines):
    engine = engines("llama")
    greedy = engine.generate(PROMPT, max_tokens=8).token_ids
    assert engine.generate(PROMPT, max_tokens=8, temperature=1.5, top_k=1, seed=3).token_ids == greedy
    assert engine.generate(PROMPT, max_tokens=8, temperature=1.5, top_p=1e-9, seed=3).token_ids == greedy


def test_logits_to_probs_filters():
    logits = np.array([3.0, 2.0, 1.0, 0.0], np.float32)
    p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    assert p[2] == p[3] == 0 and p.sum() == pytest.approx(1)
    p = logits_to_probs(logits, SamplingParams(temperature=1.0, top_p=0.7))
    assert np.count_nonzero(p) == 2  # softmax mass of the top token is 0.64 < 0.7


def test_stream_pieces_join_to_the_text(engines):
    engine = engines("llama")
    result = engine.generate(PROMPT, max_tokens=20)
    pieces = list(engine.generate(PROMPT, max_tokens=20, stream=True))
    assert "".join(pieces) == result.text == engine.detokenize(result.token_ids)
    assert result.usage.prompt_tokens == len(engine.tokenize(PROMPT))
    assert result.usage.completion_tokens == 20


def test_stop_string_cuts_text_and_sets_reason(engines):
    engine = engines("llama")
    full = engine.generate(PROMPT, max_tokens=20).text
    stop = full[5:8]  # a string the greedy output is known to contain
    result = engine.generate(PROMPT, max_tokens=20, stop=[stop])
    assert result.finish_reason == "stop"
    assert result.text == full[: full.index(stop)]
    assert "".join(engine.generate(PROMPT, max_tokens=20, stop=stop, stream=True)) == result.text


def test_split_at_stop_holds_back_partial_matches():
    assert _split_at_stop("hello wor", ["world"]) == ("hello ", "wor", False)
    assert _split_at_stop("hello world!", ["world"]) == ("hello ", "", True)
    assert _split_at_stop("abc", []) == ("abc", "", False)
    assert _split_at_stop("hello wor", ["world"], final=True) == ("hello wor", "", False)


def test_stream_decoder_never_splits_utf8(engines):
    tokenizer = engines("llama").tokenizer
    text = "naïve café — 東京 🚀 done"
    ids = tokenizer.encode(text)[1:]  # drop <s>
    decoder = StreamDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # byte-level BPE on a tiny vocab splits multi-byte characters: the test means something
    assert any(tokenizer.decode([i]).endswith("\ufffd") for i in ids)


@pytest.mark.parametrize("kwargs,message", [
    (dict(max_tokens=0), "max_tokens must be a positive integer"),
    (dict(max_tokens=True), "max_tokens must be a positive integer, got True"),
    (dict(temperature=-1.0), "temperature must be >= 0"),
    (dict(temperature="hot"), "temperature must be a number >= 0 .*got 'hot'"),
    (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
    (dict(top_p=float("nan")), r"top_p must be in \(0, 1\]"),
    (dict(top_k=-2), "top_k must be >= 0"),
    (dict(top_k=1.5), "top_k must be an integer"),
    (dict(seed=-1), "seed must be a non-negative integer or None, got -1"),
    (dict(seed="x"), "seed must be a non-negative integer"),
    (dict(stop=[""]), "stop must be non-empty strings"),
    (dict(stop=5), "stop must be a string or a list of strings, got 5"),
])
def test_bad_generation_arguments(engines, kwargs, message):
    with pytest.raises(GenerationError, match=message):
        engines("llama").generate(PROMPT, **kwargs)


def test_bad_prompts(engines):
    engine = engines("llama")
    for prompt in (None, 5, b"hi"):
        with pytest.raises(GenerationError, match="expected a string or a sequence of token ids"):
            engine.generate(prompt)
    with pytest.raises(GenerationError, match=r"token ids must be integers, got \[1.5\]"):
        engine.generate([1, 1.5])
    with pytest.raises(GenerationError, match="the prompt is empty"):
        engine.generate([])
    with pytest.raises(GenerationError, match=r"token id\(s\) \[99999\] outside the vocabulary"):
        engine.logits([1, 99999])
    with pytest.raises(GenerationError, match="the prompt has 200 tokens, the context holds 128"):
        engine.logits([5] * 200)


def test_generation_stops_at_context_end():
    from flashinfer import Engine
    from tests.conftest import FIXTURES

    with Engine.open(FIXTURES / "llama", ctx=12) as engine:
        result = engine.generate([1, 5, 6, 7, 8], max_tokens=100)
    assert result.finish_reason == "length"
    assert result.usage.prompt_tokens + result.usage.completion_tokens == 13  # last token needs no KV slot


def test_errors_are_one_hierarchy():
    from flashinfer.errors import CheckpointError, ConfigError, StorageError

    assert issubclass(CheckpointError, StorageError) and issubclass(StorageError, FlashinferError)
    assert issubclass(ConfigError, FlashinferError) and issubclass(GenerationError, FlashinferError)


def test_stream_yields_one_response_per_token(engines):
    engine = engines("llama")
    responses = list(engine.stream(PROMPT, max_tokens=9))
    assert [r.token_id for r in responses[:-1]] == list(responses[-1].token_ids)
    assert len(responses) == 10 and responses[-1].token_id is None


def test_abandoned_stream_frees_the_engine(engines):
    engine = engines("llama")
    stream = engine.generate(PROMPT, max_tokens=50, stream=True)
    next(stream)
    stream.close()
    assert engine.generate(PROMPT, max_tokens=3).usage.completion_tokens == 3


def test_a_call_inside_ones_own_stream_is_refused_not_deadlocked(engines):
    from flashinfer.errors import EngineBusyError

    engine = engines("llama")
    stream = engine.stream(PROMPT, max_tokens=50)
    next(stream)
    with pytest.raises(EngineBusyError, match="exhaust it or close\\(\\) it before another call"):
        engine.generate(PROMPT, max_tokens=2)
    stream.close()
    engine.generate(PROMPT, max_tokens=2)


def test_closed_engine_refuses_calls():
    from flashinfer import Engine
    from flashinfer.errors import EngineClosedError
    from tests.conftest import FIXTURES

    with Engine.open(FIXTURES / "llama") as engine:
        paused = engine.generate(PROMPT, max_tokens=50, stream=True)
        next(paused)
    with pytest.raises(EngineClosedError, match="is closed; open a new one"):
        next(paused)  # closed while this thread's stream was paused: fails on its next step
    with pytest.raises(EngineClosedError):
        engine.generate(PROMPT)
    engine.close()  # twice is fine


def test_package_exports():
    import flashinfer
    from flashinfer.engine import Engine, Usage

    assert flashinfer.Engine is Engine and flashinfer.Usage is Usage
    assert flashinfer.FlashinferError is FlashinferError

