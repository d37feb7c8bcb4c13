"""`narch profile`: run a compiled program and say where the time goes.

    narch profile gpt2-tiny --train --iters 100 --trace gpt2.json

Per kernel: time per call, share of the time in kernels, and a rate: GFLOP/s for kernels
holding matmuls (2*M*N*K per product) or GB/s for the others (bytes of the buffers the
kernel reads plus those it writes, each counted once).  Per call: the wall time of the
Python call, the time in kernels, and the difference, the Python-side overhead (argument
checks, pointer setup, output allocation, the ctypes call).

The program is built with ``options={"profile": True}``: its native entry point reads
CLOCK_MONOTONIC around every kernel (runtime/program.py), accumulating nanoseconds per
kernel and keeping each kernel's last start time, on the same clock as Python's
``time.monotonic_ns``, so the Chrome trace (``--trace``; open it in Perfetto or
chrome://tracing) places every kernel of every call exactly inside its Python call.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass

import numpy as np


@dataclass
class KernelStat:
    index: int
    name: str
    strategy: str
    tasks: int
    ops: str
    ns_per_call: float
    share: float
    flops: int
    bytes: int

    @property
    def gflops(self) -> float:
        return self.flops / self.ns_per_call if self.flops and self.ns_per_call else math.nan

    @property
    def gbytes(self) -> float:
        return self.bytes / self.ns_per_call if self.bytes and self.ns_per_call else math.nan


def kernel_flops(kern, types) -> int:
    """2*M*N*K (times the batch) for every matmul the kernel holds."""
    total = 0
    for n in kern.nodes:
        if n.op == "matmul":
            k = types[n.inputs[0]].shape[-1] if types[n.inputs[0]].shape else 1
            total += 2 * n.type.size * k
    return total


def kernel_bytes(kern, types) -> int:
    names = set(kern.inputs) | set(kern.outputs)
    return sum(types[v].nbytes for v in names if v in types)


@dataclass
class Profile:
    label: str
    iters: int
    kernels: list
    wall_ns: list          # per call
    kernel_ns: list        # per call: time in kernels
    events: list           # Chrome trace events

    @property
    def overhead_ns(self) -> float:
        return float(np.mean(np.array(self.wall_ns) - np.array(self.kernel_ns)))

    def table(self, top: int | None = None) -> str:
        wall, ink = float(np.mean(self.wall_ns)), float(np.mean(self.kernel_ns))
        lines = [f"{self.label}: {len(self.kernels)} kernels, {self.iters} calls",
                 f"per call: {wall / 1e3:.1f} us wall (median {np.median(self.wall_ns) / 1e3:.1f}), "
                 f"{ink / 1e3:.1f} us in kernels, {self.overhead_ns / 1e3:.1f} us Python-side overhead "
                 f"({100 * self.overhead_ns / wall if wall else 0:.1f}%)",
                 f"{'#':>4} {'kernel':<22} {'strategy':<16} {'us/call':>9} {'share':>6} {'GFLOP/s':>8} "
                 f"{'GB/s':>7}  ops"]
        rows = sorted(self.kernels, key=lambda k: -k.ns_per_call)
        for k in rows[:top]:
            rate_f = f"{k.gflops:8.2f}" if k.flops else f"{'':>8}"
            rate_b = f"{k.gbytes:7.2f}" if not k.flops else f"{'':>7}"
            strat = k.strategy + (f"x{k.tasks}" if k.tasks > 1 else "")
            lines.append(f"{k.index:>4} {k.name[:22]:<22} {strat[:16]:<16} {k.ns_per_call / 1e3:9.2f} "
                         f"{100 * k.share:5.1f}% {rate_f} {rate_b}  {k.ops[:60]}")
        if top is not None and len(rows) > top:
            rest = sum(k.ns_per_call for k in rows[top:])
            lines.append(f"     ({len(rows) - top} more kernels: {rest / 1e3:.2f} us/call)")
        return "\n".join(lines)

    def chrome_trace(self) -> dict:
        return {"traceEvents": self.events, "displayTimeUnit": "ns",
                "otherData": {"target": self.label, "iters": self.iters}}


def profile_program(graph, inputs, label: str, iters: int = 50, warmup: int = 3, options=None) -> Profile:
    """Run ``graph`` compiled with per-kernel timers (plus ``options``, e.g. a training step's
    in-place updates: then ``inputs`` are updated in place, as the step's are)."""
    from neural_arch.runtime.program import Program
    # (all threads throughout: per-kernel times of calls on one thread would mix in)
    prog = Program(graph, options={**(options or {}), "profile": True, "adapt_threads": False})
    arrays = [np.require(a, requirements="C") for a in inputs]
    # outputs written into the same arrays every call, as a training loop's are: fresh ones
    # would page-fault on their first writes (a training graph's outputs are its parameters
    # and optimizer moments: those kernels would look 0.1-0.3 ms slower each)
    outs = prog.output_arrays()
    for _ in range(warmup):
        prog(*arrays, out=outs)
    prog._prof[:] = 0
    prog.calls = 0
    types = prog.graph.types
    kernels = prog.kernels
    wall, inside, events = [], [], []
    pid = os.getpid()
    events.append({"ph": "M", "name": "process_name", "pid": pid, "args": {"name": f"narch {label}"}})
    events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": 1, "args": {"name": "Python call"}})
    events.append({"ph": "M", "name": "thread_name", "pid": pid, "tid": 2, "args": {"name": "kernels"}})
    t_origin = None
    before = prog._prof.copy()
    for it in range(iters):
        t0 = time.monotonic_ns()
        prog(*arrays, out=outs)
        t1 = time.monotonic_ns()
        after = prog._prof.copy()
        durs = after - before
        before = after
        wall.append(t1 - t0)
        inside.append(int(durs.sum()))
        if t_origin is None:
            t_origin = t0
        events.append({"name": f"call {it}", "cat": "call", "ph": "X", "pid": pid, "tid": 1,
                       "ts": (t0 - t_origin) / 1e3, "dur": (t1 - t0) / 1e3,
                       "args": {"in_kernels_us": int(durs.sum()) / 1e3,
                                "overhead_us": (t1 - t0 - int(durs.sum())) / 1e3}})
        for k, kern in enumerate(kernels):
            start = int(prog.kernel_starts[k])
            events.append({"name": kern.name, "cat": kern.strategy, "ph": "X", "pid": pid, "tid": 2,
                           "ts": (start - t_origin) / 1e3, "dur": int(durs[k]) / 1e3,
                           "args": {"ops": " ".join(n.op for n in kern.nodes), "tasks": kern.tasks}})
    total = float(prog._prof.sum()) or 1.0
    stats = []
    for k, kern in enumerate(kernels):
        ns = float(prog._prof[k]) / max(iters, 1)
        stats.append(KernelStat(k, kern.name, kern.strategy, kern.tasks, " ".join(n.op for n in kern.nodes),
                                ns, float(prog._prof[k]) / total, kernel_flops(kern, types),
                                kernel_bytes(kern, types)))
    return Profile(label, iters, stats, wall, inside, events)


def write_trace(profile: Profile, path: str) -> None:
    with open(path, "w") as f:
        json.dump(profile.chrome_trace(), f)
