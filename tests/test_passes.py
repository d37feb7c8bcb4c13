"""Pass tests: text in, text out (golden), the pass manager's instruments, and random pass
subsets/orders giving the same numbers as the unoptimised graph."""
import os
import tempfile
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



SPLIT_VJP = """
    graph f(%g: f32[2, 4, 3, 2, 5]) {
      %0: f32[2, 4, 1, 2, 5] = slice(%g) {starts=[0, 0, 0, 0, 0], stops=[2, 4, 1, 2, 5], steps=[1, 1, 1, 1, 1]}
      %1: f32[2, 4, 1, 2, 5] = slice(%g) {starts=[0, 0, 1, 0, 0], stops=[2, 4, 2, 2, 5], steps=[1, 1, 1, 1, 1]}
      %2: f32[2, 4, 1, 2, 5] = slice(%g) {starts=[0, 0, 2, 0, 0], stops=[2, 4, 3, 2, 5], steps=[1, 1, 1, 1, 1]}
      %3: f32[2, 4, 10] = reshape(%0) {shape=[2, 4, 10]}
      %4: f32[2, 4, 10] = reshape(%1) {shape=[2, 4, 10]}
      %5: f32[2, 4, 10] = reshape(%2) {shape=[2, 4, 10]}
      %6: f32[2, 4, 30] = pad(%PIECE_A) {lo=[0, 0, LO_A], hi=[0, 0, HI_A], interior=[0, 0, 0], value=0.0}
      %7: f32[2, 4, 30] = pad(%4) {lo=[0, 0, 10], hi=[0, 0, 10], interior=[0, 0, 0], value=0.0}
      %8: f32[2, 4, 30] = add(%6, %7)
      %9: f32[2, 4, 30] = pad(%PIECE_C) {lo=[0, 0, LO_C], hi=[0, 0, HI_C], interior=[0, 0, 0], value=0.0}
      %10: f32[2, 4, 30] = add(%8, %9)
      return (%10)
    }"""


def test_algebra_reassembles_a_split_gradient():
    """The VJP of split over pieces cut from one tensor (a sum of pads of reshaped slices)
    is that tensor reshaped; swapped pieces or a piece twice are not, and keep their sum."""
    def graph(a, c):
        text = SPLIT_VJP
        for k, v in {"PIECE_A": a[0], "LO_A": a[1], "HI_A": 20 - a[1], "PIECE_C": c[0], "LO_C": c[1],
                     "HI_C": 20 - c[1]}.items():
            text = text.replace(k, str(v))
        return g(text)
    gin = np.random.default_rng(0).standard_normal((2, 4, 3, 2, 5)).astype(np.float32)
    ok = graph(("3", 0), ("5", 20))
    simple = dead_code_elimination(algebraic_simplify(ok))
    assert [n.op for n in simple.nodes] == ["reshape"], simple
    np.testing.assert_array_equal(interpret(simple, [gin])[0], interpret(ok, [gin])[0])
    for a, c in ((("5", 0), ("3", 20)), (("3", 0), ("3", 20))):  # pieces swapped; one piece twice
        other = graph(a, c)
        kept = dead_code_elimination(algebraic_simplify(other))
        assert "pad" in [n.op for n in kept.nodes], kept
        np.testing.assert_array_equal(interpret(kept, [gin])[0], interpret(other, [gin])[0])

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


def test_failing_pass_writes_reproducer(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # (the reproducer goes to the temporary directory)

    def broken(graph):
        n = graph.nodes[0]
        from neural_arch.compiler.ir import Node, TensorType
        bad = Node(n.name, n.op, n.inputs, TensorType((99,), "float32"), n.attrs, n.loc)
        return graph.replace(nodes=(bad,) + graph.nodes[1:])

    graph = trace(lambda x: x.exp(), np.ones(3, np.float32))
    with pytest.raises(PassError) as info:
        run_pipeline(graph, [Pass("test_broken_pass", broken)], verify_each=True)
    assert "test_broken_pass" in str(info.value) and "reproducer:" in str(info.value)
    assert os.path.dirname(info.value.reproducer) == str(tmp_path)
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


# ----------------------------------------------------------------------------- the pipeline's result, cached


def _relocated(graph, rng):
    """The graph with every node's location replaced by a random one (same text otherwise)."""
    from neural_arch.compiler.ir import Node, SourceLoc
    return graph.replace(nodes=[Node(n.name, n.op, n.inputs, n.type, n.attrs,
                                     SourceLoc(f"f{rng.integers(3)}.py", int(rng.integers(1, 9))))
                                for n in graph.nodes])


def _train_graph():
    from neural_arch.models import GPT2, GPT2Config, nn, optim
    from neural_arch.models.train import build_train_graph
    nn.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=13, n_positions=8, n_embd=16, n_layer=1, n_head=2, dropout=0.1))
    x = np.random.default_rng(0).integers(0, 13, (2, 8))
    return build_train_graph(model, lambda m, x, y: F.cross_entropy(m(x).reshape((-1, 13)), y.reshape((-1,))),
                             optim.AdamW(model.parameters(), lr=1e-3), (x, x), 1.0).graph


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_default_pipeline_ignores_locations(seed):
    """What the pipeline's cache relies on: the passes never look at source locations, so
    the same graph with other locations gives the same graph, and every result node carries
    the location of the traced node it came from (by identity)."""
    from neural_arch.compiler.passes import DEFAULT_PIPELINE
    from neural_arch.runtime.program import canonical_text
    rng = np.random.default_rng(seed)
    graph, _ = build(random_recipe(NumpySampler(seed), max_steps=12))
    for g in (graph, _train_graph()) if seed % 10 == 0 else (graph,):
        a = _relocated(g, rng)
        b = _relocated(g, rng)
        ra, rb = run_pipeline(a, DEFAULT_PIPELINE).graph, run_pipeline(b, DEFAULT_PIPELINE).graph
        assert canonical_text(ra) == canonical_text(rb)
        own = {id(n.loc) for n in a.nodes}
        assert all(n.loc is None or id(n.loc) in own for n in ra.nodes)
        where = {id(n.loc): k for k, n in enumerate(a.nodes)}
        assert [None if n.loc is None else b.nodes[where[id(n.loc)]].loc for n in ra.nodes] == \
            [n.loc for n in rb.nodes]


def test_cached_pipeline_result_has_this_traces_locations(monkeypatch, tmp_path):
    """A compile reads the pipeline's result from the disk cache, keyed by the traced
    graph's text (no locations): the graph read back equals the one the passes make,
    locations included, and for a trace of the same computation from other lines it carries
    those lines, so a failing index check names the line of the trace being compiled."""
    from neural_arch.compiler.ir import TensorType
    from neural_arch.compiler.ops.registry import OpIndexError
    from neural_arch.compiler.passes import DEFAULT_PIPELINE
    from neural_arch.runtime.cache import ObjectCache
    from neural_arch.runtime.program import Program, clear_memory_cache
    monkeypatch.setenv("NEURAL_ARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("NEURAL_ARCH_CACHE", "1")
    monkeypatch.delenv("NEURAL_ARCH_TIME_PASSES", raising=False)

    def first(w, i):
        return F.gather(F.softmax(w * 2.0, axis=-1), i, axis=0).sum()  # first trace

    def second(w, i):
        h = F.softmax(w * 2.0, axis=-1)  # second trace
        return F.gather(h, i, axis=0).sum()  # second gather

    types = (TensorType((4, 3)), TensorType((2,), "int64"))
    g1, g2 = trace(first, *types), trace(second, *types)
    assert g1.replace(name="x").to_text() != g2.replace(name="x").to_text()
    g2 = g2.replace(name=g1.name)
    clear_memory_cache()
    p1 = Program(g1)
    assert p1.graph == run_pipeline(g1, DEFAULT_PIPELINE).graph
    entries = [h["key_parts"] for _, h in ObjectCache(tmp_path).entries() if h["key_parts"].get("kind") == "passes"]
    assert len(entries) == 1 and entries[0]["pipeline"] == list(DEFAULT_PIPELINE)
    clear_memory_cache()
    p2 = Program(g2)  # the same text: a hit
    assert len([h for _, h in ObjectCache(tmp_path).entries() if h["key_parts"].get("kind") == "passes"]) == 1
    assert p2.graph == run_pipeline(g2, DEFAULT_PIPELINE).graph != p1.graph
    w = np.ones((4, 3), np.float32)
    with pytest.raises(OpIndexError) as info:
        p2(w, np.array([0, 9]))
    assert "test_passes.py:" in str(info.value) and "index 9" in str(info.value)
    assert f":{second.__code__.co_firstlineno + 2})" in str(info.value)  # the second gather's line
    # an entry naming a location the trace does not have is not trusted
    key = entries[0]
    import json
    rec = json.loads(ObjectCache(tmp_path).get(key))
    rec["nodes"][0][-1] = 10_000
    ObjectCache(tmp_path).put(key, json.dumps(rec).encode())
    clear_memory_cache()
    p3 = Program(g2)
    assert p3.graph == p2.graph


def test_instruments_run_the_passes(monkeypatch, tmp_path, capsys):
    """With an instrument on, a compile runs its passes (to show them) and caches nothing."""
    from neural_arch.runtime.cache import ObjectCache
    from neural_arch.runtime.program import Program, clear_memory_cache
    monkeypatch.setenv("NEURAL_ARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("NEURAL_ARCH_VERIFY", "1")
    clear_memory_cache()
    Program(trace(lambda x: F.exp(x * 3.0).sum(), np.ones((2, 5), np.float32)))
    assert not [h for _, h in ObjectCache(tmp_path).entries() if h["key_parts"].get("kind") == "passes"]
