"""The primitive registry: each op declared once with all its faces.

A :class:`Primitive` carries
  * ``shape_rule(*types, **attrs) -> TensorType`` (abstract evaluation; raises OpError),
  * ``reference(*arrays, out=TensorType, **attrs) -> ndarray`` (NumPy; what eager mode and
    the interpreter run),
  * ``vjp(g, out, *inputs, **attrs) -> tuple`` written with other ops (autodiff is a graph
    transform), or ``NONDIFF`` for ops whose outputs carry no gradient,
  * ``kind``: the fusion kind,
  * ``spec``: the test spec (a generator of valid inputs and the tolerances),
  * ``lowering``: how codegen computes it (attached by the codegen module).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from ..ir import TensorType

FUSION_KINDS = ("elementwise", "broadcast", "injective", "reduction", "matmul", "opaque", "source")


class OpError(ValueError):
    """A user-facing error raised by an op's rule or reference (bad shapes, dtypes, indices)."""

    def __init__(self, op: str, message: str):
        self.op = op
        self.message = message
        self.loc = None
        super().__init__(f"{op}: {message}")

    def with_loc(self, loc) -> "OpError":
        if loc is not None and self.loc is None:
            self.loc = loc
            self.args = (f"{self.op}: {self.message} ({loc})",)
        return self


class ShapeError(OpError):
    pass


class DTypeError(OpError, TypeError):
    pass


class OpIndexError(OpError, IndexError):
    pass


NONDIFF = "nondifferentiable"  # a declared VJP face: the op's output carries no gradient


class Sampler:
    """What a test spec draws from.  Two implementations: NumPy-seeded (difftest CLI) and
    hypothesis-driven (tests/), so specs do not depend on hypothesis at runtime."""

    def int(self, lo: int, hi: int) -> int:  # inclusive
        raise NotImplementedError

    def choice(self, seq):
        return seq[self.int(0, len(seq) - 1)]

    def bool(self) -> bool:
        return self.int(0, 1) == 1

    def shape(self, min_rank: int = 0, max_rank: int = 3, max_dim: int = 5, allow_empty: bool = True):
        rank = self.int(min_rank, max_rank)
        lo = 0 if allow_empty else 1
        # empty dims are drawn rarely: they are interesting, not typical
        return tuple(self.int(lo, max_dim) if self.int(0, 7) == 0 else self.int(1, max_dim)
                     for _ in range(rank))

    def array(self, shape, dtype: str = "float32", lo: float = -2.0, hi: float = 2.0,
              avoid: tuple[float, ...] = ()) -> np.ndarray:
        raise NotImplementedError


class NumpySampler(Sampler):
    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def int(self, lo, hi):
        return int(self.rng.integers(lo, hi + 1))

    def array(self, shape, dtype="float32", lo=-2.0, hi=2.0, avoid=()):
        return draw_array(self.rng, shape, dtype, lo, hi, avoid)


def draw_array(rng: np.random.Generator, shape, dtype, lo, hi, avoid=()) -> np.ndarray:
    """Values in [lo, hi) (integers in [lo, hi)), kept at least 0.05 away from each point in
    ``avoid`` (kinks such as 0 for abs) so finite differences stay meaningful."""
    shape = tuple(shape)
    if dtype == "bool":
        return rng.integers(0, 2, size=shape).astype(bool)
    if dtype in ("int32", "int64"):
        return rng.integers(int(lo), int(hi), size=shape).astype(dtype)
    x = rng.uniform(lo, hi, size=shape)
    for a in avoid:
        d = x - a
        x = np.where(np.abs(d) < 0.05, a + np.where(d >= 0, 0.1, -0.1), x)
    return x.astype(dtype)


@dataclass(frozen=True)
class Case:
    inputs: tuple[np.ndarray, ...]
    attrs: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Spec:
    """Test spec: ``gen(sampler) -> Case`` draws valid inputs; tolerances are for float32
    against a float64 reference; ``grad`` says whether gradients are checked by finite
    differences (ops with integer/bool outputs or piecewise-constant values set it False)."""

    gen: Callable[[Sampler], Case]
    rtol: float = 1e-5
    atol: float = 1e-6
    grad: bool = True
    grad_rtol: float = 1e-3
    grad_atol: float = 1e-4


@dataclass
class Primitive:
    name: str
    kind: str
    shape_rule: Callable[..., TensorType]
    reference: Callable[..., np.ndarray]
    vjp: Any  # callable or NONDIFF
    spec: Spec | None
    doc: str = ""
    lowering: Any = None  # attached by compiler.codegen

    def __post_init__(self):
        if self.kind not in FUSION_KINDS:
            raise ValueError(f"{self.name}: unknown fusion kind {self.kind!r}")

    def __repr__(self):
        return f"<primitive {self.name} ({self.kind})>"


PRIMITIVES: dict[str, Primitive] = {}


def primitive(name: str, *, kind: str, shape: Callable, ref: Callable, vjp, spec: Spec | None,
              doc: str = "") -> Primitive:
    if name in PRIMITIVES:
        raise ValueError(f"primitive {name!r} declared twice")
    p = Primitive(name, kind, shape, ref, vjp, spec, doc)
    PRIMITIVES[name] = p
    return p


def get(name: str) -> Primitive:
    try:
        return PRIMITIVES[name]
    except KeyError:
        raise KeyError(f"unknown op {name!r}; known ops: {', '.join(sorted(PRIMITIVES))}") from None
