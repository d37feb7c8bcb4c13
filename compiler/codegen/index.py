"""Symbolic 64-bit index expressions for loop nests (the "shape tracker" of our codegen).

An :class:`Ix` is an integer affine form ``const + sum(coef * atom)`` whose atoms are loop
variables, floor divisions, remainders, clamps or runtime data (a gathered index), each
with a known inclusive range.  Index remaps (reshape, transpose, broadcast, slice, pad,
concat) build these forms instead of LLVM instructions, so that

* ranges prove divisions/remainders away: ``(12*i + j) // 12 == i`` when ``0 <= j < 12``;
* split-and-recombine cancels: ``3 * (v // 3) + v % 3 == v`` (merging loop dimensions and
  reshapes cost nothing);
* the kernel builder can read off each memory access's stride per loop variable to decide
  which loop dimensions to merge.

Only what reaches a load/store address or a value is emitted to LLVM, once per use; LLVM's
CSE removes repeats.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


class Atom:
    lo: int
    hi: int

    def vars(self) -> set[str]:
        raise NotImplementedError


@dataclass(frozen=True)
class Var(Atom):
    """A loop variable in [0, extent)."""
    name: str
    extent: int

    @property
    def lo(self):
        return 0

    @property
    def hi(self):
        return self.extent - 1

    def vars(self):
        return {self.name}

    def __str__(self):
        return self.name


@dataclass(frozen=True)
class Div(Atom):
    """floor(x / d), d > 0."""
    x: "Ix"
    d: int

    @property
    def lo(self):
        return self.x.lo // self.d

    @property
    def hi(self):
        return self.x.hi // self.d

    def vars(self):
        return self.x.vars()

    def __str__(self):
        return f"({self.x})//{self.d}"


@dataclass(frozen=True)
class Mod(Atom):
    """x mod d (floor semantics: in [0, d)), d > 0."""
    x: "Ix"
    d: int

    @property
    def lo(self):
        return 0

    @property
    def hi(self):
        return self.d - 1

    def vars(self):
        return self.x.vars()

    def __str__(self):
        return f"({self.x})%{self.d}"


@dataclass(frozen=True)
class Clamp(Atom):
    """min(max(x, lo), hi): keeps a masked-off lane's address in bounds."""
    x: "Ix"
    c_lo: int
    c_hi: int

    @property
    def lo(self):
        return self.c_lo

    @property
    def hi(self):
        return self.c_hi

    def vars(self):
        return self.x.vars()

    def __str__(self):
        return f"clamp({self.x}, {self.c_lo}, {self.c_hi})"


@dataclass(frozen=True)
class Data(Atom):
    """A runtime value (e.g. a gathered index) known to lie in [lo, hi] (bounds-checked
    before the kernel reads memory).  ``value`` is the LLVM i64 value (None in analysis)."""
    key: str
    d_lo: int
    d_hi: int
    deps: frozenset = frozenset()  # loop variables the value depends on
    value: Any = field(default=None, compare=False, hash=False)

    @property
    def lo(self):
        return self.d_lo

    @property
    def hi(self):
        return self.d_hi

    def vars(self):
        return set(self.deps)

    def __str__(self):
        return f"data:{self.key}"


def _sortkey(a: Atom) -> str:
    return f"{type(a).__name__}:{a}"


class Ix:
    """``const + sum(coef * atom)`` with exact integer coefficients."""

    __slots__ = ("terms", "const", "_hash")

    def __init__(self, terms=None, const: int = 0):
        d: dict = {}
        for a, c in (terms.items() if isinstance(terms, dict) else (terms or ())):
            if c:
                d[a] = d.get(a, 0) + c
        d = {a: c for a, c in d.items() if c}
        extra = _recombine(d)
        self.terms = tuple(sorted(d.items(), key=lambda t: _sortkey(t[0])))
        self.const = int(const) + extra
        self._hash = None

    # -- construction
    @staticmethod
    def of(x) -> "Ix":
        if isinstance(x, Ix):
            return x
        if isinstance(x, Atom):
            return Ix({x: 1})
        return Ix((), int(x))

    @staticmethod
    def var(name: str, extent: int) -> "Ix":
        return Ix({Var(name, extent): 1})

    # -- queries
    @property
    def lo(self) -> int:
        return self.const + sum(c * (a.lo if c > 0 else a.hi) for a, c in self.terms)

    @property
    def hi(self) -> int:
        return self.const + sum(c * (a.hi if c > 0 else a.lo) for a, c in self.terms)

    def is_const(self) -> bool:
        return not self.terms

    def single_atom(self):
        if self.const == 0 and len(self.terms) == 1 and self.terms[0][1] == 1:
            return self.terms[0][0]
        return None

    def vars(self) -> set[str]:
        s: set[str] = set()
        for a, _ in self.terms:
            s |= a.vars()
        return s

    def coef(self, name: str) -> int:
        for a, c in self.terms:
            if isinstance(a, Var) and a.name == name:
                return c
        return 0

    def opaque_vars(self) -> set[str]:
        """Variables that occur inside non-affine atoms."""
        s: set[str] = set()
        for a, _ in self.terms:
            if not isinstance(a, Var):
                s |= a.vars()
        return s

    # -- arithmetic
    def __add__(self, other) -> "Ix":
        o = Ix.of(other)
        d = dict(self.terms)
        for a, c in o.terms:
            d[a] = d.get(a, 0) + c
        return Ix(d, self.const + o.const)

    __radd__ = __add__

    def __neg__(self) -> "Ix":
        return Ix({a: -c for a, c in self.terms}, -self.const)

    def __sub__(self, other) -> "Ix":
        return self + (-Ix.of(other))

    def __rsub__(self, other) -> "Ix":
        return Ix.of(other) - self

    def __mul__(self, k: int) -> "Ix":
        k = int(k)
        return Ix({a: c * k for a, c in self.terms}, self.const * k)

    __rmul__ = __mul__

    def __floordiv__(self, d: int) -> "Ix":
        return floordiv(self, int(d))

    def __mod__(self, d: int) -> "Ix":
        return mod(self, int(d))

    def clamp(self, lo: int, hi: int) -> "Ix":
        if self.lo >= lo and self.hi <= hi:
            return self
        if self.hi <= lo:
            return Ix.of(lo)
        if self.lo >= hi:
            return Ix.of(hi)
        return Ix({Clamp(self, lo, hi): 1})

    def __eq__(self, other):
        return isinstance(other, Ix) and self.terms == other.terms and self.const == other.const

    def __hash__(self):
        if self._hash is None:
            self._hash = hash((self.terms, self.const))
        return self._hash

    def __str__(self):
        parts = [(f"{c}*{a}" if c != 1 else str(a)) for a, c in self.terms]
        if self.const or not parts:
            parts.append(str(self.const))
        return " + ".join(parts)

    __repr__ = __str__


def _gcd_all(vals) -> int:
    g = 0
    for v in vals:
        g = math.gcd(g, abs(int(v)))
    return g


def floordiv(e: Ix, d: int) -> Ix:
    if d <= 0:
        raise ValueError("floordiv by a non-positive constant")
    if d == 1:
        return e
    q = {}
    rest = {}
    for a, c in e.terms:
        if c % d == 0:
            q[a] = c // d
        else:
            rest[a] = c
    q0, r0 = divmod(e.const, d)
    R = Ix(rest, r0)
    if R.lo >= 0 and R.hi < d:
        return Ix(q, q0)
    if R.lo >= d or R.hi < 0:  # shift whole multiples of d out of R's constant
        k = R.lo // d
        if R.lo - k * d >= 0 and R.hi - k * d < d:
            return Ix(q, q0 + k)
    g = _gcd_all([c for _, c in R.terms] + [R.const, d])
    if g > 1:
        R = Ix({a: c // g for a, c in R.terms}, R.const // g)
        d //= g
        if R.lo >= 0 and R.hi < d:
            return Ix(q, q0)
    inner = R.single_atom()
    if isinstance(inner, Div):  # (x // a) // b == x // (a*b)
        return Ix(q, q0) + floordiv(inner.x, inner.d * d)
    split = _split_small(R, d)
    if split is not None:  # (g*B + s) // (g*d') == B // d' when 0 <= s < g
        big, g, _ = split
        return Ix(q, q0) + floordiv(big, d // g)
    return Ix(q, q0) + Ix({Div(R, d): 1})


def _split_small(R: Ix, d: int):
    """R = g*B + s with g | d, g > 1 and 0 <= s < g (s: the smallest-coefficient terms and
    the constant): returns (B, g, s) or None."""
    terms = sorted(R.terms, key=lambda t: -abs(t[1]))
    for k in range(1, len(terms)):
        g = _gcd_all([c for _, c in terms[:k]])
        if g <= 1 or d % g:
            continue
        small = Ix(dict(terms[k:]), R.const)
        if small.lo >= 0 and small.hi < g:
            return Ix({a: c // g for a, c in terms[:k]}), g, small
    return None


def mod(e: Ix, d: int) -> Ix:
    if d <= 0:
        raise ValueError("mod by a non-positive constant")
    if d == 1:
        return Ix.of(0)
    rest = {a: c for a, c in e.terms if c % d}
    R = Ix(rest, e.const % d)
    if R.lo >= 0 and R.hi < d:
        return R
    g = _gcd_all([c for _, c in R.terms] + [R.const, d])
    if g > 1:
        return mod(Ix({a: c // g for a, c in R.terms}, R.const // g), d // g) * g
    inner = R.single_atom()
    if isinstance(inner, Mod) and inner.d % d == 0:
        return mod(inner.x, d)
    split = _split_small(R, d)
    if split is not None:  # (g*B + s) % (g*d') == g*(B % d') + s when 0 <= s < g
        big, g, small = split
        return mod(big, d // g) * g + small
    return Ix({Mod(R, d): 1})


def _recombine(terms: dict) -> int:
    """c*d*(x//d) + c*(x%d) -> c*x, repeatedly (in place); returns the constant it adds."""
    extra = 0
    changed = True
    while changed:
        changed = False
        for a, c in list(terms.items()):
            if not isinstance(a, Mod) or a not in terms:
                continue
            q = floordiv(a.x, a.d)
            qa = q.single_atom()
            if qa is not None and terms.get(qa) == c * a.d:
                del terms[a]
                del terms[qa]
                for b, cb in a.x.terms:
                    terms[b] = terms.get(b, 0) + c * cb
                    if terms[b] == 0:
                        del terms[b]
                extra += c * a.x.const
                changed = True
                break
    return extra


def contiguous_strides(shape) -> tuple[int, ...]:
    strides, acc = [], 1
    for d in reversed(tuple(shape)):
        strides.append(acc)
        acc *= max(int(d), 1)
    return tuple(reversed(strides))


def flat_index(idx, shape) -> Ix:
    return sum((Ix.of(i) * s for i, s in zip(idx, contiguous_strides(shape))), Ix.of(0))


def unflatten(flat: Ix, shape) -> list[Ix]:
    out = []
    for d, s in zip(shape, contiguous_strides(shape)):
        out.append(mod(floordiv(flat, s), d) if d > 0 else Ix.of(0))
    return out
