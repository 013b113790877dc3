"""A token-bucket bandwidth throttle that makes a fast disk read like a phone's flash.

One `Throttle` is shared by all reader threads. Each read calls `acquire(nbytes)` before
(or after) issuing its pread; the call blocks until the bucket has paid for the bytes,
plus a fixed per-request latency.

How the bucket works ("reserve, then sleep"): under the lock a caller refills the bucket
for the time elapsed (at `bw_bytes_per_s`, capped at `burst_bytes`) and takes its bytes out,
letting the level go negative. A negative level is debt: the caller sleeps `debt / bw`
OUTSIDE the lock, and later callers see the debt and queue behind it. So a request larger
than the bucket still works (it just waits longer), no thread holds the lock while
sleeping, and over any window the granted bytes are at most `burst + bw * window`.

The bucket starts EMPTY: a phone's flash has no stored-up credit when the model starts,
and a full bucket would make the first second read faster than the cap. `burst_bytes`
exists to absorb sleep overshoot: if a sleeper wakes late, the time it overslept is
credited back (up to `burst_bytes`) instead of being lost, so the long-run rate stays on
target. The default, 10 ms of bandwidth, covers the 0.05-1 ms overshoot of time.sleep on
Linux with room to spare, and lets at most 1% extra through in any 1 s window.

Latency is per request and does not consume bandwidth: concurrent requests wait out their
latencies in parallel, as a flash device with a deep command queue does.

`Throttle(None)` is off: `enabled` is False so readers can skip the call entirely, and
`acquire` returns at once. A latency without a bandwidth cap is allowed (enabled, latency only).
"""

from __future__ import annotations

import threading
import time

from storage.errors import ConfigValueError
from storage.units import parse_bandwidth, parse_duration, parse_size

DEFAULT_BURST_S = 0.010  # seconds of bandwidth the bucket holds by default (see module docstring)


class Throttle:
    def __init__(self, bw_bytes_per_s: float | None, latency_s: float = 0.0, burst_bytes: int | None = None):
        if bw_bytes_per_s is not None and not bw_bytes_per_s > 0:
            raise ConfigValueError(f"throttle bandwidth must be > 0 bytes/s (or None for no cap), got {bw_bytes_per_s!r}")
        if not latency_s >= 0:
            raise ConfigValueError(f"throttle latency must be >= 0 seconds, got {latency_s!r}")
        if burst_bytes is not None and not burst_bytes > 0:
            raise ConfigValueError(f"throttle burst must be > 0 bytes, got {burst_bytes!r}")
        self.bw_bytes_per_s = None if bw_bytes_per_s is None else float(bw_bytes_per_s)
        self.latency_s = float(latency_s)
        if self.bw_bytes_per_s is None:
            self.burst_bytes = None
        else:
            self.burst_bytes = float(burst_bytes) if burst_bytes is not None else self.bw_bytes_per_s * DEFAULT_BURST_S
        self.enabled = self.bw_bytes_per_s is not None or self.latency_s > 0
        self._lock = threading.Lock()
        self._level_bytes = 0.0  # may go negative: debt that the next callers sleep off
        self._refilled_at = time.perf_counter()
        self.bytes_acquired = 0  # totals for profiling, updated under the lock
        self.requests = 0

    @classmethod
    def from_strings(cls, flash_bw: str | float | None, latency: str | float | None = None,
                     burst: str | int | None = None) -> Throttle:
        """Build from user-facing values: Throttle.from_strings("1GB/s", "50us")."""
        return cls(None if flash_bw is None else parse_bandwidth(flash_bw),
                   0.0 if latency is None else parse_duration(latency),
                   None if burst is None else parse_size(burst))

    @classmethod
    def for_options(cls, flash_bw: str | float | None, latency: str | float | None = None) -> Throttle | None:
        """The throttle of a run's --flash-bw / --flash-latency, or None when neither is given
        (reads go at the disk's own speed, with no bookkeeping)."""
        return cls.from_strings(flash_bw, latency) if flash_bw or latency else None

    def acquire(self, nbytes: int) -> None:
        """Block the calling thread until `nbytes` may be read, plus the per-request latency."""
        if not self.enabled:
            return
        if nbytes < 0:
            raise ValueError(f"cannot acquire a negative number of bytes ({nbytes})")
        wait_s = self.latency_s
        with self._lock:
            self.bytes_acquired += nbytes
            self.requests += 1
            if self.bw_bytes_per_s is not None:
                now = time.perf_counter()
                refill = (now - self._refilled_at) * self.bw_bytes_per_s
                self._level_bytes = min(self.burst_bytes, self._level_bytes + refill) - nbytes
                self._refilled_at = now
                if self._level_bytes < 0:
                    wait_s += -self._level_bytes / self.bw_bytes_per_s
        if wait_s > 0:
            time.sleep(wait_s)

    def __repr__(self) -> str:
        if not self.enabled:
            return "Throttle(off)"
        return (f"Throttle(bw_bytes_per_s={self.bw_bytes_per_s!r}, latency_s={self.latency_s!r}, "
                f"burst_bytes={self.burst_bytes!r})")
