"""Tracing (Python function -> Graph), inlining a graph back into Python (call_graph), and
the transformations grad / value_and_grad built on the autodiff graph transform."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np

from .ir import Graph, TensorType, is_float
from .tensor import Tensor, TraceError, Tracer, bind, current_tracer


def flatten_outputs(out, where: str) -> tuple[list[Tensor], object]:
    """Flatten nested tuples/lists of tensors; the tree is None for a leaf, else
    (type, [subtrees])."""
    if isinstance(out, Tensor):
        return [out], None
    if isinstance(out, (tuple, list)):
        leaves, subtrees = [], []
        for o in out:
            lv, t = flatten_outputs(o, where)
            leaves += lv
            subtrees.append(t)
        return leaves, (type(out), subtrees)
    raise TraceError(f"{where}: a traced function must return tensors or (nested) tuples of tensors, "
                     f"got {type(out).__name__}")


def unflatten_outputs(tree, leaves: Sequence):
    it = iter(leaves)

    def build(t):
        if t is None:
            return next(it)
        kind, subs = t
        return kind(build(s) for s in subs)
    return build(tree)


@dataclass(frozen=True)
class Traced:
    graph: Graph
    bindings: dict  # input name -> the Tensor that feeds it (user args, params, captures)
    out_tree: object  # structure of fn's result (see flatten_outputs)

    @property
    def single_output(self) -> bool:
        return self.out_tree is None

    def unflatten(self, leaves: Sequence):
        """Rebuild fn's result structure from the graph's flat outputs."""
        return unflatten_outputs(self.out_tree, leaves)


def find_params(fn) -> dict[str, Tensor]:
    """Named parameters of a Module-like ``fn`` (or of the object a bound method belongs to)."""
    for obj in (fn, getattr(fn, "__self__", None)):
        named = getattr(obj, "named_parameters", None)
        if callable(named):
            return dict(named())
    return {}


def _arg_names(fn, n: int) -> list[str]:
    try:
        sig = inspect.signature(fn)
        names = [p.name for p in sig.parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        names = []
    if len(names) < n:
        names += [f"arg{i}" for i in range(len(names), n)]
    return names[:n]


def _example_type(x: Any) -> TensorType:
    if isinstance(x, TensorType):
        return x
    if isinstance(x, Tensor):
        return x.type
    return Tensor(x).type


def trace_with_info(fn: Callable, *example_args, params: dict | None = None,
                    name: str | None = None, arg_names: Sequence[str] | None = None,
                    arg_kinds: Sequence[str] | None = None) -> Traced:
    """``trace`` with the bindings and output structure.  ``arg_names`` / ``arg_kinds`` name
    the inputs fed by ``example_args`` (default: fn's parameter names; all ``arg``)."""
    if params is None:
        params = find_params(fn)
    name = name or getattr(fn, "__name__", None) or type(fn).__name__
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name) or "main"
    tracer = Tracer(name, params)
    bindings = {}
    names = list(arg_names) if arg_names is not None else _arg_names(fn, len(example_args))
    kinds = list(arg_kinds) if arg_kinds is not None else ["arg"] * len(example_args)
    if len(names) != len(example_args) or len(kinds) != len(example_args):
        raise TypeError(f"{name}: {len(example_args)} example arguments, {len(names)} names, {len(kinds)} kinds")
    with tracer:
        syms = []
        for argname, kind, x in zip(names, kinds, example_args):
            sym = tracer.add_input(_example_type(x), kind, argname)
            syms.append(sym)
            bindings[sym._sym] = x if isinstance(x, Tensor) else (None if isinstance(x, TensorType) else Tensor(x))
        for t in params.values():  # every parameter is an input, used or not: a stable signature
            tracer.lift(t)
        outs, tree = flatten_outputs(fn(*syms), name)
        graph = tracer.finish(outs)
    bindings.update(tracer.bindings)
    return Traced(graph, bindings, tree)


def trace(fn: Callable, *example_args, params: dict | None = None, name: str | None = None) -> Graph:
    """Trace ``fn`` on example arguments (tensors, arrays or TensorTypes) into a Graph.
    Module parameters become named ``param`` inputs; Python control flow runs at trace time."""
    return trace_with_info(fn, *example_args, params=params, name=name).graph


def call_graph(graph: Graph, *inputs: Tensor, typed: bool = False) -> list[Tensor]:
    """Apply a graph's nodes to tensors: runs eagerly on concrete tensors, or inlines the
    graph into the active trace (keeping each node's source line).  ``typed``: the graph's
    types are what its ops' rules give (a traced or differentiated graph), so inlining
    copies its nodes without running the rules again."""
    if len(inputs) != len(graph.inputs):
        raise TypeError(f"{graph.name} takes {len(graph.inputs)} inputs, got {len(inputs)}")
    env = {}
    for gi, x in zip(graph.inputs, inputs):
        t = x if isinstance(x, Tensor) else Tensor(x)
        if t.type != gi.type:
            raise TypeError(f"{graph.name}: input %{gi.name} expects {gi.type}, got {t.type}")
        env[gi.name] = t
    tracer = current_tracer()
    saved = tracer.loc_override if tracer else None
    try:
        copy = typed and tracer is not None
        for n in graph.nodes:
            if tracer is not None:
                tracer.loc_override = n.loc
            if copy:
                env[n.name] = tracer.emit_copy(n, [env[i] for i in n.inputs])
            else:
                env[n.name] = bind(n.op, *[env[i] for i in n.inputs], **n.attr)
    finally:
        if tracer is not None:
            tracer.loc_override = saved
    return [env[o] for o in graph.outputs]


def _as_argnums(argnums, n) -> tuple[int, ...]:
    nums = (argnums,) if isinstance(argnums, int) else tuple(argnums)
    for a in nums:
        if not -n <= a < n:
            raise ValueError(f"argnums {a} is out of range for {n} arguments")
    return tuple(a % n for a in nums)


def _grad_impl(fn, argnums, with_value):
    from .autodiff import autodiff

    def wrapped(*args):
        traced = trace_with_info(fn, *args)
        g = traced.graph
        nums = _as_argnums(argnums, len(args))
        wrt = [g.inputs[i].name for i in nums]
        for i, name in zip(nums, wrt):
            if not is_float(g.types[name].dtype):
                raise TypeError(f"grad: argument {i} (%{name}) has dtype {g.types[name].dtype}; "
                                f"only floating-point inputs are differentiable")
        dg = autodiff(g, wrt, with_value=with_value)
        outs = call_graph(dg, *[traced.bindings[i.name] for i in g.inputs], typed=True)
        grads = outs[1:] if with_value else outs
        grads = grads[0] if isinstance(argnums, int) else tuple(grads)
        return (outs[0], grads) if with_value else grads

    wrapped.__name__ = ("value_and_grad_" if with_value else "grad_") + getattr(fn, "__name__", "fn")
    wrapped.__wrapped__ = fn
    return wrapped


def grad(fn: Callable, argnums: int | Sequence[int] = 0) -> Callable:
    """A function returning the gradient of scalar ``fn`` with respect to argument(s)
    ``argnums``.  It runs eagerly on concrete tensors and can itself be traced."""
    return _grad_impl(fn, argnums, with_value=False)


def value_and_grad(fn: Callable, argnums: int | Sequence[int] = 0) -> Callable:
    """Like :func:`grad`, but returns ``(value, grads)``."""
    return _grad_impl(fn, argnums, with_value=True)


def as_numpy_inputs(graph: Graph, bindings: dict) -> list[np.ndarray]:
    return [np.asarray(bindings[i.name].data) for i in graph.inputs]
