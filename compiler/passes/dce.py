"""Dead-code elimination: drop nodes whose values no output needs."""
from __future__ import annotations

from ..ir import Graph


def dead_code_elimination(graph: Graph) -> Graph:
    live = set(graph.outputs)
    kept = []
    for n in reversed(graph.nodes):
        if n.name in live:
            kept.append(n)
            live.update(n.inputs)
    if len(kept) == len(graph.nodes):
        return graph
    return graph.replace(nodes=tuple(reversed(kept)))
