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


# LLVM's time for a function grows with its text and, as much again, with its loops (each
# one vectorised, interleaved and unrolled): fitted over the GPT-2 steps' kernels (186 sets
# of functions, R^2 0.94), a loop (a phi) costs as much as 7000 bytes of text
LOOP_COST = 7000
_ALWAYSINLINE = re.compile(r"\)[^(]*\balwaysinline\b")


def _shared_clusters(roots, reach, size) -> list[list]:
    """The roots grouped so that no two groups reach one function LLVM compiles on its own:
    a transformer's layers share their kernel bodies, and a part holding one layer's kernel
    would compile the body the other part compiles too (small steps' modules lost a third of
    the two cores' time to such copies)."""
    parent = {r: r for r in roots}

    def find(r):
        while parent[r] != r:
            parent[r] = parent[parent[r]]
            r = parent[r]
        return r
    owner: dict = {}
    for r in roots:
        for f in reach[r][1:]:
            if size[f]:
                parent[find(r)] = find(owner.setdefault(f, r))
    groups: dict = {}
    for r in roots:
        groups.setdefault(find(r), []).append(r)
    return list(groups.values())


def _deal(groups: list[list], n: int, reach: dict, size: dict) -> list[list]:
    """``groups`` dealt onto ``n`` parts, largest first onto the part it costs least to
    join (what it adds to the part's cost, functions already there being free)."""
    parts: list[list] = [[] for _ in range(n)]
    have: list[set] = [set() for _ in range(n)]
    load = [0] * n
    funcs = [({f for r in g for f in reach[r]}, g) for g in groups]
    for fs, g in sorted(funcs, key=lambda x: -sum(size[f] for f in x[0])):
        added = [sum(size[f] for f in fs - have[j]) for j in range(n)]
        j = min(range(n), key=lambda j: (load[j] + added[j], j))
        parts[j].extend(g)
        have[j] |= fs
        load[j] += added[j]
    return [p for p in parts if p]


def split_module(text: str, n: int, workers: int | None = None) -> list[str]:
    """``text`` as at most ``n`` modules whose objects, loaded together, behave as it does,
    the costliest first, for ``workers`` processes (default ``n``) to compile."""
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
    reach = {r: closure(r) for r in roots}
    # what a part costs: the functions LLVM compiles in it (an alwaysinline function is
    # compiled into its callers, which are counted), each by its text and its loops
    size = {f: 0 if _ALWAYSINLINE.search(body.split("\n", 1)[0]) else len(body) + LOOP_COST * body.count("= phi ")
            for f, (_, body) in defines.items()}

    def part_cost(part):
        return sum(size[f] for f in {f for r in part for f in reach[r]})
    n = min(n, len(roots))
    workers = min(workers or n, n)

    def makespan(ps):  # workers taking the parts in turn finish near the later of these
        costs = [part_cost(p) for p in ps]
        return max(sum(costs) / workers, max(costs))
    candidates = [_deal([[r] for r in roots], n, reach, size),
                  _deal(_shared_clusters(roots, reach, size), n, reach, size)]
    parts = min(candidates, key=makespan)
    parts.sort(key=lambda p: -part_cost(p))  # the costliest first (workers take them in order)
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
