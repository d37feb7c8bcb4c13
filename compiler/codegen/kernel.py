"""Kernels: a GROUP of graph nodes lowered to one loop nest in LLVM IR.

A kernel computes its group's output by looping over the output's index space and, at each
index, inlining the element computations of the group (each primitive's lowering face, see
``lowering.py``): elementwise ops combine their inputs' elements, movement ops remap the
index (``index.Ix`` expressions), sources compute from the index, reductions run an inner
loop.  Values produced outside the group are read from buffers.  Today the program hands
us groups of one node; the fusion pass hands larger groups to the same code.

Every kernel body is written once as a Python function over a :class:`Ctx` and run twice:

1. in *analysis* mode, where loops create symbolic variables and loads/stores only record
   their address expressions; from these we plan which adjacent loop dimensions can merge
   into one (every access strides them consistently), so elementwise kernels become one
   long contiguous loop that LLVM vectorises to ``<8 x float>``;
2. in *emission* mode with that plan, producing LLVM IR through llvmlite.

Layout of a kernel ``kN`` in the module::

    internal void @kN.body(ptr noalias %buf..., i64 %lo, i64 %hi)  ; outer loop lo..hi
    internal void @kN.task(ptr %bufs, i64 %task)                    ; one chunk of the outer loop
    i32 @kN(ptr %bufs)   ; index checks, then body inline or narch_parallel_for(task)

``bufs`` is the program's array of buffer pointers; slot 0 is the error record (i64[4]):
a failing index check writes ``[check code, offending index, 0, 0]`` and the kernel
returns 1 without reading through the bad index.
"""
from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Callable

import llvmlite.ir as ir

from ..ir import Graph, Node, TensorType
from .index import Clamp, Data, Div, Ix, Mod, Var, flat_index

# ----------------------------------------------------------------------------- types

F32 = ir.FloatType()
F64 = ir.DoubleType()
I1 = ir.IntType(1)
I8 = ir.IntType(8)
I32 = ir.IntType(32)
I64 = ir.IntType(64)
PTR = ir.PointerType()
VOID = ir.VoidType()

FM = ("contract", "nsz")            # default fast-math flags: keep NaN/Inf semantics
FM_REDUCE = ("reassoc", "contract", "nsz")  # only on reduction accumulators

_REG = {"float32": F32, "float64": F64, "int32": I32, "int64": I64, "bool": I1}
_MEM = {"float32": F32, "float64": F64, "int32": I32, "int64": I64, "bool": I8}
ITEMSIZE = {"float32": 4, "float64": 8, "int32": 4, "int64": 8, "bool": 1}

# Elements of work below which a kernel runs on one thread, and the least work per task.
# A 16K-element AdamW update (a 64x256 weight) on two threads: the MLP step measured 2-5 %
# faster in-process A/B against 64K / 16K (4K / 2K: no better than 64K / 16K; the tiny and
# small GPT-2 steps unchanged either way).
PARALLEL_MIN_WORK = 1 << 14
# Column sums split their columns between the tasks, each reading every row: below 32K
# elements one thread does it faster (the MLP's (64, 256) bias gradients with their AdamW
# update: 1.9 -> 1.1 us each, in-process A/B).
PARALLEL_MIN_WORK_OF = {"row-columns": 1 << 15}
PARALLEL_CHUNK = 1 << 13
PARALLEL_MAX_TASKS = 64
# Column sums over many rows (bias gradients) split their rows between the tasks, with a
# partial row per task added up after them (KernelBuilder._column_sums_by_rows).
COLUMN_SUMS_BY_ROWS = True
COLUMN_SUM_TASKS = 8

ERR_SLOT = 0  # bufs[0]: the error record


def reg_type(dtype: str) -> ir.Type:
    return _REG[dtype]


def mem_type(dtype: str) -> ir.Type:
    return _MEM[dtype]


def is_float(dtype: str) -> bool:
    return dtype in ("float32", "float64")


def c64(v: int) -> ir.Constant:
    return ir.Constant(I64, int(v))


def const(dtype: str, value) -> ir.Constant:
    t = reg_type(dtype)
    if dtype == "bool":
        return ir.Constant(I1, 1 if value else 0)
    if is_float(dtype):
        return ir.Constant(t, float(value))
    bits = 32 if dtype == "int32" else 64
    v = int(value) & ((1 << bits) - 1)
    if v >= 1 << (bits - 1):
        v -= 1 << bits
    return ir.Constant(t, v)


def declare(module: ir.Module, name: str, ret: ir.Type, args: list) -> ir.Function:
    """Get or declare a function (intrinsics included) by name."""
    try:
        return module.get_global(name)
    except KeyError:
        return ir.Function(module, ir.FunctionType(ret, args), name=name)


def intrinsic(module: ir.Module, base: str, ty: ir.Type, nargs: int, ret: ir.Type | None = None):
    suffix = {F32: "f32", F64: "f64", I32: "i32", I64: "i64", I8: "i8", I1: "i1"}[ty]
    return declare(module, f"{base}.{suffix}", ret or ty, [ty] * nargs)


@contextmanager
def for_range(b: ir.IRBuilder, lo, hi, name: str, known_nonempty: bool = False):
    """``for (i = lo; i < hi; ++i)`` as a rotated loop; yields the i64 induction variable."""
    lo = c64(lo) if isinstance(lo, int) else lo
    hi = c64(hi) if isinstance(hi, int) else hi
    fn = b.function
    pre = b.block
    body = fn.append_basic_block(name + ".body")
    done = fn.append_basic_block(name + ".done")
    if known_nonempty:
        b.branch(body)
    else:
        b.cbranch(b.icmp_signed("<", lo, hi), body, done)
    b.position_at_end(body)
    iv = b.phi(I64, name=name)
    iv.add_incoming(lo, pre)
    yield iv
    nxt = b.add(iv, c64(1), name=name + ".next", flags=["nuw", "nsw"])
    iv.add_incoming(nxt, b.block)
    b.cbranch(b.icmp_signed("<", nxt, hi), body, done)
    b.position_at_end(done)


class _Alloca(ir.instructions.AllocaInstr):
    """An alloca whose result prints as an opaque ``ptr`` (LLVM 17+ has no typed pointers)."""

    def __init__(self, parent, typ, count, name):
        super().__init__(parent, typ, count, name)
        self.type = PTR


def open_function(fn: ir.Function) -> ir.IRBuilder:
    """Start a function: an ``allocas`` block (closed by :func:`close_function`) and a
    ``start`` block; returns a builder at the start block."""
    fn._alloca_block = fn.append_basic_block("allocas")
    return ir.IRBuilder(fn.append_basic_block("start"))


def close_function(fn: ir.Function) -> None:
    ab = ir.IRBuilder(fn._alloca_block)
    ab.branch(fn.blocks[1])


def alloca(fn: ir.Function, ty: ir.Type, name: str = "") -> ir.Value:
    blk = getattr(fn, "_alloca_block", None)
    if blk is None:
        raise RuntimeError(f"{fn.name}: allocas need open_function()")
    ab = ir.IRBuilder(blk)
    al = _Alloca(blk, ty, None, name)
    ab._insert(al)
    return al


# ----------------------------------------------------------------------------- kernel record


@dataclass
class IndexCheck:
    """A bounds check run before the kernel reads through an index tensor."""
    code: int
    node: Node
    size: int
    axis: int | None = None
    ignore: int | None = None


@dataclass
class Kernel:
    name: str
    nodes: tuple[Node, ...]
    inputs: tuple[str, ...]    # values read from buffers
    outputs: tuple[str, ...]   # values written
    strategy: str              # "map", "reduce-inner", "reduce-outer", "matmul", "scatter", ...
    tasks: int = 1             # parallel chunks (1: runs inline on the calling thread)
    checks: list = field(default_factory=list)
    loops: dict = field(default_factory=dict)  # planned loop spaces: key -> merged extents
    workspace_bytes: int = 0   # scratch the kernel needs in the program's workspace buffer
    buffers: tuple = ()        # values computed and read back inside the kernel (need buffers)
    note: str = ""             # why the kernel looks the way it does (e.g. an unfused group)
    externals: tuple = ()      # (symbol, dtype, threads) of shared functions it calls (the GEMM)
    reuse: tuple = ()          # (output, buffer): the output may be written over the buffer (see
    #                            KernelBuilder._epilogue_reuse)
    same_as: str = ""          # runs the function of this kernel, which is alike but for its
    #                            values' names (``share.kernel_key``); "": its own

    def __str__(self):
        ops = ", ".join(f"%{n.name}={n.op}" for n in self.nodes)
        par = f", {self.tasks} tasks" if self.tasks > 1 else ""
        loops = "; ".join(f"{k}{list(v)}" for k, v in self.loops.items())
        return f"{self.name} [{self.strategy}{par}] {ops}" + (f"  loops {loops}" if loops else "")

    __repr__ = __str__


# ----------------------------------------------------------------------------- the context


class Ctx:
    """What a lowering face sees: loads of group values at an index, index helpers, loops,
    and the IR builder.  In analysis mode nothing is emitted and values are ``None``."""

    def __init__(self, kb: "KernelBuilder", analysis: bool, plan: dict | None = None,
                 builder: ir.IRBuilder | None = None, ptrs: dict | None = None):
        self.kb = kb
        self.module = kb.module
        self.analysis = analysis
        self.plan = plan or {}
        self.b = builder
        self.ptrs = ptrs or {}
        self.vals: dict[str, ir.Value] = {}  # loop variable name -> LLVM value
        # analysis records
        self.accesses: list[Ix] = []
        self.access_names: list[str] = []
        self.uses: list[Ix] = []
        self.cmps: list = []  # (index, op, constant) of undecided range conditions
        self.spaces: dict[str, list[Var]] = {}
        self.space_lohi: dict = {}  # key -> (lo, hi) values for the first merged group
        self._uid = 0

    # -- group structure
    @property
    def graph(self) -> Graph:
        return self.kb.graph

    def type_of(self, name: str) -> TensorType:
        return self.kb.graph.types[name]

    def uid(self, prefix: str) -> str:
        self._uid += 1
        return f"{prefix}{self._uid}"

    # -- values
    def load(self, name: str, idx) -> ir.Value | None:
        """The element of value ``name`` at multi-index ``idx`` (a list of Ix)."""
        idx = [Ix.of(i) for i in idx]
        rv = self.kb.row_values.get(name)
        if rv is not None:  # a row kernel's reduction, already computed for the current row
            # checked in analysis (unmerged loop variables, where equal rows simplify to
            # equal index forms); emission trusts it
            if self.analysis and flat_index(idx, self.type_of(name).shape) != rv[1]:
                raise NotImplementedError(f"%{name} is read at another row than the current one")
            return rv[0]
        if self.kb.is_inline(name):
            scratch = None if self.analysis else self.kb.row_scratch.get(name)
            if scratch is not None:  # a row kernel keeps this member's row: see build_row_kernel
                return scratch.access(self, name, idx)
            node = self.kb.inline[name]
            return self.kb.lowering(node).element(self, node, idx)
        t = self.type_of(name)
        return self.load_flat(name, flat_index(idx, t.shape) if t.shape else Ix.of(0))

    def load_flat(self, name: str, off: Ix) -> ir.Value | None:
        if self.analysis:
            self.accesses.append(off)
            self.access_names.append(name)
            return None
        t = self.type_of(name)
        ptr = self.b.gep(self.ptrs[name], [self.ix(off)], source_etype=mem_type(t.dtype), inbounds=True)
        v = self.b.load(ptr, typ=mem_type(t.dtype), align=ITEMSIZE[t.dtype])
        if t.dtype == "bool":
            v = self.b.icmp_unsigned("!=", v, ir.Constant(I8, 0))
        return v

    def store_flat(self, name: str, off: Ix, value: ir.Value | None) -> None:
        if self.analysis:
            self.accesses.append(off)
            self.access_names.append(name)
            return
        t = self.type_of(name)
        if t.dtype == "bool":
            value = self.b.zext(value, I8)
        ptr = self.b.gep(self.ptrs[name], [self.ix(off)], source_etype=mem_type(t.dtype), inbounds=True)
        self.b.store(value, ptr, align=ITEMSIZE[t.dtype])

    def use(self, e: Ix) -> None:
        """Record a non-address use of an index expression (it blocks merging its loops)."""
        if self.analysis:
            self.uses.append(Ix.of(e))

    def ix(self, e) -> ir.Value:
        """Emit an index expression as an i64 value."""
        e = Ix.of(e)
        b = self.b
        acc = None
        for atom, c in e.terms:
            v = self._atom(atom)
            if c != 1:
                v = b.mul(v, c64(c))
            acc = v if acc is None else b.add(acc, v)
        if acc is None:
            return c64(e.const)
        if e.const:
            acc = b.add(acc, c64(e.const))
        return acc

    def _atom(self, a) -> ir.Value:
        b = self.b
        if isinstance(a, Var):
            return self.vals[a.name]
        if isinstance(a, Data):
            return a.value
        if isinstance(a, Div):
            x = self.ix(a.x)
            if a.x.lo >= 0:
                return b.udiv(x, c64(a.d))
            q = b.sdiv(x, c64(a.d))  # floor for negatives: q - (r < 0)
            r = b.srem(x, c64(a.d))
            return b.sub(q, b.zext(b.icmp_signed("<", r, c64(0)), I64))
        if isinstance(a, Mod):
            x = self.ix(a.x)
            if a.x.lo >= 0:
                return b.urem(x, c64(a.d))
            r = b.srem(x, c64(a.d))
            return b.add(r, b.select(b.icmp_signed("<", r, c64(0)), c64(a.d), c64(0)))
        if isinstance(a, Clamp):
            x = self.ix(a.x)
            x = b.select(b.icmp_signed("<", x, c64(a.c_lo)), c64(a.c_lo), x)
            return b.select(b.icmp_signed(">", x, c64(a.c_hi)), c64(a.c_hi), x)
        raise TypeError(f"unknown index atom {a!r}")

    def data_index(self, key: str, value: ir.Value | None, lo: int, hi: int, deps=()) -> Ix:
        """Wrap a runtime index value (already bounds-checked) as an index atom."""
        if value is not None and value.type != I64:
            value = self.b.sext(value, I64)
        return Ix({Data(key, lo, hi, frozenset(deps), value): 1})

    # -- conditions (Python bools when the ranges decide them)
    def cmp(self, op: str, e, k: int):
        e = Ix.of(e)
        lo, hi = e.lo, e.hi
        decided = {"<": (hi < k, lo >= k), "<=": (hi <= k, lo > k), ">=": (lo >= k, hi < k),
                   ">": (lo > k, hi <= k), "==": (lo == hi == k, k < lo or k > hi)}[op]
        if decided[0]:
            return True
        if decided[1]:
            return False
        self.use(e)
        if self.analysis:
            self.cmps.append((e, op, k))
            return None
        return self.b.icmp_signed(op, self.ix(e), c64(k))

    def divisible(self, e, d: int):
        e = Ix.of(e)
        if d == 1:
            return True
        return self.cmp("==", e % d, 0)

    def all_(self, *conds):
        out = True
        for c in conds:
            if c is False:
                return False
            if c is True:
                continue
            if self.analysis or c is None:
                out = None
                continue
            out = c if out is True else self.b.and_(out, c)
        return out

    def select(self, cond, a, b):
        if cond is True:
            return a
        if cond is False:
            return b
        if self.analysis:
            return None
        return self.b.select(cond, a, b)

    # -- loops
    @contextmanager
    def loops(self, key: str, extents, lohi=None):
        """Nested loops over ``extents`` (merged per the plan); yields one Ix per dimension.
        ``lohi``: (lo, hi) LLVM values bounding the first merged loop (parallel chunks)."""
        extents = [int(e) for e in extents]
        assert all(e > 0 for e in extents), f"loops over an empty space {key}{extents}"
        if self.analysis:
            vs = [Var(f"{key}#{d}", e) for d, e in enumerate(extents)]
            self.spaces[key] = vs
            yield [Ix({v: 1}) if e > 1 else Ix.of(0) for v, e in zip(vs, extents)]
            return
        groups = self.plan.get(key)
        if groups is None:
            groups = [[d] for d, e in enumerate(extents) if e > 1]
        tile = self.plan.get(TILES, {}).get(key)
        idx = [Ix.of(0)] * len(extents)
        with ExitStack() as stack:
            for g, dims in enumerate(groups):
                self._group_loop(stack, key, g, dims, extents, lohi, idx, tile if g == len(groups) - 1 else None)
            yield idx

    def _group_loop(self, stack, key, g, dims, extents, lohi, idx, tile=None) -> None:
        """Open the loop over merged group ``g`` of ``key`` (bounded by ``lohi`` if it is the
        first, tiled by ``tile`` if given) and set ``idx`` of its dims."""
        total = math.prod(extents[d] for d in dims)
        name = f"{key}@{g}"
        lo, hi = lohi if (g == 0 and lohi is not None) else (c64(0), c64(total))
        if tile:
            V = self._tiled_loops(stack, lo, hi, name, tile, total, 0, g > 0 or lohi is None)
        else:
            iv = stack.enter_context(self.for_range(lo, hi, name, known_nonempty=(g > 0 or lohi is None)))
            self.vals[name] = iv
            V = Ix({Var(name, total): 1})
        inner = total
        for d in dims:
            inner //= extents[d]
            idx[d] = (V // inner) % extents[d]

    def loops_each(self, key: str, extents, lohi, body) -> None:
        """``with loops(...) as idx: body(idx)``, except that when the plan splits the
        innermost loop (at the bounds of pad / concat / slice conditions on its variable,
        ``make_plan``) it becomes one loop per piece, ``body`` emitted in each with the
        variable's range narrowed, so those conditions are decided at compile time and the
        piece's loop has no selects (it vectorises)."""
        points = None if self.analysis else self.plan.get(SPLITS, {}).get(key)
        if not points:
            with self.loops(key, extents, lohi) as idx:
                body(idx)
            return
        extents = [int(e) for e in extents]
        groups = self.plan[key]
        (d_last,) = groups[-1]
        idx = [Ix.of(0)] * len(extents)
        with ExitStack() as stack:
            for g, dims in enumerate(groups[:-1]):
                self._group_loop(stack, key, g, dims, extents, lohi, idx)
            n = extents[d_last]
            cuts = [0] + list(points) + [n]
            for j, (a, b) in enumerate(zip(cuts, cuts[1:])):
                name = f"{key}@{len(groups) - 1}.{j}"
                if len(groups) == 1 and lohi is not None:  # the parallel chunk, clipped to the piece
                    lo = self.b.select(self.b.icmp_signed(">", lohi[0], c64(a)), lohi[0], c64(a))
                    hi = self.b.select(self.b.icmp_signed("<", lohi[1], c64(b)), lohi[1], c64(b))
                else:
                    lo, hi = c64(a), c64(b)
                tile = self.plan.get(TILES, {}).get(key)
                if tile:
                    with ExitStack() as inner_stack:
                        piece = list(idx)
                        piece[d_last] = self._tiled_loops(inner_stack, lo, hi, name, tile, b - a, a,
                                                          not (len(groups) == 1 and lohi is not None))
                        body(piece)
                    continue
                with self.for_range(lo, hi, name, known_nonempty=not (len(groups) == 1 and lohi is not None)) as iv:
                    self.vals[name] = self.b.sub(iv, c64(a))
                    piece = list(idx)
                    piece[d_last] = Ix({Var(name, b - a): 1}, a)
                    body(piece)

    def for_range(self, lo, hi, name: str, known_nonempty: bool = False):
        return for_range(self.b, lo, hi, name, known_nonempty)

    def _tiled_loops(self, stack, lo, hi, name, t, total, base, known_nonempty) -> Ix:
        """The loop over [lo, hi) (multiples of ``t``; ``total`` iterations from ``base``)
        as an outer loop over tiles and an inner one over a tile: returns the index
        ``base + t * outer + inner``, whose ``// t`` and ``% t`` are loop variables."""
        b = self.b
        o = stack.enter_context(self.for_range(b.udiv(lo, c64(t)), b.udiv(hi, c64(t)), name + ".o",
                                               known_nonempty=known_nonempty))
        self.vals[name + ".o"] = b.sub(o, c64(base // t)) if base else o
        i = stack.enter_context(self.for_range(c64(0), c64(t), name + ".i", known_nonempty=True))
        self.vals[name + ".i"] = i
        return Ix({Var(name + ".o", total // t): t, Var(name + ".i", t): 1}, base)

    def alloca(self, ty: ir.Type, name: str = "") -> ir.Value:
        """A stack slot in the function's alloca block (promoted to registers by LLVM)."""
        return alloca(self.b.function, ty, name)

    # -- math
    def math(self, name: str, dtype: str, *args) -> ir.Value:
        from . import mathlib
        fn = mathlib.get(self.module, name, dtype)
        return self.b.call(fn, list(args), fastmath=FM)

    def call_intrinsic(self, base: str, dtype_or_ty, *args, flags=()):
        ty = dtype_or_ty if isinstance(dtype_or_ty, ir.Type) else reg_type(dtype_or_ty)
        fn = intrinsic(self.module, base, ty, len(args))
        return self.b.call(fn, list(args), fastmath=flags)


# ----------------------------------------------------------------------------- plans


def make_plan(ctx: Ctx) -> tuple[dict, dict]:
    """From an analysis run: which adjacent loop dims merge, per loop space.

    Dims ``k`` and ``k+1`` (both of extent > 1) merge when every recorded address strides
    them consistently (coef[k] == coef[k+1] * extent[k+1]) and neither variable is used
    non-affinely (inside a division, a clamp, a condition or a value)."""
    blocked: set[str] = set()
    for e in ctx.uses:
        blocked |= e.vars()
    for e in ctx.accesses:
        blocked |= e.opaque_vars()
    plan, extents = {}, {}
    for key, vs in ctx.spaces.items():
        live = [d for d, v in enumerate(vs) if v.extent > 1]
        groups: list[list[int]] = []
        for d in live:
            if groups:
                prev = groups[-1][-1]
                u, w = vs[prev], vs[d]
                ok = (prev == d - 1 or all(vs[k].extent == 1 for k in range(prev + 1, d)))
                ok = ok and u.name not in blocked and w.name not in blocked
                if ok:
                    for e in ctx.accesses:
                        if e.coef(u.name) != e.coef(w.name) * w.extent:
                            ok = False
                            break
                if ok:
                    groups[-1].append(d)
                    continue
            groups.append([d])
        plan[key] = groups
        extents[key] = [math.prod(vs[d].extent for d in g) for g in groups]
    # split points of innermost loops: where a range condition on the variable flips
    def innermost():  # (loop key, the variable of its innermost loop) where that loop is one dim
        for key, vs in ctx.spaces.items():
            groups = plan[key]
            if groups and len(groups[-1]) == 1:
                yield key, vs[groups[-1][0]]

    splits = {}
    for key, v in innermost():
        points = set()
        for e, op, k in ctx.cmps:
            if len(e.terms) == 1 and e.terms[0][1] == 1 and isinstance(e.terms[0][0], Var) \
                    and e.terms[0][0].name == v.name:
                b = k - e.const
                for p in {"<": (b,), ">=": (b,), "<=": (b + 1,), ">": (b + 1,), "==": (b, b + 1)}[op]:
                    if 0 < p < v.extent:
                        points.add(p)
        if points and len(points) <= MAX_LOOP_PIECES - 1:
            splits[key] = sorted(points)
    plan[SPLITS] = splits
    # innermost loops whose variable is only read as v // d and v % d (a head dim merged
    # into a feature dim): tiled by d, so both are loop variables and the inner loop is
    # contiguous (it vectorises)
    tiles = {}
    for key, v in innermost():
        ds = {d for e in ctx.accesses for d in _divisors_of(e, v.name)}
        ds = [d for d in ds if TILE_MIN <= d < v.extent and v.extent % d == 0
              and all(p % d == 0 for p in splits.get(key, ()))]
        if ds:
            tiles[key] = max(ds)
    plan[TILES] = tiles
    return plan, extents


def _divisors_of(e: Ix, name: str):
    """The d of every ``x // d`` or ``x % d`` in ``e`` (at any depth) where x is loop variable
    ``name`` plus a multiple of d, possibly clamped to whole tiles of d (a pad's masked
    address, which the loop's split at the pad bounds turns back into ``v + k*d``)."""
    for atom, _ in e.terms:
        if isinstance(atom, (Div, Mod)):
            if _is_tile_aligned(atom.x, name, atom.d):
                yield atom.d
            else:
                yield from _divisors_of(atom.x, name)
        elif isinstance(atom, Clamp):
            yield from _divisors_of(atom.x, name)


def _is_tile_aligned(x: Ix, name: str, d: int) -> bool:
    if len(x.terms) != 1 or x.terms[0][1] != 1:
        return False
    atom = x.terms[0][0]
    if isinstance(atom, Var):
        return atom.name == name and x.const % d == 0
    if isinstance(atom, Clamp) and x.const % d == 0 and atom.c_lo % d == 0 and (atom.c_hi + 1) % d == 0:
        return _is_tile_aligned(atom.x, name, d)
    return False


SPLITS = "__splits__"     # plan entry: loop key -> split points of its innermost loop
MAX_LOOP_PIECES = 8
TILES = "__tiles__"       # plan entry: loop key -> tile of its innermost loop (v // t, v % t)
TILE_MIN = 8              # smaller tiles would leave the vectoriser too short an inner loop


# ----------------------------------------------------------------------------- builder


def merged_inputs(stages) -> tuple:
    """What a kernel made of ``stages`` (run in order) reads from outside: every stage's
    inputs except values an earlier stage wrote."""
    written: set = set()
    out: list = []
    for st in stages:
        for v in st.inputs:
            if v not in written and v not in out:
                out.append(v)
        written |= set(st.outputs) | set(st.buffers)
    return tuple(out)


@dataclass
class GroupSpec:
    """What one kernel computes (the contract with the fusion pass).

    kind: ``node`` (one node, its own strategy), ``loop`` (elementwise/remap members over
    one domain), ``reduce`` (a row kernel: reductions over the same axes of ``domain`` with
    their producers, row-level consumers, full-domain consumers and grand totals),
    ``matmul`` (a matmul, then its elementwise epilogue), ``guard`` (index checks only).
    members: nodes this kernel computes, in topological order; inlined: nodes recomputed
    wherever a member reads them (sources, index remaps, guards); outputs: values written
    to buffers (read by other kernels or returned)."""

    kind: str
    members: tuple
    inlined: tuple = ()
    outputs: tuple = ()
    domain: tuple = ()
    axes: tuple = ()

    @staticmethod
    def single(node: Node) -> "GroupSpec":
        return GroupSpec("node", (node,), (), (node.name,), tuple(node.type.shape))


_last_order: tuple = (None, None)  # (graph, order) of the graph built last


def _value_order(graph: Graph) -> dict:
    """Position of every value (inputs, then nodes) in the graph, computed once per graph
    (by identity: a Graph hashes by value, which costs a walk over all its nodes)."""
    global _last_order
    g, order = _last_order  # one tuple read: safe if another thread builds another graph
    if g is not graph:
        order = {n: k for k, n in enumerate(graph.input_names)}
        order.update({n.name: len(order) + k for k, n in enumerate(graph.nodes)})
        _last_order = (graph, order)
    return order


ROW_SCRATCH_MAX = 8192  # elements of one row a row kernel keeps on the stack per member


class RowScratch:
    """One row of a row kernel's member, kept on the stack (``ptr``, the row's elements over
    the reduced axes).  While the reduction reading the member runs (``filling``), each
    element is computed as usual and also stored; afterwards the full outputs read it back
    instead of computing it again (a softmax's exp: once for the sum, not again for the
    output)."""

    def __init__(self, ptr, axes, domain, dtype):
        self.ptr, self.axes, self.domain, self.dtype = ptr, tuple(axes), tuple(domain), dtype
        self.filling = False
        self.filled = False

    def offset(self, ctx, idx) -> ir.Value:
        return ctx.ix(flat_index([idx[d] for d in self.axes], [self.domain[d] for d in self.axes]))

    def access(self, ctx, name, idx):
        b = ctx.b
        if self.filled:
            p = b.gep(self.ptr, [self.offset(ctx, idx)], source_etype=mem_type(self.dtype), inbounds=True)
            return b.load(p, typ=mem_type(self.dtype))
        node = ctx.kb.inline[name]
        v = ctx.kb.lowering(node).element(ctx, node, idx)
        if self.filling:
            p = b.gep(self.ptr, [self.offset(ctx, idx)], source_etype=mem_type(self.dtype), inbounds=True)
            b.store(v, p)
        return v


class KernelBuilder:
    """Emits one kernel for a group of nodes into a module."""

    def __init__(self, module: ir.Module, graph: Graph, group, name: str,
                 add_check: Callable | None = None, options: dict | None = None):
        if not isinstance(group, GroupSpec):  # a plain sequence of nodes: the last is the output
            nodes = tuple(group)
            group = GroupSpec("node", nodes[-1:], nodes[:-1], (nodes[-1].name,), nodes[-1].type.shape) \
                if len(nodes) == 1 else GroupSpec("auto", nodes, (), (nodes[-1].name,))
        self.module = module
        self.graph = graph
        self.spec = group
        self.name = name
        self.options = options or {}
        self.nodes = tuple(group.members)
        self.root = self.nodes[-1]
        self.outputs = tuple(group.outputs) or (self.root.name,)
        self.inline = {n.name: n for n in tuple(group.inlined) + self.nodes}
        self.checks: list = []
        self._check_specs: dict[str, tuple] = {}
        self._register_check = add_check or (lambda info: len(self.checks) + 1)
        self.row_values: dict[str, tuple] = {}  # row kernels: value -> (LLVM value, row index)
        self.row_scratch: dict[str, RowScratch] = {}  # row kernels: members whose row is kept
        self.buffered: set[str] = set()          # values read from buffers even though computed here
        self.workspace_bytes = 0

    def lowering(self, node: Node):
        from ..ops.registry import get
        low = get(node.op).lowering
        if low is None:
            raise NotImplementedError(f"no lowering for primitive {node.op!r}")
        return low

    def add_check(self, node, idx_name, size, axis, ignore):
        if node.name not in self._check_specs:
            self._check_specs[node.name] = (node, idx_name, size, axis, ignore)

    def is_inline(self, name: str) -> bool:
        return name in self.inline and name not in self.buffered

    def external_inputs(self) -> list[str]:
        """Values this kernel reads from buffers."""
        names: list[str] = []
        seen: set[str] = set()
        stack = [i for n in self.nodes for i in reversed(n.inputs)]
        for n in self.nodes:
            if n.name in self.buffered and n.name not in names:
                names.append(n.name)
        while stack:
            i = stack.pop()
            if i in seen:
                continue
            seen.add(i)
            if self.is_inline(i):
                stack.extend(reversed(self.inline[i].inputs))
            elif i not in names:
                names.append(i)
        order = _value_order(self.graph)
        return sorted(names, key=lambda v: order.get(v, -1))

    def build(self) -> Kernel:
        # index checks come first: they run before any read
        for n in self.nodes + tuple(x for x in self.spec.inlined if x.op != "check_index"):
            reg = getattr(self.lowering(n), "index_checks", None)
            if reg is not None:
                for idx_name, size, axis, ignore in reg(self.graph, n):
                    self.add_check(n, idx_name, size, axis, ignore)
        kind = self.spec.kind
        if kind == "guard":
            return self.finish(None, "guard", 0, None)
        if kind in ("node", "opaque", "auto") and (len(self.nodes) == 1 or kind == "auto"):
            custom = getattr(self.lowering(self.root), "kernel", None)
            if custom is not None and len(self.nodes) == 1:
                return custom(self)
            return self.build_node_kernel()
        if kind == "reduce":
            return self.build_row_kernel()
        if kind == "matmul":
            return self.build_matmul_kernel()
        return self.build_map_kernel()

    # -- one node: map, or a reduction with its best loop order
    def build_node_kernel(self) -> Kernel:
        root = self.root
        low = self.lowering(root)
        if getattr(low, "is_reduction", False):
            body, strategy, work, e0_key = self._reduction_body()
            return self.finish(body, strategy, work, e0_key)
        return self.build_map_kernel()

    # -- loop kernels: every output over its own shape, members inlined
    def build_map_kernel(self) -> Kernel:
        by_shape: dict[tuple, list[str]] = {}
        for o in self.outputs:
            by_shape.setdefault(tuple(self.graph.types[o].shape), []).append(o)
        shapes = list(by_shape)
        main = max(shapes, key=lambda sh: math.prod(sh))

        def first_extent(ctx, key, sh):  # the extent of the loop a task's (lo, hi) bounds
            groups = ctx.plan.get(key) or [[d] for d, e in enumerate(sh) if e > 1]
            return math.prod(sh[d] for d in groups[0]) if groups else 1

        def body(ctx, lohi=None):
            for k, sh in enumerate([main] + [x for x in shapes if x != main]):
                if math.prod(sh) == 0:
                    continue
                key = "out" if sh == main else f"out{k}"
                part = lohi
                if lohi is not None and sh != main:
                    # a task runs the same fraction of every loop: (lo, hi) scaled from the
                    # main loop's first extent to this one's (consecutive tasks meet exactly)
                    n0, n1 = first_extent(ctx, "out", main), first_extent(ctx, key, sh)
                    part = tuple(ctx.b.udiv(ctx.b.mul(v, c64(n1)), c64(n0)) for v in lohi)
                def element(idx, sh=sh):
                    # every output of the element first, then the stores: an output may be
                    # written over an input in place (Program's ``inplace``)
                    vals = [(o, self._element(ctx, o, idx)) for o in by_shape[sh]]
                    for o, v in vals:
                        ctx.store_flat(o, flat_index(idx, sh), v)
                ctx.loops_each(key, sh, part, element)
        work = sum(math.prod(sh) for sh in shapes)
        return self.finish(body, "map" if len(self.nodes) == 1 else "loop", work, "out",
                           size=math.prod(main))

    def _element(self, ctx, name: str, idx):
        scratch = None if ctx.analysis else self.row_scratch.get(name)
        if scratch is not None:
            return scratch.access(ctx, name, idx)
        node = self.inline[name]
        return self.lowering(node).element(ctx, node, idx)

    # -- row kernels
    def build_row_kernel(self) -> Kernel:
        g = self.graph
        domain = tuple(self.spec.domain)
        axes = tuple(self.spec.axes)
        kept = [d for d in range(len(domain)) if d not in axes]
        red_shape_k = tuple(1 if d in axes else n for d, n in enumerate(domain))
        red_shape = tuple(n for d, n in enumerate(domain) if d not in axes)
        types = g.types

        def level(name):
            sh = tuple(types[name].shape)
            if sh == domain:
                return "full"
            if sh in (red_shape_k, red_shape):
                return "row"
            if all(d == 1 for d in sh):
                return "total"
            raise NotImplementedError(f"{self.name}: %{name} of shape {sh} does not fit a row kernel "
                                      f"over {domain} axes {axes}")

        reductions = [n for n in self.nodes if getattr(self.lowering(n), "is_reduction", False)]
        row_reds = [n for n in reductions if level(n.name) != "total" or
                    tuple(types[n.inputs[0]].shape) == domain]
        totals = [n for n in reductions if n not in row_reds]
        outs = {lv: [o for o in self.outputs if level(o) == lv] for lv in ("full", "row", "total")}

        def row_index(name, ridx):
            sh = tuple(types[name].shape)
            if sh == red_shape and len(sh) == len(kept) and (sh != red_shape_k or len(kept) == len(domain)):
                return list(ridx)
            if sh == red_shape_k:
                it = iter(ridx)
                return [Ix.of(0) if d in axes else next(it) for d in range(len(domain))]
            return list(ridx)

        trail = []
        for d in reversed(range(len(domain))):
            if d in axes:
                break
            trail.insert(0, d)
        if (trail and math.prod(domain[d] for d in trail) >= 8 and not totals and row_reds
                and not self.options.get("no_column_kernels")):
            return self._column_row_kernel(domain, axes, kept, trail, row_reds, outs, row_index)

        members = {n.name: n for n in self.nodes}
        cone = self._cone

        # a full-domain member that a reduction reads and the full outputs read again (a
        # softmax's exp) is kept for the row while the reduction computes it, not recomputed
        row_len = math.prod(domain[d] for d in axes)
        out_cone = cone(outs["full"])
        # (not when an output is written over an input (Program's ``inplace``): an output read
        # back from the stack row is not computed from the input's loads, so under ``noalias``
        # LLVM may load the input for another output after storing it)
        in_place = set(self.options.get("inplace") or ()) & set(self.outputs)
        kept_rows = [] if not outs["full"] or in_place or not 0 < row_len <= ROW_SCRATCH_MAX else list(dict.fromkeys(
            x for r in row_reds for x in r.inputs
            if x in members and tuple(types[x].shape) == domain and x in out_cone
            and types[x].dtype in ("float32", "float64")))

        def row_pass(ctx, key, ridx, reds, do_outputs, do_totals, tot_acc):
            scratch = {}
            if do_outputs and not ctx.analysis:  # one stack row per kept member (emitted once)
                for x in kept_rows:
                    ptr = ctx.alloca(ir.ArrayType(mem_type(types[x].dtype), row_len), "row")
                    scratch[x] = RowScratch(ptr, axes, domain, types[x].dtype)
            self.row_scratch = scratch
            for r in reds:
                ri = row_index(r.name, ridx)
                fill = [scratch[x] for x in r.inputs if x in scratch and not scratch[x].filled]
                for sc in fill:
                    sc.filling = True
                v = self.lowering(r).element(ctx, r, ri)
                for sc in fill:
                    sc.filling, sc.filled = False, True
                self.row_values[r.name] = (v, flat_index(ri, types[r.name].shape))
            for t in (totals if do_totals is True else do_totals or ()):
                (x,) = t.inputs
                v = ctx.load(x, row_index(x, ridx))
                if not ctx.analysis:
                    a = ctx.b.load(tot_acc[t.name], typ=reg_type(t.type.dtype))
                    ctx.b.store(self.lowering(t).combine(ctx, t, a, v), tot_acc[t.name])
            if not do_outputs:
                return
            vals = []
            for o in outs["row"]:
                ri = row_index(o, ridx)
                vals.append((o, flat_index(ri, types[o].shape), self._row_or_element(ctx, o, ri)))
            for o, off, v in vals:
                ctx.store_flat(o, off, v)
            if outs["full"] and math.prod(domain[d] for d in axes):
                with ctx.loops(f"{key}.full", [domain[d] for d in axes]) as fidx:
                    full = [None] * len(domain)
                    it_r, it_f = iter(ridx), iter(fidx)
                    for d in range(len(domain)):
                        full[d] = next(it_f) if d in axes else next(it_r)
                    vals = [(o, self._element(ctx, o, full)) for o in outs["full"]]
                    for o, v in vals:
                        ctx.store_flat(o, flat_index(full, domain), v)
            self.row_scratch = {}

        row_ext = [domain[d] for d in kept]
        nrows = math.prod(row_ext)
        if totals:
            return self._row_kernel_with_totals(domain, axes, row_reds, totals, outs, cone, row_pass, row_ext)

        def body(ctx, lohi=None):  # no grand totals: the rows are independent
            self.row_values.clear()
            if nrows:
                with ctx.loops("row", row_ext, lohi) as ridx:
                    row_pass(ctx, "row", ridx, row_reds, True, False, {})
                self.row_values.clear()
            for o in outs["total"]:
                zero = [Ix.of(0)] * len(types[o].shape)
                ctx.store_flat(o, Ix.of(0), self._row_or_element(ctx, o, zero))
            self.row_values.clear()

        work = math.prod(domain) * max(1, len(row_reds))
        size = max([types[o].size for o in self.outputs] + [0])
        return self.finish(body, "row", work, "row", size=size)

    def _row_kernel_with_totals(self, domain, axes, row_reds, totals, outs, cone, row_pass, row_ext) -> Kernel:
        """A row kernel that also accumulates grand totals (a mean loss), its rows split over
        tasks like any row kernel's:

        1. the kernel first computes, alone, the totals the rows need (a cross-entropy
           gradient divides by the count of counted targets), over the rows those need;
        2. the tasks run the rows with those totals known, each accumulating the other
           totals (the loss sum) over its own rows into its own workspace slots;
        3. the kernel adds the tasks' partial totals up in task order (the same sum every
           run) and stores the total outputs.

        Workspace: one 8-byte slot per total of step 1, then one per other total per task."""
        types = self.graph.types
        total_names = {t.name for t in totals}
        non_total = [o for o in self.outputs if o not in outs["total"]]
        needed_names = (cone(non_total) | cone([i for r in row_reds for i in r.inputs])) & total_names
        needed = [t for t in totals if t.name in needed_names]
        late = [t for t in totals if t.name not in needed_names]
        if needed and any(cone(t.inputs) & total_names for t in totals):
            raise NotImplementedError(f"{self.name}: a grand total depends on another grand total")
        for_needed = cone(needed_names) - total_names
        nrows = math.prod(row_ext)
        zero_i = Ix.of(0)

        def slot(ctx, k):  # the k-th 8-byte workspace slot
            return ctx.b.gep(ctx.ptrs["__workspace__"], [c64(8 * k)], source_etype=I8)

        def accumulators(ctx, ts):
            acc = {}
            for t in ts:
                if not ctx.analysis:
                    acc[t.name] = ctx.alloca(reg_type(t.type.dtype), "total")
                    ctx.b.store(self.lowering(t).init(ctx, t), acc[t.name])
            return acc

        def value(ctx, ptr, t):
            return None if ctx.analysis else ctx.b.load(ptr, typ=reg_type(t.type.dtype))

        def load_needed(ctx):
            for k, t in enumerate(needed):
                self.row_values[t.name] = (value(ctx, None if ctx.analysis else slot(ctx, k), t), zero_i)

        def pre(ctx):  # step 1, in the kernel before the tasks
            if not needed:
                return
            acc = accumulators(ctx, needed)
            self.row_values.clear()
            if nrows:
                with ctx.loops("rowA", row_ext) as ridx:
                    row_pass(ctx, "rowA", ridx, [r for r in row_reds if r.name in for_needed], False, needed, acc)
                    for r in row_reds:
                        self.row_values.pop(r.name, None)
            if not ctx.analysis:
                for k, t in enumerate(needed):
                    ctx.b.store(value(ctx, acc[t.name], t), slot(ctx, k))
            self.row_values.clear()

        def body(ctx, lohi=None):  # step 2, one task's rows
            acc = accumulators(ctx, late)
            self.row_values.clear()
            load_needed(ctx)
            if nrows:
                with ctx.loops("row", row_ext, lohi) as ridx:
                    row_pass(ctx, "row", ridx, row_reds, True, late, acc)
                    for r in row_reds:
                        self.row_values.pop(r.name, None)
            if late and not ctx.analysis:
                task = ctx.b.udiv(lohi[0], c64(self.task_chunk)) if lohi is not None else c64(0)
                for j, t in enumerate(late):
                    k = ctx.b.add(c64(len(needed) + j), ctx.b.mul(task, c64(len(late))))
                    p = ctx.b.gep(ctx.ptrs["__workspace__"], [ctx.b.mul(k, c64(8))], source_etype=I8)
                    ctx.b.store(value(ctx, acc[t.name], t), p)
            self.row_values.clear()

        def post(ctx):  # step 3, in the kernel after the tasks
            self.row_values.clear()
            load_needed(ctx)
            for j, t in enumerate(late):
                if ctx.analysis:
                    self.row_values[t.name] = (None, zero_i)
                    continue
                v = self.lowering(t).init(ctx, t)
                for task in range(self.task_count):
                    part = value(ctx, slot(ctx, len(needed) + task * len(late) + j), t)
                    v = self.lowering(t).combine(ctx, t, v, part)
                self.row_values[t.name] = (v, zero_i)
            for o in outs["total"]:
                zero = [zero_i] * len(types[o].shape)
                ctx.store_flat(o, zero_i, self._row_or_element(ctx, o, zero))
            self.row_values.clear()

        work = math.prod(domain) * max(1, len(row_reds))
        size = max([types[o].size for o in self.outputs] + [0])

        def workspace(tasks):
            return 8 * (len(needed) + len(late) * tasks)
        return self.finish(body, "row", work, "row", size=size, pre=pre, post=post, workspace=workspace)

    def _cone(self, names) -> set:
        """The values ``names`` depend on within this kernel (members, totals, inlined)."""
        seen, stack = set(), list(names)
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            if v in self.inline:
                stack.extend(self.inline[v].inputs)
        return seen

    def _column_row_kernel(self, domain, axes, kept, trail, row_reds, outs, row_index):
        """A row kernel whose innermost domain dims are kept (e.g. sums over the batch): each
        reduction accumulates whole rows of its buffer, reduced dims outside, the kept
        trailing dims innermost (contiguous, vectorised); later members read the row values
        back from those buffers."""
        types = self.graph.types
        outer = [d for d in kept if d not in trail]
        # every loop over the trailing kept dims is ONE loop space: one merge plan, so the
        # parallel chunk bounds (in units of its first merged dim) mean the same in each
        TRAIL = "T"
        red = [d for d in range(len(domain)) if d in axes]
        for r in row_reds:
            self.buffered.add(r.name)
        extra = tuple(r.name for r in row_reds if r.name not in self.outputs)

        def compose(parts):
            full = [None] * len(domain)
            for dims, ids in parts:
                for d, i in zip(dims, ids):
                    full[d] = i
            return full

        # the split runs every reduction in one pass over the rows and stores them only after
        # the tasks: a reduction computed from another (a variance from its mean) would read
        # the other's buffer before it is written, so such kernels run one pass per reduction
        dependent = bool(self._cone([r.inputs[0] for r in row_reds]) & {r.name for r in row_reds})
        if COLUMN_SUMS_BY_ROWS and not outer and not outs["full"] and math.prod(domain[d] for d in red) \
                and math.prod(domain) * len(row_reds) >= PARALLEL_MIN_WORK_OF["row-columns"] \
                and not self.options.get("serial") and not dependent:
            return self._column_sums_by_rows(domain, red, trail, row_reds, outs, row_index, compose, extra)

        # full-domain outputs that need no row value (dqkv, written beside its column sums):
        # stored in the last reduction's pass over the rows instead of a pass of their own.
        # The last: an output written over an input in place (Program's ``inplace``) must not
        # be stored before a later pass reads that input
        row_names = {r.name for r in row_reds} | set(outs["row"])
        with_last = bool(outs["full"]) and not (self._cone(outs["full"]) & row_names)

        def body(ctx, lohi=None):
            with ctx.loops("P", [domain[d] for d in outer], lohi if outer else None) as pidx:
                tl = None if outer else lohi
                for j, r in enumerate(row_reds):
                    low = self.lowering(r)
                    (x,) = r.inputs
                    with ctx.loops(TRAIL, [domain[d] for d in trail], tl) as tidx:
                        ri = row_index(r.name, [f for f in compose([(outer, pidx), (trail, tidx)]) if f is not None])
                        ctx.store_flat(r.name, flat_index(ri, types[r.name].shape), low.init(ctx, r))
                    if math.prod(domain[d] for d in red):
                        with ctx.loops(f"R.{r.name}", [domain[d] for d in red]) as ridx:
                            def accumulate(tidx, r=r, low=low, x=x, ridx=ridx, last=j == len(row_reds) - 1):
                                full = compose([(outer, pidx), (red, ridx), (trail, tidx)])
                                ri = row_index(r.name, [full[d] for d in kept])
                                off = flat_index(ri, types[r.name].shape)
                                acc = ctx.load_flat(r.name, off)
                                v = ctx.load(x, full)
                                vals = [(o, self._element(ctx, o, full)) for o in outs["full"]] \
                                    if last and with_last else []
                                ctx.store_flat(r.name, off, low.combine(ctx, r, acc, v, reduce=False))
                                for o, w in vals:
                                    ctx.store_flat(o, flat_index(full, domain), w)
                            ctx.loops_each(TRAIL, [domain[d] for d in trail], tl, accumulate)
                rest = [o for o in outs["row"] if o not in {r.name for r in row_reds}]
                if rest:
                    with ctx.loops(TRAIL, [domain[d] for d in trail], tl) as tidx:
                        full = compose([(outer, pidx), (trail, tidx)])
                        vals = []
                        for o in rest:
                            ri = row_index(o, [full[d] for d in kept])
                            vals.append((o, flat_index(ri, types[o].shape), self._element(ctx, o, ri)))
                        for o, off, v in vals:
                            ctx.store_flat(o, off, v)
                if outs["full"] and math.prod(domain[d] for d in red) and not with_last:
                    with ctx.loops("Rfull", [domain[d] for d in red]) as ridx:
                        def write_full(tidx, ridx=ridx):
                            full = compose([(outer, pidx), (red, ridx), (trail, tidx)])
                            vals = [(o, self._element(ctx, o, full)) for o in outs["full"]]
                            for o, v in vals:
                                ctx.store_flat(o, flat_index(full, domain), v)
                        ctx.loops_each(TRAIL, [domain[d] for d in trail], tl, write_full)

        size = max([types[o].size for o in self.outputs] + [0])
        work = math.prod(domain) * len(row_reds)
        k = self.finish(body, "row-columns", work, "P" if outer else TRAIL, size=size,
                        min_chunk=1 if outer else 64)
        k.buffers = tuple(k.buffers) + extra
        return k

    def _column_sums_by_rows(self, domain, red, trail, row_reds, outs, row_index, compose, extra) -> Kernel:
        """Column sums (a bias gradient) with the rows split between the tasks: each task
        adds its rows into its own partial row in the workspace, reading the rows the same
        thread most likely wrote in the kernel before (tasks are claimed from both ends);
        then the kernel adds the partial rows up in task order (the same sum on one thread
        or two) and computes the row-level outputs (the bias's AdamW update).  Splitting
        the columns instead had each thread read half of every row, half of them from the
        other core's cache."""
        types = self.graph.types
        TRAIL = "T"
        ncols = math.prod(domain[d] for d in trail)
        stride = -(-ncols * 8 // 64) * 64  # bytes per partial row (room for float64)
        trail_shape = [domain[d] for d in trail]

        def partial(ctx, j, task, col):
            """Pointer to reduction j's partial sum of column ``col`` (an Ix) for ``task``."""
            r = row_reds[j]
            et = reg_type(r.type.dtype)
            base = ctx.b.gep(ctx.ptrs["__workspace__"],
                             [ctx.b.mul(ctx.b.add(ctx.b.mul(task, c64(len(row_reds))), c64(j)), c64(stride))],
                             source_etype=I8)
            return ctx.b.gep(base, [ctx.ix(col)], source_etype=et), et

        def body(ctx, lohi=None):
            task = None
            if not ctx.analysis:
                task = ctx.b.udiv(lohi[0], c64(self.task_chunk)) if lohi is not None else c64(0)
            for j, r in enumerate(row_reds):
                low = self.lowering(r)
                with ctx.loops(TRAIL, trail_shape) as tidx:
                    if not ctx.analysis:
                        p, et = partial(ctx, j, task, flat_index(tidx, trail_shape))
                        ctx.b.store(low.init(ctx, r), p)
            with ctx.loops("R", [domain[d] for d in red], lohi) as ridx:
                # one pass over the row's columns for every reduction: values they share
                # (a fused producer) are computed once
                with ctx.loops(TRAIL, trail_shape) as tidx:
                    full = compose([(red, ridx), (trail, tidx)])
                    vals = [ctx.load(r.inputs[0], full) for r in row_reds]
                    if not ctx.analysis:
                        for j, (r, v) in enumerate(zip(row_reds, vals)):
                            low = self.lowering(r)
                            p, et = partial(ctx, j, task, flat_index(tidx, trail_shape))
                            ctx.b.store(low.combine(ctx, r, ctx.b.load(p, typ=et), v, reduce=False), p)

        def post(ctx):
            with ctx.loops(TRAIL, trail_shape) as tidx:
                full = compose([(trail, tidx)])
                for j, r in enumerate(row_reds):
                    low = self.lowering(r)
                    ri = row_index(r.name, [f for f in full if f is not None])
                    v = None
                    if not ctx.analysis:
                        v = low.init(ctx, r)
                        for t in range(self.task_count):
                            p, et = partial(ctx, j, c64(t), flat_index(tidx, trail_shape))
                            v = low.combine(ctx, r, v, ctx.b.load(p, typ=et), reduce=False)
                    ctx.store_flat(r.name, flat_index(ri, types[r.name].shape), v)
            rest = [o for o in outs["row"] if o not in {r.name for r in row_reds}]
            if rest:
                with ctx.loops(TRAIL, trail_shape) as tidx:
                    full = compose([(trail, tidx)])
                    vals = []
                    for o in rest:
                        ri = row_index(o, [f for f in full if f is not None])
                        vals.append((o, flat_index(ri, types[o].shape), self._element(ctx, o, ri)))
                    for o, off, v in vals:
                        ctx.store_flat(o, off, v)

        size = max([types[o].size for o in self.outputs] + [0])
        work = math.prod(domain) * len(row_reds)
        # at most COLUMN_SUM_TASKS tasks: each adds a partial row for the kernel to add up
        nrows = math.prod(domain[d] for d in red)
        k = self.finish(body, "row-columns", work, "R", size=size, min_chunk=max(16, -(-nrows // COLUMN_SUM_TASKS)), post=post,
                        workspace=lambda tasks: tasks * len(row_reds) * stride)
        k.buffers = tuple(k.buffers) + extra
        return k

    def _row_or_element(self, ctx, name, idx):
        if name in self.row_values:
            return self.row_values[name][0]
        return self._element(ctx, name, idx)

    # -- matmul kernels: the GEMM, then the epilogue over its output
    def build_matmul_kernel(self) -> Kernel:
        mm = [n for n in self.nodes if n.op == "matmul"]
        if len(mm) != 1:
            raise NotImplementedError(f"{self.name}: a matmul kernel needs exactly one matmul")
        mm = mm[0]
        m = self.module
        first = KernelBuilder(m, self.graph, GroupSpec("node", (mm,), self.spec.inlined, (mm.name,)),
                              self.name + ".mm", self._register_check, self.options)
        first.slot = self.slot
        k1 = first.build()
        rest = [n for n in self.nodes if n is not mm]
        epi_outs = tuple(o for o in self.outputs if o != mm.name)
        stages = [k1]
        if epi_outs:
            second = KernelBuilder(m, self.graph, GroupSpec("loop", tuple(rest), self.spec.inlined, epi_outs),
                                   self.name + ".epi", self._register_check, self.options)
            second.slot = self.slot
            second.inline.pop(mm.name, None)
            stages.append(second.build())
        kfn = ir.Function(m, ir.FunctionType(I32, [PTR]), name=self.name)
        b = ir.IRBuilder(kfn.append_basic_block("entry"))
        for st in stages:
            rc = b.call(m.get_global(st.name), [kfn.args[0]])
            with b.if_then(b.icmp_signed("!=", rc, ir.Constant(I32, 0)), likely=False):
                b.ret(rc)
        b.ret(ir.Constant(I32, 0))
        self.workspace_bytes = max(st.workspace_bytes for st in stages)
        self.buffered = set(first.buffered) | {mm.name}
        extra = tuple(sorted(({mm.name} - set(self.outputs)) | set(k1.buffers)))
        return Kernel(self.name, self.nodes, merged_inputs(stages), self.outputs, "matmul",
                      max(st.tasks for st in stages), [c for st in stages for c in st.checks],
                      {k: v for st in stages for k, v in st.loops.items()}, self.workspace_bytes,
                      buffers=extra, externals=tuple(sorted(set().union(*[st.externals for st in stages]))),
                      reuse=self._epilogue_reuse(mm, rest, epi_outs))

    def _epilogue_reuse(self, mm: Node, rest: list, epi_outs: tuple) -> tuple:
        """An epilogue output the memory plan may place over the product it is computed from
        (the product is the kernel's own buffer and dies with it): one buffer instead of two
        of the product's size, and the epilogue's stores land on lines it has just read
        instead of cold ones.  Safe when every epilogue node depending on the product is
        elementwise or a reshape (its element i depends on element i of the product only)
        and the output has the product's size and dtype, and the epilogue's outputs share one
        shape (``build_map_kernel`` computes them in one loop, every output of an element
        before its stores; outputs of another shape get a later loop): element i of the product is read
        before element i of the output is stored (the store depends on the load), and never
        after.  The same reasoning keeps ``noalias`` valid as for Program's in-place outputs."""
        if mm.name in self.outputs or not epi_outs:
            return ()
        if len({self.graph.types[o].shape for o in epi_outs}) != 1:
            return ()  # outputs of other shapes get loops of their own, run after the first
        from ..ops.registry import PRIMITIVES
        # every node depending on the product (however indirectly) must read element i of
        # what it depends on for its element i: elementwise ops and reshapes (a reshape's
        # element i is its input's element i); a transpose or broadcast anywhere downstream
        # would read an element the output may already have overwritten
        dependent, changed = {mm.name}, True
        nodes = tuple(rest) + tuple(self.spec.inlined)
        while changed:
            changed = False
            for n in nodes:
                if n.name not in dependent and not dependent.isdisjoint(n.inputs):
                    if n.op != "reshape" and PRIMITIVES[n.op].kind != "elementwise":
                        return ()
                    dependent.add(n.name)
                    changed = True
        ctype = self.graph.types[mm.name]
        graph_outputs = set(self.graph.outputs)
        for o in reversed(epi_outs):
            ot = self.graph.types[o]
            if o in dependent and o not in graph_outputs and (ot.size, ot.dtype) == (ctype.size, ctype.dtype):
                return ((o, mm.name),)
        return ()

    def _reduction_body(self):
        root = self.root
        (x,) = root.inputs
        xt = self.graph.types[x]
        axes = tuple(root.attr["axes"])
        keepdims = root.attr.get("keepdims", False)
        low = self.lowering(root)
        red = [d for d in range(xt.ndim) if d in axes]
        kept = [d for d in range(xt.ndim) if d not in axes]
        trail = []
        for d in reversed(range(xt.ndim)):
            if d in axes:
                break
            trail.insert(0, d)
        t_size = math.prod(xt.shape[d] for d in trail)
        out_t = root.type
        work = max(xt.size, out_t.size)
        if trail and t_size >= 8 and red and not self.is_inline(x):
            # outer reduction: accumulate rows of the output (vectorises over the kept inner dims)
            outer = [d for d in kept if d not in trail]

            def out_off(full):
                oi = [full[d] for d in kept] if not keepdims else \
                    [Ix.of(0) if d in axes else full[d] for d in range(xt.ndim)]
                return flat_index(oi, out_t.shape) if out_t.shape else Ix.of(0)

            def body(ctx, lohi=None):
                with ctx.loops("P", [xt.shape[d] for d in outer], lohi) as pidx:
                    full = [Ix.of(0)] * xt.ndim
                    for d, i in zip(outer, pidx):
                        full[d] = i
                    with ctx.loops("T0", [xt.shape[d] for d in trail]) as tidx:
                        f0 = list(full)
                        for d, i in zip(trail, tidx):
                            f0[d] = i
                        ctx.store_flat(root.name, out_off(f0), low.init(ctx, root))
                    if xt.size:
                        with ctx.loops("R", [xt.shape[d] for d in red]) as ridx:
                            for d, i in zip(red, ridx):
                                full[d] = i
                            with ctx.loops("T", [xt.shape[d] for d in trail]) as tidx:
                                f = list(full)
                                for d, i in zip(trail, tidx):
                                    f[d] = i
                                off = out_off(f)
                                acc = ctx.load_flat(root.name, off)
                                v = ctx.load(x, f)
                                ctx.store_flat(root.name, off, low.combine(ctx, root, acc, v, reduce=False))
            return body, "reduce-outer", work, "P"

        def body(ctx, lohi=None):
            with ctx.loops("out", out_t.shape, lohi) as idx:
                v = low.element(ctx, root, idx)
                ctx.store_flat(root.name, flat_index(idx, out_t.shape), v)
        return body, "reduce-inner", work, "out"

    def finish(self, body: Callable | None, strategy: str, work: int, e0_key: str | None,
               size: int | None = None, min_chunk: int = 1, pre=None, post=None, workspace=None) -> Kernel:
        """Plan (analysis run), then emit ``@name.body``, ``@name.task`` and ``@name``.
        ``pre(ctx)`` / ``post(ctx)`` emit code the kernel runs before / after its tasks;
        ``workspace(tasks)``: the workspace bytes the kernel needs for that many tasks
        (``ctx.ptrs["__workspace__"]`` points at them)."""
        size = self.root.type.size if size is None else size
        actx = Ctx(self, analysis=True)
        if body is not None and size:
            for part in (pre, body, post):
                if part is not None:
                    part(actx)
        plan, extents = make_plan(actx)
        for node, idx_name, isize, axis, ignore in self._check_specs.values():
            info = IndexCheck(0, node, isize, axis, ignore)
            info.code = self._register_check(info)
            self.checks.append((info, idx_name))

        names = self.external_inputs() + [o for o in self.outputs if o not in self.external_inputs()]
        e0 = extents.get(e0_key, []) if e0_key else []
        tasks = 1
        if body is not None and e0 and size and work >= PARALLEL_MIN_WORK_OF.get(strategy, PARALLEL_MIN_WORK) \
                and not self.options.get("serial"):
            tasks = int(min(e0[0] // min_chunk, max(1, work // PARALLEL_CHUNK), PARALLEL_MAX_TASKS))
            tasks = max(tasks, 1)
        n0 = e0[0] if e0 else 1
        chunk = -(-n0 // tasks)
        tile = plan.get(TILES, {}).get(e0_key) if e0_key else None
        if tile and len(plan.get(e0_key, ())) == 1:  # the parallel loop is the tiled one
            chunk = -(-chunk // tile) * tile
            tasks = -(-n0 // chunk)
        self.task_count, self.task_chunk = tasks, chunk
        if workspace is not None:
            self.workspace_bytes = max(self.workspace_bytes, workspace(tasks))
            names = names + ["__workspace__"]

        m = self.module
        bfn = None
        if body is not None:
            bfn = ir.Function(m, ir.FunctionType(VOID, [PTR] * len(names) + [I64, I64]),
                              name=f"{self.name}.body")
            bfn.linkage = "internal"
            # noalias holds even for an output written over an input (Program's ``inplace``):
            # such a pair is accessed at one index per element, every load of an element
            # comes before its stores (kernels compute all of an element's outputs first)
            # and feeds them, and distinct elements are distinct addresses; dropping the
            # attribute would cost the vectoriser its loops (0.43 -> 0.69 ms for an MLP step)
            for a in bfn.args[:len(names)]:
                a.add_attribute("noalias")
            bb = open_function(bfn)
            ptrs = dict(zip(names, bfn.args))
            ectx = Ctx(self, analysis=False, plan=plan, builder=bb, ptrs=ptrs)
            if size:
                body(ectx, (bfn.args[-2], bfn.args[-1]) if e0 else None)
            ectx.b.ret_void()
            close_function(bfn)

        tfn = None
        if tasks > 1:
            tfn = ir.Function(m, ir.FunctionType(VOID, [PTR, I64]), name=f"{self.name}.task")
            tfn.linkage = "internal"
            tb = ir.IRBuilder(tfn.append_basic_block("entry"))
            lo = tb.mul(tfn.args[1], c64(chunk))
            hi = tb.add(lo, c64(chunk))
            hi = tb.select(tb.icmp_signed("<", hi, c64(n0)), hi, c64(n0))
            tb.call(bfn, [self._load_ptr(tb, tfn.args[0], n) for n in names] + [lo, hi])
            tb.ret_void()
        kfn = ir.Function(m, ir.FunctionType(I32, [PTR]), name=self.name)
        kb = open_function(kfn)
        bufs = kfn.args[0]
        self._emit_checks(kfn, kb, bufs)
        kctx = None
        if (pre or post) and bfn is not None and size:
            kctx = Ctx(self, analysis=False, plan=plan, builder=kb,
                       ptrs={n: self._load_ptr(kb, bufs, n) for n in names})
            if pre is not None:
                pre(kctx)
        if bfn is not None and size:
            if tfn is not None:
                pf = declare(m, "narch_parallel_for", VOID, [PTR, PTR, I64])
                kb.call(pf, [tfn, bufs, c64(tasks)])
            else:
                kb.call(bfn, [self._load_ptr(kb, bufs, n) for n in names] + [c64(0), c64(n0)])
        if kctx is not None and post is not None:
            # in a function of its own taking the buffers (as the body does), so kernels
            # alike but for their buffers share it (share_identical_functions): a bias's
            # AdamW update after its column sums is the same code for every bias
            pfn = ir.Function(m, ir.FunctionType(VOID, [PTR] * len(names)), name=f"{self.name}.post")
            pfn.linkage = "internal"
            for a in pfn.args:  # (as the body's: see there)
                a.add_attribute("noalias")
            pb = open_function(pfn)
            post(Ctx(self, analysis=False, plan=plan, builder=pb, ptrs=dict(zip(names, pfn.args))))
            pb.ret_void()
            close_function(pfn)
            kb.call(pfn, [kctx.ptrs[n] for n in names])
        kb.ret(ir.Constant(I32, 0))
        close_function(kfn)
        return Kernel(self.name, self.nodes, tuple(self.external_inputs()), self.outputs,
                      strategy, tasks, [c for c, _ in self.checks], dict(extents), self.workspace_bytes)

    # -- helpers shared with custom kernels
    slot: Callable = None  # set by the program: value name -> bufs slot

    def _load_ptr(self, b: ir.IRBuilder, bufs, name: str) -> ir.Value:
        p = b.gep(bufs, [c64(self.slot(name))], source_etype=PTR, inbounds=True)
        return b.load(p, typ=PTR, align=8)

    def _emit_checks(self, fn: ir.Function, b: ir.IRBuilder, bufs) -> None:
        """For each registered check: scan the index tensor (min/max, vectorised); on a bad
        index find the one to report, write the error record and return 1.  The index
        values are loaded like any value (from a buffer, or computed inline)."""
        for info, idx_name in self.checks:
            it = self.graph.types[idx_name]
            if it.size == 0:
                continue
            ctx = Ctx(self, analysis=False, builder=b,
                      ptrs={n: self._load_ptr(b, bufs, n) for n in self._value_reads(idx_name)})
            lo_slot = ctx.alloca(I64, "chk.lo")
            hi_slot = ctx.alloca(I64, "chk.hi")
            b.store(c64(info.size if info.ignore is None else 0), lo_slot)
            b.store(c64(0), hi_slot)

            def load_index(idx):
                v = ctx.load(idx_name, idx)
                return b.sext(v, I64) if v.type != I64 else v
            with ctx.loops(f"chk.{info.code}", it.shape) as idx:
                v = load_index(idx)
                if info.ignore is not None:  # ignored entries count as index 0
                    v = b.select(b.icmp_signed("==", v, c64(info.ignore)), c64(0) if info.size else v, v)
                lo = b.load(lo_slot, typ=I64)
                hi = b.load(hi_slot, typ=I64)
                b.store(b.select(b.icmp_signed("<", v, lo), v, lo), lo_slot)
                b.store(b.select(b.icmp_signed(">", v, hi), v, hi), hi_slot)
            lo = b.load(lo_slot, typ=I64)
            hi = b.load(hi_slot, typ=I64)
            if info.ignore is None and info.size == 0:
                bad = ir.Constant(I1, 1)
            else:
                bad = b.or_(b.icmp_signed("<", lo, c64(0)), b.icmp_signed(">=", hi, c64(info.size)))
            with b.if_then(bad, likely=False):
                err = self._load_ptr(b, bufs, None)
                if info.ignore is None:
                    # report like the reference: the minimum if negative, else the maximum
                    badv = b.select(b.icmp_signed("<", lo, c64(0)), lo, hi)
                else:
                    # report the first offending entry in row-major order
                    found = ctx.alloca(I64, "chk.first")
                    b.store(c64(0), found)
                    done_bb = fn.append_basic_block(f"{self.name}.chk.found")
                    with ctx.loops(f"chk.scan.{info.code}", it.shape) as idx:
                        v = load_index(idx)
                        is_bad = b.and_(b.icmp_signed("!=", v, c64(info.ignore)),
                                        b.or_(b.icmp_signed("<", v, c64(0)),
                                              b.icmp_signed(">=", v, c64(info.size))))
                        b.store(v, found)
                        cont = fn.append_basic_block(f"{self.name}.chk.cont")
                        b.cbranch(is_bad, done_bb, cont)
                        b.position_at_end(cont)
                    b.branch(done_bb)
                    b.position_at_end(done_bb)
                    badv = b.load(found, typ=I64)
                b.store(c64(info.code), err)
                b.store(badv, b.gep(err, [c64(1)], source_etype=I64, inbounds=True))
                b.ret(ir.Constant(I32, 1))

    def _value_reads(self, name: str) -> list[str]:
        """Buffers read to compute value ``name`` (itself, or through inlined nodes)."""
        out, stack, seen = [], [name], set()
        while stack:
            v = stack.pop()
            if v in seen:
                continue
            seen.add(v)
            if self.is_inline(v):
                stack.extend(self.inline[v].inputs)
            else:
                out.append(v)
        return out
