"""Shared bench helpers: load-average guard, interleaved timing and median/spread formatting."""

from __future__ import annotations

import os
import statistics
import sys
import time


def check_quiet(allow_busy: bool, where: str = "start") -> str:
    """Fail loudly (exit 3) when the 1-minute load average exceeds 0.75 x cores, unless ``allow_busy``: then
    every figure is printed with a BUSY tag. Returns the tag ("" on a quiet machine)."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    print(f"load average at {where}: {load:.2f} on {cores} cores", flush=True)
    if load <= 0.75 * cores:
        return ""
    msg = f"machine busy: load average {load:.2f} > 0.75 x {cores} cores; ratios would be misleading"
    if not allow_busy:
        print(f"ERROR: {msg}. Rerun on a quiet machine (or pass --allow-busy to print figures tagged BUSY).", file=sys.stderr)
        sys.exit(3)
    print(f"WARNING: {msg}; figures below are tagged BUSY", flush=True)
    return " [BUSY]"


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def spread(values: list[float], unit: str = "s", digits: int = 3) -> str:
    """``median [min-max]``."""
    med = statistics.median(values)
    return f"{med:.{digits}f}{unit} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def ratio(num: list[float], den: list[float]) -> str:
    """Median ratio with the spread of per-round ratios (rounds are interleaved, so round i pairs up)."""
    rs = [a / max(b, 1e-9) for a, b in zip(num, den)]
    return f"{statistics.median(rs):.2f}x [{min(rs):.2f}-{max(rs):.2f}]"
