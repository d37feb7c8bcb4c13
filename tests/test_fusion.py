"""Fusion: exact kernel counts for the patterns that matter, structural invariants of every
plan, and an explanation for every decision."""
import numpy as np
from hypothesis import given, settings, strategies as st

from neural_arch.compiler import functional as F, trace, value_and_grad
from neural_arch.compiler.ops.registry import NumpySampler
from neural_arch.compiler.passes import run_pipeline
from neural_arch.compiler.passes.fusion import fuse
from neural_arch.tools.randgraph import build, random_recipe

RNG = np.random.default_rng(0)


def P(*shape):
    return (RNG.standard_normal(shape) * 0.1).astype(np.float32)


def plan_of(fn, *args):
    return fuse(run_pipeline(trace(fn, *args)).graph)


def check_invariants(plan):
    g = plan.graph
    prod = g.producer()
    grouped = [m for gr in plan.groups for m in gr.nodes]
    assert len(grouped) == len(set(grouped)), "a node sits in two kernels"
    inlined = {m for gr in plan.groups for m in gr.inlined}
    for n in g.nodes:
        assert n.name in grouped or n.name in inlined or n.name in plan.guards or \
            not any(n.name in prod[u].inputs for u in grouped), f"%{n.name} is computed nowhere"
    for o in g.outputs:
        assert o in g.input_names or o in grouped, f"output %{o} is not written by a kernel"
    # the kernel graph is acyclic: kernels in list order only read earlier kernels' outputs
    written = {}
    for gr in plan.groups:
        for o in gr.outputs:
            written[o] = gr.id
    deps = {gr.id: {written[i] for i in gr.inputs if i in written} for gr in plan.groups}

    def visit(k, stack):
        assert k not in stack, "kernels depend on each other in a cycle"
        for d in deps[k]:
            visit(d, stack | {k})
    for gr in plan.groups:
        visit(gr.id, frozenset())
    decided = {d.node for d in plan.decisions}
    assert all(n.name in decided for n in g.nodes), "a node has no recorded fusion decision"


def test_layer_norm_forward_is_one_kernel():
    plan = plan_of(lambda x, w, b: F.layer_norm(x, weight=w, bias=b), P(8, 16), P(16), P(16))
    check_invariants(plan)
    assert plan.kernel_count == 1
    assert plan.groups[0].kind == "reduce" and plan.groups[0].axes == (1,)


def test_softmax_forward_is_one_kernel():
    plan = plan_of(lambda x: F.softmax(x, -1), P(4, 8, 16))
    check_invariants(plan)
    assert plan.kernel_count == 1


def test_gelu_of_linear_is_one_matmul_kernel_with_its_epilogue():
    plan = plan_of(lambda x, w, b: F.gelu(x @ w + b), P(8, 16), P(16, 32), P(32))
    check_invariants(plan)
    assert plan.kernel_count == 1
    gr = plan.groups[0]
    assert gr.kind == "matmul" and plan.graph.producer()[gr.nodes[0]].op == "matmul"
    assert "erf" in [plan.graph.producer()[m].op for m in gr.nodes]


def test_cross_entropy_forward_is_one_kernel_and_a_guard():
    plan = plan_of(lambda x: F.cross_entropy(x, np.arange(8) % 5, label_smoothing=0.1), P(8, 5))
    check_invariants(plan)
    assert plan.kernel_count == 1
    assert len(plan.guards) == 1


def test_rms_norm_and_log_softmax_are_one_kernel_each():
    assert plan_of(lambda x, w: F.rms_norm(x, w), P(8, 16), P(16)).kernel_count == 1
    assert plan_of(lambda x: F.log_softmax(x, -1), P(8, 16)).kernel_count == 1


T, C, H = 16, 32, 4
NAMES = ["ln1_w", "ln1_b", "qkv_w", "qkv_b", "proj_w", "proj_b", "ln2_w", "ln2_b", "fc_w", "fc_b", "out_w", "out_b"]
SHAPES = [(C,), (C,), (C, 3 * C), (3 * C,), (C, C), (C,), (C,), (C,), (C, 4 * C), (4 * C,), (4 * C, C), (C,)]


def block(x, *ps):
    p = dict(zip(NAMES, ps))
    h = F.layer_norm(x, weight=p["ln1_w"], bias=p["ln1_b"])
    q, k, v = F.split(h @ p["qkv_w"] + p["qkv_b"], 3, axis=-1)

    def heads(t):
        return t.reshape(T, H, C // H).transpose(1, 0, 2)
    a = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), is_causal=True)
    x = x + (a.transpose(1, 0, 2).reshape(T, C) @ p["proj_w"] + p["proj_b"])
    h = F.layer_norm(x, weight=p["ln2_w"], bias=p["ln2_b"])
    return x + (F.gelu(h @ p["fc_w"] + p["fc_b"], "tanh") @ p["out_w"] + p["out_b"])


def test_pre_ln_transformer_block_forward_kernel_count():
    plan = plan_of(block, P(T, C), *[P(*s) for s in SHAPES])
    check_invariants(plan)
    # 2 layer norms, 4 linear layers with their epilogues, and the fused attention (scores,
    # causal mask, softmax, product: one kernel reading q, k, v in place): seven kernels,
    # every movement op read through
    kinds = [g.kind for g in plan.groups]
    assert plan.kernel_count == 7, plan.explain()
    assert kinds.count("matmul") == 4 and kinds.count("reduce") == 2 and kinds.count("opaque") == 1
    assert [plan.graph.producer()[g.nodes[0]].op for g in plan.groups if g.kind == "opaque"] == ["attention"]


def test_pre_ln_transformer_block_backward_kernel_count():
    def loss(x, *ps):
        return block(x, *ps).sum()
    plan = plan_of(value_and_grad(loss, tuple(range(13))), P(T, C), *[P(*s) for s in SHAPES])
    check_invariants(plan)
    kinds = [g.kind for g in plan.groups]
    assert kinds.count("matmul") == 12  # 4 forward, 8 backward (two per forward matmul)
    ops = [plan.graph.producer()[g.nodes[0]].op for g in plan.groups if g.kind == "opaque"]
    assert ops == ["attention", "attention_grad"]  # the backward of attention is one kernel too
    assert plan.kernel_count == 27, plan.explain()


def test_every_decision_is_explained():
    plan = plan_of(lambda x, w: F.softmax(x @ w, -1).sum(), P(4, 8), P(8, 8))
    text = plan.explain()
    assert "kernels for" in text and "decisions:" in text
    assert all(d.reason for d in plan.decisions)
    assert any(not d.taken and "matmul" in d.reason for d in plan.decisions)


def test_fusion_disabled_gives_one_kernel_per_node():
    graph = run_pipeline(trace(lambda x: F.softmax(x, -1), P(4, 8))).graph
    plan = fuse(graph, enabled=False)
    assert plan.kernel_count == len(graph.nodes)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1))
def test_random_graph_plans_are_well_formed(seed):
    graph, _ = build(random_recipe(NumpySampler(seed), max_steps=14))
    check_invariants(fuse(run_pipeline(graph).graph))
