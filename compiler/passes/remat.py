"""Recompute vs save: a min-cut over the joint forward+backward graph (PyTorch's partitioner).

Forward nodes are the ancestors of the forward value (the graph's first output: the loss of
a value_and_grad or training-step graph); every other node is backward.  Each forward value
that backward reads is either *saved* (kept alive from forward to backward) or *recomputed*
(the cheap chain producing it is duplicated next to its backward use, where fusion folds it
into the backward kernel).  The choice minimises the bytes kept alive:

  flow graph: source -> every input; v_in -> v_out with capacity = bytes(v);
              v_out -> u_in (infinite) for each use; backward nodes -> sink (infinite);
              source -> v_in (infinite) for ops we never recompute (matmul, reductions,
              opaque ops, and the transcendental activations sigmoid and tanh, whose
              outputs their own gradients read): they are saved if backward needs them.

Why sigmoid and tanh are saved: a recomputed value is recomputed in *every* backward kernel
that reads it, and these cost an exp and a division per element (the tanh GELU's sigmoid was
evaluated three times per layer: forward, its gradient, and the GELU value for the next
weight gradient).  Saving it (as PyTorch does) took the tiny GPT-2 step's kernels from 18.6
to 18.3 ms for 2 MB per layer.

Graph inputs cost nothing to keep (the caller holds them).  The cut's edges are the saved
values; forward nodes on the sink side are recomputed.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir import Graph, Node, SourceLoc, TensorType
from ..ops.registry import PRIMITIVES
from .manager import register_pass
from .mincut import INF, min_cut_source_side

RECOMPUTABLE_KINDS = ("elementwise", "broadcast", "injective", "source")
NEVER_RECOMPUTED = ("sigmoid", "tanh")


@dataclass(frozen=True)
class SavedTensor:
    name: str
    type: TensorType
    loc: SourceLoc | None

    @property
    def nbytes(self) -> int:
        return self.type.nbytes


@dataclass
class RematReport:
    saved: list[SavedTensor] = field(default_factory=list)
    recomputed: list[str] = field(default_factory=list)
    deferred: list[str] = field(default_factory=list)  # backward nodes of forward values alone
    naive_saved_bytes: int = 0  # bytes kept alive if every forward value backward reads were saved

    @property
    def saved_bytes(self) -> int:
        return sum(s.nbytes for s in self.saved)

    def __str__(self) -> str:
        lines = [f"saved for backward: {len(self.saved)} tensors, {self.saved_bytes:,} bytes "
                 f"(saving everything backward reads: {self.naive_saved_bytes:,} bytes); "
                 f"recomputed: {len(self.recomputed)} nodes; deferred to backward kernels: "
                 f"{len(self.deferred)} nodes"]
        for s in sorted(self.saved, key=lambda s: -s.nbytes):
            lines.append(f"  %{s.name:<10} {str(s.type):<20} {s.nbytes:>12,} B  {s.loc or ''}")
        return "\n".join(lines)


RECOMPUTED_SUFFIX = "_rc"


def is_recomputed(name: str) -> bool:
    """Whether a value is a forward value's copy that ``rematerialize`` made for backward
    (fusion computes those inside each backward kernel that reads them)."""
    base, sep, tail = name.rpartition(RECOMPUTED_SUFFIX)
    return bool(sep) and bool(base) and (tail == "" or tail.isdigit())


def _forward_set(graph: Graph) -> set[str]:
    prod = graph.producer()
    fwd, stack = set(), [graph.outputs[0]]
    while stack:
        v = stack.pop()
        if v in fwd or v not in prod:
            continue
        fwd.add(v)
        stack.extend(prod[v].inputs)
    return fwd


def partition(graph: Graph) -> tuple[set[str], set[str], RematReport]:
    """Returns (saved, recomputed, report) for a joint graph whose first output is the
    forward value."""
    return _partition(graph, _forward_set(graph), graph.producer())


def _partition(graph: Graph, fwd: set, prod: dict) -> tuple[set[str], set[str], RematReport]:
    bwd_nodes = [n for n in graph.nodes if n.name not in fwd]
    needed = {i for n in bwd_nodes for i in n.inputs if i in fwd}
    edges = []
    for n in graph.nodes:
        if n.name not in fwd:
            continue
        kind = PRIMITIVES[n.op].kind
        edges.append((n.name + "_in", n.name + "_out", max(n.type.nbytes, 1)))
        if kind not in RECOMPUTABLE_KINDS or n.op in NEVER_RECOMPUTED:  # saved if backward needs it
            edges.append(("source", n.name + "_in", INF))
        for i in n.inputs:
            if i not in prod:  # a graph input: always available, free to keep
                edges.append(("source", i + "_out", INF))
            edges.append((i + "_out", n.name + "_in", INF))
        # a node with no inputs (a fill, an iota) has no path from the source: it lands on the
        # sink side at no cost, i.e. it is recomputed wherever backward needs it
    for v in sorted(needed):
        edges.append((v + "_out", "sink", INF))
    report = RematReport(naive_saved_bytes=sum(prod[v].type.nbytes for v in needed))
    if not needed:
        return set(), set(), report
    reachable = min_cut_source_side(edges, "source", "sink")
    saved = {v for v in fwd if v + "_in" in reachable and v + "_out" not in reachable}
    sink_side = {v for v in fwd if v + "_in" not in reachable}
    # recompute only what backward actually needs beyond the saved values
    recompute, stack = set(), [v for v in needed if v in sink_side]
    while stack:
        v = stack.pop()
        if v in recompute:
            continue
        recompute.add(v)
        stack.extend(i for i in prod[v].inputs if i in sink_side)
    report.saved = [SavedTensor(v, prod[v].type, prod[v].loc) for v in sorted(saved, key=_order(graph))]
    report.recomputed = sorted(recompute, key=_order(graph))
    return saved, recompute, report


def _order(graph: Graph):
    pos = {n.name: i for i, n in enumerate(graph.nodes)}
    return lambda v: pos.get(v, -1)


def rematerialize(graph: Graph) -> tuple[Graph, RematReport]:
    """Apply the partition: duplicate the recomputed forward nodes right before their first
    backward use, so forward copies die early and backward copies fuse with their users."""
    if len(graph.outputs) < 2 or graph.types[graph.outputs[0]].shape != ():
        return graph, RematReport()
    fwd = _forward_set(graph)
    prod = graph.producer()
    saved, recompute, report = _partition(graph, fwd, prod)
    # backward nodes computed from forward values alone (a derivative factor such as gelu's
    # exp(-x^2/2)) are deferred the same way: fusion computes them inside the backward
    # kernels that read them instead of in the forward kernel of their inputs, where their
    # results would stay alive until backward
    deferred: set[str] = set()
    outputs = set(graph.outputs)
    for n in graph.nodes:
        if n.name not in fwd and n.name not in outputs and n.inputs and \
                PRIMITIVES[n.op].kind in RECOMPUTABLE_KINDS and \
                all(i in fwd or i not in prod or i in deferred or not prod[i].inputs for i in n.inputs):
            deferred.add(n.name)
    report.deferred = sorted(deferred, key=_order(graph))
    if not recompute and not deferred:
        return graph, report
    copy_name = {v: f"{v}{RECOMPUTED_SUFFIX}" for v in list(recompute) + sorted(deferred)}
    taken = set(graph.types)
    for v, c in list(copy_name.items()):
        k = 0
        while c in taken:
            k += 1
            c = f"{v}{RECOMPUTED_SUFFIX}{k}"
        copy_name[v] = c
        taken.add(c)
    emitted: set[str] = set()
    out: list[Node] = []

    def emit_copy(v):
        if v in emitted:
            return
        n = prod[v]
        for i in n.inputs:
            if i in recompute:
                emit_copy(i)
        out.append(Node(copy_name[v], n.op, tuple(copy_name.get(i, i) if i in recompute else i for i in n.inputs),
                        n.type, n.attrs, n.loc))
        emitted.add(v)

    for n in graph.nodes:
        if n.name in fwd:
            out.append(n)
            continue
        reads_copy = not recompute.isdisjoint(n.inputs)
        if reads_copy:
            for i in n.inputs:
                if i in recompute:
                    emit_copy(i)
        if reads_copy or n.name in deferred or not deferred.isdisjoint(n.inputs):
            out.append(Node(copy_name[n.name] if n.name in deferred else n.name, n.op,
                            tuple(copy_name[i] if i in recompute or i in deferred else i for i in n.inputs),
                            n.type, n.attrs, n.loc))
        else:
            out.append(n)  # (unchanged)
    outputs = tuple(o if o in fwd or o not in recompute else copy_name[o] for o in graph.outputs)
    return graph.replace(nodes=tuple(out), outputs=outputs), report


@register_pass("remat")
def remat_pass(graph: Graph) -> Graph:
    """Recompute vs save (min-cut): duplicate cheap forward values for backward."""
    return rematerialize(graph)[0]
