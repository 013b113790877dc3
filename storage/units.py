"""Parsing the sizes, bandwidths and durations users type (`--dram 2GB`, `--flash-bw 1GB/s`).

Units, as on drive and phone spec sheets:
  decimal  B, KB (also kB), MB, GB, TB  = 1, 10^3, 10^6, 10^9, 10^12 bytes
  binary   KiB, MiB, GiB, TiB            = 2^10, 2^20, 2^30, 2^40 bytes
The unit prefix is case-insensitive but the byte "B" must be upper case: "Gb" is gigaBITS
on spec sheets, and reading it as bytes would be off by a factor of eight.
A bare number means bytes (sizes), bytes per second (bandwidths) or seconds (durations).
Durations: ns, us (also µs), ms, s.
Arithmetic is exact (fractions), so "1.1GB" is exactly 1_100_000_000 bytes.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

from storage.errors import ConfigValueError

BYTE_UNITS: dict[str, int] = {
    "": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
    "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40,
}
DURATION_UNITS: dict[str, Fraction] = {
    "ns": Fraction(1, 10**9), "us": Fraction(1, 10**6), "µs": Fraction(1, 10**6), "μs": Fraction(1, 10**6),
    "ms": Fraction(1, 10**3), "s": Fraction(1),
}

_NUMBER = r"(?P<number>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?)"
_BYTES = r"(?P<prefix>[kKmMgGtT][iI]?)?(?P<byte>[bB])"
SIZE_PATTERN = re.compile(rf"^\s*{_NUMBER}\s*(?:{_BYTES})?\s*$")
BANDWIDTH_PATTERN = re.compile(rf"^\s*{_NUMBER}\s*(?:{_BYTES}\s*/\s*s)?\s*$")
DURATION_PATTERN = re.compile(rf"^\s*{_NUMBER}\s*(?P<unit>ns|us|µs|μs|ms|s)?\s*$")

SIZE_FORMS = ("a number of bytes like 2GB, 512MiB, 1.5GiB or 2000000000 "
              "(KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = powers of 1024)")
BANDWIDTH_FORMS = ("bytes per second like 1GB/s, 500MB/s, 1.5GiB/s or 1000000000 "
                   "(KB, MB, GB, TB = powers of 1000; KiB, MiB, GiB, TiB = powers of 1024)")
DURATION_FORMS = "a duration like 50us, 1.5ms, 100ns, 2s or 0.002 (seconds)"


def _number_given(value, what: str, forms: str) -> Fraction | None:
    """An int/float value as a Fraction; None when the value is a string to parse."""
    if isinstance(value, str):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigValueError(f"{what} must be a string or a number, got {type(value).__name__} {value!r}; "
                               f"expected {forms}")
    if not math.isfinite(value) or value < 0:
        raise ConfigValueError(f"{what} {value!r} must be a finite number >= 0; expected {forms}")
    return Fraction(value)


def _bytes_from_match(match: re.Match, text: str, what: str, forms: str) -> Fraction:
    if match.group("byte") == "b":
        raise ConfigValueError(f"cannot parse {what} {text!r}: a lower-case 'b' means bits; "
                               f"write 'B' for bytes. Expected {forms}")
    prefix = (match.group("prefix") or "").lower()
    return Fraction(match.group("number")) * BYTE_UNITS[prefix]


def parse_size(value: str | int | float) -> int:
    """'2GB' -> 2_000_000_000, '512MiB' -> 536_870_912, '4096' -> 4096 (whole bytes)."""
    number = _number_given(value, "size", SIZE_FORMS)
    if number is None:
        match = SIZE_PATTERN.match(value)
        if match is None:
            hint = " (a size has no '/s')" if "/" in value else ""
            raise ConfigValueError(f"cannot parse size {value!r}{hint}; expected {SIZE_FORMS}")
        number = _bytes_from_match(match, value, "size", SIZE_FORMS)
    if number.denominator != 1:
        raise ConfigValueError(f"size {value!r} is not a whole number of bytes ({float(number)!r})")
    return int(number)


def parse_bandwidth(value: str | int | float) -> float:
    """'1GB/s' -> 1e9, '1GiB/s' -> 1073741824.0, '5e8' -> 5e8 (bytes per second, > 0)."""
    number = _number_given(value, "bandwidth", BANDWIDTH_FORMS)
    if number is None:
        match = BANDWIDTH_PATTERN.match(value)
        if match is None:
            hint = " (did you forget '/s'?)" if SIZE_PATTERN.match(value) else ""
            raise ConfigValueError(f"cannot parse bandwidth {value!r}{hint}; expected {BANDWIDTH_FORMS}")
        number = _bytes_from_match(match, value, "bandwidth", BANDWIDTH_FORMS)
    if number <= 0:
        raise ConfigValueError(f"bandwidth {value!r} must be greater than zero (omit it for no cap)")
    return float(number)


def parse_duration(value: str | int | float) -> float:
    """'50us' -> 5e-05, '1.5ms' -> 0.0015, '2' -> 2.0 (seconds, >= 0)."""
    number = _number_given(value, "duration", DURATION_FORMS)
    if number is None:
        match = DURATION_PATTERN.match(value)
        if match is None:
            raise ConfigValueError(f"cannot parse duration {value!r}; expected {DURATION_FORMS}")
        number = Fraction(match.group("number")) * DURATION_UNITS[match.group("unit") or "s"]
    return float(number)
