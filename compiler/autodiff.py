"""Reverse-mode autodiff as a graph-to-graph transform.

Given a graph with a scalar float output, ``autodiff`` returns a new graph whose outputs are
(optionally the value, then) the gradients with respect to chosen inputs.  It replays the
forward nodes, then walks them in reverse applying each primitive's VJP rule, which emits
more primitives.  Backward nodes carry the source line of the forward node they came from.  Forward values the
outputs do not need are dropped (dead-code elimination).
"""
from __future__ import annotations

from typing import Sequence

from .ir import Graph, is_float
from .ops.registry import NONDIFF, get
from .ops.primitives import zeros_like
from .passes.dce import dead_code_elimination
from .tensor import Tracer, bind


class AutodiffError(ValueError):
    pass


def autodiff(graph: Graph, wrt: Sequence[str], with_value: bool = True, name: str | None = None,
             no_gradient: list | None = None) -> Graph:
    """``no_gradient``: if given, the names in ``wrt`` no gradient flows to (the output does not
    depend on them, or only through non-differentiable ops: torch leaves their ``.grad``
    None) are appended to it; their gradients in the result are zeros."""
    if len(graph.outputs) != 1:
        raise AutodiffError(f"autodiff: {graph.name} has {len(graph.outputs)} outputs; "
                            f"differentiate a function with one scalar output")
    out_type = graph.types[graph.outputs[0]]
    if out_type.shape != () or not is_float(out_type.dtype):
        raise AutodiffError(f"autodiff: the output of {graph.name} must be a float scalar to take its "
                            f"gradient, got {out_type}")
    inputs = {i.name for i in graph.inputs}
    for w in wrt:
        if w not in inputs:
            raise AutodiffError(f"autodiff: %{w} is not an input of {graph.name}")
    tracer = Tracer(name or graph.name + "_grad")
    with tracer:
        env = {i.name: tracer.add_input(i.type, i.kind, i.name) for i in graph.inputs}
        for n in graph.nodes:  # the forward replayed on inputs of its own types: types carry over
            tracer.loc_override = n.loc
            env[n.name] = tracer.emit_copy(n, [env[i] for i in n.inputs])
        out = env[graph.outputs[0]]
        tracer.loc_override = None
        cts = {graph.outputs[0]: bind("full", shape=(), value=1.0, dtype=out.dtype)}
        for n in reversed(graph.nodes):
            g = cts.pop(n.name, None)
            if g is None:
                continue
            prim = get(n.op)
            if prim.vjp is NONDIFF:
                continue
            tracer.loc_override = n.loc
            gs = prim.vjp(g, env[n.name], *[env[i] for i in n.inputs], **n.attr)
            for x, gx in zip(n.inputs, gs):
                if gx is None or not is_float(graph.types[x].dtype):
                    continue
                prev = cts.get(x)
                cts[x] = gx if prev is None else bind("add", prev, gx)
        tracer.loc_override = None
        grads = [cts[w] if w in cts else zeros_like(env[w]) for w in wrt]
        if no_gradient is not None:
            no_gradient.extend(w for w in wrt if w not in cts)
        result = tracer.finish(([out] if with_value else []) + grads)
    return dead_code_elimination(result)
