"""Memory planning: no two live buffers overlap; reuse brings the peak below the naive sum."""
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from neural_arch.compiler import functional as F, grad, trace
from neural_arch.compiler.passes.memory import Step, check_plan, plan_graph_memory, plan_memory


def test_chain_reuses_two_buffers():
    # a -> b -> c -> d, each 1 KiB, elementwise: in place, one storage block
    steps = [Step("a", ("x",)), Step("b", ("a",), True), Step("c", ("b",), True), Step("d", ("c",), True),
             Step("out", ("d",))]
    plan = plan_memory(steps, {k: 1024 for k in "xabcd"} | {"out": 1024}, outputs=["out"], external=["x"])
    check_plan(plan)
    assert plan.naive_bytes == 4 * 1024
    assert plan.arena_bytes == 1024
    assert plan.buffers["d"].inplace_of == "c"


def test_non_elementwise_chain_ping_pongs():
    steps = [Step("a", ("x",)), Step("b", ("a",)), Step("c", ("b",)), Step("out", ("c",))]
    plan = plan_memory(steps, {k: 4096 for k in ["x", "a", "b", "c", "out"]}, outputs=["out"], external=["x"])
    check_plan(plan)
    assert plan.arena_bytes == 2 * 4096  # two buffers alternate
    assert plan.buffers["a"].offset == plan.buffers["c"].offset


def test_overlap_is_detected():
    steps = [Step("a", ("x",)), Step("b", ("a",)), Step("out", ("a", "b"))]
    plan = plan_memory(steps, {"x": 64, "a": 64, "b": 64, "out": 64}, outputs=["out"], external=["x"])
    check_plan(plan)
    assert plan.buffers["a"].offset != plan.buffers["b"].offset
    broken = plan.buffers["b"].__class__("b", 64, plan.buffers["a"].offset, 1, 2)
    plan.buffers["b"] = broken
    try:
        check_plan(plan)
    except AssertionError as e:
        assert "overlap" in str(e)
    else:
        raise AssertionError("check_plan accepted overlapping live buffers")


def _pairwise_check(plan) -> bool:
    """check_plan's definition, pair by pair: True when no two live buffers overlap."""
    bs = list(plan.buffers.values())
    for i, a in enumerate(bs):
        for b in bs[i + 1:]:
            live = not (a.end < b.start or b.end < a.start)
            overlap = a.offset < b.offset + b.nbytes and b.offset < a.offset + a.nbytes
            if live and overlap and a.nbytes and b.nbytes and \
                    not ((b.inplace_of == a.name and a.end == b.start) or (a.inplace_of == b.name and b.end == a.start)):
                return False
    return True


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 4), st.integers(0, 4), st.integers(0, 3),
                          st.booleans()), min_size=1, max_size=12))
def test_check_plan_sweep_agrees_with_every_pair(specs):
    """check_plan compares only buffers alive together (a sweep over start steps): it raises
    exactly when some pair of live buffers overlaps, as comparing every pair would say."""
    from neural_arch.compiler.passes.memory import Buffer, MemoryPlan
    buffers = {}
    for k, (start, length, offset, size, inplace) in enumerate(specs):
        prev = f"b{k - 1}" if inplace and k else None
        buffers[f"b{k}"] = Buffer(f"b{k}", size * 64, offset * 64, start, start + length, prev)
    plan = MemoryPlan(buffers, 0, 0)
    try:
        check_plan(plan)
        ok = True
    except AssertionError as e:
        assert "overlap" in str(e)
        ok = False
    assert ok == _pairwise_check(plan)


def _block(x, w1, w2):
    h = F.layer_norm(x)
    a = F.softmax(h @ h.T, -1) @ h
    return (F.gelu((x + a) @ w1) @ w2).sum()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 9), d=st.integers(1, 9))
def test_plans_of_real_graphs_are_valid_and_no_worse_than_naive(n, d):
    rng = np.random.default_rng(n * 10 + d)
    args = [rng.standard_normal(s).astype(np.float32) for s in [(n, d), (d, 2 * d), (2 * d, d)]]
    for graph in (trace(_block, *args), trace(grad(_block, (0, 1, 2)), *args)):
        plan = plan_graph_memory(graph)
        check_plan(plan)
        assert plan.arena_bytes <= plan.naive_bytes
        assert set(plan.buffers) == {nd.name for nd in graph.nodes} - set(graph.outputs)
    assert plan.arena_bytes < plan.naive_bytes  # the backward graph always has reuse
    assert "planned peak" in plan.report()


def _block_training_program(B, T, D, H):
    from neural_arch.compiler.autodiff import autodiff
    from neural_arch.compiler.ir import TensorType
    from neural_arch.compiler.trace import trace_with_info
    from neural_arch.models import nn
    from neural_arch.runtime.program import Program
    nn.manual_seed(0)
    block = nn.TransformerBlock(D, H, causal=True)
    tr = trace_with_info(lambda x: (block(x) ** 2).mean(), TensorType((B, T, D)),
                         params=dict(block.named_parameters()))
    wrt = [i.name for i in tr.graph.inputs if i.kind == "param"]
    return Program(autodiff(tr.graph, wrt, with_value=True))


@pytest.mark.parametrize("B,T,D,H", [(4, 64, 128, 4), (2, 128, 64, 4)])
def test_transformer_block_training_step_peak_memory_bound(B, T, D, H):
    """The planned arena of a pre-LN block's forward+backward stays within the bound derived
    in docs/passes.md ("A bound for a transformer block's training step"):

        saved    <= 4 * (9*B*T*D + 2*B*T*F + B*H*T*T + B*H*T + 2*B*T)    (F = 4*D)
        arena    <= saved + 4 * 3 * max(B*T*F, B*H*T*T)

    Saved for backward: 9 model-width values per token (the two layer-norm outputs and
    their centred inputs, q, k, v, the attention output, the projection's input and the
    residual stream), the MLP's hidden pre-activation and its GELU's sigmoid (the GELU value
    is recomputed from them), the attention weights, and the row statistics of the softmax and the layer norms.  On top,
    backward holds at most three tensors of the largest per-token width at once: in the MLP
    the incoming gradient, a recomputed activation and a weight-gradient operand (F wide);
    in the attention the score gradient, the softmax-gradient factor and its product (T wide
    per head)."""
    F_ = 4 * D
    prog = _block_training_program(B, T, D, H)
    plan = prog.memory_plan
    saved = 4 * (9 * B * T * D + 2 * B * T * F_ + B * H * T * T + B * H * T + 2 * B * T)
    bound = saved + 4 * 3 * max(B * T * F_, B * H * T * T)
    assert plan.arena_bytes <= bound, (plan.arena_bytes, bound)
    # and lifetimes really share memory: well under half of all intermediates side by side
    assert plan.arena_bytes < 0.4 * plan.naive_bytes, (plan.arena_bytes, plan.naive_bytes)


def test_memory_plan_is_kept_with_the_module_records(monkeypatch, tmp_path, capsys):
    """A cached compile reads the arena plan from the module records instead of planning:
    the plan read back is the one planned; a planted valid plan (every buffer 64 bytes up) is
    what a hit uses, and the program still computes the same; a plan with overlapping live
    buffers is ignored, replanned and replaced."""
    import json
    from neural_arch.compiler.autodiff import autodiff
    from neural_arch.runtime.cache import ObjectCache
    from neural_arch.runtime.program import Program, clear_memory_cache
    monkeypatch.setenv("NEURAL_ARCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("NEURAL_ARCH_CACHE", "1")
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype(np.float32) for s in ((6, 8), (8, 32), (32, 8))]
    g = trace(_block, *args)
    g = autodiff(g, [i.name for i in g.inputs], with_value=True)

    def program():
        clear_memory_cache()
        return Program(g)

    def records():
        (key,) = [h["key_parts"] for _, h in ObjectCache(tmp_path).entries()
                  if h["key_parts"].get("kind") == "module records"]
        return key, json.loads(ObjectCache(tmp_path).get(key))

    p1 = program()
    key, meta = records()
    assert meta["plan"]["arena_bytes"] == p1.memory_plan.arena_bytes
    want = p1(*args)
    p2 = program()
    assert p2.memory_plan.buffers == p1.memory_plan.buffers
    assert (p2.memory_plan.arena_bytes, p2.memory_plan.naive_bytes) == (p1.memory_plan.arena_bytes,
                                                                       p1.memory_plan.naive_bytes)
    moved = dict(meta["plan"], arena_bytes=meta["plan"]["arena_bytes"] + 64,
                 buffers=[[n, b, o + 64, s, e, i] for n, b, o, s, e, i in meta["plan"]["buffers"]])
    ObjectCache(tmp_path).put(key, json.dumps(dict(meta, plan=moved)).encode())
    p3 = program()
    assert p3.memory_plan.arena_bytes == p1.memory_plan.arena_bytes + 64
    assert all(p3.memory_plan.buffers[n].offset == b.offset + 64 for n, b in p1.memory_plan.buffers.items())
    for a, b in zip(p3(*args), want):
        np.testing.assert_array_equal(a, b)
    bad = [list(b) for b in meta["plan"]["buffers"]]
    big = max(bad, key=lambda b: b[1])
    for b in bad:  # every buffer at offset 0: some live ones overlap
        b[2] = 0
    assert any(b is not big and b[3] <= big[4] and big[3] <= b[4] for b in bad)
    ObjectCache(tmp_path).put(key, json.dumps(dict(meta, plan=dict(meta["plan"], buffers=bad))).encode())
    capsys.readouterr()
    p4 = program()
    assert "ignoring the cached memory plan" in capsys.readouterr().err
    assert p4.memory_plan.buffers == p1.memory_plan.buffers
    assert records()[1]["plan"] == meta["plan"]


def _live_peak(order, graph):
    """Peak bytes of kernel-crossing intermediates alive at once when the kernels run in
    ``order`` (a value lives from its kernel to its last reader)."""
    from neural_arch.runtime.program import _group_reads
    reads = [_group_reads(g) for g in order]
    last = {}
    for k, r in enumerate(reads):
        for v in r:
            last[v] = k
    outs, peak, live = set(graph.outputs), 0, {}
    for k, g in enumerate(order):
        for v in reads[k]:
            assert v in live or v not in {o for h in order for o in h.outputs}, f"{v} read before it is written"
        for o in g.outputs:
            if o in last and o not in outs:
                live[o] = graph.types[o].nbytes
        peak = max(peak, sum(live.values()))
        for v in reads[k]:
            if last.get(v) == k:
                live.pop(v, None)
    return peak


def test_weight_gradient_kernels_run_early_and_lower_the_peak():
    """Autodiff lists each weight gradient (fused with its AdamW update, written in place)
    after the whole backward pass; the kernel order runs a kernel that frees at least what it
    allocates as soon as its inputs are ready, so each layer's activations and output
    gradient die in its own part of backward."""
    from neural_arch.compiler.passes import DEFAULT_PIPELINE, run_pipeline
    from neural_arch.models import GPT2, GPT2Config, nn, optim
    from neural_arch.models.train import build_train_graph
    from neural_arch.runtime.program import _memory_order, fused_groups
    nn.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=3, n_head=2, dropout=0.0))
    opt = optim.AdamW(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 64, (4, 32)), rng.integers(0, 64, (4, 32))

    def loss_fn(m, a, b):
        return F.cross_entropy(m(a).reshape((-1, 64)), b.reshape((-1,)))
    g = run_pipeline(build_train_graph(model, loss_fn, opt, (x, y)).graph, DEFAULT_PIPELINE).graph
    plain = [s for s in fused_groups(g, memory_order=False) if s.kind != "guard"]
    ordered = _memory_order(plain, g, {})
    assert sorted(map(id, ordered)) == sorted(map(id, plain)) and ordered != plain
    early, late = _live_peak(ordered, g), _live_peak(plain, g)
    assert early < 0.8 * late, (early, late)


def test_matmul_epilogue_output_is_planned_over_the_product():
    """``gelu(x @ w + b) * 2`` inside a program: the epilogue's result may share the product's
    buffer (everything computed from the product is elementwise, through reshapes), and the
    numbers equal the interpreter's.  With a transpose of it in the epilogue, the product
    keeps its own buffer."""
    from neural_arch.compiler import trace
    from neural_arch.compiler.ir import TensorType
    from neural_arch.runtime.interpreter import interpret
    from neural_arch.runtime.program import Program
    rng = np.random.default_rng(0)
    args = [rng.standard_normal(s).astype(np.float32) for s in [(2, 48, 32), (32, 64), (64,)]]

    def f(x, w, b):
        y = F.gelu((x.reshape((96, 32)) @ w).reshape((2, 48, 64)) + b, approximate="tanh") * 2.0
        return y.sum(), y * y + 1.0
    g = trace(f, *[TensorType(a.shape) for a in args])
    prog = Program(g)
    mm = [k for k in prog.module.kernels if k.strategy == "matmul"]
    assert len(mm) == 1 and mm[0].reuse, mm
    out, prod = mm[0].reuse[0]
    assert prog.memory_plan.buffers[out].inplace_of == prod
    assert prog.memory_plan.buffers[out].offset == prog.memory_plan.buffers[prod].offset
    for a, b in zip(prog(*args), interpret(g, args)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)

    def t(x, w):
        y = (x.reshape((96, 32)) @ w) * 3.0
        return y.sum(), y.transpose((1, 0)) + 1.0

    def s(x, w):  # an output of another shape is computed in a second loop, after the first
        y = (x.reshape((96, 32)) @ w) * 3.0
        return y.sum(), y.reshape((2, 48, 64)) + 1.0
    for fn in (t, s):
        g = trace(fn, *[TensorType(a.shape) for a in args[:2]])
        prog = Program(g)
        (k,) = [k for k in prog.module.kernels if k.strategy == "matmul"]
        assert k.reuse == () and len(k.outputs) == 2, k
        for a, b in zip(prog(*args[:2]), interpret(g, args[:2])):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
