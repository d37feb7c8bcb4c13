"""Fusion: group the nodes of a graph into kernels, and say why.

Three kinds of kernel (the contract with codegen):

* ``loop``: elementwise, broadcast and injective nodes over ONE iteration domain (the shape
  of the group's outputs).  Every member is computed per output element by index remapping,
  so reading through a broadcast, reshape, transpose, slice, pad, concat or gather costs no
  memory traffic.  Sources (fills, iotas, constants) are inlined wherever they are used.
* ``reduce`` (a row kernel): reductions that all reduce the same axes ``axes`` of the same
  input shape ``domain``, with their elementwise producers (members of shape ``domain``,
  "full" members) and consumers (members of the reduced shape, "row" members, or full
  members that read them through a broadcast).  Per row the kernel evaluates its reductions
  in order, each as a loop over the reduced axes computing its full-member inputs on the
  fly, then writes its outputs.  softmax, log_softmax, layer_norm and rms_norm become one
  kernel each.
* ``matmul``: one matmul and its elementwise epilogue over the matmul's output domain (bias,
  activation, residual add, scale): ``gelu(x @ W + b)`` is one kernel.
* ``opaque``: anything else alone (scatter_add, check_index of computed indices).
* guards: ``check_index`` of graph inputs or constants is not a kernel: the program checks
  those indices before any kernel runs, and the value passes through unchanged.

The grouping is greedy in topological order: a node joins the group of a producer when the
kinds and domains allow it and the merge keeps the kernel graph acyclic; otherwise it starts
a group.  Every decision, taken or refused, is recorded with its reason.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..ir import Graph, Node
from ..ops.registry import PRIMITIVES
from .remat import is_recomputed

LOOP_KINDS = ("elementwise", "broadcast", "injective")
# index remaps a matmul reads through with strides (codegen/lowering.py Matmul.operand)
AFFINE_REMAPS = ("reshape", "transpose", "broadcast_to", "slice")
# opaque ops whose kernels read their operands through such remaps too (lowering.py
# strided_operands)
STRIDED_READERS = ("attention", "attention_grad")


@dataclass
class Group:
    id: int
    kind: str  # "loop" | "reduce" | "matmul" | "opaque"
    nodes: list[str]
    domain: tuple[int, ...]  # loop: output shape; reduce: the reduced input shape; matmul: output shape
    axes: tuple[int, ...] = ()  # reduce: the reduced axes of `domain`
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    inlined: tuple[str, ...] = ()  # source nodes recomputed inside this kernel

    def describe(self, graph: Graph) -> str:
        prod = graph.producer()
        ops = " ".join(prod[n].op for n in self.nodes)
        extra = f" axes={list(self.axes)}" if self.kind == "reduce" else ""
        return (f"kernel {self.id} [{self.kind} over {list(self.domain)}{extra}]: {ops}\n"
                f"    nodes: {', '.join('%' + n for n in self.nodes)}\n"
                f"    reads: {', '.join('%' + n for n in self.inputs) or '-'}; "
                f"writes: {', '.join('%' + n for n in self.outputs) or '-'}")


@dataclass(frozen=True)
class Decision:
    node: str
    taken: bool
    reason: str

    def __str__(self) -> str:
        return f"{'fuse ' if self.taken else 'split'} %{self.node}: {self.reason}"


@dataclass
class FusionPlan:
    graph: Graph
    groups: list[Group]
    decisions: list[Decision] = field(default_factory=list)
    group_of: dict[str, int] = field(default_factory=dict)
    guards: list[str] = field(default_factory=list)  # check_index nodes run before the kernels

    @property
    def kernel_count(self) -> int:
        return len(self.groups)

    def explain(self) -> str:
        lines = [f"{self.kernel_count} kernels for {len(self.graph.nodes)} nodes"
                 + (f"; guards: {', '.join('%' + g for g in self.guards)}" if self.guards else "")]
        lines += [g.describe(self.graph) for g in self.groups]
        lines.append("decisions:")
        lines += ["  " + str(d) for d in self.decisions]
        return "\n".join(lines)


def _reduced_shape(domain, axes, keepdims):
    if keepdims:
        return tuple(1 if i in axes else d for i, d in enumerate(domain))
    return tuple(d for i, d in enumerate(domain) if i not in axes)


def fuse(graph: Graph, enabled: bool = True) -> FusionPlan:
    prod = graph.producer()
    kind_of = {n.name: PRIMITIVES[n.op].kind for n in graph.nodes}
    outputs = set(graph.outputs)
    groups: list[Group] = []
    group_of: dict[str, int] = {}
    inlined: set[str] = set()
    input_only: set[str] = set()  # inlined values computed from graph inputs and sources alone
    guards: list[str] = []
    decisions: list[Decision] = []
    deps: dict[int, set[int]] = {}  # kernel-level dependencies (kept acyclic)

    def groups_read(name: str) -> set[int]:
        """The kernels a value comes from (through inlined nodes)."""
        if name in group_of:
            return {group_of[name]}
        if name in inlined:
            return set().union(*[groups_read(i) for i in prod[name].inputs]) if prod[name].inputs else set()
        return set()

    def new_group(n: Node, kind: str, domain, axes=(), reason=""):
        g = Group(len(groups), kind, [n.name], tuple(domain), tuple(axes))
        groups.append(g)
        group_of[n.name] = g.id
        deps[g.id] = set().union(*[groups_read(i) for i in n.inputs]) - {g.id} if n.inputs else set()
        decisions.append(Decision(n.name, False, reason))
        return g

    def reaches(start: set[int], target: int) -> bool:
        stack, seen = list(start), set()
        while stack:
            g = stack.pop()
            if g == target:
                return True
            if g in seen:
                continue
            seen.add(g)
            stack.extend(deps[g])
        return False

    def cyclic(g: Group, n: Node) -> bool:
        """Joining n to g is illegal if another input of n depends on g through another kernel."""
        others = set().union(*[groups_read(i) for i in n.inputs]) - {g.id} if n.inputs else set()
        return any(reaches(deps[o] | {o}, g.id) and o != g.id for o in others if reaches(deps[o], g.id))

    def join(g: Group, n: Node, reason: str):
        g.nodes.append(n.name)
        group_of[n.name] = g.id
        if n.inputs:
            deps[g.id] |= set().union(*[groups_read(i) for i in n.inputs]) - {g.id}
        decisions.append(Decision(n.name, True, reason))

    def merge(into: Group, other: Group, why: str):
        for m in other.nodes:
            group_of[m] = into.id
        into.nodes = sorted(into.nodes + other.nodes, key=order.__getitem__)
        deps[into.id] = (deps[into.id] | deps[other.id]) - {into.id, other.id}
        for d in deps.values():
            if other.id in d:
                d.discard(other.id)
                d.add(into.id)
        deps[into.id].discard(into.id)
        other.kind = "merged"
        other.nodes = []
        decisions.append(Decision(into.nodes[-1], True, f"kernel {other.id} merged into kernel {into.id}: {why}"))

    def level(g: Group, shape) -> str | None:
        if g.kind == "loop":
            return "full" if shape == g.domain else None
        if g.kind == "matmul":  # an epilogue may run over a reshape of the product (a linear layer's view)
            return "full" if shape == g.domain or math.prod(shape) == math.prod(g.domain) else None
        if g.kind == "reduce":
            if shape == g.domain:
                return "full"
            if shape in (_reduced_shape(g.domain, g.axes, True), _reduced_shape(g.domain, g.axes, False)):
                return "row"
            if all(d == 1 for d in shape):
                return "total"
        return None

    def why_not(g: Group, n: Node, kind: str) -> str | None:
        if g.kind == "opaque":
            return f"kernel {g.id} is opaque"
        lv = level(g, n.type.shape)
        if lv is None:
            return f"its shape {list(n.type.shape)} does not fit kernel {g.id} ({g.kind} over {list(g.domain)})"
        if g.kind == "matmul" and kind != "elementwise":
            return f"a {kind} op is not a matmul epilogue"
        if cyclic(g, n):
            return f"joining kernel {g.id} would create a cycle between kernels"
        return None

    order = {n.name: i for i, n in enumerate(graph.nodes)}
    users: dict[str, list[str]] = {}
    for n in graph.nodes:
        for i in n.inputs:
            users.setdefault(i, []).append(n.name)
    for n in graph.nodes:
        kind = kind_of[n.name]
        if not enabled:
            new_group(n, "loop" if kind in LOOP_KINDS + ("source",) else kind if kind in ("matmul",) else "opaque",
                      n.type.shape, reason="fusion disabled: one kernel per node")
            continue
        # computed from graph inputs alone (an index remap of a kernel's output is inlined too,
        # but what reads it depends on that kernel)
        ext = all(i not in prod or i in input_only for i in n.inputs)
        if n.op == "check_index" and ext and n.name not in outputs:
            guards.append(n.name)
            inlined.add(n.name)
            input_only.add(n.name)
            decisions.append(Decision(n.name, True, "check_index of graph inputs is a guard: the program checks "
                                                    "the indices before any kernel runs; the value passes through"))
            continue
        if n.name not in outputs and kind in LOOP_KINDS + ("source",) and is_recomputed(n.name):
            inlined.add(n.name)
            decisions.append(Decision(n.name, True, f"{n.op} is recomputed for backward (remat): computed inside "
                                                    f"each backward kernel that reads it, never stored"))
            continue
        if n.name not in outputs and (
                (kind == "source" and not n.inputs) or
                (kind in ("broadcast", "injective") and ext) or
                (kind == "elementwise" and ext and n.inputs)):
            inlined.add(n.name)
            input_only.add(n.name)
            what = "a source" if kind == "source" else "computed from graph inputs only"
            decisions.append(Decision(n.name, True, f"{n.op} is {what}: inlined into each kernel that reads it"))
            continue
        producers = sorted(set().union(*[groups_read(i) for i in n.inputs]) if n.inputs else set(),
                           key=lambda gid: (groups[gid].kind != "reduce", -gid))
        if kind == "matmul":
            new_group(n, "matmul", n.type.shape, reason="a matmul starts its own kernel (epilogues may join it)")
            continue
        if kind == "reduction":
            axes = tuple(n.attr["axes"])
            domain = graph.types[n.inputs[0]].shape
            target, why = None, []
            for gid in producers:
                g = groups[gid]
                if g.kind == "loop" and g.domain == domain and not cyclic(g, n):
                    g.kind, g.axes = "reduce", axes
                    join(g, n, f"{n.op} reduces kernel {gid}'s domain {list(domain)} over axes {list(axes)}: "
                               f"its members become the row kernel's full members")
                    target = g
                    break
                if g.kind == "reduce" and g.domain == domain and g.axes == axes and not cyclic(g, n):
                    join(g, n, f"{n.op} reduces the same axes {list(axes)} of the same domain {list(domain)} "
                               f"as kernel {gid}")
                    target = g
                    break
                if g.kind == "reduce" and level(g, domain) == "row" and set(axes) == set(range(len(domain))) \
                        and not cyclic(g, n):
                    join(g, n, f"{n.op} totals the rows of kernel {gid} (a grand total accumulated across rows)")
                    target = g
                    break
                why.append(f"kernel {gid} ({g.kind} over {list(g.domain)}) reduces another domain or axes")
            if target is None and not producers:
                # an input-only reduction may ride along with a recent row kernel of its domain
                for g in reversed(groups):
                    if g.kind == "reduce" and ((g.domain == domain and g.axes == axes) or
                                               (level(g, domain) == "row" and set(axes) == set(range(len(domain))))):
                        join(g, n, f"{n.op} reads only graph inputs and fits kernel {g.id}'s "
                                   f"{'rows' if g.domain == domain else 'grand total'}: it rides along")
                        target = g
                        break
            if target is None:
                reason = "; ".join(why) or "its input comes from graph inputs"
                new_group(n, "reduce", domain, axes, reason=f"{n.op} starts a row kernel: {reason}")
            continue
        if kind in LOOP_KINDS:
            if n.op in AFFINE_REMAPS and n.name not in outputs and users.get(n.name) and \
                    all(kind_of[u] == "matmul" or prod[u].op in STRIDED_READERS for u in users[n.name]):
                inlined.add(n.name)
                decisions.append(Decision(n.name, True, f"{n.op} is read only by matmuls and attentions, which "
                                                        f"read through it with strides: inlined, not materialised"))
                continue
            if n.op == "broadcast_to" and n.name not in outputs:
                inlined.add(n.name)
                decisions.append(Decision(n.name, True, "broadcast_to is an index remap: every kernel reads its "
                                                        "source through it (a broadcast is never materialised)"))
                continue
            best, refusals = None, []
            for gid in producers:
                w = why_not(groups[gid], n, kind)
                if w is None:
                    best = groups[gid]
                    break
                refusals.append(w)
            if best is None and kind in ("broadcast", "injective") and n.name not in outputs:
                inlined.add(n.name)
                decisions.append(Decision(n.name, True, f"{n.op} is an index remap: each kernel that reads it "
                                                        f"reads through it ({'; '.join(refusals)})"))
                continue
            if best is None:
                reason = "; ".join(refusals) if refusals else "its inputs come from graph inputs"
                new_group(n, "loop", n.type.shape, reason=f"{n.op} starts a loop kernel: {reason}")
                continue
            role = {"loop": "elementwise chain", "matmul": "matmul epilogue", "reduce": "row-kernel member"}[best.kind]
            join(best, n, f"{n.op} joins kernel {best.id} as a {role}")
            # other producer kernels over the same domain fold into this one
            for gid in producers:
                g = groups[gid]
                if g is best or g.kind != "loop" or level(best, g.domain) != "full":
                    continue
                if best.kind == "matmul" and gid in deps[best.id]:
                    decisions.append(Decision(n.name, False, f"kernel {gid} not merged into {best.id}: it computes "
                                                             f"an operand of that kernel's matmul"))
                    continue
                if reaches(deps[best.id] - {gid}, gid) or reaches(deps[gid], best.id):
                    decisions.append(Decision(n.name, False, f"kernel {gid} not merged into {best.id}: "
                                                             f"another kernel lies between them"))
                    continue
                merge(best, g, f"both compute {n.op}'s operands over {list(g.domain)}")
            continue
        new_group(n, "opaque", n.type.shape, reason=f"{n.op} is {kind}: it runs as its own kernel")
    live = [g for g in groups if g.kind != "merged"]
    renumber = {g.id: k for k, g in enumerate(live)}
    for g in live:
        g.id = renumber[g.id]
    member_of = {m: g.id for g in reversed(live) for m in g.nodes}  # (the first group holding m)
    group_of = {m: member_of[m] for m in group_of}
    for g in live:
        members = set(g.nodes)
        reads, inl = [], set()
        stack = [i for m in g.nodes for i in prod[m].inputs]
        while stack:
            i = stack.pop()
            if i in members:
                continue
            if i in inlined:
                if i not in inl:
                    inl.add(i)
                    stack.extend(prod[i].inputs)
                continue
            if i not in reads:
                reads.append(i)
        g.inputs = tuple(sorted(reads, key=lambda v: order.get(v, -1)))
        g.inlined = tuple(sorted(inl, key=order.__getitem__))
    users: dict[str, set[int]] = {}
    for g in live:
        for i in g.inputs:
            users.setdefault(i, set()).add(g.id)
    for g in live:
        g.outputs = tuple(m for m in g.nodes if m in outputs or any(u != g.id for u in users.get(m, ())))
    return FusionPlan(graph, live, decisions, group_of, guards)
