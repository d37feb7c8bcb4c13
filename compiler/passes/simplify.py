"""Simplification passes: common-subexpression elimination, constant folding and the algebra
that matters in real models.  Each is a pure Graph -> Graph function built on ``rewrite``."""
from __future__ import annotations

import math
from typing import Callable, Union

import numpy as np

from ..ir import FLOAT_DTYPES, Graph, Node, TensorType
from ..ops.registry import PRIMITIVES
from .dce import dead_code_elimination
from .manager import register_pass

# A rule sees a node (inputs already renamed) and the producers seen so far, and returns
#   None            keep the node,
#   str             the node's value is this existing value (an alias),
#   list[Node]      replacement nodes, the last of which defines the node's name.
Rule = Callable[[Node, dict], Union[None, str, list]]


def rewrite(graph: Graph, rule: Rule) -> Graph:
    alias: dict[str, str] = {}
    prod: dict[str, Node] = {}
    nodes: list[Node] = []
    changed = False
    keys = alias.keys()
    for n in graph.nodes:
        if alias and not keys.isdisjoint(n.inputs):
            n = Node(n.name, n.op, tuple([alias.get(i, i) for i in n.inputs]), n.type, n.attrs, n.loc)
            changed = True
        r = rule(n, prod)
        if r is None:
            nodes.append(n)
            prod[n.name] = n
        elif type(r) is str:
            types = graph.types
            src_type = prod[r].type if r in prod else types[r]
            if src_type != n.type:
                raise AssertionError(f"rewrite aliased %{n.name}: {n.type} to %{r}: {src_type}")
            alias[n.name] = r
            changed = True
        else:
            for m in r:
                nodes.append(m)
                prod[m.name] = m
            if r[-1].name != n.name or r[-1].type != n.type:
                raise AssertionError(f"rewrite of %{n.name} must end by defining it with type {n.type}")
            changed = True
    if not changed:
        return graph
    return graph.replace(nodes=tuple(nodes), outputs=tuple(alias.get(o, o) for o in graph.outputs))


def _with(n: Node, **changes) -> Node:
    d = dict(name=n.name, op=n.op, inputs=n.inputs, type=n.type, attrs=n.attr, loc=n.loc)
    d.update(changes)
    return Node.make(d["name"], d["op"], d["inputs"], d["type"], d["attrs"], d["loc"])


def _full_value(n: Node | None):
    if n is not None and n.op == "full":
        return n.attr["value"]
    return None


def _is_full(prod, name, value) -> bool:
    v = _full_value(prod.get(name))
    return v is not None and v == value and not isinstance(v, bool)


# ----------------------------------------------------------------------------- CSE


@register_pass("cse")
def common_subexpression_elimination(graph: Graph) -> Graph:
    """Common-subexpression elimination: one node per (op, inputs, attributes)."""
    seen: dict = {}

    def rule(n, prod):
        # (attributes by their text: NaN equals NaN there, and equal values of different
        # types, 1 and 1.0, stay apart)
        key = (n.op, n.inputs, n.type.shape, n.type.dtype, repr(n.attrs) if n.attrs else "")
        hit = seen.get(key)
        if hit is not None:
            return hit
        seen[key] = n.name
        return None
    return rewrite(graph, rule)


register_pass("dce", "Dead-code elimination: drop nodes no output needs.")(dead_code_elimination)


# ----------------------------------------------------------------------------- folding

FOLD_MAX_ELEMENTS = 64  # larger non-uniform results stay computed (they would bloat the IR)
_SOURCES = ("full", "constant", "iota")


def _scalar_py(value, dtype):
    v = np.asarray(value).reshape(()).item()
    if dtype in FLOAT_DTYPES:
        return float(v)
    if dtype == "bool":
        return bool(v)
    return int(v)


@register_pass("fold_constants")
def fold_constants(graph: Graph) -> Graph:
    """Constant folding: ops on uniform fills give fills; small all-constant results become
    constants."""

    def full_node(n: Node, value) -> list:
        return [Node.make(n.name, "full", (), n.type,
                          {"shape": n.type.shape, "value": _scalar_py(value, n.type.dtype),
                           "dtype": n.type.dtype}, n.loc)]

    def rule(n, prod):
        if not n.inputs or n.op in ("rng_uniform", "check_index"):
            return None
        ins = []
        for i in n.inputs:
            p = prod.get(i)
            if p is None or p.op not in _SOURCES:
                return None
            ins.append(p)
        prim = PRIMITIVES[n.op]
        if all(i.op == "full" for i in ins):
            if prim.kind == "elementwise":
                args = [np.asarray(i.attr["value"], dtype=i.type.dtype) for i in ins]
                with np.errstate(all="ignore"):
                    v = prim.reference(*args, out=TensorType((), n.type.dtype), **n.attr)
                return full_node(n, v)
            if n.op in ("broadcast_to", "reshape", "transpose", "slice") or \
                    (n.op == "pad" and n.attr.get("value") == ins[0].attr["value"]) or n.op == "max":
                return full_node(n, ins[0].attr["value"])
        if n.type.size <= FOLD_MAX_ELEMENTS and all(i.type.size <= 4 * FOLD_MAX_ELEMENTS for i in ins):
            args = [PRIMITIVES[i.op].reference(out=i.type, **i.attr) for i in ins]
            with np.errstate(all="ignore"):
                v = np.asarray(prim.reference(*args, out=n.type, **n.attr), dtype=n.type.dtype)
            return [Node.make(n.name, "constant", (), n.type,
                              {"value": v.reshape(-1), "shape": n.type.shape, "dtype": n.type.dtype}, n.loc)]
        return None
    return rewrite(graph, rule)


# ----------------------------------------------------------------------------- algebra


def _is_pow2(v) -> bool:
    if not isinstance(v, float) or v == 0 or not math.isfinite(v):
        return False
    m, _ = math.frexp(abs(v))
    return m == 0.5


_ALGEBRA_OPS = frozenset(("transpose", "add", "sub", "mul", "div", "neg", "reshape", "broadcast_to", "cast",
                          "where"))  # the ops ``algebraic`` has rules for


def _reassembled(n: Node, prod: dict, graph: Graph):
    """The tensor G when the sum ``n`` of zero pads puts back together consecutive slices of
    G along one axis, each reshaped: the VJP of ``split`` (a sum of pads of the pieces'
    gradients) over pieces cut from one tensor, e.g. GPT-2's dq, dk, dv from the fused
    attention's (B, L, 3, H, D) gradient, which is dqkv (B, L, 3C) reshaped.  Then
    ``n == reshape(G, n.shape)``; None otherwise.  Conditions: every leaf of the add tree
    is a zero pad along one axis a (the last of n), of a slice of G along one axis s (step
    1, whole elsewhere), optionally reshaped; G.shape[:s] == n.shape[:a]; the pieces,
    ordered, cover G's axis s and, scaled by the elements per index of s, n's axis a."""
    leaves, stack = [], [n]
    while stack:  # the add tree's leaves (inner adds may be used elsewhere: they are only read)
        m = stack.pop()
        if m.op == "add":
            for i in m.inputs:
                p = prod.get(i)
                if p is None:
                    return None
                stack.append(p)
        else:
            leaves.append(m)
        if len(leaves) > 64:
            return None
    out = n.type
    a = out.ndim - 1
    if out.ndim == 0 or len(leaves) < 2:
        return None
    pieces, src_axis, whole = [], None, None
    for pad in leaves:
        if pad.op != "pad" or pad.attr.get("value", 0.0) != 0.0 or any(pad.attr["interior"]):
            return None
        lo, hi = pad.attr["lo"], pad.attr["hi"]
        if any(lo[d] or hi[d] for d in range(a)):
            return None
        src = prod.get(pad.inputs[0])
        if src is not None and src.op == "reshape":
            src = prod.get(src.inputs[0])
        if src is None or src.op != "slice" or any(st != 1 for st in src.attr["steps"]):
            return None
        g = src.inputs[0]
        gt = graph_type(prod, graph, g)
        cut = [d for d in range(gt.ndim) if (src.attr["starts"][d], src.attr["stops"][d]) != (0, gt.shape[d])]
        if len(cut) > 1 or (whole is not None and g != whole):
            return None
        s_ax = cut[0] if cut else 0
        if src_axis is not None and s_ax != src_axis:
            return None
        whole, src_axis = g, s_ax
        pieces.append((lo[a], src.attr["starts"][s_ax], src.attr["stops"][s_ax]))
    gt = graph_type(prod, graph, whole)
    if gt.dtype != out.dtype or gt.size != out.size or tuple(gt.shape[:src_axis]) != tuple(out.shape[:a]):
        return None
    inner = math.prod(gt.shape[src_axis + 1:])
    at = 0
    for lo_a, j0, j1 in sorted(pieces):
        if j0 != at or lo_a != j0 * inner:
            return None
        at = j1
    return whole if at == gt.shape[src_axis] else None


@register_pass("algebraic")
def algebraic_simplify(graph: Graph) -> Graph:
    """Algebra: x*1, x+0, x-0, x/1, double neg, neg/sub canonical forms, division by a power
    of two, chains of transpose / reshape / broadcast_to, a transposed product computed
    transposed ((A @ B)^T = B^T @ A^T), no-op casts and selects, and a sum of zero pads that
    reassembles consecutive slices of one tensor (``_reassembled``)."""
    counter = [0]
    uses: dict[str, int] = {}
    for m in graph.nodes:
        for i in m.inputs:
            uses[i] = uses.get(i, 0) + 1
    for o in graph.outputs:
        uses[o] = uses.get(o, 0) + 1

    def fresh(n):
        counter[0] += 1
        return f"{n.name}_a{counter[0]}"

    def swap_last(name, prod):
        t = graph_type(prod, graph, name)
        perm = tuple(range(t.ndim - 2)) + (t.ndim - 1, t.ndim - 2)
        shape = t.shape[:-2] + (t.shape[-1], t.shape[-2])
        return perm, TensorType(shape, t.dtype)

    def rule(n, prod):
        op, ins = n.op, n.inputs
        if op not in _ALGEBRA_OPS:
            return None
        p = [prod.get(i) for i in ins]
        if op == "transpose" and p[0] is not None and p[0].op == "matmul" and uses.get(ins[0]) == 1 and \
                n.attr["perm"] == swap_last(ins[0], prod)[0]:
            # (A @ B)^T = B^T @ A^T: the product is computed transposed; the operands' transposes
            # are strides the GEMM reads through (a weight gradient lands in the weight's layout)
            a, b = p[0].inputs
            (pa, ta), (pb, tb) = swap_last(a, prod), swap_last(b, prod)
            bt = Node.make(fresh(n), "transpose", (b,), tb, {"perm": pb}, n.loc)
            at = Node.make(fresh(n), "transpose", (a,), ta, {"perm": pa}, n.loc)
            return [bt, at, Node.make(n.name, "matmul", (bt.name, at.name), n.type, {}, p[0].loc)]
        if op == "add":
            if _is_full(prod, ins[1], 0):
                return ins[0]
            if _is_full(prod, ins[0], 0):
                return ins[1]
            whole = _reassembled(n, prod, graph)
            if whole is not None:
                return [Node.make(n.name, "reshape", (whole,), n.type, {"shape": n.type.shape}, n.loc)]
            if p[1] is not None and p[1].op == "neg":
                return [_with(n, op="sub", inputs=(ins[0], p[1].inputs[0]))]
            if p[0] is not None and p[0].op == "neg":
                return [_with(n, op="sub", inputs=(ins[1], p[0].inputs[0]))]
        if op == "sub":
            if _is_full(prod, ins[1], 0):
                return ins[0]
            if p[1] is not None and p[1].op == "neg":
                return [_with(n, op="add", inputs=(ins[0], p[1].inputs[0]))]
        if op == "mul":
            for a, b in ((0, 1), (1, 0)):
                if _is_full(prod, ins[b], 1):
                    return ins[a]
                if _is_full(prod, ins[b], -1):
                    return [_with(n, op="neg", inputs=(ins[a],))]
        if op == "div":
            if _is_full(prod, ins[1], 1):
                return ins[0]
            c = _full_value(p[1])
            if _is_pow2(c):
                k = Node.make(fresh(n), "full", (), n.type, {"shape": n.type.shape, "value": 1.0 / c,
                                                             "dtype": n.type.dtype}, n.loc)
                return [k, _with(n, op="mul", inputs=(ins[0], k.name))]
        if op == "neg" and p[0] is not None and p[0].op == "neg":
            return p[0].inputs[0]
        if op == "transpose":
            perm = n.attr["perm"]
            if perm == tuple(range(len(perm))):
                return ins[0]
            if p[0] is not None and p[0].op == "transpose":
                inner = p[0].attr["perm"]
                comp = tuple(inner[i] for i in perm)
                if comp == tuple(range(len(comp))):
                    return p[0].inputs[0]
                return [_with(n, inputs=p[0].inputs, attrs={"perm": comp})]
        if op == "reshape":
            src = p[0].inputs[0] if p[0] is not None and p[0].op == "reshape" else ins[0]
            src_type = prod[src].type if src in prod else graph.types[src]
            if src_type.shape == n.type.shape:
                return src
            if src != ins[0]:
                return [_with(n, inputs=(src,))]
        if op == "broadcast_to":
            if graph_type(prod, graph, ins[0]).shape == n.type.shape:
                return ins[0]
            if p[0] is not None and p[0].op == "broadcast_to":
                return [_with(n, inputs=p[0].inputs)]
        if op == "cast":
            if graph_type(prod, graph, ins[0]).dtype == n.type.dtype:
                return ins[0]
            if p[0] is not None and p[0].op == "cast" and \
                    graph_type(prod, graph, p[0].inputs[0]).dtype == n.type.dtype == "float32" and \
                    p[0].type.dtype == "float64":
                return p[0].inputs[0]  # f32 -> f64 -> f32 is exact
        if op == "where":
            if ins[1] == ins[2]:
                return ins[1]
            c = _full_value(p[0])
            if isinstance(c, bool):
                return ins[1] if c else ins[2]
        return None
    return rewrite(graph, rule)


def graph_type(prod, graph, name) -> TensorType:
    return prod[name].type if name in prod else graph.types[name]


@register_pass("strip_stop_gradient")
def strip_stop_gradient(graph: Graph) -> Graph:
    """stop_gradient is the identity once autodiff is done: alias it away."""
    return rewrite(graph, lambda n, prod: n.inputs[0] if n.op == "stop_gradient" else None)
