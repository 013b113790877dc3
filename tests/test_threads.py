"""One engine shared by threads: every output equals the single-threaded one for its seed."""

import threading
from concurrent.futures import ThreadPoolExecutor

from tests.conftest import FIXTURES

PROMPTS = ["The river ran past the old mill", "Once upon a time", "hello there"]
N_THREADS = 8


def _job(engine, i: int):
    """Request i: a prompt, a seed, and one of the three ways of generating."""
    kwargs = dict(max_tokens=12, temperature=1.0, top_p=0.9, seed=i)
    prompt = PROMPTS[i % len(PROMPTS)]
    kind = i % 3
    if kind == 0:
        return engine.generate(prompt, **kwargs).token_ids
    if kind == 1:
        return "".join(engine.generate(prompt, stream=True, **kwargs))
    return engine.chat([{"role": "user", "content": prompt}], **kwargs).text


def test_eight_threads_get_the_single_threaded_outputs(engines):
    engine = engines("llama")
    n_jobs = 4 * N_THREADS
    expected = [_job(engine, i) for i in range(n_jobs)]
    start = threading.Barrier(N_THREADS)

    def worker(t: int):
        start.wait()
        return {i: _job(engine, i) for i in range(t, n_jobs, N_THREADS)}

    with ThreadPoolExecutor(N_THREADS) as pool:
        results = {}
        for part in pool.map(worker, range(N_THREADS)):
            results.update(part)
    assert [results[i] for i in range(n_jobs)] == expected
    assert len({str(e) for e in expected}) > n_jobs // 2  # the seeds and prompts do make different outputs


def test_a_stream_waits_its_turn_and_can_change_threads(engines):
    engine = engines("llama")
    expected = engine.generate(PROMPTS[0], max_tokens=20).text
    stream = engine.generate(PROMPTS[0], max_tokens=20, stream=True)
    first = next(stream)  # holds the engine from here
    other: dict = {}
    waiting = threading.Thread(target=lambda: other.update(text=engine.generate(PROMPTS[0], max_tokens=20).text))
    waiting.start()
    waiting.join(0.2)
    assert waiting.is_alive()  # blocked behind the paused stream, not running alongside it
    rest: list = []
    finisher = threading.Thread(target=lambda: rest.extend(stream))  # another thread finishes the stream
    finisher.start()
    finisher.join(10)
    waiting.join(10)
    assert first + "".join(rest) == expected == other["text"]


def test_close_waits_for_a_running_generation():
    from flashinfer import Engine

    engine = Engine.open(FIXTURES / "llama")
    stream = engine.stream(PROMPTS[0], max_tokens=30)
    next(stream)
    closer = threading.Thread(target=engine.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive()  # the stream still holds the model's files
    responses = list(stream)
    closer.join(10)
    assert not closer.is_alive() and responses[-1].usage.completion_tokens == 30
