"""Our matmul: a packed, cache-blocked, register-blocked GEMM emitted as LLVM IR.

``emit_gemm(module, name, dtype)`` adds to ``module``

    void name(ptr A, ptr B, ptr C, i64 M, i64 N, i64 K,
              i64 sam, i64 sak, i64 sbk, i64 sbn, i64 scm, ptr workspace)

computing ``C[m*scm + n] = sum_k A[m*sam + k*sak] * B[k*sbk + n*sbn]`` (overwrite).  Strides
are in elements and may be anything (zero, negative, transposed), so the caller never
copies an operand.  ``workspace`` is scratch of ``gemm_workspace_bytes(dtype)`` bytes (any
alignment); two threads may run the kernel at once on disjoint row ranges of C with their
own workspaces.

The structure is the classic one (Goto, BLIS):

    for jc in 0..N step NC:                       B block  KC x NC   (L3)
      for pc in 0..K step KC:                     pack B[pc:, jc:] into KC x NR panels
        for ic in 0..M step MC:                   pack A[ic:, pc:] into MR x KC panels (L2)
          for jr in 0..nc step NR:                B micro-panel KC x NR (L1)
            for ir in 0..mc step MR:
              micro-kernel: MR x NR tile of C from KC rank-1 updates

Packing pads ragged panels with zeros, so the micro-kernel never branches on the tile size
inside its k loop; only its write-back knows the tile's real extent, and it writes (and,
after the first k block, reads) C strictly within bounds.  The micro-kernel keeps the
MR x NR accumulators in registers: MR=6 rows by two ``<VL x T>`` vectors (12 accumulators,
2 B vectors and one broadcast of A: 15 of AVX2's 16 ymm registers), updated with
``llvm.fma``; it prefetches its C tile before the k loop.  K == 0 runs one k block of
length 0, which stores zeros.  The workspace holds packed B, packed A and one tile buffer
for edge write-backs, each 64-byte aligned.  Measurements: docs/gemm.md.

Two options (keyword arguments of ``emit_gemm``):

* fused epilogue: ``extra_arg_types`` appends parameters after ``workspace`` and
  ``epilogue(builder, acc, m, n, lanes, extra_args)`` is emitted into the micro-kernel's
  final write-back (last K block), so ``C = epilogue(A @ B)`` costs no second pass over C;
* ``parallel``: the function splits C into row (or, for wide products, column) ranges,
  one per thread of the native pool (``narch_parallel_for``), each with its own slice of
  a ``gemm_workspace_bytes(dtype, threads)`` workspace; small products run inline.

All index arithmetic is i64.  No branch in the code reads an operand out of bounds:
packing reads only rows < M, columns < N and k < K.
"""
from __future__ import annotations

import ctypes
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import llvmlite.ir as ir
import numpy as np

__all__ = ["emit_gemm", "gemm_workspace_bytes", "gemm_threads", "compile_gemm", "GemmKernel",
           "GemmBlocking", "BLOCKING", "PARALLEL_MIN_FLOPS_PER_THREAD", "GemmParts", "emit_gemm_parts"]

I1 = ir.IntType(1)
I64 = ir.IntType(64)
PTR = ir.PointerType()

_ALIGN = 64  # workspace alignment in bytes (a cache line)


@dataclass(frozen=True)
class GemmBlocking:
    """Register and cache block sizes, in elements.

    mr x nr is the register tile (nr = nv vectors of vl lanes).  kc x nr of B (one
    micro-panel) should sit in L1 next to an mr x kc sliver of A; mc x kc of packed A in
    L2; kc x nc of packed B in L2/L3.
    """

    vl: int
    mr: int
    nv: int
    kc: int
    mc: int
    nc: int

    @property
    def nr(self) -> int:
        return self.nv * self.vl

    def __post_init__(self):
        assert self.mc % self.mr == 0 and self.nc % self.nr == 0, self


# Zen 4 (our machines): L1d 32 KiB, L2 1 MiB per core, L3 32 MiB shared.
# float32: B micro-panel 256x16x4 = 16 KiB (L1), A block 144x256x4 = 144 KiB (L2),
# B block 256x2048x4 = 2 MiB.
BLOCKING = {
    "float32": GemmBlocking(vl=8, mr=6, nv=2, kc=256, mc=144, nc=2048),
    "float64": GemmBlocking(vl=4, mr=6, nv=2, kc=128, mc=144, nc=1024),
}

# Prefetch the C tile's rows before the k loop: +5-10 % at n = 1024-2048, where rows are
# 4-8 KiB apart (L1 set conflicts) and the tile is re-read after the first K block.
PREFETCH_C = True

# Edge tiles written from the registers, row by row (whole vectors where they fit), instead
# of spilling the tile and copying every element (see _emit_microkernel).
EDGE_FROM_REGISTERS = True

_ELEM = {"float32": (ir.FloatType(), 4), "float64": (ir.DoubleType(), 8)}


def _blocking(dtype: str) -> GemmBlocking:
    try:
        return BLOCKING[dtype]
    except KeyError:
        raise ValueError(f"gemm: unsupported dtype {dtype!r} (float32 or float64)") from None


def _round_up(n: int, to: int) -> int:
    return -(-n // to) * to


def _workspace_layout(bl: GemmBlocking, itemsize: int) -> tuple[int, int, int]:
    """Element offsets of packed A and of the edge tile after packed B, and the total
    bytes (each region starts on a cache line; slack to align the start)."""
    per_line = _ALIGN // itemsize
    a_off = _round_up(bl.kc * bl.nc, per_line)
    tile_off = a_off + _round_up(bl.mc * bl.kc, per_line)
    return a_off, tile_off, (tile_off + bl.mr * bl.nr) * itemsize + _ALIGN


def _workspace_bytes(bl: GemmBlocking, itemsize: int) -> int:
    return _workspace_layout(bl, itemsize)[2]


def gemm_workspace_bytes(dtype: str = "float32", threads: int = 1) -> int:
    """Bytes of scratch ``emit_gemm``'s function needs (independent of M, N, K): one
    per-thread slice, times ``threads`` for ``emit_gemm(..., parallel=threads)``."""
    if threads < 1:
        raise ValueError(f"gemm: threads must be >= 1, got {threads}")
    return _workspace_bytes(_blocking(dtype), _ELEM[dtype][1]) * int(threads)


# ----------------------------------------------------------------------------- IR helpers

def _c(v: int) -> ir.Constant:
    return ir.Constant(I64, v)


@contextmanager
def _for(b: ir.IRBuilder, start, stop, step, name: str):
    """``for (i = start; i < stop; i += step)`` (signed compare); yields ``i``."""
    fn = b.block.function
    pre = b.block
    hdr = fn.append_basic_block(f"{name}.hdr")
    body = fn.append_basic_block(f"{name}.body")
    end = fn.append_basic_block(f"{name}.end")
    b.branch(hdr)
    b.position_at_end(hdr)
    i = b.phi(I64, name=name)
    i.add_incoming(start, pre)
    b.cbranch(b.icmp_signed("<", i, stop), body, end)
    b.position_at_end(body)
    yield i
    nxt = b.add(i, step if isinstance(step, ir.Value) else _c(step), name=f"{name}.next")
    i.add_incoming(nxt, b.block)
    b.branch(hdr)
    b.position_at_end(end)


def _smin(b: ir.IRBuilder, x, y, name=""):
    return b.select(b.icmp_signed("<", x, y), x, y, name=name)


def _gep(b: ir.IRBuilder, ty, p, off, name="", inbounds=False):
    return b.gep(p, [off], inbounds=inbounds, name=name, source_etype=ty)


def _field(b: ir.IRBuilder, p, struct_ty, i: int):
    """Address of field ``i`` of the struct at ``p`` (an opaque pointer or an alloca's)."""
    idx = [ir.Constant(ir.IntType(32), 0), ir.Constant(ir.IntType(32), i)]
    if getattr(p.type, "is_opaque", True):
        return b.gep(p, idx, inbounds=True, source_etype=struct_ty)
    return b.gep(p, idx, inbounds=True)  # typed (alloca): llvmlite derives the field type


def _intrinsic(module: ir.Module, name: str, fnty: ir.FunctionType) -> ir.Function:
    g = module.globals.get(name)
    if g is None:
        g = ir.Function(module, fnty, name=name)
    return g


def _new_function(module, name, argtys, argnames, ret=ir.VoidType(), internal=True):
    fn = ir.Function(module, ir.FunctionType(ret, argtys), name=name)
    for a, n in zip(fn.args, argnames):
        a.name = n
    if internal:
        fn.linkage = "internal"
    fn.attributes.add("nounwind")
    return fn


# ----------------------------------------------------------------------------- micro-kernel

def _apply_epilogue(b: ir.IRBuilder, epilogue, v, m, n, lanes: int, extra):
    """``epilogue(b, v, m, n, lanes, extra)``, checked to return a value of v's type."""
    r = epilogue(b, v, m, n, lanes, extra)
    if not isinstance(r, ir.Value) or r.type != v.type:
        raise TypeError(f"gemm epilogue must return a {v.type} value (lanes={lanes}), got {r!r}")
    return r


# how the micro-kernel reads A (its ``mode`` argument)
A_PACKED, A_ROWS, A_COLS = 0, 1, 2


def _emit_microkernel(module, name, elem, size, bl: GemmBlocking, epilogue=None,
                      extra_types=()) -> ir.Function:
    """``void ukr(ptr ap, i64 sa, i64 mode, ptr bp, i64 kc, ptr c, i64 ldc, i64 mr, i64 nr,
    i1 accum, ptr tile)``.

    ap: packed MR x kc sliver (k-major: ap[k*MR + i]); bp: packed kc x NR micro-panel,
    64-byte aligned (bp[k*NR + j]).  Writes the mr x nr corner of the tile to c (row
    stride ldc), adding to what is there when ``accum``.  ``tile`` is 64-byte aligned
    scratch for MR x NR elements, used by edge tiles.

    With an ``epilogue`` the signature continues ``i1 last, i64 m0, i64 n0, extra...``:
    when ``last`` (the final K block) every element of the tile passes through the
    epilogue, as ``<VL x T>`` vectors where VL whole columns are in bounds and as scalars
    in the ragged tail, with (m0, n0) the tile's first row and column in C.

    ``mode``: A_PACKED (``sa`` unused), or A read where it lies instead of from a packed
    sliver, for full tiles only (mr == MR: every row read exists), ``ap`` then being the
    tile's element (row 0, k 0) of A: A_ROWS (A[i, k] at ap[i*sa + k], a row-major A: MR
    row pointers sharing one index) or A_COLS (A[i, k] at ap[k*sa + i], a transposed A: MR
    neighbours of one pointer).  One k loop per mode, one write-back for all three.
    """
    MR, NV, VL, NR = bl.mr, bl.nv, bl.vl, bl.nr
    vec = ir.VectorType(elem, VL)
    fma = _intrinsic(module, f"llvm.fma.v{VL}{'f32' if size == 4 else 'f64'}",
                     ir.FunctionType(vec, [vec, vec, vec]))
    argtys = [PTR, I64, I64, PTR, I64, PTR, I64, I64, I64, I1, PTR]
    argnames = ["ap", "sa", "mode", "bp", "kc", "c", "ldc", "mr", "nr", "accum", "tile"]
    if epilogue is not None:
        argtys += [I1, I64, I64] + list(extra_types)
        argnames += ["last", "m0", "n0"] + [f"extra{i}" for i in range(len(extra_types))]
    fn = _new_function(module, name, argtys, argnames)
    fn.attributes.add("noinline")
    args = list(fn.args)
    sa, mode = args.pop(1), args.pop(1)
    for i in (0, 1, 3, 8):
        args[i].add_attribute("noalias")
    ap, bp, kc, c, ldc, mr, nr, accum, tile = args[:9]

    entry = fn.append_basic_block("entry")
    dispatch = fn.append_basic_block("k.mode")
    done = fn.append_basic_block("k.done")
    b = ir.IRBuilder(entry)
    zero = ir.Constant(vec, [0.0] * VL)
    if PREFETCH_C:
        # warm the C tile's lines while the k loop runs (addresses clamped into the tile)
        prefetch = _intrinsic(module, "llvm.prefetch.p0",
                              ir.FunctionType(ir.VoidType(), [PTR] + [ir.IntType(32)] * 3))
        last_col = b.sub(nr, _c(1))
        i32 = ir.IntType(32)
        for i in range(MR):
            row = _smin(b, _c(i), b.sub(mr, _c(1)))
            crow = _gep(b, elem, c, b.mul(row, ldc))
            for col in (_c(0), last_col):
                b.call(prefetch, [_gep(b, elem, crow, col), ir.Constant(i32, 1),
                                  ir.Constant(i32, 3), ir.Constant(i32, 1)])
    b.cbranch(b.icmp_signed(">", kc, _c(0)), dispatch, done)

    undef = ir.Constant(vec, None)
    splat = ir.Constant(ir.VectorType(ir.IntType(32), VL), [0] * VL)
    ends = []  # (last block of a k loop, its final accumulators)

    def k_loop(how):
        """acc[i][j] += broadcast(A[i, k]) * bp[k*NR + j*VL : +VL], k = 0 .. kc-1"""
        pre = b.block
        loop = fn.append_basic_block(f"k.{how}")
        arow = [_gep(b, elem, ap, b.mul(_c(i), sa), f"arow{i}") for i in range(MR)] \
            if how == "rows" else None
        b.branch(loop)
        b.position_at_end(loop)
        k = b.phi(I64, name=f"k.{how}")
        k.add_incoming(_c(0), pre)
        accs = [[b.phi(vec, name=f"acc{i}_{j}") for j in range(NV)] for i in range(MR)]
        for row in accs:
            for a in row:
                a.add_incoming(zero, pre)
        bk = _gep(b, elem, bp, b.mul(k, _c(NR)), "bk", inbounds=True)
        bv = [b.load(_gep(b, elem, bk, _c(j * VL), inbounds=True), name=f"b{j}", align=32, typ=vec)
              for j in range(NV)]
        if how != "rows":
            ak = _gep(b, elem, ap, b.mul(k, sa if how == "cols" else _c(MR)), "ak",
                      inbounds=how == "packed")
        new = []
        for i in range(MR):
            pa = _gep(b, elem, arow[i], k) if how == "rows" else _gep(b, elem, ak, _c(i), inbounds=True)
            a = b.load(pa, name=f"a{i}", align=size, typ=elem)
            av = b.shuffle_vector(b.insert_element(undef, a, ir.Constant(ir.IntType(32), 0)),
                                  undef, splat, name=f"av{i}")
            new.append([b.call(fma, [av, bv[j], accs[i][j]], name=f"acc{i}_{j}.n")
                        for j in range(NV)])
        k1 = b.add(k, _c(1), name="k.next")
        k.add_incoming(k1, loop)
        for i in range(MR):
            for j in range(NV):
                accs[i][j].add_incoming(new[i][j], loop)
        b.cbranch(b.icmp_signed("<", k1, kc), loop, done)
        ends.append((loop, new))

    b.position_at_end(dispatch)
    blocks = {how: fn.append_basic_block(f"k.{how}.pre") for how in ("packed", "rows", "cols")}
    sw = b.switch(mode, blocks["packed"])
    sw.add_case(_c(A_ROWS), blocks["rows"])
    sw.add_case(_c(A_COLS), blocks["cols"])
    for how, blk in blocks.items():
        b.position_at_end(blk)
        k_loop(how)

    b.position_at_end(done)
    res = []
    for i in range(MR):
        row = []
        for j in range(NV):
            p = b.phi(vec, name=f"r{i}_{j}")
            p.add_incoming(zero, entry)
            for loop, new in ends:
                p.add_incoming(new[i][j], loop)
            row.append(p)
        res.append(row)

    full_blk = fn.append_basic_block("full")
    edge_blk = fn.append_basic_block("edge")
    ret_blk = fn.append_basic_block("ret")
    full = b.and_(b.icmp_signed("==", mr, _c(MR)), b.icmp_signed("==", nr, _c(NR)))
    b.cbranch(full, full_blk, edge_blk)

    if epilogue is not None:
        last, m0, n0 = args[9:12]
        extra = list(args[12:])
        # last K block of a full tile: C = epilogue(acc [+ C]), a vector at a time
        b.position_at_end(full_blk)
        last_blk = fn.append_basic_block("full.last")
        full_blk = fn.append_basic_block("full.mid")
        b.cbranch(last, last_blk, full_blk)
        b.position_at_end(last_blk)
        for i in range(MR):
            crow = _gep(b, elem, c, b.mul(_c(i), ldc))
            m = b.add(m0, _c(i), name=f"m{i}")
            for j in range(NV):
                p = _gep(b, elem, crow, _c(j * VL))
                # the load is in bounds either way; select, so stale C never leaks in
                v = b.select(accum, b.fadd(b.load(p, align=size, typ=vec), res[i][j]), res[i][j])
                v = _apply_epilogue(b, epilogue, v, m, b.add(n0, _c(j * VL)), VL, extra)
                b.store(v, p, align=size)
        b.branch(ret_blk)

    # full tile: vector loads/stores straight to C
    b.position_at_end(full_blk)
    acc_blk = fn.append_basic_block("full.acc")
    set_blk = fn.append_basic_block("full.set")
    b.cbranch(accum, acc_blk, set_blk)
    for blk, add in ((acc_blk, True), (set_blk, False)):
        b.position_at_end(blk)
        for i in range(MR):
            crow = _gep(b, elem, c, b.mul(_c(i), ldc))
            for j in range(NV):
                p = _gep(b, elem, crow, _c(j * VL))
                v = res[i][j]
                if add:
                    v = b.fadd(b.load(p, align=size, typ=vec), v)
                b.store(v, p, align=size)
        b.branch(ret_blk)

    # edge tile (mr < MR or nr < NR)
    b.position_at_end(edge_blk)
    if epilogue is not None:
        # last K block: spill the tile, then whole vectors of the row where VL columns
        # remain, then scalars
        last_blk = fn.append_basic_block("edge.last")
        mid_blk = fn.append_basic_block("edge.mid")
        b.cbranch(last, last_blk, mid_blk)
        b.position_at_end(last_blk)
        for i in range(MR):
            for j in range(NV):
                b.store(res[i][j], _gep(b, elem, tile, _c(i * NR + j * VL), inbounds=True), align=32)
        vcols = b.and_(nr, _c(-VL), name="vcols")
        with _for(b, _c(0), mr, 1, "li") as i:
            crow = _gep(b, elem, c, b.mul(i, ldc))
            trow = _gep(b, elem, tile, b.mul(i, _c(NR)), inbounds=True)
            m = b.add(m0, i, name="m")
            for j in range(NV):
                with b.if_then(b.icmp_signed(">=", nr, _c((j + 1) * VL))):
                    t = b.load(_gep(b, elem, trow, _c(j * VL), inbounds=True), align=32, typ=vec)
                    p = _gep(b, elem, crow, _c(j * VL))
                    v = b.select(accum, b.fadd(b.load(p, align=size, typ=vec), t), t)
                    v = _apply_epilogue(b, epilogue, v, m, b.add(n0, _c(j * VL)), VL, extra)
                    b.store(v, p, align=size)
            with _for(b, vcols, nr, 1, "lj") as j:
                t = b.load(_gep(b, elem, trow, j, inbounds=True), align=size, typ=elem)
                p = _gep(b, elem, crow, j)
                v = b.select(accum, b.fadd(b.load(p, align=size, typ=elem), t), t)
                v = _apply_epilogue(b, epilogue, v, m, b.add(n0, j), 1, extra)
                b.store(v, p, align=size)
        b.branch(ret_blk)
        b.position_at_end(mid_blk)
    if not EDGE_FROM_REGISTERS:  # (the former write-back, for A/B runs)
        for i in range(MR):
            for j in range(NV):
                b.store(res[i][j], _gep(b, elem, tile, _c(i * NR + j * VL), inbounds=True), align=32)
        with _for(b, _c(0), mr, 1, "ei") as i:
            crow = _gep(b, elem, c, b.mul(i, ldc))
            trow = _gep(b, elem, tile, b.mul(i, _c(NR)), inbounds=True)
            with _for(b, _c(0), nr, 1, "ej") as j:
                t = b.load(_gep(b, elem, trow, j, inbounds=True), align=size, typ=elem)
                p = _gep(b, elem, crow, j)
                b.store(b.select(accum, b.fadd(b.load(p, align=size, typ=elem), t), t), p, align=size)
        b.branch(ret_blk)
        b.position_at_end(ret_blk)
        b.ret_void()
        return fn
    # rows below mr, each straight from the registers: whole vectors where VL columns
    # remain; a ragged last vector through the tile buffer, element by element.  (Spilling
    # the whole tile and copying every element made the edge write-back several times the
    # full one's: in an MLP with a batch of 64, one row tile in 11 is an edge.)
    for i in range(MR):
        with b.if_then(b.icmp_signed(">", mr, _c(i)), likely=True):
            crow = _gep(b, elem, c, b.mul(_c(i), ldc))
            for j in range(NV):
                left = b.sub(nr, _c(j * VL))
                whole, part = fn.append_basic_block(f"e{i}.{j}.whole"), fn.append_basic_block(f"e{i}.{j}.part")
                after = fn.append_basic_block(f"e{i}.{j}.after")
                b.cbranch(b.icmp_signed(">=", left, _c(VL)), whole, part)
                b.position_at_end(whole)
                p = _gep(b, elem, crow, _c(j * VL))
                v = res[i][j]
                v = b.select(accum, b.fadd(b.load(p, align=size, typ=vec), v), v)
                b.store(v, p, align=size)
                b.branch(after)
                b.position_at_end(part)
                with b.if_then(b.icmp_signed(">", left, _c(0))):
                    b.store(res[i][j], _gep(b, elem, tile, _c(i * NR + j * VL), inbounds=True), align=32)
                    with _for(b, _c(0), left, 1, f"e{i}.{j}.k") as k:
                        t = b.load(_gep(b, elem, tile, b.add(_c(i * NR + j * VL), k), inbounds=True),
                                   align=size, typ=elem)
                        q = _gep(b, elem, crow, b.add(_c(j * VL), k))
                        # accum ? old + t : t  -- the load is in bounds either way
                        b.store(b.select(accum, b.fadd(b.load(q, align=size, typ=elem), t), t), q, align=size)
                b.branch(after)
                b.position_at_end(after)
    b.branch(ret_blk)

    b.position_at_end(ret_blk)
    b.ret_void()
    return fn


# ----------------------------------------------------------------------------- packing

def _emit_pack_b(module, name, elem, size, bl: GemmBlocking) -> ir.Function:
    """``void pack_b(ptr b, i64 kc, i64 nc, i64 sbk, i64 sbn, ptr bp)``: kc x nc block of B
    into ceil(nc/NR) micro-panels, bp[jp*NR*kc + k*NR + j], zero-padded to NR columns."""
    NR, VL, NV = bl.nr, bl.vl, bl.nv
    vec = ir.VectorType(elem, VL)
    fn = _new_function(module, name, [PTR, I64, I64, I64, I64, PTR],
                       ["b", "kc", "nc", "sbk", "sbn", "bp"])
    fn.args[0].add_attribute("noalias")
    fn.args[5].add_attribute("noalias")
    src0, kc, nc, sbk, sbn, bp = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    zero = ir.Constant(elem, 0.0)
    with _for(b, _c(0), nc, NR, "jp") as jp:
        nb = _smin(b, _c(NR), b.sub(nc, jp), "nb")
        src = _gep(b, elem, src0, b.mul(jp, sbn), "src")
        dst = _gep(b, elem, bp, b.mul(jp, kc), "dst", inbounds=True)
        fast = b.and_(b.icmp_signed("==", nb, _c(NR)), b.icmp_signed("==", sbn, _c(1)))
        with b.if_else(fast) as (then, other):
            with then:  # rows of B contiguous: NV vector copies per k
                with _for(b, _c(0), kc, 1, "kf") as k:
                    s = _gep(b, elem, src, b.mul(k, sbk))
                    d = _gep(b, elem, dst, b.mul(k, _c(NR)), inbounds=True)
                    for j in range(NV):
                        v = b.load(_gep(b, elem, s, _c(j * VL)), align=size, typ=vec)
                        b.store(v, _gep(b, elem, d, _c(j * VL), inbounds=True), align=32)
            with other:
                colmajor = b.icmp_signed("==", sbk, _c(1))
                with b.if_else(colmajor) as (then2, other2):
                    with then2:  # B transposed: walk each column contiguously
                        # a full panel: VL x VL blocks transposed in registers, VL k at a time
                        kv = b.select(b.icmp_signed("==", nb, _c(NR)),
                                      b.mul(b.sdiv(kc, _c(VL)), _c(VL)), _c(0), name="kv")
                        with _for(b, _c(0), kv, VL, "kb") as k0:
                            with _for(b, _c(0), _c(NR), VL, "jb") as j0:
                                rows = [b.load(_gep(b, elem, src, b.add(b.mul(b.add(j0, _c(j)), sbn), k0)),
                                               align=size, typ=vec) for j in range(VL)]
                                for k, v in enumerate(_transpose(b, rows)):
                                    d = _gep(b, elem, dst, b.add(b.mul(b.add(k0, _c(k)), _c(NR)), j0),
                                             inbounds=True)
                                    b.store(v, d, align=32)
                        with _for(b, _c(0), nb, 1, "jt") as j:
                            s = _gep(b, elem, src, b.mul(j, sbn))
                            with _for(b, kv, kc, 1, "kt") as k:
                                v = b.load(_gep(b, elem, s, k), align=size, typ=elem)
                                d = _gep(b, elem, dst, b.add(b.mul(k, _c(NR)), j), inbounds=True)
                                b.store(v, d, align=size)
                    with other2:
                        with _for(b, _c(0), kc, 1, "kg") as k:
                            s = _gep(b, elem, src, b.mul(k, sbk))
                            d = _gep(b, elem, dst, b.mul(k, _c(NR)), inbounds=True)
                            with _for(b, _c(0), nb, 1, "jg") as j:
                                v = b.load(_gep(b, elem, s, b.mul(j, sbn)), align=size, typ=elem)
                                b.store(v, _gep(b, elem, d, j, inbounds=True), align=size)
                # zero padding of a ragged last panel
                with _for(b, _c(0), kc, 1, "kz") as k:
                    d = _gep(b, elem, dst, b.mul(k, _c(NR)), inbounds=True)
                    with _for(b, nb, _c(NR), 1, "jz") as j:
                        b.store(zero, _gep(b, elem, d, j, inbounds=True), align=size)
    b.ret_void()
    return fn


def _shuffle(b: ir.IRBuilder, x, y, mask):
    return b.shuffle_vector(x, y, ir.Constant(ir.VectorType(ir.IntType(32), len(mask)), list(mask)))


def _transpose(b: ir.IRBuilder, rows):
    """The transpose of a VL x VL block given as VL vectors (VL = 8 floats or 4 doubles):
    out[k][j] = rows[j][k], by the unpack / shuffle / 128-bit-lane steps AVX has."""
    n = len(rows)
    if n == 4:
        t = []
        for j in (0, 2):
            t += [_shuffle(b, rows[j], rows[j + 1], (0, 4, 2, 6)),
                  _shuffle(b, rows[j], rows[j + 1], (1, 5, 3, 7))]
        lo, hi = (0, 1, 4, 5), (2, 3, 6, 7)
        return [_shuffle(b, t[0], t[2], lo), _shuffle(b, t[1], t[3], lo),
                _shuffle(b, t[0], t[2], hi), _shuffle(b, t[1], t[3], hi)]
    assert n == 8, n
    t = []
    for j in range(0, 8, 2):
        t += [_shuffle(b, rows[j], rows[j + 1], (0, 8, 1, 9, 4, 12, 5, 13)),
              _shuffle(b, rows[j], rows[j + 1], (2, 10, 3, 11, 6, 14, 7, 15))]
    u = []
    for q in (0, 4):  # t[q..q+3] come from rows q..q+3
        for x in (0, 1):
            u += [_shuffle(b, t[q + x], t[q + x + 2], (0, 1, 8, 9, 4, 5, 12, 13)),
                  _shuffle(b, t[q + x], t[q + x + 2], (2, 3, 10, 11, 6, 7, 14, 15))]
    # u[0..3]: rows 0-3 at k = (0|4), (1|5), (2|6), (3|7); u[4..7]: rows 4-7 likewise
    lo, hi = (0, 1, 2, 3, 8, 9, 10, 11), (4, 5, 6, 7, 12, 13, 14, 15)
    return [_shuffle(b, u[k], u[k + 4], lo) for k in range(4)] + \
           [_shuffle(b, u[k], u[k + 4], hi) for k in range(4)]


def _emit_pack_a(module, name, elem, size, bl: GemmBlocking) -> ir.Function:
    """``void pack_a(ptr a, i64 mc, i64 kc, i64 sam, i64 sak, ptr ap)``: mc x kc block of A
    into ceil(mc/MR) slivers, ap[ip*MR*kc + k*MR + i], zero-padded to MR rows."""
    MR = bl.mr
    fn = _new_function(module, name, [PTR, I64, I64, I64, I64, PTR],
                       ["a", "mc", "kc", "sam", "sak", "ap"])
    fn.args[0].add_attribute("noalias")
    fn.args[5].add_attribute("noalias")
    src0, mc, kc, sam, sak, ap = fn.args
    b = ir.IRBuilder(fn.append_basic_block("entry"))
    zero = ir.Constant(elem, 0.0)
    with _for(b, _c(0), mc, MR, "ip") as ip:
        mb = _smin(b, _c(MR), b.sub(mc, ip), "mb")
        src = _gep(b, elem, src0, b.mul(ip, sam), "src")
        dst = _gep(b, elem, ap, b.mul(ip, kc), "dst", inbounds=True)
        with b.if_else(b.icmp_signed("==", mb, _c(MR))) as (then, other):
            with then:  # full sliver
                with b.if_else(b.icmp_signed("==", sam, _c(1))) as (cols, rowwise):
                    with cols:  # a transposed A (a weight gradient's X^T): the MR values of
                        # each k are contiguous, copied as vectors of 4 and 2 (in bounds).
                        # In-process A/B, 2 threads: 1024x512^T @ 1024x128 737 -> 723 us,
                        # 1024x128^T @ 1024x384 618 -> 602, x^T @ 1024x128 242 -> 230
                        parts = [(j, min(4, MR - j)) for j in range(0, MR, 4)]
                        with _for(b, _c(0), kc, 1, "kv") as k:
                            s_k = _gep(b, elem, src, b.mul(k, sak))
                            d = _gep(b, elem, dst, b.mul(k, _c(MR)), inbounds=True)
                            for j, n in parts:
                                vt = ir.VectorType(elem, n)
                                v = b.load(_gep(b, elem, s_k, _c(j)), align=size, typ=vt)
                                b.store(v, _gep(b, elem, d, _c(j), inbounds=True), align=size)
                    with rowwise:  # MR rows unrolled
                        rows = [_gep(b, elem, src, b.mul(_c(i), sam), f"row{i}") for i in range(MR)]
                        with _for(b, _c(0), kc, 1, "kf") as k:
                            off = b.mul(k, sak)
                            d = _gep(b, elem, dst, b.mul(k, _c(MR)), inbounds=True)
                            for i in range(MR):
                                v = b.load(_gep(b, elem, rows[i], off), align=size, typ=elem)
                                b.store(v, _gep(b, elem, d, _c(i), inbounds=True), align=size)
            with other:
                with _for(b, _c(0), kc, 1, "kg") as k:
                    s = _gep(b, elem, src, b.mul(k, sak))
                    d = _gep(b, elem, dst, b.mul(k, _c(MR)), inbounds=True)
                    with _for(b, _c(0), mb, 1, "ig") as i:
                        v = b.load(_gep(b, elem, s, b.mul(i, sam)), align=size, typ=elem)
                        b.store(v, _gep(b, elem, d, i, inbounds=True), align=size)
                    with _for(b, mb, _c(MR), 1, "iz") as i:
                        b.store(zero, _gep(b, elem, d, i, inbounds=True), align=size)
    b.ret_void()
    return fn


# ----------------------------------------------------------------------------- driver

# Parallel mode runs on one thread below this many flops (2*M*N*K) per thread.  With the
# native pool a spinning worker answers in under a microsecond, and a program's kernels run
# back to back, so its workers spin: two threads then win from about 48^3 (measured with
# hot workers, interleaved minima through ctypes: 48^3 3.7 -> 2.6 us, 64^3 6.9 -> 4.7,
# 64x256 @ 256x10 8.0 -> 5.8, 64x64 @ 64x256 22.0 -> 12.3; 32^3 2.3 -> 2.0 is left
# serial).  A worker asleep (idle > 200 us) costs the first call a futex wake and joins
# late (the caller never waits for a worker that has not joined).
PARALLEL_MIN_FLOPS_PER_THREAD = 1e5

PARALLEL_FOR = "narch_parallel_for"
NUM_THREADS = "narch_num_threads"


def gemm_threads(parallel=False) -> int:
    """The thread count ``emit_gemm(..., parallel=parallel)`` plans its workspace for:
    1 for serial, ``parallel`` itself for an int, the pool's thread count for True."""
    if parallel is None or parallel is False:
        return 1
    if parallel is True:
        from neural_arch.runtime import threadpool

        return threadpool.num_threads()
    n = int(parallel)
    if n < 1:
        raise ValueError(f"gemm: parallel must be a bool or a thread count >= 1, got {parallel!r}")
    return n


def emit_gemm(module: ir.Module, name: str, dtype: str = "float32", *,
              extra_arg_types=(), epilogue=None, parallel=False) -> ir.Function:
    """Add ``void name(A, B, C, M, N, K, sam, sak, sbk, sbn, scm, workspace, *extra)`` to
    ``module`` (see the module docstring); helpers are internal functions named ``name.*``.

    extra_arg_types: types of parameters appended after ``workspace`` (pointers to bias or
        residual buffers, their strides, scalars...), forwarded to the epilogue.
    epilogue: ``epilogue(builder, acc, m, n, lanes, extra_args) -> value``, called while
        emitting the final store of each piece of C: ``acc`` is the finished dot product,
        a ``<VL x T>`` vector of columns n..n+VL-1 (VL = 8 float32 / 4 float64, lanes = VL)
        or a scalar (lanes = 1); ``m``, ``n`` are i64 indices into C's (M, N);
        ``extra_args`` are the extra parameters as values usable at the builder's position.
        It returns the value to store (same type) and is applied exactly once per element of
        C, also when K == 0 (acc = 0).  Buffers it reads must not overlap C.
    parallel: False (serial), True (the pool's thread count, ``gemm_threads(True)``) or a
        thread count T.  The function then splits C into up to min(T, narch_num_threads())
        row or column ranges run through ``narch_parallel_for`` when the product is at least
        ``PARALLEL_MIN_FLOPS_PER_THREAD`` per thread, and needs a workspace of
        ``gemm_workspace_bytes(dtype, T)`` bytes (one slice per task).  The module must be
        loaded after ``runtime.threadpool.install()``.
    """
    return _emit_gemm(module, name, dtype, _blocking(dtype), tuple(extra_arg_types), epilogue,
                      gemm_threads(parallel))


def _emit_gemm(module: ir.Module, name: str, dtype: str, bl: GemmBlocking, extra_types=(),
               epilogue=None, threads: int = 1) -> ir.Function:
    elem, size = _ELEM[dtype]
    extra_types = tuple(extra_types)
    ukr = _emit_microkernel(module, f"{name}.ukr", elem, size, bl, epilogue, extra_types)
    pack_a = _emit_pack_a(module, f"{name}.pack_a", elem, size, bl)
    pack_b = _emit_pack_b(module, f"{name}.pack_b", elem, size, bl)
    helpers = (elem, size, bl, ukr, pack_a, pack_b, epilogue is not None)
    extra_names = [f"extra{i}" for i in range(len(extra_types))]

    fn = _new_function(module, name, [PTR, PTR, PTR] + [I64] * 8 + [PTR] + list(extra_types),
                       ["A", "B", "C", "M", "N", "K", "sam", "sak", "sbk", "sbn", "scm", "ws"]
                       + extra_names, internal=False)
    A, B, C, M, N, K, sam, sak, sbk, sbn, scm, ws = fn.args[:12]
    extra = list(fn.args[12:])
    entry = fn.append_basic_block("entry")
    work = fn.append_basic_block("work")
    out = fn.append_basic_block("out")
    b = ir.IRBuilder(entry)
    empty = b.or_(b.icmp_signed("<=", M, _c(0)), b.icmp_signed("<=", N, _c(0)))
    b.cbranch(empty, out, work)
    b.position_at_end(work)

    if threads <= 1:
        _emit_loops(b, helpers, A, B, C, _c(0), M, _c(0), N, K, sam, sak, sbk, sbn, scm, ws, extra)
        b.branch(out)
    else:
        body = _new_function(module, f"{name}.body",
                             [PTR, PTR, PTR] + [I64] * 4 + [I64] * 6 + [PTR] + list(extra_types),
                             ["A", "B", "C", "m0", "m1", "n0", "n1", "K", "sam", "sak", "sbk",
                              "sbn", "scm", "ws"] + extra_names)
        bb = ir.IRBuilder(body.append_basic_block("entry"))
        _emit_loops(bb, helpers, *body.args[:14], list(body.args[14:]))
        bb.ret_void()
        _emit_parallel(module, name, b, fn, body, bl, size, threads, extra_types, out)

    b.position_at_end(out)
    b.ret_void()
    return fn


def _emit_loops(b: ir.IRBuilder, helpers, A, B, C, m0, m1, n0, n1, K, sam, sak, sbk, sbn, scm,
                ws, extra):
    """The blocked loop nest for rows m0..m1-1 and columns n0..n1-1 of C (both non-empty),
    emitted at the builder's position (which it leaves at the loop's exit)."""
    elem, size, bl, ukr, pack_a, pack_b, has_epilogue = helpers
    MR, NR, KC, MC, NC = bl.mr, bl.nr, bl.kc, bl.mc, bl.nc
    fn = b.block.function
    # align the workspace to a cache line; packed B first, then packed A
    wsi = b.ptrtoint(ws, I64)
    pad = b.and_(b.sub(_c(0), wsi), _c(_ALIGN - 1))
    bp = b.gep(ws, [pad], source_etype=ir.IntType(8), name="bp")
    a_off, tile_off, _ = _workspace_layout(bl, size)
    ap = _gep(b, elem, bp, _c(a_off), "ap", inbounds=True)
    tile = _gep(b, elem, bp, _c(tile_off), "tile", inbounds=True)
    Kpos = b.select(b.icmp_signed(">", K, _c(0)), K, _c(0))
    direct = _direct_a(b, b.sub(m1, m0), b.sub(n1, n0), Kpos, sam, sak)

    with _for(b, n0, n1, NC, "jc") as jc:
        nc = _smin(b, _c(NC), b.sub(n1, jc), "nc")
        # do { ... } while (pc < K): K == 0 runs once with kc == 0 and stores zeros
        pre = b.block
        pc_blk = fn.append_basic_block("pc.body")
        pc_end = fn.append_basic_block("pc.end")
        b.branch(pc_blk)
        b.position_at_end(pc_blk)
        pc = b.phi(I64, name="pc")
        pc.add_incoming(_c(0), pre)
        kc = _smin(b, _c(KC), b.sub(Kpos, pc), "kc")
        accum = b.icmp_signed(">", pc, _c(0), name="accum")
        pc_next = b.add(pc, _c(KC), name="pc.next")
        last = b.icmp_signed(">=", pc_next, Kpos, name="last")
        bsrc = _gep(b, elem, B, b.add(b.mul(pc, sbk), b.mul(jc, sbn)), "bsrc")
        b.call(pack_b, [bsrc, kc, nc, sbk, sbn, bp])
        with _for(b, m0, m1, MC, "ic") as ic:
            mc = _smin(b, _c(MC), b.sub(m1, ic), "mc")
            asrc = _gep(b, elem, A, b.add(b.mul(ic, sam), b.mul(pc, sak)), "asrc")
            cblk = _gep(b, elem, C, b.add(b.mul(ic, scm), jc), "cblk")

            def tiles(call_tile):
                with _for(b, _c(0), nc, NR, "jr") as jr:
                    nr = _smin(b, _c(NR), b.sub(nc, jr), "nr")
                    bpan = _gep(b, elem, bp, b.mul(jr, kc), "bpan", inbounds=True)
                    with _for(b, _c(0), mc, MR, "ir") as ir_:
                        mr = _smin(b, _c(MR), b.sub(mc, ir_), "mr")
                        ctile = _gep(b, elem, cblk, b.add(b.mul(ir_, scm), jr), "ctile")
                        rest = [bpan, kc, ctile, scm, mr, nr, accum, tile]
                        if has_epilogue:
                            rest += [last, b.add(ic, ir_), b.add(jc, jr)] + list(extra)
                        call_tile(ir_, mr, rest)

            packed_mode = [_c(0), _c(A_PACKED)]

            def packed(ir_, mr, rest):
                b.call(ukr, [_gep(b, elem, ap, b.mul(ir_, kc), "apan", inbounds=True)] + packed_mode + rest)

            def in_place(ir_, mr, rest):
                # full tiles read A in place (A_ROWS or A_COLS), the last rows packed once below
                full = b.icmp_signed("==", mr, _c(MR))
                a = b.select(full, _gep(b, elem, asrc, b.mul(ir_, sam), "atile"), ap)
                b.call(ukr, [a, dstride, b.select(full, dmode, _c(A_PACKED))] + rest)

            with b.if_else(direct) as (then, other):
                with then:  # A read in place, but for the last rows (mc % MR of them), which
                    # are packed (zero-padded: nothing past row M is read)
                    mfull = b.mul(b.sdiv(mc, _c(MR)), _c(MR), name="mfull")
                    with b.if_then(b.icmp_signed("<", mfull, mc)):
                        b.call(pack_a, [_gep(b, elem, asrc, b.mul(mfull, sam)), b.sub(mc, mfull), kc,
                                        sam, sak, ap])
                    rows = b.icmp_signed("==", sak, _c(1))
                    dmode = b.select(rows, _c(A_ROWS), _c(A_COLS))
                    dstride = b.select(rows, sam, sak)
                    tiles(in_place)
                with other:
                    b.call(pack_a, [asrc, mc, kc, sam, sak, ap])
                    tiles(packed)
        pc.add_incoming(pc_next, b.block)
        b.cbranch(b.icmp_signed("<", pc_next, Kpos), pc_blk, pc_end)
        b.position_at_end(pc_end)


# A is read in place (no packed copy) when one of its strides is 1 and the product is small
# (A has at most DIRECT_A_MAX_MK elements, or C at most DIRECT_A_MAX_N columns: packing A
# costs about a cycle per element, repaid over N / NR column panels).  The micro-kernel then
# broadcasts from MR row pointers (row-major A) or MR neighbours (transposed A); the last
# M % MR rows are still packed.  Measured (interleaved minima, 2 threads): 64x256 @ 256x64^T
# 25.0 -> 21.1 us, 64x256 @ 256x10 9.6 -> 7.9 us, 64x256 @ 256x256 43.7 -> 42.6 us; large
# squares within 1 % either way.
DIRECT_A_MAX_N = 64
DIRECT_A_MAX_MK = 1 << 16


def _direct_a(b: ir.IRBuilder, M, N, K, sam, sak):
    """i1: read A in place for this product (see DIRECT_A_*)."""
    unit = b.or_(b.icmp_signed("==", sak, _c(1)), b.icmp_signed("==", sam, _c(1)))
    small = b.or_(b.icmp_signed("<=", N, _c(DIRECT_A_MAX_N)),
                  b.icmp_signed("<=", b.mul(M, K), _c(DIRECT_A_MAX_MK)))
    return b.and_(unit, small, name="direct_a")


@dataclass(frozen=True)
class GemmParts:
    """The GEMM's building blocks emitted into a module, for kernels that drive them with
    their own loops (the fused attention): ``ukr`` the micro-kernel, ``pack_a`` / ``pack_b``
    (signatures in their emitters' docstrings), the blocking, and the A modes."""
    ukr: ir.Function
    pack_a: ir.Function
    pack_b: ir.Function
    blocking: GemmBlocking
    A_PACKED: int = A_PACKED
    A_ROWS: int = A_ROWS
    A_COLS: int = A_COLS


def emit_gemm_parts(module: ir.Module, name: str, dtype: str = "float32") -> GemmParts:
    """``name.ukr``, ``name.pack_a``, ``name.pack_b`` (internal) in ``module``, once."""
    try:
        return GemmParts(module.get_global(f"{name}.ukr"), module.get_global(f"{name}.pack_a"),
                         module.get_global(f"{name}.pack_b"), _blocking(dtype))
    except KeyError:
        pass
    elem, size = _ELEM[dtype]
    bl = _blocking(dtype)
    return GemmParts(_emit_microkernel(module, f"{name}.ukr", elem, size, bl),
                     _emit_pack_a(module, f"{name}.pack_a", elem, size, bl),
                     _emit_pack_b(module, f"{name}.pack_b", elem, size, bl), bl)

def _emit_parallel(module, name, b: ir.IRBuilder, fn, body, bl: GemmBlocking, size: int,
                   threads: int, extra_types, out):
    """The parallel driver in ``fn`` (builder at its non-empty case): split C over up to
    ``threads`` tasks, each with its own workspace slice, or call ``body`` inline."""
    A, B, C, M, N, K, sam, sak, sbk, sbn, scm, ws = fn.args[:12]
    extra = list(fn.args[12:])
    MR, NR = bl.mr, bl.nr
    wsb = _workspace_bytes(bl, size)
    nthreads = _intrinsic(module, NUM_THREADS, ir.FunctionType(I64, []))
    pfor = _intrinsic(module, PARALLEL_FOR, ir.FunctionType(ir.VoidType(), [PTR, PTR, I64]))
    # ctx: the arguments, then (use_m, units, tasks)
    fields = [PTR, PTR, PTR] + [I64] * 8 + [PTR] + [I64] * 3 + list(extra_types)
    ctx_ty = ir.LiteralStructType(fields)

    # task(ctx, t): units [t*units/tasks, (t+1)*units/tasks) of rows (MR) or columns (NR)
    task = _new_function(module, f"{name}.task", [PTR, I64], ["ctx", "t"])
    tb = ir.IRBuilder(task.append_basic_block("entry"))
    cx, t = task.args
    vals = [tb.load(_field(tb, cx, ctx_ty, i), typ=ty) for i, ty in enumerate(fields)]
    tA, tB, tC, tM, tN, tK, tsam, tsak, tsbk, tsbn, tscm, tws, use_m, units, tasks = vals[:15]
    lo = tb.sdiv(tb.mul(t, units), tasks)
    hi = tb.sdiv(tb.mul(tb.add(t, _c(1)), units), tasks)
    is_m = tb.icmp_signed("!=", use_m, _c(0))
    unit = tb.select(is_m, _c(MR), _c(NR))
    dim = tb.select(is_m, tM, tN)
    lo, hi = tb.mul(lo, unit), _smin(tb, tb.mul(hi, unit), dim)
    m0, m1 = tb.select(is_m, lo, _c(0)), tb.select(is_m, hi, tM)
    n0, n1 = tb.select(is_m, _c(0), lo), tb.select(is_m, tN, hi)
    tws = tb.gep(tws, [tb.mul(t, _c(wsb))], source_etype=ir.IntType(8), name="ws.t")
    with tb.if_then(tb.icmp_signed("<", lo, hi)):
        tb.call(body, [tA, tB, tC, m0, m1, n0, n1, tK, tsam, tsak, tsbk, tsbn, tscm, tws]
                + vals[15:])
    tb.ret_void()

    # the caller: how many tasks, along which dimension
    T = _smin(b, b.call(nthreads, []), _c(threads), "threads")
    Kp = b.select(b.icmp_signed(">", K, _c(1)), K, _c(1))
    mnk = b.mul(b.mul(M, N), Kp, name="mnk")
    big = b.icmp_signed(">=", mnk, b.mul(T, _c(int(PARALLEL_MIN_FLOPS_PER_THREAD // 2))))
    mu = b.sdiv(b.add(M, _c(MR - 1)), _c(MR), name="m.units")
    nu = b.sdiv(b.add(N, _c(NR - 1)), _c(NR), name="n.units")
    # split the longer side of C unless it has a single unit; the columns when A is read in
    # place (each task then packs only its own columns of B, and nothing of A: a row split
    # packs all of B in every task).  256x64^T @ 64x256: 46.7 -> 42.8 us, 256^3 162 -> 154.
    pref_m = b.and_(b.icmp_signed(">=", M, N), b.not_(_direct_a(b, M, N, K, sam, sak)))
    m_ok, n_ok = b.icmp_signed(">=", mu, _c(2)), b.icmp_signed(">=", nu, _c(2))
    use_m = b.select(pref_m, b.or_(m_ok, b.not_(n_ok)), b.and_(b.not_(n_ok), m_ok))
    units = b.select(use_m, mu, nu, name="units")
    tasks = _smin(b, T, units, "tasks")
    go = b.and_(big, b.icmp_signed(">=", tasks, _c(2)))
    par_blk = b.append_basic_block("parallel")
    ser_blk = b.append_basic_block("serial")
    b.cbranch(go, par_blk, ser_blk)

    b.position_at_end(ser_blk)
    b.call(body, [A, B, C, _c(0), M, _c(0), N, K, sam, sak, sbk, sbn, scm, ws] + extra)
    b.branch(out)

    b.position_at_end(par_blk)
    b.position_at_start(fn.entry_basic_block)
    ctx = b.alloca(ctx_ty, name="ctx")
    b.position_at_end(par_blk)
    vals = [A, B, C, M, N, K, sam, sak, sbk, sbn, scm, ws, b.zext(use_m, I64), units, tasks] + extra
    for i, v in enumerate(vals):
        b.store(v, _field(b, ctx, ctx_ty, i))
    b.call(pfor, [task, ctx, tasks])
    b.branch(out)


# ----------------------------------------------------------------------------- Python face

_ARGTYPES = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p) + (ctypes.c_int64,) * 8 + (
    ctypes.c_void_p,)


class GemmKernel:
    """A jit-loaded gemm for one dtype, callable on NumPy arrays: ``kernel(a, b) -> a @ b``.

    ``parallel`` as for ``emit_gemm``: the kernel then splits large products over the
    native pool itself (``self.threads`` workspace slices)."""

    def __init__(self, dtype: str = "float32", blocking: GemmBlocking | None = None,
                 parallel=False):
        from neural_arch.runtime import jit

        self.dtype = np.dtype(dtype)
        self.blocking = blocking or _blocking(dtype)
        self.threads = gemm_threads(parallel)
        self.symbol = f"narch_gemm_{dtype}" + (f"_par{self.threads}" if self.threads > 1 else "")
        module = ir.Module(name=self.symbol)
        _emit_gemm(module, self.symbol, dtype, self.blocking, threads=self.threads)
        self.llvm_ir = str(module)
        self.module = jit.optimize(self.llvm_ir, self.symbol)
        if self.threads > 1:
            from neural_arch.runtime import threadpool

            threadpool.install()
        self._loaded = jit.load(self.module)
        self.raw = self._loaded.function(self.symbol, None, *_ARGTYPES)
        self.workspace_bytes = _workspace_bytes(self.blocking, self.dtype.itemsize) * self.threads
        self._tls = threading.local()

    def assembly(self) -> str:
        from neural_arch.runtime import jit

        return jit.emit_assembly(self.module)

    def workspace(self) -> np.ndarray:
        """This thread's scratch buffer (allocated once per thread and kept)."""
        ws = getattr(self._tls, "ws", None)
        if ws is None:
            ws = self._tls.ws = np.zeros(self.workspace_bytes, np.uint8)
        return ws

    def _operand(self, x) -> np.ndarray:
        x = np.asarray(x)
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)
        if x.ndim != 2:
            raise ValueError(f"gemm: expected a 2-d array, got shape {x.shape}")
        if any(s % x.itemsize for s in x.strides):
            x = np.ascontiguousarray(x)
        return x

    def prepare(self, a, b, out=None):
        """Checked operands and output for ``run``."""
        a, b = self._operand(a), self._operand(b)
        (M, K), (K2, N) = a.shape, b.shape
        if K != K2:
            raise ValueError(f"gemm: inner dimensions differ: {a.shape} @ {b.shape}")
        if out is None:
            out = np.empty((M, N), self.dtype)
        elif (out.shape != (M, N) or out.dtype != self.dtype
              or (N > 1 and out.strides[1] != out.itemsize) or out.strides[0] % out.itemsize):
            raise ValueError("gemm: out must be an (M, N) array of the kernel's dtype "
                             "with unit column stride")
        return a, b, out

    def run(self, a, b, out, m0: int = 0, m1: int | None = None, workspace=None) -> None:
        """C[m0:m1] = A[m0:m1] @ B on prepared operands (rows split across threads)."""
        M, K = a.shape
        N = b.shape[1]
        m1 = M if m1 is None else m1
        if not 0 <= m0 <= m1 <= M:
            raise ValueError(f"gemm: bad row range {m0}:{m1} of {M}")
        it = self.dtype.itemsize
        sam, sak = (s // it for s in a.strides)
        sbk, sbn = (s // it for s in b.strides)
        scm = out.strides[0] // it
        if workspace is None:
            ws_addr = getattr(self._tls, "ws_addr", None)
            if ws_addr is None:
                ws_addr = self._tls.ws_addr = self.workspace().ctypes.data
        else:
            if workspace.nbytes < self.workspace_bytes:
                raise ValueError("gemm: workspace too small")
            ws_addr = workspace.ctypes.data
        # rows m0.. of A and C; an empty range passes the base pointers, which are not read
        pa, pc = a.ctypes.data, out.ctypes.data
        if m1 > m0:
            pa, pc = pa + m0 * sam * it, pc + m0 * scm * it
        self.raw(pa, b.ctypes.data, pc, m1 - m0, N, K, sam, sak, sbk, sbn, scm, ws_addr)

    def __call__(self, a, b, out=None) -> np.ndarray:
        a, b, out = self.prepare(a, b, out)
        self.run(a, b, out)
        return out


def compile_gemm(dtype: str = "float32", parallel=False) -> GemmKernel:
    """The gemm for ``dtype``, built and jit-loaded once; ``compile_gemm()(a, b) == a @ b``.
    ``parallel=True`` (or a thread count): the kernel splits large products over the
    native thread pool (see ``emit_gemm``)."""
    _blocking(dtype)
    return _compile_gemm(dtype, gemm_threads(parallel))


@lru_cache(maxsize=None)
def _compile_gemm(dtype: str, threads: int) -> GemmKernel:
    return GemmKernel(dtype, parallel=threads)
