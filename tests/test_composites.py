"""Composite ops (decompositions into primitives), generated from compiler/ops/composites.py:
forward against an independent float64 NumPy computation and against torch, the traced
decomposition interpreted (float32 and float64 oracle), gradients against finite
differences (compiler.gradcheck) and torch; then the numerical properties of issue 2."""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from neural_arch.compiler import Tensor, gradcheck, tensor, trace, verify
from neural_arch.compiler import functional as F
from neural_arch.compiler.ops.composites import COMPOSITES, REQUIRED_COMPOSITES, CompositeSpec
from neural_arch.compiler.ops.registry import Case, NumpySampler, ShapeError
from neural_arch.runtime.interpreter import interpret

from conftest import HAVE_TORCH, HypothesisSampler, assert_close, needs_torch

NAMES = sorted(COMPOSITES)


def outputs(res) -> list[Tensor]:
    return list(res) if isinstance(res, (tuple, list)) else [res]


def ref_outputs(res) -> list[np.ndarray]:
    return [np.asarray(r) for r in (res if isinstance(res, tuple) else (res,))]


def to64(x):
    return x.astype(np.float64) if x.dtype == np.float32 else x


def draw(name, data) -> Case:
    return COMPOSITES[name].gen(HypothesisSampler(data))


# ============================================================================ meta


def test_every_required_composite_has_a_spec():
    missing = [n for n in REQUIRED_COMPOSITES if n not in COMPOSITES]
    assert not missing, f"composites without a test spec: {missing}"


@pytest.mark.parametrize("name", NAMES)
def test_composite_spec_is_complete(name):
    spec = COMPOSITES[name]
    assert isinstance(spec, CompositeSpec) and spec.name == name
    assert callable(spec.fn) and callable(spec.reference) and callable(spec.gen)
    for seed in range(3):
        case = spec.gen(NumpySampler(seed))
        out = outputs(spec.fn(*[Tensor(x) for x in case.inputs], **case.attrs))
        ref = ref_outputs(spec.reference(*[to64(x) for x in case.inputs], **case.attrs))
        assert [o.shape for o in out] == [r.shape for r in ref]


# ============================================================================ forward


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_forward_matches_numpy_float64(name, data):
    spec = COMPOSITES[name]
    case = draw(name, data)
    out = outputs(spec.fn(*[Tensor(x) for x in case.inputs], **case.attrs))
    ref = ref_outputs(spec.reference(*[to64(x) for x in case.inputs], **case.attrs))
    assert len(out) == len(ref)
    for o, r in zip(out, ref):
        assert o.dtype == "float32", f"{name}: float32 inputs gave {o.dtype}"
        assert_close(o.data, r, spec.rtol, spec.atol, f"{name} float32 vs float64 NumPy")
    # float64 inputs: agreement to float64 precision
    out64 = outputs(spec.fn(*[Tensor(to64(x)) for x in case.inputs], **case.attrs))
    for o, r in zip(out64, ref):
        assert o.dtype == "float64"
        assert_close(o.data, r, 1e-10, 1e-12, f"{name} float64 vs float64 NumPy")


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_traced_decomposition_interprets_like_eager(name, data):
    spec = COMPOSITES[name]
    case = draw(name, data)

    def fn(*xs):
        return tuple(outputs(spec.fn(*xs, **case.attrs)))

    fn.__name__ = name
    g = verify(trace(fn, *case.inputs))
    assert all(n.loc is not None for n in g.nodes)
    eager = outputs(spec.fn(*[Tensor(x) for x in case.inputs], **case.attrs))
    for got, want in zip(interpret(g, case.inputs), eager):
        np.testing.assert_array_equal(got, want.data)
    ref = ref_outputs(spec.reference(*[to64(x) for x in case.inputs], **case.attrs))
    for got, want in zip(interpret(g, case.inputs, oracle=True), ref):
        assert_close(got, want, 1e-9, 1e-9, f"{name}: interpreter oracle vs NumPy float64")


# ============================================================================ gradients


def _scalarize(spec, attrs):
    """fn with its attributes bound, outputs flattened into one vector (for gradcheck)."""
    def fn(*ts):
        outs = [F.reshape(o, -1) for o in outputs(spec.fn(*ts, **attrs))]
        return outs[0] if len(outs) == 1 else F.concat(outs)
    return fn


@pytest.mark.parametrize("name", [n for n in NAMES if COMPOSITES[n].grad])
@given(data=st.data())
def test_gradients_match_finite_differences(name, data):
    spec = COMPOSITES[name]
    case = draw(name, data)
    res = gradcheck(_scalarize(spec, case.attrs), *case.inputs, rtol=spec.grad_rtol, atol=spec.grad_atol,
                    seed=data.draw(st.integers(0, 1000)), raise_on_failure=False)
    assert res.ok, f"{name}: {res}"


@pytest.mark.parametrize("name", [n for n in NAMES if COMPOSITES[n].grad])
def test_eager_backward_matches_grad(name):
    from neural_arch.compiler import grad
    spec = COMPOSITES[name]
    case = spec.gen(NumpySampler(3))
    xs = [to64(x) for x in case.inputs]
    argnums = tuple(i for i, x in enumerate(xs) if x.dtype == np.float64)
    fn = _scalarize(spec, case.attrs)
    proj = None

    def loss(*ts):
        nonlocal proj
        o = fn(*ts)
        if proj is None:
            proj = np.random.default_rng(0).standard_normal(o.shape)
        return (o * Tensor(proj)).sum()

    leaves = [Tensor(x, requires_grad=i in argnums) for i, x in enumerate(xs)]
    loss(*leaves).backward()
    traced = grad(loss, argnums)(*[Tensor(x) for x in xs])
    for k, i in enumerate(argnums):
        eager = np.zeros(xs[i].shape) if leaves[i].grad is None else leaves[i].grad.data
        assert_close(eager, traced[k].data, 1e-12, 1e-12, f"{name} input {i}")


# ============================================================================ torch

if HAVE_TORCH:
    import torch
    import torch.nn.functional as TF

    def _t_axes(axis, ndim):
        return tuple(range(ndim)) if axis is None else axis

    def _t_layer_norm(x, *wb, k):
        return TF.layer_norm(x, x.shape[x.ndim - k:], *(wb or (None, None)), eps=1e-5)

    def _t_cross_entropy(logits, target, ignore_index, label_smoothing, reduction):
        c = logits.shape[-1]
        out = TF.cross_entropy(logits.reshape(-1, c), target.reshape(-1), ignore_index=ignore_index,
                               label_smoothing=label_smoothing, reduction=reduction)
        return out.reshape(target.shape) if reduction == "none" else out

    def _t_sdpa(q, k, v, *mask, is_causal, scale):
        lq, lk = q.shape[-2], k.shape[-2]
        m = mask[0] if mask else None
        if is_causal:  # ours is bottom-right aligned: pass it as an explicit mask
            allowed = torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq)
            if m is None or m.dtype == torch.bool:
                m = allowed if m is None else (m & allowed)
            else:
                m = m.masked_fill(~allowed, -math.inf)
        return TF.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=scale)

    def _t_split(x, sizes, axis):
        if isinstance(sizes, int):
            return tuple(torch.tensor_split(x, sizes, dim=axis))
        return tuple(torch.split(x, list(sizes), dim=axis))

    TORCH = {
        "mean": lambda x, axis, keepdims: torch.mean(x, dim=_t_axes(axis, x.ndim), keepdim=keepdims),
        "var": lambda x, axis, keepdims, correction: torch.var(x, dim=_t_axes(axis, x.ndim),
                                                              correction=correction, keepdim=keepdims),
        "softmax": lambda x, axis: torch.softmax(x, axis),
        "log_softmax": lambda x, axis: torch.log_softmax(x, axis),
        "logsumexp": lambda x, axis, keepdims: torch.logsumexp(x, dim=_t_axes(axis, x.ndim), keepdim=keepdims),
        "layer_norm": _t_layer_norm,
        "rms_norm": lambda x, *w: TF.rms_norm(x, (x.shape[-1],), w[0] if w else None, eps=1e-6),
        "gelu": TF.gelu, "gelu_tanh": lambda x: TF.gelu(x, approximate="tanh"),
        "silu": TF.silu,
        "cross_entropy": _t_cross_entropy,
        "mse_loss": lambda p, t, reduction: TF.mse_loss(p, t, reduction=reduction),
        "masked_fill": lambda x, m, value: x.masked_fill(m, value),
        "tril": lambda x, k: torch.tril(x, k), "triu": lambda x, k: torch.triu(x, k),
        "stack": lambda *xs, axis: torch.stack(xs, dim=axis),
        "split": _t_split,
        "embedding": lambda ids, w: TF.embedding(ids, w),
        "scaled_dot_product_attention": _t_sdpa,
        "linear": lambda x, w, *b: TF.linear(x, w, b[0] if b else None),
    }
else:  # pragma: no cover
    TORCH = {}

NO_TORCH = {"dropout": "torch's dropout draws from its own generator; compared with an independent "
                       "splitmix64 reference instead"}


@needs_torch
def test_torch_table_covers_the_composites():
    assert set(NAMES) - set(TORCH) == set(NO_TORCH)


@needs_torch
@pytest.mark.parametrize("name", sorted(TORCH))
@given(data=st.data())
def test_against_torch(name, data):
    spec = COMPOSITES[name]
    case = draw(name, data)
    xs = [to64(x) for x in case.inputs]
    txs = [torch.tensor(x, requires_grad=x.dtype == np.float64) for x in xs]
    leaves = [Tensor(x, requires_grad=x.dtype == np.float64) for x in xs]
    tout = outputs(TORCH[name](*txs, **case.attrs))
    out = outputs(spec.fn(*leaves, **case.attrs))
    assert len(out) == len(tout)
    for o, t in zip(out, tout):
        assert o.shape == tuple(t.shape)
        assert_close(o.data, t.detach().numpy(), 1e-10, 1e-12, f"{name} forward vs torch")
    projs = [np.random.default_rng(i).standard_normal(o.shape) for i, o in enumerate(out)]
    if not any(o.requires_grad for o in out) or not all(np.isfinite(o.data).all() for o in out):
        return
    sum(((t * torch.tensor(p)).sum() for t, p in zip(tout, projs)), torch.zeros((), dtype=torch.float64)).backward()
    loss = None
    for o, p in zip(out, projs):
        term = (o * Tensor(p)).sum()
        loss = term if loss is None else loss + term
    loss.backward()
    for x, t in zip(leaves, txs):
        if x.requires_grad:
            ours = np.zeros(x.shape) if x.grad is None else x.grad.data
            theirs = np.zeros(x.shape) if t.grad is None else t.grad.numpy()
            assert_close(ours, theirs, 1e-9, 1e-10, f"{name} backward vs torch")


# ============================================================================ properties

rng = np.random.default_rng(0)


@pytest.mark.parametrize("fn", [F.softmax, F.log_softmax, F.logsumexp])
@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_stable_at_large_logits(fn, scale):
    x = np.array([[1.0, 0.5, -0.25, 0.0], [0.3, -0.7, 0.9, 0.1]], dtype=np.float32) * scale
    out = fn(tensor(x)).data
    assert np.all(np.isfinite(out)) or fn is F.log_softmax and np.all(~np.isnan(out))
    x64 = x.astype(np.float64)
    m = x64.max(-1, keepdims=True)
    lse = np.log(np.exp(x64 - m).sum(-1, keepdims=True)) + m
    want = {F.softmax: np.exp(x64 - lse), F.log_softmax: x64 - lse, F.logsumexp: lse[..., 0]}[fn]
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("scale", [1e4, -1e4])
def test_cross_entropy_stable_at_large_logits(scale):
    logits = np.array([[1.0, 0.5, -0.25], [0.3, -0.7, 0.9]], dtype=np.float32) * scale
    target = np.array([0, 1])
    x = tensor(logits, requires_grad=True)
    loss = F.cross_entropy(x, tensor(target))
    loss.backward()
    x64 = logits.astype(np.float64)
    m = x64.max(-1, keepdims=True)
    lsm = x64 - (np.log(np.exp(x64 - m).sum(-1, keepdims=True)) + m)
    want = -lsm[np.arange(2), target].mean()
    assert np.isfinite(loss.item()) and np.all(np.isfinite(x.grad.data))
    np.testing.assert_allclose(loss.item(), want, rtol=1e-6)
    np.testing.assert_allclose(x.grad.data, (np.exp(lsm) - np.eye(3)[target]) / 2, atol=1e-6)
    if HAVE_TORCH:
        t = torch.tensor(logits, requires_grad=True)
        TF.cross_entropy(t, torch.tensor(target)).backward()
        np.testing.assert_allclose(loss.item(), TF.cross_entropy(torch.tensor(logits), torch.tensor(target)).item(),
                                   rtol=1e-6)
        np.testing.assert_allclose(x.grad.data, t.grad.numpy(), atol=1e-6)


@given(st.integers(1, 6), st.integers(1, 8), st.floats(-50, 50), st.integers(0, 2**16))
def test_softmax_sums_to_one_and_is_shift_invariant(rows, cols, shift, seed):
    x = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32) * 3
    p = F.softmax(tensor(x)).data
    np.testing.assert_allclose(p.sum(-1), 1.0, rtol=1e-6)
    assert np.all(p >= 0)
    np.testing.assert_allclose(F.softmax(tensor(x + np.float32(shift))).data, p, atol=2e-6)
    np.testing.assert_allclose(F.softmax(tensor(x), axis=0).data.sum(0), 1.0, rtol=1e-6)


@pytest.mark.parametrize("big", [1000.0, -1000.0])
def test_softmax_stable_at_1000(big):
    x = np.array([[big, big - 1.0, big - 2.0], [big, 0.0, -big]], dtype=np.float32)
    p = F.softmax(tensor(x)).data
    assert np.all(np.isfinite(p))
    e = np.exp([0.0, -1.0, -2.0])
    np.testing.assert_allclose(p[0], e / e.sum(), rtol=1e-6)
    if big > 0:
        np.testing.assert_allclose(p[1], [1.0, 0.0, 0.0], atol=1e-7)
    else:
        np.testing.assert_allclose(p[1], [0.0, 0.0, 1.0], atol=1e-7)


@given(st.integers(1, 5), st.integers(2, 16), st.floats(0.01, 100), st.floats(-100, 100), st.integers(0, 2**16))
def test_layer_norm_gives_mean_zero_std_one(rows, cols, scale, offset, seed):
    x = np.random.default_rng(seed).standard_normal((rows, cols)) * scale + offset
    var = x.var(-1)
    # rounding error in y is relative to the largest |x| over the row's spread (cancellation in x - mean)
    cond = 1 + np.abs(x).max(-1) / np.sqrt(var + 1e-5)
    y = F.layer_norm(tensor(x)).data  # float64: the property of the algorithm, not of rounding
    assert np.all(np.abs(y.mean(-1)) < 50 * np.finfo(np.float64).eps * cond), (y.mean(-1), cond)
    # eps = 1e-5 shrinks the std slightly: std = sqrt(var / (var + eps))
    np.testing.assert_allclose(y.std(-1), np.sqrt(var / (var + 1e-5)), rtol=1e-10)
    big = var > 1.0  # there eps is negligible: std is 1 to within eps / (2 var)
    np.testing.assert_allclose(y.std(-1)[big], 1.0, rtol=1e-5)
    # float32: the same to float32 accuracy (times the same conditioning)
    y32 = F.layer_norm(tensor(x.astype(np.float32))).data
    assert y32.dtype == np.float32
    tol = 50 * np.finfo(np.float32).eps * cond
    assert np.all(np.abs(y32.mean(-1)) < tol), (y32.mean(-1), tol)
    assert np.all(np.abs(y32 - y) < 10 * tol[:, None]), (y32 - y, tol)


def test_linear_hand_computed():
    x = tensor([[1.0, 2.0, 3.0], [-1.0, 0.0, 0.5]])
    w = tensor([[1.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    b = tensor([10.0, -1.0])
    # row 0: [1 - 3, 0.5 + 1 + 1.5] + b = [8, 2]; row 1: [-1 - 0.5, -0.5 + 0.25] + b = [8.5, -1.25]
    np.testing.assert_array_equal(F.linear(x, w, b).data, [[8.0, 2.0], [8.5, -1.25]])
    np.testing.assert_array_equal(F.linear(x, w).data, [[-2.0, 3.0], [-1.5, -0.25]])
    wg = tensor(w.data, requires_grad=True)
    bg = tensor(b.data, requires_grad=True)
    F.linear(x, wg, bg).sum().backward()
    np.testing.assert_array_equal(wg.grad.data, [[0.0, 2.0, 3.5], [0.0, 2.0, 3.5]])
    np.testing.assert_array_equal(bg.grad.data, [2.0, 2.0])


@pytest.mark.parametrize("name", [n for n in NAMES if COMPOSITES[n].grad])
def test_zero_gradients_stay_zero(name):
    spec = COMPOSITES[name]
    case = spec.gen(NumpySampler(11))
    leaves = [Tensor(to64(x), requires_grad=x.dtype == np.float32) for x in case.inputs]
    for o in outputs(spec.fn(*leaves, **case.attrs)):
        if o.requires_grad:
            o.backward(np.zeros(o.shape))
    for t in leaves:
        if t.grad is not None:
            assert np.all(t.grad.data == 0), f"{name}: a zero cotangent gave a nonzero gradient"


def test_gradient_of_a_constant_function_is_zero():
    from neural_arch.compiler import grad
    g = grad(lambda x: F.sum(F.mul(x, 0.0)))(tensor([1.0, -2.0, 3.0]))
    np.testing.assert_array_equal(g.data, [0.0, 0.0, 0.0])
    g = grad(lambda x, y: F.sum(y * 2.0))(tensor([1.0, 2.0]), tensor([3.0]))
    np.testing.assert_array_equal(g.data, [0.0, 0.0])


@pytest.mark.parametrize("fn, shape, out_shape", [
    (lambda x: F.softmax(x), (3, 0), (3, 0)),
    (lambda x: F.softmax(x, 0), (0, 3), (0, 3)),
    (lambda x: F.log_softmax(x), (0, 4), (0, 4)),
    (lambda x: F.logsumexp(x), (2, 0), (2,)),
    (lambda x: F.layer_norm(x), (0, 4), (0, 4)),
    (lambda x: F.gelu(x), (0,), (0,)),
    (lambda x: F.relu(x) + 1.0, (2, 0, 3), (2, 0, 3)),
    (lambda x: F.sum(x, -1), (2, 0), (2,)),
    (lambda x: F.matmul(x, F.zeros(4, 2)), (0, 4), (0, 2)),
    (lambda x: F.matmul(F.zeros(2, 0), F.reshape(x, (0, 3))), (0, 3), (2, 3)),
    (lambda x: F.concat([x, x], 0), (0, 2), (0, 2)),
    (lambda x: x[1:1], (3, 2), (0, 2)),
])
def test_empty_tensors_work(fn, shape, out_shape):
    x = tensor(np.zeros(shape, dtype=np.float32), requires_grad=True)
    y = fn(x)
    assert y.shape == out_shape
    y.sum().backward()
    assert x.grad.shape == shape
    g = trace(fn, np.zeros(shape, np.float32))
    (res,) = interpret(verify(g), [np.zeros(shape, np.float32)])
    np.testing.assert_array_equal(res, y.data)


def test_empty_reductions_have_their_identities():
    z = tensor(np.zeros((2, 0), dtype=np.float32))
    np.testing.assert_array_equal(F.sum(z, -1).data, [0.0, 0.0])
    np.testing.assert_array_equal(F.logsumexp(z, -1).data, [-np.inf, -np.inf])
    with np.errstate(invalid="ignore"):
        assert np.all(np.isnan(F.mean(z, -1).data))
    with pytest.raises(ShapeError, match="empty axis"):
        F.max(z, -1)


def test_matmul_shape_error_names_op_shapes_and_line():
    a, b = F.zeros(1, 3), F.zeros(2, 1)
    with pytest.raises(ShapeError) as info:
        a @ b  # the line the message must name
    msg = str(info.value)
    assert "matmul" in msg and "(1, 3)" in msg and "(2, 1)" in msg
    src, start = inspect.getsourcelines(test_matmul_shape_error_names_op_shapes_and_line)
    line = start + next(i for i, s in enumerate(src) if "a @ b  # the line" in s)
    assert f"test_composites.py:{line}" in msg, msg
    # the same error, with the same line, while tracing
    with pytest.raises(ShapeError, match=r"matmul: cannot multiply \(1, 3\) by \(2, 1\)") as info:
        trace(lambda x, y: x @ y, np.zeros((1, 3), np.float32), np.zeros((2, 1), np.float32))
    assert "test_composites.py:" in str(info.value)


def test_gelu_matches_known_values():
    x = tensor([-1.0, 0.0, 1.0, 3.0], dtype="float64")
    # x * Phi(x), with the standard normal CDF Phi(1) = 0.8413447460685429, Phi(3) = 0.9986501019683699
    phi = np.array([1 - 0.8413447460685429, 0.5, 0.8413447460685429, 0.9986501019683699])
    np.testing.assert_allclose(F.gelu(x).data, x.data * phi, rtol=1e-12)
    np.testing.assert_allclose(F.gelu(x, approximate="tanh").data,
                               [-0.15880800939172324, 0.0, 0.8411919906082768, 2.996362607918227], rtol=1e-12)


def test_dropout_statistics_and_determinism():
    x = F.ones(20000)
    y = F.dropout(x, 0.25, seed=3).data
    assert set(np.unique(y)) <= {0.0, np.float32(1 / 0.75)}
    assert abs((y == 0).mean() - 0.25) < 0.01
    np.testing.assert_array_equal(y, F.dropout(x, 0.25, seed=3).data)
    assert (y != F.dropout(x, 0.25, seed=4).data).any()
    np.testing.assert_array_equal(F.dropout(x, 0.25, training=False).data, x.data)
    with pytest.raises(ValueError, match="p must lie"):
        F.dropout(x, 1.5)


def test_cross_entropy_ignore_index_and_smoothing_by_hand():
    logits = np.log(np.array([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3, 1 / 3, 1 / 3]]))
    t = tensor([0, 1, 2])
    out = F.cross_entropy(tensor(logits), t, ignore_index=2).item()
    np.testing.assert_allclose(out, -(np.log(0.5) + np.log(0.8)) / 2, rtol=1e-12)
    sm = F.cross_entropy(tensor(logits), t, label_smoothing=0.3, reduction="none").data
    lsm = np.log([[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [1 / 3] * 3])
    want = 0.7 * -lsm[np.arange(3), [0, 1, 2]] + 0.3 * -lsm.mean(-1)
    np.testing.assert_allclose(sm, want, rtol=1e-12)
