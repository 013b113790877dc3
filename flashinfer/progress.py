"""A one-line progress display for long work: shown on a TTY, silent when piped."""

from __future__ import annotations

import sys
import time


class Progress:
    """progress(done, total) redraws one line at most every `min_interval_s`.

    unit "bytes" shows MB and MB/s; any other unit (e.g. "layers", "tokens") shows
    "done/total unit" and the rate per second."""

    def __init__(self, label: str, total: int | None = None, stream=None, min_interval_s: float = 0.2,
                 unit: str = "bytes"):
        self.label = label
        self.total = total
        self.unit = unit
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.start = time.perf_counter()
        self._last: float | None = None  # None: nothing drawn yet (perf_counter's origin is arbitrary)
        self.min_interval_s = min_interval_s
        self.done = 0

    def __call__(self, done: int, total: int | None = None) -> None:
        self.done = done
        if total is not None:
            self.total = total
        now = time.perf_counter()
        final = self.total is not None and done >= self.total
        throttled = self._last is not None and now - self._last < self.min_interval_s
        if not self.enabled or (throttled and not final):
            return
        self._last = now
        self.stream.write(f"\r{self.line(now)}\033[K")
        self.stream.flush()

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        share = f" {100 * self.done / self.total:5.1f}%" if self.total else ""
        if self.unit == "bytes":
            return f"{self.label}{share} {self.done / 1e6:9.1f} MB  {rate / 1e6:7.1f} MB/s"
        of = f"/{self.total}" if self.total else ""
        return f"{self.label}{share} {self.done}{of} {self.unit}  {rate:.2f} {self.unit}/s"

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
