"""One line describing the machine a bench ran on (cores, RAM, CPU), for RESULTS.md."""

from __future__ import annotations

import os
import platform

import psutil


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram_gib = psutil.virtual_memory().total / 2**30
    return f"{os.cpu_count()} cores ({cpu}), {ram_gib:.0f} GiB RAM, Python {platform.python_version()}"

