"""Tensor, eager execution, tracing and the eager backward pass.

One Tensor class serves both modes:
  * eager: it holds a NumPy array; ops run at once through the primitives' NumPy
    references, and record a tape entry when a gradient is needed;
  * traced: while a :class:`Tracer` is active, every op on any tensor is recorded as a
    node of the graph being built (concrete tensors are lifted: parameters become named
    inputs, other values become constants).

Everything funnels through :func:`bind`, the one place an op is applied.
"""
from __future__ import annotations

import contextlib
import functools
import itertools
import os
import sys
import threading
from typing import Any, Sequence

import numpy as np

from .ir import Graph, GraphInput, Node, SourceLoc, TensorType, canonical_dtype, is_float
from .ops.registry import NONDIFF, PRIMITIVES as _PRIMITIVES, OpError, get

# ----------------------------------------------------------------------------- source lines

_OUR_DIRS = tuple(
    os.path.dirname(os.path.abspath(p)) + os.sep
    for p in (__file__, os.path.join(os.path.dirname(__file__), "..", "runtime", "x"))
)
_SKIP_FILES = ("contextlib.py", "functools.py")


def _short_path(path: str) -> str:
    return _short_path_from(path, os.getcwd())


@functools.lru_cache(maxsize=1024)
def _short_path_from(path: str, cwd: str) -> str:
    try:
        rel = os.path.relpath(path, cwd)
    except ValueError:
        rel = path
    if rel.startswith(".." + os.sep) or os.path.isabs(rel):
        parts = path.split(os.sep)
        return os.sep.join(parts[-2:])
    return rel


_USER_FILE: dict[str, bool] = {}  # code file name -> is it the user's (outside our dirs)?
_LOCS: dict[tuple, SourceLoc] = {}  # (short path, line) -> its SourceLoc (immutable: shared)


def user_loc(depth: int = 1, cwd: str | None = None) -> SourceLoc | None:
    """The first stack frame outside neural_arch's compiler and runtime: the user's line
    (its path relative to ``cwd``, by default the current directory)."""
    f = sys._getframe(depth)
    while f is not None:
        fn = f.f_code.co_filename
        user = _USER_FILE.get(fn)
        if user is None:
            user = _USER_FILE[fn] = not fn.startswith(_OUR_DIRS) and not fn.endswith(_SKIP_FILES) \
                and not fn.startswith("<frozen")
        if user:
            key = (_short_path_from(fn, cwd or os.getcwd()), f.f_lineno)
            loc = _LOCS.get(key)
            if loc is None:
                if len(_LOCS) > 100_000:
                    _LOCS.clear()
                loc = _LOCS[key] = SourceLoc(*key)
            return loc
        f = f.f_back
    return None


# ----------------------------------------------------------------------------- global state


class _State(threading.local):
    def __init__(self):
        self.tracers: list[Tracer] = []
        self.grad_enabled = True


_state = _State()


@contextlib.contextmanager
def no_grad():
    """Within this block eager ops record no tape, so nothing is differentiated."""
    prev = _state.grad_enabled
    _state.grad_enabled = False
    try:
        yield
    finally:
        _state.grad_enabled = prev


def is_grad_enabled() -> bool:
    return _state.grad_enabled


def current_tracer() -> "Tracer | None":
    return _state.tracers[-1] if _state.tracers else None


class TraceError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- Tensor

# Counts replacements of an existing tensor's array (the ``data`` setter) and changes to the
# optimizers' state dicts: a compiled training step that updates parameter and state arrays
# in place reads it once per step, and while it is unchanged knows without looking at each
# tensor (a GPT-2 step has 84 of them) that they still hold the arrays it updates.
_GENERATION = [0]
_GENERATIONS = itertools.count(1)  # (next() is atomic: each bump stores a value never stored before)


def data_generation() -> int:
    return _GENERATION[0]


def bump_data_generation() -> None:
    _GENERATION[0] = next(_GENERATIONS)


def place_data(t: "Tensor", array: np.ndarray) -> None:
    """Make ``array`` the storage of the eager tensor ``t``, without a copy (``t.data = ...``
    copies): same shape and dtype, C-contiguous and writeable; the values are the caller's.
    Advances the data generation as an assignment does.  For the compiled training step,
    which moves the parameters and optimizer state into one buffer (models/train.py)."""
    if t._data is None:
        raise TraceError("cannot place data under a traced tensor")
    if array.shape != t._data.shape or array.dtype != t._data.dtype or not array.flags.c_contiguous \
            or not array.flags.writeable:
        raise ValueError(f"place_data: needs a writeable C-contiguous {t._data.dtype}{list(t._data.shape)} "
                         f"array, got {array.dtype}{list(array.shape)}")
    t._data = array
    bump_data_generation()



class Tensor:
    """An n-d array of one dtype, eager (holds data) or traced (names a graph value)."""

    __array_priority__ = 1000
    __slots__ = ("_data", "_type", "_tracer", "_sym", "_node", "requires_grad", "grad", "name",
                 "__weakref__")

    def __init__(self, data: Any, dtype: Any = None, requires_grad: bool = False):
        arr = _to_array(data, dtype)
        self._data = arr
        self._type = TensorType(arr.shape, arr.dtype.name)
        self._tracer = None
        self._sym = None
        self._node = None
        self.grad = None
        self.name = None
        if requires_grad and not is_float(self._type.dtype):
            raise TypeError(f"only floating-point tensors can require gradients, got {self._type.dtype}")
        self.requires_grad = bool(requires_grad)

    @classmethod
    def _wrap(cls, arr: np.ndarray) -> "Tensor":
        t = cls.__new__(Tensor)
        t._data = arr
        t._type = TensorType(arr.shape, arr.dtype.name)
        t._tracer = t._sym = t._node = t.grad = t.name = None
        t.requires_grad = False
        return t

    @classmethod
    def _symbolic(cls, tracer: "Tracer", name: str, type: TensorType) -> "Tensor":
        t = cls.__new__(Tensor)
        t._data = None
        t._type = type
        t._tracer = tracer
        t._sym = name
        t._node = t.grad = t.name = None
        t.requires_grad = False
        return t

    # -- properties
    @property
    def type(self) -> TensorType:
        return self._type

    @property
    def shape(self) -> tuple[int, ...]:
        return self._type.shape

    @property
    def dtype(self) -> str:
        return self._type.dtype

    @property
    def ndim(self) -> int:
        return len(self._type.shape)

    @property
    def size(self) -> int:
        return self._type.size

    @property
    def is_traced(self) -> bool:
        return self._tracer is not None

    @property
    def data(self) -> np.ndarray:
        if self._data is None:
            raise TraceError(
                f"a traced tensor ({self._sym}: {self._type}) has no data while tracing; "
                f"values exist only when the compiled graph runs ({user_loc(2)})")
        return self._data

    @data.setter
    def data(self, value) -> None:
        """Replace an eager tensor's values (same shape and dtype), e.g. in an optimizer step."""
        if self._data is None:
            raise TraceError(f"cannot assign data to a traced tensor ({self._sym})")
        arr = np.asarray(value.data if isinstance(value, Tensor) else value)
        if arr.shape != self.shape:
            raise ValueError(f"data assignment: shape {arr.shape} does not match the tensor's {self.shape}")
        self._data = np.array(arr, dtype=self.dtype, order="C", copy=True)
        bump_data_generation()

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self):
        if self.size != 1:
            raise ValueError(f"item(): tensor of shape {self.shape} has {self.size} elements, not 1")
        return self.data.reshape(()).item()

    def tolist(self):
        return self.data.tolist()

    def detach(self) -> "Tensor":
        if self._data is None:
            return bind("stop_gradient", self)
        return Tensor._wrap(self._data)

    def __array__(self, dtype=None, copy=None):
        arr = self.data
        return arr if dtype is None else arr.astype(dtype)

    def __len__(self) -> int:
        if not self.shape:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __bool__(self) -> bool:
        if self._data is None:
            raise TraceError(
                "Python control flow on a traced value: `if`/`while`/`bool()` need a concrete "
                f"value, but {self._sym}: {self._type} is only known when the graph runs; "
                f"use F.where for data-dependent choices ({user_loc(2)})")
        return bool(self._data)

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __index__(self):
        if self.dtype not in ("int32", "int64") or self.ndim != 0:
            raise TypeError("only 0-d integer tensors can be used as an index")
        return int(self.item())

    def __repr__(self) -> str:
        if self._data is None:
            return f"Tensor(traced {self._sym}: {self._type})"
        rg = ", requires_grad=True" if self.requires_grad else ""
        body = np.array2string(self._data, separator=", ", precision=4, threshold=64)
        return f"tensor({body}, dtype={self.dtype}{rg})"

    __hash__ = object.__hash__

    # -- autodiff
    def backward(self, grad: "Tensor | None" = None) -> None:
        backward(self, grad)


def _to_array(data: Any, dtype: Any = None) -> np.ndarray:
    if isinstance(data, Tensor):
        arr = data.data
    elif isinstance(data, (np.ndarray, np.generic)):  # NumPy arrays and scalars keep their dtype
        arr = np.asarray(data)
    else:
        arr = np.asarray(data)
        if dtype is None:
            # Python data: floats default to float32, ints to int64 (as in torch)
            if arr.dtype.kind == "f":
                arr = arr.astype(np.float32)
            elif arr.dtype.kind in "iu":
                arr = arr.astype(np.int64)
    if dtype is not None:
        arr = arr.astype(canonical_dtype(dtype), copy=False)
    else:
        canonical_dtype(arr.dtype)  # raises a clear error for unsupported dtypes
    return np.asarray(arr, order="C")  # (np.ascontiguousarray would turn 0-d into 1-d)


def as_tensor(x: Any, like: Tensor | None = None) -> Tensor:
    if isinstance(x, Tensor):
        return x
    return Tensor(x)


# ----------------------------------------------------------------------------- tracing


class Tracer:
    """Builds one Graph.  Concrete tensors met while tracing are lifted: tensors that
    require grad (parameters) become ``param`` inputs, symbolic tensors of an enclosing
    tracer become captured ``arg`` inputs, anything else becomes a ``constant`` node."""

    def __init__(self, name: str = "main", params: dict[str, Tensor] | None = None):
        self.name = name
        self.inputs: list[GraphInput] = []
        self.nodes: list[Node] = []
        self._used: set[str] = set()
        self._counter = 0
        self._lifted: dict[int, tuple[Any, Tensor]] = {}
        self.bindings: dict[str, Any] = {}  # input name -> concrete tensor or outer symbolic tensor
        self.loc_override: SourceLoc | None = None
        self._param_names = {id(t): n for n, t in (params or {}).items()}
        self._cwd = os.getcwd()  # source paths are relative to where the trace started

    def fresh(self, hint: str | None = None) -> str:
        if hint is None:  # the common case: the next number, unless an input took it
            name = str(self._counter)
            self._counter += 1
            if name not in self._used:
                self._used.add(name)
                return name
        elif hint not in self._used:
            self._used.add(hint)
            return hint
        while True:
            name = f"{hint}_{self._counter}" if hint else str(self._counter)
            self._counter += 1
            if name not in self._used:
                self._used.add(name)
                return name

    def add_input(self, type: TensorType, kind: str = "arg", hint: str | None = None) -> Tensor:
        name = self.fresh(hint or f"arg{len(self.inputs)}")
        self.inputs.append(GraphInput(name, type, kind))
        return Tensor._symbolic(self, name, type)

    def lift(self, t: Tensor) -> Tensor:
        if t._tracer is self:
            return t
        hit = self._lifted.get(id(t))
        if hit is not None:
            return hit[1]
        if t._tracer is not None:  # a value of an enclosing trace: capture it as an input
            sym = self.add_input(t._type, "arg", "capture")
            self.bindings[sym._sym] = t
        elif id(t) in self._param_names or t.requires_grad:
            hint = self._param_names.get(id(t)) or t.name or "param"
            sym = self.add_input(t._type, "param", hint)
            self.bindings[sym._sym] = t
        else:
            sym = self.emit("constant", [], {"value": t._data.reshape(-1), "shape": t.shape,
                                              "dtype": t.dtype}, t._type)
        self._lifted[id(t)] = (t, sym)
        return sym

    def emit(self, op: str, inputs: Sequence[Tensor], attrs: dict, type: TensorType) -> Tensor:
        name = self.fresh()
        loc = self.loc_override or user_loc(2, self._cwd)
        self.nodes.append(Node.make(name, op, [i._sym for i in inputs], type, attrs, loc))
        return Tensor._symbolic(self, name, type)

    def emit_copy(self, node: Node, inputs: Sequence[Tensor]) -> Tensor:
        """Record ``node`` of a well-typed graph (one made by tracing, whose types its ops'
        rules gave) on inputs of its inputs' types, as ``bind`` would but without running
        the rule again: its type and (frozen) attributes carry over."""
        name = self.fresh()
        syms = [t._sym if t._tracer is self else self.lift(t)._sym for t in inputs]
        self.nodes.append(Node(name, node.op, tuple(syms), node.type, node.attrs,
                               self.loc_override or user_loc(2, self._cwd)))
        return Tensor._symbolic(self, name, node.type)

    def replay(self, start: int, end: int, inputs: Sequence[Tensor], outputs: Sequence[Tensor],
               new_inputs: Sequence[Tensor]) -> list[Tensor]:
        """``outputs`` of the stretch of this trace ``self.nodes[start:end]``, recorded as a
        function of this trace's tensors ``inputs``, computed again on ``new_inputs`` (this
        trace's tensors of the same types): each node of the stretch that depends on an
        input is appended again, renamed, with its type, attributes and location; a node
        that depends on none is shared (it would compute the same value).  For code traced
        once per parameter whose nodes depend only on its arguments' types (the built-in
        optimizers' updates): the nodes the stretch's own tracing would have made, without
        running the Python that made them."""
        if any(t._tracer is not self for t in (*inputs, *outputs, *new_inputs)) or \
                [t._type for t in new_inputs] != [t._type for t in inputs] or \
                len({t._sym for t in inputs}) != len(inputs):
            raise TraceError("replay: needs distinct recorded inputs of this trace and new inputs of their types")
        sub = {old._sym: t._sym for old, t in zip(inputs, new_inputs)}
        nodes = self.nodes
        fresh = self.fresh
        for n in nodes[start:end]:
            if any(i in sub for i in n.inputs):
                name = fresh()
                nodes.append(Node(name, n.op, tuple(sub.get(i, i) for i in n.inputs), n.type, n.attrs, n.loc))
                sub[n.name] = name
        return [Tensor._symbolic(self, sub.get(o._sym, o._sym), o._type) for o in outputs]

    def finish(self, outputs: Sequence[Tensor]) -> Graph:
        names = []
        for o in outputs:
            if not isinstance(o, Tensor):
                raise TraceError(f"a traced function must return tensors, got {type(o).__name__}")
            names.append(self.lift(o)._sym)
        return Graph(self.name, tuple(self.inputs), tuple(self.nodes), tuple(names))

    def __enter__(self):
        _state.tracers.append(self)
        return self

    def __exit__(self, *exc):
        popped = _state.tracers.pop()
        assert popped is self


# ----------------------------------------------------------------------------- bind


def bind(op: str, *inputs: Tensor, **attrs) -> Tensor:
    """Apply primitive ``op``: check types with its shape rule, then record it (tracing) or
    run its NumPy reference (eager), taping it when a gradient will be needed."""
    prim = _PRIMITIVES.get(op) or get(op)
    try:
        out_type = prim.shape_rule(*[t._type for t in inputs], **attrs)
    except OpError as e:
        tracer = current_tracer()
        raise e.with_loc((tracer and tracer.loc_override) or user_loc(2)) from None
    tracers = _state.tracers
    if tracers:
        tracer = tracers[-1]
        return tracer.emit(op, [t if t._tracer is tracer else tracer.lift(t) for t in inputs], attrs, out_type)
    for t in inputs:
        if t._data is None:
            raise TraceError(f"{op}: a traced tensor ({t._sym}) was used after its trace ended "
                             f"({user_loc(2)})")
    try:
        out = prim.reference(*[t._data for t in inputs], out=out_type, **attrs)
    except OpError as e:
        raise e.with_loc(user_loc(2)) from None
    res = Tensor._wrap(np.asarray(out, dtype=out_type.dtype))
    if res.shape != out_type.shape:
        raise AssertionError(f"internal error: {op} reference gave shape {res.shape}, rule says {out_type.shape}")
    # only floating-point results carry gradients (an int result of cast has a zero VJP anyway)
    if (_state.grad_enabled and prim.vjp is not NONDIFF and is_float(out_type.dtype)
            and any(t.requires_grad for t in inputs)):
        res.requires_grad = True
        res._node = (prim, inputs, attrs)
    return res


# ----------------------------------------------------------------------------- eager backward


def _topo_from(root: Tensor) -> list[Tensor]:
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        t, done = stack.pop()
        if done:
            order.append(t)
            continue
        if id(t) in seen:
            continue
        seen.add(id(t))
        stack.append((t, True))
        if t._node is not None:
            for i in t._node[1]:
                if i.requires_grad and id(i) not in seen:
                    stack.append((i, False))
    return order


def backward(root: Tensor, grad: Tensor | None = None) -> None:
    """Reverse-mode sweep over the eager tape with the primitives' VJP rules; accumulates
    ``.grad`` on leaf tensors that require grad."""
    if root._data is None:
        raise TraceError("backward() is for eager tensors; use grad()/value_and_grad() on traced code")
    if not root.requires_grad:
        raise RuntimeError("backward(): this tensor does not require grad (no input of the computation "
                           "had requires_grad=True, or it was computed under no_grad())")
    if grad is None:
        if root.size != 1:
            raise RuntimeError(f"backward(): gradient can be implied only for a single-element tensor, "
                               f"got shape {root.shape}; pass grad=")
        grad = Tensor._wrap(np.ones(root.shape, dtype=root.dtype))
    else:
        grad = as_tensor(grad)
        if grad.shape != root.shape:
            raise ValueError(f"backward(): grad has shape {grad.shape}, expected {root.shape}")
        if grad.dtype != root.dtype:  # e.g. a float64 NumPy array for a float32 result
            grad = Tensor._wrap(grad.data.astype(root.dtype))
    cts: dict[int, Tensor] = {id(root): grad}
    with no_grad():
        for t in reversed(_topo_from(root)):
            g = cts.pop(id(t), None)
            if g is None:
                continue
            if t._node is None:
                if t.requires_grad:
                    t.grad = g if t.grad is None else Tensor._wrap(t.grad._data + g._data)
                continue
            prim, ins, attrs = t._node
            gs = prim.vjp(g, t, *ins, **attrs)
            for inp, gi in zip(ins, gs):
                if gi is None or not inp.requires_grad:
                    continue
                prev = cts.get(id(inp))
                cts[id(inp)] = gi if prev is None else bind("add", prev, gi)
