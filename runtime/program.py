"""A compiled program: the graph's kernels in order on pre-allocated buffers behind ONE
native entry point.

``build(graph, groups)`` lowers every group (by default one node each) to a kernel in one
LLVM module and adds

    i32 @narch_main(ptr %bufs)   ; calls k0(bufs), k1(bufs), ... and stops at the first error

so a call from Python is one ctypes call with an array of buffer pointers.  Slot 0 of that
array is the error record a failing index check fills; the program turns it into an
``OpIndexError`` naming the index, the op and the user's source line.

Buffers (for now; memory planning will place intermediates in one arena): each graph input
is the caller's (C-contiguous) array, each intermediate one NumPy allocation made once,
each output a fresh array per call (handed over, never copied), large constants pre-filled
buffers.  One workspace buffer serves every kernel that needs scratch (the GEMM).

Native code is cached in-process by the canonical graph text (no source locations) and
options, so recompiling an equal graph costs nothing; when the disk cache
(``runtime/cache.py``) is present, object code is also cached on disk.
"""
from __future__ import annotations

import bisect
import contextlib
import ctypes
import dataclasses
import functools
import hashlib
import itertools
import math
import operator
import os
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field

import llvmlite.ir as ir
import numpy as np

from neural_arch.compiler.codegen import lowering  # noqa: F401  (attaches the lowerings)
from neural_arch.compiler.codegen.kernel import I32, I64, PTR, GroupSpec, Kernel, KernelBuilder, c64, declare
from neural_arch.compiler.codegen.lowering import MATERIALIZE_CONSTANT, REMAP_OPS
from neural_arch.compiler.codegen.share import kernel_key, renamed_kernel, share_identical_functions
from neural_arch.compiler.ir import Graph, Node, format_graph
from neural_arch.compiler.ops.registry import PRIMITIVES, OpIndexError

from . import jit
from .split import split_module

ENTRY = "narch_main"


def canonical_text(graph: Graph) -> str:
    """The graph's text without source locations: what determines the machine code."""
    return format_graph(graph, locations=False)


def default_groups(graph: Graph) -> list[GroupSpec]:
    """One kernel per node (no fusion)."""
    return [GroupSpec.single(n) for n in graph.nodes]


def fused_groups(graph: Graph, inplace: dict | None = None, memory_order: bool = True) -> list[GroupSpec]:
    """Kernels from the fusion pass's plan (``compiler/passes/fusion.py``): guards first.
    ``inplace`` ({output: input}, pairs already checked by ``inplace_pairs``): the kernel
    writing the output runs after every other kernel reading the input.  ``memory_order``:
    kernels that free memory run as early as they can (``_memory_order``)."""
    from neural_arch.compiler.passes.fusion import fuse
    plan = fuse(graph)
    prod = graph.producer()
    computed = {n for g in plan.groups for n in g.nodes}

    def upstream(name):  # inlined producers a guard reads through (constants, remaps)
        out, stack = [], list(prod[name].inputs)
        while stack:
            v = stack.pop()
            if v in prod and v not in computed and prod[v] not in out:
                out.append(prod[v])
                stack.extend(prod[v].inputs)
        order = {n.name: k for k, n in enumerate(graph.nodes)}
        return tuple(sorted(out, key=lambda n: order[n.name]))
    specs = [GroupSpec("guard", (prod[g],), upstream(g)) for g in plan.guards]
    groups = [GroupSpec(g.kind, tuple(prod[n] for n in g.nodes), tuple(prod[n] for n in g.inlined),
                        tuple(g.outputs), tuple(g.domain), tuple(g.axes)) for g in plan.groups]
    order = _topological(groups, {g.name for g in plan.graph.inputs}, inplace or {})
    return specs + (_memory_order(order, graph, inplace or {}) if memory_order else order)


def _group_reads(g) -> set:
    inside = {n.name for n in g.members} | {n.name for n in g.inlined}
    return {i for n in tuple(g.members) + tuple(g.inlined) for i in n.inputs if i not in inside}


def _topological(groups: list, graph_inputs: set, inplace: dict | None = None) -> list:
    """Kernels in an order where every kernel runs after the kernels whose outputs it reads
    (the plan's numbering need not be one), and a kernel that overwrites an input in place
    after every other kernel that reads it."""
    deps = _group_deps(groups, inplace or {})
    order, done, visiting = [], set(), set()

    def visit(k):
        if k in done:
            return
        if k in visiting:
            raise AssertionError("internal error: the fusion plan's kernels depend on each other cyclically")
        visiting.add(k)
        for d in sorted(deps[k]):
            visit(d)
        visiting.discard(k)
        done.add(k)
        order.append(groups[k])
    for k in range(len(groups)):
        visit(k)
    return order


def _group_deps(groups: list, inplace: dict) -> list:
    writer = {o: k for k, g in enumerate(groups) for o in g.outputs}
    reads = [_group_reads(g) for g in groups]
    deps = [{writer[v] for v in r if v in writer and writer[v] != k} for k, r in enumerate(reads)]
    for out, inp in inplace.items():
        w = writer[out]
        deps[w] |= {k for k, r in enumerate(reads) if k != w and inp in r}
    return deps


def _memory_order(order: list, graph: Graph, inplace: dict) -> list:
    """``order`` (a valid kernel order) with every kernel that allocates no more than it frees
    run as soon as its inputs are ready.  Autodiff lists the weight gradients (fused with
    their optimizer update, which writes in place) after the whole backward pass; run where
    they are, each keeps its layer's activations and output gradient alive to the end.  Run
    early, they free them: the tiny GPT-2 step's planned arena went from 32.5 to 25.2 MB."""
    types = graph.types
    outs = set(graph.outputs)
    deps = _group_deps(order, inplace)
    reads = [_group_reads(g) for g in order]
    written = {o for g in order for o in g.outputs}
    readers: dict = {}
    for r in reads:
        for v in r:
            readers[v] = readers.get(v, 0) + 1

    def held(v):  # bytes of an intermediate the arena holds while it has readers
        return types[v].nbytes if v in written and v not in outs and v in types else 0

    def net(k):
        new = sum(held(o) for o in order[k].outputs if readers.get(o))
        return new - sum(held(v) for v in reads[k] if readers[v] == 1)

    waiting = [len(d) for d in deps]
    dependents: list = [[] for _ in order]
    for k, d in enumerate(deps):
        for j in d:
            dependents[j].append(k)
    ready = [k for k, w in enumerate(waiting) if w == 0]  # kept in plan order
    result = []
    while ready:
        k = next((k for k in ready if net(k) <= 0), ready[0])
        ready.remove(k)
        result.append(order[k])
        for v in reads[k]:
            readers[v] -= 1
        for j in dependents[k]:
            waiting[j] -= 1
            if waiting[j] == 0:
                bisect.insort(ready, j)
    if len(result) != len(order):
        raise AssertionError("internal error: the kernels depend on each other cyclically")
    return result


def inplace_pairs(graph: Graph, wanted: dict) -> tuple[dict, dict]:
    """Which ``{output: input}`` pairs can share memory (the program writes the output over
    the input, e.g. an optimizer's new parameters over the old): returns (accepted,
    refused with reasons).  A pair is accepted when the output and input have one type, the
    output is computed by a kernel, every node of that kernel reading the input, or a value
    computed from it, is elementwise at the input's own shape (or a reduction or product of
    such values) (each element is read at the index it is then written, and kernels compute
    all of an element's outputs before storing any -- except a reduce kernel's reductions,
    stored first: such an output, or a reshape of one, is refused over an input its kernel
    reads), the output is computed from the input if its kernel reads the input (so its
    stores depend on those loads: the arguments are ``noalias``), the input is not returned
    too, and no kernel reading the input depends on that kernel, even through the pairs
    accepted before (so it can run after all of them)."""
    from neural_arch.compiler.ops.registry import PRIMITIVES
    specs = [s for s in fused_groups(graph) if s.kind != "guard"]
    writer = {o: k for k, s in enumerate(specs) for o in s.outputs}
    types = graph.types
    reads = [_group_reads(s) for s in specs]
    deps = [{writer[v] for v in r if v in writer and writer[v] != k} for k, r in enumerate(reads)]
    readers_of: dict = {}
    for k, r in enumerate(reads):
        for v in r:
            readers_of.setdefault(v, []).append(k)

    def reaches(a, b):  # does kernel a (transitively) read what kernel b writes?
        stack, seen = [a], set()
        while stack:
            k = stack.pop()
            if k == b:
                return True
            if k not in seen:
                seen.add(k)
                stack.extend(deps[k])
        return False
    accepted, refused = {}, {}
    inputs = set(graph.input_names)
    for out, inp in wanted.items():
        if inp not in inputs or out not in types or types[out] != types[inp]:
            refused[out] = f"%{out} and input %{inp} differ in type (or are not output and input)"
            continue
        if out not in writer or list(graph.outputs).count(out) != 1 or out in inputs:
            refused[out] = f"%{out} is not computed by a kernel (or is returned twice)"
            continue
        if inp in graph.outputs:
            # the input's value returned is copied from its array after the kernels ran
            refused[out] = f"input %{inp} is also returned: it would be returned overwritten"
            continue
        w = specs[writer[out]]
        in_kernel = {n.name: n for n in tuple(w.members) + tuple(w.inlined)}
        readers = [n for n in in_kernel.values() if inp in n.inputs]
        prod_out = in_kernel.get(out)
        while prod_out is not None and prod_out.op in REMAP_OPS:  # (a reshape of a reduction is stored as it)
            prod_out = in_kernel.get(prod_out.inputs[0])
        if readers and prod_out is not None and PRIMITIVES[prod_out.op].kind == "reduction":
            # a reduce kernel stores its reductions before it computes the outputs that use
            # them, so those would read the input already overwritten
            refused[out] = (f"%{out} is a reduction, stored before its kernel's other outputs, which "
                            f"read %{inp}")
            continue
        bad = [n for n in readers if PRIMITIVES[n.op].kind != "elementwise" or n.type.shape != types[inp].shape]
        if bad:
            refused[out] = f"kernel of %{out} reads %{inp} through {bad[0].op} %{bad[0].name}, not elementwise"
            continue
        # and so must every node computed from it in the kernel: a transpose of exp(x) reads
        # elements the kernel may already have overwritten.  (A reduction or the product of
        # values computed elementwise from it reads them all before anything computed from
        # it is stored.)
        elem, changed = {inp}, True
        while changed and not bad:
            changed = False
            for n in in_kernel.values():
                if n.name in elem or elem.isdisjoint(n.inputs):
                    continue
                kind = PRIMITIVES[n.op].kind
                if kind == "elementwise" and n.type.shape == types[inp].shape:
                    elem.add(n.name)
                    changed = True
                elif kind not in ("reduction", "matmul"):
                    bad = [n]
                    break
        if bad:
            refused[out] = (f"kernel of %{out} reads values computed from %{inp} through {bad[0].op} "
                            f"%{bad[0].name}, not elementwise")
            continue
        if readers and out not in elem:
            # the kernel reads the input for other values, but the output's stores do not
            # depend on those loads: under ``noalias`` LLVM may move the loads after them
            refused[out] = f"%{out} is not computed from %{inp}, which its kernel reads for other values"
            continue
        others = [k for k in readers_of.get(inp, ()) if k != writer[out]]
        if any(reaches(k, writer[out]) for k in others):
            refused[out] = f"a kernel reading %{inp} needs %{out}'s kernel first"
            continue
        if inp in accepted.values():
            refused[out] = f"%{inp} is already overwritten by another output"
            continue
        accepted[out] = inp
        # the writer runs after every other reader of the input: later pairs must not need
        # the reverse order (two kernels each writing over what the other reads)
        deps[writer[out]] |= set(others)
    return accepted, refused


def materialized(node: Node) -> bool:
    """Nodes whose value is computed at build time into a pre-filled buffer (no kernel)."""
    return node.op == "constant" and node.type.size > MATERIALIZE_CONSTANT


def _split_row_group(graph: Graph, spec: GroupSpec, options: dict):
    """(row kernel without the outputs it cannot compute in-row, loop kernel for those), or
    None.  The loop kernel reads the row kernel's members from buffers."""
    def row_ok(outputs) -> bool:
        trial = GroupSpec("reduce", spec.members, spec.inlined, outputs, spec.domain, spec.axes)
        kb = KernelBuilder(ir.Module(), graph, trial, "trial", options=options)
        kb.slot = lambda name: 0
        try:
            kb.build()
            return True
        except NotImplementedError:
            return False
    bad = [o for o in spec.outputs if not row_ok((o,))]
    if not bad or len(bad) == len(spec.outputs):
        return None
    prod = graph.producer()
    members = {n.name: n for n in spec.members}
    inlined = {n.name for n in spec.inlined}
    # the split-off outputs recompute the elementwise members they need; the row values
    # (reductions) they need come from the row kernel's buffers
    extra, rows, seen = [], [], set()
    stack = [i for o in bad for i in prod[o].inputs]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        if v in members and v not in bad:
            if getattr(PRIMITIVES[members[v].op].lowering, "is_reduction", False):
                rows.append(v)
                continue
            extra.append(v)
            stack.extend(members[v].inputs)
        elif v in inlined:
            stack.extend(prod[v].inputs)
    keep = tuple(o for o in spec.outputs if o not in bad) + tuple(r for r in dict.fromkeys(rows)
                                                                   if r not in spec.outputs)
    first = GroupSpec("reduce", spec.members, spec.inlined, keep, spec.domain, spec.axes)
    order = {n.name: k for k, n in enumerate(graph.nodes)}
    loop_members = sorted([prod[v] for v in set(extra)] + [prod[o] for o in bad], key=lambda n: order[n.name])
    second = GroupSpec("loop", tuple(loop_members), spec.inlined, tuple(bad), tuple(prod[bad[0]].type.shape))
    return [first, second]


def _as_specs(graph: Graph, groups) -> list[GroupSpec]:
    specs = []
    for g in groups:
        if isinstance(g, GroupSpec):
            specs.append(g)
        else:
            nodes = tuple(g)
            specs.append(GroupSpec.single(nodes[0]) if len(nodes) == 1 else
                         GroupSpec("auto", nodes, (), (nodes[-1].name,)))
    return specs


# ----------------------------------------------------------------------------- build


@dataclass
class Layout:
    slots: dict          # value name -> slot in bufs (0 = error record)
    nslots: int
    workspace_slot: int
    workspace_bytes: int


@dataclass
class Module:
    """Everything ``build`` produces: IR text, kernel records, buffer layout.  A module
    restored from the disk cache (``module_from_meta``) has no IR text until asked for it:
    ``llvm_ir`` then rebuilds it (the build is deterministic)."""
    ir_text: str | None
    kernels: list
    layout: Layout
    checks: dict = field(default_factory=dict)  # code -> IndexCheck
    build_seconds: float = 0.0
    groups: list = field(default_factory=list)
    buffered: tuple = ()  # values that live in buffers (inputs, kernel outputs, constants)
    rebuild: object = None  # () -> Module, for the IR text of a restored module
    from_meta: bool = False

    @property
    def llvm_ir(self) -> str:
        if self.ir_text is None:
            self.ir_text = self.rebuild().ir_text
        return self.ir_text

    def to_meta(self) -> dict:
        """The records as JSON-able data (node references by name)."""
        def kern(k: Kernel) -> dict:
            return {"name": k.name, "nodes": [n.name for n in k.nodes], "inputs": list(k.inputs),
                    "outputs": list(k.outputs), "strategy": k.strategy, "tasks": k.tasks,
                    "checks": [c.code for c in k.checks], "loops": {a: list(b) for a, b in k.loops.items()},
                    "workspace_bytes": k.workspace_bytes, "buffers": list(k.buffers), "note": k.note,
                    "reuse": [list(r) for r in k.reuse], "same_as": k.same_as,
                    "externals": [list(e) for e in k.externals]}
        return {"kernels": [kern(k) for k in self.kernels],
                "layout": {"slots": [[n, i] for n, i in self.layout.slots.items()], "nslots": self.layout.nslots,
                           "workspace_slot": self.layout.workspace_slot,
                           "workspace_bytes": self.layout.workspace_bytes},
                "checks": [[c, i.node.name, i.size, i.axis, i.ignore] for c, i in self.checks.items()],
                "groups": [[g.kind, [n.name for n in g.members], [n.name for n in g.inlined], list(g.outputs),
                            list(g.domain), list(g.axes)] for g in self.groups],
                "buffered": list(self.buffered)}


def module_from_meta(meta: dict, graph: Graph, rebuild) -> Module:
    """The inverse of ``Module.to_meta`` against the graph it was built from."""
    from neural_arch.compiler.codegen.kernel import IndexCheck
    prod = graph.producer()
    checks = {int(c): IndexCheck(int(c), prod[n], size, axis, ignore) for c, n, size, axis, ignore in meta["checks"]}
    kernels = [Kernel(k["name"], tuple(prod[n] for n in k["nodes"]), tuple(k["inputs"]), tuple(k["outputs"]),
                      k["strategy"], k["tasks"], [checks[c] for c in k["checks"]],
                      {a: list(b) for a, b in k["loops"].items()}, k["workspace_bytes"], tuple(k["buffers"]),
                      k["note"], tuple(tuple(e) for e in k["externals"]), tuple(tuple(r) for r in k.get("reuse", ())),
                      k.get("same_as", ""))
               for k in meta["kernels"]]
    lay = meta["layout"]
    layout = Layout({n: i for n, i in lay["slots"]}, lay["nslots"], lay["workspace_slot"], lay["workspace_bytes"])
    groups = [GroupSpec(kind, tuple(prod[n] for n in m), tuple(prod[n] for n in inl), tuple(outs), tuple(dom),
                        tuple(ax)) for kind, m, inl, outs, dom, ax in meta["groups"]]
    return Module(None, kernels, layout, checks, 0.0, groups, tuple(meta["buffered"]), rebuild, True)


FIXED_SLOTS = (None, "__workspace__")  # the error record and the workspace: every kernel's own


def build(graph: Graph, groups=None, options: dict | None = None) -> Module:
    """Lower ``graph`` to one LLVM module: a kernel per group (default: the fusion plan's
    kernels, or one per node with ``options={"fuse": False}``) and the entry point."""
    t0 = time.perf_counter()
    options = dict(options or {})
    if groups is not None:
        specs = _as_specs(graph, groups)
    elif options.get("fuse", True):
        specs = fused_groups(graph, options.get("inplace"))
    else:
        specs = default_groups(graph)
    # big constants live in pre-filled buffers: no kernel computes them, none inlines them
    big = {n.name for n in graph.nodes if materialized(n)}
    if big:
        specs = [GroupSpec(s.kind, tuple(n for n in s.members if n.name not in big),
                           tuple(n for n in s.inlined if n.name not in big),
                           tuple(o for o in s.outputs if o not in big), s.domain, s.axes)
                 for s in specs]
        specs = [s for s in specs if s.members]

    module = ir.Module(name=graph.name)
    checks = {}

    def register(info):
        code = len(checks) + 1
        checks[code] = info
        return code

    slots = {None: 0}

    def slot(name):
        if name not in slots:
            slots[name] = len(slots)
        return slots[name]
    for gi in graph.inputs:
        slot(gi.name)
    for name in sorted(big):
        slot(name)
    for name in graph.outputs:
        slot(name)
    slot("__workspace__")

    kernels: list[Kernel] = []
    final_specs = []
    # every kernel function takes its own list of buffer pointers (``bufs[i]``: the i-th
    # value it asked for, its ``args``), which the entry point fills from the program's
    # table: kernels alike but for their values' names are then one function
    args: dict[str, tuple] = {}
    memo = {} if options.get("kernel_memo", True) else None
    inplace = options.get("inplace") or ()
    graph_outputs = set(graph.outputs)
    producer = graph.producer()

    def emit(spec, name):
        key = None
        if memo is not None:
            key, names = kernel_key(graph, spec, inplace, graph_outputs)
            hit = memo.get(key)
            if hit is not None:
                template, template_names = hit
                rename = dict(zip(template_names, names))
                rename.update((v, v) for v in FIXED_SLOTS)
                kern = renamed_kernel(template, name, rename, producer)
                args[name] = tuple(rename[v] for v in args[template.name])
                for v in args[name]:
                    slot(v)
                kernels.append(kern)
                final_specs.append(spec)
                return
        kb = KernelBuilder(module, graph, spec, name, add_check=register, options=options)
        local: dict = {}

        def kernel_slot(value):
            slot(value)
            return local.setdefault(value, len(local))
        kb.slot = kernel_slot
        kern = kb.build()
        # the memory plan trusts inputs/outputs/buffers: they must cover every pointer loaded
        undeclared = set(local) - set(kern.inputs) - set(kern.outputs) - set(kern.buffers) - set(FIXED_SLOTS)
        if undeclared:
            raise AssertionError(f"internal error: kernel {name} reads {sorted(undeclared)} undeclared")
        args[name] = tuple(local)
        kernels.append(kern)
        final_specs.append(spec)
        # a template: no index checks (an error names its own node), nothing outside the key
        if key is not None and not kern.checks:
            known = set(names) | set(FIXED_SLOTS)
            used = args[name] + kern.inputs + kern.outputs + kern.buffers + tuple(v for r in kern.reuse for v in r)
            if known.issuperset(used) and known.issuperset(n.name for n in kern.nodes):
                memo[key] = (dataclasses.replace(kern), names)  # (a copy: a note set later is this kernel's)

    for k, spec in enumerate(specs):
        name = f"k{k}.{spec.members[-1].op}"
        try:
            emit(spec, name)
            continue
        except NotImplementedError as e:
            error = e
        # a group this codegen cannot run as one kernel: a row kernel whose outputs include
        # one computed from another row (e.g. the transpose of a softmax) keeps the other
        # outputs, and those run as a loop kernel after it; anything else runs as
        # single-node kernels
        split = _split_row_group(graph, spec, options) if spec.kind == "reduce" else None
        if split is not None:
            try:
                for j, part in enumerate(split):
                    emit(part, f"k{k}s{j}.{part.members[-1].op}")
                kernels[-1].note = f"split from a row kernel: {error}"
                continue
            except NotImplementedError:
                pass
        for j, n in enumerate(spec.members):
            one = GroupSpec("node", (n,), spec.inlined, (n.name,), tuple(n.type.shape))
            emit(one, f"k{k}u{j}.{n.op}")
            kernels[-1].note = f"unfused: {error}"
    specs = final_specs

    written = set(graph.input_names) | big
    for kern in kernels:
        early = [v for v in kern.inputs if v not in written and v not in kern.buffers and v not in kern.outputs]
        if early:
            raise AssertionError(f"internal error: kernel {kern.name} reads {early} before any kernel writes them")
        written |= set(kern.outputs) | set(kern.buffers)
    unwritten = [n for n in slots if n not in (None, "__workspace__") and n not in written]
    if unwritten:
        raise AssertionError(f"internal error: buffers read but written by no kernel: {unwritten}")
    entry = ir.Function(module, ir.FunctionType(I32, [PTR]), name=ENTRY)
    b = ir.IRBuilder(entry.append_basic_block("entry"))
    # (kernels run one after another: one list serves them all)
    kernel_bufs = b.alloca(PTR, size=c64(max([len(a) for a in args.values()] + [1])), name="kernel.bufs")
    leave = _flush_denormals(module, b) if options.get("flush_denormals") else (lambda rc: b.ret(rc))
    profile = bool(options.get("profile"))
    if profile:  # per-kernel wall time (ns) accumulated into bufs[__profile__][k]; the start
        # (CLOCK_MONOTONIC ns, Python's time.monotonic_ns clock) of its last run in [K + k]
        slot("__profile__")
        prof = b.load(b.gep(entry.args[0], [c64(slots["__profile__"])], source_etype=PTR, inbounds=True),
                      typ=PTR)
        clock = declare(module, "clock_gettime", I32, [I32, PTR])
        ts = b.alloca(ir.ArrayType(I64, 2))

        def now():
            b.call(clock, [ir.Constant(I32, 1), ts])
            sec = b.load(b.gep(ts, [c64(0), c64(0)], source_etype=ir.ArrayType(I64, 2)), typ=I64)
            ns = b.load(b.gep(ts, [c64(0), c64(1)], source_etype=ir.ArrayType(I64, 2)), typ=I64)
            return b.add(b.mul(sec, c64(1_000_000_000)), ns)
    for k, kern in enumerate(kernels):
        fn = module.get_global(kern.same_as or kern.name)
        for i, value in enumerate(args[kern.name]):
            ptr = b.load(b.gep(entry.args[0], [c64(slots[value])], source_etype=PTR, inbounds=True), typ=PTR)
            b.store(ptr, b.gep(kernel_bufs, [c64(i)], source_etype=PTR, inbounds=True))
        if profile:
            t_start = now()
        rc = b.call(fn, [kernel_bufs])
        if profile:
            p = b.gep(prof, [c64(k)], source_etype=I64)
            b.store(b.add(b.load(p, typ=I64), b.sub(now(), t_start)), p)
            b.store(t_start, b.gep(prof, [c64(len(kernels) + k)], source_etype=I64))
        fail = entry.append_basic_block(kern.name + ".fail")
        ok = entry.append_basic_block(kern.name + ".ok")
        b.cbranch(b.icmp_signed("!=", rc, ir.Constant(I32, 0)), fail, ok)
        b.position_at_end(fail)
        leave(rc)
        b.position_at_end(ok)
    leave(ir.Constant(I32, 0))
    functions = list(module.functions)  # (with those sharing drops: released below too)
    share_identical_functions(module)
    ws = max([k.workspace_bytes for k in kernels] + [0])
    buffered = tuple(n for n in slots if n not in (None, "__workspace__", "__profile__"))
    text = str(module)
    release_ir(module, functions)
    return Module(text, kernels, Layout(dict(slots), len(slots), slots["__workspace__"], ws), checks,
                  time.perf_counter() - t0, specs, buffered)


def release_ir(module: ir.Module, functions=()) -> None:
    """Break the reference cycles of a printed ``llvmlite.ir`` module (every instruction,
    block and argument points at its parent; loops' branches and phis point back) so that
    reference counting frees it now.  Left to the cyclic garbage collector, its objects
    (about 240 000 for the small GPT-2 step) cost a collection of 0.44 s, paid at some
    allocation after the compile.  The module is unusable afterwards.  ``functions``: more
    of its functions, no longer in it."""
    for fn in {id(f): f for f in list(functions) + list(module.functions)}.values():
        for bb in fn.blocks:
            for ins in bb.instructions:
                ins.__dict__.clear()
            bb.__dict__.clear()
        for arg in fn.args:
            arg.__dict__.clear()
        fn.__dict__.clear()
    for md in module.metadata:
        md.__dict__.clear()
    module.__dict__.clear()


# Subnormal floats cost AMD and Intel cores a microcode assist per operation.  Training
# makes them: an Adam moment whose gradient stays zero (a dead ReLU unit, an input pixel
# that is always 0) decays by beta each step into the subnormal range and then sticks at
# the smallest subnormal, as 0.9 times it rounds back to it.  The MLP benchmark's step
# went 238 -> 217 us with them flushed (MXCSR FTZ + DAZ, as TensorFlow's CPU threads run).
MXCSR_FTZ_DAZ = 0x8040
MXCSR_FLAGS = 0x3F  # the sticky exception flags (invalid, denormal, divide, over-, underflow, inexact)


def _flush_denormals(module: ir.Module, b: ir.IRBuilder):
    """At the entry point's start: save the caller's MXCSR and set flush-to-zero and
    denormals-are-zero (the pool runs the program's tasks under the caller's MXCSR,
    runtime/threadpool.py).  Returns ``leave(rc)``, which restores the caller's control
    bits, keeps the exception flags the call raised, and returns rc.  Elsewhere than x86
    (no MXCSR) it does nothing; a CPU without SSE3 gets FTZ only (DAZ came with later
    SSE2 parts: setting a bit the CPU lacks faults)."""
    if not jit.is_x86():
        return lambda rc: b.ret(rc)
    bits = MXCSR_FTZ_DAZ if "+sse3" in jit.cpu_features().split(",") else 0x8000
    i32 = ir.IntType(32)
    st = declare(module, "llvm.x86.sse.stmxcsr", ir.VoidType(), [PTR])
    ld = declare(module, "llvm.x86.sse.ldmxcsr", ir.VoidType(), [PTR])
    saved, word = b.alloca(i32, name="mxcsr.saved"), b.alloca(i32, name="mxcsr")
    b.call(st, [saved])
    b.store(b.or_(b.load(saved, typ=i32), ir.Constant(i32, bits)), word)
    b.call(ld, [word])

    def leave(rc):
        b.call(st, [word])
        flags = b.and_(b.load(word, typ=i32), ir.Constant(i32, MXCSR_FLAGS))
        b.store(b.or_(b.load(saved, typ=i32), flags), word)
        b.call(ld, [word])
        b.ret(rc)
    return leave


# ----------------------------------------------------------------------------- native code


@dataclass
class Native:
    """Loaded machine code of one module (shared by equal programs in this process)."""
    loaded: object
    entry: object
    llvm_module: object       # optimised llvmlite ModuleRef (built on demand, for inspection)
    optimized_ir: str | None
    compile_seconds: float
    from_cache: bool = False
    key_parts: dict = None
    parts: int = 1            # object files the module was compiled into (in parallel)

    def optimized(self, mod: "Module"):
        """The optimised module (recompiled on demand after a cache hit, for inspection)."""
        if self.llvm_module is None:
            self.llvm_module = jit.optimize(mod.llvm_ir, "program")
            self.optimized_ir = str(self.llvm_module)
        return self.llvm_module


# equal programs share native code while any of them is alive (then the code is freed; a
# later compile of the same graph loads it from the disk cache)
_native_cache: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_native_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _codegen_sources() -> str:
    from neural_arch.compiler.codegen import gemm, index, kernel, lowering, mathlib, settings, share
    from . import jit, split, threadpool
    h = hashlib.sha256()
    for mod in (index, kernel, lowering, mathlib, gemm, settings, share, split, jit, threadpool,
                sys.modules[__name__]):
        with open(mod.__file__, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def codegen_settings() -> str:
    """The code generator's module-level settings as they are now (``compiler/codegen/
    settings.py``): changing one in a running process must not hand out code compiled
    under the old value."""
    from neural_arch.compiler.codegen import gemm, index, kernel, lowering, mathlib, settings, share
    from . import split
    return settings.fingerprint(index, kernel, lowering, mathlib, gemm, share, split)


_version_snapshot = threading.local()  # .version: one Program's codegen_version while it is built


def codegen_version() -> str:
    """A fingerprint of the code generator: its sources and its settings.  A cached object
    is valid only for the codegen that produced it.  (Not the package version: it changes
    nothing the sources do not, and looking it up costs a cached compile 13 ms of
    importing importlib.metadata.)  While a ``Program`` is built, its thread gets the value
    taken when the build began (``one_codegen_version``)."""
    snap = getattr(_version_snapshot, "version", None)
    return snap if snap is not None else f"codegen.{_codegen_sources()}.{codegen_settings()}"


@contextlib.contextmanager
def one_codegen_version():
    """Within: ``codegen_version()`` on this thread is the one value it had on entry.  A
    program's cache lookups all key on one snapshot of the settings, and compute it once
    (reading the settings took 1-2 ms a lookup, 4-12 ms of a cached compile)."""
    if getattr(_version_snapshot, "version", None) is not None:
        yield
        return
    _version_snapshot.version = codegen_version()
    try:
        yield
    finally:
        _version_snapshot.version = None


# options that change how calls run, not the code: not part of the cache key
RUNTIME_OPTIONS = ("adapt_threads",)


def cache_key_parts(key_text: str, options: dict) -> dict:
    return {"ir": key_text, "version": codegen_version(), "toolchain": jit.toolchain_id(),
            "options": {str(k): repr(v) for k, v in sorted(options.items()) if k not in RUNTIME_OPTIONS}}


def _disk_cache():
    from .cache import disk_cache
    return disk_cache()


COMPILE_PART_BYTES = 64 << 10  # LLVM IR text below which a module compiles as one part
COMPILE_PARTS_PER_WORKER = 3     # parts in the queue per compiling process (jit.compile_objects)
COMPILE_WORKERS_MAX = 4


def compile_workers() -> int:
    """How many processes compile a module's parts: one per available core, at most 4."""
    return max(1, min(COMPILE_WORKERS_MAX, jit.available_cores()))


def compile_parts(ir_bytes: int) -> int:
    """Into how many parts a module of ``ir_bytes`` of IR text is split to compile in
    parallel: ``COMPILE_PARTS_PER_WORKER`` per worker once it is big enough to pay a fork
    (the workers take them from a queue, so a part that takes longer than its size said is
    made up for by the other workers' next parts)."""
    if ir_bytes < COMPILE_PART_BYTES or compile_workers() == 1:
        return 1
    return max(1, min(COMPILE_PARTS_PER_WORKER * compile_workers(), ir_bytes // COMPILE_PART_BYTES))


def load_native(mod: Module, key_text: str, options: dict, use_disk_cache: bool = True) -> Native:
    """Machine code for ``mod``: from this process's memory, else the disk cache, else
    optimise (O3) and compile it (then store its objects on disk).  A big module compiles
    as ``compile_parts`` parts in parallel (``split.py``), each its own object file."""
    from . import threadpool
    key = (key_text, codegen_version(), threadpool.num_threads(),
           tuple(sorted((str(k), repr(v)) for k, v in options.items() if k not in RUNTIME_OPTIONS)))
    with _native_lock:
        hit = _native_cache.get(key)
    if hit is not None:
        return hit
    threadpool.install()  # kernels (and cached objects) may call narch_parallel_for
    for sym, dtype, threads in sorted({e for k in mod.kernels for e in k.externals}):
        install_gemm(sym, dtype, threads)
    t0 = time.perf_counter()
    cache = _disk_cache() if use_disk_cache else None
    parts = cache_key_parts(key_text, options)
    parts["threads"] = threadpool.num_threads()  # the GEMM's parallel mode is planned for it
    objs = None
    if cache is not None:  # a module is cached as the object files of its parts
        count = cache.get(dict(parts, what="part count"))
        if count is not None and count.isdigit():
            objs = [cache.get(dict(parts, part=k, of=int(count))) for k in range(int(count))]
            objs = None if None in objs else objs
    from_cache = objs is not None
    if objs is None:
        text = mod.llvm_ir
        workers = compile_workers()
        objs = jit.compile_objects(split_module(text, compile_parts(len(text)), workers), "program", workers)
        if cache is not None:  # the count last: a reader finding it finds every part
            for k, obj in enumerate(objs):
                cache.put(dict(parts, part=k, of=len(objs)), obj)
            cache.put(dict(parts, what="part count"), str(len(objs)).encode())
    loaded = jit.load(None, objs)
    entry = loaded.function(ENTRY, ctypes.c_int32, ctypes.c_void_p)
    nat = Native(loaded, entry, None, None, time.perf_counter() - t0, from_cache)
    nat.key_parts = parts
    nat.parts = len(objs)
    with _native_lock:
        _native_cache.setdefault(key, nat)
        return _native_cache[key]


_WRITEABLE = operator.attrgetter("flags.writeable")
_META = operator.attrgetter("shape", "strides", "dtype")  # an input array's layout, compared call to call
_UNSET = object()  # the last call's input and its layout before any call: equal to nothing passed

_shared: dict = {}
_shared_lock = threading.Lock()
_gemm_failures: dict = {}  # symbol -> the error installing it on a helper thread


def install_gemm(symbol: str, dtype: str, threads: int) -> None:
    """Compile (or load from the disk cache) the GEMM once per process under ``symbol`` and
    make it resolvable by every module loaded afterwards (programs call it by name).  The
    symbol names the GEMM module's settings (``lowering.shared_gemm_symbol``), so a GEMM
    built under other settings is another symbol, never a replacement."""
    from neural_arch.compiler.codegen.lowering import shared_gemm_symbol
    if symbol != shared_gemm_symbol(dtype, threads):
        raise RuntimeError(f"{symbol}: the GEMM's settings changed while this program was being compiled "
                           f"(now {shared_gemm_symbol(dtype, threads)}); compile it again")
    with _shared_lock:
        if symbol in _shared:
            return
        failed = _gemm_failures.pop(symbol, None)
        if failed is not None:  # on the helper thread install_gemms_in_background started
            raise failed
        import llvmlite.binding as llvm
        from neural_arch.compiler.codegen.gemm import emit_gemm
        cache = _disk_cache()
        # the key names the GEMM (its sources are in codegen_version, its settings in the
        # symbol): its IR text is only generated when the object code has to be built
        parts = {"ir": f"shared gemm {symbol}", "version": codegen_version(), "toolchain": jit.toolchain_id(),
                 "options": {"threads": threads}}
        obj = cache.get(parts) if cache is not None else None
        if obj is None:
            mod = ir.Module(name=symbol)
            emit_gemm(mod, symbol, dtype, parallel=threads if threads > 1 else False)
            text = str(mod)
            release_ir(mod)
            obj = jit.emit_object(jit.optimize(text, symbol))
            if cache is not None:
                cache.put(parts, obj)
        loaded = jit.load(None, obj)
        addr = loaded.address(symbol)
        llvm.add_symbol(symbol, addr)
        _shared[symbol] = loaded  # kept for the life of the process


def clear_memory_cache() -> None:
    """Forget this process's loaded programs (the next Program compiles or hits the disk)."""
    with _native_lock:
        _native_cache.clear()


_pool_started = False


def install_pool_in_background() -> None:
    """Start installing the native thread pool (``threadpool.install``: an LLVM compile of its
    IR, about 40 ms, needed before any program's code loads) on a helper thread, once per
    process, so that it overlaps the first program's passes (or a training step's tracing:
    ``compile_train_step`` calls this first) instead of following them.
    LLVM is entered under llvmlite's lock and mostly without the GIL, so the passes keep
    running; whoever needs the pool calls ``install()``, which waits for this one to finish
    (and raises its error, e.g. a bad NEURAL_ARCH_NUM_THREADS, in the caller's thread)."""
    global _pool_started
    if _pool_started:
        return
    _pool_started = True
    from . import threadpool

    helper = threading.Thread(target=threadpool.install_keeping_error, name="narch-pool-install",
                              daemon=True)
    helper.start()
    if hasattr(os, "register_at_fork"):  # a fork never copies a half-made pool (or its held lock)
        os.register_at_fork(before=lambda: helper.join() if helper.is_alive() and
                            helper is not threading.current_thread() else None)


def predicted_gemms(graph: Graph, options: dict) -> list[tuple[str, bool]]:
    """The shared GEMMs the graph's products will most likely call, as (dtype, parallel):
    a matmul of one product (no batch) of at least ``GEMM_PARALLEL_MIN_FLOPS`` calls the
    parallel one, other matmuls with more than one row the serial
    one, as do attention kernels too long to tile (the lowering's rules; a wrong guess costs
    only the background work)."""
    from neural_arch.compiler.codegen.lowering import ATTENTION_TILED_MAX, GEMM_PARALLEL_MIN_FLOPS
    if not options.get("shared_gemm", True):
        return []
    want = set()
    for n in graph.nodes:
        if n.op in ("attention", "attention_grad") and n.type.dtype in ("float32", "float64"):
            _, length, _, dim = graph.types[n.inputs[0]].shape  # (q: batch, length, heads, dim)
            if max(length, dim) > ATTENTION_TILED_MAX:  # (the blocked kernels call the GEMM)
                want.add((n.type.dtype, False))
        if n.op != "matmul" or n.type.dtype not in ("float32", "float64") or len(n.type.shape) < 2:
            continue
        *batch, m, cols = n.type.shape
        k = graph.types[n.inputs[0]].shape[-1]
        if m <= 1 or not n.type.size:
            continue  # (a row vector: the GEMV)
        single = math.prod(batch) == 1 and m * cols * max(k, 1) >= GEMM_PARALLEL_MIN_FLOPS
        want.add((n.type.dtype, single and not options.get("serial")))
    return sorted(want)


def _shared_gemms_ready(graph: Graph, options: dict) -> bool:
    """Whether every shared GEMM of this process's thread count is installed already (the
    common case after the first program: then no helper thread is started)."""
    from . import threadpool
    if not _shared or threadpool._loaded is None:  # (no pool yet: num_threads would wait for it)
        return False
    return all(any(sym.startswith(f"narch_gemm_{dt}_t{threads}_") for sym in _shared)
               for dt, par in predicted_gemms(graph, options)
               for threads in ([threadpool.num_threads()] if par else [1]))


def install_gemms_in_background(graph: Graph, options: dict) -> None:
    """Compile (or load from the disk cache) the shared GEMMs ``predicted_gemms`` names on a
    helper thread, while this thread runs the passes and emits the program's LLVM IR: LLVM
    works without the GIL, so a cold compile no longer waits for them after the IR (a GEMM
    takes 0.4-0.9 s to optimise and compile).  ``load_native``'s ``install_gemm`` of the
    same symbol waits for it (the lock) and finds it installed; errors are raised there."""
    wanted = predicted_gemms(graph, options)
    if not wanted:
        return
    from neural_arch.compiler.codegen.lowering import shared_gemm_symbol

    def run():
        from . import threadpool
        try:
            threads = threadpool.num_threads()
        except Exception:  # noqa: BLE001 - no pool (a bad NEURAL_ARCH_NUM_THREADS): load_native's
            return         # threadpool.install() raises the same error in the caller's thread
        for dtype, parallel in wanted:
            t = threads if parallel and threads > 1 else 1
            symbol = shared_gemm_symbol(dtype, t)
            if symbol not in _shared:
                try:
                    install_gemm(symbol, dtype, t)
                except Exception as e:  # noqa: BLE001 - raised where load_native installs it
                    with _shared_lock:
                        _gemm_failures[symbol] = e
    helper = threading.Thread(target=run, name="narch-gemm-install", daemon=True)
    helper.start()
    _gemm_helpers.append(helper)


_gemm_helpers: list = []


def _join_gemm_helpers() -> None:
    """(before a fork: no child starts with a GEMM half made, or its lock held)"""
    for h in list(_gemm_helpers):
        if h is not threading.current_thread():
            h.join()
    _gemm_helpers[:] = [h for h in _gemm_helpers if h.is_alive()]


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_join_gemm_helpers)


# ----------------------------------------------------------------------------- the program


class ThreadChoice:
    """Runs a program's native entry point on all of the pool's threads or on the calling
    thread alone, whichever its calls currently measure faster (the ``Program`` option
    ``adapt_threads``, a training step's default).

    Why: on a shared host the two-thread step can lose its advantage for seconds to minutes
    at a time while one thread runs at full speed -- the MLP benchmark's step measured 235 us
    on two threads and 345 on one, then for stretches 490-500 on two and still 345 on one
    (docs/benchmarks.md, sixth session).  How: the calls in the current mode are timed (the
    median of the last ``WINDOW``); every ``interval`` calls, ``PROBE`` calls run in the
    other mode (the first of them warms it up: a sleeping worker's wake-up, the other
    core's cache) and the best of the rest is compared.  The other mode wins only by more
    than ``MARGIN``; a losing probe doubles the interval (quadruples it when the other mode
    was more than 1.5x slower), up to ``INTERVAL_MAX``, so that a step which never gains
    from one thread (a GPT-2 step: 17 ms on two threads, 31 on one) pays for a probe only
    every 2048 calls.  A change of phase does not wait for that: every ``WINDOW`` calls the
    median is compared with the best median seen since the mode was chosen, and one
    ``SLOWER`` than it probes at once; and on one thread, all threads are probed at least
    every ``ONE_THREAD_PROBE_S`` seconds (they are usually the faster mode, and probing them
    is cheap), so that the end of a slow phase is noticed.  The probe's best call is
    compared with the window's lower quartile (like with like: two modes within noise of
    each other do not take turns).  The one-thread mode is a ``threadpool.serial_hold``,
    so a user's own ``set_serial`` and another thread's step are left alone.  Results do
    not depend on the mode: every kernel splits its work the same way on one thread as on
    two (partial sums in task order)."""

    WINDOW = 16
    PROBE = 3
    MARGIN = 0.95
    SLOWER = 1.25
    INTERVAL_MIN = 32
    INTERVAL_MAX = 2048
    ONE_THREAD_PROBE_S = 1.0

    def __init__(self, entry):
        from . import threadpool
        self._entry = entry
        self._hold, self._release = threadpool.serial_hold, threadpool.serial_release
        self.one = False          # the current mode: the calling thread alone
        self.calls_one = 0        # calls run on one thread so far (probes included)
        self.switches = 0         # mode changes so far (tests, diagnostics)
        self._times: list = []    # the last WINDOW call times (ns) in the current mode
        self._probe: list = []    # call times of the probe under way
        self._interval = self.INTERVAL_MIN
        self._until_probe = self.INTERVAL_MIN
        self._best = None         # the best WINDOW median since the mode was chosen
        self._count = 0           # calls in the current mode since the last check
        self._last_probe = time.perf_counter_ns()

    def __call__(self, ptrs):
        t0 = time.perf_counter_ns()
        if self.one and t0 - self._last_probe > self.ONE_THREAD_PROBE_S * 1e9:
            self._until_probe = 0
        probing = self._until_probe <= 0
        one = self.one != probing
        held = False
        try:
            if one:
                self._hold()
                held = True
                self.calls_one += 1
            t0 = time.perf_counter_ns()
            return self._entry(ptrs)
        finally:
            dt = time.perf_counter_ns() - t0
            if held:
                self._release()
            if probing:
                self._probed(dt)
            else:
                self._until_probe -= 1
                times = self._times
                times.append(dt)
                if len(times) > self.WINDOW:
                    del times[0]
                self._count += 1
                if self._count >= self.WINDOW:
                    self._check()

    def _check(self) -> None:
        """Every WINDOW calls: a median much slower than the mode's best so far is a new
        phase of the host: probe the other mode now."""
        self._count = 0
        now = sorted(self._times)[len(self._times) // 2]
        if self._best is None or now < self._best:
            self._best = now
        elif now > self.SLOWER * self._best:
            self._until_probe = 0
            self._best = now

    def _probed(self, dt: int) -> None:
        self._probe.append(dt)
        if len(self._probe) < self.PROBE:
            return
        other = min(self._probe[1:])
        self._probe = []
        self._last_probe = time.perf_counter_ns()
        now = sorted(self._times)[len(self._times) // 4] if self._times else None
        if now is None or other < now * self.MARGIN:
            self.one = not self.one
            self.switches += 1
            self._times = [other]
            self._best, self._count = None, 0
            self._interval = self.INTERVAL_MIN
        else:
            grow = 4 if other > 1.5 * now else 2
            self._interval = min(self._interval * grow, self.INTERVAL_MAX)
        self._until_probe = self._interval


class Program:
    """A graph compiled to native code, callable on NumPy arrays (positional, in the order
    of ``graph.inputs``).  Calls are serialised by a lock (buffers are shared)."""

    def __init__(self, graph: Graph, groups=None, options: dict | None = None):
        """``options``: ``passes`` (default True: run the simplification pipeline first,
        ignored when ``groups`` are given), ``fuse`` (default True: kernels from the fusion
        plan), ``serial`` (no parallel kernels), ``inplace`` ({output position: input
        position}: write that output over that input's array, e.g. an optimizer's new
        parameters over the old ones; pairs ``inplace_pairs`` cannot prove safe are
        refused, listed in ``self.inplace_refused``, and get fresh arrays),
        ``flush_denormals`` (x86: run with subnormal inputs and results taken as zero, the
        MXCSR's FTZ and DAZ bits, on every thread of the call; the caller's MXCSR is
        restored on return; a training step's default, see ``MXCSR_FTZ_DAZ``),
        ``adapt_threads`` (run each call on the pool's threads or on the calling thread
        alone, whichever currently measures faster: ``ThreadChoice``, in
        ``self.thread_choice``; a training step's default), ``kernel_memo`` (default True:
        kernels alike but for their values' names run one function, ``share.kernel_key``),
        ``module_cache`` (default True: the passes' result and the kernel records from the
        disk cache)."""
        with one_codegen_version():
            self._build(graph, groups, options)

    def _build(self, graph: Graph, groups, options: dict | None) -> None:
        """``__init__``, under one snapshot of the codegen settings (``one_codegen_version``)."""
        self.source_graph = graph
        self.options = dict(options or {})
        install_pool_in_background()  # it is needed to load the code; meanwhile the passes run
        if not _shared_gemms_ready(graph, self.options):
            install_gemms_in_background(graph, self.options)  # likewise the GEMMs it will call
        from neural_arch.compiler.passes.manager import _env_flag
        timing = self.options.get("time_passes", _env_flag("NEURAL_ARCH_TIME_PASSES"))
        text = None
        if groups is None and self.options.get("passes", True):
            graph, text = self._run_passes(graph, timing)
        self.graph = graph
        # outputs written over inputs: {output position: input position}, checked
        self.inplace: dict[int, int] = {}
        self.inplace_refused: dict[str, str] = {}
        wanted = self.options.pop("inplace", None) or {}
        text = text or canonical_text(graph)
        if wanted and groups is None and self.options.get("fuse", True):
            by_name = {graph.outputs[o]: graph.inputs[i].name for o, i in wanted.items()}
            accepted, self.inplace_refused = self._inplace_pairs(graph, by_name, text)
            pos_in = {gi.name: k for k, gi in enumerate(graph.inputs)}
            self.inplace = {graph.outputs.index(o): pos_in[i] for o, i in accepted.items()}
            if accepted:
                self.options["inplace"] = dict(sorted(accepted.items()))
        elif wanted:
            self.inplace_refused = {"*": "in-place outputs need the fusion plan (no explicit groups, fuse on)"}
        self.module = self._build_or_restore(graph, groups, text)
        fallback = [k.name for k in self.module.kernels if k.note.startswith(("unfused", "split"))]
        if self.inplace and fallback:  # a group split into kernels no longer computes an element at once
            self.inplace_refused.update({graph.outputs[o]: f"kernels {fallback} were split" for o in self.inplace})
            self.inplace = {}
            self.options.pop("inplace", None)
            self.module = self._build_or_restore(graph, groups, text)
        self.native = load_native(self.module, text + repr(groups_key(self.module.groups)), self.options)
        if timing:  # the pass table above; then fusion + LLVM IR emission and LLVM's own compile
            llvm = "      (cache)  LLVM machine code loaded from the disk cache" if self.native.from_cache else \
                f"{self.native.compile_seconds * 1e3:9.1f} ms  LLVM optimise + machine code"
            sys.stderr.write(f"{self.module.build_seconds * 1e3:9.1f} ms  fusion + LLVM IR for "
                             f"{len(self.module.kernels)} kernels ({graph.name})\n{llvm}\n")
        lay = self.module.layout
        self._slots = lay.slots
        self._ptrs = (ctypes.c_void_p * lay.nslots)()
        self._keep = []
        self._err = np.zeros(4, np.int64)
        self._ptrs[0] = self._err.ctypes.data
        self._ws = np.zeros(max(lay.workspace_bytes, 64) + 64, np.uint8)
        self._ptrs[lay.workspace_slot] = self._ws.ctypes.data
        self._prof = None
        if "__profile__" in lay.slots:
            self._prof_all = np.zeros(2 * len(self.module.kernels), np.int64)
            self._prof = self._prof_all[:len(self.module.kernels)]          # accumulated ns per kernel
            self.kernel_starts = self._prof_all[len(self.module.kernels):]  # last call's start per kernel
            self._ptrs[lay.slots["__profile__"]] = self._prof_all.ctypes.data
            self.calls = 0
        outputs = set(graph.outputs)
        inputs = set(graph.input_names)
        self._out_alloc = []  # (slot, name, shape, dtype) allocated per call
        aliased = {graph.outputs[o]: i for o, i in self.inplace.items()}
        self._aliased = [(lay.slots[o], o, i) for o, i in aliased.items()]  # written over input i
        intermediates = []
        for n in graph.nodes:
            if n.name not in lay.slots:
                continue  # computed inside a kernel: no buffer
            if materialized(n):
                arr = np.array(n.attr["value"], dtype=n.type.dtype).reshape(n.type.shape)
                self._keep.append(arr)
                self._ptrs[lay.slots[n.name]] = arr.ctypes.data
            elif n.name in aliased:
                continue
            elif n.name in outputs:
                self._out_alloc.append((lay.slots[n.name], n.name, n.type.shape, n.type.dtype))
            else:
                intermediates.append(n)
        self.memory_plan = None
        # a value several kernels write (an operand each matmul kernel materialises for
        # itself) gets its own buffer: the arena plans one lifetime per value
        writers: dict = {}
        for k in self.module.kernels:
            for w in set(k.outputs) | set(k.buffers):
                writers[w] = writers.get(w, 0) + 1
        shared = [n for n in intermediates if writers.get(n.name, 0) > 1]
        for n in shared:
            arr = np.empty(n.type.shape, dtype=n.type.dtype)
            self._keep.append(arr)
            self._ptrs[lay.slots[n.name]] = arr.ctypes.data
        intermediates = [n for n in intermediates if writers.get(n.name, 0) <= 1]
        if self.options.get("arena", True) and intermediates:
            self.memory_plan = self._plan_arena(intermediates)
            base = -(-self._arena.ctypes.data // 64) * 64
            for n in intermediates:
                self._ptrs[lay.slots[n.name]] = base + self.memory_plan.buffers[n.name].offset
        else:
            for n in intermediates:
                arr = np.empty(n.type.shape, dtype=n.type.dtype)
                self._keep.append(arr)
                self._ptrs[lay.slots[n.name]] = arr.ctypes.data
        self._records = None
        self._in_slots = [lay.slots[i.name] for i in graph.inputs]
        self._last_inputs = [_UNSET] * len(self._in_slots)
        self.runs = 0  # calls so far, failed ones included: a caller of run_fixed can tell whether anyone else ran it
        self._want = [(tuple(i.type.shape), np.dtype(i.type.dtype)) for i in graph.inputs]
        self._outputs = list(graph.outputs)
        self._inputs = inputs
        self._lock = threading.Lock()
        self._entry = self.native.entry
        # calls on one thread when they measure faster that way (see ThreadChoice)
        self.thread_choice = None
        if self.options.get("adapt_threads") and not self.options.get("serial") and \
                any(k.tasks > 1 or k.externals for k in self.module.kernels):
            from . import threadpool
            if threadpool.num_threads() > 1:
                self.thread_choice = ThreadChoice(self._entry)
                self._entry = self.thread_choice

    def _run_passes(self, graph: Graph, timing: bool) -> tuple[Graph, str | None]:
        """``DEFAULT_PIPELINE`` on the traced graph, or its result from the disk cache, keyed
        by the traced graph's canonical text, the pipeline, the passes' sources and NumPy's
        version (constant folding computes with it).  Locations are not in that text, so the
        entry stores for each node the index of the traced node whose location it carries,
        and a hit takes the locations of *this* trace: errors name this trace's lines.  To
        know those indices exactly, a miss runs the passes on a copy of the graph whose
        nodes each hold a location object of their own (equal to their own location): the
        passes copy locations, never compare them, so each result location is, by identity,
        one traced node's.  A result holding any other location is not cached.  With an
        instrument on (verify, print, time, dump) the passes always run.  Returns the graph
        and its ``canonical_text`` where known: the entry holds it too (checked, when it is
        stored, against the text of the graph its records restore), which saves a hit the
        time to print it (10-15 ms for the small GPT-2 step)."""
        from neural_arch.compiler.ir import SourceLoc, node_records, nodes_from_records
        from neural_arch.compiler.passes import DEFAULT_PIPELINE, fingerprint, run_pipeline
        from neural_arch.compiler.passes.manager import instruments_requested
        cache = _disk_cache() if self.options.get("module_cache", True) and not timing \
            and not instruments_requested() else None
        if cache is None:
            return run_pipeline(graph, DEFAULT_PIPELINE, time_passes=timing).graph, None
        import json
        parts = {"ir": canonical_text(graph), "kind": "passes", "pipeline": list(DEFAULT_PIPELINE),
                 "passes": fingerprint(), "numpy": np.__version__}
        raw = cache.get(parts)
        if raw is not None:
            try:
                rec = json.loads(raw)
                locs = [n.loc for n in graph.nodes]

                def loc_of(k):
                    if k is None:
                        return None
                    if type(k) is not int or not 0 <= k < len(locs):
                        raise ValueError(f"location index {k!r} of {len(locs)} traced nodes")
                    return locs[k]
                outputs = tuple(rec["outputs"])
                if not all(type(o) is str for o in outputs) or type(rec["text"]) is not str:
                    raise ValueError("malformed outputs or text")
                return Graph(graph.name, graph.inputs, tuple(nodes_from_records(rec["nodes"], loc_of)),
                             outputs), rec["text"]
            except (ValueError, KeyError, TypeError) as e:  # an old or foreign entry: run the passes
                sys.stderr.write(f"neural_arch: ignoring an unreadable pass result in the cache ({e})\n")
        marked = graph.replace(nodes=[n if n.loc is None else Node(n.name, n.op, n.inputs, n.type, n.attrs,
                                                                   SourceLoc(n.loc.file, n.loc.line))
                                      for n in graph.nodes])
        result = run_pipeline(marked, DEFAULT_PIPELINE).graph
        index = {id(n.loc): k for k, n in enumerate(marked.nodes) if n.loc is not None}
        text = canonical_text(result)
        if result.name == graph.name and result.inputs == graph.inputs and \
                all(n.loc is None or id(n.loc) in index for n in result.nodes):
            records = node_records(result.nodes, lambda loc: None if loc is None else index[id(loc)])
            raw = json.dumps({"nodes": records, "outputs": list(result.outputs), "text": text})
            restored = Graph(graph.name, graph.inputs,
                             tuple(nodes_from_records(json.loads(raw)["nodes"], lambda k: None)), result.outputs)
            if canonical_text(restored) == text:  # (what a hit will take as the restored graph's text)
                cache.put(parts, raw.encode())
        return result, text

    def _inplace_pairs(self, graph: Graph, by_name: dict, text: str) -> tuple[dict, dict]:
        """``inplace_pairs``, or its answer from the disk cache: it runs the fusion plan, and
        is a function of the graph's canonical text, the pairs asked for (in order) and the
        compiler's sources (both fingerprints are in the key).  An entry that does not answer
        exactly the pairs asked for is ignored and replaced."""
        cache = _disk_cache() if self.options.get("module_cache", True) else None
        if cache is None:
            return inplace_pairs(graph, by_name)
        import json
        from neural_arch.compiler.passes import fingerprint
        parts = {"ir": text, "version": codegen_version(), "passes": fingerprint(), "kind": "in-place pairs",
                 "wanted": [[o, i] for o, i in by_name.items()]}
        raw = cache.get(parts)
        if raw is not None:
            try:
                rec = json.loads(raw)
                accepted = {o: i for o, i in rec["accepted"]}
                refused = {o: why for o, why in rec["refused"]}
                if all(by_name.get(o) == i for o, i in accepted.items()) and \
                        all(isinstance(w, str) for w in refused.values()) and \
                        sorted(list(accepted) + list(refused)) == sorted(by_name):
                    return accepted, refused
                sys.stderr.write("neural_arch: ignoring cached in-place pairs that answer another request\n")
            except (ValueError, KeyError, TypeError) as e:  # an old or foreign entry: recompute
                sys.stderr.write(f"neural_arch: ignoring unreadable in-place pairs in the cache ({e})\n")
        accepted, refused = inplace_pairs(graph, by_name)
        cache.put(parts, json.dumps({"accepted": [[o, i] for o, i in accepted.items()],
                                     "refused": [[o, why] for o, why in refused.items()]}).encode())
        return accepted, refused

    def _build_or_restore(self, graph: Graph, groups, text: str) -> Module:
        """``build``, or its records from the disk cache (then the kernels' machine code
        comes from the cache too, and the LLVM IR text is rebuilt only if asked for)."""
        options = self.options
        self._records = None  # (cache, key parts, records) of the entry, for the memory plan
        cache = _disk_cache() if groups is None and options.get("module_cache", True) else None
        if cache is None:
            return build(graph, groups, options)
        from . import threadpool
        from neural_arch.compiler.passes import fingerprint
        parts = cache_key_parts(text, options)  # the fusion plan decides the kernels: the passes' sources too
        parts.update(kind="module records", threads=threadpool.num_threads(), passes=fingerprint())
        t0 = time.perf_counter()
        raw = cache.get(parts)
        import json
        if raw is not None:
            try:
                meta = json.loads(raw)
                mod = module_from_meta(meta, graph, lambda: build(graph, groups, options))
                mod.build_seconds = time.perf_counter() - t0
                self._records = (cache, parts, meta)
                return mod
            except (ValueError, KeyError, TypeError) as e:  # an old or foreign entry: rebuild
                sys.stderr.write(f"neural_arch: ignoring unreadable module records in the cache ({e})\n")
        mod = build(graph, groups, options)
        meta = mod.to_meta()
        cache.put(parts, json.dumps(meta).encode())
        self._records = (cache, parts, meta)
        return mod

    def profile(self, top: int | None = None) -> str:
        """Per-kernel wall time over the calls so far (build with ``options={"profile": True}``)."""
        if self._prof is None:
            return "profiling is off: Program(graph, options={'profile': True})"
        total = int(self._prof.sum()) or 1
        rows = sorted(zip(self._prof.tolist(), self.module.kernels), key=lambda r: -r[0])
        lines = [f"{self.calls} calls, {total / max(self.calls, 1) / 1e6:.3f} ms per call in kernels"]
        for ns, k in rows[:top]:
            ops = " ".join(n.op for n in k.nodes)
            lines.append(f"{ns / max(self.calls, 1) / 1e3:10.1f} us {100 * ns / total:5.1f}%  {k.name:<24} "
                         f"[{k.strategy}{', %d tasks' % k.tasks if k.tasks > 1 else ''}] {ops[:70]}")
        return "\n".join(lines)

    def _plan_arena(self, intermediates):
        """Intermediates share one arena by lifetime (``compiler/passes/memory.py``): a kernel
        is a run of steps, one per value it writes, each reading the kernel's inputs and the
        values it wrote before, so everything a kernel touches is alive at once (no two
        buffers of one kernel overlap; kernel arguments stay ``noalias``)."""
        from neural_arch.compiler.passes.memory import Step, check_plan, plan_memory
        planned = {n.name for n in intermediates}
        plan = self._cached_plan(planned)
        if plan is not None:
            self._arena = np.empty(plan.arena_bytes + 64, np.uint8)
            return plan
        steps = []
        for k in self.module.kernels:
            # internal buffers first (written first), an output allowed over one of them last:
            # the buffer dies at the last step, which reads everything the kernel wrote
            reuse = {o: b for o, b in k.reuse if o in planned and b in planned}
            writes = [w for w in dict.fromkeys(tuple(k.buffers) + tuple(k.outputs)) if w in planned]
            writes = [w for w in writes if w not in reuse] + [w for w in writes if w in reuse]
            if not writes:  # it still reads: keep its inputs alive until it ran
                steps.append(Step("__none__", tuple(k.inputs)))
                continue
            for j, w in enumerate(writes):
                reads = tuple(k.inputs) + tuple(writes[:j]) + (tuple(writes) if j == len(writes) - 1 else ())
                steps.append(Step(w, reads, w in reuse, (reuse[w],) if w in reuse else None))
        types = self.graph.types
        plan = plan_memory(steps, {v: types[v].nbytes for v in types}, outputs=self.graph.outputs,
                           external=[v for v in types if v not in planned] + ["__none__"])
        check_plan(plan)
        missing = [n.name for n in intermediates if n.name not in plan.buffers]
        if missing:
            raise AssertionError(f"internal error: no arena place for {missing}")
        self._arena = np.empty(plan.arena_bytes + 64, np.uint8)
        if self._records is not None:  # the plan joins the module's records in the cache
            import json
            cache, parts, meta = self._records
            meta = dict(meta, plan={"arena_bytes": plan.arena_bytes, "naive_bytes": plan.naive_bytes,
                                    "buffers": [[b.name, b.nbytes, b.offset, b.start, b.end, b.inplace_of]
                                                for b in plan.buffers.values()]})
            cache.put(parts, json.dumps(meta).encode())
        return plan

    def _cached_plan(self, planned: set):
        """The memory plan kept with the module records (a function of the records, the
        graph and the in-place outputs, all in their key), if it plans exactly ``planned``
        at their sizes, inside its arena, with no two live buffers overlapping; else None."""
        meta = self._records[2].get("plan") if self._records is not None else None
        if meta is None:
            return None
        from neural_arch.compiler.passes.memory import Buffer, MemoryPlan, check_plan
        try:
            arena = meta["arena_bytes"]
            buffers = {b[0]: Buffer(*b) for b in meta["buffers"]}
            types = self.graph.types
            if set(buffers) != planned or not isinstance(arena, int) or not all(
                    type(b.offset) is int and 0 <= b.offset and b.offset + b.nbytes <= arena and
                    b.nbytes == types[b.name].nbytes and type(b.start) is int and type(b.end) is int
                    for b in buffers.values()):
                raise ValueError("it plans other buffers")
            plan = MemoryPlan(buffers, arena, meta["naive_bytes"], tuple(self.graph.outputs))
            check_plan(plan)
            return plan
        except (ValueError, KeyError, TypeError, AssertionError) as e:
            sys.stderr.write(f"neural_arch: ignoring the cached memory plan ({e})\n")
            return None

    @property
    def kernels(self) -> list[Kernel]:
        return self.module.kernels

    def output_arrays(self) -> list[np.ndarray]:
        """Fresh arrays for ``out=``, one per computed output in order.  Allocate them once and
        pass them on every call of a loop: a fresh output's first writes page-fault, which a
        training graph (every parameter and optimizer moment is an output) pays each call."""
        return [np.empty(shape, dtype=dtype) for _, _, shape, dtype in self._out_alloc]

    def __call__(self, *arrays: np.ndarray, out=None) -> list[np.ndarray]:
        """Run on C-contiguous input arrays of the graph's input types (the caller checks;
        ``CompiledFunction`` does).  ``out``: optional arrays (one per computed output, in
        order) to write into instead of fresh ones (benchmarks, steady-state loops).

        A training step calls this with the same parameter and state arrays every time, so
        inputs that are the very objects of the previous call, with the same shape, strides
        and dtype, keep their data pointers without asking NumPy (``a.ctypes.data`` costs
        ~1 us; an MLP step has 23 inputs), and an output updated in place takes its input's
        pointer.  What is per program (the inputs' types, the outputs' sources) is planned
        on the first call."""
        if out is not None:
            out = self._check_out(out)
        with self._lock:
            fresh = self._run(arrays, out)
            _, _, results_plan, simple, _ = self._call_plan
            accepted = self._accepted
            if simple:  # fresh outputs and inputs updated in place, each returned once
                sources = (fresh, accepted)
                return [sources[kind][i] for kind, i in results_plan]
            results = []
            for kind, i in results_plan:
                if kind == 0:    # a fresh output
                    results.append(fresh[i])
                elif kind == 1:  # an input updated in place
                    results.append(accepted[i])
                elif kind == 2:  # a fresh output returned again
                    results.append(fresh[i].copy())
                elif kind == 3:  # an input returned (again)
                    results.append(np.array(accepted[i], copy=True))
                else:            # a materialised constant
                    results.append(np.array(i.attr["value"], dtype=i.type.dtype).reshape(i.type.shape))
            return results

    def _same_out(self, out) -> bool:
        """``out`` is the very list of arrays of the last call's ``out=``."""
        last_out = self._last_out
        return len(out) == len(last_out) and all(map(operator.is_, out, last_out))

    def _check_out(self, out) -> list[np.ndarray]:
        out = list(out)
        if len(out) != len(self._out_alloc):
            raise TypeError(f"out= needs {len(self._out_alloc)} arrays, got {len(out)}")
        want_out = self.__dict__.get("_out_want")
        if want_out is None:
            want_out = self._out_want = [(tuple(shape), np.dtype(dtype)) for _, _, shape, dtype in self._out_alloc]
        for k, (o, (shape, dtype)) in enumerate(zip(out, want_out)):
            flags = o.flags if isinstance(o, np.ndarray) else None
            if flags is None or o.shape != shape or o.dtype != dtype or not (flags.c_contiguous and flags.writeable):
                raise TypeError(f"out= array for %{self._out_alloc[k][1]} must be a writeable C-contiguous "
                                f"{dtype}{list(shape)} array")
        return out

    def fresh_outputs(self) -> tuple[str, ...]:
        """The outputs computed into fresh arrays on every call, in output order (what
        ``run_inplace`` returns); the others are inputs updated in place, or constants."""
        return tuple(name for _, name, _, _ in self._out_alloc)

    def run_inplace(self, *arrays: np.ndarray) -> list[np.ndarray]:
        """``__call__`` for a loop that reads its in-place outputs from its own input arrays:
        the same run, returning only the outputs computed into fresh arrays (in output order),
        without building the list of every output (a training step's parameters and
        optimizer moments are all outputs written over their inputs: 85 of the tiny GPT-2
        step's 86).  Every other output is an input updated in place, or a constant or input
        returned as it is."""
        with self._lock:
            return self._run(arrays, None)

    def run_fixed(self, *head: np.ndarray, out=None) -> list[np.ndarray]:
        """``run_inplace`` with the last call's inputs except the first ``len(head)``, which
        are given: the others are not looked at.  For a caller that knows they are the very
        arrays of the last call, unchanged -- a training step whose parameters and optimizer
        state were not replaced since (``compiler.tensor.data_generation``): their data
        pointers are the ones taken then, and the program still holds the arrays.  A GPT-2
        step leaves the Python objects of its 84 parameter and state arrays out of cache;
        looking at them again cost the tiny step ~0.2 ms.  Returns the fresh outputs, or
        writes them into ``out`` (arrays of their types, checked on first use: a loop that
        passes the same ones every call allocates nothing)."""
        with self._lock:
            if not self.__dict__.get("_ran"):
                raise RuntimeError(f"{self.graph.name}: run_fixed needs a previous call that took every input "
                                   f"(it reuses that call's inputs)")
            n = len(head)
            if n > len(self._in_slots):
                raise TypeError(f"{self.graph.name} takes {len(self._in_slots)} inputs, got {n}")
            self.runs += 1
            self._take(head)
            aliased = self._aliased_below.get(n)
            if aliased is None:  # (inputs updated in place among those given)
                aliased = self._aliased_below[n] = [i for i in self._call_plan[4] if i < n]
            if out is not None and not self._same_out(out):
                out = self._check_out(out)
            return self._launch(out, aliased)

    def _run(self, arrays, out) -> list[np.ndarray]:
        """Accept the inputs, allocate the fresh outputs, run; the caller holds the lock."""
        in_slots = self._in_slots
        if len(arrays) != len(in_slots):
            raise TypeError(f"{self.graph.name} takes {len(in_slots)} inputs, got {len(arrays)}")
        plan = self.__dict__.get("_call_plan") or self._plan_call()
        self.runs += 1
        self._ran = False  # (until every input is taken: a call failing halfway leaves some old)
        self._take(arrays)
        fresh = self._launch(out, plan[4])
        self._ran = True  # every input taken: run_fixed may reuse them
        return fresh

    def _take(self, arrays) -> None:
        """Take the data pointers of inputs 0 .. len(arrays)-1 (the caller holds the lock)."""
        # the very arrays of the last call with their shapes, strides and dtypes then (an
        # array's data pointer is fixed for its lifetime, and we hold it): nothing to do.  A
        # step after a heavy one finds these objects out of cache, so this is one pass over
        # them, in C, rather than a Python loop
        try:
            meta = list(map(_META, arrays))
        except AttributeError:  # not an array: _accept says which input
            self._accept(arrays, [object()] * len(arrays), range(len(arrays)))
            return
        last, last_meta = self._last_inputs, self._last_meta
        if not (all(map(operator.is_, arrays, last)) and all(map(operator.eq, meta, last_meta))):
            # (a training loop's new batch: only those inputs are looked at)
            same = map(operator.and_, map(operator.is_, arrays, last), map(operator.eq, meta, last_meta))
            self._accept(arrays, meta, itertools.compress(range(len(arrays)), map(operator.not_, same)))

    def _launch(self, out, aliased) -> list[np.ndarray]:
        """Allocate the fresh outputs (or take ``out``'s), check that the inputs ``aliased``
        (updated in place) are writeable, and run the native entry point."""
        ptrs, accepted, address = self._ptrs, self._accepted, self._address
        last_out = self._last_out
        if out is None:
            fresh = []
            for k, (slot, name, shape, dtype) in enumerate(self._out_alloc):
                arr = np.empty(shape, dtype=dtype)
                fresh.append(arr)
                ptrs[slot] = address(arr)
            last_out[:] = [None] * len(last_out)
        else:  # (the very arrays of the last call: their pointers are set)
            fresh = out
            if not self._same_out(out):
                for k, (slot, _, _, _) in enumerate(self._out_alloc):
                    ptrs[slot] = address(out[k])
                last_out[:] = out
        # inputs updated in place (their pointers were set with the input's) must be writeable
        if aliased and not all(map(_WRITEABLE, map(accepted.__getitem__, aliased))):
            i = next(i for i in aliased if not accepted[i].flags.writeable)
            raise TypeError(f"{self.graph.name}: input %{self.graph.inputs[i].name} is updated in place "
                            f"and must be writeable")
        rc = self._entry(ptrs)
        if self._prof is not None:
            self.calls += 1
        if rc:
            raise self._error(rc)
        return fresh

    def _accept(self, arrays, meta, changed) -> None:
        """Check inputs ``changed`` (indices: not the last call's arrays, or their shape,
        strides or dtype changed since) against the graph's input types and take their data
        pointers."""
        want, _, _, _, aliased_by_input = self._call_plan
        ptrs, in_slots, address = self._ptrs, self._in_slots, self._address
        last, last_meta, accepted = self._last_inputs, self._last_meta, self._accepted
        full, spans = False, []  # (an input updated in place changed; spans of other inputs that did)
        for k in changed:
            a, m = arrays[k], meta[k]
            shape, dt, size = want[k]
            if isinstance(a, np.ndarray) and a.dtype == dt and a.flags.c_contiguous and \
                    (a.shape == shape or a.size == size):
                # a view if the shape differs (np.ascontiguousarray makes 0-d arrays 1-d)
                acc = a if a.shape == shape else a.reshape(shape)
            else:
                gi = self.graph.inputs[k]
                got = f"{a.dtype}{list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
                raise TypeError(f"{self.graph.name}: input %{gi.name} expects a C-contiguous {gi.type}, got {got}")
            ptrs[in_slots[k]] = ptr = address(acc)
            for slot in aliased_by_input.get(k, ()):  # outputs written over this input
                ptrs[slot] = ptr
            last[k], last_meta[k], accepted[k] = a, m, acc
            if aliased_by_input:
                if k in aliased_by_input:
                    full = True
                else:
                    spans.append((ptr, ptr + acc.nbytes, k))
        if full or spans:
            self._check_inplace_overlap(full, spans, aliased_by_input)

    def _check_inplace_overlap(self, full: bool, spans: list, written: dict) -> None:
        """An input updated in place (``written``: by input index) must share no memory with
        any other input: the program would read values it has already overwritten, or write
        two outputs into one array (optimizer state given to two parameters, one tensor as
        both of Adam's moments), a wrong answer with no error.  ``full``: an input updated in
        place changed, every pair is compared; else ``spans`` ((start, end, index) of the
        other inputs that changed, such as a new batch) are compared with the span of the inputs
        updated in place (two comparisons each, ~1 us a call), and exactly if inside it."""
        accepted, address = self._accepted, self._address
        span = self.__dict__.get("_inplace_span")
        if full or span is None:
            every = {k: (start, start + a.nbytes) for k, a in enumerate(accepted)
                     if a is not None and a.nbytes for start in (address(a),)}
            mine = [every[k] for k in written if k in every]
            self._inplace_span = (min(s for s, _ in mine), max(e for _, e in mine)) if mine else (0, 0)
            open_: list = []  # (end, index) of the spans that may still overlap the next
            for k in sorted(every, key=lambda k: every[k][0]):
                start, end = every[k]
                open_ = [(e, j) for e, j in open_ if e > start]
                for _, j in open_:
                    if j in written or k in written:
                        self._overlap_error(j, k, written)
                open_.append((end, k))
            return
        lo, hi = span
        for start, end, k in spans:
            if start < hi and end > lo and end > start:
                for j in written:
                    b = accepted[j]
                    if b is not None and b.nbytes and start < address(b) + b.nbytes and address(b) < end:
                        self._overlap_error(j, k, written)

    def _overlap_error(self, j: int, k: int, written: dict):
        """Raise: inputs ``j`` and ``k`` share memory and one of them is updated in place."""
        names = self.graph.inputs
        a, b = (j, k) if j in written else (k, j)
        raise ValueError(f"{self.graph.name}: input %{names[a].name} is updated in place and shares memory with "
                         f"input %{names[b].name}; give each its own array (a copy)")

    def _plan_call(self):
        """What ``__call__`` needs per program: each input's (shape, dtype, size), and where each
        output comes from: (0, k) the k-th fresh array, (1, i) input i updated in place,
        (2, k) / (3, i) a copy of either (an output returned twice, an input returned),
        (4, node) a materialised constant."""
        want = [(tuple(i.type.shape), np.dtype(i.type.dtype), i.type.size) for i in self.graph.inputs]
        fresh = {name: k for k, (_, name, _, _) in enumerate(self._out_alloc)}
        aliased = {name: i for _, name, i in self._aliased}
        inputs = {n: i for i, n in enumerate(self.graph.input_names)}
        plan, seen = [], set()
        for o in self._outputs:
            if o in fresh:
                plan.append((0 if o not in seen else 2, fresh[o]))
            elif o in aliased:
                plan.append((1 if o not in seen else 3, aliased[o]))
            elif o in inputs:
                plan.append((3, inputs[o]))
            else:
                plan.append((4, self.graph.producer()[o]))
            seen.add(o)
        n = len(want)
        self._last_meta, self._accepted = [_UNSET] * n, [None] * n
        self._last_inputs = [_UNSET] * n  # (pointers of aliased outputs are set with their input's)
        by_input: dict = {}
        for slot, _, i in self._aliased:
            by_input.setdefault(i, []).append(slot)
        simple = all(kind in (0, 1) for kind, _ in plan)
        self._call_plan = (want, [dt for _, dt, _ in want], plan, simple, by_input)
        self._aliased_below = {}
        self._last_out = [None] * len(self._out_alloc)  # out= arrays whose pointers are set
        return self._call_plan

    @staticmethod
    def _address(a: np.ndarray) -> int:
        """The data pointer of a C-contiguous array: through ctypes' buffer protocol (~0.3 us)
        when the array is writeable and not empty, else ``a.ctypes.data`` (~1 us)."""
        try:
            return ctypes.addressof(ctypes.c_char.from_buffer(a))
        except (TypeError, ValueError, BufferError):
            return a.ctypes.data

    def _error(self, rc: int) -> Exception:
        code, bad = int(self._err[0]), int(self._err[1])
        info = self.module.checks.get(code)
        if info is None:
            return RuntimeError(f"{self.graph.name}: native code failed with status {rc}")
        node = self.graph.producer().get(info.node.name, info.node)
        if node.op == "check_index":
            allowed = f"[0, {info.size})" + (f" or {info.ignore}" if info.ignore is not None else "")
            err = OpIndexError("check_index", f"index {bad} is out of range: allowed {allowed}")
        else:
            err = OpIndexError(node.op, f"index {bad} is out of range for axis {info.axis} of size {info.size}")
        return err.with_loc(node.loc)


def groups_key(groups):
    """What, besides the graph, determines the code: the kernels' kinds, members, outputs."""
    return tuple((g.kind, tuple(n.name for n in g.members), tuple(n.name for n in g.inlined),
                  tuple(g.outputs)) for g in groups)
