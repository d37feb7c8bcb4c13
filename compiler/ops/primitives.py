"""Every primitive, declared once with its shape rule, NumPy reference, VJP rule, fusion
kind and test spec.  VJP rules are written with other primitives (through ``bind``), so
reverse-mode autodiff is a graph transform and eager backward runs the same rules.

Conventions: elementwise binary primitives take operands of one shape and one dtype (the
frontend inserts ``broadcast_to`` and ``cast``); reductions take ``axes`` (a tuple of
non-negative ints) and ``keepdims``; movement primitives take normalised attributes.
"""
from __future__ import annotations

import math

import numpy as np

from ..ir import FLOAT_DTYPES, INT_DTYPES, TensorType, canonical_dtype
from .registry import (NONDIFF, Case, DTypeError, OpIndexError, ShapeError, Spec, primitive)


_frontend_bind = []  # the frontend's bind, once imported (the ops are a layer below the frontend)


def bind(op, *args, **attrs):
    if not _frontend_bind:
        from ..tensor import bind as frontend_bind
        _frontend_bind.append(frontend_bind)
    return _frontend_bind[0](op, *args, **attrs)


# ============================================================================ helpers

def _require_float(op, *types):
    for t in types:
        if t.dtype not in FLOAT_DTYPES:
            raise DTypeError(op, f"expects a floating-point tensor, got {t.dtype}")


def _require_same(op, *types):
    a = types[0]
    for b in types[1:]:
        if a.shape != b.shape:
            raise ShapeError(op, f"operands must have one shape, got {a.shape} and {b.shape}")
        if a.dtype != b.dtype:
            raise DTypeError(op, f"operands must have one dtype, got {a.dtype} and {b.dtype}")


def _check_axes(op, axes, ndim):
    axes = tuple(axes)
    if any(not 0 <= a < ndim for a in axes) or len(set(axes)) != len(axes):
        raise ShapeError(op, f"axes {axes} are invalid for a tensor of rank {ndim}")
    return axes


def zeros_like(t):
    return bind("full", shape=t.shape, value=0.0 if t.dtype in FLOAT_DTYPES else 0, dtype=t.dtype)


def full_like(t, value):
    return bind("full", shape=t.shape, value=value, dtype=t.dtype)


def scalar_like(t, value):
    """A tensor of t's shape and dtype filled with value (a fusable constant)."""
    return full_like(t, float(value) if t.dtype in FLOAT_DTYPES else int(value))


def unbroadcast(g, shape):
    """Sum g down to ``shape`` (the VJP of numpy-style broadcasting)."""
    if g.shape == tuple(shape):
        return g
    lead = g.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, d in enumerate(shape) if d == 1 and g.shape[lead + i] != 1)
    s = bind("sum", g, axes=axes, keepdims=False) if axes else g
    return bind("reshape", s, shape=tuple(shape)) if s.shape != tuple(shape) else s


# ============================================================================ sampler helpers

def _gen_unary(lo=-2.0, hi=2.0, avoid=(), dtype="float32"):
    def gen(s):
        return Case((s.array(s.shape(), dtype, lo, hi, avoid),))
    return gen


def _gen_binary(lo=-2.0, hi=2.0, lo2=None, hi2=None, avoid2=(), dtype="float32", apart=False):
    def gen(s):
        shape = s.shape()
        a = s.array(shape, dtype, lo, hi)
        b = s.array(shape, dtype, lo if lo2 is None else lo2, hi if hi2 is None else hi2, avoid2)
        if apart:  # keep a and b apart so max/min/comparisons have no ties to differentiate
            b = np.where(np.abs(a - b) < 0.05, a + 0.5, b).astype(dtype)
        return Case((a, b))
    return gen


# ============================================================================ elementwise unary

def _unary_shape(op, float_only=True):
    def rule(x):
        if float_only:
            _require_float(op, x)
        elif x.dtype == "bool":
            raise DTypeError(op, "expects a numeric tensor, got bool")
        return x
    return rule


def _unary(name, ref, vjp, lo=-2.0, hi=2.0, avoid=(), float_only=True, rtol=1e-5, atol=1e-6,
           grad=True, doc=""):
    return primitive(name, kind="elementwise", shape=_unary_shape(name, float_only),
                     ref=lambda x, out: ref(x), vjp=vjp,
                     spec=Spec(_gen_unary(lo, hi, avoid), rtol=rtol, atol=atol, grad=grad), doc=doc)


_unary("neg", np.negative, lambda g, out, x: (bind("neg", g),), float_only=False, doc="-x")
_unary("exp", np.exp, lambda g, out, x: (bind("mul", g, out),), lo=-5, hi=5, rtol=2e-6)
_unary("log", np.log, lambda g, out, x: (bind("div", g, x),), lo=0.05, hi=5)
_unary("sqrt", np.sqrt, lambda g, out, x: (bind("div", g, bind("mul", scalar_like(out, 2), out)),),
       lo=0.05, hi=5)


def _rsqrt_ref(x):
    with np.errstate(divide="ignore"):
        return 1.0 / np.sqrt(x)


_unary("rsqrt", _rsqrt_ref,
       lambda g, out, x: (bind("mul", g, bind("mul", scalar_like(out, -0.5),
                                              bind("div", out, x))),), lo=0.05, hi=5)
_unary("tanh", np.tanh,
       lambda g, out, x: (bind("mul", g, bind("sub", scalar_like(out, 1), bind("mul", out, out))),),
       lo=-4, hi=4, atol=2e-6)



def _relu_ref(x):
    return np.where(x <= 0, np.zeros_like(x), x)  # NaN stays NaN


_unary("relu", _relu_ref,
       lambda g, out, x: (bind("where", bind("le", out, scalar_like(out, 0)), zeros_like(g), g),),
       avoid=(0.0,),
       doc="max(x, 0) (NaN stays NaN); the gradient is 0 where the output is <= 0 and passes "
           "elsewhere (at NaN too), as torch's: backward reads the output, never the input")


def _sigmoid_ref(x):
    # 1/(1+e^-|x|) and e^-|x|/(1+e^-|x|): e^-|x| never overflows, the quotient keeps its
    # relative accuracy where the result is tiny
    z = np.exp(-np.abs(x))
    return np.where(x < 0, z, np.ones_like(z)) / (1 + z)


_unary("sigmoid", _sigmoid_ref,
       lambda g, out, x: (bind("mul", g, bind("mul", out, bind("sub", scalar_like(out, 1), out))),),
       lo=-8, hi=8, doc="1 / (1 + e^-x); its gradient s (1 - s) is computed from the output")


def _erf_ref(x):
    # math.erf is exact to double precision; vectorised via frompyfunc (NumPy has no erf)
    # (asarray: frompyfunc returns a bare Python float for a 0-d input)
    return np.asarray(np.frompyfunc(math.erf, 1, 1)(x.astype(np.float64)), dtype=np.float64).astype(x.dtype) \
        if x.size else x.copy()


_unary("erf", _erf_ref,
       lambda g, out, x: (bind("mul", g, bind("mul", scalar_like(x, 2 / math.sqrt(math.pi)),
                                              bind("exp", bind("neg", bind("mul", x, x))))),),
       lo=-3, hi=3)
_unary("sin", np.sin, lambda g, out, x: (bind("mul", g, bind("cos", x)),), lo=-4, hi=4, atol=2e-6)
_unary("cos", np.cos, lambda g, out, x: (bind("neg", bind("mul", g, bind("sin", x))),), lo=-4, hi=4,
       atol=2e-6)
_unary("abs", np.abs, lambda g, out, x: (bind("mul", g, bind("sign", x)),), avoid=(0.0,),
       float_only=False)
_unary("sign", np.sign, lambda g, out, x: (zeros_like(x),), avoid=(0.0,), float_only=False,
       doc="-1, 0 or 1; its gradient is zero everywhere")

primitive("stop_gradient", kind="elementwise", shape=lambda x: x, ref=lambda x, out: x.copy(),
          vjp=lambda g, out, x: (None,), spec=Spec(_gen_unary(), grad=False),
          doc="identity whose gradient is cut (Tensor.detach inside a trace)")


# ============================================================================ elementwise binary

def _binary_shape(op, float_only=False, out_dtype=None):
    def rule(a, b):
        _require_same(op, a, b)
        if float_only:
            _require_float(op, a)
        if out_dtype is None and a.dtype == "bool":
            raise DTypeError(op, "expects numeric tensors, got bool")
        return TensorType(a.shape, out_dtype or a.dtype)
    return rule


def _div_ref(a, b, out):
    if out.dtype in INT_DTYPES:
        raise DTypeError("div", "integer operands; cast to float first (the frontend does)")
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.divide(a, b)


def _pow_ref(a, b, out):
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.power(a, b)


def _pow_vjp(g, out, a, b):
    ga = bind("mul", g, bind("mul", b, bind("pow", a, bind("sub", b, scalar_like(b, 1)))))
    pos = bind("gt", a, scalar_like(a, 0))
    safe_a = bind("where", pos, a, scalar_like(a, 1))
    gb = bind("mul", g, bind("mul", out, bind("where", pos, bind("log", safe_a), scalar_like(a, 0))))
    return ga, gb


def _minmax_vjp(cmp):
    def vjp(g, out, a, b):
        half = scalar_like(g, 0.5)
        zero = scalar_like(g, 0)
        wa = bind("where", bind(cmp, a, b), g,
                  bind("where", bind("eq", a, b), bind("mul", g, half), zero))
        return wa, bind("sub", g, wa)
    return vjp


primitive("add", kind="elementwise", shape=_binary_shape("add"), ref=lambda a, b, out: a + b,
          vjp=lambda g, out, a, b: (g, g), spec=Spec(_gen_binary()))
primitive("sub", kind="elementwise", shape=_binary_shape("sub"), ref=lambda a, b, out: a - b,
          vjp=lambda g, out, a, b: (g, bind("neg", g)), spec=Spec(_gen_binary()))
primitive("mul", kind="elementwise", shape=_binary_shape("mul"), ref=lambda a, b, out: a * b,
          vjp=lambda g, out, a, b: (bind("mul", g, b), bind("mul", g, a)), spec=Spec(_gen_binary()))
primitive("div", kind="elementwise", shape=_binary_shape("div", float_only=True), ref=_div_ref,
          vjp=lambda g, out, a, b: (bind("div", g, b), bind("neg", bind("div", bind("mul", g, out), b))),
          spec=Spec(_gen_binary(lo2=0.3, hi2=3.0), rtol=2e-6))
primitive("pow", kind="elementwise", shape=_binary_shape("pow", float_only=True), ref=_pow_ref,
          vjp=_pow_vjp, spec=Spec(_gen_binary(lo=0.2, hi=3.0, lo2=-2.0, hi2=2.5), rtol=1e-5))
primitive("maximum", kind="elementwise", shape=_binary_shape("maximum"),
          ref=lambda a, b, out: np.maximum(a, b), vjp=_minmax_vjp("gt"),
          spec=Spec(_gen_binary(apart=True)), doc="at ties the gradient is split evenly")
primitive("minimum", kind="elementwise", shape=_binary_shape("minimum"),
          ref=lambda a, b, out: np.minimum(a, b), vjp=_minmax_vjp("lt"),
          spec=Spec(_gen_binary(apart=True)), doc="at ties the gradient is split evenly")

_CMP = {"eq": np.equal, "ne": np.not_equal, "lt": np.less, "le": np.less_equal,
        "gt": np.greater, "ge": np.greater_equal}


def _cmp_shape(op):
    def rule(a, b):
        _require_same(op, a, b)
        return TensorType(a.shape, "bool")
    return rule


def _gen_cmp(s):
    shape = s.shape()
    a = s.array(shape, "float32", -2, 2)
    b = np.where(s.array(shape, "bool"), a, s.array(shape, "float32", -2, 2)).astype(np.float32)
    return Case((a, b))  # about half the pairs are equal, so eq/le/ge are exercised


for _name, _fn in _CMP.items():
    primitive(_name, kind="elementwise", shape=_cmp_shape(_name),
              ref=(lambda fn: lambda a, b, out: fn(a, b))(_fn), vjp=NONDIFF,
              spec=Spec(_gen_cmp, grad=False))


def _where_shape(c, a, b):
    if c.dtype != "bool":
        raise DTypeError("where", f"condition must be bool, got {c.dtype}")
    if c.shape != a.shape:
        raise ShapeError("where", f"condition shape {c.shape} differs from value shape {a.shape}")
    _require_same("where", a, b)
    return a


def _gen_where(s):
    shape = s.shape()
    return Case((s.array(shape, "bool"), s.array(shape), s.array(shape)))


primitive("where", kind="elementwise", shape=_where_shape, ref=lambda c, a, b, out: np.where(c, a, b),
          vjp=lambda g, out, c, a, b: (None, bind("where", c, g, zeros_like(g)),
                                       bind("where", c, zeros_like(g), g)),
          spec=Spec(_gen_where))


def _cast_shape(x, dtype):
    return TensorType(x.shape, canonical_dtype(dtype))


def _cast_ref(x, out, dtype):
    if out.dtype in INT_DTYPES and x.dtype.kind == "f":
        with np.errstate(invalid="ignore"):
            return np.trunc(x).astype(out.dtype)
    return x.astype(out.dtype)


def _cast_vjp(g, out, x, dtype):
    if x.dtype not in FLOAT_DTYPES:
        return (None,)
    if out.dtype not in FLOAT_DTYPES:
        return (zeros_like(x),)
    return (bind("cast", g, dtype=x.dtype),)


def _gen_cast(s):
    # values stay clear of the integers: float -> int truncation jumps there (and -> bool at 0),
    # which finite differences would see as a huge slope
    x = s.array(s.shape(), "float32", -3, 3, avoid=(-3.0, -2.0, -1.0, 0.0, 1.0, 2.0, 3.0))
    return Case((x,), {"dtype": s.choice(["float64", "int32", "int64", "bool", "float32"])})


primitive("cast", kind="elementwise", shape=_cast_shape, ref=_cast_ref, vjp=_cast_vjp,
          spec=Spec(_gen_cast), doc="float to int truncates toward zero; NaN to int is undefined")


# ============================================================================ reductions

def _reduce_shape(op):
    def rule(x, axes, keepdims=False):
        axes = _check_axes(op, axes, x.ndim)
        if x.dtype == "bool":
            raise DTypeError(op, "cannot reduce a bool tensor; cast it first")
        if op == "max" and any(x.shape[a] == 0 for a in axes):
            raise ShapeError(op, f"reduction over an empty axis (shape {x.shape}) has no identity")
        shape = tuple(1 if i in axes else d for i, d in enumerate(x.shape)) if keepdims else \
            tuple(d for i, d in enumerate(x.shape) if i not in axes)
        return TensorType(shape, x.dtype)
    return rule


def _keep_shape(x_shape, axes):
    return tuple(1 if i in axes else d for i, d in enumerate(x_shape))


def _sum_vjp(g, out, x, axes, keepdims=False):
    g = bind("reshape", g, shape=_keep_shape(x.shape, axes))
    return (bind("broadcast_to", g, shape=x.shape),)


def _max_vjp(g, out, x, axes, keepdims=False):
    keep = _keep_shape(x.shape, axes)
    m = bind("broadcast_to", bind("reshape", out, shape=keep), shape=x.shape)
    mask = bind("cast", bind("eq", x, m), dtype=x.dtype)
    count = bind("sum", mask, axes=axes, keepdims=True)
    share = bind("div", bind("reshape", g, shape=keep), count)
    return (bind("mul", mask, bind("broadcast_to", share, shape=x.shape)),)


def _gen_reduce(distinct=False):
    def gen(s):
        shape = s.shape(allow_empty=not distinct)
        ndim = len(shape)
        axes = tuple(a for a in range(ndim) if s.bool())
        x = s.array(shape)
        if distinct and x.size:  # no ties, so the max has a unique, differentiable argmax
            x = np.asarray(np.argsort(np.argsort(x.reshape(-1))).reshape(shape) * 0.1 - 1, dtype=np.float32)
        return Case((x,), {"axes": axes, "keepdims": s.bool()})
    return gen


primitive("sum", kind="reduction", shape=_reduce_shape("sum"),
          ref=lambda x, out, axes, keepdims=False: np.sum(x, axis=tuple(axes), keepdims=keepdims,
                                                          dtype=out.dtype),
          vjp=_sum_vjp, spec=Spec(_gen_reduce(), rtol=1e-5, atol=1e-5))
primitive("max", kind="reduction", shape=_reduce_shape("max"),
          ref=lambda x, out, axes, keepdims=False: np.max(x, axis=tuple(axes), keepdims=keepdims),
          vjp=_max_vjp, spec=Spec(_gen_reduce(distinct=True)),
          doc="gradient split evenly among tied maxima")


# ============================================================================ movement

def _reshape_shape(x, shape):
    shape = tuple(shape)
    if any(d < 0 for d in shape) or math.prod(shape) != x.size:
        raise ShapeError("reshape", f"cannot reshape {x.shape} ({x.size} elements) to {shape}")
    return TensorType(shape, x.dtype)


def _gen_reshape(s):
    shape = s.shape(allow_empty=False)
    new = tuple(reversed(shape)) if s.bool() else (math.prod(shape),)
    return Case((s.array(shape),), {"shape": new})


primitive("reshape", kind="injective", shape=_reshape_shape,
          ref=lambda x, out, shape: x.reshape(shape),
          vjp=lambda g, out, x, shape: (bind("reshape", g, shape=x.shape),), spec=Spec(_gen_reshape))


def _transpose_shape(x, perm):
    perm = tuple(perm)
    if sorted(perm) != list(range(x.ndim)):
        raise ShapeError("transpose", f"perm {perm} is not a permutation of the {x.ndim} axes of {x.shape}")
    return TensorType(tuple(x.shape[p] for p in perm), x.dtype)


def _gen_transpose(s):
    shape = s.shape()
    perm = list(range(len(shape)))
    for i in range(len(perm) - 1, 0, -1):
        j = s.int(0, i)
        perm[i], perm[j] = perm[j], perm[i]
    return Case((s.array(shape),), {"perm": tuple(perm)})


primitive("transpose", kind="injective", shape=_transpose_shape,
          ref=lambda x, out, perm: np.asarray(np.transpose(x, perm), order="C"),
          vjp=lambda g, out, x, perm: (bind("transpose", g, perm=tuple(np.argsort(perm).tolist())),),
          spec=Spec(_gen_transpose))


def _broadcast_shape(x, shape):
    shape = tuple(shape)
    lead = len(shape) - x.ndim
    if lead < 0 or any(d != 1 and d != shape[lead + i] for i, d in enumerate(x.shape)):
        raise ShapeError("broadcast_to", f"cannot broadcast {x.shape} to {shape}")
    return TensorType(shape, x.dtype)


def _gen_broadcast(s):
    shape = s.shape(max_rank=3)
    src = tuple(1 if s.bool() else d for d in shape)
    src = src[s.int(0, len(src)):] if src else src
    return Case((s.array(src),), {"shape": shape})


primitive("broadcast_to", kind="broadcast", shape=_broadcast_shape,
          ref=lambda x, out, shape: np.asarray(np.broadcast_to(x, shape), order="C"),
          vjp=lambda g, out, x, shape: (unbroadcast(g, x.shape),), spec=Spec(_gen_broadcast),
          doc="numpy-style: dims are right-aligned; size-1 dims stretch")


def _slice_shape(x, starts, stops, steps):
    if not (len(starts) == len(stops) == len(steps) == x.ndim):
        raise ShapeError("slice", f"needs one start/stop/step per axis of {x.shape}")
    shape = []
    for d, a, b, c in zip(x.shape, starts, stops, steps):
        if c < 1 or not (0 <= a <= b <= d):
            raise ShapeError("slice", f"invalid slice {a}:{b}:{c} of an axis of size {d}")
        shape.append(len(range(a, b, c)))
    return TensorType(tuple(shape), x.dtype)


def _slice_ref(x, out, starts, stops, steps):
    return x[tuple(slice(a, b, c) for a, b, c in zip(starts, stops, steps))].copy()


def _slice_vjp(g, out, x, starts, stops, steps):
    lo, hi, interior = [], [], []
    for d, a, c, n in zip(x.shape, starts, steps, out.shape):
        lo.append(a)
        last = a + (n - 1) * c + 1 if n else a
        hi.append(d - last)
        interior.append(c - 1 if n > 1 else 0)
    return (bind("pad", g, lo=tuple(lo), hi=tuple(hi), interior=tuple(interior), value=0.0),)


def _gen_slice(s):
    shape = s.shape()
    starts, stops, steps = [], [], []
    for d in shape:
        a = s.int(0, d)
        b = s.int(a, d)
        starts.append(a), stops.append(b), steps.append(s.int(1, 3))
    return Case((s.array(shape),), {"starts": tuple(starts), "stops": tuple(stops), "steps": tuple(steps)})


primitive("slice", kind="injective", shape=_slice_shape, ref=_slice_ref, vjp=_slice_vjp,
          spec=Spec(_gen_slice), doc="start <= stop, step >= 1 (the frontend normalises Python slices)")


def _pad_shape(x, lo, hi, interior, value=0.0):
    if not (len(lo) == len(hi) == len(interior) == x.ndim):
        raise ShapeError("pad", f"needs lo/hi/interior per axis of {x.shape}")
    if any(v < 0 for v in (*lo, *hi, *interior)):
        raise ShapeError("pad", "padding amounts must be non-negative")
    return TensorType(tuple(l + h + d + max(d - 1, 0) * i
                            for d, l, h, i in zip(x.shape, lo, hi, interior)), x.dtype)


def _pad_ref(x, out, lo, hi, interior, value=0.0):
    res = np.full(out.shape, value, dtype=out.dtype)
    idx = tuple(slice(l, l + (d - 1) * (i + 1) + 1 if d else l, i + 1)
                for d, l, i in zip(x.shape, lo, interior))
    res[idx] = x
    return res


def _pad_vjp(g, out, x, lo, hi, interior, value=0.0):
    starts = tuple(lo)
    stops = tuple(l + (d - 1) * (i + 1) + 1 if d else l for d, l, i in zip(x.shape, lo, interior))
    return (bind("slice", g, starts=starts, stops=stops, steps=tuple(i + 1 for i in interior)),)


def _gen_pad(s):
    shape = s.shape()
    n = len(shape)
    return Case((s.array(shape),), {"lo": tuple(s.int(0, 2) for _ in range(n)),
                                    "hi": tuple(s.int(0, 2) for _ in range(n)),
                                    "interior": tuple(s.int(0, 1) for _ in range(n)),
                                    "value": s.choice([0.0, -1.5])})


primitive("pad", kind="injective", shape=_pad_shape, ref=_pad_ref, vjp=_pad_vjp, spec=Spec(_gen_pad),
          doc="constant padding: lo/hi elements at each end and interior elements between")


def _concat_shape(*xs, axis):
    if not xs:
        raise ShapeError("concat", "needs at least one tensor")
    a = xs[0]
    if not 0 <= axis < a.ndim:
        raise ShapeError("concat", f"axis {axis} is out of range for rank {a.ndim}")
    for b in xs[1:]:
        if b.ndim != a.ndim or any(d != e for i, (d, e) in enumerate(zip(a.shape, b.shape)) if i != axis):
            raise ShapeError("concat", f"shapes {a.shape} and {b.shape} differ outside axis {axis}")
        if b.dtype != a.dtype:
            raise DTypeError("concat", f"dtypes {a.dtype} and {b.dtype} differ")
    shape = list(a.shape)
    shape[axis] = sum(x.shape[axis] for x in xs)
    return TensorType(tuple(shape), a.dtype)


def _concat_vjp(g, out, *xs, axis):
    res, off = [], 0
    for x in xs:
        starts = tuple(off if i == axis else 0 for i in range(g.ndim))
        stops = tuple(off + x.shape[axis] if i == axis else d for i, d in enumerate(g.shape))
        res.append(bind("slice", g, starts=starts, stops=stops, steps=(1,) * g.ndim))
        off += x.shape[axis]
    return tuple(res)


def _gen_concat(s):
    shape = s.shape(min_rank=1)
    axis = s.int(0, len(shape) - 1)
    xs = []
    for _ in range(s.int(1, 3)):
        sh = list(shape)
        sh[axis] = s.int(0, 3)
        xs.append(s.array(tuple(sh)))
    return Case(tuple(xs), {"axis": axis})


primitive("concat", kind="injective", shape=_concat_shape,
          ref=lambda *xs, out, axis: np.concatenate(xs, axis=axis), vjp=_concat_vjp,
          spec=Spec(_gen_concat))


# ============================================================================ gather / scatter

def _gather_shape(x, idx, axis):
    if idx.dtype not in INT_DTYPES:
        raise DTypeError("gather", f"indices must be int32 or int64, got {idx.dtype}")
    if not 0 <= axis < x.ndim:
        raise ShapeError("gather", f"axis {axis} is out of range for rank {x.ndim}")
    if x.shape[axis] == 0 and idx.size:
        raise OpIndexError("gather", f"cannot index axis {axis} of size 0")
    return TensorType(x.shape[:axis] + idx.shape + x.shape[axis + 1:], x.dtype)


def check_indices(op, idx, size, axis):
    """Out-of-range indices are an error (caught before any kernel reads memory)."""
    if idx.size:
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= size:
            bad = lo if lo < 0 else hi
            raise OpIndexError(op, f"index {bad} is out of range for axis {axis} of size {size}")


def _gather_ref(x, idx, out, axis):
    check_indices("gather", idx, x.shape[axis], axis)
    return np.take(x, idx, axis=axis)


def _gen_gather(s):
    shape = s.shape(min_rank=1, allow_empty=False)
    axis = s.int(0, len(shape) - 1)
    idx = s.array(s.shape(max_rank=2), "int64", 0, shape[axis])
    return Case((s.array(shape), idx), {"axis": axis})


primitive("gather", kind="injective", shape=_gather_shape, ref=_gather_ref,
          vjp=lambda g, out, x, idx, axis: (bind("scatter_add", idx, g, axis=axis, size=x.shape[axis]), None),
          spec=Spec(_gen_gather), doc="np.take(x, idx, axis); indices must lie in [0, size)")


def _scatter_shape(idx, src, axis, size):
    if idx.dtype not in INT_DTYPES:
        raise DTypeError("scatter_add", f"indices must be int32 or int64, got {idx.dtype}")
    if src.shape[axis:axis + idx.ndim] != idx.shape:
        raise ShapeError("scatter_add", f"source shape {src.shape} does not hold index shape {idx.shape} at axis {axis}")
    return TensorType(src.shape[:axis] + (size,) + src.shape[axis + idx.ndim:], src.dtype)


def _scatter_ref(idx, src, out, axis, size):
    check_indices("scatter_add", idx, size, axis)
    res = np.zeros(out.shape, dtype=out.dtype)
    flat_idx = idx.reshape(-1)
    s = src.reshape(src.shape[:axis] + (flat_idx.size,) + src.shape[axis + idx.ndim:])
    np.add.at(np.moveaxis(res, axis, 0), flat_idx, np.moveaxis(s, axis, 0))
    return res


def _gen_scatter(s):
    size = s.int(1, 5)
    lead = s.shape(max_rank=1, allow_empty=False)
    idx = s.array(s.shape(max_rank=2), "int64", 0, size)
    tail = s.shape(max_rank=1, allow_empty=False)
    return Case((idx, s.array(lead + idx.shape + tail)), {"axis": len(lead), "size": size})


primitive("scatter_add", kind="opaque", shape=_scatter_shape, ref=_scatter_ref,
          vjp=lambda g, out, idx, src, axis, size: (None, bind("gather", g, idx, axis=axis)),
          spec=Spec(_gen_scatter), doc="out[..., idx[j], ...] += src[..., j, ...]; the VJP of gather")


# ============================================================================ matmul

def _matmul_shape(a, b):
    if a.ndim < 2 or b.ndim < 2:
        raise ShapeError("matmul", f"operands need rank >= 2 (the frontend lifts vectors), got {a.shape} and {b.shape}")
    _require_float("matmul", a, b)
    if a.dtype != b.dtype:
        raise DTypeError("matmul", f"dtypes {a.dtype} and {b.dtype} differ")
    if a.shape[-1] != b.shape[-2]:
        raise ShapeError("matmul", f"cannot multiply {a.shape} by {b.shape}: inner dimensions "
                                   f"{a.shape[-1]} and {b.shape[-2]} differ")
    try:
        batch = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    except ValueError:
        raise ShapeError("matmul", f"batch dimensions of {a.shape} and {b.shape} do not broadcast") from None
    return TensorType(tuple(batch) + (a.shape[-2], b.shape[-1]), a.dtype)


def _swap(t):
    perm = tuple(range(t.ndim - 2)) + (t.ndim - 1, t.ndim - 2)
    return bind("transpose", t, perm=perm)


def _matmul_vjp(g, out, a, b):
    return (unbroadcast(bind("matmul", g, _swap(b)), a.shape),
            unbroadcast(bind("matmul", _swap(a), g), b.shape))


def _gen_matmul(s):
    m, k, n = s.int(1, 6), s.int(0, 6), s.int(1, 6)
    batch = s.shape(max_rank=2, allow_empty=False)
    ba = tuple(1 if s.bool() else d for d in batch)
    bb = tuple(1 if s.bool() else d for d in batch)
    ba = ba[s.int(0, len(ba)):]
    return Case((s.array(ba + (m, k)), s.array(bb + (k, n))))


primitive("matmul", kind="matmul", shape=_matmul_shape, ref=lambda a, b, out: np.matmul(a, b),
          vjp=_matmul_vjp, spec=Spec(_gen_matmul, rtol=1e-5, atol=1e-5),
          doc="(..., m, k) @ (..., k, n) with numpy broadcasting of the batch dims")


# ============================================================================ fused attention

def _attention_check(op, q, k, v, bias, scale, causal):
    _require_float(op, q, k, v)
    if q.ndim != 4:
        raise ShapeError(op, f"expects (batch, length, heads, head_dim) tensors, got q of shape {q.shape}")
    if not (q.shape == k.shape == v.shape):
        raise ShapeError(op, f"q, k and v must have one shape (self-attention), got {q.shape}, {k.shape} "
                             f"and {v.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise DTypeError(op, f"q, k and v must have one dtype, got {q.dtype}, {k.dtype} and {v.dtype}")
    if bias is not None and (bias.shape != (q.shape[0], q.shape[1]) or bias.dtype != q.dtype):
        raise ShapeError(op, f"the key bias must be {q.dtype}{[q.shape[0], q.shape[1]]} (batch, keys), got "
                             f"{bias.dtype}{list(bias.shape)}")
    if not isinstance(causal, bool):
        raise ShapeError(op, f"causal must be a bool, got {causal!r}")
    if not (isinstance(scale, float) and math.isfinite(scale)):
        raise ShapeError(op, f"scale must be a finite float, got {scale!r}")


def _attention_shape(q, k, v, *bias, scale, causal):
    if len(bias) > 1:
        raise ShapeError("attention", f"takes q, k, v and at most one key bias, got {3 + len(bias)} inputs")
    _attention_check("attention", q, k, v, bias[0] if bias else None, scale, causal)
    return q


def _attention_probs(q, k, bias, scale, causal):
    """softmax(q k^T * scale + bias) per (batch, head) in float64: (B, H, L, L)."""
    s = np.einsum("blhd,bmhd->bhlm", q.astype(np.float64), k.astype(np.float64)) * scale
    if bias is not None:
        s = s + bias.astype(np.float64)[:, None, None, :]
    if causal:
        L = q.shape[1]
        s = np.where(np.tril(np.ones((L, L), bool)), s, -np.inf)
    if s.size:
        with np.errstate(invalid="ignore"):  # a row of -inf (every key masked) is NaN, as in torch
            s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    p = e / e.sum(-1, keepdims=True)
    if causal:  # a masked key weighs exactly 0, even in a row whose max is NaN (as the kernels)
        p = np.where(np.tril(np.ones((q.shape[1],) * 2, bool)), p, 0.0)
    return p


def _attention_ref(q, k, v, *bias, out, scale, causal):
    p = _attention_probs(q, k, bias[0] if bias else None, scale, causal)
    return np.einsum("bhlm,bmhd->blhd", p, v.astype(np.float64)).astype(out.dtype)


def _bias_grad(q, k, v, bias, out, g, scale, causal):
    """d loss / d bias[b, j] = sum over heads and queries of P (dP - rowsum(dO * O)), written
    with primitives: only built into a graph that differentiates the bias (dead code, and
    removed, otherwise)."""
    B, L, H, D = q.shape
    heads = (0, 2, 1, 3)
    qh, kh, vh, gh = (bind("transpose", t, perm=heads) for t in (q, k, v, g))
    s = bind("matmul", qh, bind("transpose", kh, perm=(0, 1, 3, 2)))
    s = bind("mul", s, scalar_like(s, scale))
    s = bind("add", s, bind("broadcast_to", bind("reshape", bias, shape=(B, 1, 1, L)), shape=(B, H, L, L)))
    if causal:
        allowed = bind("ge", bind("iota", shape=(B, H, L, L), axis=2), bind("iota", shape=(B, H, L, L), axis=3))
        s = bind("where", allowed, s, full_like(s, -math.inf))
    m = bind("stop_gradient", bind("max", s, axes=(3,), keepdims=True))
    e = bind("exp", bind("sub", s, bind("broadcast_to", m, shape=(B, H, L, L))))
    z = bind("sum", e, axes=(3,), keepdims=True)
    p = bind("div", e, bind("broadcast_to", z, shape=(B, H, L, L)))
    dp = bind("matmul", gh, bind("transpose", vh, perm=(0, 1, 3, 2)))
    rows = bind("sum", bind("mul", gh, bind("transpose", out, perm=heads)), axes=(3,), keepdims=True)
    ds = bind("mul", p, bind("sub", dp, bind("broadcast_to", rows, shape=(B, H, L, L))))
    return bind("sum", ds, axes=(1, 2), keepdims=False)


def _attention_vjp(g, out, q, k, v, *bias, scale, causal):
    grads = bind("attention_grad", q, k, v, out, g, *bias, scale=scale, causal=causal)
    B, L, H, D = q.shape

    def part(i):
        return bind("reshape", bind("slice", grads, starts=(0, 0, i, 0, 0), stops=(B, L, i + 1, H, D),
                                    steps=(1,) * 5), shape=(B, L, H, D))
    if bias:
        return part(0), part(1), part(2), _bias_grad(q, k, v, bias[0], out, g, scale, causal)
    return part(0), part(1), part(2)


def _gen_attention(s):
    shape = (s.int(1, 2), s.int(1, 6), s.int(1, 3), s.int(1, 5))
    ins = tuple(s.array(shape, lo=-1.5, hi=1.5) for _ in range(3))
    if s.bool():
        ins += (s.array(shape[:2], lo=-2.0, hi=1.0),)
    return Case(ins, {"scale": s.choice([0.5, 1.0, -0.75]), "causal": s.bool()})


primitive("attention", kind="opaque", shape=_attention_shape, ref=_attention_ref, vjp=_attention_vjp,
          spec=Spec(_gen_attention, rtol=1e-5, atol=1e-5),
          doc="softmax(q k^T * scale [+ bias[batch, key]] [causal: key j <= query i]) v per (batch, "
              "head), over (batch, length, heads, head_dim) tensors; one kernel, no (length x length) "
              "tensor in memory (the backward recomputes the probabilities)")


def _attention_grad_shape(q, k, v, o, g, *bias, scale, causal):
    if len(bias) > 1:
        raise ShapeError("attention_grad", f"takes q, k, v, o, g and at most one key bias, got {5 + len(bias)} inputs")
    _attention_check("attention_grad", q, k, v, bias[0] if bias else None, scale, causal)
    if o.shape != q.shape or g.shape != q.shape or o.dtype != q.dtype or g.dtype != q.dtype:
        raise ShapeError("attention_grad", f"the output and its gradient must be {q.dtype}{list(q.shape)}, got "
                                           f"{o.dtype}{list(o.shape)} and {g.dtype}{list(g.shape)}")
    B, L, H, D = q.shape
    return TensorType((B, L, 3, H, D), q.dtype)


def _attention_grad_ref(q, k, v, o, g, *bias, out, scale, causal):
    p = _attention_probs(q, k, bias[0] if bias else None, scale, causal)
    g64 = g.astype(np.float64)
    dv = np.einsum("bhlm,blhd->bmhd", p, g64)
    dp = np.einsum("blhd,bmhd->bhlm", g64, v.astype(np.float64))
    rows = np.einsum("blhd,blhd->bhl", g64, o.astype(np.float64))[..., None]
    ds = p * (dp - rows) * scale
    dq = np.einsum("bhlm,bmhd->blhd", ds, k.astype(np.float64))
    dk = np.einsum("bhlm,blhd->bmhd", ds, q.astype(np.float64))
    return np.stack([dq, dk, dv], axis=2).astype(out.dtype)


def _attention_grad_vjp(g, out, *inputs, scale, causal):
    raise ShapeError("attention_grad", "second derivatives through the fused attention are not supported; "
                                       "differentiate F.scaled_dot_product_attention with a mask (the "
                                       "composite) for those")


def _gen_attention_grad(s):
    case = _gen_attention(s)
    q, k, v, *bias = case.inputs
    o = _attention_ref(q, k, v, *bias, out=TensorType(q.shape, "float32"), **case.attrs)
    return Case((q, k, v, o, s.array(q.shape, lo=-1.0, hi=1.0), *bias), case.attrs)


primitive("attention_grad", kind="opaque", shape=_attention_grad_shape, ref=_attention_grad_ref,
          vjp=_attention_grad_vjp, spec=Spec(_gen_attention_grad, rtol=1e-4, atol=1e-5, grad=False),
          doc="(dq, dk, dv) of attention stacked on axis 2: (batch, length, 3, heads, head_dim); o is "
              "attention's output and g its gradient (rowsum(g * o) is the softmax's correction)")


# ============================================================================ sources

def _full_shape(shape, value, dtype="float32"):
    return TensorType(tuple(shape), dtype)


def _gen_full(s):
    return Case((), {"shape": s.shape(), "value": s.choice([0.0, 1.5, -2.0]), "dtype": "float32"})


primitive("full", kind="source", shape=_full_shape,
          ref=lambda out, shape, value, dtype="float32": np.full(out.shape, value, dtype=out.dtype),
          vjp=NONDIFF, spec=Spec(_gen_full, grad=False))


def _iota_shape(shape, axis, dtype="int64"):
    if not 0 <= axis < len(shape):
        raise ShapeError("iota", f"axis {axis} is out of range for shape {tuple(shape)}")
    return TensorType(tuple(shape), dtype)


def _iota_ref(out, shape, axis, dtype="int64"):
    r = np.arange(shape[axis], dtype=out.dtype).reshape([-1 if i == axis else 1 for i in range(len(shape))])
    return np.broadcast_to(r, out.shape).copy()


def _gen_iota(s):
    shape = s.shape(min_rank=1)
    return Case((), {"shape": shape, "axis": s.int(0, len(shape) - 1), "dtype": s.choice(["int64", "float32"])})


primitive("iota", kind="source", shape=_iota_shape, ref=_iota_ref, vjp=NONDIFF,
          spec=Spec(_gen_iota, grad=False), doc="0, 1, 2, ... along `axis`, broadcast over the others")


def _constant_shape(value, shape, dtype="float32"):
    if len(value) != math.prod(shape):
        raise ShapeError("constant", f"{len(value)} values do not fill shape {tuple(shape)}")
    return TensorType(tuple(shape), dtype)


def _gen_constant(s):
    shape = s.shape(max_rank=2)
    return Case((), {"value": tuple(s.array(shape).reshape(-1).tolist()), "shape": shape, "dtype": "float32"})


primitive("constant", kind="source", shape=_constant_shape,
          ref=lambda out, value, shape, dtype="float32": np.array(value, dtype=out.dtype).reshape(out.shape),
          vjp=NONDIFF, spec=Spec(_gen_constant, grad=False), doc="a literal array, values in row-major order")


# ---------------------------------------------------------------------------- counter-based random

_M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
MIX1 = 0xBF58476D1CE4E5B9
MIX2 = 0x94D049BB133111EB
STREAM = 0xD1B54A32D192ED03


def random_bits(seed: int, stream: int, n: int) -> np.ndarray:
    """splitmix64 of (seed, stream, counter): 64 random bits per element, the same on every
    backend (codegen implements the identical integer arithmetic)."""
    with np.errstate(over="ignore"):
        base = np.uint64((seed * GOLDEN + stream * STREAM) & _M64)
        z = np.arange(n, dtype=np.uint64) + base + np.uint64(GOLDEN)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
        return z ^ (z >> np.uint64(31))


def _rng_shape(seed, shape, stream=0, dtype="float32"):
    if seed.shape != () or seed.dtype not in INT_DTYPES:
        raise DTypeError("rng_uniform", f"seed must be a 0-d integer tensor, got {seed}")
    if dtype not in FLOAT_DTYPES:
        raise DTypeError("rng_uniform", f"dtype must be floating-point, got {dtype}")
    return TensorType(tuple(shape), dtype)


def _rng_ref(seed, out, shape, stream=0, dtype="float32"):
    bits = random_bits(int(seed), stream, math.prod(shape))
    u = (bits >> np.uint64(40)).astype(np.float64) * (1.0 / (1 << 24))
    return u.astype(out.dtype).reshape(out.shape)


def _gen_rng(s):
    return Case((np.array(s.int(0, 1000), dtype=np.int64),), {"shape": s.shape(), "stream": s.int(0, 3)})


primitive("rng_uniform", kind="source", shape=_rng_shape, ref=_rng_ref, vjp=NONDIFF,
          spec=Spec(_gen_rng, grad=False),
          doc="uniform [0, 1) in steps of 2^-24 from splitmix64(seed, stream, element index)")


# ============================================================================ checks

def _check_index_shape(idx, size, ignore=None):
    if idx.dtype not in INT_DTYPES:
        raise DTypeError("check_index", f"indices must be int32 or int64, got {idx.dtype}")
    return idx


def _check_index_ref(idx, out, size, ignore=None):
    bad = (idx < 0) | (idx >= size)
    if ignore is not None:
        bad &= idx != ignore
    if bad.any():
        v = int(idx[bad].reshape(-1)[0])
        allowed = f"[0, {size})" + (f" or {ignore}" if ignore is not None else "")
        raise OpIndexError("check_index", f"index {v} is out of range: allowed {allowed}")
    return idx.copy()


def _gen_check_index(s):
    size = s.int(1, 6)
    return Case((s.array(s.shape(), "int64", 0, size),), {"size": size, "ignore": s.choice([None, -100])})


primitive("check_index", kind="opaque", shape=_check_index_shape, ref=_check_index_ref, vjp=NONDIFF,
          spec=Spec(_gen_check_index, grad=False),
          doc="identity on integer indices that fails unless each lies in [0, size) or equals `ignore`; "
              "used where indices select by comparison (one-hot) rather than by gather")
