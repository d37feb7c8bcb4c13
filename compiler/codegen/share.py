"""Identical internal functions share one definition before LLVM sees the module.

A transformer's layers lower to the same kernel bodies again and again: the bodies take
their buffers as arguments (``kN.body(ptr noalias %buf..., i64 %lo, i64 %hi)``), so the
body of layer 3's attention softmax is the body of layer 0's but for the names of its
local values (which come from node names).  LLVM would optimise and compile every copy;
``share_identical_functions`` keeps the first of each set of identical internal functions,
points every call at it, drops the others and marks it ``noinline``, so LLVM does that
work once per distinct body.  (The per-kernel wrappers and tasks, which load the kernel's own buffer slots, stay
one per kernel; they are a few lines each.)

Identical means: equal text once the function's own name and its local value and label
names are numbered in order of first appearance.  Calls are compared by callee name, so
functions calling shared functions become equal only after those are shared: the search
repeats until nothing changes.
"""
from __future__ import annotations

import collections
import re

import llvmlite.ir as ir

# a local value (%".12", %"R.3@0", %x) or a label definition at the start of a line
_LOCAL = re.compile(r'%"((?:[^"\\]|\\.)*)"|%([-A-Za-z$._0-9]+)|^"((?:[^"\\]|\\.)*)":|^([-A-Za-z$._0-9]+):',
                    re.MULTILINE)


def canonical_body(fn: ir.Function, numbered: bool = True) -> str:
    """``fn``'s definition with its name and local names replaced by canonical ones
    (``numbered=False``: local names left out, a cheaper text equal for any two functions
    whose canonical bodies are equal)."""
    text = str(fn)
    head, sep, body = text.partition("\n")
    names: dict = {}

    def rename(m):
        name = next(g for g in m.groups() if g is not None)
        new = names.setdefault(name, f"v{len(names)}")
        return f"%{new}" if m.group(0).startswith("%") else f"{new}:"
    # the signature line: only the argument names change (the function's own name goes)
    head = head.replace(f'@"{fn.name}"', "@SELF").replace(f"@{fn.name}(", "@SELF(")
    replace = rename if numbered else ""
    return _LOCAL.sub(replace, head) + sep + _LOCAL.sub(replace, body)


def _calls(module: ir.Module):
    """(function, block, call instruction) for every direct call in ``module``."""
    for f in module.functions:
        for block in f.blocks:
            for instr in block.instructions:
                if isinstance(instr, ir.CallInstr) and isinstance(instr.callee, ir.Function):
                    yield f, block, instr


def share_identical_functions(module: ir.Module) -> dict[str, str]:
    """Merge identical internal function definitions of ``module`` in place; returns
    {dropped function name: the name of the function now called instead}."""
    merged: dict[str, str] = {}
    # functions passed as values (a task to the thread pool) keep their own definition
    as_value = {id(a) for _, _, call in _calls(module) for a in call.args if isinstance(a, ir.Function)}
    while True:
        first: dict[str, ir.Function] = {}
        dup: dict[ir.Function, ir.Function] = {}
        candidates = [f for f in module.functions
                      if not f.is_declaration and f.linkage == "internal" and id(f) not in as_value]
        # functions equal up to names are equal with the names left out: only those whose
        # text without names another shares need their names numbered (a regular expression
        # with a Python call per name: half of this function's time)
        skeleton = {id(f): canonical_body(f, numbered=False) for f in candidates}
        shared = collections.Counter(skeleton.values())
        for f in candidates:
            if shared[skeleton[id(f)]] < 2:
                continue
            key = canonical_body(f)
            if key in first:
                dup[f] = first[key]
            else:
                first[key] = f
        if not dup:
            return merged
        for f, block, call in _calls(module):
            if call.callee in dup:
                call.replace_callee(dup[call.callee])
                # llvmlite caches the text of an instruction, block and function once
                # printed (canonical_body printed them): drop it, or the module's text
                # would still call the dropped function
                for v in (call, block, f):
                    v._clear_string_cache()
        for f, keep in dup.items():
            del module.globals[f.name]
            merged[f.name] = keep.name
            # compiled once, called from each kernel's task (inlined, it would be compiled
            # again into every caller); a call per task costs nothing beside a loop nest
            if "noinline" not in keep.attributes and "alwaysinline" not in keep.attributes:
                keep.attributes.add("noinline")


# ----------------------------------------------------------------------------- kernels alike


def kernel_key(graph, spec, inplace, graph_outputs) -> tuple[tuple, tuple]:
    """(key, names): two groups of one key lower to the same kernel but for the names of
    their values, ``names`` listing each group's values in corresponding order.  The key is
    everything the lowering sees of a group: its nodes (op, attributes, type, inputs), the
    shapes and dtypes of the values they read, which values are program outputs or written
    in place over which, and the order in the graph of the values it may take as arguments
    (a kernel's arguments follow it).  A transformer's layers lower to the same kernels again and again:
    ``build`` lowers the first of each key and calls its function for the others (with
    their own buffers), instead of lowering each and merging identical bodies afterwards."""
    from .kernel import _value_order
    ids: dict = {}

    def vid(v):
        k = ids.get(v)
        if k is None:
            k = ids[v] = len(ids)
        return k
    nodes = tuple((n.op, repr(n.attrs), tuple(vid(i) for i in n.inputs), vid(n.name))
                  for part in (spec.members, spec.inlined) for n in part)
    outputs = tuple(vid(o) for o in spec.outputs)
    types = graph.types
    values = []
    names = list(ids)
    while len(values) < len(names):  # (an in-place partner may add a value)
        v = names[len(values)]
        t = types[v]
        partner = inplace.get(v) if isinstance(inplace, dict) else None
        values.append((t.shape, t.dtype, v in graph_outputs, v in inplace,
                       None if partner is None else vid(partner)))
        names = list(ids)
    names = tuple(names)
    # a kernel's buffers are its arguments in graph order (values computed inline, such as
    # the constants the layers share, are no arguments: their place does not count)
    order = _value_order(graph)
    inlined = {n.name for n in spec.inlined}
    rank = tuple(sorted((i for i, v in enumerate(names) if v not in inlined), key=lambda i: order.get(names[i], -1)))
    return (spec.kind, tuple(spec.domain), tuple(spec.axes), nodes, outputs, tuple(values), rank), names


def renamed_kernel(template, name: str, rename: dict, producer: dict):
    """``template``'s kernel record for the group whose values ``rename`` maps its values to
    (``kernel_key``; every value the record names, the error record's and the workspace's
    slots included), under ``name``, running ``template``'s function (``same_as``)."""
    from .kernel import Kernel
    r = rename.__getitem__
    computed = {n.name for n in template.nodes}

    def loop(key):  # a loop over a node's reduction is named after it ("red.42"; not "row.full")
        head, dot, value = key.partition(".")
        return head + dot + rename[value] if dot and value in computed else key
    return Kernel(name, tuple(producer[r(n.name)] for n in template.nodes), tuple(map(r, template.inputs)),
                  tuple(map(r, template.outputs)), template.strategy, template.tasks, [],
                  {loop(k): v for k, v in template.loops.items()},
                  template.workspace_bytes, tuple(map(r, template.buffers)), template.note, template.externals,
                  tuple(tuple(map(r, pair)) for pair in template.reuse), same_as=template.same_as or template.name)
