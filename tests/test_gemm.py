"""Our gemm (compiler/codegen/gemm.py) against NumPy float64 on ragged, transposed,
strided and empty shapes."""
from __future__ import annotations

import ctypes
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
        for (M, N, K) in [(1, 1, 1), (7, 19, 13), (6, 16, 256), (31, 45, 259), (145, 33, 7)]:
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


def _hottest_block(asm: str, function: str) -> list[str]:
    """Instructions of the basic block of ``function`` with the most FMAs (the k loop)."""
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
    blocks.append(cur)
    return max(blocks, key=lambda blk: sum(i.startswith("vfmadd") for i in blk))


@pytest.mark.parametrize("dtype,fma", [("float32", "vfmadd231ps"), ("float64", "vfmadd231pd")])
def test_micro_kernel_assembly(dtype, fma):
    """The k loop is FMAs on ymm registers with no stack traffic (no spills), and no
    AVX-512 anywhere."""
    g = compile_gemm(dtype)
    asm = g.assembly()
    assert "zmm" not in asm
    loop = _hottest_block(asm, f"{g.symbol}.ukr")
    fmas = [i for i in loop if i.startswith("vfmadd")]
    bl = g.blocking
    assert len(fmas) >= bl.mr * bl.nv and len(fmas) % (bl.mr * bl.nv) == 0, loop
    assert all(i.startswith(fma) and i.count("%ymm") == 3 for i in fmas), fmas
    assert not any("rsp" in i or "rbp)" in i for i in loop), loop
