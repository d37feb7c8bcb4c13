"""Autodiff as a graph transform: structure of the gradient graph, source lines on backward
nodes, errors, gradcheck itself (it must be able to fail), and the acceptance test of issue 2:
grad of a 2-layer transformer-style function matches float64 finite differences."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from neural_arch.compiler import grad, gradcheck, parse, tensor, trace, value_and_grad, verify
from neural_arch.compiler import functional as F
from neural_arch.compiler.autodiff import AutodiffError, autodiff
from neural_arch.compiler.gradcheck import GradcheckError
from neural_arch.compiler.ir import TensorType
from neural_arch.runtime.interpreter import interpret

from conftest import needs_torch


def _loss(w, x):
    h = F.tanh(x @ w)  # forward line
    return F.sum(h * h)


def test_autodiff_builds_a_verified_graph_with_value_and_gradients():
    g = trace(_loss, TensorType((3, 2)), TensorType((4, 3)))
    dg = verify(autodiff(g, ["w"], with_value=True))
    assert [i.name for i in dg.inputs] == ["w", "x"]
    assert dg.output_types == (TensorType(()), TensorType((3, 2)))
    dg2 = verify(autodiff(g, ["w", "x"], with_value=False))
    assert dg2.output_types == (TensorType((3, 2)), TensorType((4, 3)))
    rng = np.random.default_rng(0)
    w, x = rng.standard_normal((3, 2)), rng.standard_normal((4, 3))
    value, gw = interpret(dg, [w.astype(np.float32), x.astype(np.float32)], oracle=True)
    t = np.tanh(x @ w)
    np.testing.assert_allclose(value, (t * t).sum(), rtol=1e-6)
    np.testing.assert_allclose(gw, x.T @ (2 * t * (1 - t * t)), rtol=1e-5, atol=1e-6)


def test_backward_nodes_carry_the_forward_source_line():
    src, start = inspect.getsourcelines(_loss)
    fwd_line = start + next(i for i, s in enumerate(src) if "# forward line" in s)
    g = trace(_loss, TensorType((3, 2)), TensorType((4, 3)))
    dg = autodiff(g, ["w"])
    forward_ops = len(g.nodes)
    backward = dg.nodes[forward_ops:]
    assert backward, "no backward nodes"
    assert all(n.loc is not None and n.loc.file.endswith("test_autodiff.py") for n in dg.nodes)
    seed = backward[0]  # d loss / d loss = 1, made where autodiff was called
    assert seed.op == "full" and seed.attr["value"] == 1.0 and seed.type.shape == ()
    lines = {n.loc.line for n in backward[1:]}
    assert fwd_line in lines and lines <= {fwd_line, fwd_line + 1}
    matmul_grads = [n for n in backward if n.op == "matmul"]
    assert matmul_grads and all(n.loc.line == fwd_line for n in matmul_grads)


def test_gradient_graph_round_trips_and_interprets_identically():
    g = trace(grad(_loss), np.ones((3, 2), np.float32) * 0.3, np.ones((4, 3), np.float32))
    back = parse(g.to_text())
    assert back == g
    ins = [np.full((3, 2), 0.3, np.float32), np.linspace(-1, 1, 12, dtype=np.float32).reshape(4, 3)]
    np.testing.assert_array_equal(interpret(back, ins)[0], interpret(g, ins)[0])


def test_autodiff_errors():
    g = trace(lambda x: (F.sum(x), F.sum(x)), TensorType((2,)))
    with pytest.raises(AutodiffError, match="2 outputs"):
        autodiff(g, ["x"])
    g = trace(lambda x: x * 2.0, TensorType((2,)))
    with pytest.raises(AutodiffError, match="float scalar"):
        autodiff(g, ["x"])
    g = trace(lambda x: F.sum(x), TensorType((2,)))
    with pytest.raises(AutodiffError, match="not an input"):
        autodiff(g, ["y"])


def test_integer_paths_carry_no_gradient():
    def f(x, idx):
        return F.sum(F.gather(x, idx) * F.cast(idx, "float32"))

    x = tensor([1.0, 2.0, 3.0])
    idx = tensor([2, 2, 0])
    g = grad(f)(x, idx)
    np.testing.assert_array_equal(g.data, [0.0, 0.0, 4.0])  # 2 + 2 at index 2, 0 * x[0]


# ============================================================================ gradcheck itself


def test_gradcheck_passes_and_reports_the_worst_element():
    res = gradcheck(lambda x, y: F.sum(F.sin(x) * y), np.array([0.1, 0.2, 0.3]), np.array([1.0, -2.0, 0.5]))
    assert res.ok and res.worst_input in (0, 1) and res.abs_err < 1e-8
    assert "gradcheck ok" in str(res)


def test_gradcheck_fails_on_a_wrong_gradient():
    # stop_gradient hides half of d/dx (x * x): the reverse-mode answer x differs from 2x
    def wrong(x):
        return F.sum(x * F.stop_gradient(x))

    with pytest.raises(GradcheckError, match="FAILED: worst element is input 0") as info:
        gradcheck(wrong, np.array([1.0, 3.0]))
    assert "analytic 3" in str(info.value) and "numeric 6" in str(info.value)
    res = gradcheck(wrong, np.array([1.0, 3.0]), raise_on_failure=False)
    assert not res.ok and res.worst_index == (1,)


def test_gradcheck_of_non_scalar_output_checks_every_output_element():
    # only output element 1 depends on x[1] wrongly; a random projection must expose it
    def f(x):
        return F.concat([x[:1] * x[:1], x[1:] * F.stop_gradient(x[1:])])

    res = gradcheck(f, np.array([0.5, 2.0]), raise_on_failure=False)
    assert not res.ok and res.worst_index == (1,)


# ============================================================================ transformer-style acceptance test

D, HEADS, SEQ, FF, VOCAB = 4, 2, 3, 6, 5


def _attention(x, wq, wk, wv, wo, causal_mask):
    s, d = x.shape
    hd = d // HEADS

    def heads(t):  # (s, d) -> (heads, s, hd)
        return F.transpose(F.reshape(t, (s, HEADS, hd)), 1, 0, 2)

    q, k, v = heads(F.linear(x, wq)), heads(F.linear(x, wk)), heads(F.linear(x, wv))
    a = F.scaled_dot_product_attention(q, k, v, mask=causal_mask)
    return F.linear(F.reshape(F.transpose(a, 1, 0, 2), (s, d)), wo)


def _block(x, p, mask):
    wq, wk, wv, wo, ln1w, ln1b, w1, b1, w2, b2, ln2w, ln2b = p
    x = x + _attention(F.layer_norm(x, (D,), ln1w, ln1b), wq, wk, wv, wo, mask)
    h = F.gelu(F.linear(F.layer_norm(x, (D,), ln2w, ln2b), w1, b1), approximate="tanh")
    return x + F.linear(h, w2, b2)


N_BLOCK = 12


def transformer_loss(x, *params, targets=None):
    mask = F.tril(F.ones(SEQ, SEQ, dtype="bool"))
    h = x
    for layer in range(2):
        h = _block(h, params[layer * N_BLOCK:(layer + 1) * N_BLOCK], mask)
    logits = F.linear(F.layer_norm(h), params[-1])
    return F.cross_entropy(logits, targets, label_smoothing=0.1)


def _transformer_params(rng):
    def block():
        return [rng.standard_normal((D, D)) * 0.5 for _ in range(4)] + [
            1 + 0.1 * rng.standard_normal(D), 0.1 * rng.standard_normal(D),
            rng.standard_normal((FF, D)) * 0.5, 0.1 * rng.standard_normal(FF),
            rng.standard_normal((D, FF)) * 0.5, 0.1 * rng.standard_normal(D),
            1 + 0.1 * rng.standard_normal(D), 0.1 * rng.standard_normal(D)]
    return block() + block() + [rng.standard_normal((VOCAB, D)) * 0.5]


def test_grad_of_two_layer_transformer_matches_finite_differences():
    rng = np.random.default_rng(42)
    x = rng.standard_normal((SEQ, D))
    params = _transformer_params(rng)
    targets = tensor([1, 4, 0])

    def loss(x, *ps):
        return transformer_loss(x, *ps, targets=targets)

    res = gradcheck(loss, x, *params, eps=1e-6, rtol=1e-5, atol=1e-8)
    assert res.ok, str(res)
    # the traced graph of the gradient verifies, and eager backward agrees with grad()
    argnums = tuple(range(1 + len(params)))
    g = verify(trace(grad(loss, argnums), x, *params))
    assert len(g.outputs) == len(argnums)
    grads = grad(loss, argnums)(x, *params)
    leaves = [tensor(a, requires_grad=True) for a in [x] + params]
    loss(*leaves).backward()
    for t, gr in zip(leaves, grads):
        np.testing.assert_allclose(t.grad.data, gr.data, rtol=1e-10, atol=1e-12)
    # and the interpreter, run on the gradient graph, gives the same numbers
    outs = interpret(g, [x] + params)
    for o, gr in zip(outs, grads):
        np.testing.assert_allclose(o, gr.data, rtol=1e-10, atol=1e-12)


@needs_torch
def test_transformer_gradients_match_torch():
    import torch
    import torch.nn.functional as TF

    rng = np.random.default_rng(7)
    x = rng.standard_normal((SEQ, D))
    params = _transformer_params(rng)
    targets = np.array([3, 0, 2])

    def t_block(h, p, mask):
        wq, wk, wv, wo, ln1w, ln1b, w1, b1, w2, b2, ln2w, ln2b = p
        a_in = TF.layer_norm(h, (D,), ln1w, ln1b)
        q, k, v = (TF.linear(a_in, w).reshape(SEQ, HEADS, D // HEADS).transpose(0, 1) for w in (wq, wk, wv))
        a = TF.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + TF.linear(a.transpose(0, 1).reshape(SEQ, D), wo)
        return h + TF.linear(TF.gelu(TF.linear(TF.layer_norm(h, (D,), ln2w, ln2b), w1, b1), approximate="tanh"), w2, b2)

    tp = [torch.tensor(a, requires_grad=True) for a in [x] + params]
    mask = torch.tril(torch.ones(SEQ, SEQ, dtype=torch.bool))
    h = tp[0]
    for layer in range(2):
        h = t_block(h, tp[1 + layer * N_BLOCK:1 + (layer + 1) * N_BLOCK], mask)
    logits = TF.linear(TF.layer_norm(h, (D,)), tp[-1])
    tl = TF.cross_entropy(logits, torch.tensor(targets), label_smoothing=0.1)
    tl.backward()

    def loss(x, *ps):
        return transformer_loss(x, *ps, targets=tensor(targets))

    value, grads = value_and_grad(loss, tuple(range(1 + len(params))))(x, *params)
    np.testing.assert_allclose(value.item(), tl.item(), rtol=1e-12)
    for ours, t in zip(grads, tp):
        np.testing.assert_allclose(ours.data, t.grad.numpy(), rtol=1e-9, atol=1e-12)


def test_typed_inlining_records_what_binding_records():
    """call_graph(typed=True) (and autodiff's replay of the forward) copy the nodes of a
    traced graph without rerunning their shape rules: the trace is the one binding each
    node again gives, types, attributes and source lines included."""
    from neural_arch.compiler.autodiff import autodiff
    from neural_arch.compiler.trace import call_graph

    def f(x, w):
        return F.cross_entropy(F.gelu(x @ w), tensor([0, 2, 1, 1])) * 0.5

    x, w = np.ones((4, 8), np.float32), np.full((8, 3), 0.1, np.float32)
    g = trace(f, x, w)
    dg = autodiff(g, [i.name for i in g.inputs])
    inline = [trace(lambda a, b, t=t: tuple(call_graph(dg, a, b, typed=t)), x, w) for t in (True, False)]
    assert inline[0] == inline[1] and all(n.loc is not None for n in inline[0].nodes)
    assert any(n.op == "constant" for n in inline[0].nodes)
