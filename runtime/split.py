"""Split one module of LLVM IR text into parts LLVM can optimise and compile in parallel.

A program's module is a set of exported kernels (``kN``, the entry point) and the internal
functions they call (tasks, bodies, math helpers).  ``split_module`` deals the exported
functions out to ``n`` parts, balancing the text each part must compile; every part holds
the exported functions dealt to it, every internal function they reach (an internal
function two parts reach is compiled in both: it is private to each object), and a
``declare`` for every exported function of another part it calls.  The object files of all
parts are loaded into one engine, which resolves those calls across them.

The text is what ``llvmlite.ir`` prints: top-level items are ``declare`` lines, ``define``
blocks closed by a line ``}`` and metadata lines.  Anything else (a global variable, an
alias) makes ``split_module`` return the module whole, as one part.
"""
from __future__ import annotations

import re

_NAME = re.compile(r'@"((?:[^"\\]|\\.)*)"|@([-A-Za-z$._0-9]+)')
_DEFINE = re.compile(r'define\s+(internal\s+|private\s+)?[^@]*@(?:"((?:[^"\\]|\\.)*)"|([-A-Za-z$._0-9]+))\(')


def _items(text: str):
    """(header lines, [(kind, name, internal, text)]) or None if the text is not of the
    expected shape."""
    header, items = [], []
    lines = text.split("\n")
    k = 0
    while k < len(lines):
        line = lines[k]
        if line.startswith("define"):
            m = _DEFINE.match(line)
            if m is None:
                return None
            end = k
            while end < len(lines) and lines[end] != "}":
                end += 1
            if end == len(lines):
                return None
            items.append(("define", m.group(2) or m.group(3), bool(m.group(1)), "\n".join(lines[k:end + 1])))
            k = end + 1
            continue
        if line.startswith("declare") or line.startswith("!"):
            items.append(("other", None, False, line))
        elif line.startswith(("target ", "; ")) or not line.strip():
            header.append(line)
        else:
            return None
        k += 1
    return header, items


def _declaration(define_text: str) -> str:
    first = define_text.split("\n", 1)[0]
    return "declare" + first[len("define"):]


def split_module(text: str, n: int) -> list[str]:
    """``text`` as at most ``n`` modules whose objects, loaded together, behave as it does."""
    parsed = _items(text) if n > 1 else None
    if parsed is None:
        return [text]
    header, items = parsed
    defines = {name: (internal, body) for kind, name, internal, body in items if kind == "define"}
    others = [body for kind, _, _, body in items if kind != "define"]
    refs = {name: {a or b for a, b in _NAME.findall(body)} - {name} for name, (_, body) in defines.items()}

    def closure(root):  # the root and every internal function it reaches
        out, stack = [], [root]
        while stack:
            f = stack.pop()
            if f in out:
                continue
            out.append(f)
            stack.extend(r for r in refs[f] if r in defines and defines[r][0])
        return out
    roots = [name for name, (internal, _) in defines.items() if not internal]
    if len(roots) < 2:
        return [text]
    cost = {r: sum(len(defines[f][1]) for f in closure(r)) for r in roots}
    parts: list[list] = [[] for _ in range(min(n, len(roots)))]
    load = [0] * len(parts)
    for r in sorted(roots, key=lambda r: -cost[r]):  # largest first onto the lightest part
        j = load.index(min(load))
        parts[j].append(r)
        load[j] += cost[r]
    out = []
    for part in parts:
        funcs: list = []
        for r in part:
            funcs.extend(f for f in closure(r) if f not in funcs)
        external = sorted({r for f in funcs for r in refs[f]
                           if r in defines and not defines[r][0] and r not in funcs})
        body = header + others + [_declaration(defines[e][1]) for e in external] + [defines[f][1] for f in funcs]
        out.append("\n".join(body) + "\n")
    return out
