"""The IR verifier: names, use-before-def, types against each op's shape rule, outputs.
On failure it prints the offending node with a few nodes around it."""
from __future__ import annotations

from .ir import Graph, format_node
from .ops.registry import PRIMITIVES, OpError


class VerifyError(ValueError):
    pass


def _context(graph: Graph, index: int, radius: int = 3) -> str:
    lines = []
    for j in range(max(0, index - radius), min(len(graph.nodes), index + radius + 1)):
        mark = ">>" if j == index else "  "
        lines.append(f"  {mark} {format_node(graph.nodes[j])}")
    return "\n".join(lines)


def verify(graph: Graph) -> Graph:
    """Return the graph unchanged if it is well formed, else raise VerifyError."""
    defined: dict = {}
    for gi in graph.inputs:
        if gi.name in defined:
            raise VerifyError(f"verify {graph.name}: input %{gi.name} is declared twice")
        defined[gi.name] = gi.type
    for idx, n in enumerate(graph.nodes):
        def fail(msg):
            raise VerifyError(f"verify {graph.name}: {msg}\n{_context(graph, idx)}")
        if n.name in defined:
            fail(f"%{n.name} is defined twice")
        for i in n.inputs:
            if i not in defined:
                fail(f"%{n.name} uses %{i} before it is defined")
        prim = PRIMITIVES.get(n.op)
        if prim is None:
            fail(f"unknown op {n.op!r}")
        try:
            expect = prim.shape_rule(*[defined[i] for i in n.inputs], **n.attr)
        except OpError as e:
            fail(f"%{n.name} breaks the rule of {n.op}: {e.message}")
        except TypeError as e:
            fail(f"%{n.name}: {n.op} got bad inputs or attributes ({e})")
        if expect != n.type:
            fail(f"%{n.name} is declared {n.type} but {n.op} gives {expect}")
        defined[n.name] = n.type
    for o in graph.outputs:
        if o not in defined:
            ret = "return (" + ", ".join("%" + x for x in graph.outputs) + ")"
            tail = _context(graph, len(graph.nodes))  # the last nodes, then the offending return
            raise VerifyError(f"verify {graph.name}: output %{o} is not defined in the graph\n"
                              + (tail + "\n" if tail else "") + f"  >> {ret}")
    return graph
