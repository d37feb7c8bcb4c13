"""Codegen: every primitive compiled to native code agrees with the interpreter.

Compiling is the slow part (tens of ms per LLVM module), so tests put many cases into one
graph (one module) and compare each output."""
from __future__ import annotations

import math

import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import HypothesisSampler
from neural_arch.compiler import compile, functional as F
from neural_arch.compiler.codegen import lowering
from neural_arch.compiler.codegen.index import Ix, flat_index, unflatten
from neural_arch.compiler.ir import Graph, GraphInput, Node, TensorType
from neural_arch.compiler.ops.registry import PRIMITIVES, Case, NumpySampler, OpIndexError
from neural_arch.compiler.tensor import bind
from neural_arch.runtime.interpreter import interpret
from neural_arch.runtime.program import Program

N_EXAMPLES = max(2, settings().max_examples // 10)  # dev profile: 3; thorough: 30


# ----------------------------------------------------------------------------- helpers


def cases_graph(op: str, cases) -> Graph:
    """One graph holding every case as an independent node (one module to compile)."""
    prim = PRIMITIVES[op]
    inputs, nodes, outs = [], [], []
    for k, case in enumerate(cases):
        ins = [GraphInput(f"c{k}_{i}", TensorType(a.shape, a.dtype.name)) for i, a in enumerate(case.inputs)]
        t = prim.shape_rule(*[i.type for i in ins], **case.attrs)
        nodes.append(Node.make(f"y{k}", op, [i.name for i in ins], t, case.attrs))
        inputs += ins
        outs.append(f"y{k}")
    return Graph(op, tuple(inputs), tuple(nodes), tuple(outs))


def check_against_interpreter(graph: Graph, arrays, rtol=1e-5, atol=1e-6, groups=None):
    want = interpret(graph, arrays)
    got = Program(graph, groups)(*[np.require(a, requirements="C") for a in arrays])
    assert len(got) == len(want)
    for name, g, w in zip(graph.outputs, got, want):
        assert g.shape == w.shape and g.dtype == w.dtype, f"%{name}: {g.dtype}{g.shape} vs {w.dtype}{w.shape}"
        if w.dtype.kind == "f":
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, equal_nan=True, err_msg=f"%{name}")
        else:
            np.testing.assert_array_equal(g, w, err_msg=f"%{name}")
    return got


def traced_check(fn, *arrays, rtol=1e-5, atol=1e-6, options=None):
    cf = compile(fn, *arrays, options=options)
    want = interpret(cf.graph, list(arrays) + [np.asarray(t.data) for t in cf._bindings])
    got = cf.run_arrays(*arrays)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        if w.dtype.kind == "f":
            np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
        else:
            np.testing.assert_array_equal(g, w)
    return cf


# ----------------------------------------------------------------------------- every primitive


def test_every_primitive_has_a_lowering():
    assert lowering.missing() == []
    for name, prim in PRIMITIVES.items():
        assert prim.lowering is lowering.LOWERINGS[name], name
        assert callable(getattr(prim.lowering, "element", None)), name


@pytest.mark.parametrize("name", sorted(PRIMITIVES))
@settings(max_examples=N_EXAMPLES)
@given(data=st.data())
def test_primitive_compiled_equals_interpreter(name, data):
    spec = PRIMITIVES[name].spec
    s = HypothesisSampler(data)
    cases = [spec.gen(s) for _ in range(6)]
    g = cases_graph(name, cases)
    arrays = [a for c in cases for a in c.inputs]
    check_against_interpreter(g, arrays, rtol=2 * spec.rtol, atol=2 * spec.atol)


def test_primitives_on_seeded_cases():
    """Twenty NumPy-seeded cases per primitive (shapes hypothesis may not reach)."""
    for name in sorted(PRIMITIVES):
        spec = PRIMITIVES[name].spec
        cases = [spec.gen(NumpySampler(seed)) for seed in range(20)]
        check_against_interpreter(cases_graph(name, cases), [a for c in cases for a in c.inputs],
                                  rtol=2 * spec.rtol, atol=2 * spec.atol)


# ----------------------------------------------------------------------------- shapes and layouts

ODD = (1, 7, 8, 9, 15, 17, 33, 1000)


def test_odd_sizes_hit_every_vector_tail():
    rng = np.random.default_rng(0)

    def f(*xs):
        outs = []
        for x in xs:
            pos = F.abs(x) + 0.5
            outs += [F.exp(x), F.log(pos), F.tanh(x), F.erf(x), F.sin(x), F.sqrt(pos), x * x + 1.0,
                     F.maximum(x, 0.0), F.where(x > 0, x, -x), x.sum(), x.max(), F.cast(x, "int32"),
                     F.cast(x > 0.1, "float32")]
            m = x.reshape(1, -1) + x.reshape(-1, 1)[:3] if x.shape[0] >= 3 else x.reshape(1, -1) * 2.0
            outs += [m.sum(axis=1), m.sum(axis=0), m.max(axis=-1), F.transpose(m, 1, 0)]
        return tuple(outs)

    arrays = [rng.uniform(-3, 3, n).astype(np.float32) for n in ODD]
    traced_check(f, *arrays, rtol=2e-5, atol=1e-5)


def test_rows_of_odd_lengths_and_float64():
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((n % 5 + 2, n)).astype(dt) for n in ODD for dt in ("float32", "float64")]

    def f(*xs):
        return tuple(F.softmax(x, axis=-1) for x in xs) + tuple(F.layer_norm(x) for x in xs) + \
            tuple(x.sum(axis=0) for x in xs)
    traced_check(f, *arrays, rtol=2e-5, atol=2e-6)


def test_non_contiguous_and_transposed_inputs():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 10)).astype(np.float32)
    y = rng.standard_normal((10, 6)).astype(np.float32)
    cf = compile(lambda a, b: (F.exp(a) + b.T, a @ b), x, y)
    base = cf.run_arrays(x, y)
    xf = np.asfortranarray(x)
    big = np.zeros((12, 20), np.float32)
    big[::2, ::2] = x
    for xv in (xf, big[::2, ::2], x.T.copy().T):
        got = cf.run_arrays(xv, y)
        for g, b in zip(got, base):
            np.testing.assert_array_equal(g, b)
    # inside the graph: strided reads through transpose, slice and broadcast
    traced_check(lambda a, b: (F.transpose(a, 1, 0) * b, a[1::2, ::3] + 1.0, a.reshape(3, 2, 10)[:, 1, :],
                               F.broadcast_to(b[:1], (4, 10, 6)) - b), x, y)


def test_empty_and_zero_dim_tensors():
    rng = np.random.default_rng(3)
    e = np.zeros((3, 0), np.float32)
    z = np.float32(1.5)
    v = rng.standard_normal(4).astype(np.float32)

    def f(e, z, v):
        return (F.exp(e), e.sum(axis=1), e.sum(), e.sum(axis=0), F.concat([e, e], axis=1),
                F.concat([v[:0], v], axis=0), F.exp(z), z * z + 1.0, F.sqrt(z), v.sum() + z,
                F.pad(e, ((1, 1), (0, 2)), value=3.0), F.matmul(e, e.T), F.matmul(e.T, e),
                F.gather(v, np.zeros((0,), np.int64)), F.broadcast_to(z, (2, 3)))
    traced_check(f, e, z, v)


def test_large_kernels_split_into_parallel_tasks():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((512, 700)).astype(np.float32)
    b = rng.standard_normal(700).astype(np.float32)
    idx = rng.integers(0, 512, 3000)
    def f(x, b, i):
        return (F.exp(x) * b, x.sum(axis=1), x.sum(axis=0), x.max(axis=1), F.gather(x, i, axis=0),
                F.uniform(7, (600, 600)), F.softmax(x, axis=-1))
    for fuse in (False, True):
        cf = traced_check(f, x, b, idx, rtol=1e-4, atol=1e-4, options={"fuse": fuse})
        assert any(k.tasks > 1 for k in cf.kernels)
        strategies = {k.strategy for k in cf.kernels}
        assert {"map", "reduce-inner", "reduce-outer"} <= strategies if not fuse else \
            {"row", "row-columns"} <= strategies


def test_elementwise_kernels_are_vectorised():
    x = np.ones((64, 64), np.float32)
    cf = compile(lambda a: F.exp(a) * 2.0 + F.tanh(a), x)
    assert "<8 x float>" in cf.llvm_ir
    assert "ymm" in cf.asm
    for libm in ("@expf", "@exp(", "@tanhf", "@erff"):
        assert libm not in cf.llvm_ir
    # the three kernels collapse their 2-d space into one contiguous loop
    assert all(list(k.loops.get("out", [4096])) == [4096] for k in cf.kernels if k.strategy == "map")


def test_loop_dimensions_merge_only_when_strides_allow():
    x = np.ones((4, 6, 8), np.float32)
    for fuse in (True, False):
        cf = compile(lambda a: (a + 1.0, F.transpose(a, 0, 2, 1) + 2.0), x, options={"fuse": fuse})
        loops = {o: k.loops["out"] for k in cf.kernels for o in k.outputs}
        plain, transposed = cf.graph.outputs
        assert loops[plain] == [192]
        assert loops[transposed] == ([4, 8, 6] if fuse else [192])  # unfused: the transpose is its own kernel


# ----------------------------------------------------------------------------- index algebra


def test_index_algebra_simplifies_merges_and_reshapes():
    v = Ix.var("v", 24)
    parts = unflatten(v, (2, 3, 4))
    assert str(flat_index(parts, (2, 3, 4))) == "v"
    i, j = Ix.var("i", 4), Ix.var("j", 12)
    assert str((i * 12 + j) // 12) == "i" and str((i * 12 + j) % 12) == "j"
    assert str(((i + 1) % 3) + ((i + 1) // 3) * 3) == "i + 1"
    assert (Ix.var("o", 7) - 2).clamp(0, 4).lo == 0
    assert (i * 2 + 1).hi == 7


# ----------------------------------------------------------------------------- groups (fusion-ready)


def test_kernels_from_groups_of_nodes():
    rng = np.random.default_rng(5)
    a = rng.standard_normal((5, 1)).astype(np.float32)
    b = rng.standard_normal((5, 7)).astype(np.float32)

    def f(a, b):
        t = F.exp(F.broadcast_to(a, (5, 7)) + b) * 2.0
        s = F.exp(t - 3.0).sum(axis=1)
        u = F.transpose(b, 1, 0).reshape(35) + 1.0
        return t, s, u
    cf = compile(f, a, b)
    g = cf.graph
    prod = g.producer()
    out_t, out_s, out_u = g.outputs

    def upstream(name, stop):
        seen, stack = [], [name]
        while stack:
            n = stack.pop()
            if n in prod and n not in seen and n not in stop:
                seen.append(n)
                stack.extend(prod[n].inputs)
        return [n for n in g.nodes if n.name in seen]
    g_t = upstream(out_t, set())
    g_s = upstream(out_s, {out_t})
    g_u = upstream(out_u, set())
    groups = [tuple(g_t), tuple(g_s), tuple(g_u)]
    assert sum(map(len, groups)) == len(g.nodes)
    got = check_against_interpreter(g, [a, b], groups=groups)
    p = Program(g, groups)
    assert len(p.kernels) == 3
    assert [k.strategy for k in p.kernels] == ["loop", "reduce-inner", "loop"]
    np.testing.assert_allclose(got[1], np.exp(got[0] - 3.0).sum(axis=1), rtol=1e-5)


# ----------------------------------------------------------------------------- bounds checks


def test_gather_out_of_range_raises_cleanly():
    x = np.arange(20, dtype=np.float32).reshape(5, 4)
    ok = np.array([0, 4, 2])
    cf = compile(lambda x, i: F.gather(x, i, axis=0) * 2.0, x, ok)
    np.testing.assert_array_equal(cf.run_arrays(x, ok)[0], x[ok] * 2)
    for bad, shown in ((np.array([0, 5, 2]), 5), (np.array([1, -1, 2]), -1), (np.array([9, -3, 2]), -3),
                       (np.array([2**40, 0, 1]), 2**40)):
        with pytest.raises(OpIndexError) as e:
            cf(x, bad)
        msg = str(e.value)
        assert isinstance(e.value, IndexError)
        assert f"index {shown} is out of range for axis 0 of size 5" in msg
        assert "gather" in msg and "test_codegen.py:" in msg
    np.testing.assert_array_equal(cf.run_arrays(x, ok)[0], x[ok] * 2)  # still usable


def test_gather_with_int32_indices_and_inner_axis():
    x = np.arange(60, dtype=np.float32).reshape(3, 4, 5)
    i = np.array([[4, 0], [1, 1]], np.int32)
    cf = traced_check(lambda x, i: F.gather(x, i, axis=2), x, i)
    with pytest.raises(OpIndexError, match="index 5 is out of range for axis 2 of size 5"):
        cf(x, np.array([[5, 0], [1, 1]], np.int32))


def test_check_index_and_scatter_add_report_bad_indices():
    logits = np.zeros((3, 5), np.float32)
    target = np.array([0, 4, -100])
    cf = compile(lambda l, t: F.cross_entropy(l, t), logits, target)
    cf(logits, target)
    with pytest.raises(OpIndexError, match=r"index 9 is out of range: allowed \[0, 5\) or -100"):
        cf(logits, np.array([0, 9, 7]))
    src = np.ones((4, 2), np.float32)
    sc = compile(lambda i, s: F.scatter_add(i, s, 0, 3), np.array([0, 1, 2, 2]), src)
    np.testing.assert_array_equal(sc.run_arrays(np.array([0, 1, 2, 2]), src)[0], [[1, 1], [1, 1], [2, 2]])
    with pytest.raises(OpIndexError, match="index 3 is out of range for axis 0 of size 3"):
        sc(np.array([0, 3, 1, 1]), src)


# ----------------------------------------------------------------------------- random numbers


def test_rng_uniform_is_bit_exact():
    for dtype in ("float32", "float64"):
        for seed in (0, 1, 12345, -7):
            seed_arr = np.array(seed, np.int64)
            g = cases_graph("rng_uniform", [Case((seed_arr,), {"shape": (3, 33), "stream": s, "dtype": dtype})
                                            for s in range(3)])
            want = interpret(g, [seed_arr] * 3)
            got = Program(g)(*[seed_arr] * 3)
            for a, b in zip(got, want):
                np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- the math library


def _ulps(got, ref64, dtype):
    ref = ref64.astype(dtype)
    same = (got == ref) | (np.isnan(got) & np.isnan(ref))
    spacing = np.spacing(np.abs(ref)).astype(np.float64)
    tiny = float(np.finfo(dtype).smallest_subnormal)
    with np.errstate(all="ignore"):
        d = np.abs(got.astype(np.float64) - ref64) / np.maximum(spacing, tiny)
    d = np.where(same, 0.0, d)
    return np.where(np.isfinite(d), d, np.inf)


_erf64 = np.frompyfunc(math.erf, 1, 1)
MATH_REFS = {"exp": np.exp, "log": np.log, "tanh": np.tanh, "sigmoid": lambda v: (1 / (1 + np.exp(-v.astype(np.longdouble)))).astype(np.float64),
             "sin": np.sin, "cos": np.cos, "sqrt": np.sqrt,
             "rsqrt": lambda v: 1.0 / np.sqrt(v), "erf": lambda v: _erf64(v).astype(np.float64)}
RANGES = {"exp": {"float32": (-104, 89), "float64": (-746, 710)}, "log": (0, 8), "tanh": (-10, 10), "sigmoid": (-20, 20),
          "sin": (-40, 40), "cos": (-40, 40), "sqrt": (0, 10), "rsqrt": (0, 10), "erf": (-6.5, 6.5)}
MAX_ULP = {"float32": {"exp": 1.5, "log": 1.5, "tanh": 2, "sigmoid": 2.5, "erf": 3, "sin": 1, "cos": 1, "sqrt": 0.5,
                       "rsqrt": 1.5},
           "float64": {"exp": 2, "log": 2, "tanh": 2, "sigmoid": 2.5, "erf": 3, "sin": 4, "cos": 4, "sqrt": 0.5,
                       "rsqrt": 1.5}}
SPECIAL = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 1e-30, 1e30, 100.0, -200.0, 5e-39]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_math_functions_ulp_error_over_dense_sweeps(dtype):
    rng = np.random.default_rng(6)
    n = 1 << 17
    ibits = np.uint32 if dtype == "float32" else np.uint64
    everything = rng.integers(0, np.iinfo(ibits).max, n, dtype=ibits, endpoint=True).view(dtype)
    inputs = {}
    for name in MATH_REFS:
        lo, hi = RANGES[name][dtype] if isinstance(RANGES[name], dict) else RANGES[name]
        inputs[name] = np.concatenate([everything, np.linspace(lo, hi, n, dtype=dtype),
                                       np.array(SPECIAL, dtype=dtype)])
    names = list(MATH_REFS)

    def f(*xs):
        return tuple(bind(nm, x) for nm, x in zip(names, xs))
    cf = compile(f, *[inputs[nm] for nm in names])
    outs = cf.run_arrays(*[inputs[nm] for nm in names])
    with np.errstate(all="ignore"):
        for nm, x, got in zip(names, (inputs[k] for k in names), outs):
            ref = MATH_REFS[nm](x.astype(np.float64))
            if dtype == "float64" and nm == "erf":
                ref = MATH_REFS[nm](x)
            e = _ulps(got, ref, np.dtype(dtype))
            k = int(np.argmax(e))
            assert e[k] <= MAX_ULP[dtype][nm], f"{nm}({x[k]!r}) = {got[k]!r}, want {ref[k]!r}: {e[k]:.2f} ulp"


def test_math_special_values():
    for dtype in ("float32", "float64"):
        x = np.array([-math.inf, math.inf, math.nan, -200.0, 100.0, 0.0, -1.0, 1000.0, -1000.0], dtype)
        names = ["exp", "log", "tanh", "erf", "sin", "cos", "sqrt", "rsqrt", "sigmoid"]
        outs = compile(lambda *xs: tuple(bind(n, v) for n, v in zip(names, xs)),
                       *[x] * len(names)).run_arrays(*[x] * len(names))
        r = dict(zip(names, outs))
        inf = math.inf
        with np.errstate(over="ignore"):
            want = np.exp(x[[0, 1, 3, 4, 5, 7, 8]])
        np.testing.assert_array_equal(r["exp"][[0, 1, 3, 4, 5, 7, 8]], want)
        assert np.isnan(r["exp"][2])
        np.testing.assert_array_equal(r["log"][[1, 5]], [inf, -inf])
        assert np.isnan(r["log"][[0, 2, 3, 6]]).all()
        np.testing.assert_array_equal(r["tanh"][[0, 1, 3, 4, 7, 8]], [-1, 1, -1, 1, 1, -1])
        np.testing.assert_array_equal(r["erf"][[0, 1, 3, 4, 7, 8]], [-1, 1, -1, 1, 1, -1])
        np.testing.assert_array_equal(r["sigmoid"][[0, 1, 4, 5, 7, 8]], [0, 1, 1, 0.5, 1, 0])
        tiny = 1 / (1 + np.exp(np.longdouble(200)))  # sigmoid(-200): a float64 number, 0 in float32
        assert r["sigmoid"][3] == np.asarray(tiny, np.float64).astype(dtype)
        assert np.isnan(r["sin"][[0, 1, 2]]).all() and np.isnan(r["cos"][[0, 1, 2]]).all()
        for n in names:
            assert np.isnan(r[n][2]), n


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_math_vector_forms_equal_the_scalar_forms_bitwise(dtype):
    """mathlib.get(..., lanes=) builds the same code on whole vectors: a loop of explicit
    <8 x float> (<4 x double>) calls gives, bit for bit, what the compiled scalar ops give
    (over random bit patterns, a sweep of the usual range and the special values)."""
    import ctypes
    import llvmlite.ir as ir
    from neural_arch.compiler.codegen import mathlib
    from neural_arch.compiler.codegen.kernel import F32, F64, I64, c64, for_range
    from neural_arch.runtime import jit
    lanes = 8 if dtype == "float32" else 4
    et = F32 if dtype == "float32" else F64
    vt = ir.VectorType(et, lanes)
    module = ir.Module(name="vec")
    for name in mathlib.VECTOR_IMPLS:
        fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [ir.PointerType(), ir.PointerType(), I64]),
                         name=f"apply_{name}")
        src, dst, nvec = fn.args
        b = ir.IRBuilder(fn.append_basic_block("entry"))
        with for_range(b, c64(0), nvec, "v") as v:
            off = b.mul(v, c64(lanes))
            x = b.load(b.gep(src, [off], source_etype=et), typ=vt, align=4)
            b.store(b.call(mathlib.get(module, name, dtype, lanes), [x]), b.gep(dst, [off], source_etype=et),
                    align=4)
        b.ret_void()
    with pytest.raises(ValueError, match="no vector form of 'sin'"):
        mathlib.get(module, "sin", dtype, lanes)
    loaded = jit.load(jit.optimize(str(module), "vec"))
    rng = np.random.default_rng(11)
    ibits = np.uint32 if dtype == "float32" else np.uint64
    x = np.concatenate([rng.integers(0, np.iinfo(ibits).max, 1 << 14, dtype=ibits).view(dtype),
                        np.linspace(-30, 30, 1 << 12, dtype=dtype), np.array(SPECIAL * lanes, dtype)])
    x = x[:len(x) // lanes * lanes]
    scalar = compile(lambda *xs: tuple(bind(n, v) for n, v in zip(mathlib.VECTOR_IMPLS, xs)),
                     *[x] * len(mathlib.VECTOR_IMPLS)).run_arrays(*[x] * len(mathlib.VECTOR_IMPLS))
    for name, want in zip(mathlib.VECTOR_IMPLS, scalar):
        got = np.full_like(x, 7.0)
        loaded.function(f"apply_{name}", None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)(
            x.ctypes.data, got.ctypes.data, len(x) // lanes)
        np.testing.assert_array_equal(got.view(ibits), want.view(ibits), err_msg=name)


def test_pow_special_cases_match_numpy():
    import itertools
    sp = [0.0, -0.0, math.inf, -math.inf, math.nan, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 3.0, -3.0, 1e-30, 1e30]
    a, b = map(list, zip(*itertools.product(sp, sp)))
    rng = np.random.default_rng(7)
    for dtype in ("float32", "float64"):
        x = np.concatenate([np.array(a, dtype), rng.uniform(0, 5, 5000).astype(dtype),
                            -rng.integers(0, 5, 500).astype(dtype), np.exp(rng.uniform(-80, 80, 5000)).astype(dtype)])
        y = np.concatenate([np.array(b, dtype), rng.uniform(-5, 5, 5000).astype(dtype),
                            rng.integers(-7, 7, 500).astype(dtype), rng.uniform(-1, 1, 5000).astype(dtype)])
        got = compile(lambda u, v: bind("pow", u, v), x, y).run_arrays(x, y)[0]
        with np.errstate(all="ignore"):
            ref = np.power(x.astype(np.float64), y.astype(np.float64))
            same = (got == ref.astype(dtype)) | (np.isnan(got) & np.isnan(ref))
            rel = np.abs(got - ref) / np.abs(ref)
        ok = same | (rel < (3e-7 if dtype == "float32" else 1e-14))
        assert ok.all(), list(zip(x[~ok][:5], y[~ok][:5], got[~ok][:5], ref[~ok][:5]))


# ----------------------------------------------------------------------------- fused kernels


def test_fusion_plan_kernels_equal_unfused_and_interpreter():
    from neural_arch.compiler.passes.fusion import fuse
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 33)).astype(np.float32)
    w = rng.standard_normal((33, 20)).astype(np.float32)
    b = rng.standard_normal(20).astype(np.float32)
    cases = {
        "softmax": (lambda x: F.softmax(x, axis=-1), (x,), 1),
        "layer_norm": (lambda x: F.layer_norm(x), (x,), 1),
        "gelu(x @ W + b)": (lambda x, w, b: F.gelu(x @ w + b), (x, w, b), 1),
        "column softmax": (lambda x: F.softmax(x, axis=0), (x,), 1),
        "mixed": (lambda x, w: (F.exp(x).sum(axis=0), F.log_softmax(x @ w, axis=-1), x.T @ x, (x * 2.0).max()),
                  (x, w), None),
    }
    for name, (fn, args, n_kernels) in cases.items():
        fused = compile(fn, *args)
        plain = compile(fn, *args, options={"fuse": False, "passes": False})
        want = interpret(plain.graph, list(args))
        for a, b_, c in zip(fused.run_arrays(*args), plain.run_arrays(*args), want):
            np.testing.assert_allclose(a, c, rtol=2e-5, atol=2e-5, err_msg=name)
            np.testing.assert_allclose(b_, c, rtol=2e-5, atol=2e-5, err_msg=name)
        plan = fuse(fused.graph)
        assert len(fused.kernels) == plan.kernel_count + len(plan.guards), name
        if n_kernels is not None:
            assert len(fused.kernels) == n_kernels, (name, fused.kernels)
        assert len(plain.kernels) == len(plain.graph.nodes)


def test_only_values_crossing_kernels_get_buffers():
    x = np.ones((8, 16), np.float32)
    cf = compile(lambda x: F.softmax(F.exp(x) * 2.0 + 1.0, axis=-1), x)
    inner = {n.name for n in cf.graph.nodes} - set(cf.graph.outputs)
    assert not inner & set(cf.program.module.layout.slots)


def test_matmul_float64_transposed_and_batched_operands():
    rng = np.random.default_rng(10)
    for dtype in ("float32", "float64"):
        a = rng.standard_normal((3, 37, 19)).astype(dtype)
        b = rng.standard_normal((19, 23)).astype(dtype)
        c = rng.standard_normal((3, 23, 19)).astype(dtype)
        cf = compile(lambda a, b, c: (a @ b, a @ F.transpose(c, 0, 2, 1), F.transpose(a, 0, 2, 1) @ a,
                                      a[:, ::2, :] @ b, (a @ b) * 2.0 + 1.0), a, b, c)
        outs = cf.run_arrays(a, b, c)
        a64, b64, c64 = (v.astype(np.float64) for v in (a, b, c))
        want = [a64 @ b64, a64 @ c64.transpose(0, 2, 1), a64.transpose(0, 2, 1) @ a64, a64[:, ::2] @ b64,
                (a64 @ b64) * 2 + 1]
        tol = 1e-5 if dtype == "float32" else 1e-12
        for g, w in zip(outs, want):
            assert g.dtype == np.dtype(dtype)
            np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
        # transposes reach the GEMM as strides, not copies (a strided slice under the
        # frontend's (B*M, K) reshape is not affine in the merged row: that one is copied)
        transposed = [k for k in cf.kernels if k.strategy == "matmul" and
                      any(i in ("c",) for i in k.inputs) or (k.strategy == "matmul" and k.inputs == ("a",))]
        assert len(transposed) == 2 and all(not k.buffers for k in transposed)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("serial", [False, True])
def test_row_vector_matmuls_take_the_gemv_path_and_match(dtype, serial):
    """M == 1 (decoding one token): rows of B streamed when its columns are contiguous (split
    between two tasks by rows, each adding up its own partial sums, when big enough), one
    dot product per column when B is transposed; batched, broadcast and with an epilogue."""
    from neural_arch.compiler import trace, functional as F
    from neural_arch.compiler.ir import TensorType as T
    from neural_arch.runtime.interpreter import interpret
    from neural_arch.runtime.program import Program
    rng = np.random.default_rng(5)
    cases = [  # (function, shapes, whether B's rows are split between two tasks)
        (lambda a, w: a @ w, [(1, 384), (384, 1152)], True),
        (lambda a, w: a @ F.transpose(w, 1, 0), [(1, 96), (300, 96)], False),
        (lambda q, k: q @ F.swapaxes(k, -1, -2), [(2, 3, 1, 16), (2, 3, 40, 16)], False),
        (lambda p, v: p @ v, [(2, 3, 1, 40), (2, 3, 40, 16)], False),
        (lambda a, w, b: F.gelu(a @ w + b), [(3, 1, 7), (7, 5), (5,)], False),
        (lambda a, w: a @ w, [(1, 3), (3, 1)], False),
        (lambda a, w: a @ w, [(1, 301), (301, 300)], True),           # rows split 151 + 150
        (lambda a, w, b: F.gelu(a @ w + b), [(1, 1, 257), (257, 260), (260,)], True),
    ]
    for fn, shapes, split in cases:
        types = [T(s, dtype) for s in shapes]
        g = trace(fn, *types)
        ins = [rng.standard_normal(s).astype(dtype) for s in shapes]
        prog = Program(g, options={"serial": serial})
        got = prog(*ins)
        want = interpret(g, ins)
        # after a split, the kernel adds the second task's partial sums (loop "sum0") to y
        assert ('"sum0' in prog.module.llvm_ir) == (split and not serial), [k.name for k in prog.kernels]
        tol = 1e-4 if dtype == "float32" else 1e-10
        for a, b in zip(got, want):
            np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_transposed_computed_operand_is_materialised_in_its_own_layout():
    """A matmul operand that is a transpose of a value computed inline (a weight gradient
    reading a recomputed activation) is materialised untransposed, written in order, and
    read by the GEMM through the transpose's strides."""
    from neural_arch.compiler import trace, functional as F
    from neural_arch.compiler.ir import TensorType as T
    from neural_arch.runtime.interpreter import interpret
    from neural_arch.runtime.program import Program
    g = trace(lambda h, dy: F.transpose(F.gelu(h), 1, 0) @ dy, T((96, 40), "float32"), T((96, 24), "float32"))
    rng = np.random.default_rng(3)
    ins = [rng.standard_normal((96, 40)).astype(np.float32), rng.standard_normal((96, 24)).astype(np.float32)]
    prog = Program(g, options={"module_cache": False})
    np.testing.assert_allclose(prog(*ins)[0], interpret(g, ins)[0], rtol=1e-5, atol=1e-5)
    (mm,) = [k for k in prog.kernels if k.strategy == "matmul"]
    types = prog.graph.types
    assert [types[v].shape for v in mm.buffers] == [(96, 40)], mm.buffers  # gelu(h), not its transpose
    assert re.search(r'define i32 @"[^"]*\.as"', prog.module.llvm_ir)


@pytest.mark.parametrize("row", [64, 300, 9000])
def test_row_kernel_keeps_a_reduced_members_row_instead_of_recomputing_it(row):
    """A softmax's exp is computed once per element: kept on the stack for the row while the
    sum runs, read back by the output (also when the exp is itself an output, as when
    backward saves it); rows longer than ROW_SCRATCH_MAX recompute it.  Values as the
    interpreter's, gradients included."""
    from neural_arch.compiler import trace, functional as F, value_and_grad
    from neural_arch.compiler.codegen.kernel import ROW_SCRATCH_MAX
    from neural_arch.compiler.ir import TensorType as T
    from neural_arch.runtime.interpreter import interpret
    from neural_arch.runtime.program import Program
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, row)).astype(np.float32)
    y = rng.integers(0, row, (6,)).astype(np.int64)

    def loss(x, y):
        e = F.exp(x - x.max(axis=-1, keepdims=True))
        p = e / e.sum(axis=-1, keepdims=True)
        return (p * p).sum() + F.cross_entropy(x, y)
    for g in (trace(lambda x: F.softmax(x, axis=-1), T(x.shape, "float32")),
              trace(value_and_grad(loss), T(x.shape, "float32"), T(y.shape, "int64"))):
        prog = Program(g, options={"module_cache": False})
        ins = [x] if len(g.inputs) == 1 else [x, y]
        for a, b in zip(prog(*ins), interpret(g, ins)):
            np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6)
        kept = re.findall(rf"alloca \[{row} x float\]", prog.module.llvm_ir)
        assert bool(kept) == (row <= ROW_SCRATCH_MAX), [k.name for k in prog.kernels]


def test_row_kernel_with_grand_totals_runs_its_rows_in_parallel():
    """A cross-entropy's row kernel accumulates grand totals (the loss sum; the count of
    counted targets, which the gradient rows need first): its rows run on several tasks,
    each with its own partial totals added up in task order.  Values and gradients as the
    interpreter's, bit-identical from call to call; a total the rows need that itself needs
    row reductions (x / sum of row maxima) too."""
    from neural_arch.compiler import trace, functional as F, value_and_grad
    from neural_arch.compiler.ir import TensorType as T
    from neural_arch.runtime.interpreter import interpret
    from neural_arch.runtime.program import Program
    rng = np.random.default_rng(6)
    x = rng.standard_normal((1024, 96)).astype(np.float32)
    y = rng.integers(0, 96, (1024,)).astype(np.int64)
    y[::7] = -100  # ignored targets: the mean divides by the count of the others
    cases = [
        (value_and_grad(lambda x, y: F.cross_entropy(x, y)), [x, y]),
        (lambda x: x / x.max(axis=-1).sum(), [x]),
    ]
    for fn, ins in cases:
        g = trace(fn, *[T(a.shape, str(a.dtype)) for a in ins])
        prog = Program(g, options={"module_cache": False})
        rows = [k for k in prog.kernels if k.strategy == "row"]
        assert rows and all(k.tasks > 1 for k in rows), [(k.name, k.strategy, k.tasks) for k in prog.kernels]
        first, second = prog(*ins), prog(*ins)
        for a, b, w in zip(first, second, interpret(g, ins)):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_allclose(a, w, rtol=2e-5, atol=1e-7)
    # every target ignored (a 0/0 mean: NaN, as the interpreter's), and no rows at all
    for n in (1024, 0):
        xs, ys = x[:n], np.full((n,), -100, np.int64)
        g = trace(value_and_grad(lambda x, y: F.cross_entropy(x, y)), T(xs.shape, "float32"), T(ys.shape, "int64"))
        got = Program(g, options={"module_cache": False})(xs, ys)
        assert np.isnan(got[0])
        for a, w in zip(got, interpret(g, [xs, ys])):
            np.testing.assert_allclose(a, w, equal_nan=True)


@pytest.mark.parametrize("parallel", [False, True])
def test_loops_over_merged_head_dims_are_tiled(parallel):
    """An innermost loop whose variable is read only as v // 32 and v % 32 (attention heads
    merged into features, three of them concatenated: a q/k/v gradient) runs as a loop over
    tiles of 32 around a loop inside one tile, so both are plain loop variables: the same
    values, parallel chunks whole tiles."""
    from neural_arch.compiler import trace, functional as F
    from neural_arch.compiler.ir import TensorType as T
    from neural_arch.runtime.interpreter import interpret
    from neural_arch.runtime.program import Program
    B, H, S, D = (16, 4, 64, 32) if parallel else (2, 4, 8, 32)

    def merged(x):  # (B, H, S, D) -> (B, S, H * D)
        return F.swapaxes(x, 1, 2).reshape((B, S, H * D))

    def fn(q, k, v):
        qkv = F.concat([merged(q), merged(k), merged(v)], axis=-1)
        return qkv * 2.0, qkv.sum(axis=(0, 1))
    t = T((B, H, S, D), "float32")
    g = trace(fn, t, t, t)
    rng = np.random.default_rng(7)
    ins = [rng.standard_normal((B, H, S, D)).astype(np.float32) for _ in range(3)]
    prog = Program(g, options={"module_cache": False})
    for a, b in zip(prog(*ins), interpret(g, ins)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert re.search(r'"[\w.]+@\d+(\.\d+)?\.o\.body"', prog.module.llvm_ir), [k.name for k in prog.kernels]
    if parallel:
        assert any(k.tasks > 1 for k in prog.kernels)


def test_innermost_loops_split_at_concat_and_pad_bounds():
    """A loop whose body selects between concat parts or pad regions by its own index is
    emitted as one loop per piece (the selects decided at compile time), with the values and
    the parallel chunks (clipped to the pieces) unchanged."""
    from neural_arch.compiler import trace, functional as F
    from neural_arch.compiler.ir import TensorType as T
    from neural_arch.runtime.interpreter import interpret
    from neural_arch.runtime.program import Program
    rng = np.random.default_rng(3)
    cases = [
        (lambda a, b, c: F.concat([a, b, c], axis=-1) * 2.0, [(640, 100), (640, 50), (640, 7)]),
        (lambda a: F.pad(a, ((0, 0), (3, 5)), value=1.5) + 1.0, [(333, 20)]),
        # the gradient of splitting q, k, v out of one tensor: a sum of pads, then its column
        # sum (in parallel, its rows split between the tasks: the loops are not split there)
        (lambda a, b: ((F.pad(a, ((0, 0), (0, 8))) + F.pad(b, ((0, 0), (8, 0)))) * 3.0).sum(axis=0),
         [(4096, 8), (4096, 8)]),
    ]
    for n, (fn, shapes) in enumerate(cases):
        g = trace(fn, *[T(s) for s in shapes])
        ins = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        want = interpret(g, ins)[0]
        for serial in (False, True):
            prog = Program(g, options={"serial": serial})
            pieces = set(re.findall(r"(?:out|T)@\d+\.(\d+)", prog.module.llvm_ir))
            if n < 2 or serial:
                assert len(pieces) >= 2, "expected the innermost loop to be split into pieces"
            else:
                assert [k.strategy for k in prog.kernels] == ["row-columns"] and prog.kernels[0].tasks > 1
            np.testing.assert_allclose(prog(*ins)[0], want, rtol=1e-5, atol=1e-5)


def test_single_small_products_use_the_gemms_parallel_mode():
    """One product from ~0.2 MFLOP (the MLP step's 64x256 @ 256x10, 64x64 @ 64x256^T) calls
    the GEMM built for the pool's threads, which splits the longer side of C itself (each
    row-block task used to pack all of B); smaller ones and batched ones keep the serial GEMM.
    Values as the interpreter's."""
    from neural_arch.compiler import trace, functional as F
    from neural_arch.compiler.codegen.lowering import shared_gemm_symbol
    from neural_arch.compiler.ir import TensorType as T
    from neural_arch.runtime import threadpool
    from neural_arch.runtime.interpreter import interpret
    from neural_arch.runtime.program import Program
    threads = threadpool.num_threads()
    rng = np.random.default_rng(8)
    cases = [  # (function, shapes, whether the pool's GEMM is called)
        (lambda a, w: F.relu(a @ F.transpose(w, 1, 0)), [(64, 64), (256, 64)], True),
        (lambda a, w: a @ F.transpose(w, 1, 0), [(64, 256), (10, 256)], True),
        (lambda a, b: F.transpose(a, 1, 0) @ b, [(64, 10), (64, 256)], True),
        (lambda a, b: a @ b, [(32, 32), (32, 32)], False),
        (lambda a, b: a @ b, [(4, 64, 64), (4, 64, 64)], False),
    ]
    for fn, shapes, par in cases:
        g = trace(fn, *[T(s, "float32") for s in shapes])
        ins = [rng.standard_normal(s).astype(np.float32) for s in shapes]
        prog = Program(g)
        np.testing.assert_allclose(prog(*ins)[0], interpret(g, ins)[0], rtol=1e-4, atol=1e-4)
        (mm,) = [k for k in prog.kernels if k.strategy == "matmul"]
        used = {e[0] for e in mm.externals}
        if threads > 1:
            assert (shared_gemm_symbol("float32", threads) in used) == par, (shapes, used)
        else:  # one thread (NEURAL_ARCH_NUM_THREADS=1, a 1-CPU machine): the serial GEMM only
            assert used == {shared_gemm_symbol("float32", 1)}, (shapes, used)
        if par and threads > 1 and len(mm.nodes) == 1:
            assert mm.tasks == 1  # the GEMM splits itself (an epilogue may have tasks of its own)


def test_loop_kernel_splits_every_output_shape_over_its_tasks():
    """An epilogue with outputs of two shapes has a loop per shape; each task runs its
    fraction of both (the second loop used to run whole in every task: 64 times the work).
    The second loop's start is computed from the task's bounds, and the numbers are right."""
    from neural_arch.compiler import trace
    from neural_arch.compiler.ir import TensorType
    from neural_arch.runtime.interpreter import interpret
    from neural_arch.runtime.program import Program

    def s(x, w):
        y = (x @ w) * 3.0
        return y.sum(), F.exp(y.reshape((4, 512, 512)) * 0.001) + 1.0
    g = trace(s, TensorType((2048, 256)), TensorType((256, 512)))
    prog = Program(g)
    (k,) = [k for k in prog.module.kernels if k.strategy == "matmul"]
    assert k.tasks > 1 and "out1" in k.loops, k
    text = prog.module.llvm_ir
    body = text[text.index(f'define internal void @"{k.name}.epi.body"'):]
    body = body[:body.index("\n}")]
    (phi,) = [line for line in body.splitlines() if '%"out1@0" = phi' in line]
    assert "[0," not in phi.replace(" ", ""), phi
    rng = np.random.default_rng(0)
    args = [rng.standard_normal((2048, 256)).astype(np.float32), rng.standard_normal((256, 512)).astype(np.float32)]
    for a, b in zip(prog(*args), interpret(g, args)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_column_sums_write_their_full_operand_in_the_same_pass():
    """A row kernel summing over rows (a bias gradient) that also writes the full-size value
    it sums (dqkv, which the weight gradient reads): one pass over the rows does both when the
    full output needs no row value; with one that does (x - mean), a second pass stays."""
    from neural_arch.compiler import trace
    from neural_arch.compiler.ir import TensorType
    from neural_arch.runtime.interpreter import interpret
    from neural_arch.runtime.program import Program
    rng = np.random.default_rng(3)
    args = [rng.standard_normal((4, 96, 40)).astype(np.float32) for _ in range(2)]

    def independent(a, b):
        y = F.pad(a, ((0, 0), (0, 0), (0, 40))) + F.pad(b, ((0, 0), (0, 0), (40, 0)))
        return F.sum(y, (0, 1)) * 2.0, y * 3.0

    def dependent(a, b):
        y = a + b
        return F.sum(y, (0, 1)), y - F.mean(y, (0, 1), keepdims=True)
    for fn, passes in ((independent, 1), (dependent, 2)):
        g = trace(fn, *[TensorType(x.shape) for x in args])
        prog = Program(g)
        (k,) = [k for k in prog.module.kernels if k.strategy == "row-columns"]
        assert ("Rfull" in k.loops) == (passes == 2), (fn.__name__, k.loops)
        for got, want in zip(prog(*args), interpret(g, args)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
