"""The DRAM neuron cache of one FFN layer (LLM in a flash, section 3.3).

A preallocated row-packed matrix of `capacity` bundles (the store's row-column bundle
layout, so the sparse FFN kernel runs over rows 0..n-1 in one pass), a `row_to_id` array
and an `id_to_row` array (-1 when absent), and the count `n` of rows in use.

- insert appends at row n (or the caller reads into `free_rows` and `commit`s);
- delete of row r copies row n-1 into r, fixes both maps and decrements n:
  no holes, no reallocation, the live rows stay packed;
- windowing: a neuron stays while it was predicted active in one of the last `window`
  tokens; under pressure (the window's neurons exceed the capacity) the least recently
  predicted go first.
- a hot set (`pin_capacity` > 0): the `pin_capacity` neurons predicted most often in this
  sequence (recounted every PIN_REFRESH tokens) are never evicted once resident; the window
  and LRU run over the other rows. A pure window keeps a neuron for as long as it keeps
  reappearing within `window` tokens; when consecutive tokens share little (a tight cap, text
  whose active sets drift) it evicts neurons that fire on a large share of all tokens
  (PowerInfer's power law) and reads them again a few tokens later.

Row moves are numba kernels: a 7B model churns hundreds of neurons per layer per token.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def _delete_rows(rows, row_to_id, id_to_row, n, victims):
    """Delete the neurons `victims` (ids, all resident); returns the new n."""
    for i in range(victims.shape[0]):
        r = id_to_row[victims[i]]
        last = n - 1
        if r != last:
            moved = row_to_id[last]
            rows[r, :] = rows[last, :]
            row_to_id[r] = moved
            id_to_row[moved] = r
        id_to_row[victims[i]] = -1
        row_to_id[last] = -1
        n -= 1
    return n


PIN_REFRESH = 8  # tokens between recounts of the hot set


class NeuronCache:
    def __init__(self, n_neurons: int, bundle_bytes: int, capacity: int, window: int = 5, pin_capacity: int = 0):
        if not 0 < capacity <= n_neurons:
            raise ValueError(f"capacity must be in 1..{n_neurons}, got {capacity}")
        if window < 1:
            raise ValueError(f"window must be >= 1 token, got {window}")
        if not 0 <= pin_capacity <= capacity:
            raise ValueError(f"pin_capacity must be in 0..{capacity}, got {pin_capacity}")
        self.capacity = capacity
        self.window = window
        self.pin_capacity = pin_capacity
        self.counts = np.zeros(n_neurons if pin_capacity else 0, np.int64)  # tokens each neuron was predicted in
        self.pinned = np.zeros(n_neurons, np.bool_)  # the hot set (recounted every PIN_REFRESH tokens)
        self.rows = np.zeros((capacity, bundle_bytes), np.uint8)
        self.row_to_id = np.full(capacity, -1, np.int32)
        self.id_to_row = np.full(n_neurons, -1, np.int32)
        self.last_active = np.full(n_neurons, -(2**40), np.int64)  # token index a neuron was last predicted
        self.n = 0
        self.token = 0  # tokens seen
        self._replaced = np.zeros(0, np.int32)  # evicted by step(reuse_rows=True), their rows for load_rows

    @property
    def nbytes(self) -> int:
        return (self.rows.nbytes + self.row_to_id.nbytes + self.id_to_row.nbytes + self.last_active.nbytes
                + self.counts.nbytes + self.pinned.nbytes)

    def resident_ids(self) -> np.ndarray:
        return self.row_to_id[: self.n]

    def missing(self, predicted: np.ndarray) -> np.ndarray:
        """The predicted ids (sorted, unique) not resident."""
        return predicted[self.id_to_row[predicted] < 0]

    def step(self, predicted: np.ndarray, reuse_rows: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Start a token whose predicted active neurons are `predicted` (sorted, unique int).

        Marks them used, evicts neurons that fell out of the window, and, if the predicted
        set still does not fit, the least recently predicted others (never the hot set's). Returns
        (ids to load, ids evicted). If `predicted` does not fit beside the hot set's other rows,
        its resident ids (hits) stay and only as many missing ones as the other rows make room
        for are to load: the rest, `missing(predicted)` once those are committed, are the
        caller's to compute from a scratch read (SparseFFN does). The cache is never emptied
        for an oversized set.

        reuse_rows: as many evicted neurons as there are ids to load keep their rows until the
        loads are read into them (load_rows, commit_rows) instead of each hole being closed by
        moving the last row in: each eviction of a packed cache copied a whole bundle (6.9 KB on
        the Mistral-7B shape, ~1200 a layer and token: 4.35 ms a layer). After a failed read,
        drop_replaced deletes them as step would have. free_rows/commit must not be used until
        one of the two."""
        t = self.token
        self.token += 1
        self.last_active[predicted] = t
        if self.pin_capacity:
            self._count(predicted, t)
        live = self.row_to_id[: self.n]
        stale = self._out_of_window(t)
        missing = self.missing(predicted)
        held = 0  # rows of hot-set neurons not predicted now: never evicted, so no room for loads
        if self.pin_capacity:
            held = int(np.count_nonzero(self.pinned[live])) - int(np.count_nonzero(self.pinned[predicted]
                                                                                   & (self.id_to_row[predicted] >= 0)))
        to_load = missing[: max(0, self.capacity - (predicted.size - missing.size) - held)]  # room beside the hits
        overflow = self.n - stale.size + to_load.size - self.capacity
        if overflow > 0:  # pressure: evict the least recently predicted that are not needed now
            keep = np.setdiff1d(live, stale)  # sorted: ties in recency go to the lower id, whatever the rows' order
            # not by recency: read-ahead rows of a 1-token window are stamped t too (commit_prefetched)
            keep = keep[~np.isin(keep, predicted, assume_unique=True)]
            if self.pin_capacity:
                keep = keep[~self.pinned[keep]]
            lru = keep[np.argsort(self.last_active[keep], kind="stable")[:overflow]]
            stale = np.concatenate([stale, lru])
        victims = stale.astype(np.int32)
        reused = min(to_load.size, stale.size) if reuse_rows else 0
        self._replaced = victims[:reused]
        self.n = _delete_rows(self.rows, self.row_to_id, self.id_to_row, self.n, victims[reused:])
        return to_load, stale

    def load_rows(self, k: int) -> np.ndarray:
        """The rows the next k loads go to (after step(reuse_rows=True)): those of the neurons
        it evicted for them, then free rows past n."""
        extra = k - self._replaced.size
        if extra < 0 or self.n + extra > self.capacity:
            raise ValueError(f"load_rows({k}) after a step that left {self._replaced.size} rows to replace, "
                             f"{self.capacity - self.n} free past n")
        return np.concatenate([self.id_to_row[self._replaced].astype(np.int64),
                               np.arange(self.n, self.n + extra, dtype=np.int64)])

    def commit_rows(self, ids: np.ndarray, rows: np.ndarray) -> None:
        """Register `ids` as read into `rows` (load_rows(len(ids))): the neurons they replace go."""
        self.id_to_row[self._replaced] = -1
        self.row_to_id[rows] = ids
        self.id_to_row[ids] = rows.astype(np.int32)
        self.n += rows.size - self._replaced.size
        self._replaced = self._replaced[:0]

    def drop_replaced(self) -> None:
        """After a failed read between step(reuse_rows=True) and commit_rows: delete the neurons
        the loads were to replace (their rows may hold part of a load), as step would have."""
        self.n = _delete_rows(self.rows, self.row_to_id, self.id_to_row, self.n, self._replaced)
        self._replaced = self._replaced[:0]

    def _count(self, predicted: np.ndarray, t: int) -> None:
        """Count this token's predictions; every PIN_REFRESH tokens, make the hot set the
        pin_capacity most counted neurons (ties: the lower ids)."""
        self.counts[predicted] += 1
        if t % PIN_REFRESH == PIN_REFRESH - 1 or t == 0:
            counted = np.flatnonzero(self.counts)
            hot = counted[np.argsort(-self.counts[counted], kind="stable")[: self.pin_capacity]]
            self.pinned[:] = False
            self.pinned[hot] = True

    def _out_of_window(self, t: int) -> np.ndarray:
        """Resident ids not predicted in the `window` tokens up to token t (none of the hot set)."""
        live = self.row_to_id[: self.n]
        old = self.last_active[live] <= t - self.window
        if self.pin_capacity:
            old &= ~self.pinned[live]
        return live[old]

    def free_rows(self, k: int) -> np.ndarray:
        """The next `k` unused rows (a view): read bundles straight into them, then `commit`.
        Saves a staging copy as large as a layer's cache."""
        if self.n + k > self.capacity:
            raise ValueError(f"cache overflow: {self.n} + {k} rows > capacity {self.capacity}")
        return self.rows[self.n : self.n + k]

    def commit(self, ids: np.ndarray) -> None:
        """Register `ids` as the contents of the rows `free_rows(len(ids))` returned."""
        k = ids.size
        if self.n + k > self.capacity:
            raise ValueError(f"cache overflow: {self.n} + {k} rows > capacity {self.capacity}")
        self.row_to_id[self.n : self.n + k] = ids
        self.id_to_row[ids] = np.arange(self.n, self.n + k, dtype=np.int32)
        self.n += k

    def make_room_for_prefetch(self, guess: np.ndarray) -> np.ndarray:
        """Before the next `step`: evict what that step would evict anyway (out of the window)
        and return the guessed ids that are missing and fit in the free rows — the ones to
        read ahead, into `free_rows`, then `commit_prefetched`. Never evicts a live neuron."""
        stale = self._out_of_window(self.token)  # the token the next step() starts
        self.n = _delete_rows(self.rows, self.row_to_id, self.id_to_row, self.n, stale.astype(np.int32))
        return self.missing(guess)[: self.capacity - self.n]

    def commit_prefetched(self, ids: np.ndarray) -> None:
        """Register read-ahead rows. They count as predicted just inside the window, so the
        next step keeps them, and the one after drops them unless they were predicted."""
        self.commit(ids)
        self.last_active[ids] = np.maximum(self.last_active[ids], self.token - self.window + 1)

    def commit_unpredicted(self, ids: np.ndarray) -> None:
        """Register rows read without a prediction (SparseFFN reads a layer its cache holds whole up
        front): stamped as predicted at the current token, so the window keeps them as long as it
        keeps a neuron predicted now; with the initial stamp, the next step evicted them at once."""
        self.commit(ids)
        self.last_active[ids] = np.maximum(self.last_active[ids], self.token)

    def insert(self, ids: np.ndarray, bundles: np.ndarray) -> None:
        """Append bundles (uint8 [len(ids), bundle_bytes]) for ids not yet resident."""
        self.free_rows(ids.size)[:] = bundles
        self.commit(ids)

    def check(self) -> None:
        """Assert the maps agree with each other and with `n` (tests run it after injected read
        faults): rows 0..n-1 hold distinct ids whose id_to_row points back, no other id has a row."""
        live = self.row_to_id[: self.n]
        assert 0 <= self.n <= self.capacity, (self.n, self.capacity)
        assert (live >= 0).all() and np.unique(live).size == live.size, "a row holds no id, or an id twice"
        assert (self.id_to_row[live] == np.arange(self.n)).all(), "id_to_row disagrees with row_to_id"
        assert (self.row_to_id[self.n :] == -1).all(), "a row past n holds an id"
        assert int((self.id_to_row >= 0).sum()) == self.n, "an id points at a row it does not hold"

    def clear(self) -> None:
        """Drop every row (keeps the token count and recency)."""
        self.id_to_row[self.row_to_id[: self.n]] = -1
        self.row_to_id[: self.n] = -1
        self.n = 0

    def reset(self) -> None:
        self.clear()
        self.last_active[:] = -(2**40)
        self.counts[:] = 0
        self.pinned[:] = False
        self.token = 0


def simulated_miss_share(predicted: np.ndarray, capacity: int, window: int, pin_capacity: int) -> float:
    """The share of predicted neurons a NeuronCache of `capacity` rows would read over a
    sequence of tokens whose predicted sets are `predicted` (bool [tokens, n_neurons]): the
    cache's own policy run on entries without rows (bundle_bytes 0). Calibration records it at
    a few cache sizes (flashinfer/calibrate.py), so a choice made before the first token
    (flashinfer/auto_predictor.py) knows what the caches will spare."""
    cache = NeuronCache(predicted.shape[1], 0, capacity, window, pin_capacity)
    misses = wanted = 0
    for row in predicted:
        ids = np.flatnonzero(row)
        to_load, _ = cache.step(ids)
        misses += cache.missing(ids).size  # the loads and what overflows to the scratch read
        cache.commit(to_load)
        wanted += ids.size
    return misses / max(wanted, 1)
