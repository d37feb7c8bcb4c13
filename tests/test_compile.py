"""compile(): the API, argument checking, Modules, and compiled backward programs
(compile(grad(f))) against the interpreter for every differentiable primitive, the
composites, a small MLP and a transformer block."""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import HypothesisSampler
from neural_arch.compiler import Tensor, compile, functional as F, grad, value_and_grad
from neural_arch.compiler.autodiff import autodiff
from neural_arch.compiler.compile import CompiledFunction
from neural_arch.compiler.ir import FLOAT_DTYPES, Graph
from neural_arch.compiler.ops.registry import NONDIFF, PRIMITIVES
from neural_arch.compiler.tensor import bind
from neural_arch.compiler.trace import trace_with_info
from neural_arch.runtime.interpreter import interpret
from neural_arch.runtime.program import Program

N_EXAMPLES = max(2, settings().max_examples // 10)


def assert_same(got, want, rtol=1e-5, atol=1e-6):
    """Same structure; Tensors; values close (exact for ints/bools)."""
    if isinstance(want, (tuple, list)):
        assert type(got) is type(want) and len(got) == len(want)
        for g, w in zip(got, want):
            assert_same(g, w, rtol, atol)
        return
    assert isinstance(got, Tensor), type(got)
    g, w = np.asarray(got.data), np.asarray(want.data)
    assert g.shape == w.shape and g.dtype == w.dtype, (g.dtype, g.shape, w.dtype, w.shape)
    if w.dtype.kind == "f":
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol, equal_nan=True)
    else:
        np.testing.assert_array_equal(g, w)


def both(fn, *args, rtol=1e-5, atol=1e-6):
    """compile fn natively and through the interpreter; results must agree."""
    native = compile(fn, *args)
    ref = compile(fn, *args, backend="interpreter")
    assert_same(native(*args), ref(*args), rtol, atol)
    return native


# ----------------------------------------------------------------------------- API


def test_compiled_function_exposes_graph_kernels_ir_and_asm():
    x = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)
    f = compile(lambda x: F.gelu(x).sum(axis=-1), x)
    assert isinstance(f, CompiledFunction) and isinstance(f.graph, Graph)
    assert f.kernels and all(k.nodes for k in f.kernels)
    assert {n.name for k in f.kernels for n in k.nodes} <= {n.name for n in f.graph.nodes}
    assert "define i32 @\"narch_main\"" in f.llvm_ir_unoptimized
    assert "narch_main" in f.llvm_ir and "<8 x float>" in f.llvm_ir
    assert "narch_main" in f.asm and "ymm" in f.asm
    assert "kernels" in repr(f)
    out = f(x)
    assert isinstance(out, Tensor) and out.shape == (8,)
    np.testing.assert_allclose(out.data, F.gelu(x).sum(axis=-1).data, rtol=1e-5, atol=1e-6)


def test_results_keep_the_structure_eager_returns():
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((3, 4)).astype(np.float32)

    def f(x, y):
        return x + y, (x * y, [F.exp(x)])
    out = compile(f, x, y)(x, y)
    eager = f(Tensor(x), Tensor(y))
    assert isinstance(out, tuple) and isinstance(out[1], tuple) and isinstance(out[1][1], list)
    assert_same(out, eager)
    loss = lambda x, y: (F.tanh(x) * y).sum()  # noqa: E731
    vg = compile(value_and_grad(loss, argnums=(0, 1)), x, y)(x, y)
    assert_same(vg, value_and_grad(loss, argnums=(0, 1))(Tensor(x), Tensor(y)))
    assert isinstance(vg[1], tuple) and len(vg[1]) == 2
    g = compile(grad(loss), x, y)(x, y)
    assert isinstance(g, Tensor)
    assert_same(g, grad(loss)(Tensor(x), Tensor(y)))


def test_wrong_arguments_raise_type_errors_naming_the_argument():
    x = np.zeros((4, 8), np.float32)
    idx = np.zeros(3, np.int64)

    def f(x, idx):
        return F.gather(x, idx, axis=0)
    cf = compile(f, x, idx)
    with pytest.raises(TypeError, match=r"argument 'x' expects f32\[4, 8\], got f32\[4, 9\]"):
        cf(np.zeros((4, 9), np.float32), idx)
    with pytest.raises(TypeError, match=r"argument 'x' expects f32\[4, 8\], got f64\[4, 8\]"):
        cf(np.zeros((4, 8)), idx)
    with pytest.raises(TypeError, match=r"argument 'idx' expects i64\[3\], got i32\[3\]"):
        cf(x, idx.astype(np.int32))
    with pytest.raises(TypeError, match=r"argument 'idx' expects i64\[3\], got i64\[300\]"):
        cf(x, np.zeros(300, np.int64))  # a longer index array must not be read past its end
    with pytest.raises(TypeError, match="takes 2 arguments"):
        cf(x)
    with pytest.raises(TypeError, match="argument 'x'"):
        cf("not an array", idx)
    # Python scalars and nested lists are fine when they match
    s = compile(lambda a, b: a * b, np.float32(2.0), np.ones(2, np.float32))
    np.testing.assert_array_equal(s(3.0, [1.0, 2.0]).data, [3.0, 6.0])


def test_interpreter_backend_and_llvm_backend_agree():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 6)).astype(np.float32)
    both(lambda x: (F.softmax(x), F.log_softmax(x, axis=0), F.layer_norm(x), x.max(axis=1)), x)
    with pytest.raises(ValueError, match="unknown backend"):
        compile(lambda x: x, x, backend="gpu")


def test_equal_graphs_share_native_code_in_process():
    x = np.ones(7, np.float32)
    a = compile(lambda x: F.exp(x) * 3.0, x)
    b = compile(lambda x: F.exp(x) * 3.0, x)
    assert a.program.native is b.program.native


def test_changed_codegen_setting_compiles_afresh(monkeypatch, tmp_path):
    """A module-level codegen setting changed in a running process (an A/B of
    ATTENTION_MAX_TASKS, gemm.BLOCKING, ...) must not get the code compiled under the old
    value from memory or from the disk cache; setting it back finds the old code again."""
    from neural_arch.compiler.codegen import gemm, lowering
    from neural_arch.runtime import program
    monkeypatch.setenv("NEURAL_ARCH_CACHE_DIR", str(tmp_path))
    q = np.random.default_rng(0).standard_normal((2, 16, 2, 8)).astype(np.float32)
    f = lambda q: F.attention(q, q * 0.5, q, causal=True)  # noqa: E731
    a = compile(f, q)
    version = program.codegen_version()
    monkeypatch.setattr(lowering, "ATTENTION_MAX_TASKS", 1)
    b = compile(f, q)
    assert program.codegen_version() != version
    assert b.program.native is not a.program.native and not b.program.native.from_cache
    assert [k.tasks for k in b.program.kernels if k.strategy == "attention"] == [1]
    np.testing.assert_allclose(b(q), a(q), rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(gemm, "BLOCKING", {**gemm.BLOCKING})  # an equal value: the same code
    monkeypatch.setattr(lowering, "ATTENTION_MAX_TASKS", 2)
    assert program.codegen_version() == version
    assert compile(f, q).program.native is a.program.native
    # the GEMM's blocking (a dataclass) counts too, and names another shared GEMM
    symbol = lowering.shared_gemm_symbol("float32", 2)
    monkeypatch.setitem(gemm.BLOCKING, "float32", dataclasses.replace(gemm.BLOCKING["float32"], mc=72))
    assert program.codegen_version() != version and lowering.shared_gemm_symbol("float32", 2) != symbol
    c = compile(lambda x, w: x @ w, q.reshape(32, 16), q.reshape(16, 32))
    x, w = q.reshape(32, 16), q.reshape(16, 32)
    np.testing.assert_allclose(c(x, w), x @ w, rtol=1e-5, atol=1e-5)


def test_second_process_loads_object_code_from_disk_cache(tmp_path):
    code = textwrap.dedent("""
        import numpy as np
        from neural_arch.compiler import compile, functional as F
        x = np.arange(12, dtype=np.float32).reshape(3, 4)
        f = compile(lambda x: F.softmax(x * 0.5).sum(axis=0), x)
        print(f.program.native.from_cache, float(f(x).data.sum()))
    """)
    env = dict(os.environ, NEURAL_ARCH_CACHE_DIR=str(tmp_path), NEURAL_ARCH_CACHE="1")
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    (hit1, v1), (hit2, v2) = (r.stdout.split() for r in runs)
    assert (hit1, hit2) == ("False", "True")
    assert abs(float(v1) - 3.0) < 1e-5 and v1 == v2


def test_second_process_restores_kernel_records_without_building(tmp_path):
    """A cached compile skips codegen: the kernel records come from the disk cache with the
    machine code; the LLVM IR text is rebuilt only when asked for, and equals a fresh build."""
    code = textwrap.dedent("""
        import numpy as np
        from neural_arch.compiler import compile, functional as F
        from neural_arch.runtime.program import build
        x = np.random.default_rng(0).standard_normal((16, 8)).astype(np.float32)
        w = np.random.default_rng(1).standard_normal((8, 8)).astype(np.float32)
        f = compile(lambda x, w: F.layer_norm(F.gelu(x @ w)).sum(axis=0), x, w)
        m = f.program.module
        print(m.from_meta, f.program.native.from_cache, len(m.kernels), float(f(x, w).data.sum()),
              m.llvm_ir == build(f.program.graph, None, f.program.options).llvm_ir)
        print(repr([(k.name, [n.name for n in k.nodes], k.inputs, k.outputs, k.strategy, k.tasks, k.loops,
                     k.workspace_bytes, k.buffers, k.note, k.externals, [c.code for c in k.checks])
                    for k in m.kernels]), repr(m.layout), repr(sorted(m.checks)), repr(m.buffered))
    """)
    env = dict(os.environ, NEURAL_ARCH_CACHE_DIR=str(tmp_path), NEURAL_ARCH_CACHE="1")
    runs = [subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    (first, first_records), (second, second_records) = (r.stdout.split("\n", 1) for r in runs)
    first, second = first.split(), second.split()
    assert first[:2] == ["False", "False"] and second[:2] == ["True", "True"]
    assert first[2:] == second[2:] and second[4] == "True"
    assert first_records == second_records  # every kernel record restores to what the build made


# ----------------------------------------------------------------------------- every differentiable primitive

DIFFERENTIABLE = sorted(n for n, p in PRIMITIVES.items() if p.vjp is not NONDIFF and p.spec is not None and p.spec.grad)


def _weighted_loss(op, cases, weights):
    """loss(*all case inputs) = sum_k sum(op(case_k) * w_k), and the float argnums."""
    sizes = [len(c.inputs) for c in cases]

    def loss(*xs):
        total, i = None, 0
        for case, n, w in zip(cases, sizes, weights):
            y = bind(op, *xs[i:i + n], **case.attrs)
            i += n
            term = F.sum(F.mul(y, w)) if y.size else F.sum(y)
            total = term if total is None else total + term
        return total
    flat = [a for c in cases for a in c.inputs]
    argnums = tuple(i for i, a in enumerate(flat) if a.dtype.name in FLOAT_DTYPES)
    return loss, flat, argnums


@pytest.mark.parametrize("name", DIFFERENTIABLE)
@settings(max_examples=N_EXAMPLES)
@given(data=st.data())
def test_compiled_backward_of_every_differentiable_primitive(name, data):
    spec = PRIMITIVES[name].spec
    s = HypothesisSampler(data)
    rng = np.random.default_rng(0)
    cases, weights = [], []
    for _ in range(3):
        c = spec.gen(s)
        t = PRIMITIVES[name].shape_rule(*[Tensor(a).type for a in c.inputs], **c.attrs)
        if t.dtype in FLOAT_DTYPES:  # (cast to an integer type has no gradient to compare)
            cases.append(c)
            weights.append(rng.uniform(0.5, 1.5, t.shape).astype(t.dtype))
    if not cases:
        return
    loss, flat, argnums = _weighted_loss(name, cases, weights)
    if not argnums:
        return
    both(value_and_grad(loss, argnums=argnums), *flat, rtol=4 * spec.rtol, atol=4 * spec.atol + 1e-6)


# ----------------------------------------------------------------------------- composites


def test_composites_forward_and_backward():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 7)).astype(np.float32)
    w = rng.standard_normal(7).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float32)
    t = np.array([0, 6, 3, -100])

    def f(x, w, b):
        return (F.softmax(x).sum() * 0 + (F.softmax(x) * w).sum() + F.log_softmax(x).mean()
                + (F.layer_norm(x, weight=w, bias=b) ** 2).mean() + F.gelu(x).sum() + F.gelu(x, "tanh").mean()
                + F.cross_entropy(x, t) + F.cross_entropy(x, t, label_smoothing=0.1)
                + F.rms_norm(x, weight=w).sum() + F.mse_loss(x, F.tanh(x)) + F.logsumexp(x).sum()
                + F.dropout(x, p=0.3, seed=5).sum() + F.sigmoid(x).sum() + F.silu(x).mean())
    both(f, x, w, b, rtol=2e-5, atol=2e-5)
    both(value_and_grad(f, argnums=(0, 1, 2)), x, w, b, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_attention_forward_and_backward(causal):
    rng = np.random.default_rng(4)
    q, k, v = (rng.standard_normal((2, 3, 5, 8)).astype(np.float32) for _ in range(3))
    mask = rng.random((5, 5)) > 0.3
    np.fill_diagonal(mask, True)

    def f(q, k, v):
        out = F.scaled_dot_product_attention(q, k, v, mask=None if causal else mask, is_causal=causal)
        return (out * out).sum()
    both(f, q, k, v, rtol=2e-5, atol=2e-5)
    both(grad(f, argnums=(0, 1, 2)), q, k, v, rtol=1e-4, atol=2e-5)


# ----------------------------------------------------------------------------- modules


def _nn():
    return pytest.importorskip("neural_arch.models.nn")


def _param_grads_equal(fn, *args, rtol=1e-4, atol=2e-5):
    """Gradients w.r.t. every input (args and parameters) of a traced fn: compiled == interpreted."""
    traced = trace_with_info(fn, *args)
    g = traced.graph
    wrt = [i.name for i in g.inputs if i.type.dtype in FLOAT_DTYPES]
    dg = autodiff(g, wrt)
    inputs = [np.asarray(a) for a in args] + [np.asarray(traced.bindings[i.name].data) for i in g.inputs[len(args):]]
    want = interpret(dg, inputs)
    got = Program(dg)(*[np.require(a, requirements="C") for a in inputs])
    assert len(got) == 1 + len(wrt)
    for name, a, b in zip(["loss"] + wrt, got, want):
        np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=name)
    return dg


def test_mlp_forward_gradients_and_parameter_updates():
    nn = _nn()
    nn.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((16, 12)).astype(np.float32)
    y = rng.integers(0, 5, 16)
    f = compile(model, x)
    assert sum(i.kind == "param" for i in f.graph.inputs) == len(list(model.parameters()))
    assert_same(f(x), model(Tensor(x)), rtol=1e-5, atol=1e-5)
    # parameters are read at call time: an update is seen without recompiling
    p = next(iter(model.parameters()))
    p.data = p.data + 0.25
    assert_same(f(x), model(Tensor(x)), rtol=1e-5, atol=1e-5)

    def loss(x, y):
        return F.cross_entropy(model(x), y)
    _param_grads_equal(loss, x, y)
    both(value_and_grad(loss), x, y, rtol=1e-4, atol=1e-5)


def test_transformer_block_forward_and_gradients():
    nn = _nn()
    nn.manual_seed(1)
    block = nn.TransformerBlock(16, 2, d_ff=32, causal=True)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((2, 6, 16)).astype(np.float32)
    f = compile(block, x)
    assert_same(f(x), block(Tensor(x)), rtol=1e-4, atol=1e-5)

    def loss(x):
        return (block(x) ** 2).mean()
    dg = _param_grads_equal(loss, x)
    assert len(dg.outputs) == 2 + len(list(block.parameters()))


def test_arena_planned_buffers_equal_separate_buffers():
    """Intermediates share one arena by lifetime; results equal separate buffers exactly."""
    nn = _nn()
    nn.manual_seed(2)
    block = nn.TransformerBlock(32, 4, d_ff=64, causal=True)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 8, 32)).astype(np.float32)
    f = value_and_grad(lambda a: (block(a) ** 2).mean())
    arena = compile(f, x)
    plain = compile(f, x, options={"arena": False})
    plan = arena.program.memory_plan
    assert plan is not None and plan.arena_bytes < plan.naive_bytes
    assert_same(arena(x), plain(x), rtol=0, atol=0)
    # matmul gradients with broadcast batch dims (operands materialised per kernel)
    for k, (ba, bb) in enumerate([((), (2,)), ((2, 1), (2, 2)), ((), (2, 1))]):
        a = rng.standard_normal(ba + (1, 2)).astype(np.float32)
        b = rng.standard_normal(bb + (2, 1)).astype(np.float32)
        w = rng.uniform(0.5, 1.5, np.broadcast_shapes(ba, bb) + (1, 1)).astype(np.float32)
        both(value_and_grad(lambda a, b: (a @ b * w).sum(), argnums=(0, 1)), a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- random programs


def _random_program(data):
    """A random straight-line program over a pool of (B, R, C) values: elementwise ops with
    broadcasting, reductions, softmax/layer_norm, transposes, reshapes, slices, pads,
    matmuls, concats, gathers, casts, dropout; several outputs."""
    draw = data.draw
    B, R, C = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 17))
    ops = draw(st.lists(st.tuples(st.sampled_from(
        ["add", "mul", "sub_row", "exp", "tanh", "sum_rows", "sum_cols", "max_rows", "softmax", "layer_norm",
         "transpose", "reshape", "slice", "matmul", "matmul_y", "concat", "gather", "where", "gelu", "mean_all",
         "pad", "cast", "dropout", "row_vec", "col_sum_keep"]), st.integers(0, 99), st.integers(0, 99)),
        min_size=3, max_size=10))
    outs = draw(st.lists(st.integers(0, 100), min_size=1, max_size=3))
    idx = np.array(draw(st.lists(st.integers(0, R - 1), min_size=1, max_size=4)))

    def prog(x, y, v):
        pool = [x, y]
        for op, i, j in ops:
            a, b = pool[i % len(pool)], pool[j % len(pool)]
            if op == "add":
                r = a + b
            elif op == "mul":
                r = a * b * 0.5 + 1.0
            elif op == "sub_row":
                r = a - a.max(axis=-1, keepdims=True)
            elif op == "exp":
                r = F.exp(F.tanh(a))
            elif op == "tanh":
                r = F.tanh(a)
            elif op == "sum_rows":
                r = F.broadcast_to(a.sum(axis=-1, keepdims=True), (B, R, C)) * 0.1 + b
            elif op == "sum_cols":
                r = a + a.sum(axis=1, keepdims=True)
            elif op == "col_sum_keep":
                r = b * F.broadcast_to(a.sum(axis=(0, 1)), (B, R, C))
            elif op == "max_rows":
                r = a - F.broadcast_to(a.max(axis=(0, 1), keepdims=True), (B, R, C))
            elif op == "softmax":
                r = F.softmax(a, axis=-1) + F.softmax(b, axis=1)
            elif op == "layer_norm":
                r = F.layer_norm(a)
            elif op == "transpose":
                r = F.transpose(F.transpose(a, 0, 2, 1) * 2.0, 0, 2, 1)
            elif op == "reshape":
                r = (a.reshape(B * R, C) + 1.0).reshape(B, R, C)
            elif op == "slice":
                r = F.concat([a[:, :, :1] * 3.0, b[:, :, 1:]], axis=2)
            elif op == "matmul":
                r = (a @ F.transpose(b, 0, 2, 1)) @ a * 0.01
            elif op == "matmul_y":
                r = F.tanh(a @ F.broadcast_to(F.transpose(v, 1, 0) @ v, (B, C, C)) * 0.1)
            elif op == "concat":
                r = F.concat([a, b * 2.0], axis=1)[:, ::2, :]
            elif op == "gather":
                r = a + F.gather(b, idx, axis=1).sum(axis=1, keepdims=True)
            elif op == "where":
                r = F.where(a > b, a, y)
            elif op == "gelu":
                r = F.gelu(a)
            elif op == "pad":
                r = F.pad(a, ((0, 0), (1, 0), (0, 1)), value=0.5)[:, :R, 1:]
            elif op == "cast":
                r = F.cast(F.cast(a * 3.0, "int32"), "float32") + b
            elif op == "dropout":
                r = F.dropout(a, p=0.25, seed=3)
            elif op == "row_vec":
                r = a * F.broadcast_to(v.sum(axis=0), (B, R, C))
            else:
                r = F.broadcast_to(a.mean(), (B, R, C)) + b
            pool.append(r)
        return tuple(pool[2 + o % (len(pool) - 2)] for o in outs)
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    x = rng.standard_normal((B, R, C)).astype(np.float32)
    y = rng.standard_normal((B, R, C)).astype(np.float32)
    v = rng.standard_normal((R, C)).astype(np.float32)
    return prog, x, y, v


@settings(max_examples=N_EXAMPLES * 3)
@given(data=st.data())
def test_random_programs_compiled_equal_interpreter(data):
    prog, x, y, v = _random_program(data)
    both(prog, x, y, v, rtol=1e-4, atol=1e-5)
    f = value_and_grad(lambda x, y, v: sum((o * o).sum() for o in prog(x, y, v)), argnums=(0, 1, 2))
    native = compile(f, x, y, v)(x, y, v)
    ref = compile(f, x, y, v, backend="interpreter")(x, y, v)
    try:
        assert_same(native, ref, rtol=1e-3, atol=1e-4)
    except AssertionError:
        # a gradient that cancels to ~0 from terms of size ~1e4 is float32 rounding noise in
        # both: then the compiled result must be no further from the float64 truth than the
        # interpreter's float32 result is (within 2x and the tolerance)
        x64, y64, v64 = (a.astype(np.float64) for a in (x, y, v))
        truth = compile(f, x64, y64, v64, backend="interpreter")(x64, y64, v64)
        flat = lambda r: [r[0]] + list(r[1])  # noqa: E731
        for got, want, exact in zip(flat(native), flat(ref), flat(truth)):
            e_got = np.abs(got.data - exact.data)
            e_ref = np.abs(want.data - exact.data)
            assert np.all(e_got <= 2 * e_ref + 1e-4 + 1e-3 * np.abs(exact.data)), (e_got.max(), e_ref.max())


def test_row_kernel_computes_grand_totals_first_and_profiles():
    """The cross entropy backward reads the count of targets (a grand total) in every row:
    the row kernel computes the totals in a first pass instead of once per row."""
    rng = np.random.default_rng(9)
    x = rng.standard_normal((64, 10)).astype(np.float32)
    t = rng.integers(0, 10, 64)
    t[::7] = -100
    f = value_and_grad(lambda x: F.cross_entropy(x, t))
    cf = both(f, x, rtol=1e-5, atol=1e-6)
    assert any("rowA" in k.loops for k in cf.kernels)
    prof = compile(f, x, options={"profile": True})
    prof(x)
    report = prof.program.profile()
    assert report.startswith("1 calls") and "row" in report
