"""Pass tests: text in, text out (golden), the pass manager's instruments, and random pass
subsets/orders giving the same numbers as the unoptimised graph."""
import os
import textwrap

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from neural_arch.compiler import functional as F, grad, parse, tensor, trace, value_and_grad
from neural_arch.compiler.passes import PASSES, Pass, PassError, run_pipeline
from neural_arch.compiler.passes.simplify import algebraic_simplify, common_subexpression_elimination, \
    fold_constants
from neural_arch.compiler.passes.dce import dead_code_elimination
from neural_arch.runtime.interpreter import interpret


def g(text: str):
    return parse(textwrap.dedent(text))


def same(actual, expected_text: str):
    expected = g(expected_text)
    assert actual == expected, f"got:\n{actual}\nexpected:\n{expected}"


def test_dce_drops_unused_nodes():
    same(dead_code_elimination(g("""
        graph f(%x: f32[3]) {
          %0: f32[3] = exp(%x)
          %1: f32[3] = log(%x)
          return (%0)
        }""")), """
        graph f(%x: f32[3]) {
          %0: f32[3] = exp(%x)
          return (%0)
        }""")


def test_cse_merges_identical_nodes_and_keeps_distinct_attrs():
    same(common_subexpression_elimination(g("""
        graph f(%x: f32[2, 3]) {
          %0: f32[2, 3] = exp(%x)
          %1: f32[2, 3] = exp(%x)
          %2: f32[2, 3] = add(%0, %1)
          %3: f32[3] = sum(%2) {axes=[0], keepdims=false}
          %4: f32[2] = sum(%2) {axes=[1], keepdims=false}
          return (%3, %4)
        }""")), """
        graph f(%x: f32[2, 3]) {
          %0: f32[2, 3] = exp(%x)
          %2: f32[2, 3] = add(%0, %0)
          %3: f32[3] = sum(%2) {axes=[0], keepdims=false}
          %4: f32[2] = sum(%2) {axes=[1], keepdims=false}
          return (%3, %4)
        }""")


def test_fold_uniform_fills_and_small_constants():
    same(fold_constants(g("""
        graph f(%x: f32[4]) {
          %0: f32[] = full() {dtype="float32", shape=[], value=2.0}
          %1: f32[] = full() {dtype="float32", shape=[], value=3.0}
          %2: f32[] = mul(%0, %1)
          %3: f32[4] = broadcast_to(%2) {shape=[4]}
          %4: i64[3] = iota() {axis=0, dtype="int64", shape=[3]}
          %5: f32[3] = cast(%4) {dtype="float32"}
          %6: f32[4] = add(%x, %3)
          return (%6, %5)
        }""")), """
        graph f(%x: f32[4]) {
          %0: f32[] = full() {dtype="float32", shape=[], value=2.0}
          %1: f32[] = full() {dtype="float32", shape=[], value=3.0}
          %2: f32[] = full() {dtype="float32", shape=[], value=6.0}
          %3: f32[4] = full() {dtype="float32", shape=[4], value=6.0}
          %4: i64[3] = iota() {axis=0, dtype="int64", shape=[3]}
          %5: f32[3] = constant() {dtype="float32", shape=[3], value=[0.0, 1.0, 2.0]}
          %6: f32[4] = add(%x, %3)
          return (%6, %5)
        }""")


def test_algebra_identities_and_canonical_forms():
    same(algebraic_simplify(g("""
        graph f(%x: f32[2, 3], %y: f32[2, 3]) {
          %one: f32[2, 3] = full() {dtype="float32", shape=[2, 3], value=1.0}
          %zero: f32[2, 3] = full() {dtype="float32", shape=[2, 3], value=0.0}
          %four: f32[2, 3] = full() {dtype="float32", shape=[2, 3], value=4.0}
          %0: f32[2, 3] = mul(%x, %one)
          %1: f32[2, 3] = add(%zero, %0)
          %2: f32[2, 3] = neg(%y)
          %3: f32[2, 3] = sub(%1, %2)
          %4: f32[2, 3] = neg(%3)
          %5: f32[2, 3] = neg(%4)
          %6: f32[2, 3] = div(%5, %four)
          return (%6)
        }""")), """
        graph f(%x: f32[2, 3], %y: f32[2, 3]) {
          %one: f32[2, 3] = full() {dtype="float32", shape=[2, 3], value=1.0}
          %zero: f32[2, 3] = full() {dtype="float32", shape=[2, 3], value=0.0}
          %four: f32[2, 3] = full() {dtype="float32", shape=[2, 3], value=4.0}
          %2: f32[2, 3] = neg(%y)
          %3: f32[2, 3] = add(%x, %y)
          %4: f32[2, 3] = neg(%3)
          %6_a1: f32[2, 3] = full() {dtype="float32", shape=[2, 3], value=0.25}
          %6: f32[2, 3] = mul(%3, %6_a1)
          return (%6)
        }""")


def test_algebra_movement_chains():
    same(dead_code_elimination(algebraic_simplify(g("""
        graph f(%x: f32[2, 3, 4]) {
          %0: f32[3, 2, 4] = transpose(%x) {perm=[1, 0, 2]}
          %1: f32[2, 3, 4] = transpose(%0) {perm=[1, 0, 2]}
          %2: f32[4, 3, 2] = transpose(%1) {perm=[2, 1, 0]}
          %3: f32[4, 2, 3] = transpose(%2) {perm=[0, 2, 1]}
          %4: f32[6, 4] = reshape(%x) {shape=[6, 4]}
          %5: f32[24] = reshape(%4) {shape=[24]}
          %6: f32[2, 3, 4] = reshape(%5) {shape=[2, 3, 4]}
          %7: f32[1, 2, 3, 4] = broadcast_to(%6) {shape=[1, 2, 3, 4]}
          %8: f32[5, 2, 3, 4] = broadcast_to(%7) {shape=[5, 2, 3, 4]}
          %9: f32[2, 3, 4] = cast(%x) {dtype="float32"}
          return (%3, %8, %9, %4, %5)
        }"""))), """
        graph f(%x: f32[2, 3, 4]) {
          %3: f32[4, 2, 3] = transpose(%x) {perm=[2, 0, 1]}
          %4: f32[6, 4] = reshape(%x) {shape=[6, 4]}
          %5: f32[24] = reshape(%x) {shape=[24]}
          %8: f32[5, 2, 3, 4] = broadcast_to(%x) {shape=[5, 2, 3, 4]}
          return (%3, %8, %x, %4, %5)
        }""")


def test_algebra_transposed_product_is_computed_transposed():
    # a weight gradient (x^T @ dy)^T: the product is computed as dy^T @ x; a product with
    # another use keeps its transpose
    same(dead_code_elimination(algebraic_simplify(algebraic_simplify(g("""
        graph f(%x: f32[8, 3], %dy: f32[8, 5]) {
          %0: f32[3, 8] = transpose(%x) {perm=[1, 0]}
          %1: f32[3, 5] = matmul(%0, %dy)
          %2: f32[5, 3] = transpose(%1) {perm=[1, 0]}
          %3: f32[3, 5] = matmul(%0, %dy)
          %4: f32[5, 3] = transpose(%3) {perm=[1, 0]}
          %5: f32[3, 5] = exp(%3)
          return (%2, %4, %5)
        }""")))), """
        graph f(%x: f32[8, 3], %dy: f32[8, 5]) {
          %0: f32[3, 8] = transpose(%x) {perm=[1, 0]}
          %2_a1: f32[5, 8] = transpose(%dy) {perm=[1, 0]}
          %2: f32[5, 3] = matmul(%2_a1, %x)
          %3: f32[3, 5] = matmul(%0, %dy)
          %4: f32[5, 3] = transpose(%3) {perm=[1, 0]}
          %5: f32[3, 5] = exp(%3)
          return (%2, %4, %5)
        }""")


def test_pass_manager_dumps_prints_and_times(tmp_path, capsys):
    x = tensor(np.ones((2, 3), np.float32))
    graph = trace(lambda x: (x * 1.0 + 0.0).sum(), x)
    out = tmp_path / "dump"
    import io
    buf = io.StringIO()
    res = run_pipeline(graph, dump_dir=str(out), print_ir="changed", time_passes=True, verify_each=True,
                       stream=buf)
    files = sorted(os.listdir(out))
    assert files[0] == "000_trace.txt" and files[1].startswith("001_")
    assert len(files) == 1 + len(res.records)
    assert parse((out / files[-1]).read_text()) == res.graph
    text = buf.getvalue()
    assert "IR after algebraic" in text and "pass" in text and "ms" in text
    assert all(r.name in text for r in res.records)
    assert len(res.graph.nodes) == 1  # the sum alone survives


def test_time_passes_env_also_times_codegen_and_llvm(tmp_path, monkeypatch, capsys):
    from neural_arch.runtime.program import Program, clear_memory_cache
    monkeypatch.setenv("NEURAL_ARCH_TIME_PASSES", "1")
    monkeypatch.setenv("NEURAL_ARCH_CACHE_DIR", str(tmp_path / "cache"))
    graph = trace(lambda x: F.softmax(x * 3.0), tensor(np.ones((4, 8), np.float32)))
    clear_memory_cache()
    Program(graph)
    err = capsys.readouterr().err
    assert "remat" in err and "fusion + LLVM IR for 1 kernels" in err and "LLVM optimise + machine code" in err
    clear_memory_cache()
    Program(graph)  # a fresh process would load the same machine code from the disk cache
    assert "loaded from the disk cache" in capsys.readouterr().err


def test_pass_manager_env_dump(tmp_path, monkeypatch):
    monkeypatch.setenv("NEURAL_ARCH_DUMP", str(tmp_path))
    run_pipeline(trace(lambda x: x.exp(), np.ones(3, np.float32)))
    assert (tmp_path / "000_trace.txt").exists()


def test_failing_pass_writes_reproducer():
    def broken(graph):
        n = graph.nodes[0]
        from neural_arch.compiler.ir import Node, TensorType
        bad = Node(n.name, n.op, n.inputs, TensorType((99,), "float32"), n.attrs, n.loc)
        return graph.replace(nodes=(bad,) + graph.nodes[1:])

    graph = trace(lambda x: x.exp(), np.ones(3, np.float32))
    with pytest.raises(PassError) as info:
        run_pipeline(graph, [Pass("test_broken_pass", broken)], verify_each=True)
    assert "test_broken_pass" in str(info.value) and "reproducer:" in str(info.value)
    text = open(info.value.reproducer).read()
    assert "pipeline: test_broken_pass" in text
    assert parse("\n".join(l for l in text.splitlines() if not l.startswith("#"))) == graph


def test_unknown_pass_is_a_clear_error():
    with pytest.raises(KeyError, match="unknown pass 'nope'"):
        run_pipeline(trace(lambda x: x.exp(), np.ones(3, np.float32)), ["nope"])


# ----------------------------------------------------------------------------- random pipelines


def _model(x, w, b, t):
    h = F.gelu(x @ w + b)
    h = F.layer_norm(h * 1.0 + 0.0)
    return F.cross_entropy(F.softmax(h, -1) * 2.0 - h.T.T, t) + F.var(h) / 4.0


_RNG = np.random.default_rng(0)
_ARGS = [_RNG.standard_normal((5, 6)).astype(np.float32), _RNG.standard_normal((6, 4)).astype(np.float32),
         _RNG.standard_normal(4).astype(np.float32), np.array([0, 3, 1, 2, 2])]
_GRAPHS = [trace(_model, *_ARGS), trace(grad(_model, (0, 1, 2)), *_ARGS),
           trace(value_and_grad(_model, (0, 1, 2)), *_ARGS)]
_REFERENCE = [interpret(gr, _ARGS) for gr in _GRAPHS]
_OPTIONAL = sorted(name for name, p in PASSES.items() if p.optional and not name.startswith("test_"))


@settings(max_examples=40, deadline=None)
@given(which=st.sampled_from([0, 1, 2]), order=st.lists(st.sampled_from(_OPTIONAL), max_size=12))
def test_random_pass_subsets_and_orders_keep_the_numbers(which, order):
    res = run_pipeline(_GRAPHS[which], order, verify_each=True)
    got = interpret(res.graph, _ARGS)
    for a, b in zip(got, _REFERENCE[which]):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- random graphs

from neural_arch.compiler.ops.registry import NumpySampler  # noqa: E402
from neural_arch.compiler.verify import verify  # noqa: E402
from neural_arch.tools.randgraph import build, random_recipe  # noqa: E402


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), order=st.lists(st.sampled_from(_OPTIONAL), max_size=10))
def test_random_graphs_under_random_pipelines(seed, order):
    recipe = random_recipe(NumpySampler(seed), max_steps=12)
    graph, inputs = build(recipe)
    verify(graph)
    assert parse(graph.to_text()) == graph
    want = interpret(graph, inputs)
    for v in want:
        assert np.all(np.isfinite(v)), f"generator produced a non-finite value:\n{recipe.describe()}"
    got = interpret(run_pipeline(graph, order, verify_each=True).graph, inputs)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=recipe.describe())
