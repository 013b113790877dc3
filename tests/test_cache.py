"""NeuronCache: the paper's row-packed cache, checked against a model after every step."""

import numpy as np
import pytest

from flashinfer.cache import NeuronCache


def check_invariants(cache: NeuronCache, store: np.ndarray) -> None:
    cache.check()  # the maps
    live = cache.row_to_id[: cache.n]
    np.testing.assert_array_equal(cache.rows[: cache.n], store[live])  # each row is its id's bundle


@pytest.mark.parametrize("window,capacity", [(1, 40), (3, 60), (5, 25)])
def test_randomized_against_model(window, capacity):
    rng = np.random.default_rng(window)
    n_neurons, bundle = 100, 24
    store = rng.integers(0, 256, (n_neurons, bundle), dtype=np.uint8)
    cache = NeuronCache(n_neurons, bundle, capacity, window)
    history: list[np.ndarray] = []
    hot = rng.choice(n_neurons, 10, replace=False)
    for t in range(2000):
        k = int(rng.integers(0, 20))
        predicted = np.unique(np.concatenate([rng.choice(n_neurons, k), hot[: rng.integers(0, 10)]])).astype(np.int64)
        before = set(cache.resident_ids().tolist())
        to_load, evicted = cache.step(predicted)
        hits = set(predicted.tolist()) & before
        # only what was missing; of an oversized set as much as fits beside the hits (the rest: the overflow)
        fits = sorted(set(predicted.tolist()) - before)[: capacity - len(hits)]
        assert to_load.tolist() == fits
        assert not set(evicted.tolist()) & set(predicted.tolist())  # never evicts what is needed now
        if t % 2:
            cache.insert(to_load, store[to_load])
        else:  # the engine's path: read straight into the free rows, then register them
            cache.free_rows(to_load.size)[:] = store[to_load]
            cache.commit(to_load)
        check_invariants(cache, store)
        history.append(predicted)
        resident = set(cache.resident_ids().tolist())
        assert hits | set(fits) <= resident  # everything predicted now is there, or as much as fits
        assert predicted.size <= capacity and set(predicted.tolist()) <= resident or cache.n == capacity
        in_window = set(np.concatenate(history[-window:]).tolist())
        assert resident <= in_window  # nothing outside the window stays
        if len(in_window) <= capacity:  # no pressure: the whole window stays
            assert resident == in_window


def test_delete_moves_last_row_into_the_hole():
    store = np.arange(10 * 4, dtype=np.uint8).reshape(10, 4)
    cache = NeuronCache(10, 4, capacity=4, window=1)
    ids = np.array([2, 5, 7])
    to_load, _ = cache.step(ids)
    cache.insert(to_load, store[to_load])
    assert cache.row_to_id[:3].tolist() == [2, 5, 7]
    to_load, evicted = cache.step(np.array([5, 7]))  # 2 falls out of the 1-token window
    assert evicted.tolist() == [2] and to_load.size == 0
    assert cache.row_to_id[:2].tolist() == [7, 5]  # row 0 now holds the former last row
    np.testing.assert_array_equal(cache.rows[0], store[7])


def test_bad_sizes():
    with pytest.raises(ValueError, match="capacity must be in 1..10"):
        NeuronCache(10, 4, capacity=0)
    with pytest.raises(ValueError, match="window must be >= 1"):
        NeuronCache(10, 4, capacity=3, window=0)
    with pytest.raises(ValueError, match="cache overflow: 0 \\+ 4 rows > capacity 3"):
        NeuronCache(10, 4, capacity=3).free_rows(4)


@pytest.mark.parametrize("window,most", [(3, 12), (1, 30)])
def test_randomized_with_read_ahead(window, most):
    """Read-ahead before a step (SparseFFN's prefetch): never evicts a live neuron, the rows
    it fills hold the right bundles, and unused read-ahead leaves after one more token. With a
    window of 1 the read-ahead rows are stamped the step's own token: they once could not be
    evicted for the predicted ones, and the step overflowed the cache."""
    rng = np.random.default_rng(7)
    n_neurons, bundle, capacity = 80, 16, 30
    store = rng.integers(0, 256, (n_neurons, bundle), dtype=np.uint8)
    cache = NeuronCache(n_neurons, bundle, capacity, window)
    history: list[np.ndarray] = []
    for t in range(2000):
        guess = np.unique(rng.choice(n_neurons, int(rng.integers(0, most)))).astype(np.int64)
        live_before = set(cache.resident_ids().tolist())
        in_window_now = set(np.concatenate(history[-(window - 1):]).tolist()) if history and window > 1 else set()
        fetch = cache.make_room_for_prefetch(guess)
        assert in_window_now & live_before <= set(cache.resident_ids().tolist())  # live rows survive
        assert not set(fetch.tolist()) & set(cache.resident_ids().tolist())
        cache.free_rows(fetch.size)[:] = store[fetch]
        cache.commit_prefetched(fetch)
        check_invariants(cache, store)
        predicted = np.unique(rng.choice(n_neurons, int(rng.integers(0, most)))).astype(np.int64)
        to_load, _ = cache.step(predicted)
        assert not set(to_load.tolist()) & set(fetch.tolist())  # read-ahead rows are used, not re-read
        cache.insert(to_load, store[to_load])
        check_invariants(cache, store)
        history.append(predicted)
        resident = set(cache.resident_ids().tolist())
        assert set(predicted.tolist()) <= resident
        assert resident <= set(np.concatenate(history[-window:]).tolist()) | set(fetch.tolist())


@pytest.mark.parametrize("window,capacity,pin_capacity", [(1, 30, 10), (3, 25, 20), (5, 12, 12)])
def test_randomized_with_a_hot_set(window, capacity, pin_capacity):
    """pin_capacity: the hot set (the most predicted neurons, recounted every PIN_REFRESH tokens)
    stays once read, outside the window; the other rows keep the window's rules; a step never
    loads more than the rows the hits and the hot set's other rows leave."""
    from flashinfer.cache import PIN_REFRESH

    rng = np.random.default_rng(capacity)
    n_neurons, bundle = 100, 8
    store = rng.integers(0, 256, (n_neurons, bundle), dtype=np.uint8)
    cache = NeuronCache(n_neurons, bundle, capacity, window, pin_capacity)
    weights = 1.0 / np.arange(1, n_neurons + 1) ** 1.2  # power-law firing rates: neuron 0 hottest
    counts = np.zeros(n_neurons, np.int64)
    history: list[np.ndarray] = []
    for t in range(1500):
        predicted = np.flatnonzero(rng.random(n_neurons) < 3 * weights).astype(np.int64)
        pinned_before = cache.pinned.copy()
        before = set(cache.resident_ids().tolist())
        to_load, evicted = cache.step(predicted)
        counts[predicted] += 1
        if t % PIN_REFRESH == PIN_REFRESH - 1 or t == 0:  # the hot set: the most counted, ties to lower ids
            counted = np.flatnonzero(counts)
            expected = counted[np.argsort(-counts[counted], kind="stable")[:pin_capacity]]
            assert np.flatnonzero(cache.pinned).tolist() == sorted(expected.tolist())
        hits = set(predicted.tolist()) & before
        held = {i for i in before - set(predicted.tolist()) if cache.pinned[i]}
        assert to_load.tolist() == sorted(set(predicted.tolist()) - before)[: capacity - len(hits) - len(held)]
        assert not set(evicted.tolist()) & (set(predicted.tolist()) | {i for i in before if cache.pinned[i]})
        cache.insert(to_load, store[to_load])
        check_invariants(cache, store)
        history.append(predicted)
        resident = set(cache.resident_ids().tolist())
        assert held <= resident and hits <= resident
        unpinned = {i for i in resident if not cache.pinned[i] and not pinned_before[i]}
        assert unpinned <= set(np.concatenate(history[-window:]).tolist())  # the others: the window's rules
    assert cache.pinned[:pin_capacity // 2].all()  # the hottest are in the hot set...
    assert set(np.flatnonzero(cache.pinned[:pin_capacity // 2])) <= set(cache.resident_ids().tolist())  # ...and stay
    cache.reset()
    assert not cache.pinned.any() and not cache.counts.any() and cache.n == 0


def test_a_hot_set_larger_than_the_cache_is_refused():
    with pytest.raises(ValueError, match="pin_capacity must be in 0..3, got 4"):
        NeuronCache(10, 4, capacity=3, pin_capacity=4)


def test_the_planner_counts_every_per_neuron_array():
    from flashinfer.memory import NEURON_MAP_BYTES

    cache = NeuronCache(1000, 16, capacity=100, window=5, pin_capacity=50)
    rows_and_row_map = cache.rows.nbytes + cache.row_to_id.nbytes  # the plan's per-row part: bundle_bytes + 4
    assert cache.nbytes - rows_and_row_map == 1000 * NEURON_MAP_BYTES


@pytest.mark.parametrize("window,capacity,pin_capacity", [(1, 30, 0), (3, 25, 10), (5, 12, 6)])
def test_randomized_loads_into_the_rows_evictions_free(window, capacity, pin_capacity):
    """step(reuse_rows=True) + load_rows + commit_rows (SparseFFN's path): the same neurons
    resident as the packing path's, every row its id's bundle, no row moved for an eviction
    that a load replaces; a failed read (drop_replaced) leaves a consistent cache."""
    rng = np.random.default_rng(capacity)
    n_neurons, bundle = 100, 8
    store = rng.integers(0, 256, (n_neurons, bundle), dtype=np.uint8)
    packed = NeuronCache(n_neurons, bundle, capacity, window, pin_capacity)
    cache = NeuronCache(n_neurons, bundle, capacity, window, pin_capacity)
    for t in range(1500):
        predicted = np.unique(rng.choice(n_neurons, int(rng.integers(0, 2 * capacity)))).astype(np.int64)
        expected, expected_evicted = packed.step(predicted)
        packed.insert(expected, store[expected])
        to_load, evicted = cache.step(predicted, reuse_rows=True)
        assert to_load.tolist() == expected.tolist() and sorted(evicted.tolist()) == sorted(expected_evicted.tolist())
        if to_load.size:
            rows = cache.load_rows(to_load.size)
            if t % 97 == 5:  # a read that fails part-way: the loads are not there, the rest is intact
                cache.rows[rows[: rows.size // 2]] = 0  # what a partial read left in the replaced rows
                cache.drop_replaced()
                check_invariants(cache, store)
                packed.step(np.zeros(0, np.int64))  # resynchronise the model: a fresh pair from here
                packed, cache = NeuronCache(n_neurons, bundle, capacity, window, pin_capacity), \
                    NeuronCache(n_neurons, bundle, capacity, window, pin_capacity)
                continue
            cache.rows[rows] = store[to_load]
            cache.commit_rows(to_load, rows)
        check_invariants(cache, store)
        assert sorted(cache.resident_ids().tolist()) == sorted(packed.resident_ids().tolist())


def test_load_rows_asks_for_what_the_step_freed():
    cache = NeuronCache(10, 4, capacity=3, window=1)
    cache.step(np.array([0, 1, 2]), reuse_rows=True)
    with pytest.raises(ValueError, match=r"load_rows\(4\) after a step that left 0 rows to replace, 3 free past n"):
        cache.load_rows(4)
