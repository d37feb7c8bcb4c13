"""``compile(fn, *example_args)``: trace ``fn`` once and run it as native code.

    f = compile(model_loss, x, y)          # Module parameters become inputs
    loss = f(x, y)                          # a Tensor, like eager mode returns
    g = compile(grad(model_loss), x, y)     # tracing grad(fn) inlines the backward graph
    f.graph, f.kernels, f.llvm_ir, f.llvm_ir_unoptimized, f.asm   # what was built

The compiled function checks every call against the traced signature: an argument of
another shape or dtype is a ``TypeError`` naming the argument (nothing is retraced and
nothing reads out of bounds).  Parameters (tensors that require grad, e.g. a Module's)
are read at call time, so training updates are seen without recompiling.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from .ir import Graph, TensorType
from .tensor import Tensor
from .trace import find_params, trace_with_info

BACKENDS = ("llvm", "interpreter")


_KINDS = {"float32": "f", "float64": "f", "int32": "i", "int64": "i", "bool": "b"}


def _as_array(x: Any, name: str, want: TensorType) -> np.ndarray:
    """The argument as a C-contiguous array of exactly the traced type, else a TypeError."""
    if isinstance(x, Tensor):
        arr = x.data
    elif isinstance(x, np.ndarray):
        arr = x
    elif isinstance(x, (bool, int, float)) and want.shape == () and (
            _KINDS[want.dtype] == {bool: "b", int: "i", float: "f"}[type(x)]
            or (type(x) is int and _KINDS[want.dtype] == "f")):
        arr = np.asarray(x, dtype=want.dtype)  # a Python scalar takes the traced dtype
    else:
        try:
            arr = Tensor(x).data
        except (TypeError, ValueError) as e:
            raise TypeError(f"argument {name!r} expects {want}, got {type(x).__name__} ({e})") from None
    if arr.dtype.name not in _KINDS or TensorType(arr.shape, arr.dtype.name) != want:
        got = f"{TensorType(arr.shape, arr.dtype.name)}" if arr.dtype.name in _KINDS else \
            f"{arr.dtype.name}{list(arr.shape)}"
        raise TypeError(f"argument {name!r} expects {want}, got {got}; a compiled function is "
                        f"specialised to its example arguments' shapes and dtypes (compile again "
                        f"for another signature)")
    if not arr.flags.c_contiguous or not arr.flags.aligned:
        arr = np.ascontiguousarray(arr)
    return arr


class CompiledFunction:
    """A traced function bound to a backend; call it like the original."""

    def __init__(self, fn: Callable, example_args, backend: str = "llvm", options: dict | None = None,
                 name: str | None = None):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.fn = fn
        self.backend = backend
        self.options = dict(options or {})
        t0 = time.perf_counter()
        traced = trace_with_info(fn, *example_args, params=find_params(fn), name=name)
        self.trace_seconds = time.perf_counter() - t0
        self.traced = traced
        self.traced_graph: Graph = traced.graph
        self.graph: Graph = traced.graph  # the graph that runs (after the passes, with llvm)
        n_args = len(example_args)
        self._arg_inputs = self.graph.inputs[:n_args]
        self._bound_inputs = self.graph.inputs[n_args:]  # params / captured tensors
        self._bindings = [traced.bindings[i.name] for i in self._bound_inputs]
        self._want = [(tuple(i.type.shape), np.dtype(i.type.dtype)) for i in self.graph.inputs]
        self.program = None
        if backend == "llvm":
            from neural_arch.runtime.program import Program
            t0 = time.perf_counter()
            self.program = Program(self.graph, options=self.options)
            self.graph = self.program.graph
            self.compile_seconds = time.perf_counter() - t0
        else:
            self.compile_seconds = 0.0

    # -- introspection
    @property
    def kernels(self) -> list:
        return list(self.program.kernels) if self.program is not None else []

    @property
    def llvm_ir_unoptimized(self) -> str:
        return self.program.module.llvm_ir if self.program is not None else ""

    @property
    def llvm_ir(self) -> str:
        """The optimised LLVM IR that runs."""
        if self.program is None:
            return ""
        nat = self.program.native
        nat.optimized(self.program.module)
        return nat.optimized_ir

    @property
    def asm(self) -> str:
        if self.program is None:
            return ""
        from neural_arch.runtime import jit
        return jit.emit_assembly(self.program.native.optimized(self.program.module))

    def __repr__(self):
        return (f"<compiled {self.graph.name}: {len(self.graph.nodes)} nodes, "
                f"{len(self.kernels)} kernels, backend={self.backend}>")

    # -- calling
    def _inputs(self, args) -> list[np.ndarray]:
        if len(args) != len(self._arg_inputs):
            names = ", ".join(i.name for i in self._arg_inputs)
            raise TypeError(f"{self.graph.name}() takes {len(self._arg_inputs)} arguments ({names}), "
                            f"got {len(args)}")
        arrays = []
        for a, gi, (shape, dt) in zip(args, self._arg_inputs, self._want):
            if isinstance(a, Tensor):
                a = a._data if a._data is not None else a
            if type(a) is np.ndarray and a.dtype is dt and a.shape == shape and a.flags.c_contiguous:
                arrays.append(a)  # the fast path: exactly the traced type already
            else:
                arrays.append(_as_array(a, gi.name, gi.type))
        for gi, t, (shape, dt) in zip(self._bound_inputs, self._bindings, self._want[len(self._arg_inputs):]):
            arr = t.data if isinstance(t, Tensor) else np.asarray(t)
            if not (arr.dtype is dt and arr.shape == shape and arr.flags.c_contiguous):
                arr = _as_array(arr, gi.name, gi.type)
            arrays.append(arr)
        return arrays

    def run_arrays(self, *args) -> list[np.ndarray]:
        """Flat list of output arrays (no Tensor wrapping)."""
        arrays = self._inputs(args)
        if self.program is not None:
            return self.program(*arrays)
        from neural_arch.runtime.interpreter import interpret
        return interpret(self.graph, arrays)

    def __call__(self, *args):
        outs = self.run_arrays(*args)
        return self.traced.unflatten([Tensor._wrap(o) for o in outs])


def compile(fn: Callable, *example_args, backend: str = "llvm", options: dict | None = None,
            name: str | None = None) -> CompiledFunction:  # noqa: A001 - mirrors torch.compile
    """Trace ``fn`` on example arguments (tensors, arrays, or TensorTypes) and return a
    :class:`CompiledFunction` running it natively (``backend="llvm"``) or through the NumPy
    interpreter (``backend="interpreter"``)."""
    return CompiledFunction(fn, example_args, backend=backend, options=options, name=name)
