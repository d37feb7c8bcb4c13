"""What the benchmark suites share: timing steps with the resident-set growth, running each
measurement in its own worker process, and the rows of their ratio tables."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import numpy as np


# ----------------------------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak() -> bool:
    """Reset the resident-set high-water mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


class PeakMeter:
    """Growth of the resident set above its level at ``start()`` (its high-water mark)."""

    def start(self):
        import gc
        gc.collect()
        self.ok = _reset_peak()
        self.base = _rss_bytes()

    def stop(self) -> float | None:
        return (_peak_bytes() - self.base) / 2**20 if self.ok else None


def time_steps(step, n: int, warmup: int = 2) -> dict:
    for _ in range(warmup):
        step()
    meter = PeakMeter()
    meter.start()
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    return {"median_s": float(np.median(ts)), "min_s": float(min(ts)), "peak_mb": meter.stop(), "steps": n}


# ----------------------------------------------------------------------------- workers

# glibc keeps freed memory mapped once its mmap threshold has grown (after the first large
# free), which would hide a framework's per-step allocations from the resident set after the
# warm-up steps: a fixed threshold returns every large block to the system when freed.  It
# also makes every large allocation a fresh mapping (page faults), which slows PyTorch down
# by up to 2x: so times come from a run with the default allocator and peak memory from a
# separate, shorter run with this setting (``spawn_worker(..., memory=True)``)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def spawn_worker(module: str, spec: list[str], env: dict | None = None, timeout: float = 1800,
                 memory: bool = False) -> dict:
    """Run ``python -m module --worker *spec`` and return the JSON it prints last (or
    ``{"error": ...}`` with the tail of its output)."""
    cmd = [sys.executable, "-m", module, "--worker", *spec]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(MALLOC_ENV if memory else {}), **(env or {})})
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    last = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not last:
        tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail) or f"exit status {p.returncode}"}
    return json.loads(last[-1])


def have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def fmt_mb(v):
    return "-" if v is None else f"{v:8.1f}"


def ratio_row(label: str, r: dict, ours: dict, width: int, min_width: int) -> str:
    """One row of a step-time table: median, minimum, how much faster ours is, peak MB."""
    if "error" in r:
        return f"  {label:{width}} failed: {r['error']}"
    ratio = "" if r is ours or "error" in ours else f"{r['median_s'] / ours['median_s']:14.2f}x"
    return (f"  {label:{width}} {r['median_s'] * 1e3:9.1f} {r['min_s'] * 1e3:{min_width}.1f} {ratio:>15} "
            f"{fmt_mb(r.get('peak_mb'))}")
