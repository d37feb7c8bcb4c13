"""Our gemm (compiler/codegen/gemm.py) against NumPy float64 on ragged, transposed,
strided and empty shapes."""
from __future__ import annotations

import ctypes
import re
import threading

import llvmlite.ir as ir
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from neural_arch.compiler.codegen.gemm import (BLOCKING, GemmBlocking, GemmKernel,
                                               compile_gemm, emit_gemm, gemm_workspace_bytes)

RTOL = {"float32": 2e-6, "float64": 1e-14}


def reference(a, b):
    return a.astype(np.float64) @ b.astype(np.float64)


def check(c, a, b, dtype):
    """|c - a@b| <= tol * K * (|a| @ |b|), elementwise: the float error bound of a dot
    product of length K, with a small constant."""
    assert c.dtype == np.dtype(dtype) and c.shape == (a.shape[0], b.shape[1])
    K = a.shape[1]
    ref = reference(a, b)
    bound = RTOL[dtype] * max(K, 1) * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))
    bad = np.abs(c - ref) > bound + np.finfo(dtype).tiny
    assert not bad.any(), (
        f"{int(bad.sum())} wrong of {c.size}; first at {np.argwhere(bad)[0]}: "
        f"{c[tuple(np.argwhere(bad)[0])]} vs {ref[tuple(np.argwhere(bad)[0])]}")


def operand(rng, shape, dtype, layout):
    """A (rows, cols) array laid out as: 'c' contiguous, 'f' transposed (column-major),
    's' strided view of a bigger array, 'n' negative strides."""
    r, c = shape
    if layout == "c":
        return rng.standard_normal((r, c)).astype(dtype)
    if layout == "f":
        return rng.standard_normal((c, r)).astype(dtype).T
    if layout == "s":
        return rng.standard_normal((2 * r + 1, 3 * c + 2)).astype(dtype)[1::2, 2::3][:r, :c]
    if layout == "n":
        return rng.standard_normal((r, c)).astype(dtype)[::-1, ::-1]
    raise ValueError(layout)


LAYOUTS = ["c", "f", "s", "n"]


@settings(max_examples=max(60, settings.default.max_examples), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(0, 300), N=st.integers(0, 300), K=st.integers(0, 300),
       la=st.sampled_from(LAYOUTS), lb=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31))
def test_ragged_float32(M, N, K, la, lb, seed):
    rng = np.random.default_rng(seed)
    a, b = operand(rng, (M, K), "float32", la), operand(rng, (K, N), "float32", lb)
    check(compile_gemm("float32")(a, b), a, b, "float32")


@settings(max_examples=max(25, settings.default.max_examples // 2), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(M=st.integers(0, 200), N=st.integers(0, 200), K=st.integers(0, 300),
       la=st.sampled_from(LAYOUTS), lb=st.sampled_from(LAYOUTS), seed=st.integers(0, 2**31))
def test_ragged_float64(M, N, K, la, lb, seed):
    rng = np.random.default_rng(seed)
    a, b = operand(rng, (M, K), "float64", la), operand(rng, (K, N), "float64", lb)
    check(compile_gemm("float64")(a, b), a, b, "float64")


# Edges of every block: MR=6, NR=16 (f32) / 8 (f64), KC, MC, NC, and one past.
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("M,N,K", [
    (1, 1, 1), (6, 16, 1), (5, 15, 7), (7, 17, 3), (13, 33, 255), (12, 32, 256),
    (145, 17, 257), (143, 2049, 11), (300, 300, 300), (289, 1031, 513), (1024, 64, 40),
])
def test_fixed_shapes(dtype, M, N, K):
    rng = np.random.default_rng(M * 1000003 + N * 1009 + K)
    g = compile_gemm(dtype)
    for la, lb in [("c", "c"), ("f", "f"), ("c", "f"), ("s", "n")]:
        a, b = operand(rng, (M, K), dtype, la), operand(rng, (K, N), dtype, lb)
        check(g(a, b), a, b, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_large(dtype):
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((700, 600)).astype(dtype), rng.standard_normal((600, 2100)).astype(dtype)
    check(compile_gemm(dtype)(a, b), a, b, dtype)
    check(compile_gemm(dtype)(b.T, a.T), b.T, a.T, dtype)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("M,N", [(0, 0), (1, 1), (7, 300), (300, 17)])
def test_k_zero_gives_zeros(dtype, M, N):
    out = np.full((M, N), np.nan, dtype)
    g = compile_gemm(dtype)
    res = g(np.empty((M, 0), dtype), np.empty((0, N), dtype), out=out)
    assert res is out and np.array_equal(out, np.zeros((M, N), dtype))


@pytest.mark.parametrize("M,N,K", [(0, 5, 3), (5, 0, 3), (0, 0, 0), (0, 300, 300), (300, 0, 300)])
def test_empty_output(M, N, K):
    g = compile_gemm("float32")
    c = g(np.ones((M, K), np.float32), np.ones((K, N), np.float32))
    assert c.shape == (M, N)


def test_overwrites_and_writes_only_inside_c():
    """C is overwritten (not accumulated) and nothing outside the (M, N) window of a
    bigger buffer is touched, including the row padding between rows."""
    rng = np.random.default_rng(2)
    for (M, N, K) in [(13, 17, 300), (7, 5, 600), (150, 40, 9)]:
        a = rng.standard_normal((M, K)).astype(np.float32)
        b = rng.standard_normal((K, N)).astype(np.float32)
        big = np.full((M + 2, N + 7), 7.0, np.float32)
        out = big[1:M + 1, 3:N + 3]
        compile_gemm("float32")(a, b, out=out)
        check(out, a, b, "float32")
        mask = np.ones(big.shape, bool)
        mask[1:M + 1, 3:N + 3] = False
        assert (big[mask] == 7.0).all()


class GuardedPages:
    """Arrays placed flush against PROT_NONE pages, so any out-of-bounds access by the
    kernel (before the first or after the last element) faults."""

    PAGE = 4096

    def __init__(self):
        import mmap

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_int, ctypes.c_long]
        self.libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.mmap = mmap
        self.maps = []

    def array(self, shape, dtype, at_end: bool):
        """A C-contiguous array whose last byte ends a page (at_end) or whose first byte
        starts one, with an inaccessible page on that side."""
        m = self.mmap
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        data_pages = -(-max(nbytes, 1) // self.PAGE)
        total = (data_pages + 2) * self.PAGE
        base = self.libc.mmap(None, total, m.PROT_READ | m.PROT_WRITE,
                              m.MAP_PRIVATE | m.MAP_ANONYMOUS, -1, 0)
        assert base not in (None, ctypes.c_void_p(-1).value)
        self.maps.append((base, total))
        assert self.libc.mprotect(base, self.PAGE, 0) == 0
        assert self.libc.mprotect(base + (data_pages + 1) * self.PAGE, self.PAGE, 0) == 0
        start = base + self.PAGE + (data_pages * self.PAGE - nbytes if at_end else 0)
        buf = (ctypes.c_char * nbytes).from_address(start)
        return np.frombuffer(buf, dtype=dtype, count=int(np.prod(shape))).reshape(shape)

    def close(self):
        for base, total in self.maps:
            self.libc.munmap(base, total)
        self.maps.clear()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_no_out_of_bounds_access(dtype):
    """Operands, C and the workspace flush against inaccessible pages on either side; a
    stray read or write would crash the test process."""
    g = compile_gemm(dtype)
    rng = np.random.default_rng(3)
    pages = GuardedPages()
    try:
        for (M, N, K) in [(1, 1, 1), (7, 19, 13), (6, 16, 256), (31, 45, 259), (145, 33, 7),
                          (13, 64, 21), (64, 10, 256), (11, 300, 9)]:
            for at_end in (True, False):
                ws = pages.array((g.workspace_bytes,), np.uint8, at_end)
                a0 = pages.array((M, K), dtype, at_end)
                b0 = pages.array((K, N), dtype, at_end)
                at = pages.array((K, M), dtype, at_end)
                bt = pages.array((N, K), dtype, at_end)
                a0[...] = rng.standard_normal((M, K))
                b0[...] = rng.standard_normal((K, N))
                at[...] = a0.T
                bt[...] = b0.T
                for a, b in [(a0, b0), (at.T, bt.T), (a0[::-1], b0[:, ::-1])]:
                    c = pages.array((M, N), dtype, at_end)
                    a_, b_, c_ = g.prepare(a, b, c)
                    g.run(a_, b_, c_, workspace=ws)
                    check(c, a, b, dtype)
    finally:
        pages.close()


def test_inf_nan_propagate():
    a = np.ones((8, 8), np.float32)
    b = np.ones((8, 20), np.float32)
    a[2, 3] = np.inf
    b[4, 7] = np.nan
    c = compile_gemm("float32")(a, b)
    with np.errstate(invalid="ignore"):
        ref = reference(a, b)
    assert np.array_equal(np.isnan(c), np.isnan(ref)) and np.array_equal(np.isinf(c), np.isinf(ref))


def test_row_ranges_from_two_threads():
    """Two threads computing disjoint row ranges with their own workspaces."""
    g = compile_gemm("float32")
    rng = np.random.default_rng(4)
    a = rng.standard_normal((301, 257)).astype(np.float32)
    b = rng.standard_normal((257, 190)).astype(np.float32)
    a, b, out = g.prepare(a, b)
    ws = [np.zeros(g.workspace_bytes, np.uint8) for _ in range(2)]
    t = threading.Thread(target=g.run, args=(a, b, out, 150, 301, ws[1]))
    t.start()
    g.run(a, b, out, 0, 150, ws[0])
    t.join()
    check(out, a, b, "float32")


def test_column_ranges_through_the_raw_function():
    """Splitting N instead of M: offset B by n0*sbn and C by n0, pass N = n1 - n0."""
    g = compile_gemm("float32")
    rng = np.random.default_rng(7)
    a = rng.standard_normal((50, 70)).astype(np.float32)
    b = rng.standard_normal((90, 70)).astype(np.float32).T  # (70, 90), transposed
    out = np.zeros((50, 90), np.float32)
    it = 4
    sbk, sbn = b.strides[0] // it, b.strides[1] // it
    ws = g.workspace()
    for n0, n1 in [(0, 37), (37, 90)]:
        g.raw(a.ctypes.data, b.ctypes.data + n0 * sbn * it, out.ctypes.data + n0 * it,
              50, n1 - n0, 70, 70, 1, sbk, sbn, 90, ws.ctypes.data)
    check(out, a, b, "float32")


def test_emit_into_shared_module_with_unaligned_workspace():
    """emit_gemm's raw interface: two dtypes in one module, called through ctypes with a
    workspace of exactly gemm_workspace_bytes at an odd address."""
    from neural_arch.runtime import jit

    module = ir.Module(name="t")
    f32 = emit_gemm(module, "mm32", "float32")
    f64 = emit_gemm(module, "mm64", dtype="float64")
    assert f32.name == "mm32" and f64.name == "mm64"
    assert [str(a.type) for a in f32.args] == ["ptr"] * 3 + ["i64"] * 8 + ["ptr"]
    loaded = jit.load(jit.optimize(str(module), "t"))
    argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 8 + [ctypes.c_void_p]
    rng = np.random.default_rng(5)
    for sym, dtype in [("mm32", "float32"), ("mm64", "float64")]:
        fn = loaded.function(sym, None, *argtypes)
        M, N, K = 37, 29, 301
        a = rng.standard_normal((K, M)).astype(dtype)  # used transposed
        b = rng.standard_normal((K, N)).astype(dtype)
        c = np.zeros((M, N + 3), dtype)  # row stride N + 3
        nbytes = gemm_workspace_bytes(dtype)
        raw = np.zeros(nbytes + 64 + 3, np.uint8)
        ws = raw[3:3 + nbytes]
        guard = raw[3 + nbytes:].copy()
        fn(a.ctypes.data, b.ctypes.data, c.ctypes.data, M, N, K, 1, M, N, 1, N + 3, ws.ctypes.data)
        check(c[:, :N], a.T, b, dtype)
        assert (c[:, N:] == 0).all()
        assert np.array_equal(raw[3 + nbytes:], guard)


def test_workspace_size_is_constant_and_reasonable():
    for dtype in ("float32", "float64"):
        n = gemm_workspace_bytes(dtype)
        bl = BLOCKING[dtype]
        assert n >= (bl.kc * bl.nc + bl.mc * bl.kc) * np.dtype(dtype).itemsize
        assert n < 8 << 20


def test_small_blocking_exercises_every_loop():
    """Tiny cache blocks make every blocking loop (jc, pc, ic, jr, ir) run many times on
    small inputs."""
    g = GemmKernel("float32", GemmBlocking(vl=8, mr=6, nv=2, kc=5, mc=12, nc=32))
    rng = np.random.default_rng(6)
    for (M, N, K) in [(25, 70, 11), (12, 32, 10), (1, 1, 1), (40, 33, 0), (13, 65, 16)]:
        for la, lb in [("c", "c"), ("f", "s")]:
            a, b = operand(rng, (M, K), "float32", la), operand(rng, (K, N), "float32", lb)
            check(g(a, b), a, b, "float32")


def test_bad_arguments():
    g = compile_gemm("float32")
    with pytest.raises(ValueError, match="inner dimensions"):
        g(np.ones((3, 4), np.float32), np.ones((5, 2), np.float32))
    with pytest.raises(ValueError, match="2-d"):
        g(np.ones(3, np.float32), np.ones((3, 2), np.float32))
    with pytest.raises(ValueError, match="unsupported dtype"):
        compile_gemm("int32")


def _fma_blocks(asm: str, function: str) -> list[list[str]]:
    """Instructions of the basic blocks of ``function``, the ones with the most FMAs first (a
    block ends at a label or a jump)."""
    body = asm[asm.index(f"\n{function}:"):]
    body = body[:body.index(".Lfunc_end")]
    blocks, cur = [], []
    for line in body.splitlines()[1:]:
        line = line.strip()
        if line.endswith(":"):
            blocks.append(cur)
            cur = []
        elif line and not line.startswith((".", "#")):
            cur.append(line)
            if line.startswith("j"):
                blocks.append(cur)
                cur = []
    blocks.append(cur)
    return sorted(blocks, key=lambda blk: -sum(i.startswith("vfmadd") for i in blk))


@pytest.mark.parametrize("dtype,fma", [("float32", "vfmadd231ps"), ("float64", "vfmadd231pd")])
def test_micro_kernel_assembly(dtype, fma):
    """The micro-kernel's three k loops (A packed, A read in place by rows, A transposed read
    in place) are FMAs on ymm registers with no stack traffic (no spills), and no AVX-512
    anywhere."""
    g = compile_gemm(dtype)
    asm = g.assembly()
    assert "zmm" not in asm
    bl = g.blocking
    loops = [blk for blk in _fma_blocks(asm, f"{g.symbol}.ukr")
             if sum(i.startswith("vfmadd") for i in blk) >= bl.mr * bl.nv]
    assert len(loops) == 3, [len(blk) for blk in loops]
    body = asm[asm.index(f"\n{g.symbol}.ukr:"):]
    frame = "movq\t%rsp, %rbp" in body[:body.index(".Lfunc_end")]  # else rbp is a plain register
    stack = r"\(%r[sb]p\b" if frame else r"\(%rsp\b"
    for loop in loops:
        fmas = [i for i in loop if i.startswith("vfmadd")]
        assert len(fmas) % (bl.mr * bl.nv) == 0, loop
        assert all(i.startswith(fma) and i.count("%ymm") == 3 for i in fmas), fmas
        assert not any(re.search(stack, i) for i in loop), loop  # no spills in the k loop


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_small_products_read_a_in_place(dtype):
    """A with a unit stride in a small product is read where it lies: the packed-A region
    of the workspace is written only for the last M % MR rows (one zero-padded sliver);
    a large A, or one with no unit stride, is packed."""
    g = compile_gemm(dtype)
    bl, it = g.blocking, np.dtype(dtype).itemsize
    a_off, tile_off, _ = gemm_mod._workspace_layout(bl, it)
    rng = np.random.default_rng(11)
    for M, N, K, la, lb, direct in [(12, 256, 64, "c", "c", True), (12, 256, 64, "f", "f", True),
                                    (64, 10, 256, "c", "f", True), (13, 40, 20, "f", "c", True),
                                    (19, 300, 70, "n", "c", False), (300, 300, 300, "c", "c", False),
                                    (12, 40, 20, "s", "c", False)]:
        ws = np.zeros(g.workspace_bytes, np.uint8)
        pad = -ws.ctypes.data % 64
        region = ws[pad + a_off * it: pad + tile_off * it]
        region[...] = 0xFF
        a, b = operand(rng, (M, K), dtype, la), operand(rng, (K, N), dtype, lb)
        a_, b_, c = g.prepare(a, b)
        g.run(a_, b_, c, workspace=ws)
        check(c, a, b, dtype)
        written = np.flatnonzero(region != 0xFF)
        if not direct:
            assert written.size, (M, N, K, la)
        elif M % bl.mr == 0:
            assert written.size == 0, (M, N, K, la)
        else:  # the last rows' sliver only: MR x kc elements
            assert written.size and written.max() < bl.mr * min(K, bl.kc) * it, (M, N, K, la)


def test_transposed_b_is_packed_by_register_transposes():
    """A transposed B (unit stride down its columns) fills whole micro-panels from VL x VL
    blocks transposed in registers (shuffles), not element by element."""
    for dtype in ("float32", "float64"):
        g = compile_gemm(dtype)
        text = g.llvm_ir[g.llvm_ir.index(f'@"{g.symbol}.pack_b"'):]
        text = text[:text.index("\n}")]
        vl = g.blocking.vl
        assert text.count("shufflevector") == (24 if vl == 8 else 8), dtype  # one VL x VL block
        rng = np.random.default_rng(12)
        for M, N, K in [(7, 32, 8), (6, 17, 23), (20, 48, 260)]:
            a, b = operand(rng, (M, K), dtype, "c"), operand(rng, (K, N), dtype, "f")
            check(g(a, b), a, b, dtype)


# ----------------------------------------------------------------------------- epilogues

from neural_arch.compiler.codegen import gemm as gemm_mod  # noqa: E402

I64 = ir.IntType(64)
PTR = ir.PointerType()
ELEM = {"float32": ir.FloatType(), "float64": ir.DoubleType()}
CT = {"float32": ctypes.c_float, "float64": ctypes.c_double}
GEMM_ARGTYPES = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 8 + [ctypes.c_void_p]


def splat(ty, x):
    """A constant x of type ty (scalar or vector)."""
    if isinstance(ty, ir.VectorType):
        return ir.Constant(ty, [x] * ty.count)
    return ir.Constant(ty, x)


def _load(b, p, off, et, lanes):
    """lanes consecutive elements at p[off]: element-aligned (a bare vector load would
    promise the vector's 32-byte alignment)."""
    q = b.gep(p, [off], source_etype=et)
    size = 4 if isinstance(et, ir.FloatType) else 8
    return b.load(q, typ=ir.VectorType(et, lanes) if lanes > 1 else et, align=size)


def gelu_poly(b, x):
    """0.5 x (1 + tanh(u)), u = sqrt(2/pi) (x + 0.044715 x^3), with tanh(u) as the Pade
    form u (27 + u^2) / (27 + 9 u^2) on u clamped to [-3, 3] (exactly +-1 there)."""
    t = x.type
    x2 = b.fmul(x, x)
    u = b.fmul(splat(t, 0.7978845608028654), b.fadd(x, b.fmul(splat(t, 0.044715), b.fmul(x2, x))))
    u = b.select(b.fcmp_ordered(">", u, splat(t, 3.0)), splat(t, 3.0), u)
    u = b.select(b.fcmp_ordered("<", u, splat(t, -3.0)), splat(t, -3.0), u)
    u2 = b.fmul(u, u)
    th = b.fdiv(b.fmul(u, b.fadd(splat(t, 27.0), u2)), b.fadd(splat(t, 27.0), b.fmul(splat(t, 9.0), u2)))
    return b.fmul(b.fmul(splat(t, 0.5), x), b.fadd(splat(t, 1.0), th))


def gelu_poly_ref(x):
    u = np.clip(0.7978845608028654 * (x + 0.044715 * x ** 3), -3.0, 3.0)
    return 0.5 * x * (1.0 + u * (27.0 + u * u) / (27.0 + 9.0 * u * u))


def _epi_bias(dtype):
    et = ELEM[dtype]

    def epi(b, acc, m, n, lanes, extra):
        (bias,) = extra
        return b.fadd(acc, _load(b, bias, n, et, lanes))
    return [PTR], [ctypes.c_void_p], epi


def _epi_full(dtype):
    """alpha * gelu(acc + bias[n]) + R[m*ld + n], and counts[m*ld + n + lane] += 1 for every
    element the epilogue sees (so the test sees each applied exactly once, in bounds)."""
    et = ELEM[dtype]

    def epi(b, acc, m, n, lanes, extra):
        bias, R, ld, alpha, counts = extra
        base = b.add(b.mul(m, ld), n)
        for lane in range(lanes):
            p = b.gep(counts, [b.add(base, ir.Constant(I64, lane))], source_etype=I64)
            b.atomic_rmw("add", p, ir.Constant(I64, 1), "monotonic")
        y = gelu_poly(b, b.fadd(acc, _load(b, bias, n, et, lanes)))
        al = alpha
        if lanes > 1:
            al = b.insert_element(ir.Constant(acc.type, None), alpha, ir.Constant(ir.IntType(32), 0))
            al = b.shuffle_vector(al, ir.Constant(acc.type, None),
                                  ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes))
        return b.fadd(b.fmul(al, y), _load(b, R, base, et, lanes))
    return ([PTR, PTR, I64, et, PTR],
            [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, CT[dtype], ctypes.c_void_p], epi)


EPILOGUES = {"bias": _epi_bias, "full": _epi_full}
_epi_cache: dict = {}


def epilogue_gemm(dtype, kind, parallel=False, blocking=None, min_flops=None):
    """(ctypes function, workspace bytes) of a gemm with the named epilogue."""
    key = (dtype, kind, parallel, blocking, min_flops)
    if key not in _epi_cache:
        from neural_arch.runtime import jit, threadpool

        types, ctys, epi = EPILOGUES[kind](dtype)
        module = ir.Module(name="epi")
        saved = gemm_mod.PARALLEL_MIN_FLOPS_PER_THREAD
        try:
            if min_flops is not None:
                gemm_mod.PARALLEL_MIN_FLOPS_PER_THREAD = min_flops
            threads = gemm_mod.gemm_threads(parallel)
            gemm_mod._emit_gemm(module, "g", dtype, blocking or BLOCKING[dtype], types, epi, threads)
        finally:
            gemm_mod.PARALLEL_MIN_FLOPS_PER_THREAD = saved
        if threads > 1:
            threadpool.install()
        loaded = jit.load(jit.optimize(str(module), "epi"))
        fn = loaded.function("g", None, *GEMM_ARGTYPES, *ctys)
        _epi_cache[key] = (loaded, fn, gemm_workspace_bytes(dtype, threads))
    return _epi_cache[key][1:]


def call_gemm(fn, a, b, c, ws, *extra):
    it = a.itemsize
    (M, K), N = a.shape, b.shape[1]
    fn(a.ctypes.data, b.ctypes.data, c.ctypes.data, M, N, K, a.strides[0] // it, a.strides[1] // it,
       b.strides[0] // it, b.strides[1] // it, c.strides[0] // it, ws.ctypes.data, *extra)


EPI_SHAPES = [(1, 1, 1), (5, 15, 0), (7, 17, 3), (6, 16, 256), (13, 33, 257), (12, 40, 5),
              (31, 45, 300), (145, 17, 7), (100, 300, 64), (2, 1, 9)]


def run_epilogue_case(dtype, kind, M, N, K, rng, alloc, fn, wsb, la="c", lb="c"):
    """One product with the named epilogue on buffers from ``alloc(shape, dtype)``; checked
    against NumPy float64."""
    a0, b0 = operand(rng, (M, K), dtype, la), operand(rng, (K, N), dtype, lb)
    a, b = alloc((M, K), dtype), alloc((K, N), dtype)
    a[...], b[...] = a0, b0
    c = alloc((M, N), dtype)
    c[...] = np.nan
    ws = alloc((wsb,), np.uint8)
    ref = reference(a, b)
    bound = RTOL[dtype] * max(K, 1) * (np.abs(a).astype(np.float64) @ np.abs(b).astype(np.float64))
    if kind == "bias":
        bias = alloc((N,), dtype)
        bias[...] = rng.standard_normal(N)
        call_gemm(fn, a, b, c, ws, bias.ctypes.data)
        ref = ref + bias
        bound = bound + np.finfo(dtype).eps * np.abs(ref)
    else:
        bias, R, counts = alloc((N,), dtype), alloc((M, N), dtype), alloc((M, N), np.int64)
        bias[...], R[...], counts[...] = rng.standard_normal(N), rng.standard_normal((M, N)), 0
        alpha = 0.75
        call_gemm(fn, a, b, c, ws, bias.ctypes.data, R.ctypes.data, N, alpha, counts.ctypes.data)
        assert (counts == 1).all(), f"epilogue not applied exactly once: {np.unique(counts)}"
        x = ref + bias
        ref = alpha * gelu_poly_ref(x) + R
        # the dot's error through gelu' (|gelu'| < 1.13, times alpha) plus a few roundings
        bound = 1.2 * bound + 16 * np.finfo(dtype).eps * (np.abs(ref) + np.abs(x) + np.abs(R) + 1)
    bad = ~(np.abs(c - ref) <= bound + np.finfo(dtype).tiny)
    assert not bad.any(), (
        f"{kind} {dtype} {(M, N, K)}: {int(bad.sum())} wrong; first at {np.argwhere(bad)[0]}: "
        f"{c[tuple(np.argwhere(bad)[0])]} vs {ref[tuple(np.argwhere(bad)[0])]}")


def _plain_alloc(shape, dtype):
    return np.empty(shape, dtype)


@pytest.mark.parametrize("dtype,kind", [("float32", "bias"), ("float32", "full"),
                                        ("float64", "full")])
def test_epilogue_guarded(dtype, kind):
    """A bias add; and bias + GELU-like polynomial + scalar scale + residual with a probe
    counting every element the epilogue sees: against NumPy float64 on ragged shapes,
    with every buffer (operands, C, bias, residual, counts, workspace) flush against
    inaccessible pages."""
    fn, wsb = epilogue_gemm(dtype, kind)
    rng = np.random.default_rng(11)
    pages = GuardedPages()
    try:
        for i, (M, N, K) in enumerate(EPI_SHAPES):
            at_end = bool(i % 2)
            layouts = [("c", "c"), ("f", "s")][i % 2]
            run_epilogue_case(dtype, kind, M, N, K, rng,
                              lambda s, d: pages.array(s, d, at_end), fn, wsb, *layouts)
    finally:
        pages.close()


def test_epilogue_small_blocking():
    """Tiny cache blocks: several K blocks (the epilogue only on the last), MC and NC
    blocks, every kind of edge tile."""
    bl = GemmBlocking(vl=8, mr=6, nv=2, kc=5, mc=12, nc=32)
    kind = "full"
    fn, wsb = epilogue_gemm("float32", kind, blocking=bl)
    rng = np.random.default_rng(12)
    for (M, N, K) in [(25, 70, 11), (12, 32, 10), (1, 1, 1), (40, 33, 0), (13, 65, 16), (30, 8, 5)]:
        run_epilogue_case("float32", kind, M, N, K, rng, _plain_alloc, fn, wsb)


def test_epilogue_inf_nan_and_empty():
    fn, wsb = epilogue_gemm("float32", "bias")
    ws = np.zeros(wsb, np.uint8)
    a, b = np.ones((8, 8), np.float32), np.ones((8, 20), np.float32)
    a[2, 3] = np.inf
    bias = np.zeros(20, np.float32)
    bias[5] = np.nan
    c = np.zeros((8, 20), np.float32)
    call_gemm(fn, a, b, c, ws, bias.ctypes.data)
    assert np.isnan(c[:, 5]).all() and np.isinf(c[2, [0, 19]]).all() and (c[0, :5] == 8).all()
    for M, N in [(0, 5), (5, 0)]:  # nothing to do: the epilogue is not called
        call_gemm(fn, np.ones((M, 3), np.float32), np.ones((3, N), np.float32),
                  np.ones((M, N), np.float32), ws, 0)


def test_epilogue_must_return_the_accumulator_type():
    module = ir.Module(name="bad")

    def epi(b, acc, m, n, lanes, extra):
        return ir.Constant(ir.FloatType(), 0.0)  # a scalar where a vector is due
    with pytest.raises(TypeError, match="epilogue must return"):
        emit_gemm(module, "g", "float32", epilogue=epi)


def test_extra_arguments_signature():
    module = ir.Module(name="sig")
    fn = emit_gemm(module, "g", "float64", extra_arg_types=[PTR, I64, ir.DoubleType()],
                   epilogue=lambda b, acc, m, n, lanes, extra: acc)
    assert [str(a.type) for a in fn.args] == (["ptr"] * 3 + ["i64"] * 8 + ["ptr", "ptr", "i64",
                                                                             "double"])


# ----------------------------------------------------------------------------- parallel


def pool_generation():
    from neural_arch.runtime import threadpool

    return threadpool.state()["gen"]


def pool_threads():
    from neural_arch.runtime import threadpool

    return threadpool.num_threads()


def test_workspace_bytes_per_thread():
    for dtype in ("float32", "float64"):
        one = gemm_workspace_bytes(dtype)
        assert gemm_workspace_bytes(dtype, 1) == one and gemm_workspace_bytes(dtype, 3) == 3 * one
    with pytest.raises(ValueError):
        gemm_workspace_bytes("float32", 0)
    assert gemm_mod.gemm_threads(False) == 1 and gemm_mod.gemm_threads(3) == 3
    assert gemm_mod.gemm_threads(True) == pool_threads()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_parallel_split_ragged(dtype):
    """Threshold forced to 0: every product with >= 2 row (or column) units is split;
    both split directions, ragged edges, one-unit sides, K == 0."""
    saved = gemm_mod.PARALLEL_MIN_FLOPS_PER_THREAD
    gemm_mod.PARALLEL_MIN_FLOPS_PER_THREAD = 0
    try:
        g = GemmKernel(dtype, parallel=2)
    finally:
        gemm_mod.PARALLEL_MIN_FLOPS_PER_THREAD = saved
    assert g.workspace_bytes == gemm_workspace_bytes(dtype, 2)
    rng = np.random.default_rng(13)
    threads = pool_threads()
    for (M, N, K) in [(1, 1, 1), (7, 3, 5), (3, 40, 9), (13, 12, 300), (6, 100, 7), (100, 6, 7),
                      (61, 250, 33), (250, 61, 33), (17, 17, 0), (12, 1, 4), (1, 33, 4)]:
        for la, lb in [("c", "c"), ("f", "n")]:
            a, b = operand(rng, (M, K), dtype, la), operand(rng, (K, N), dtype, lb)
            g0 = pool_generation()
            c = g(a, b)
            check(c, a, b, dtype)
            units = max(-(-M // 6), -(-N // g.blocking.nr))
            if threads >= 2:
                assert (pool_generation() > g0) == (units >= 2), (M, N, K)


def test_parallel_split_takes_columns_when_a_is_read_in_place():
    """A square product whose A is read in place is split by columns (each task packs only
    its columns of B), one whose A must be packed by rows (each task packs all of B): seen in
    how much of task 0's packed-B region of the workspace is written."""
    if pool_threads() < 2:
        pytest.skip("single-threaded pool")
    saved = gemm_mod.PARALLEL_MIN_FLOPS_PER_THREAD
    gemm_mod.PARALLEL_MIN_FLOPS_PER_THREAD = 0
    try:
        g = GemmKernel("float32", parallel=2)
    finally:
        gemm_mod.PARALLEL_MIN_FLOPS_PER_THREAD = saved
    M = N = 96
    K = 32
    nr, it = g.blocking.nr, 4
    rng = np.random.default_rng(17)
    for la, by_columns in [("c", True), ("f", True), ("s", False)]:
        a, b = operand(rng, (M, K), "float32", la), operand(rng, (K, N), "float32", "c")
        ws = np.full(g.workspace_bytes, 0xFF, np.uint8)
        a_, b_, c = g.prepare(a, b)
        g.run(a_, b_, c, workspace=ws)
        check(c, a, b, "float32")
        pad = -ws.ctypes.data % 64
        packed_b = ws[pad: pad + K * N * it]  # task 0's slice starts the workspace
        written = np.flatnonzero(packed_b != 0xFF)
        half = -(-(N // 2) // nr) * nr  # task 0's columns, whole panels
        if by_columns:
            assert written.max() < K * half * it, la
        else:
            assert written.max() >= K * half * it, la


def test_parallel_threshold_and_large():
    """Default threshold: small products stay on the caller; large ones (M or N split)
    go through the pool and are right."""
    g = compile_gemm("float32", parallel=2)
    rng = np.random.default_rng(14)
    threads = pool_threads()
    for (M, N, K), big in [((32, 32, 32), False), ((64, 64, 64), True), ((64, 10, 256), True),
                           ((300, 300, 300), True), ((12, 2000, 600), True), ((700, 600, 2100), True)]:
        a, b = operand(rng, (M, K), "float32", "c"), operand(rng, (K, N), "float32", "c")
        g0 = pool_generation()
        check(g(a, b), a, b, "float32")
        if threads >= 2:
            assert (pool_generation() > g0) == big, (M, N, K)


def test_parallel_epilogue_guarded():
    """Epilogue + parallel split: every element exactly once and right, workspace of
    exactly two slices between guard pages."""
    rng = np.random.default_rng(15)
    pages = GuardedPages()
    try:
        fn, wsb = epilogue_gemm("float32", "full", parallel=2, min_flops=0)
        assert wsb == gemm_workspace_bytes("float32", 2)
        for i, (M, N, K) in enumerate([(61, 250, 33), (250, 61, 300), (7, 40, 3), (13, 1, 2)]):
            run_epilogue_case("float32", "full", M, N, K, rng,
                              lambda s, d: pages.array(s, d, bool(i % 2)), fn, wsb)
    finally:
        pages.close()


def test_parallel_follows_the_pool_size():
    """A pool of one thread (NEURAL_ARCH_NUM_THREADS=1 or set_num_threads(1)): the kernel
    runs inline, same results."""
    from neural_arch.runtime import threadpool

    g = compile_gemm("float32", parallel=2)
    rng = np.random.default_rng(16)
    a, b = rng.standard_normal((300, 200)).astype(np.float32), rng.standard_normal((200, 310)).astype(np.float32)
    before = threadpool.num_threads()
    try:
        threadpool.set_num_threads(1)
        g0 = pool_generation()
        check(g(a, b), a, b, "float32")
        assert pool_generation() == g0
    finally:
        threadpool.set_num_threads(before)
    check(g(a, b), a, b, "float32")
