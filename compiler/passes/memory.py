"""Memory planning: every intermediate buffer gets an offset in one arena from its lifetime.

A buffer lives from the step that writes it to the last step that reads it.  Buffers are
placed greedily, largest first, at the lowest offset that does not overlap any placed buffer
whose lifetime intersects (a classic interval-colouring heuristic; it is optimal for most
chains we see and never worse than the naive sum).  In-place reuse: an elementwise step may
write its output over an input that dies at that step (same size), which the runtime can use
to skip a buffer altogether.

The plan is an analysis over a *schedule*: a list of steps, each reading some values and
writing one.  Without fusion every node is a step; after fusion a step is a kernel and only
values that cross kernels need buffers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..ir import Graph

ALIGN = 64  # bytes: a cache line, and enough for aligned <8 x float> loads


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


@dataclass(frozen=True)
class Step:
    writes: str
    reads: tuple[str, ...]
    elementwise: bool = False  # output element i depends only on input elements i (in-place legal)
    reuse: tuple[str, ...] | None = None  # the reads it may be written over (None: any, if elementwise)


@dataclass(frozen=True)
class Buffer:
    name: str
    nbytes: int
    offset: int
    start: int  # step index that writes it
    end: int  # last step index that reads it (inclusive)
    inplace_of: str | None = None  # shares the storage of this (dying) input


@dataclass
class MemoryPlan:
    buffers: dict[str, Buffer]
    arena_bytes: int
    naive_bytes: int
    outputs: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)

    def report(self) -> str:
        saved = 1 - self.arena_bytes / self.naive_bytes if self.naive_bytes else 0.0
        lines = [f"planned peak {self.arena_bytes:,} bytes vs {self.naive_bytes:,} bytes for all intermediates "
                 f"({saved:.0%} saved), {len(self.buffers)} buffers"]
        for b in sorted(self.buffers.values(), key=lambda b: (b.offset, b.start)):
            extra = f"  in place of %{b.inplace_of}" if b.inplace_of else ""
            lines.append(f"  %{b.name:<12} offset {b.offset:>10,}  {b.nbytes:>10,} B  steps {b.start}..{b.end}{extra}")
        return "\n".join(lines)


def plan_memory(steps: Sequence[Step], sizes: dict[str, int], outputs: Iterable[str] = (),
                external: Iterable[str] = ()) -> MemoryPlan:
    """Plan an arena for every value written by a step, except ``outputs`` (returned to the
    caller in their own storage) and ``external`` values (inputs the caller owns)."""
    outputs, external = tuple(outputs), set(external)
    last_use: dict[str, int] = {}
    for i, s in enumerate(steps):
        for r in s.reads:
            last_use[r] = i
    intervals = {}
    for i, s in enumerate(steps):
        if s.writes in external or s.writes in outputs:
            continue
        intervals[s.writes] = (i, last_use.get(s.writes, i))
    # in-place: an elementwise step may reuse an input buffer that dies here (same size)
    inplace: dict[str, str] = {}
    root = {}
    for i, s in enumerate(steps):
        if s.writes not in intervals or not s.elementwise:
            continue
        for r in (s.reads if s.reuse is None else s.reuse):
            r0 = root.get(r, r)
            if r in intervals and last_use.get(r) == i and sizes[r] == sizes[s.writes] \
                    and r not in inplace.values():
                inplace[s.writes] = r
                root[s.writes] = r0
                break
    # merge in-place chains into one interval per storage root
    storage: dict[str, list[str]] = {}
    for name in intervals:
        storage.setdefault(root.get(name, name), []).append(name)
    blocks = []
    for r, members in storage.items():
        start = min(intervals[m][0] for m in members)
        end = max(intervals[m][1] for m in members)
        blocks.append((r, _align(max(sizes[m] for m in members)), start, end, members))
    blocks.sort(key=lambda b: (-b[1], b[2]))
    placed: list[tuple[int, int, int, int]] = []  # offset, end offset, start step, end step
    offsets = {}
    for r, size, start, end, _ in blocks:
        busy = sorted([(lo, hi) for lo, hi, s0, e0 in placed if e0 >= start and s0 <= end])
        off = 0
        for lo, hi in busy:  # the lowest gap that fits
            if off + size <= lo:
                break
            if hi > off:
                off = hi
        offsets[r] = off
        placed.append((off, off + size, start, end))
    buffers = {}
    for r, size, start, end, members in blocks:
        for m in members:
            s0, e0 = intervals[m]
            buffers[m] = Buffer(m, sizes[m], offsets[r], s0, e0, inplace.get(m))
    arena = max((hi for _, hi, _, _ in placed), default=0)
    naive = sum(_align(sizes[n]) for n in intervals)
    return MemoryPlan(buffers, arena, naive, outputs)


def plan_graph_memory(graph: Graph) -> MemoryPlan:
    """The plan when every node is its own step (no fusion)."""
    from ..ops.registry import PRIMITIVES
    steps = [Step(n.name, n.inputs, PRIMITIVES[n.op].kind == "elementwise") for n in graph.nodes]
    sizes = {name: t.nbytes for name, t in graph.types.items()}
    return plan_memory(steps, sizes, outputs=graph.outputs, external=graph.input_names)


def check_plan(plan: MemoryPlan) -> None:
    """Raise if two buffers that are alive at the same time overlap (unless one is in place of
    the other, written by the step where the other dies)."""
    # a sweep over start steps: each buffer is compared with the buffers still alive when it
    # is written, i.e. every pair whose lifetimes intersect, once
    alive: list[Buffer] = []
    for b in sorted((b for b in plan.buffers.values() if b.nbytes), key=lambda b: b.start):
        alive = [a for a in alive if a.end >= b.start]
        for a in alive:
            if a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes:
                handoff = (b.inplace_of == a.name and a.end == b.start) or \
                          (a.inplace_of == b.name and b.end == a.start)
                if not handoff:
                    raise AssertionError(f"buffers %{a.name} and %{b.name} overlap while both are alive")
        alive.append(b)
