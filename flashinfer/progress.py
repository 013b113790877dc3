"""A one-line progress display for long work: shown on a TTY, silent when piped."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, label: str, total_bytes: int | None = None, stream=None, min_interval_s: float = 0.2):
        self.label = label
        self.total = total_bytes
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.start = time.perf_counter()
        self._last = 0.0
        self.min_interval_s = min_interval_s
        self.done = 0

    def __call__(self, done_bytes: int, total_bytes: int | None = None) -> None:
        self.done = done_bytes
        if total_bytes is not None:
            self.total = total_bytes
        now = time.perf_counter()
        if not self.enabled or now - self._last < self.min_interval_s:
            return
        self._last = now
        rate = done_bytes / max(now - self.start, 1e-9)
        share = f" {100 * done_bytes / self.total:5.1f}%" if self.total else ""
        self.stream.write(f"\r{self.label}{share} {done_bytes / 1e6:9.1f} MB  {rate / 1e6:7.1f} MB/s\033[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\r\033[K")
            self.stream.flush()
