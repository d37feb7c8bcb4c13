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

import re

import llvmlite.ir as ir

# a local value (%".12", %"R.3@0", %x) or a label definition at the start of a line
_LOCAL = re.compile(r'%"((?:[^"\\]|\\.)*)"|%([-A-Za-z$._0-9]+)|^"((?:[^"\\]|\\.)*)":|^([-A-Za-z$._0-9]+):',
                    re.MULTILINE)


def canonical_body(fn: ir.Function) -> str:
    """``fn``'s definition with its name and local names replaced by canonical ones."""
    text = str(fn)
    head, sep, body = text.partition("\n")
    names: dict = {}

    def rename(m):
        name = next(g for g in m.groups() if g is not None)
        new = names.setdefault(name, f"v{len(names)}")
        return f"%{new}" if m.group(0).startswith("%") else f"{new}:"
    # the signature line: only the argument names change (the function's own name goes)
    head = head.replace(f'@"{fn.name}"', "@SELF").replace(f"@{fn.name}(", "@SELF(")
    return _LOCAL.sub(rename, head) + sep + _LOCAL.sub(rename, body)


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
        for f in module.functions:
            if f.is_declaration or f.linkage != "internal" or id(f) in as_value:
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
