"""Random valid graphs (NNSmith-style) built from the op library.

Shapes and dtypes are satisfied by construction: each step picks an op whose preconditions
the current values meet (or creates a fresh input that meets them), and values are kept away
from NaN/Inf by the choice of ops (log of |x|+1, division by |x|+1, exp of a tanh, ...).
A recipe is a list of steps; replaying it under ``trace`` gives the Graph, so the same recipe
also runs eagerly or compiled.

    recipe = random_recipe(NumpySampler(seed), max_steps=10)
    graph, inputs = build(recipe)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from neural_arch.compiler import functional as F
from neural_arch.compiler.ir import Graph, TensorType
from neural_arch.compiler.ops.registry import Sampler
from neural_arch.compiler.trace import trace

UNARY = {
    "tanh": F.tanh, "sin": F.sin, "cos": F.cos, "neg": F.neg, "abs": F.abs, "sigmoid": F.sigmoid,
    "gelu": F.gelu, "gelu_tanh": lambda x: F.gelu(x, "tanh"), "relu": F.relu, "erf": F.erf, "silu": F.silu,
    "exp_tanh": lambda x: F.exp(F.tanh(x)), "log1abs": lambda x: F.log(F.abs(x) + 1.0),
    "sqrt_abs": lambda x: F.sqrt(F.abs(x) + 0.1), "rsqrt_sq": lambda x: F.rsqrt(x * x + 1.0),
    "square": lambda x: x * x, "scale": lambda x: x * 0.5 + 0.25,
}
BINARY = {
    "add": F.add, "sub": F.sub, "mul": F.mul, "maximum": F.maximum, "minimum": F.minimum,
    "div_safe": lambda a, b: a / (F.abs(b) + 1.0), "select": lambda a, b: F.where(a > b, a, b),
}


@dataclass
class Recipe:
    """Entries in creation order: ("input", shape, data) or ("op", name, operand positions,
    params).  Operands refer to earlier entries, so replaying in order is always valid."""
    entries: list[tuple] = field(default_factory=list)
    outputs: list[int] = field(default_factory=list)

    @property
    def inputs(self) -> list[tuple[tuple[int, ...], np.ndarray]]:
        return [(e[1], e[2]) for e in self.entries if e[0] == "input"]

    def describe(self) -> str:
        lines = []
        for k, e in enumerate(self.entries):
            if e[0] == "input":
                lines.append(f"v{k} = input{list(e[1])}")
            else:
                _, op, args, params = e
                lines.append(f"v{k} = {op}({', '.join(f'v{a}' for a in args)}{', ' + repr(params) if params else ''})")
        lines.append(f"return {', '.join(f'v{o}' for o in self.outputs)}")
        return "\n".join(lines)


def _apply(op: str, xs: list, params: dict):
    if op in UNARY:
        return UNARY[op](xs[0])
    if op in BINARY:
        return BINARY[op](xs[0], xs[1])
    if op == "sum":
        return F.sum(xs[0], params["axes"], params["keepdims"])
    if op == "max":
        return F.max(xs[0], params["axes"], params["keepdims"])
    if op == "mean":
        return F.mean(xs[0], params["axes"], params["keepdims"])
    if op == "softmax":
        return F.softmax(xs[0], -1)
    if op == "log_softmax":
        return F.log_softmax(xs[0], -1)
    if op == "layer_norm":
        return F.layer_norm(xs[0])
    if op == "transpose":
        return F.transpose(xs[0], *params["perm"])
    if op == "reshape":
        return F.reshape(xs[0], params["shape"])
    if op == "slice":
        return xs[0][tuple(slice(a, b, c) for a, b, c in params["slices"])]
    if op == "concat":
        return F.concat([xs[0], xs[1]], params["axis"])
    if op == "pad":
        return F.pad(xs[0], params["widths"], params["value"])
    if op == "matmul":
        return F.matmul(xs[0], xs[1])
    if op == "gather":
        return F.gather(xs[0], np.asarray(params["index"], dtype=np.int64), params["axis"])
    raise KeyError(op)


def _shape_after(op, shapes, params) -> tuple[int, ...]:
    """The result shape, computed the cheap way (by applying the op to zeros)."""
    from neural_arch.compiler import no_grad
    from neural_arch.compiler.tensor import Tensor
    with no_grad():
        return _apply(op, [Tensor(np.zeros(s, np.float32)) for s in shapes], params).shape


def random_recipe(s: Sampler, max_steps: int = 10, max_inputs: int = 4) -> Recipe:
    r = Recipe()
    shapes: list[tuple[int, ...]] = []  # shape of every entry

    def add_input(shape) -> int:
        shape = tuple(shape)
        r.entries.append(("input", shape, s.array(shape, "float32", -2.0, 2.0)))
        shapes.append(shape)
        return len(shapes) - 1

    def n_inputs() -> int:
        return sum(1 for e in r.entries if e[0] == "input")

    add_input(s.shape(min_rank=1, max_rank=3, max_dim=5, allow_empty=False))
    kinds = ["unary"] * 4 + ["binary"] * 4 + ["reduce", "norm", "move", "move", "matmul", "gather"]
    for _ in range(s.int(1, max_steps)):
        i = s.int(0, len(shapes) - 1)
        x = shapes[i]
        kind = s.choice(kinds)
        op, args, params = None, [i], {}
        if kind == "binary":
            op = s.choice(sorted(BINARY))
            partners = [j for j, y in enumerate(shapes) if _broadcastable(x, y)]
            if n_inputs() < max_inputs and (not partners or s.int(0, 2) == 0):
                sub = x[s.int(0, len(x)):] if x else x
                args.append(add_input(tuple(1 if s.int(0, 3) == 0 else d for d in sub)))
            else:
                args.append(s.choice(partners))
        elif kind == "reduce" and x:
            op = s.choice(["sum", "max", "mean"])
            axes = tuple(a for a in range(len(x)) if s.bool()) or (len(x) - 1,)
            if op == "max" and any(x[a] == 0 for a in axes):
                op = "sum"
            params = {"axes": axes, "keepdims": s.bool()}
        elif kind == "norm" and x and x[-1] > 0:
            op = s.choice(["softmax", "log_softmax", "layer_norm"])
        elif kind == "move" and x:
            op = s.choice(["transpose", "reshape", "slice", "concat", "pad"])
            if op == "transpose":
                perm = list(range(len(x)))
                for a in range(len(perm) - 1, 0, -1):
                    b = s.int(0, a)
                    perm[a], perm[b] = perm[b], perm[a]
                params = {"perm": tuple(perm)}
            elif op == "reshape":
                params = {"shape": tuple(reversed(x)) if s.bool() else (math.prod(x),)}
            elif op == "slice":
                sl = []
                for d in x:
                    a = s.int(0, d)
                    sl.append((a, s.int(a, d), s.int(1, 2)))
                params = {"slices": tuple(sl)}
            elif op == "concat":
                params = {"axis": s.int(0, len(x) - 1)}
                args.append(i)
            else:
                params = {"widths": tuple((s.int(0, 1), s.int(0, 1)) for _ in x), "value": s.choice([0.0, 1.0])}
        elif kind == "matmul" and x and x[-1] > 0 and n_inputs() < max_inputs:
            op = "matmul"
            args.append(add_input((x[-1], s.int(1, 5))))
        elif kind == "gather" and x and x[0] > 0:
            op = "gather"
            params = {"axis": 0, "index": tuple(s.int(0, x[0] - 1) for _ in range(s.int(1, 4)))}
        if op is None:
            op = s.choice(sorted(UNARY))
        shapes.append(_shape_after(op, [shapes[a] for a in args], params))
        r.entries.append(("op", op, args, params))
    last = len(shapes) - 1
    ops = [k for k, e in enumerate(r.entries) if e[0] == "op"]
    r.outputs = [last] + ([s.choice(ops[:-1])] if s.bool() and len(ops) > 1 else [])
    return r


def _broadcastable(a, b) -> bool:
    try:
        np.broadcast_shapes(a, b)
        return True
    except ValueError:
        return False


def run_recipe(recipe: Recipe, *xs):
    args = iter(xs)
    vals = []
    for e in recipe.entries:
        if e[0] == "input":
            vals.append(next(args))
        else:
            _, op, operands, params = e
            vals.append(_apply(op, [vals[a] for a in operands], params))
    outs = [vals[o] for o in recipe.outputs]
    return outs[0] if len(outs) == 1 else tuple(outs)


def build(recipe: Recipe, name: str = "random") -> tuple[Graph, list[np.ndarray]]:
    def fn(*xs):
        return run_recipe(recipe, *xs)
    fn.__name__ = name
    types = [TensorType(s, "float32") for s, _ in recipe.inputs]
    return trace(fn, *types), [d for _, d in recipe.inputs]
