"""Two buffers and a background thread: the layer being computed and the next one being read.

What streams from flash a whole layer at a time (the FFN layers that do not fit the cap, on the
dense path and on the gate predictor's, flash_ffn.FlashFFN) is read one layer ahead: `get(l)` waits for layer l's read (or
reads it now, the first time or after a jump) and starts the read of `following(l)` into the
other buffer, so it overlaps layer l's compute and the next layer's attention. The reads
(O_DIRECT preads in the reader's threads) release the GIL, as do the kernels, so on 2 cores they
really run side by side. A buffer handed out by get(l) stays valid until the next get.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

SLOTS = 2  # the layer in use and the one being read


class ReadAhead:
    def __init__(self, nbytes: int, read: Callable[[int, np.ndarray], None], following: Callable[[int], int | None],
                 name: str = "read-ahead"):
        """nbytes: the largest item; read(key, buffer) fills the buffer with item `key`;
        following(key): the item to read while `key` is used (None: nothing). The buffers are
        page-aligned, so O_DIRECT reads go straight into them (StoreReader.read_layer)."""
        from storage.reader import aligned_buffer

        self.buffers = [aligned_buffer(nbytes) for _ in range(SLOTS)]
        self._read, self._following = read, following
        self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._ahead: tuple[int, int, Future] | None = None  # (key, slot, read in flight)
        self._current: tuple[int, int] | None = None  # (key, slot) in DRAM for use
        self.last_fresh = False  # whether the last get() brought its item in (else it was there already)

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.buffers)

    def get(self, key: int) -> np.ndarray:
        """Item `key`'s buffer, read; the next item's read started."""
        if self._current is not None and self._current[0] == key:
            self.last_fresh = False
            return self.buffers[self._current[1]]
        ahead, self._ahead = self._ahead, None
        if ahead is not None and ahead[0] == key:
            slot = ahead[1]
            ahead[2].result()  # a read error surfaces here, in the layer that needs the item
        else:
            if ahead is not None:  # out of order (a jump): let it finish, it writes into a buffer
                ahead[2].exception()
            slot = 0 if self._current is None else 1 - self._current[1]
            self._current = None  # the slot's content is being replaced
            self._read(key, self.buffers[slot])
        self._current = (key, slot)
        following = self._following(key)
        if following is not None and following != key:
            self._ahead = (following, 1 - slot, self._io.submit(self._read, following, self.buffers[1 - slot]))
        self.last_fresh = True
        return self.buffers[slot]

    def close(self) -> None:
        ahead, self._ahead = self._ahead, None
        if ahead is not None:
            ahead[2].exception()  # the buffer must outlive the read; its error does not matter now
        self._io.shutdown(wait=True)
