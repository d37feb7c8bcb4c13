"""The frontend: Tensor API, indexing, dtype promotion, eager autograd (no_grad,
requires_grad), grad / value_and_grad / grad of grad, tracing of Module-like objects,
source lines and trace-time errors."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from neural_arch.compiler import (Tensor, grad, is_grad_enabled, no_grad, tensor, trace,
                                  value_and_grad, verify)
from neural_arch.compiler import functional as F
from neural_arch.compiler.autodiff import AutodiffError
from neural_arch.compiler.ir import TensorType
from neural_arch.compiler.ops.registry import DTypeError, OpIndexError, ShapeError
from neural_arch.compiler.tensor import TraceError
from neural_arch.runtime.interpreter import interpret

from conftest import needs_torch


def line_of(fn, marker: str) -> int:
    src, start = inspect.getsourcelines(fn)
    return start + next(i for i, s in enumerate(src) if marker in s)


# ============================================================================ creation and properties


def test_creation_functions():
    assert tensor([1.0, 2.0]).dtype == "float32" and tensor([1, 2]).dtype == "int64"
    assert tensor(True).dtype == "bool" and tensor(np.zeros(2)).dtype == "float64"
    assert tensor([1, 2], dtype="float64").dtype == "float64"
    a = np.array([1.0, 2.0], dtype=np.float32)
    t = tensor(a)
    a[0] = 99.0
    assert t.data[0] == 1.0  # tensor() copies
    assert F.zeros(2, 3).shape == (2, 3) and F.zeros((2, 3)).data.sum() == 0
    assert F.ones(4, dtype="int32").dtype == "int32" and F.ones(4).data.tolist() == [1.0] * 4
    assert F.full((2,), 3).dtype == "int64" and F.full((2,), 3.5).data.tolist() == [3.5, 3.5]
    assert F.full((2,), True).dtype == "bool"
    assert F.arange(5).data.tolist() == [0, 1, 2, 3, 4] and F.arange(5).dtype == "int64"
    np.testing.assert_array_equal(F.arange(0, 1, 0.25).data, [0, 0.25, 0.5, 0.75])
    assert F.arange(0, 1, 0.25).dtype == "float32"
    np.testing.assert_array_equal(F.arange(2, 11, 3).data, [2, 5, 8])
    assert F.arange(3, dtype="float64").dtype == "float64"
    r = F.randn(1000, generator=np.random.default_rng(0))
    assert r.dtype == "float32" and abs(r.data.mean()) < 0.1 and abs(r.data.std() - 1) < 0.1
    np.testing.assert_array_equal(r.data, F.randn(1000, generator=np.random.default_rng(0)).data)
    u = F.rand(1000)
    assert u.data.min() >= 0 and u.data.max() < 1
    assert F.randn(2, 2, requires_grad=True).requires_grad
    with pytest.raises(TypeError, match="only floating-point"):
        tensor([1, 2], requires_grad=True)
    with pytest.raises(TypeError, match="unsupported dtype"):
        tensor(np.zeros(2, dtype=np.complex64))


def test_tensor_properties():
    x = tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    assert x.shape == (2, 3) and x.ndim == 2 and x.size == 6 and x.dtype == "float32"
    assert x.type == TensorType((2, 3), "float32")
    assert isinstance(x.data, np.ndarray) and x.numpy() is x.data
    assert x.T.shape == (3, 2) and np.array_equal(x.T.data, x.data.T)
    assert tensor([[2.5]]).item() == 2.5 and isinstance(tensor(3).item(), int)
    with pytest.raises(ValueError, match="6 elements"):
        x.item()
    assert len(x) == 2 and x.tolist() == [[0, 1, 2], [3, 4, 5]]
    assert float(tensor(1.5)) == 1.5 and int(tensor(7)) == 7
    assert "tensor(" in repr(x) and "float32" in repr(x)
    assert np.asarray(x).shape == (2, 3)
    with pytest.raises(TypeError, match="0-d"):
        len(tensor(1.0))
    assert bool(tensor(1.0)) and not bool(tensor(0.0))


def test_detach_cuts_the_graph():
    x = tensor([1.0, 2.0], requires_grad=True)
    d = x.detach()
    assert not d.requires_grad and np.array_equal(d.data, x.data)
    y = (x * x.detach()).sum()  # d/dx (x * c) = c
    y.backward()
    np.testing.assert_array_equal(x.grad.data, [1.0, 2.0])


# ============================================================================ operators


def test_operators_against_numpy():
    a_np = np.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.5]], dtype=np.float32)
    b_np = np.array([2.0, 0.5, -1.0], dtype=np.float32)
    a, b = tensor(a_np), tensor(b_np)
    cases = [(a + b, a_np + b_np), (a - b, a_np - b_np), (a * b, a_np * b_np), (a / b, a_np / b_np),
             (abs(a) ** b, np.abs(a_np) ** b_np), (-a, -a_np), (a @ b, a_np @ b_np), (a.T @ a, a_np.T @ a_np),
             (2 + a, 2 + a_np), (2 - a, 2 - a_np), (3 * a, 3 * a_np), (1 / b, 1 / b_np), (2 ** b, 2 ** b_np),
             (a ** 2, a_np ** 2), (a_np + b, a_np + b_np), (b_np @ a.T, b_np @ a_np.T),
             (a > b, a_np > b_np), (a >= 1, a_np >= 1), (a < b, a_np < b_np), (a <= b, a_np <= b_np),
             (a == b, a_np == b_np), (a != 3, a_np != 3), (abs(a), np.abs(a_np)),
             (~(a > 0), ~(a_np > 0)), ((a > 0) & (b > 0), (a_np > 0) & (b_np > 0)),
             ((a > 0) | (b > 0), (a_np > 0) | (b_np > 0))]
    for i, (got, want) in enumerate(cases):
        assert isinstance(got, Tensor), i
        assert got.shape == want.shape, i
        np.testing.assert_allclose(got.data, want, rtol=1e-6, err_msg=f"case {i}")


def test_tensor_methods():
    x_np = np.array([[1.0, -2.0, 3.0], [0.5, 4.0, -1.5]], dtype=np.float32)
    x = tensor(x_np)
    np.testing.assert_allclose(x.sum().data, x_np.sum(), rtol=1e-6)
    np.testing.assert_allclose(x.sum(1, keepdims=True).data, x_np.sum(1, keepdims=True))
    np.testing.assert_allclose(x.sum(axis=-1).data, x_np.sum(-1))
    np.testing.assert_allclose(x.mean(0).data, x_np.mean(0))
    np.testing.assert_allclose(x.max().data, 4.0)
    np.testing.assert_allclose(x.min(1).data, [-2.0, -1.5])
    np.testing.assert_allclose(x.var().data, x_np.var(), rtol=1e-6)
    np.testing.assert_allclose(x.std(1, correction=1).data, x_np.std(1, ddof=1), rtol=1e-6)
    np.testing.assert_array_equal(x.argmax(-1).data, [2, 1])
    np.testing.assert_array_equal(tensor([3.0, 7.0, 7.0]).argmax().data, 1)  # the first maximum
    assert x.reshape(3, 2).shape == (3, 2) and x.reshape(-1).shape == (6,) and x.view(6, 1).shape == (6, 1)
    assert x.transpose(1, 0).shape == (3, 2) and x.permute(1, 0).shape == (3, 2)
    assert x.unsqueeze(0).shape == (1, 2, 3) and x.unsqueeze(-1).shape == (2, 3, 1)
    assert x.unsqueeze(0).squeeze().shape == (2, 3) and x.flatten().shape == (6,)
    assert x.broadcast_to((4, 2, 3)).shape == (4, 2, 3)
    assert x.long().dtype == "int64" and x.int().dtype == "int32" and x.double().dtype == "float64"
    assert x.astype("bool").dtype == "bool" and x.long().float().dtype == "float32"
    np.testing.assert_allclose(x.clamp(-1, 1).data, np.clip(x_np, -1, 1))
    np.testing.assert_allclose(x.exp().log().data, x_np, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(x.softmax().data.sum(-1), 1.0, rtol=1e-6)
    with pytest.raises(ShapeError, match="reshape"):
        x.reshape(4, 2)
    with pytest.raises(ShapeError, match="axis 5 is out of range"):
        x.sum(5)
    with pytest.raises(ShapeError, match="squeeze"):
        x.squeeze(0)


# ============================================================================ indexing


def test_indexing_examples():
    x_np = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    x = tensor(x_np)
    keys = [(0, 2, slice(None)), (slice(None), slice(None, None, 2)), (Ellipsis, 1), (None, 1), (1, Ellipsis, None),
            (slice(None), [0, 2]), ([1, 0, 1],), (slice(None), slice(None), [[3, 0], [1, 1]]),
            (-1, slice(-2, None), slice(None, None, 3)), (slice(5, 1),), (1, slice(None), [0, -1]),
            ([0, 1], slice(None), 2), (0, None, [1, 2]), (slice(1, None), 0, [3])]
    for k in keys:
        np.testing.assert_array_equal(x[k].data, x_np[k], err_msg=str(k))
    assert x[0, 2, :].shape == (4,) and x[0, 2, 1].shape == ()
    np.testing.assert_array_equal(x[tensor([1, 0])].data, x_np[[1, 0]])


@st.composite
def index_keys(draw):
    shape = tuple(draw(st.lists(st.integers(0, 4), min_size=1, max_size=3)))
    parts, used_array = [], False
    for d in shape:
        choice = draw(st.sampled_from(["int", "slice", "array", "full"]) if d else st.sampled_from(["slice", "full"]))
        if choice == "int":
            parts.append(draw(st.integers(-d, d - 1)))
        elif choice == "slice":
            bound = st.one_of(st.none(), st.integers(-d - 2, d + 2))
            parts.append(slice(draw(bound), draw(bound), draw(st.one_of(st.none(), st.integers(1, 3)))))
        elif choice == "array" and not used_array:
            used_array = True
            parts.append(np.array(draw(st.lists(st.integers(-d, d - 1), min_size=0, max_size=3)), dtype=np.int64)
                         .reshape(draw(st.sampled_from([(-1,), (1, -1)]))))
        else:
            parts.append(slice(None))
    # drop trailing parts (implicit full slices), maybe swap a run for an Ellipsis, add Nones
    parts = parts[:draw(st.integers(0, len(parts)))]
    if parts and len(parts) == len(shape) and draw(st.booleans()):  # the Ellipsis then stands for one axis
        i = draw(st.integers(0, len(parts) - 1))
        parts = parts[:i] + [Ellipsis] + [p for p in parts[i + 1:]]
    for _ in range(draw(st.integers(0, 2))):
        parts.insert(draw(st.integers(0, len(parts))), None)
    return shape, tuple(parts)


@given(index_keys(), st.integers(0, 2**16))
def test_indexing_matches_numpy_with_gradient(shape_key, seed):
    shape, key = shape_key
    rng = np.random.default_rng(seed)
    x_np = rng.standard_normal(shape)
    want = x_np[key]
    x = tensor(x_np, requires_grad=True)
    y = x[key]
    assert y.shape == want.shape, (shape, key)
    np.testing.assert_array_equal(y.data, want)
    proj = rng.standard_normal(want.shape)
    (y * Tensor(proj)).sum().backward()
    flat = np.arange(x_np.size).reshape(shape)[key]
    expect = np.bincount(flat.reshape(-1), weights=proj.reshape(-1), minlength=x_np.size).reshape(shape)
    np.testing.assert_allclose(x.grad.data, expect, rtol=1e-12, atol=1e-12)
    # the same key while tracing gives the same values
    g = trace(lambda t: t[key], x_np)
    np.testing.assert_array_equal(interpret(verify(g), [x_np])[0], want)


def test_indexing_errors():
    x = F.zeros(2, 3)
    with pytest.raises(OpIndexError, match="out of range for axis 1 of size 3"):
        x[0, 3]
    with pytest.raises(OpIndexError, match="too many indices"):
        x[0, 0, 0]
    with pytest.raises(OpIndexError, match="single ellipsis"):
        x[..., ...]
    with pytest.raises(OpIndexError, match="negative slice steps"):
        x[::-1]
    with pytest.raises(OpIndexError, match="boolean-mask"):
        x[np.array([True, False])]
    with pytest.raises(OpIndexError, match="only one integer-array index"):
        x[[0, 1], [0, 1]]
    with pytest.raises(OpIndexError, match="index 5 is out of range"):
        x[:, [0, 5]]
    with pytest.raises(IndexError):  # OpIndexError is an IndexError
        x[-3]


# ============================================================================ dtype promotion

DTYPES = ["bool", "int32", "int64", "float32", "float64"]


@needs_torch
@pytest.mark.parametrize("a", DTYPES)
@pytest.mark.parametrize("b", DTYPES)
def test_binary_promotion_matches_torch(a, b):
    import torch
    x, y = F.ones(2, dtype=a), F.ones(2, dtype=b)
    tx, ty = torch.ones(2, dtype=getattr(torch, a)), torch.ones(2, dtype=getattr(torch, b))
    if a == b == "bool":
        with pytest.raises(DTypeError, match="bool"):
            x * y
        return
    assert (x * y).dtype == str((tx * ty).dtype).removeprefix("torch.")
    assert (x / y).dtype == str((tx / ty).dtype).removeprefix("torch.")
    assert F.maximum(x, y).dtype == str(torch.maximum(tx, ty).dtype).removeprefix("torch.")
    assert (x < y).dtype == "bool"


@needs_torch
@pytest.mark.parametrize("a", DTYPES)
@pytest.mark.parametrize("scalar", [True, 2, 0.5])
def test_python_scalars_are_weak_as_in_torch(a, scalar):
    import torch
    x, tx = F.ones(2, dtype=a), torch.ones(2, dtype=getattr(torch, a))
    if a == "bool" and scalar is True:
        return  # bool + bool arithmetic is not defined here (torch: logical or)
    assert (x * scalar).dtype == str((tx * scalar).dtype).removeprefix("torch.")
    assert (scalar * x).dtype == str((scalar * tx).dtype).removeprefix("torch.")


def test_promotion_rules_without_torch():
    i = F.ones(2, dtype="int64")
    assert (i * 0.5).dtype == "float32" and (i / 2).dtype == "float32" and (i + 1).dtype == "int64"
    assert (F.ones(2) + F.ones(2, dtype="float64")).dtype == "float64"
    assert (F.ones(2) + np.ones(2)).dtype == "float64"  # an array is a strong operand
    assert (F.ones(2) + np.float64(1.0)).dtype == "float32"  # a scalar is weak
    assert (tensor([True, False]) + 1).dtype == "int64"
    assert (i ** 2).dtype == "int64" and (i ** 0.5).dtype == "float32"
    assert F.exp(i).dtype == "float32" and F.mean(i).dtype == "float32"
    assert F.sum(tensor([True, True, False])).data == 2


# ============================================================================ eager autograd


def test_requires_grad_propagation():
    x = tensor([1.0, 2.0], requires_grad=True)
    c = tensor([3.0, 4.0])
    assert (x * c).requires_grad and (x + 1).requires_grad and F.exp(x).requires_grad
    assert not (c * 2).requires_grad
    assert not (x > 1).requires_grad  # comparisons carry no gradient
    assert not F.cast(x, "int64").requires_grad  # only float tensors carry gradients
    assert F.cast(x, "float64").requires_grad
    assert not x.detach().requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        (c * 2).sum().backward()


def test_no_grad():
    x = tensor([1.0, 2.0], requires_grad=True)
    assert is_grad_enabled()
    with no_grad():
        assert not is_grad_enabled()
        y = x * 3
        assert not y.requires_grad
        with no_grad():
            pass
        assert not is_grad_enabled()
    assert is_grad_enabled()
    with pytest.raises(RuntimeError, match="no_grad"):
        y.sum().backward()
    z = (x * 3).sum()
    z.backward()
    np.testing.assert_array_equal(x.grad.data, [3.0, 3.0])


def test_backward_accumulates_and_checks_its_argument():
    x = tensor([1.0, 2.0, 3.0], requires_grad=True)
    (x * x).sum().backward()
    (x * 2.0).sum().backward()
    np.testing.assert_array_equal(x.grad.data, [4.0, 6.0, 8.0])
    y = x * 1.0
    with pytest.raises(RuntimeError, match="single-element"):
        y.backward()
    with pytest.raises(ValueError, match="grad has shape"):
        y.backward(np.ones(2))
    x.grad = None
    y.backward(np.array([1.0, 0.0, -1.0], dtype=np.float32))
    np.testing.assert_array_equal(x.grad.data, [1.0, 0.0, -1.0])
    # a cotangent of another dtype (a float64 array, a Python list) is cast to the result's dtype
    x.grad = None
    (x * 2.0).backward(np.ones(3))
    (x * 1.0).backward([1, 0, 1])
    assert x.grad.dtype == "float32"
    np.testing.assert_array_equal(x.grad.data, [3.0, 2.0, 3.0])


def test_backward_through_a_shared_subexpression():
    x = tensor([0.5, -1.0], requires_grad=True)
    h = F.tanh(x)
    loss = (h * h + h).sum()
    loss.backward()
    t = np.tanh(x.data)
    np.testing.assert_allclose(x.grad.data, (2 * t + 1) * (1 - t ** 2), rtol=1e-6)


# ============================================================================ grad / value_and_grad


def test_grad_and_value_and_grad_with_argnums():
    def f(x, y, z):
        return F.sum(x * x * y) + F.sum(z)

    x = tensor([1.0, 2.0])
    y = tensor([3.0, -1.0])
    z = tensor([5.0])
    np.testing.assert_allclose(grad(f)(x, y, z).data, 2 * x.data * y.data)
    gx, gy = grad(f, argnums=(0, 1))(x, y, z)
    np.testing.assert_allclose(gx.data, 2 * x.data * y.data)
    np.testing.assert_allclose(gy.data, x.data ** 2)
    np.testing.assert_allclose(grad(f, argnums=-1)(x, y, z).data, [1.0])
    v, (gz,) = value_and_grad(f, argnums=(2,))(x, y, z)
    np.testing.assert_allclose(v.data, (x.data ** 2 * y.data).sum() + 5.0)
    np.testing.assert_allclose(gz.data, [1.0])
    v, g = value_and_grad(f)(x, y, z)
    assert v.shape == () and g.shape == (2,)
    # plain arrays work as arguments too
    np.testing.assert_allclose(grad(f)(x.data, y.data, z.data).data, 2 * x.data * y.data)


def test_grad_errors():
    with pytest.raises(ValueError, match="argnums 3 is out of range"):
        grad(lambda x: F.sum(x), argnums=3)(tensor([1.0]))
    with pytest.raises(TypeError, match="only floating-point inputs are differentiable"):
        grad(lambda x, i: F.sum(x * i), argnums=1)(tensor([1.0]), tensor([2]))
    with pytest.raises(AutodiffError, match="must be a float scalar"):
        grad(lambda x: x * 2.0)(tensor([1.0, 2.0]))


def test_grad_of_unused_input_is_zero():
    g = grad(lambda x, y: F.sum(x), argnums=1)(tensor([1.0]), tensor([[1.0, 2.0]]))
    np.testing.assert_array_equal(g.data, [[0.0, 0.0]])


def test_grad_of_grad():
    x = tensor([0.5, -1.0, 2.0], dtype="float64")
    d2 = grad(lambda x: F.sum(grad(lambda y: F.sum(y ** 3))(x)))(x)
    np.testing.assert_allclose(d2.data, 6 * x.data)
    # d/dx of d/dx sin = -sin
    d2 = grad(lambda x: F.sum(grad(lambda y: F.sum(F.sin(y)))(x)))(x)
    np.testing.assert_allclose(d2.data, -np.sin(x.data), rtol=1e-12)
    # a Hessian-vector product of a softmax-based loss, against finite differences of the gradient
    v = np.array([0.3, -0.2, 0.1])
    g = grad(lambda y: F.logsumexp(y, -1))

    def hvp(x):
        return F.sum(g(x) * Tensor(v))

    got = grad(hvp)(x).data
    eps = 1e-6
    fd = (g(tensor(x.data + eps * v)).data - g(tensor(x.data - eps * v)).data) / (2 * eps)
    np.testing.assert_allclose(got, fd, rtol=1e-6, atol=1e-9)


def test_grad_can_be_traced_into_a_graph():
    def loss(w, x):
        return F.sum(F.tanh(x @ w))

    w, x = np.ones((3, 2), np.float32) * 0.1, np.ones((4, 3), np.float32)
    g = verify(trace(grad(loss), w, x))
    assert g.output_types == (TensorType((3, 2), "float32"),)
    (res,) = interpret(g, [w, x])
    np.testing.assert_allclose(res, grad(loss)(w, x).data, rtol=1e-6)


# ============================================================================ tracing


class Linear:
    def __init__(self, fin, fout, rng):
        self.weight = tensor(rng.standard_normal((fout, fin)).astype(np.float32), requires_grad=True)
        self.bias = tensor(np.zeros(fout, np.float32), requires_grad=True)

    def __call__(self, x):
        return F.linear(x, self.weight, self.bias)


class MLP:
    def __init__(self):
        rng = np.random.default_rng(0)
        self.fc1, self.fc2 = Linear(3, 5, rng), Linear(5, 2, rng)
        self.unused = tensor(np.ones(7, np.float32), requires_grad=True)

    def named_parameters(self):
        for name in ("fc1", "fc2"):
            layer = getattr(self, name)
            yield f"{name}.weight", layer.weight
            yield f"{name}.bias", layer.bias
        yield "unused", self.unused

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))

    __call__ = forward


def test_trace_module_makes_param_inputs():
    model = MLP()
    x = np.ones((4, 3), np.float32)
    g = verify(trace(model, x))
    kinds = {i.name: i.kind for i in g.inputs}
    assert kinds == {"x": "arg", "fc1.weight": "param", "fc1.bias": "param", "fc2.weight": "param",
                     "fc2.bias": "param", "unused": "param"}
    assert g.types["fc1.weight"] == TensorType((5, 3))
    assert "param %fc1.weight: f32[5, 3]" in g.to_text()
    assert not any(n.op == "constant" and n.type.shape == (5, 3) for n in g.nodes)  # weights are not baked in
    params = {n: t.data for n, t in model.named_parameters()}
    (out,) = interpret(g, {"x": x, **params})
    np.testing.assert_allclose(out, model(tensor(x)).data, rtol=1e-6)
    # a bound method finds the parameters of its object
    g2 = trace(model.forward, x)
    assert [i.kind for i in g2.inputs].count("param") == 5


def test_trace_lifts_constants_and_unnamed_leaves():
    c = tensor([1.0, 2.0])
    w = tensor([0.5, 0.5], requires_grad=True)
    g = trace(lambda x: x * c + w, np.zeros(2, np.float32))
    assert [i.kind for i in g.inputs] == ["arg", "param"]
    consts = [n for n in g.nodes if n.op == "constant"]
    assert len(consts) == 1 and consts[0].attr["value"] == (1.0, 2.0)


def test_trace_with_abstract_types_and_tuple_outputs():
    def f(x, y):
        return x + y, F.sum(x)

    g = verify(trace(f, TensorType((2, 3)), TensorType((3,))))
    assert g.input_names == ("x", "y") and len(g.outputs) == 2
    assert g.output_types == (TensorType((2, 3)), TensorType(()))
    with pytest.raises(TraceError, match="must return tensors"):
        trace(lambda x: 3, TensorType((2,)))


def test_python_control_flow_runs_at_trace_time():
    def f(x, n_layers=3):
        for _ in range(n_layers):
            x = F.tanh(x)
        return x if x.shape[0] > 1 else -x

    g = trace(f, np.ones((2,), np.float32))
    assert [n.op for n in g.nodes] == ["tanh"] * 3


def test_trace_time_errors_name_the_users_line():
    def branchy(x):
        if F.sum(x) > 0:  # the offending line
            return x
        return -x

    with pytest.raises(TraceError, match="Python control flow on a traced value") as info:
        trace(branchy, np.ones(3, np.float32))
    assert f"test_frontend.py:{line_of(branchy, 'the offending line')}" in str(info.value)

    def peek(x):
        return tensor(x.numpy() * 2)  # reads data

    with pytest.raises(TraceError, match="has no data while tracing") as info:
        trace(peek, np.ones(3, np.float32))
    assert f"test_frontend.py:{line_of(peek, 'reads data')}" in str(info.value)

    def shapes(x):
        return x + F.zeros(4)  # bad broadcast

    with pytest.raises(ShapeError, match=r"cannot broadcast shapes \(3,\) and \(4,\)") as info:
        trace(shapes, np.ones(3, np.float32))
    assert f"test_frontend.py:{line_of(shapes, 'bad broadcast')}" in str(info.value)


def test_traced_tensor_escaping_its_trace_is_an_error():
    leaked = []

    def f(x):
        leaked.append(x)
        return x * 2.0

    trace(f, np.ones(2, np.float32))
    with pytest.raises(TraceError, match="after its trace ended"):
        leaked[0] + 1.0


def test_stop_gradient_inside_a_trace():
    g = grad(lambda x: F.sum(x * F.stop_gradient(x)))(tensor([2.0, 3.0]))
    np.testing.assert_array_equal(g.data, [2.0, 3.0])
    g = grad(lambda x: F.sum(x * x.detach()))(tensor([2.0, 3.0]))
    np.testing.assert_array_equal(g.data, [2.0, 3.0])


def test_public_api_surface():
    import neural_arch.compiler as C
    for name in ("Tensor", "tensor", "trace", "grad", "value_and_grad", "no_grad", "gradcheck", "functional"):
        assert hasattr(C, name), name
    for name in ("softmax", "gelu", "layer_norm", "cross_entropy", "scaled_dot_product_attention", "embedding"):
        assert callable(getattr(F, name)), name
