"""The functional namespace (``from neural_arch.compiler import functional as F``).

User-level ops: dtype promotion, numpy-style broadcasting and negative axes are handled
here, then everything is expressed with primitives (``bind``).  Composites (softmax,
layer_norm, gelu, cross_entropy, attention, ...) are decompositions into primitives;
fusion makes them single kernels again.
"""
from __future__ import annotations

import builtins as _builtins
import math
import numbers
from typing import Sequence

import numpy as np

from .ir import FLOAT_DTYPES, INT_DTYPES, canonical_dtype
from .ops.registry import OpError, OpIndexError, ShapeError
from .tensor import Tensor, bind, current_tracer, user_loc

_RANK = {"bool": 0, "int32": 1, "int64": 2, "float32": 3, "float64": 4}

# ============================================================================ plumbing


def _err(cls, op, msg):
    return cls(op, msg).with_loc(user_loc(3))


def _is_scalar(x) -> bool:
    t = type(x)
    if t is Tensor:
        return False
    if t is float or t is int or t is bool:
        return True
    return isinstance(x, (numbers.Number, np.bool_)) and not isinstance(x, np.ndarray)


_CATEGORY = {"bool": 0, "int32": 1, "int64": 1, "float32": 2, "float64": 2}


def _result_dtype(xs) -> str:
    """Tensors and arrays decide the dtype (the widest wins); Python scalars are weak: they
    only lift the category (int tensor * 0.5 -> float32, bool tensor + 1 -> int64)."""
    strong = [x.dtype if isinstance(x, Tensor) else canonical_dtype(np.asarray(x).dtype)
              for x in xs if not _is_scalar(x)]
    dt = _builtins.max(strong, key=_RANK.__getitem__) if strong else None
    for w in xs:
        if not _is_scalar(w):
            continue
        if isinstance(w, (bool, np.bool_)):
            kind = "bool"
        elif isinstance(w, numbers.Integral):
            kind = "int64"
        else:
            kind = "float32"
        if dt is None or _CATEGORY[kind] > _CATEGORY[dt]:
            dt = kind
    return dt


def _as_tensor(x, dtype=None) -> Tensor:
    if isinstance(x, Tensor):
        return x if dtype is None or x.dtype == dtype else cast(x, dtype)
    if _is_scalar(x):
        return full((), x, dtype=dtype or _result_dtype([x]))
    return Tensor(np.asarray(x), dtype=dtype)


def _broadcast_shapes(op, *shapes):
    if shapes and type(shapes[0]) is tuple and all(sh == shapes[0] for sh in shapes[1:]):
        return shapes[0]  # nothing to broadcast
    try:
        return tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        raise _err(ShapeError, op, "cannot broadcast shapes " + " and ".join(map(str, shapes))) from None


def _prepare(op, *xs, dtype=None):
    """Promote to one dtype and broadcast to one shape; scalars become fills of that shape."""
    dt = dtype or _result_dtype(xs)
    shapes = [x.shape if isinstance(x, Tensor) else np.shape(x) for x in xs if not _is_scalar(x)]
    shape = _broadcast_shapes(op, *shapes) if shapes else ()
    out = []
    for x in xs:
        if _is_scalar(x):
            out.append(full(shape, x, dtype=dt))
            continue
        t = _as_tensor(x)
        if t.dtype != dt:
            t = cast(t, dt)
        if t.shape != shape:
            t = bind("broadcast_to", t, shape=shape)
        out.append(t)
    return out


def _axes(op, axis, ndim) -> tuple[int, ...]:
    if axis is None:
        return tuple(range(ndim))
    if isinstance(axis, (int, np.integer)):
        axis = (axis,)
    res = []
    for a in axis:
        if not -ndim <= a < _builtins.max(ndim, 1) or (ndim == 0 and a not in (0, -1)):
            raise _err(ShapeError, op, f"axis {a} is out of range for a tensor of rank {ndim}")
        res.append(a % ndim if ndim else 0)
    return tuple(sorted(set(res))) if ndim else ()


def _axis(op, axis, ndim) -> int:
    if not -ndim <= axis < ndim:
        raise _err(ShapeError, op, f"axis {axis} is out of range for a tensor of rank {ndim}")
    return axis % ndim


def _float(x) -> Tensor:
    t = _as_tensor(x)
    return t if t.dtype in FLOAT_DTYPES else cast(t, "float32")


# ============================================================================ creation


def tensor(data, dtype=None, requires_grad=False) -> Tensor:
    """A new eager tensor (copies data).  Python floats give float32, ints int64."""
    if isinstance(data, Tensor):
        data = data.data
    if not isinstance(data, (list, tuple, int, float, complex)) or isinstance(data, np.generic):
        # arrays and NumPy scalars keep their dtype
        data = np.array(data, copy=True)
    # Python data goes through Tensor's conversion (floats -> float32, ints -> int64),
    # which builds a fresh array of its own
    return Tensor(data, dtype=dtype, requires_grad=requires_grad)


def _shape_arg(shape) -> tuple[int, ...]:
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        shape = shape[0]
    return tuple(int(d) for d in shape)


def full(shape, value, dtype=None, requires_grad=False) -> Tensor:
    dtype = canonical_dtype(dtype) if dtype is not None else _result_dtype([value])
    value = float(value) if dtype in FLOAT_DTYPES else (bool(value) if dtype == "bool" else int(value))
    t = bind("full", shape=tuple(int(d) for d in shape), value=value, dtype=dtype)
    if requires_grad:
        t.requires_grad = True
    return t


def zeros(*shape, dtype="float32", requires_grad=False) -> Tensor:
    return full(_shape_arg(shape), 0, dtype=dtype, requires_grad=requires_grad)


def ones(*shape, dtype="float32", requires_grad=False) -> Tensor:
    return full(_shape_arg(shape), 1, dtype=dtype, requires_grad=requires_grad)


def zeros_like(x, dtype=None) -> Tensor:
    return full(x.shape, 0, dtype=dtype or x.dtype)


def ones_like(x, dtype=None) -> Tensor:
    return full(x.shape, 1, dtype=dtype or x.dtype)


def full_like(x, value, dtype=None) -> Tensor:
    return full(x.shape, value, dtype=dtype or x.dtype)


def arange(start, stop=None, step=1, dtype=None) -> Tensor:
    if stop is None:
        start, stop = 0, start
    dtype = canonical_dtype(dtype) if dtype else _result_dtype([start, stop, step])
    n = _builtins.max(0, math.ceil((stop - start) / step))
    r = bind("iota", shape=(n,), axis=0, dtype=dtype)
    if step != 1:
        r = mul(r, step)
    if start != 0:
        r = add(r, start)
    return r


def randn(*shape, dtype="float32", requires_grad=False, generator=None) -> Tensor:
    """Standard normal samples drawn eagerly with NumPy (a constant inside a trace; use
    F.normal with a seed for random numbers that are part of the compiled program)."""
    rng = generator if generator is not None else np.random.default_rng()
    return Tensor(rng.standard_normal(_shape_arg(shape)), dtype=dtype, requires_grad=requires_grad)


def rand(*shape, dtype="float32", requires_grad=False, generator=None) -> Tensor:
    rng = generator if generator is not None else np.random.default_rng()
    return Tensor(rng.random(_shape_arg(shape)), dtype=dtype, requires_grad=requires_grad)


def iota(shape, axis=0, dtype="int64") -> Tensor:
    return bind("iota", shape=tuple(shape), axis=axis, dtype=canonical_dtype(dtype))


# ============================================================================ elementwise


def _binary(op):
    def f(a, b):
        a2, b2 = _prepare(op, a, b)
        return bind(op, a2, b2)
    f.__name__ = op
    f.__doc__ = f"Elementwise {op} with dtype promotion and numpy broadcasting."
    return f


add = _binary("add")
sub = _binary("sub")
mul = _binary("mul")
maximum = _binary("maximum")
minimum = _binary("minimum")
eq = _binary("eq")
ne = _binary("ne")
lt = _binary("lt")
le = _binary("le")
gt = _binary("gt")
ge = _binary("ge")


def div(a, b):
    """True division; integer operands are promoted to float32 (as in torch)."""
    dt = _result_dtype([a, b])
    a2, b2 = _prepare("div", a, b, dtype=dt if dt in FLOAT_DTYPES else "float32")
    return bind("div", a2, b2)


def pow(a, b):  # noqa: A001 - mirrors the operator
    if _is_scalar(b) and float(b) == 2.0:
        a = _as_tensor(a)
        return mul(a, a)
    dt = _result_dtype([a, b])
    a2, b2 = _prepare("pow", a, b, dtype=dt if dt in FLOAT_DTYPES else "float32")
    return bind("pow", a2, b2)


def where(cond, a, b):
    c = _as_tensor(cond)
    if c.dtype != "bool":
        c = ne(c, 0)
    dt = _result_dtype([a, b])
    shape = _broadcast_shapes("where", c.shape, *[np.shape(x) if not isinstance(x, Tensor) else x.shape
                                                 for x in (a, b)])
    c2 = c if c.shape == shape else bind("broadcast_to", c, shape=shape)
    a2, b2 = _prepare("where", a, b, dtype=dt)
    a2 = a2 if a2.shape == shape else bind("broadcast_to", a2, shape=shape)
    b2 = b2 if b2.shape == shape else bind("broadcast_to", b2, shape=shape)
    return bind("where", c2, a2, b2)


def cast(x, dtype) -> Tensor:
    x = _as_tensor(x)
    dtype = canonical_dtype(dtype)
    return x if x.dtype == dtype else bind("cast", x, dtype=dtype)


def _unary_float(op):
    def f(x):
        return bind(op, _float(x))
    f.__name__ = op
    f.__doc__ = f"Elementwise {op} (integer inputs are promoted to float32)."
    return f


exp = _unary_float("exp")
log = _unary_float("log")
sqrt = _unary_float("sqrt")
rsqrt = _unary_float("rsqrt")
tanh = _unary_float("tanh")
erf = _unary_float("erf")
sin = _unary_float("sin")
cos = _unary_float("cos")


def neg(x):
    return bind("neg", _as_tensor(x))


def abs(x):  # noqa: A001
    return bind("abs", _as_tensor(x))


def sign(x):
    return bind("sign", _as_tensor(x))


def stop_gradient(x):
    x = _as_tensor(x)
    if current_tracer() is None:
        return x.detach()
    return bind("stop_gradient", x)


def logical_not(x):
    return eq(_as_tensor(x), False)


def logical_and(a, b):
    return where(a, b, False)


def logical_or(a, b):
    return where(a, True, b)


def isfinite(x):
    x = _as_tensor(x)
    return lt(abs(x), math.inf)


def clamp(x, min=None, max=None):  # noqa: A002
    if min is not None:
        x = maximum(x, min)
    if max is not None:
        x = minimum(x, max)
    return x


# ============================================================================ reductions


def sum(x, axis=None, keepdims=False):  # noqa: A001
    x = _as_tensor(x)
    if x.dtype == "bool":
        x = cast(x, "int64")
    return bind("sum", x, axes=_axes("sum", axis, x.ndim), keepdims=bool(keepdims))


def max(x, axis=None, keepdims=False):  # noqa: A001
    x = _as_tensor(x)
    return bind("max", x, axes=_axes("max", axis, x.ndim), keepdims=bool(keepdims))


def min(x, axis=None, keepdims=False):  # noqa: A001
    return neg(max(neg(x), axis, keepdims))


def _count(x, axes):
    return math.prod(x.shape[a] for a in axes)


def mean(x, axis=None, keepdims=False):
    x = _float(x)
    axes = _axes("mean", axis, x.ndim)
    return div(sum(x, axes, keepdims), float(_count(x, axes)))


def var(x, axis=None, keepdims=False, correction=0):
    """Variance; ``correction=1`` gives the unbiased estimate."""
    x = _float(x)
    axes = _axes("var", axis, x.ndim)
    d = sub(x, mean(x, axes, keepdims=True))
    return div(sum(mul(d, d), axes, keepdims), float(_count(x, axes) - correction))


def std(x, axis=None, keepdims=False, correction=0):
    return sqrt(var(x, axis, keepdims, correction))


def argmax(x, axis=-1, keepdims=False):
    """Index of the first maximum along ``axis`` (int64; not differentiable)."""
    x = stop_gradient(_as_tensor(x))
    ax = _axis("argmax", axis, x.ndim)
    n = x.shape[ax]
    hit = eq(x, max(x, ax, keepdims=True))
    pos = bind("iota", shape=x.shape, axis=ax, dtype="int64")
    return neg(max(where(hit, neg(pos), -n), ax, keepdims))


def _max_shift(x, axes):
    """The (gradient-free) max over ``axes`` that makes exp stable.  Over an empty axis there
    is no max; the shift is then 0 (the sum of exps is 0: softmax is empty, logsumexp -inf)."""
    if any(x.shape[a] == 0 for a in axes):
        return zeros(tuple(1 if i in axes else d for i, d in enumerate(x.shape)), dtype=x.dtype)
    return stop_gradient(max(x, axes, keepdims=True))


def logsumexp(x, axis=-1, keepdims=False):
    x = _float(x)
    axes = _axes("logsumexp", axis, x.ndim)
    m = _max_shift(x, axes)
    m = where(isfinite(m), m, 0.0)
    s = log(sum(exp(sub(x, m)), axes, keepdims=True))
    r = add(s, m)
    return r if keepdims else reshape(r, tuple(d for i, d in enumerate(x.shape) if i not in axes))


def softmax(x, axis=-1):
    x = _float(x)
    ax = _axis("softmax", axis, x.ndim)
    m = _max_shift(x, (ax,))
    e = exp(sub(x, m))
    return div(e, sum(e, ax, keepdims=True))


def log_softmax(x, axis=-1):
    x = _float(x)
    ax = _axis("log_softmax", axis, x.ndim)
    m = _max_shift(x, (ax,))
    shifted = sub(x, m)
    return sub(shifted, log(sum(exp(shifted), ax, keepdims=True)))


# ============================================================================ shapes


def reshape(x, *shape):
    x = _as_tensor(x)
    shape = list(_shape_arg(shape))
    if shape.count(-1) > 1:
        raise _err(ShapeError, "reshape", f"only one dimension can be -1, got {tuple(shape)}")
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        if known == 0 or x.size % known:
            raise _err(ShapeError, "reshape", f"cannot reshape {x.shape} to {tuple(shape)}")
        shape[shape.index(-1)] = x.size // known
    shape = tuple(shape)
    return x if shape == x.shape else bind("reshape", x, shape=shape)


def transpose(x, *axes):
    """Permute axes (numpy semantics); no axes reverses them."""
    x = _as_tensor(x)
    perm = _shape_arg(axes) if axes else tuple(reversed(range(x.ndim)))
    if len(perm) != x.ndim:
        raise _err(ShapeError, "transpose", f"perm {perm} does not match rank {x.ndim} of {x.shape}")
    perm = tuple(p % x.ndim if x.ndim else p for p in perm)
    return x if perm == tuple(range(x.ndim)) else bind("transpose", x, perm=perm)


permute = transpose


def swapaxes(x, a, b):
    x = _as_tensor(x)
    a, b = _axis("swapaxes", a, x.ndim), _axis("swapaxes", b, x.ndim)
    perm = list(range(x.ndim))
    perm[a], perm[b] = perm[b], perm[a]
    return transpose(x, *perm)


def broadcast_to(x, shape):
    x = _as_tensor(x)
    shape = tuple(shape)
    return x if x.shape == shape else bind("broadcast_to", x, shape=shape)


def expand_dims(x, axis):
    x = _as_tensor(x)
    ax = axis % (x.ndim + 1)
    return reshape(x, x.shape[:ax] + (1,) + x.shape[ax:])


unsqueeze = expand_dims


def squeeze(x, axis=None):
    x = _as_tensor(x)
    axes = tuple(i for i, d in enumerate(x.shape) if d == 1) if axis is None else _axes("squeeze", axis, x.ndim)
    for a in axes:
        if x.shape[a] != 1:
            raise _err(ShapeError, "squeeze", f"axis {a} of {x.shape} has size {x.shape[a]}, not 1")
    return reshape(x, tuple(d for i, d in enumerate(x.shape) if i not in axes))


def flatten(x, start_axis=0, end_axis=-1):
    x = _as_tensor(x)
    if x.ndim == 0:
        return reshape(x, (1,))
    s, e = _axis("flatten", start_axis, x.ndim), _axis("flatten", end_axis, x.ndim)
    return reshape(x, x.shape[:s] + (math.prod(x.shape[s:e + 1]),) + x.shape[e + 1:])


def concat(xs: Sequence, axis=0):
    xs = [_as_tensor(x) for x in xs]
    if not xs:
        raise _err(ShapeError, "concat", "needs at least one tensor")
    dt = _result_dtype(xs)
    xs = [cast(x, dt) for x in xs]
    return bind("concat", *xs, axis=_axis("concat", axis, xs[0].ndim))


cat = concat


def stack(xs: Sequence, axis=0):
    xs = [_as_tensor(x) for x in xs]
    if not xs:
        raise _err(ShapeError, "stack", "needs at least one tensor")
    ax = axis % (xs[0].ndim + 1)
    for x in xs[1:]:
        if x.shape != xs[0].shape:
            raise _err(ShapeError, "stack", f"all tensors need one shape, got {xs[0].shape} and {x.shape}")
    return concat([expand_dims(x, ax) for x in xs], ax)


def split(x, sizes, axis=0):
    """Split into pieces of the given sizes (a list), or into ``sizes`` equal pieces (an int)."""
    x = _as_tensor(x)
    ax = _axis("split", axis, x.ndim)
    n = x.shape[ax]
    if isinstance(sizes, int):
        if sizes <= 0 or n % sizes:
            raise _err(ShapeError, "split", f"axis {ax} of size {n} does not split into {sizes} equal parts")
        sizes = [n // sizes] * sizes
    if builtins_sum(sizes) != n:
        raise _err(ShapeError, "split", f"sizes {list(sizes)} do not add up to {n} (axis {ax} of {x.shape})")
    out, off = [], 0
    for s in sizes:
        out.append(slice_axis(x, ax, off, off + s))
        off += s
    return out


def slice_axis(x, axis, start, stop, step=1):
    x = _as_tensor(x)
    starts = [0] * x.ndim
    stops = list(x.shape)
    steps = [1] * x.ndim
    starts[axis], stops[axis], steps[axis] = start, stop, step
    if starts == [0] * x.ndim and stops == list(x.shape) and step == 1:
        return x
    return bind("slice", x, starts=tuple(starts), stops=tuple(stops), steps=tuple(steps))


def pad(x, pad_width, value=0.0):
    """``pad_width`` is a (lo, hi) pair per axis, as in numpy.pad."""
    x = _as_tensor(x)
    if len(pad_width) != x.ndim:
        raise _err(ShapeError, "pad", f"needs a (lo, hi) pair per axis of {x.shape}, got {pad_width}")
    return bind("pad", x, lo=tuple(int(p[0]) for p in pad_width), hi=tuple(int(p[1]) for p in pad_width),
                interior=(0,) * x.ndim, value=float(value) if x.dtype in FLOAT_DTYPES else int(value))


def gather(x, indices, axis=0):
    """``np.take(x, indices, axis)``; every index must lie in [0, x.shape[axis])."""
    x = _as_tensor(x)
    idx = _as_tensor(indices)
    if idx.dtype not in INT_DTYPES:
        raise _err(OpError, "gather", f"indices must be integers, got {idx.dtype}")
    return bind("gather", x, idx, axis=_axis("gather", axis, x.ndim))


take = gather


def scatter_add(indices, src, axis, size):
    return bind("scatter_add", _as_tensor(indices), _as_tensor(src), axis=axis, size=size)


def tril(x, k=0):
    x = _as_tensor(x)
    r = bind("iota", shape=x.shape[-2:], axis=0, dtype="int64")
    c = bind("iota", shape=x.shape[-2:], axis=1, dtype="int64")
    return where(ge(add(r, k), c), x, zeros((), dtype=x.dtype))


def triu(x, k=0):
    x = _as_tensor(x)
    r = bind("iota", shape=x.shape[-2:], axis=0, dtype="int64")
    c = bind("iota", shape=x.shape[-2:], axis=1, dtype="int64")
    return where(le(add(r, k), c), x, zeros((), dtype=x.dtype))


def masked_fill(x, mask, value):
    x = _as_tensor(x)
    return where(mask, full((), value, dtype=x.dtype), x)


def _getitem(x: Tensor, key):
    if not isinstance(key, tuple):
        key = (key,)
    n_real = builtins_sum(1 for k in key if k is not None and k is not Ellipsis)
    if n_real > x.ndim:
        raise _err(OpIndexError, "index", f"too many indices ({n_real}) for a tensor of shape {x.shape}")
    if builtins_sum(1 for k in key if k is Ellipsis) > 1:
        raise _err(OpIndexError, "index", "an index can only have a single ellipsis")
    expanded = []
    for k in key:
        if k is Ellipsis:
            expanded += [slice(None)] * (x.ndim - n_real)
        else:
            expanded.append(k)
    expanded += [slice(None)] * (x.ndim - builtins_sum(1 for k in expanded if k is not None))
    starts, stops, steps, out_shape, advanced = [], [], [], [], []
    axis = 0
    for k in expanded:
        if k is None:
            out_shape.append(1)
            continue
        d = x.shape[axis]
        if isinstance(k, slice):
            a, b, c = k.indices(d)
            if c < 0:
                raise _err(OpIndexError, "index", "negative slice steps are not supported")
            b = builtins_max(a, b)
            starts.append(a), stops.append(b), steps.append(c)
            out_shape.append(len(range(a, b, c)))
        elif isinstance(k, (int, np.integer)) and not isinstance(k, bool):
            i = int(k)
            if not -d <= i < d:
                raise _err(OpIndexError, "index", f"index {i} is out of range for axis {axis} of size {d}")
            i %= d
            starts.append(i), stops.append(i + 1), steps.append(1)
        else:
            idx = k if isinstance(k, Tensor) else np.asarray(k)
            if idx.dtype in ("bool", np.bool_):
                raise _err(OpIndexError, "index", "boolean-mask indexing gives a data-dependent shape; "
                                                  "use F.where or F.masked_fill")
            if advanced:
                raise _err(OpIndexError, "index", "only one integer-array index per expression is supported")
            if not isinstance(idx, Tensor) and idx.dtype.kind in "iu" and idx.size:
                # a literal index array: negative entries count from the end, as in numpy
                lo, hi = int(idx.min()), int(idx.max())
                if lo < -d or hi >= d:
                    raise _err(OpIndexError, "index", f"index {lo if lo < -d else hi} is out of range "
                                                      f"for axis {axis} of size {d}")
                idx = np.where(idx < 0, idx + d, idx).astype(np.int64)
            starts.append(0), stops.append(d), steps.append(1)
            advanced.append((len(out_shape), idx))
            out_shape.append(d)
        axis += 1
    y = x
    if (tuple(starts), tuple(stops), tuple(steps)) != ((0,) * x.ndim, x.shape, (1,) * x.ndim):
        y = bind("slice", x, starts=tuple(starts), stops=tuple(stops), steps=tuple(steps))
    y = reshape(y, tuple(out_shape))
    # numpy's rule: integers next to the array index join it; when the integer/array indices
    # are not adjacent (a slice or None between them), the indexed dims go first
    picks = [j for j, k in enumerate(expanded) if k is not None and not isinstance(k, slice)]
    to_front = bool(advanced) and picks[-1] - picks[0] + 1 != len(picks)
    for pos, idx in advanced:
        t = _as_tensor(idx)
        if t.dtype not in INT_DTYPES:
            raise _err(OpIndexError, "index", f"array indices must be integers, got {t.dtype}")
        y = gather(y, t, axis=pos)
        if to_front and pos:
            perm = tuple(range(pos, pos + t.ndim)) + tuple(range(pos)) + tuple(range(pos + t.ndim, y.ndim))
            y = transpose(y, *perm)
    return y


# ============================================================================ linear algebra


def matmul(a, b):
    """Matrix product with numpy semantics: vectors are lifted, batch dims broadcast."""
    dt = _result_dtype([a, b])
    dt = dt if dt in FLOAT_DTYPES else "float32"
    a, b = _as_tensor(a, dt), _as_tensor(b, dt)
    if a.ndim == 0 or b.ndim == 0:
        raise _err(ShapeError, "matmul", f"operands must be at least 1-d, got {a.shape} and {b.shape}")
    squeeze_a = a.ndim == 1
    squeeze_b = b.ndim == 1
    if squeeze_a:
        a = reshape(a, (1, a.shape[0]))
    if squeeze_b:
        b = reshape(b, (b.shape[0], 1))
    if a.shape[-1] != b.shape[-2]:
        raise _err(ShapeError, "matmul", f"cannot multiply {a.shape} by {b.shape}: inner dimensions "
                                         f"{a.shape[-1]} and {b.shape[-2]} differ")
    if b.ndim == 2 and a.ndim > 2:  # (..., m, k) @ (k, n): one big 2-d product
        lead = a.shape[:-1]
        out = reshape(bind("matmul", reshape(a, (-1, a.shape[-1])), b), lead + (b.shape[-1],))
    else:
        out = bind("matmul", a, b)
    if squeeze_a:
        out = squeeze(out, -2)
    if squeeze_b:
        out = squeeze(out, -1)
    return out


def linear(x, weight, bias=None):
    """``x @ weight.T + bias`` with torch's (out_features, in_features) weight layout."""
    y = matmul(x, transpose(weight))
    return y if bias is None else add(y, bias)


# ============================================================================ activations


relu = _unary_float("relu")
relu.__doc__ = ("max(x, 0), one op; NaN stays NaN and the gradient is 0 at 0 and passes at NaN "
                "(as in torch); it is computed from the output, so backward keeps the output alone.")


sigmoid = _unary_float("sigmoid")
sigmoid.__doc__ = "Logistic function 1/(1+e^-x), one op: no overflow for any x; gradient s (1 - s)."


def silu(x):
    return mul(x, sigmoid(x))


def gelu(x, approximate="none"):
    """GELU; ``approximate="tanh"`` is GPT-2's form, ``"none"`` the exact erf form."""
    x = _float(x)
    if approximate == "tanh":
        # 0.5 x (1 + tanh(u)) = x sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3): one exp and
        # one division instead of a tanh, and no cancellation in 1 + tanh(u) for x << 0
        c = 2.0 * math.sqrt(2.0 / math.pi)
        return mul(x, sigmoid(mul(x, add(mul(mul(x, x), c * 0.044715), c))))
    if approximate != "none":
        raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
    return mul(mul(x, 0.5), add(erf(mul(x, 1.0 / math.sqrt(2.0))), 1.0))


# ============================================================================ normalisation


def layer_norm(x, normalized_shape=None, weight=None, bias=None, eps=1e-5):
    x = _float(x)
    if normalized_shape is None:
        normalized_shape = (x.shape[-1],)
    if isinstance(normalized_shape, int):
        normalized_shape = (normalized_shape,)
    k = len(normalized_shape)
    if tuple(x.shape[x.ndim - k:]) != tuple(normalized_shape):
        raise _err(ShapeError, "layer_norm", f"input {x.shape} does not end in normalized_shape {tuple(normalized_shape)}")
    axes = tuple(range(x.ndim - k, x.ndim))
    mu = mean(x, axes, keepdims=True)
    d = sub(x, mu)
    v = mean(mul(d, d), axes, keepdims=True)
    y = mul(d, rsqrt(add(v, eps)))
    if weight is not None:
        y = mul(y, weight)
    if bias is not None:
        y = add(y, bias)
    return y


def rms_norm(x, weight=None, eps=1e-6):
    x = _float(x)
    ms = mean(mul(x, x), -1, keepdims=True)
    y = mul(x, rsqrt(add(ms, eps)))
    return y if weight is None else mul(y, weight)


# ============================================================================ randomness


def _seed(seed):
    s = _as_tensor(seed) if not isinstance(seed, (int, np.integer)) else full((), int(seed), dtype="int64")
    if s.dtype not in INT_DTYPES or s.ndim != 0:
        raise _err(OpError, "random", f"seed must be a 0-d integer tensor or int, got {s.dtype}{list(s.shape)}")
    return s


def uniform(seed, shape, stream=0, dtype="float32"):
    """Counter-based uniform [0, 1): the same numbers eagerly, interpreted and compiled."""
    return bind("rng_uniform", _seed(seed), shape=tuple(shape), stream=int(stream), dtype=dtype)


def normal(seed, shape, stream=0, dtype="float32"):
    """Standard normal by Box-Muller from two counter-based uniform streams."""
    u1 = uniform(seed, shape, 2 * stream, dtype)
    u2 = uniform(seed, shape, 2 * stream + 1, dtype)
    r = sqrt(mul(log(sub(1.0, u1)), -2.0))
    return mul(r, cos(mul(u2, 2 * math.pi)))


def bernoulli(seed, shape, p, stream=0):
    """Bool tensor, True with probability p."""
    return lt(uniform(seed, shape, stream), p)


def dropout(x, p=0.5, training=True, seed=0, stream=0):
    """Inverted dropout: zero each element with probability p, scale the rest by 1/(1-p)."""
    x = _float(x)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: p must lie in [0, 1], got {p}")
    if not training or p == 0.0:
        return x
    if p == 1.0:
        return mul(x, 0.0)
    keep = ge(uniform(seed, x.shape, stream, x.dtype), p)
    return where(keep, mul(x, 1.0 / (1.0 - p)), 0.0)


# ============================================================================ losses


def one_hot(indices, num_classes, dtype="float32"):
    idx = _as_tensor(indices)
    classes = bind("iota", shape=idx.shape + (num_classes,), axis=idx.ndim, dtype=idx.dtype)
    return cast(eq(expand_dims(idx, -1), classes), dtype)


def _check_targets(target, num_classes, ignore_index):
    return bind("check_index", target, size=num_classes, ignore=ignore_index)


def _reduce(loss, reduction, op):
    if reduction == "mean":
        return mean(loss)
    if reduction == "sum":
        return sum(loss)
    if reduction == "none":
        return loss
    raise ValueError(f"{op}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def cross_entropy(logits, target, ignore_index=-100, label_smoothing=0.0, reduction="mean"):
    """Softmax cross entropy over the last axis with integer class targets.

    ``logits``: (..., C); ``target``: (...) ints in [0, C) or ``ignore_index``.  With
    reduction="mean" the loss is averaged over the targets that are not ignored."""
    logits = _float(logits)
    target = _as_tensor(target)
    if target.dtype not in INT_DTYPES:
        raise _err(OpError, "cross_entropy", f"targets must be integers, got {target.dtype}")
    if target.shape != logits.shape[:-1]:
        raise _err(ShapeError, "cross_entropy", f"logits {logits.shape} need targets of shape "
                                                f"{logits.shape[:-1]}, got {target.shape}")
    c = logits.shape[-1]
    target = _check_targets(target, c, ignore_index)
    lsm = log_softmax(logits, -1)
    nll = neg(sum(mul(lsm, one_hot(target, c, lsm.dtype)), -1))
    if label_smoothing:
        nll = add(mul(nll, 1.0 - label_smoothing), mul(mean(lsm, -1), -label_smoothing))
    valid = ne(target, ignore_index)
    loss = where(valid, nll, 0.0)
    if reduction == "mean":
        return div(sum(loss), sum(cast(valid, lsm.dtype)))
    return _reduce(loss, reduction, "cross_entropy")


def mse_loss(pred, target, reduction="mean"):
    d = sub(pred, target)
    return _reduce(mul(d, d), reduction, "mse_loss")


# ============================================================================ attention / embedding


def embedding(ids, weight):
    """Rows of ``weight`` (num_embeddings, dim) picked by integer ``ids``."""
    return gather(weight, ids, axis=0)


def attention(q, k, v, causal=False, scale=None, key_bias=None):
    """Fused self-attention over (batch, length, heads, head_dim) tensors of one shape:
    softmax(q k^T * scale + key_bias) v per (batch, head), keys j <= i only for query i
    when ``causal``; ``scale`` defaults to 1/sqrt(head_dim).  ``key_bias``: an optional
    (batch, length) tensor added to every query's score of each key (a padding mask as
    -inf or a large negative number at padded keys).  One kernel forward and one
    backward, which recomputes the probabilities: no (length x length) tensor is stored.
    q, k and v may be views (slices of one projection, reshapes): the kernel reads them in
    place.  Other masks, cross-attention and attention dropout:
    ``scaled_dot_product_attention``."""
    q, k, v = _float(q), _float(k), _float(v)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    bias = () if key_bias is None else (cast(_as_tensor(key_bias), q.dtype),)
    return bind("attention", q, k, v, *bias, scale=scale, causal=bool(causal))


def scaled_dot_product_attention(q, k, v, mask=None, is_causal=False, scale=None):
    """softmax(q @ k^T * scale + mask) @ v over (..., L, D) tensors.

    ``mask``: bool (True = attend, as in torch) or float (added to the scores), broadcast
    against (..., Lq, Lk).  Without a mask, for q, k and v of one shape (self-attention)
    and a non-empty head dim, this is the fused ``attention`` kernel; otherwise the
    composite below (scores, softmax, product)."""
    q, k, v = _float(q), _float(k), _float(v)
    d = q.shape[-1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    if mask is None and q.shape == k.shape == v.shape and q.ndim >= 2 and q.dtype == k.dtype == v.dtype \
            and d > 0 and q.shape[-2] > 0 and isinstance(scale, (int, float)) and math.isfinite(scale):
        if q.ndim == 4:  # (B, H, L, D): the heads-first views of (B, L, H, D)
            o = attention(*(transpose(t, 0, 2, 1, 3) for t in (q, k, v)), causal=is_causal, scale=scale)
            return transpose(o, 0, 2, 1, 3)
        lead = q.shape[:-2]
        flat = (math.prod(lead), q.shape[-2], 1, d)
        o = attention(*(reshape(t, flat) for t in (q, k, v)), causal=is_causal, scale=scale)
        return reshape(o, q.shape)
    s = mul(matmul(q, swapaxes(k, -1, -2)), scale)
    if is_causal:
        lq, lk = q.shape[-2], k.shape[-2]
        r = bind("iota", shape=(lq, lk), axis=0, dtype="int64")
        c = bind("iota", shape=(lq, lk), axis=1, dtype="int64")
        s = where(ge(add(r, lk - lq), c), s, -math.inf)
    if mask is not None:
        m = _as_tensor(mask)
        s = where(m, s, -math.inf) if m.dtype == "bool" else add(s, m)
    return matmul(softmax(s, -1), v)


# ============================================================================ Tensor methods

builtins_sum = _builtins.sum
builtins_max = _builtins.max


def _install_methods():
    T = Tensor

    def rev(f):
        return lambda self, other: f(other, self)

    T.__add__, T.__radd__ = add, rev(add)
    T.__sub__, T.__rsub__ = sub, rev(sub)
    T.__mul__, T.__rmul__ = mul, rev(mul)
    T.__truediv__, T.__rtruediv__ = div, rev(div)
    T.__pow__, T.__rpow__ = pow, rev(pow)
    T.__matmul__, T.__rmatmul__ = matmul, rev(matmul)
    T.__neg__ = neg
    T.__abs__ = abs
    T.__eq__, T.__ne__ = eq, ne
    T.__lt__, T.__le__, T.__gt__, T.__ge__ = lt, le, gt, ge
    T.__invert__ = logical_not
    T.__and__ = logical_and
    T.__or__ = logical_or
    T.__getitem__ = _getitem
    T.T = property(lambda self: transpose(self))
    for name in ("sum", "mean", "max", "min", "var", "std", "argmax", "exp", "log", "sqrt", "rsqrt",
                 "tanh", "erf", "sin", "cos", "abs", "sign", "reshape", "transpose", "permute",
                 "swapaxes", "broadcast_to", "squeeze", "unsqueeze", "expand_dims", "flatten",
                 "softmax", "log_softmax", "logsumexp", "relu", "sigmoid", "gelu", "silu",
                 "masked_fill", "clamp", "matmul", "tril", "triu", "gather", "stop_gradient"):
        setattr(T, name, globals()[name])
    T.astype = cast
    T.float = lambda self: cast(self, "float32")
    T.double = lambda self: cast(self, "float64")
    T.long = lambda self: cast(self, "int64")
    T.int = lambda self: cast(self, "int32")
    T.view = reshape


_install_methods()
