"""Shared bench helpers: load-average guard, interleaved timing and median/spread formatting."""

from __future__ import annotations

import os
import statistics
import sys
import time


def check_quiet(allow_busy: bool, where: str = "start", own_threads: int = 0) -> str:
    """Fail loudly (exit 3) when the 1-minute load average exceeds 0.75 x cores, unless ``allow_busy``: then
    every figure is printed with a BUSY tag. Returns the tag ("" on a quiet machine).

    At the end of a run the bench's own ``own_threads`` are in the load average (2 compute threads keep it near 2
    on a 2-core machine), so the limit there is ``own_threads + 0.5``: another process adding half a core or more
    is still caught."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    limit = own_threads + 0.5 if own_threads else 0.75 * cores
    print(f"load average at {where}: {load:.2f} on {cores} cores (limit {limit:.2f})", flush=True)
    if load <= limit:
        return ""
    msg = f"machine busy: load average {load:.2f} > {limit:.2f} on {cores} cores; ratios would be misleading"
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
