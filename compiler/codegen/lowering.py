"""The lowering face of every primitive, in one table.

A lowering computes ONE ELEMENT of its node's output at a multi-index (a list of
``index.Ix``) from element loads of its inputs (``ctx.load(value, idx)``), so a kernel for
a group of nodes is just a loop nest over the group output that inlines these faces:

* elementwise: combine the inputs' elements at the same index (``Elementwise``);
* movement (reshape, transpose, broadcast_to, slice, pad, concat, gather): remap the index,
  with masks where the source has holes (pad, concat); broadcast is a stride-0 remap;
* sources (full, iota, constant, rng_uniform): compute from the index;
* reductions (sum, max): an inner loop over the reduced axes; the kernel builder may
  instead accumulate whole output rows (``reduce-outer``) when the innermost input
  dimension is kept;
* matmul and scatter_add: besides a (slow, correct) element face they provide a whole
  ``kernel`` face: matmul calls the GEMM per batch element, scatter_add accumulates.

``attach()`` sets ``PRIMITIVES[name].lowering`` for every primitive from ``LOWERINGS``.
"""
from __future__ import annotations

import math
from contextlib import contextmanager

import llvmlite.ir as ir

from ..ops import primitives as P
from ..ops.registry import PRIMITIVES
from .index import Ix, Var, contiguous_strides, flat_index, unflatten
from .kernel import (FM, FM_REDUCE, I8, I32, I64, ITEMSIZE, PTR, VOID, Ctx, Kernel, alloca, KernelBuilder, c64,
                     close_function, const, declare, for_range, intrinsic, open_function, is_float, mem_type,
                     reg_type)


class Lowering:
    kind = "generic"
    is_reduction = False

    def element(self, ctx: Ctx, node, idx):
        raise NotImplementedError

    def __repr__(self):
        return f"<lowering {type(self).__name__}>"


# ============================================================================ elementwise


class Elementwise(Lowering):
    """``fn(ctx, node, *input_elements) -> element``: inputs share the output's index."""

    kind = "elementwise"

    def __init__(self, fn):
        self.fn = fn

    def element(self, ctx, node, idx):
        vals = [ctx.load(i, idx) for i in node.inputs]
        if ctx.analysis:
            return None
        return self.fn(ctx, node, *vals)


def _in_dtype(ctx, node, k=0):
    return ctx.type_of(node.inputs[k]).dtype


def _neg(ctx, node, x):
    if is_float(node.type.dtype):
        return ctx.b.fneg(x, flags=FM)
    return ctx.b.sub(const(node.type.dtype, 0), x)


def _math(name):
    def fn(ctx, node, *xs):
        return ctx.math(name, node.type.dtype, *xs)
    return fn


def _abs(ctx, node, x):
    dt = node.type.dtype
    if is_float(dt):
        return ctx.call_intrinsic("llvm.fabs", dt, x)
    b = ctx.b
    return b.select(b.icmp_signed("<", x, const(dt, 0)), b.sub(const(dt, 0), x), x)


def _sign(ctx, node, x):
    dt = node.type.dtype
    b = ctx.b
    if is_float(dt):
        pos = b.fcmp_ordered(">", x, const(dt, 0.0))
        neg = b.fcmp_ordered("<", x, const(dt, 0.0))
        return b.select(pos, const(dt, 1.0), b.select(neg, const(dt, -1.0), x))  # 0 and NaN stay
    pos = b.zext(b.icmp_signed(">", x, const(dt, 0)), reg_type(dt))
    neg = b.zext(b.icmp_signed("<", x, const(dt, 0)), reg_type(dt))
    return b.sub(pos, neg)


def _identity(ctx, node, x):
    return x


def _arith(fop, iop):
    def fn(ctx, node, a, b_):
        if is_float(node.type.dtype):
            return getattr(ctx.b, fop)(a, b_, flags=FM)
        return getattr(ctx.b, iop)(a, b_)
    return fn


def _div(ctx, node, a, b_):
    return ctx.b.fdiv(a, b_, flags=FM)


def _minmax(fname, iname):
    def fn(ctx, node, a, b_):
        dt = node.type.dtype
        if is_float(dt):  # IEEE maximum/minimum: NaN-propagating, like NumPy
            return ctx.call_intrinsic(fname, dt, a, b_)
        return ctx.call_intrinsic(iname, dt, a, b_)
    return fn


_FCMP = {"eq": ("==", True), "ne": ("!=", False), "lt": ("<", True), "le": ("<=", True),
         "gt": (">", True), "ge": (">=", True)}


def _cmp(op):
    sym, ordered = _FCMP[op]

    def fn(ctx, node, a, b_):
        dt = _in_dtype(ctx, node)
        if is_float(dt):
            return (ctx.b.fcmp_ordered if ordered else ctx.b.fcmp_unordered)(sym, a, b_)
        if dt == "bool":
            return ctx.b.icmp_unsigned(sym, a, b_)
        return ctx.b.icmp_signed(sym, a, b_)
    return fn


def _where(ctx, node, c, a, b_):
    return ctx.b.select(c, a, b_)


def _relu(ctx, node, x):
    zero = const(node.type.dtype, 0.0)
    return ctx.b.select(ctx.b.fcmp_ordered("<=", x, zero), zero, x)  # NaN is not <= 0: kept


def cast_value(ctx, x, src: str, dst: str):
    b = ctx.b
    if src == dst:
        return x
    st, dt = reg_type(src), reg_type(dst)
    if dst == "bool":
        if is_float(src):
            return b.fcmp_unordered("!=", x, const(src, 0.0))  # NaN -> True, as NumPy
        return b.icmp_signed("!=", x, const(src, 0))
    if src == "bool":
        return b.uitofp(x, dt) if is_float(dst) else b.zext(x, dt)
    if is_float(src) and is_float(dst):
        return b.fpext(x, dt) if dst == "float64" else b.fptrunc(x, dt)
    if is_float(src):  # truncate toward zero; saturating (no poison for NaN/overflow)
        ssuf = "f32" if src == "float32" else "f64"
        dsuf = "i32" if dst == "int32" else "i64"
        fn = declare(ctx.module, f"llvm.fptosi.sat.{dsuf}.{ssuf}", dt, [st])
        return b.call(fn, [x])
    if is_float(dst):
        return b.sitofp(x, dt)
    return b.sext(x, dt) if dst == "int64" else b.trunc(x, dt)


def _cast(ctx, node, x):
    return cast_value(ctx, x, _in_dtype(ctx, node), node.type.dtype)


class CheckIndex(Lowering):
    """Identity on an index tensor; the kernel prologue checks every entry first."""

    kind = "elementwise"

    def index_checks(self, graph, node):
        return [(node.inputs[0], node.attr["size"], None, node.attr.get("ignore"))]

    def element(self, ctx, node, idx):
        return ctx.load(node.inputs[0], idx)


# ============================================================================ movement


class Reshape(Lowering):
    kind = "injective"

    def element(self, ctx, node, idx):
        (x,) = node.inputs
        src = ctx.type_of(x).shape
        flat = flat_index(idx, node.type.shape)
        return ctx.load(x, unflatten(flat, src) if src else [])


class Transpose(Lowering):
    kind = "injective"

    def element(self, ctx, node, idx):
        (x,) = node.inputs
        perm = node.attr["perm"]
        src = [None] * len(perm)
        for k, p in enumerate(perm):
            src[p] = idx[k]
        return ctx.load(x, src)


class Broadcast(Lowering):
    kind = "broadcast"

    def element(self, ctx, node, idx):
        (x,) = node.inputs
        shape = ctx.type_of(x).shape
        lead = len(node.type.shape) - len(shape)
        return ctx.load(x, [Ix.of(0) if d == 1 else idx[lead + j] for j, d in enumerate(shape)])


class Slice(Lowering):
    kind = "injective"

    def element(self, ctx, node, idx):
        (x,) = node.inputs
        a = node.attr
        return ctx.load(x, [Ix.of(s) + i * st for i, s, st in zip(idx, a["starts"], a["steps"])])


class Pad(Lowering):
    kind = "injective"

    def element(self, ctx, node, idx):
        (x,) = node.inputs
        a = node.attr
        shape = ctx.type_of(x).shape
        dt = node.type.dtype
        fill = None if ctx.analysis else const(dt, a.get("value", 0.0))
        if any(n == 0 for n in shape):
            return fill
        conds, src = [], []
        for o, n, lo, it in zip(idx, shape, a["lo"], a["interior"]):
            s = it + 1
            span = (n - 1) * s
            t = o - lo
            tc = t.clamp(0, span)
            conds += [ctx.cmp(">=", t, 0), ctx.cmp("<=", t, span), ctx.divisible(tc, s)]
            src.append(tc // s)
        v = ctx.load(x, src)
        return ctx.select(ctx.all_(*conds), v, fill)


class Concat(Lowering):
    kind = "injective"

    def element(self, ctx, node, idx):
        axis = node.attr["axis"]
        parts, off = [], 0
        for x in node.inputs:
            n = ctx.type_of(x).shape[axis]
            if n:
                t = idx[axis] - off
                cond = ctx.all_(ctx.cmp(">=", t, 0), ctx.cmp("<", t, n))
                if cond is not False:
                    src = list(idx)
                    src[axis] = t.clamp(0, n - 1)
                    parts.append((cond, ctx.load(x, src)))
            off += n
        result = parts[-1][1]
        for cond, v in reversed(parts[:-1]):
            result = ctx.select(cond, v, result)
        return result


class Gather(Lowering):
    kind = "injective"

    def index_checks(self, graph, node):
        x, ind = node.inputs
        axis = node.attr["axis"]
        return [(ind, graph.types[x].shape[axis], axis, None)]

    def element(self, ctx, node, idx):
        x, ind = node.inputs
        axis = node.attr["axis"]
        xt, it = ctx.type_of(x), ctx.type_of(ind)
        size = xt.shape[axis]
        k = it.ndim
        v = ctx.load(ind, idx[axis:axis + k])
        d = ctx.data_index(node.name, v, 0, max(size - 1, 0))
        return ctx.load(x, list(idx[:axis]) + [d] + list(idx[axis + k:]))


# ============================================================================ sources


class Full(Lowering):
    kind = "source"

    def element(self, ctx, node, idx):
        return None if ctx.analysis else const(node.type.dtype, node.attr["value"])


class Iota(Lowering):
    kind = "source"

    def element(self, ctx, node, idx):
        i = idx[node.attr["axis"]]
        ctx.use(i)
        if ctx.analysis:
            return None
        return cast_value(ctx, ctx.ix(i), "int64", node.type.dtype)


class Constant(Lowering):
    """Scalars become immediates; arrays a private constant global (the program keeps
    large constants in pre-filled buffers instead, see ``MATERIALIZE_CONSTANT``)."""

    kind = "source"

    def element(self, ctx, node, idx):
        t = node.type
        values = node.attr["value"]
        if t.size == 1:
            return None if ctx.analysis else const(t.dtype, values[0])
        off = flat_index(idx, t.shape)
        if ctx.analysis:
            ctx.accesses.append(off)
            ctx.access_names.append(None)  # a constant global, not a buffer
            return None
        gname = f"const.{node.name}.{abs(hash(values)) % (1 << 32):x}"
        mty = mem_type(t.dtype)
        try:
            gv = ctx.module.get_global(gname)
        except KeyError:
            arr = ir.ArrayType(mty, t.size)
            if t.dtype == "bool":
                init = ir.Constant(arr, [ir.Constant(I8, 1 if v else 0) for v in values])
            else:
                init = ir.Constant(arr, [const(t.dtype, v) for v in values])
            gv = ir.GlobalVariable(ctx.module, arr, name=gname)
            gv.global_constant = True
            gv.linkage = "private"
            gv.initializer = init
            gv.align = 64
        p = ctx.b.gep(gv, [c64(0), ctx.ix(off)], source_etype=ir.ArrayType(mty, t.size), inbounds=True)
        v = ctx.b.load(p, typ=mty, align=ITEMSIZE[t.dtype])
        if t.dtype == "bool":
            v = ctx.b.icmp_unsigned("!=", v, ir.Constant(I8, 0))
        return v


MATERIALIZE_CONSTANT = 256  # constants with more elements live in pre-filled buffers


def _u64(v: int) -> ir.Constant:
    v &= (1 << 64) - 1
    return c64(v - (1 << 64) if v >= 1 << 63 else v)


class RngUniform(Lowering):
    """splitmix64(seed, stream, flat index) >> 40, scaled by 2^-24: bit-exact with the
    reference (i64 arithmetic wraps like uint64)."""

    kind = "source"

    def element(self, ctx, node, idx):
        (seed,) = node.inputs
        s = ctx.load(seed, [])
        off = flat_index(idx, node.type.shape) if node.type.shape else Ix.of(0)
        if ctx.analysis:
            ctx.accesses.append(off)
            ctx.access_names.append(None)  # the counter, not a buffer
            return None
        b = ctx.b
        if s.type != I64:
            s = b.sext(s, I64)
        stream = node.attr.get("stream", 0)
        base = b.add(b.mul(s, _u64(P.GOLDEN)), _u64(stream * P.STREAM))
        z = b.add(b.add(ctx.ix(off), base), _u64(P.GOLDEN))
        z = b.mul(b.xor(z, b.lshr(z, c64(30))), _u64(P.MIX1))
        z = b.mul(b.xor(z, b.lshr(z, c64(27))), _u64(P.MIX2))
        z = b.xor(z, b.lshr(z, c64(31)))
        u = b.uitofp(b.lshr(z, c64(40)), reg_type(node.type.dtype))
        return b.fmul(u, const(node.type.dtype, 1.0 / (1 << 24)))


# ============================================================================ reductions


class Reduce(Lowering):
    kind = "reduction"
    is_reduction = True

    def __init__(self, op):
        self.op = op

    def init(self, ctx, node):
        if ctx.analysis:
            return None
        dt = node.type.dtype
        if self.op == "sum":
            return const(dt, 0)
        if is_float(dt):
            return const(dt, -math.inf)
        return const(dt, -(1 << (31 if dt == "int32" else 63)))

    def combine(self, ctx, node, acc, v, reduce=True):
        if ctx.analysis:
            return None
        dt = node.type.dtype
        if self.op == "sum":
            if is_float(dt):
                return ctx.b.fadd(acc, v, flags=FM_REDUCE if reduce else FM)
            return ctx.b.add(acc, v)
        if is_float(dt):
            return ctx.call_intrinsic("llvm.maximum", dt, acc, v)
        return ctx.call_intrinsic("llvm.smax", dt, acc, v)

    def element(self, ctx, node, idx):
        (x,) = node.inputs
        xt = ctx.type_of(x)
        axes = tuple(node.attr["axes"])
        keep = node.attr.get("keepdims", False)
        full = [None] * xt.ndim
        it = iter(idx)
        for d in range(xt.ndim):
            if keep:
                i = next(it)
                if d not in axes:
                    full[d] = i
            elif d not in axes:
                full[d] = next(it)
        red = [d for d in range(xt.ndim) if d in axes]
        ext = [xt.shape[d] for d in red]
        if math.prod(ext) == 0:
            return self.init(ctx, node)
        key = f"red.{node.name}"
        if ctx.analysis:
            with ctx.loops(key, ext) as ridx:
                for d, i in zip(red, ridx):
                    full[d] = i
                ctx.load(x, full)
            return None
        ty = reg_type(node.type.dtype)
        acc = ctx.alloca(ty, "acc")
        ctx.b.store(self.init(ctx, node), acc)
        with ctx.loops(key, ext) as ridx:
            for d, i in zip(red, ridx):
                full[d] = i
            v = ctx.load(x, full)
            a = ctx.b.load(acc, typ=ty)
            ctx.b.store(self.combine(ctx, node, a, v), acc)
        return ctx.b.load(acc, typ=ty)


# ============================================================================ matmul


def _batch_offsets(shape, batch):
    """Element strides of an operand's batch dims against the output batch (0 = broadcast)."""
    lead = len(batch) - (len(shape) - 2)
    mat = shape[-2] * shape[-1]
    cs = contiguous_strides(shape[:-2]) if len(shape) > 2 else ()
    out = []
    for k in range(len(batch)):
        j = k - lead
        if j < 0 or shape[j] == 1:
            out.append(0)
        else:
            out.append(cs[j] * mat)
    return out


def gemm_provider():
    """(emit_gemm, gemm_workspace_bytes, threads for its parallel mode) from
    compiler/codegen/gemm.py, else a plain loop nest of ours."""
    try:
        from .gemm import emit_gemm, gemm_threads, gemm_workspace_bytes
        return emit_gemm, gemm_workspace_bytes, gemm_threads(True)
    except ImportError:  # pragma: no cover - only without the GEMM module
        return (lambda m, n, dt, **kw: emit_simple_gemm(m, n, dt)), (lambda dtype="float32", threads=1: 64), 1


def shared_gemm_symbol(dtype: str, threads: int) -> str:
    """The process-wide GEMM's symbol: its dtype, threads and the GEMM module's settings
    (``gemm.BLOCKING``, ...), so a changed setting names another GEMM."""
    from . import gemm, settings
    return f"narch_gemm_{dtype}_t{threads}_{settings.fingerprint(gemm)[:8]}"


def emit_simple_gemm(module: ir.Module, name: str, dtype: str = "float32") -> ir.Function:
    """A plain correct loop nest with the GEMM contract's signature (a fallback)."""
    et = reg_type(dtype)
    fn = ir.Function(module, ir.FunctionType(VOID, [PTR, PTR, PTR] + [I64] * 8 + [PTR]), name=name)
    A, B, C, M, N, K, sam, sak, sbk, sbn, scm, ws = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    zero = const(dtype, 0.0)
    with for_range(b, c64(0), M, "m") as m:
        crow = b.gep(C, [b.mul(m, scm)], source_etype=et)
        with for_range(b, c64(0), N, "n0") as n:
            b.store(zero, b.gep(crow, [n], source_etype=et))
        with for_range(b, c64(0), K, "k") as k:
            av = b.load(b.gep(A, [b.add(b.mul(m, sam), b.mul(k, sak))], source_etype=et), typ=et)
            brow = b.gep(B, [b.mul(k, sbk)], source_etype=et)
            with for_range(b, c64(0), N, "n") as n:
                p = b.gep(crow, [n], source_etype=et)
                bv = b.load(b.gep(brow, [b.mul(n, sbn)], source_etype=et), typ=et)
                b.store(b.fadd(b.load(p, typ=et), b.fmul(av, bv, flags=FM), flags=FM), p)
    b.ret_void()
    return fn


REMAP_OPS = ("reshape", "transpose", "broadcast_to", "slice", "stop_gradient")
MATMUL_MIN_FLOPS_PARALLEL = 1 << 18   # batched products split over tasks above this
MATMUL_MAX_TASKS = 2
# One product (M*N*K at least this): the GEMM's own parallel mode, which splits the longer
# side of C over the pool at run time when 2*M*N*K >= PARALLEL_MIN_FLOPS_PER_THREAD per
# thread (gemm.py; the same bar for two threads).  Rather than row blocks as tasks, each
# of which packed all of B: the MLP step's 64x64 @ 64x256^T went 15.8 -> 11 us, and its
# 0.33 MFLOP products (64x256 @ 256x10, 64x10 @ 10x256) from ~6.5 to ~4.5 us.
GEMM_PARALLEL_MIN_FLOPS = 100_000


class Matmul(Lowering):
    kind = "matmul"

    def element(self, ctx, node, idx):  # one dot product: correct, slow; kernels use the GEMM
        a, bname = node.inputs
        at, bt = ctx.type_of(a), ctx.type_of(bname)
        batch = node.type.shape[:-2]
        K = at.shape[-1]
        ai = [idx[len(batch) - (at.ndim - 2) + j] if at.shape[j] != 1 else Ix.of(0)
              for j in range(at.ndim - 2)]
        bi = [idx[len(batch) - (bt.ndim - 2) + j] if bt.shape[j] != 1 else Ix.of(0)
              for j in range(bt.ndim - 2)]
        m, n = idx[-2], idx[-1]
        dt = node.type.dtype
        if K == 0:
            return None if ctx.analysis else const(dt, 0.0)
        key = f"dot.{node.name}"
        if ctx.analysis:
            with ctx.loops(key, [K]) as (k,):
                ctx.load(a, ai + [m, k])
                ctx.load(bname, bi + [k, n])
            return None
        acc = ctx.alloca(reg_type(dt), "dot")
        ctx.b.store(const(dt, 0.0), acc)
        with ctx.loops(key, [K]) as (k,):
            p = ctx.b.fmul(ctx.load(a, ai + [m, k]), ctx.load(bname, bi + [k, n]), flags=FM)
            ctx.b.store(ctx.b.fadd(ctx.b.load(acc, typ=reg_type(dt)), p, flags=FM_REDUCE), acc)
        return ctx.b.load(acc, typ=reg_type(dt))

    @staticmethod
    def operand(kb: KernelBuilder, name: str):
        """(buffer, base offset, element strides per dim) of a matmul operand: its own buffer,
        or, when it is computed inline through index remaps (a transpose, a broadcast, a
        reshape of a buffer), the buffer it reads with the remap's affine strides.  None if
        the remap is not affine (the operand must then be materialised)."""
        t = kb.graph.types[name]
        if not kb.is_inline(name):
            return name, 0, list(contiguous_strides(t.shape))
        v = name
        while kb.is_inline(v):  # only a chain of pure index remaps can become strides
            n = kb.inline[v]
            if n.op not in REMAP_OPS:
                return None
            v = n.inputs[0]
        actx = Ctx(kb, analysis=True)
        vs = [Ix.var(f"mm#{d}", n) if n > 1 else Ix.of(0) for d, n in enumerate(t.shape)]
        actx.load(name, vs)
        if len(actx.accesses) != 1 or actx.uses or actx.access_names[0] is None:
            return None
        off = actx.accesses[0]
        if any(not isinstance(a, Var) for a, _ in off.terms):
            return None
        strides = [off.coef(v.terms[0][0].name) if v.terms else 0 for v in vs]
        return actx.access_names[0], off.const, strides

    @staticmethod
    def remapped_source(kb: KernelBuilder, name: str) -> str:
        """The computed value an inline operand reads through a chain of index remaps (the
        operand itself if it is not a remap)."""
        v = name
        while kb.is_inline(v) and kb.inline[v].op in REMAP_OPS:
            v = kb.inline[v].inputs[0]
        return v if kb.is_inline(v) else name

    def kernel(self, kb: KernelBuilder) -> Kernel:
        node = kb.root
        a, bname = node.inputs
        at, bt = kb.graph.types[a], kb.graph.types[bname]
        dt = node.type.dtype
        et = reg_type(dt)
        out = node.type
        batch = out.shape[:-2]
        M, N = out.shape[-2:]
        K = at.shape[-1]
        nb = math.prod(batch)
        stages, ((abuf, abase, ast), (bbuf, bbase, bst)) = strided_operands(kb, (a, bname), ("a", "b"))

        def batch_strides(shape, strides):
            lead = len(batch) - (len(shape) - 2)
            return [0 if k - lead < 0 or shape[k - lead] == 1 else strides[k - lead] for k in range(len(batch))]
        a_bs, b_bs = batch_strides(at.shape, ast), batch_strides(bt.shape, bst)
        sam, sak = ast[-2], ast[-1]
        sbk, sbn = bst[-2], bst[-1]
        bcs = contiguous_strides(batch) if batch else ()
        flops = nb * M * N * max(K, 1)
        if M == 1 and K > 0 and out.size and not kb.options.get("no_gemv"):
            # a row vector times a matrix (decoding one token): no packing, no 6-row tiles;
            # the matrix is streamed once (by rows when its columns are contiguous, else as
            # one dot product per column)
            return self._gemv_kernel(kb, node, stages, abuf, abase, bbuf, bbase, a_bs, b_bs, sak, sbk, sbn,
                                     batch, N, K, nb)
        _, ws_bytes, threads = gemm_provider()
        big_single = nb == 1 and threads > 1 and flops >= GEMM_PARALLEL_MIN_FLOPS and not kb.options.get("serial")
        gemm = gemm_function(kb, dt, threads if big_single else 1)
        tasks = 1
        if not big_single and flops >= MATMUL_MIN_FLOPS_PARALLEL and not kb.options.get("serial"):
            tasks = MATMUL_MAX_TASKS
        # work items: (batch element, row block); task t does items [t*per, (t+1)*per)
        if tasks > 1 and nb < tasks:
            rb = -(-M // -(-tasks // nb))
            rb = -(-rb // 6) * 6
        else:
            rb = M
        rb = max(1, min(rb, M))
        nrb = -(-M // rb)
        items = nb * nrb
        tasks = max(1, min(tasks, items))
        per = -(-items // tasks)
        wsb = -(-ws_bytes(dt, threads if big_single else 1) // 64) * 64
        kb.workspace_bytes = wsb * tasks

        names = [abuf, bbuf, node.name, "__workspace__"]
        bfn = _body_function(kb, 4)
        A, B, C, W, lo, hi = bfn.args
        b = ir.IRBuilder(bfn.append_basic_block("entry"))
        if out.size:
            with for_range(b, lo, hi, "item") as item:
                bi = b.udiv(item, c64(nrb))
                r0 = b.mul(b.urem(item, c64(nrb)), c64(rb))
                rows = b.sub(c64(M), r0)
                rows = b.select(b.icmp_signed("<", rows, c64(rb)), rows, c64(rb))
                ao, bo = c64(abase), c64(bbase)
                for k, st in enumerate(bcs):
                    bk = b.urem(b.udiv(bi, c64(st)), c64(batch[k]))
                    ao = b.add(ao, b.mul(bk, c64(a_bs[k])))
                    bo = b.add(bo, b.mul(bk, c64(b_bs[k])))
                ao = b.add(ao, b.mul(r0, c64(sam)))
                co = b.add(b.mul(bi, c64(M * N)), b.mul(r0, c64(N)))
                pa = b.gep(A, [ao], source_etype=et)
                pb = b.gep(B, [bo], source_etype=et)
                pc = b.gep(C, [co], source_etype=et)
                task = b.udiv(item, c64(per))
                pw = b.gep(W, [b.mul(task, c64(wsb))], source_etype=I8)
                b.call(gemm, [pa, pb, pc, rows, c64(N), c64(K), c64(sam), c64(sak), c64(sbk), c64(sbn),
                              c64(N), pw])
        b.ret_void()
        k = _finish_custom(kb, bfn, names, items, tasks, per, "matmul",
                           fname=kb.name + ".main" if stages else None)
        if stages:
            k = _chain(kb, stages, k)
        return k


def strided_operands(kb: KernelBuilder, names, stage_names):
    """Buffers a custom kernel reads its operands from, with strides: ``(stages, [(buffer,
    base offset, element strides per dim)])``.  An operand computed inline through affine
    index remaps (a transpose, slice, broadcast or reshape of a buffer) is read in place; a
    remap of another computed value has that value materialised in its own layout (read
    through the remap's strides), anything else is materialised itself (``stages``: the
    loop kernels that do so, run first)."""
    m = kb.module
    stages, ops = [], []

    def materialise(value, stage):
        from .kernel import GroupSpec
        pre = KernelBuilder(m, kb.graph, GroupSpec("loop", (kb.inline[value],), kb.spec.inlined, (value,)),
                            f"{kb.name}.{stage}", kb._register_check, kb.options)
        pre.slot = kb.slot
        stages.append(pre.build())
        kb.buffered.add(value)
        kb.materialized = getattr(kb, "materialized", ()) + (value,)

    done = {}
    for name, stage in zip(names, stage_names):
        if name in done:  # one value read twice (x @ x): one materialisation
            ops.append(done[name])
            continue
        op = Matmul.operand(kb, name)
        src = Matmul.remapped_source(kb, name) if op is None else name
        if src != name and kb.graph.types[src].size <= kb.graph.types[name].size:
            # a transpose (or reshape, broadcast) of a computed value: materialise that
            # value in its own layout, written in order, and read it through the remap's
            # strides (materialising the transpose would read or write across rows)
            if src not in kb.buffered:
                materialise(src, stage + "s")
            op = Matmul.operand(kb, name)
        if op is None:
            materialise(name, stage)
            op = (name, 0, list(contiguous_strides(kb.graph.types[name].shape)))
        done[name] = op
        ops.append(op)
    return stages, ops


def gemm_function(kb: KernelBuilder, dt: str, threads: int) -> ir.Function:
    """The GEMM a custom kernel calls: ``void (A, B, C, M, N, K, sam, sak, sbk, sbn, scm,
    workspace)``, the process-wide one for (dtype, threads) linked by symbol (programs do
    not recompile it; runtime/program.py installs it before loading), or with the option
    ``shared_gemm=False`` one emitted into this module."""
    m = kb.module
    if kb.options.get("shared_gemm", True):
        gname = shared_gemm_symbol(dt, threads)
        kb.externals = tuple(sorted(set(getattr(kb, "externals", ())) | {(gname, dt, threads)}))
        return declare(m, gname, VOID, [PTR, PTR, PTR] + [I64] * 8 + [PTR])
    emit_gemm = gemm_provider()[0]
    gname = f"narch.gemm.{dt}" + (".par" if threads > 1 else "")
    try:
        return m.get_global(gname)
    except KeyError:
        return emit_gemm(m, gname, dt, parallel=threads) if threads > 1 else emit_gemm(m, gname, dt)


GEMV_MIN_WORK_PARALLEL = 1 << 16   # N*K per product above which columns split over two tasks


def _gemv_kernel(self, kb, node, stages, abuf, abase, bbuf, bbase, a_bs, b_bs, sak, sbk, sbn, batch, N, K, nb):
    dt = node.type.dtype
    et = reg_type(dt)
    tasks = 2 if nb * N * K >= GEMV_MIN_WORK_PARALLEL and not kb.options.get("serial") else 1
    if tasks > 1 and nb == 1 and sbn == 1 and K >= tasks:
        return _gemv_split_k(kb, node, stages, abuf, abase, bbuf, bbase, sak, sbk, N, K, tasks)
    nchunks = tasks if nb < tasks else 1
    cw = -(-N // nchunks)
    if sbn == 1 and cw > 8:
        cw = -(-cw // 8) * 8  # chunk boundaries on whole vectors
    items = nb * nchunks
    per = -(-items // tasks)
    names = [abuf, bbuf, node.name, "__workspace__"]
    bfn = _body_function(kb, 4)
    A, B, C, _W, lo, hi = bfn.args
    b = open_function(bfn)
    bcs = contiguous_strides(batch) if batch else ()
    zero = const(dt, 0.0)
    with for_range(b, lo, hi, "item") as item:
        bi = b.udiv(item, c64(nchunks))
        n0 = b.mul(b.urem(item, c64(nchunks)), c64(cw))
        n1 = b.add(n0, c64(cw))
        n1 = b.select(b.icmp_signed("<", n1, c64(N)), n1, c64(N))
        ao, bo = c64(abase), c64(bbase)
        for k, st in enumerate(bcs):
            bk = b.urem(b.udiv(bi, c64(st)), c64(batch[k]))
            ao = b.add(ao, b.mul(bk, c64(a_bs[k])))
            bo = b.add(bo, b.mul(bk, c64(b_bs[k])))
        pa = b.gep(A, [ao], source_etype=et)
        pb = b.gep(B, [bo], source_etype=et)
        pc = b.gep(C, [b.mul(bi, c64(N))], source_etype=et)
        if sbn == 1:  # y[n0:n1] = sum_k a[k] * B[k, n0:n1]: rows of B streamed, y stays in L1
            with for_range(b, n0, n1, "z") as n:
                b.store(zero, b.gep(pc, [n], source_etype=et))
            with for_range(b, c64(0), c64(K), "k", known_nonempty=True) as k:
                ak = b.load(b.gep(pa, [b.mul(k, c64(sak))], source_etype=et), typ=et)
                brow = b.gep(pb, [b.mul(k, c64(sbk))], source_etype=et)
                with for_range(b, n0, n1, "n") as n:
                    p = b.gep(pc, [n], source_etype=et)
                    v = b.fmul(ak, b.load(b.gep(brow, [n], source_etype=et), typ=et), flags=FM)
                    b.store(b.fadd(b.load(p, typ=et), v, flags=FM), p)
        else:  # one dot product per column (contiguous when B is a transposed row-major matrix)
            acc = alloca(bfn, et, "acc")
            with for_range(b, n0, n1, "n") as n:
                bcol = b.gep(pb, [b.mul(n, c64(sbn))], source_etype=et)
                b.store(zero, acc)
                with for_range(b, c64(0), c64(K), "k", known_nonempty=True) as k:
                    x = b.load(b.gep(pa, [b.mul(k, c64(sak))], source_etype=et), typ=et)
                    y = b.load(b.gep(bcol, [b.mul(k, c64(sbk))], source_etype=et), typ=et)
                    b.store(b.fadd(b.load(acc, typ=et), b.fmul(x, y, flags=FM), flags=FM_REDUCE), acc)
                b.store(b.load(acc, typ=et), b.gep(pc, [n], source_etype=et))
    b.ret_void()
    close_function(bfn)
    k = _finish_custom(kb, bfn, names, items, tasks, per, "gemv", fname=kb.name + ".main" if stages else None)
    if stages:
        k = _chain(kb, stages, k)
    return k


Matmul._gemv_kernel = _gemv_kernel


def _gemv_split_k(kb, node, stages, abuf, abase, bbuf, bbase, sak, sbk, N, K, tasks):
    """y = a @ B for one row vector a and a row-major B, with B's rows split between the
    tasks: each task streams one contiguous block of B (the hardware prefetchers' best case;
    splitting the columns instead makes every task skip through every row, measured 20 %
    slower when B comes from DRAM).  Task 0 accumulates into y, task t > 0 into its own N
    floats of the workspace; y then adds those partial sums."""
    dt = node.type.dtype
    et = reg_type(dt)
    isz = ITEMSIZE[dt]
    part = -(-N * isz // 64) * 64  # bytes of one task's partial sums
    kb.workspace_bytes = part * (tasks - 1)
    kh = -(-K // tasks)
    names = [abuf, bbuf, node.name, "__workspace__"]
    bfn = _body_function(kb, 4)
    A, B, C, W, lo, hi = bfn.args
    b = open_function(bfn)
    zero = const(dt, 0.0)
    with for_range(b, lo, hi, "item") as item:
        k0 = b.mul(item, c64(kh))
        k1 = b.add(k0, c64(kh))
        k1 = b.select(b.icmp_signed("<", k1, c64(K)), k1, c64(K))
        pw = b.gep(W, [b.mul(b.sub(item, c64(1)), c64(part))], source_etype=I8)
        dst = b.select(b.icmp_signed("==", item, c64(0)), C, pw)
        pa = b.gep(A, [c64(abase)], source_etype=et)
        pb = b.gep(B, [c64(bbase)], source_etype=et)
        with for_range(b, c64(0), c64(N), "z") as n:
            b.store(zero, b.gep(dst, [n], source_etype=et))
        with for_range(b, k0, k1, "k") as k:
            ak = b.load(b.gep(pa, [b.mul(k, c64(sak))], source_etype=et), typ=et)
            brow = b.gep(pb, [b.mul(k, c64(sbk))], source_etype=et)
            with for_range(b, c64(0), c64(N), "n") as n:
                p = b.gep(dst, [n], source_etype=et)
                v = b.fmul(ak, b.load(b.gep(brow, [n], source_etype=et), typ=et), flags=FM)
                b.store(b.fadd(b.load(p, typ=et), v, flags=FM), p)
    b.ret_void()
    close_function(bfn)

    def add_partials(b, kfn):  # after every task: y += each partial
        c = kb._load_ptr(b, kfn.args[0], node.name)
        w = kb._load_ptr(b, kfn.args[0], "__workspace__")
        for t in range(tasks - 1):
            pw = b.gep(w, [c64(t * part)], source_etype=I8)
            with for_range(b, c64(0), c64(N), f"sum{t}") as n:
                p = b.gep(c, [n], source_etype=et)
                b.store(b.fadd(b.load(p, typ=et), b.load(b.gep(pw, [n], source_etype=et), typ=et), flags=FM), p)
    k = _finish_custom(kb, bfn, names, tasks, tasks, 1, "gemv", fname=kb.name + ".main" if stages else None,
                       after=add_partials)
    if stages:
        k = _chain(kb, stages, k)
    return k


def _chain(kb, stages, last: Kernel) -> Kernel:
    """Run ``stages`` then ``last`` (emitted as ``<name>.main``) under the kernel's name."""
    m = kb.module
    kfn = ir.Function(m, ir.FunctionType(I32, [PTR]), name=kb.name)
    b = ir.IRBuilder(kfn.append_basic_block("entry"))
    for st in stages + [last]:
        rc = b.call(m.get_global(st.name if st is not last else kb.name + ".main"), [kfn.args[0]])
        with b.if_then(b.icmp_signed("!=", rc, ir.Constant(I32, 0)), likely=False):
            b.ret(rc)
    b.ret(ir.Constant(I32, 0))
    from .kernel import merged_inputs
    last.buffers = tuple(last.buffers) + tuple(getattr(kb, "materialized", ()))
    last.inputs = merged_inputs(list(stages) + [last])
    last.workspace_bytes = max([last.workspace_bytes] + [s.workspace_bytes for s in stages])
    last.checks = [c for s in stages for c in s.checks] + list(last.checks)
    last.externals = tuple(sorted(set(last.externals).union(*[s.externals for s in stages])))
    return last


def _body_function(kb, nptrs: int) -> ir.Function:
    """``<kernel>.body(ptr x nptrs, i64 lo, i64 hi)``, internal: a custom kernel's work
    (``_finish_custom`` emits the task and kernel functions that call it)."""
    fn = ir.Function(kb.module, ir.FunctionType(VOID, [PTR] * nptrs + [I64, I64]), name=f"{kb.name}.body")
    fn.linkage = "internal"
    return fn


def _finish_custom(kb, bfn, names, n0, tasks, per, strategy, fname=None, after=None) -> Kernel:
    """The task and kernel functions around a custom body(ptr..., lo, hi); ``after(builder,
    kernel function)`` emits code that runs once every task has finished."""
    m = kb.module
    tfn = None
    if tasks > 1:
        tfn = ir.Function(m, ir.FunctionType(VOID, [PTR, I64]), name=f"{kb.name}.task")
        tfn.linkage = "internal"
        tb = ir.IRBuilder(tfn.append_basic_block("entry"))
        lo = tb.mul(tfn.args[1], c64(per))
        hi = tb.add(lo, c64(per))
        hi = tb.select(tb.icmp_signed("<", hi, c64(n0)), hi, c64(n0))
        tb.call(bfn, [kb._load_ptr(tb, tfn.args[0], n) for n in names] + [lo, hi])
        tb.ret_void()
    kfn = ir.Function(m, ir.FunctionType(I32, [PTR]), name=fname or kb.name)
    b = open_function(kfn)
    kb._emit_checks(kfn, b, kfn.args[0])
    if kb.root.type.size:
        if tfn is not None:
            pf = declare(m, "narch_parallel_for", VOID, [PTR, PTR, I64])
            b.call(pf, [tfn, kfn.args[0], c64(tasks)])
        else:
            b.call(bfn, [kb._load_ptr(b, kfn.args[0], n) for n in names] + [c64(0), c64(n0)])
        if after is not None:
            after(b, kfn)
    b.ret(ir.Constant(I32, 0))
    close_function(kfn)
    return Kernel(kb.name, kb.nodes, tuple(kb.external_inputs()), (kb.root.name,), strategy, tasks,
                  [c for c, _ in kb.checks], {}, kb.workspace_bytes,
                  externals=tuple(getattr(kb, "externals", ())))


# ============================================================================ fused attention

# Query rows per block.  A causal block of rows r0..r1-1 needs keys 0..r1-1 only, so smaller
# blocks skip more of the masked triangle (L = 64 in blocks of 32: 3/4 of the products)
# while each block's GEMM calls repack their operands.
ATTENTION_ROW_BLOCK = 32
# sequence lengths and head dims up to this run the tiled kernels (K^T and V packed once per
# (batch, head), 6-row tiles driven through the GEMM's micro-kernel)
ATTENTION_TILED_MAX = 512
ATTENTION_MIN_FLOPS_PARALLEL = 1 << 18
ATTENTION_MAX_TASKS = 2
# the tiled kernels' row passes (softmax, dS) on explicit whole vectors with masked last
# vectors, instead of loops left to the vectoriser (short rows ran mostly in scalar tails)
ATTENTION_VECTOR_ROWS = True
ATTENTION_FULL_PANELS = True  # the scores and dP strips written in whole panels (see strip_panel_width)
ATTENTION_SOFTMAX_TOGETHER = 6  # a whole tile's rows go through the softmax passes together (0: one by one)


@contextmanager
def _for_step(b: ir.IRBuilder, lo, hi, step: int, name: str):
    """``for (i = lo; i < hi; i += step)``; yields i."""
    fn = b.function
    pre = b.block
    body = fn.append_basic_block(name + ".body")
    done = fn.append_basic_block(name + ".done")
    b.cbranch(b.icmp_signed("<", lo, hi), body, done)
    b.position_at_end(body)
    iv = b.phi(I64, name=name)
    iv.add_incoming(lo, pre)
    yield iv
    nxt = b.add(iv, c64(step), name=name + ".next")
    iv.add_incoming(nxt, b.block)
    b.cbranch(b.icmp_signed("<", nxt, hi), body, done)
    b.position_at_end(done)


class _AttentionKernel:
    """What the forward and backward attention kernels share: the operands read in place
    through strides (and the optional key bias), the work items (batch, head) split over
    tasks, each task's 64-byte aligned workspace regions, the query row tiles (tiled
    kernels) or blocks (blocked ones), and the softmax passes."""

    def __init__(self, kb: KernelBuilder, operands, names):
        node = kb.root
        self.kb, self.node = kb, node
        self.dt = node.type.dtype
        self.et = reg_type(self.dt)
        self.it = ITEMSIZE[self.dt]
        q = kb.graph.types[node.inputs[0]]
        self.B, self.L, self.H, self.D = q.shape
        self.scale, self.causal = float(node.attr["scale"]), bool(node.attr["causal"])
        # an optional key bias (batch, keys) follows the named operands
        self.has_bias = len(operands) > len(names)
        self.stages, self.ops = strided_operands(kb, operands, tuple(names) + ("bias",) * self.has_bias)
        self.bias_op = self.ops.pop() if self.has_bias else None
        self.item_bias = None
        self.rb = ATTENTION_ROW_BLOCK if self.causal else self.L
        self.rb = max(1, min(self.rb, self.L))
        items = self.B * self.H
        flops = 4 * self.B * self.H * self.L * self.L * self.D
        self.tasks = 1
        if flops >= ATTENTION_MIN_FLOPS_PARALLEL and not kb.options.get("serial"):
            self.tasks = max(1, min(ATTENTION_MAX_TASKS, items))
        self.per = -(-items // self.tasks)
        self.items = items

    def layout(self, *regions):
        """Each task's workspace: regions of the given element counts, each 64-byte aligned;
        a region given as ("bytes", n) is n bytes.  Returns their byte offsets."""
        offs, at = [], 0
        for r in regions:
            n = r[1] if isinstance(r, tuple) else r * self.it
            offs.append(at)
            at += -(-n // 64) * 64
        self.wsb = at + 64  # (slack to align each task's start)
        self.kb.workspace_bytes = self.wsb * self.tasks
        return offs

    def region(self, ws, off):
        return self.b.gep(ws, [c64(off)], source_etype=I8)

    def open(self, nptrs):
        """The body function; its arguments but the bias pointer (kept for items_loop)."""
        self.fn = _body_function(self.kb, nptrs + self.has_bias)
        self.b = open_function(self.fn)
        args = list(self.fn.args)
        if self.has_bias:
            self.bias_arg = args.pop(nptrs)
        return args

    def ptr(self, base, off):
        return self.b.gep(base, [off], source_etype=self.et)

    def operand_base(self, k, bi, h):
        """Element offset of operand k's (batch bi, position 0, head h, 0)."""
        _, base, st = self.ops[k]
        b = self.b
        return b.add(c64(base), b.add(b.mul(bi, c64(st[0])), b.mul(h, c64(st[2]))))

    def use_gemm(self):
        """The serial GEMM, as a call emitter: gemm(A, B, C, M, N, K, sam, sak, sbk, sbn, scm, ws)."""
        fn = gemm_function(self.kb, self.dt, 1)
        return lambda *args: self.b.call(fn, list(args))

    def parts(self):
        from .gemm import emit_gemm_parts
        return emit_gemm_parts(self.kb.module, f"narch.attn.{self.dt}", self.dt)

    def width(self, total, at, unit: int):
        """min(total - at, unit): the rows or columns of a tile starting at ``at``."""
        b = self.b
        w = b.sub(total, at)
        return b.select(b.icmp_signed("<", w, c64(unit)), w, c64(unit))

    def row_tiles(self, MR):
        """Yields (i0, mr, nc): a tile of mr <= MR query rows and the keys it needs."""
        b, L = self.b, self.L
        with _for_step(b, c64(0), c64(L), MR, "i0") as i0:
            mr = self.width(c64(L), i0, MR)
            yield i0, mr, (b.add(i0, mr) if self.causal else c64(L))

    def a_operand(self, parts, A, mr, kc, sam: int, sak: int, Ap):
        """(ap, sa, mode) for the micro-kernel: a full tile of a row-major A read in place;
        otherwise packed into Ap (zero rows past mr)."""
        b = self.b
        MR = parts.blocking.mr
        full = b.icmp_signed("==", mr, c64(MR))
        if sak == 1:
            with b.if_then(b.not_(full)):
                b.call(parts.pack_a, [A, mr, kc, c64(sam), c64(1), Ap])
            return (b.select(full, A, Ap), c64(sam),
                    b.select(full, c64(parts.A_ROWS), c64(parts.A_PACKED)))
        b.call(parts.pack_a, [A, mr, kc, c64(sam), c64(sak), Ap])
        return Ap, c64(0), c64(parts.A_PACKED)

    def items_loop(self, lo, hi, W):
        """Yields (bi, h, task workspace) per work item."""
        b = self.b
        with for_range(b, lo, hi, "item") as item:
            bi = b.udiv(item, c64(self.H))
            h = b.urem(item, c64(self.H))
            task = b.udiv(item, c64(self.per))
            ws = b.gep(W, [b.mul(task, c64(self.wsb))], source_etype=I8)
            # 64-byte aligned (the program's workspace need not be; packed panels are read
            # with aligned vector loads): layout() keeps 64 bytes of slack per task
            pad = b.and_(b.sub(c64(0), b.ptrtoint(ws, I64)), c64(63))
            if self.has_bias:  # this batch's row of key biases
                _, bbase, bst = self.bias_op
                self.item_bias = self.ptr(self.bias_arg, b.add(c64(bbase), b.mul(bi, c64(bst[0]))))
            yield bi, h, b.gep(ws, [pad], source_etype=I8)

    def blocks(self):
        """Yields (r0, rows, nc): the row block, its row count and the keys it needs."""
        b = self.b
        nblk = -(-self.L // self.rb)
        with for_range(b, c64(0), c64(nblk), "blk", known_nonempty=True) as blk:
            r0 = b.mul(blk, c64(self.rb))
            r1 = b.add(r0, c64(self.rb))
            r1 = b.select(b.icmp_signed("<", r1, c64(self.L)), r1, c64(self.L))
            yield r0, b.sub(r1, r0), (r1 if self.causal else c64(self.L))

    def probabilities(self, Q, K, S, r0, rows, nc, gws):
        """S[i, j] (row stride L) = softmax_j(q_{r0+i} . k_j * scale) for j < nc, 0 past the
        causal diagonal: the GEMM, then the softmax passes."""
        b, L = self.b, self.L
        _, _, qs = self.ops[0]
        _, _, ks = self.ops[1]
        self.use_gemm()(self.ptr(Q, b.mul(r0, c64(qs[1]))), K, S, rows, nc, c64(self.D), c64(qs[1]),
                        c64(qs[3]), c64(ks[3]), c64(ks[1]), c64(L), gws)
        self.softmax_rows(S, L, r0, rows, nc)

    # -- whole-vector row passes (tiled kernels: rows padded to NR columns, so a row's last
    # partial vector stays inside it; lanes past the valid columns are masked by selects)
    def vec(self):
        """(lanes, vector type) of one AVX2 register of the dtype."""
        lanes = 8 if self.dt == "float32" else 4
        return lanes, ir.VectorType(self.et, lanes)

    def splat(self, x, lanes):
        b = self.b
        v = b.insert_element(ir.Constant(ir.VectorType(x.type, lanes), ir.Undefined), x, ir.Constant(I32, 0))
        return b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, lanes), [0] * lanes))

    def lane_mask(self, j0, limit, lanes):
        """<lanes x i1>: columns j0 + l < limit."""
        b = self.b
        lane = ir.Constant(ir.VectorType(I64, lanes), list(range(lanes)))
        return b.icmp_signed("<", b.add(self.splat(j0, lanes), lane), self.splat(limit, lanes))

    def horizontal(self, v, op):
        """op(lane 0, ..., lane n-1) by halving: op(low half, high half) down to one lane."""
        b = self.b
        n = v.type.count
        while n > 1:
            n //= 2
            lo = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), list(range(n))))
            hi = b.shuffle_vector(v, v, ir.Constant(ir.VectorType(I32, n), list(range(n, 2 * n))))
            v = op(lo, hi)
        return b.extract_element(v, ir.Constant(I32, 0))

    def vector_loop(self, row, count, lanes, name):
        """Yields (pointer, first column) per vector of the first ``count`` (> 0) columns."""
        b = self.b
        nv = b.udiv(b.add(count, c64(lanes - 1)), c64(lanes))
        with for_range(b, c64(0), nv, name, known_nonempty=True) as v:
            j0 = b.mul(v, c64(lanes))
            yield self.ptr(row, j0), j0

    def vector_rows(self) -> bool:
        """Whether the tiled kernels' row passes run on whole vectors: only when the rows'
        padding (to the GEMM's NR columns) is a whole number of vectors, so no vector leaves
        its row."""
        from .gemm import _blocking
        return ATTENTION_VECTOR_ROWS and _blocking(self.dt).nr % self.vec()[0] == 0

    def strip_panel_width(self, nc, j0, NR):
        """The columns the micro-kernel writes for the panel at j0 of a strip row (scores or
        dP, rows padded to whole NR-column panels): the whole panel, so its write-back takes
        the full-tile path (an edge tile spills to a buffer and copies element by element),
        or, with ``ATTENTION_FULL_PANELS`` off, only the columns below nc.  The columns past
        nc are never read: the row passes mask them and the products that follow read nc
        columns."""
        return c64(NR) if ATTENTION_FULL_PANELS else self.width(nc, j0, NR)

    def tile_softmax(self, S, ld, r0, rows, nc):
        """The tiled kernels' softmax: on whole vectors unless a key bias is added (its row
        is not padded: a vector past its valid columns could read beyond it)."""
        if not (self.vector_rows() and not self.has_bias):
            return self.softmax_rows(S, ld, r0, rows, nc)
        b, MR = self.b, ATTENTION_SOFTMAX_TOGETHER
        if not MR:
            return self.softmax_rows_vec(S, ld, r0, rows, nc)
        with b.if_else(b.icmp_signed("==", rows, c64(MR))) as (whole, part):
            with whole:
                self.softmax_rows_vec(S, ld, r0, rows, nc, unrolled=MR)
            with part:
                self.softmax_rows_vec(S, ld, r0, rows, nc)

    def softmax_rows_vec(self, S, ld, r0, rows, nc, unrolled=0):
        """``softmax_rows`` on whole vectors (no key bias): each row's valid columns and the
        masked rest of their last vector (-inf, so 0 after the exp), then zeros up to nc.
        With ``unrolled`` = rows (a constant) the rows go through each pass together: their
        max, sum and division chains overlap instead of running one row after another."""
        b, dt = self.b, self.dt
        lanes, vt = self.vec()
        m = self.kb.module
        from . import mathlib
        exp = mathlib.get(m, "exp", dt, lanes)
        sfx = "f32" if dt == "float32" else "f64"

        def vmax(u, w):
            return b.call(declare(m, f"llvm.maximum.v{u.type.count}{sfx}", u.type, [u.type, u.type]), [u, w])
        scale = self.splat(const(dt, self.scale), lanes)
        ninf = self.splat(const(dt, -math.inf), lanes)
        zero = self.splat(const(dt, 0.0), lanes)

        def passes(idx):
            """The three passes over rows ``idx`` (i64 values) at once."""
            n = len(idx)
            accs = [alloca(self.fn, vt, "vacc") for _ in idx]
            rws = [self.ptr(S, b.mul(i, c64(ld))) for i in idx]
            valid = [b.add(b.add(r0, i), c64(1)) if self.causal else nc for i in idx]
            longest = valid[-1]  # (rows in order: the last row has the most columns)
            for a in accs:
                b.store(ninf, a)
            for _, j0 in self.vector_loop(rws[0], longest, lanes, "v1"):
                for k in range(n):
                    p = self.ptr(rws[k], j0)
                    x = b.fmul(b.load(p, typ=vt, align=4), scale, flags=FM)
                    x = b.select(self.lane_mask(j0, valid[k], lanes), x, ninf)
                    b.store(x, p, align=4)
                    b.store(vmax(b.load(accs[k], typ=vt), x), accs[k])
            mx = [self.splat(self.horizontal(b.load(a, typ=vt), vmax), lanes) for a in accs]
            for a in accs:
                b.store(zero, a)
            for _, j0 in self.vector_loop(rws[0], longest, lanes, "v2"):
                for k in range(n):
                    p = self.ptr(rws[k], j0)
                    e = b.call(exp, [b.fsub(b.load(p, typ=vt, align=4), mx[k], flags=FM)])
                    b.store(e, p, align=4)
                    b.store(b.fadd(b.load(accs[k], typ=vt), e, flags=FM_REDUCE), accs[k])
            inv = [self.splat(b.fdiv(const(dt, 1.0), self.horizontal(
                b.load(a, typ=vt), lambda u, w: b.fadd(u, w, flags=FM_REDUCE))), lanes) for a in accs]
            for _, j0 in self.vector_loop(rws[0], longest, lanes, "v3"):
                for k in range(n):
                    p = self.ptr(rws[k], j0)
                    # masked keys get exactly 0 even in a row whose max is NaN or -inf
                    # (exp(-inf - max) is NaN there), as the scalar passes leave them
                    q = b.fmul(b.load(p, typ=vt, align=4), inv[k], flags=FM)
                    b.store(b.select(self.lane_mask(j0, valid[k], lanes), q, zero), p, align=4)
            if self.causal:  # past the last vector the products read zeros
                done = b.mul(b.udiv(b.add(longest, c64(lanes - 1)), c64(lanes)), c64(lanes))
                for k in range(n):
                    with for_range(b, done, nc, "j4") as j:
                        b.store(const(dt, 0.0), self.ptr(rws[k], j))
        if unrolled:
            passes([c64(i) for i in range(unrolled)])
        else:
            with for_range(b, c64(0), rows, "i") as i:
                passes([i])

    def softmax_rows(self, S, ld, r0, rows, nc):
        """Rows i < rows of S (row stride ld; query r0 + i) become softmax(S * scale + the
        key bias, if any) over their keys (j <= r0 + i when causal, else all nc), then 0 up to nc: three passes per
        row (scale and max; exp and sum; normalise), each vectorised."""
        b, et, L = self.b, self.et, ld
        m = self.kb.module
        from . import mathlib
        exp = mathlib.get(m, "exp", self.dt)
        maximum = intrinsic(m, "llvm.maximum", et, 2)  # (NaN-propagating, as the row kernels' max)
        acc = alloca(self.fn, et, "acc")
        scale = const(self.dt, self.scale)
        with for_range(b, c64(0), rows, "i") as i:
            row = self.ptr(S, b.mul(i, c64(L)))  # (L: the row stride here)
            # columns 0..valid-1 (the causal diagonal, or every key); the rest of the nc
            # columns the block's products read are zeroed.  (Running the passes over all nc
            # columns with the masked ones read as -inf, whole vectors without scalar tails,
            # measured slower: 50 % more exp work for L = 64 in blocks of 32.)
            valid = b.add(b.add(r0, i), c64(1)) if self.causal else nc
            b.store(const(self.dt, -math.inf), acc)
            with for_range(b, c64(0), valid, "j1", known_nonempty=True) as j:
                p = self.ptr(row, j)
                x = b.fmul(b.load(p, typ=et), scale, flags=FM)
                if self.has_bias:
                    bv = b.load(self.ptr(self.item_bias, b.mul(j, c64(self.bias_op[2][1]))), typ=et)
                    x = b.fadd(x, bv, flags=FM)
                b.store(x, p)
                b.store(b.call(maximum, [b.load(acc, typ=et), x]), acc)
            mx = b.load(acc, typ=et)
            b.store(const(self.dt, 0.0), acc)
            with for_range(b, c64(0), valid, "j2", known_nonempty=True) as j:
                p = self.ptr(row, j)
                e = b.call(exp, [b.fsub(b.load(p, typ=et), mx, flags=FM)], fastmath=FM)
                b.store(e, p)
                b.store(b.fadd(b.load(acc, typ=et), e, flags=FM_REDUCE), acc)
            inv = b.fdiv(const(self.dt, 1.0), b.load(acc, typ=et))
            with for_range(b, c64(0), valid, "j3", known_nonempty=True) as j:
                p = self.ptr(row, j)
                b.store(b.fmul(b.load(p, typ=et), inv, flags=FM), p)
            if self.causal:
                with for_range(b, valid, nc, "j4") as j:
                    b.store(const(self.dt, 0.0), self.ptr(row, j))

    def grad_pointers(self, bases, OUT, bi, h):
        """The backward's pointers for item (bi, h): q, k, v, o, dO at (bi, 0, h, 0), and
        dq, dk, dv in the (B, L, 3, H, D) output."""
        b, D, HD = self.b, self.D, self.H * self.D
        Q, K, V, Ob, G = (self.ptr(base, self.operand_base(k, bi, h)) for k, base in enumerate(bases))
        out = self.ptr(OUT, b.add(b.mul(bi, c64(self.L * 3 * HD)), b.mul(h, c64(D))))
        return Q, K, V, Ob, G, out, self.ptr(out, c64(HD)), self.ptr(out, c64(2 * HD))

    def ds_rows(self, G, Ob, P, dP, ld, r0, rows, nc, acc):
        """dP[i, j] = P[i, j] (dP[i, j] - rowsum(dO * O)[r0 + i]) * scale for rows i < rows,
        keys j < nc (row stride ld), in place of dP."""
        b, et = self.b, self.et
        scale = const(self.dt, self.scale)
        with for_range(b, c64(0), rows, "i") as i:
            rs = self.row_dot(G, Ob, b.add(r0, i), acc)
            prow, drow = self.ptr(P, b.mul(i, c64(ld))), self.ptr(dP, b.mul(i, c64(ld)))
            with for_range(b, c64(0), nc, "j", known_nonempty=True) as j:
                dp = self.ptr(drow, j)
                pj = b.load(self.ptr(prow, j), typ=et)
                v = b.fmul(b.fmul(pj, b.fsub(b.load(dp, typ=et), rs, flags=FM), flags=FM), scale, flags=FM)
                b.store(v, dp)

    def row_dot(self, G, Ob, gi, acc):
        """rowsum(dO * O) of query gi (scalar loop; the vectoriser's)."""
        b, et = self.b, self.et
        _, _, gs = self.ops[4]
        _, _, os_ = self.ops[3]
        b.store(const(self.dt, 0.0), acc)
        with for_range(b, c64(0), c64(self.D), "d", known_nonempty=True) as d:
            gv = b.load(self.ptr(G, b.add(b.mul(gi, c64(gs[1])), b.mul(d, c64(gs[3])))), typ=et)
            ov = b.load(self.ptr(Ob, b.add(b.mul(gi, c64(os_[1])), b.mul(d, c64(os_[3])))), typ=et)
            b.store(b.fadd(b.load(acc, typ=et), b.fmul(gv, ov, flags=FM), flags=FM_REDUCE), acc)
        return b.load(acc, typ=et)

    def tile_ds(self, G, Ob, P, dP, ld, r0, rows, nc, acc):
        """The tiled kernel's dS (``ds_rows``) on whole vectors, the lanes past nc of the
        last one set to 0 (the tiled kernel's rows are padded)."""
        b, dt = self.b, self.dt
        if not self.vector_rows():
            return self.ds_rows(G, Ob, P, dP, ld, r0, rows, nc, acc)
        lanes, vt = self.vec()
        sv, zero = self.splat(const(dt, self.scale), lanes), self.splat(const(dt, 0.0), lanes)
        with for_range(b, c64(0), rows, "i") as i:
            rs = self.splat(self.row_dot(G, Ob, b.add(r0, i), acc), lanes)
            prow, drow = self.ptr(P, b.mul(i, c64(ld))), self.ptr(dP, b.mul(i, c64(ld)))
            for dp, j0 in self.vector_loop(drow, nc, lanes, "jv"):
                pj = b.load(self.ptr(prow, j0), typ=vt, align=4)
                v = b.fmul(b.fmul(pj, b.fsub(b.load(dp, typ=vt, align=4), rs, flags=FM), flags=FM), sv, flags=FM)
                b.store(b.select(self.lane_mask(j0, nc, lanes), v, zero), dp, align=4)

    def finish(self, names, strategy):
        if self.has_bias:
            names = list(names) + [self.bias_op[0]]
        self.b.ret_void()
        close_function(self.fn)
        k = _finish_custom(self.kb, self.fn, names, self.items, self.tasks, self.per, strategy,
                           fname=self.kb.name + ".main" if self.stages else None)
        return _chain(self.kb, self.stages, k) if self.stages else k


class Attention(Lowering):
    """One kernel per attention, per (batch, head): K^T and V packed once into the GEMM's
    micro-panel layout; then per tile of MR = 6 query rows the scores by the GEMM's
    micro-kernel into a strip of the workspace (only the 16-key panels a causal tile
    needs), the softmax on the strip, and P @ V by the micro-kernel straight into the
    output.  Longer sequences (or head dims) than ``ATTENTION_TILED_MAX`` run in blocks of
    query rows through the whole GEMM instead.  No (L x L) tensor reaches memory outside
    the workspace."""

    kind = "opaque"

    def kernel(self, kb: KernelBuilder) -> Kernel:
        node = kb.root
        ak = _AttentionKernel(kb, node.inputs, ("q", "k", "v"))
        if max(ak.L, ak.D) <= ATTENTION_TILED_MAX:
            return self._tiled(kb, ak)
        (qb, _, qs), (kbuf, _, ks), (vb, _, vs) = ak.ops
        gemm = ak.use_gemm()
        s_off, g_off = ak.layout(ak.rb * ak.L, ("bytes", gemm_provider()[1](ak.dt, 1)))
        names = [qb, kbuf, vb, node.name, "__workspace__"]
        Q0, K0, V0, O, W, lo, hi = ak.open(5)
        b = ak.b
        HD = ak.H * ak.D
        for bi, h, ws in ak.items_loop(lo, hi, W):
            Q = ak.ptr(Q0, ak.operand_base(0, bi, h))
            K = ak.ptr(K0, ak.operand_base(1, bi, h))
            V = ak.ptr(V0, ak.operand_base(2, bi, h))
            Ob = ak.ptr(O, b.add(b.mul(bi, c64(ak.L * HD)), b.mul(h, c64(ak.D))))
            S, gws = ak.region(ws, s_off), ak.region(ws, g_off)
            for r0, rows, nc in ak.blocks():
                ak.probabilities(Q, K, S, r0, rows, nc, gws)
                # O[r0:r0+rows] = P @ V[0:nc]
                gemm(S, V, ak.ptr(Ob, b.mul(r0, c64(HD))), rows, c64(ak.D), nc, c64(ak.L), c64(1),
                     c64(vs[1]), c64(vs[3]), c64(HD), gws)
        return ak.finish(names, "attention")

    @staticmethod
    def _tiled(kb, ak) -> Kernel:
        node = kb.root
        (qb, _, qs), (kbuf, _, ks), (vb, _, vs) = ak.ops
        parts = ak.parts()
        MR, NR = parts.blocking.mr, parts.blocking.nr
        L, D, H = ak.L, ak.D, ak.H
        Lp, Dp = -(-L // NR) * NR, -(-D // NR) * NR
        kt_off, v_off, s_off, a_off, t_off = ak.layout(Lp * D, Dp * L, MR * Lp, MR * max(L, D), MR * NR)
        names = [qb, kbuf, vb, node.name, "__workspace__"]
        Q0, K0, V0, O, W, lo, hi = ak.open(5)
        b = ak.b
        HD = H * D
        for bi, h, ws in ak.items_loop(lo, hi, W):
            Q = ak.ptr(Q0, ak.operand_base(0, bi, h))
            K = ak.ptr(K0, ak.operand_base(1, bi, h))
            V = ak.ptr(V0, ak.operand_base(2, bi, h))
            Ob = ak.ptr(O, b.add(b.mul(bi, c64(L * HD)), b.mul(h, c64(D))))
            KT, Vp, S, Ap, tile = (ak.region(ws, o) for o in (kt_off, v_off, s_off, a_off, t_off))
            b.call(parts.pack_b, [K, c64(D), c64(L), c64(ks[3]), c64(ks[1]), KT])  # K^T: D x L
            b.call(parts.pack_b, [V, c64(L), c64(D), c64(vs[1]), c64(vs[3]), Vp])  # V: L x D
            for i0, mr, nc in ak.row_tiles(MR):
                # scores: the strip's mr rows against the nc keys they need
                a, sa, mode = ak.a_operand(parts, ak.ptr(Q, b.mul(i0, c64(qs[1]))), mr, c64(D), qs[1], qs[3], Ap)
                with _for_step(b, c64(0), nc, NR, "jp") as jp:
                    nr = ak.strip_panel_width(nc, jp, NR)
                    b.call(parts.ukr, [a, sa, mode, ak.ptr(KT, b.mul(jp, c64(D))), c64(D), ak.ptr(S, jp),
                                       c64(Lp), mr, nr, ir.Constant(ir.IntType(1), 0), tile])
                ak.tile_softmax(S, Lp, i0, mr, nc)
                # O[i0:i0+mr] = P @ V[0:nc]
                a, sa, mode = ak.a_operand(parts, S, mr, nc, Lp, 1, Ap)
                with _for_step(b, c64(0), c64(D), NR, "dp") as dp:
                    nr = ak.width(c64(D), dp, NR)
                    b.call(parts.ukr, [a, sa, mode, ak.ptr(Vp, b.mul(dp, c64(L))), nc,
                                       ak.ptr(Ob, b.add(b.mul(i0, c64(HD)), dp)), c64(HD), mr, nr,
                                       ir.Constant(ir.IntType(1), 0), tile])
        return ak.finish(names, "attention")


class AttentionGrad(Lowering):
    """The backward of ``Attention``, also one kernel: per (batch, head) and query block the
    probabilities again (nothing of the forward's is stored), dP = dO V^T, dS = P (dP - rowsum(dO * O))
    * scale, then dQ = dS K written directly, and dS^T Q, P^T dO added into dK, dV."""

    kind = "opaque"

    def kernel(self, kb: KernelBuilder) -> Kernel:
        node = kb.root
        ak = _AttentionKernel(kb, node.inputs, ("q", "k", "v", "o", "g"))
        if max(ak.L, ak.D) <= ATTENTION_TILED_MAX:
            return self._tiled(kb, ak)
        gemm = ak.use_gemm()
        p_off, dp_off, t_off, g_off = ak.layout(ak.rb * ak.L, ak.rb * ak.L, ak.L * ak.D,
                                                ("bytes", gemm_provider()[1](ak.dt, 1)))
        (qb, _, qs), (kbuf, _, ks), (vb, _, vs), (ob, _, os_), (gb, _, gs) = ak.ops
        names = [qb, kbuf, vb, ob, gb, node.name, "__workspace__"]
        Q0, K0, V0, O0, G0, OUT, W, lo, hi = ak.open(7)
        b, et, L, D, H = ak.b, ak.et, ak.L, ak.D, ak.H
        HD = H * D
        ld = 3 * HD  # row stride of the (B, L, 3, H, D) output
        acc = alloca(ak.fn, et, "rowsum")
        for bi, h, ws in ak.items_loop(lo, hi, W):
            Q, K, V, Ob, G, dQ, dK, dV = ak.grad_pointers((Q0, K0, V0, O0, G0), OUT, bi, h)
            S, dP, tmp, gws = (ak.region(ws, o) for o in (p_off, dp_off, t_off, g_off))
            zero = const(ak.dt, 0.0)
            with for_range(b, c64(0), c64(L), "zl", known_nonempty=True) as l:
                with for_range(b, c64(0), c64(D), "zd", known_nonempty=True) as d:
                    off = b.add(b.mul(l, c64(ld)), d)
                    b.store(zero, ak.ptr(dK, off))
                    b.store(zero, ak.ptr(dV, off))
            for r0, rows, nc in ak.blocks():
                ak.probabilities(Q, K, S, r0, rows, nc, gws)
                Gr = ak.ptr(G, b.mul(r0, c64(gs[1])))
                Qr = ak.ptr(Q, b.mul(r0, c64(qs[1])))
                # dP = dO[r0:] @ V[0:nc]^T
                gemm(Gr, V, dP, rows, nc, c64(D), c64(gs[1]), c64(gs[3]), c64(vs[3]), c64(vs[1]),
                             c64(L), gws)
                ak.ds_rows(G, Ob, S, dP, L, r0, rows, nc, acc)  # dS, in place of dP
                # dQ[r0:] = dS @ K[0:nc]
                gemm(dP, K, ak.ptr(dQ, b.mul(r0, c64(ld))), rows, c64(D), nc, c64(L), c64(1),
                             c64(ks[1]), c64(ks[3]), c64(ld), gws)
                # dK[0:nc] += dS^T @ Q[r0:], dV[0:nc] += P^T @ dO[r0:]
                for A_, B_, sb, acc_out in ((dP, Qr, qs, dK), (S, Gr, gs, dV)):
                    gemm(A_, B_, tmp, nc, c64(D), rows, c64(1), c64(L), c64(sb[1]), c64(sb[3]),
                                 c64(D), gws)
                    with for_range(b, c64(0), nc, "al", known_nonempty=True) as l:
                        with for_range(b, c64(0), c64(D), "ad", known_nonempty=True) as d:
                            dst = ak.ptr(acc_out, b.add(b.mul(l, c64(ld)), d))
                            t = b.load(ak.ptr(tmp, b.add(b.mul(l, c64(D)), d)), typ=et)
                            b.store(b.fadd(b.load(dst, typ=et), t, flags=FM), dst)
        return ak.finish(names, "attention-grad")


    @staticmethod
    def _tiled(kb, ak) -> Kernel:
        """Per (batch, head): K^T, V^T, K, Q and dO packed once; per 6-row query tile the
        probabilities (micro-kernel and softmax) into rows of a full P, dP = dO V^T by the
        micro-kernel, dS = P (dP - rowsum(dO * O)) * scale into rows of a full dS, and dQ =
        dS K written directly; then per 6-key tile dK = dS^T Q and dV = P^T dO, reading the
        transposes in place and, when causal, only the queries at or after the tile."""
        node = kb.root
        (qb, _, qs), (kbuf, _, ks), (vb, _, vs), (ob, _, os_), (gb, _, gs) = ak.ops
        parts = ak.parts()
        MR, NR = parts.blocking.mr, parts.blocking.nr
        L, D, H = ak.L, ak.D, ak.H
        Lp, Dp = -(-L // NR) * NR, -(-D // NR) * NR
        offs = ak.layout(Lp * D, Lp * D, Dp * L, Dp * L, Dp * L, L * Lp, L * Lp, MR * max(L, D), MR * NR)
        names = [qb, kbuf, vb, ob, gb, node.name, "__workspace__"]
        Q0, K0, V0, O0, G0, OUT, W, lo, hi = ak.open(7)
        b, et = ak.b, ak.et
        HD = H * D
        ld = 3 * HD  # row stride of the (B, L, 3, H, D) output
        rowsum = alloca(ak.fn, et, "rowsum")
        off = ir.Constant(ir.IntType(1), 0)

        def ukr_cols(a, sa, mode, panels, kc, C, ldc, mr, ncols, krow=None, strip=False):
            """C[0:mr, 0:ncols] = A @ (packed panels, kc rows from row krow); ``strip``: C is
            a row of P or dS, padded to whole panels (``strip_panel_width``)."""
            with _for_step(b, c64(0), ncols, NR, "np") as n0:
                nr = ak.strip_panel_width(ncols, n0, NR) if strip else ak.width(ncols, n0, NR)
                pan = b.mul(n0, c64(panels[1]))
                if krow is not None:
                    pan = b.add(pan, b.mul(krow, c64(NR)))
                b.call(parts.ukr, [a, sa, mode, ak.ptr(panels[0], pan), kc, ak.ptr(C, n0), ldc, mr, nr, off,
                                   tile])

        for bi, h, ws in ak.items_loop(lo, hi, W):
            Q, K, V, Ob, G, dQ, dK, dV = ak.grad_pointers((Q0, K0, V0, O0, G0), OUT, bi, h)
            KT, VT, Kp, Qp, Gp, P, dS, Ap, tile = (ak.region(ws, o) for o in offs)
            b.call(parts.pack_b, [K, c64(D), c64(L), c64(ks[3]), c64(ks[1]), KT])  # K^T: D x L
            b.call(parts.pack_b, [V, c64(D), c64(L), c64(vs[3]), c64(vs[1]), VT])  # V^T: D x L
            b.call(parts.pack_b, [K, c64(L), c64(D), c64(ks[1]), c64(ks[3]), Kp])  # K: L x D
            b.call(parts.pack_b, [Q, c64(L), c64(D), c64(qs[1]), c64(qs[3]), Qp])  # Q: L x D
            b.call(parts.pack_b, [G, c64(L), c64(D), c64(gs[1]), c64(gs[3]), Gp])  # dO: L x D
            for i0, mr, nc in ak.row_tiles(MR):
                Prow, dSrow = ak.ptr(P, b.mul(i0, c64(Lp))), ak.ptr(dS, b.mul(i0, c64(Lp)))
                a, sa, mode = ak.a_operand(parts, ak.ptr(Q, b.mul(i0, c64(qs[1]))), mr, c64(D), qs[1], qs[3], Ap)
                ukr_cols(a, sa, mode, (KT, D), c64(D), Prow, c64(Lp), mr, nc, strip=True)
                ak.tile_softmax(Prow, Lp, i0, mr, nc)
                a, sa, mode = ak.a_operand(parts, ak.ptr(G, b.mul(i0, c64(gs[1]))), mr, c64(D), gs[1], gs[3], Ap)
                ukr_cols(a, sa, mode, (VT, D), c64(D), dSrow, c64(Lp), mr, nc, strip=True)  # dP
                ak.tile_ds(G, Ob, Prow, dSrow, Lp, i0, mr, nc, rowsum)  # dS, in place of dP
                # dQ[i0:i0+mr] = dS[i0:i0+mr, 0:nc] @ K[0:nc]
                a, sa, mode = ak.a_operand(parts, dSrow, mr, nc, Lp, 1, Ap)
                ukr_cols(a, sa, mode, (Kp, L), nc, ak.ptr(dQ, b.mul(i0, c64(ld))), c64(ld), mr, c64(D))
            # per tile of keys j0..j0+mr-1: dK = dS^T Q, dV = P^T dO over the queries that see them
            for j0, mr, _ in ak.row_tiles(MR):
                k_lo = j0 if ak.causal else c64(0)
                kk = b.sub(c64(L), k_lo)
                full = b.icmp_signed("==", mr, c64(MR))
                for M_, Bp, out in ((dS, Qp, dK), (P, Gp, dV)):
                    At = ak.ptr(M_, b.add(b.mul(k_lo, c64(Lp)), j0))  # A[m, k] = M_[k_lo + k, j0 + m]
                    with b.if_then(b.not_(full)):
                        b.call(parts.pack_a, [At, mr, kk, c64(1), c64(Lp), Ap])
                    a = b.select(full, At, Ap)
                    mode = b.select(full, c64(parts.A_COLS), c64(parts.A_PACKED))
                    ukr_cols(a, c64(Lp), mode, (Bp, L), kk, ak.ptr(out, b.mul(j0, c64(ld))), c64(ld), mr, c64(D),
                             krow=k_lo)
        return ak.finish(names, "attention-grad")


# ============================================================================ scatter_add


class ScatterAdd(Lowering):
    kind = "opaque"

    def _split(self, ctx_types, node):
        idx, src = node.inputs
        axis = node.attr["axis"]
        it, st = ctx_types[idx], ctx_types[src]
        pre = st.shape[:axis]
        post = st.shape[axis + it.ndim:]
        return idx, src, axis, it, st, pre, post

    def index_checks(self, graph, node):
        return [(node.inputs[0], node.attr["size"], node.attr["axis"], None)]

    def element(self, ctx, node, idx_out):
        """out[p, i, q] = sum_j (idx[j] == i) * src[p, j, q]: an inner loop over the indices."""
        idx, src, axis, it, st, pre, post = self._split(ctx.graph.types, node)
        p, i, q = idx_out[:axis], idx_out[axis], idx_out[axis + 1:]
        dt = node.type.dtype
        if it.size == 0:
            return None if ctx.analysis else const(dt, 0.0)
        key = f"scat.{node.name}"
        ctx.use(i)
        if ctx.analysis:
            with ctx.loops(key, it.shape) as j:
                ctx.load(idx, j)
                ctx.load(src, list(p) + list(j) + list(q))
            return None
        b = ctx.b
        acc = ctx.alloca(reg_type(dt), "sacc")
        b.store(const(dt, 0.0), acc)
        with ctx.loops(key, it.shape) as j:
            k = ctx.load(idx, j)
            k = b.sext(k, I64) if k.type != I64 else k
            v = ctx.load(src, list(p) + list(j) + list(q))
            hit = b.icmp_signed("==", k, ctx.ix(i))
            v = b.select(hit, v, const(dt, 0.0))
            b.store(_arith("fadd", "add")(ctx, node, b.load(acc, typ=reg_type(dt)), v), acc)
        return b.load(acc, typ=reg_type(dt))

    def kernel(self, kb: KernelBuilder) -> Kernel:
        """Zero the output, then out[p, idx[j], q] += src[p, j, q] (parallel over p)."""
        node = kb.root
        idx, src, axis, it, st, pre, post = self._split(kb.graph.types, node)
        size = node.attr["size"]
        out = node.type
        add = _arith("fadd", "add")

        def body(ctx, lohi=None):
            with ctx.loops("P", pre, lohi) as pidx:
                with ctx.loops("Z", (size,) + tuple(post)) as zidx:
                    ctx.store_flat(node.name, flat_index(list(pidx) + list(zidx), out.shape),
                                   None if ctx.analysis else const(out.dtype, 0.0))
                if it.size and math.prod(post):
                    with ctx.loops("J", it.shape) as jidx:
                        k = ctx.load(idx, jidx)
                        d = ctx.data_index(node.name, k, 0, size - 1)
                        ctx.use(d)
                        with ctx.loops("Q", post) as qidx:
                            off = flat_index(list(pidx) + [d] + list(qidx), out.shape)
                            acc = ctx.load_flat(node.name, off)
                            v = ctx.load(src, list(pidx) + list(jidx) + list(qidx))
                            ctx.store_flat(node.name, off, None if ctx.analysis else add(ctx, node, acc, v))
        return kb.finish(body, "scatter", st.size + out.size, "P")


# ============================================================================ the table

LOWERINGS: dict[str, Lowering] = {
    "neg": Elementwise(_neg),
    "exp": Elementwise(_math("exp")),
    "log": Elementwise(_math("log")),
    "sqrt": Elementwise(_math("sqrt")),
    "rsqrt": Elementwise(_math("rsqrt")),
    "tanh": Elementwise(_math("tanh")),
    "sigmoid": Elementwise(_math("sigmoid")),
    "relu": Elementwise(_relu),
    "erf": Elementwise(_math("erf")),
    "sin": Elementwise(_math("sin")),
    "cos": Elementwise(_math("cos")),
    "abs": Elementwise(_abs),
    "sign": Elementwise(_sign),
    "stop_gradient": Elementwise(_identity),
    "add": Elementwise(_arith("fadd", "add")),
    "sub": Elementwise(_arith("fsub", "sub")),
    "mul": Elementwise(_arith("fmul", "mul")),
    "div": Elementwise(_div),
    "pow": Elementwise(_math("pow")),
    "maximum": Elementwise(_minmax("llvm.maximum", "llvm.smax")),
    "minimum": Elementwise(_minmax("llvm.minimum", "llvm.smin")),
    **{op: Elementwise(_cmp(op)) for op in _FCMP},
    "where": Elementwise(_where),
    "cast": Elementwise(_cast),
    "sum": Reduce("sum"),
    "max": Reduce("max"),
    "reshape": Reshape(),
    "transpose": Transpose(),
    "broadcast_to": Broadcast(),
    "slice": Slice(),
    "pad": Pad(),
    "concat": Concat(),
    "gather": Gather(),
    "scatter_add": ScatterAdd(),
    "matmul": Matmul(),
    "attention": Attention(),
    "attention_grad": AttentionGrad(),
    "full": Full(),
    "iota": Iota(),
    "constant": Constant(),
    "rng_uniform": RngUniform(),
    "check_index": CheckIndex(),
}


def attach() -> None:
    for name, low in LOWERINGS.items():
        if name in PRIMITIVES:
            PRIMITIVES[name].lowering = low


def missing() -> list[str]:
    """Primitives without a lowering (the meta-test keeps this empty)."""
    return sorted(n for n, p in PRIMITIVES.items() if p.lowering is None)


attach()
