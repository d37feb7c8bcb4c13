"""Bad input: out-of-range indices (eager and in the interpreter, with the user's line),
wrong dtypes and shapes, and what happens to NaN and Inf.

What we assert about NaN/Inf (the defined behaviour):
  * elementwise ops follow IEEE / NumPy: NaN in gives NaN out, exp(-inf) = 0, log(0) = -inf,
    x / 0 = +-inf, sqrt(-1) = NaN; nothing is clipped or replaced;
  * reductions propagate: a NaN anywhere in a summed or max-reduced slice makes that result
    NaN, other slices are untouched; relu, maximum and clamp keep NaN (as torch);
  * softmax/log_softmax/cross_entropy of a row containing NaN give NaN for that row only; a
    row of all -inf is NaN (0/0, as torch);
  * gradients are not clipped either: inf or NaN flow into .grad where the math says so;
  * the interpreter (float32 and oracle float64) gives the same special values as eager.
"""
from __future__ import annotations

import inspect
import math

import numpy as np
import pytest

from neural_arch.compiler import grad, tensor, trace
from neural_arch.compiler import functional as F
from neural_arch.compiler.ir import TensorType
from neural_arch.compiler.ops.registry import DTypeError, OpError, OpIndexError, ShapeError
from neural_arch.compiler.tensor import bind
from neural_arch.runtime.interpreter import interpret


def line_of(fn, marker: str) -> int:
    src, start = inspect.getsourcelines(fn)
    return start + next(i for i, s in enumerate(src) if marker in s)


# ============================================================================ indices


def test_gather_out_of_range_raises_eagerly_with_the_line():
    x = tensor([1.0, 2.0, 3.0])

    def bad():
        return F.gather(x, tensor([0, 3]))  # out of range

    with pytest.raises(IndexError) as info:
        bad()
    assert isinstance(info.value, OpIndexError)
    msg = str(info.value)
    assert msg.startswith("gather: index 3 is out of range for axis 0 of size 3")
    assert f"test_errors.py:{line_of(bad, 'out of range')}" in msg
    with pytest.raises(OpIndexError, match="index -1 is out of range"):
        F.gather(x, tensor([-1]))
    with pytest.raises(OpIndexError, match="index 2 is out of range for axis 1 of size 2"):
        F.gather(F.zeros(3, 2), tensor([[2]]), axis=1)


def test_gather_out_of_range_raises_in_the_interpreter_with_the_traced_line():
    def f(x, idx):
        return F.gather(x, idx, axis=0)  # traced here

    g = trace(f, TensorType((3, 2)), TensorType((2,), "int64"))
    x = np.zeros((3, 2), np.float32)
    np.testing.assert_array_equal(interpret(g, [x, np.array([2, 0])])[0], np.zeros((2, 2)))
    for oracle in (False, True):
        with pytest.raises(IndexError) as info:
            interpret(g, [x, np.array([0, 7])], oracle=oracle)
        msg = str(info.value)
        assert "gather: index 7 is out of range for axis 0 of size 3" in msg
        assert f"test_errors.py:{line_of(f, 'traced here')}" in msg


def test_embedding_and_scatter_add_bounds():
    w = F.ones(4, 2)
    with pytest.raises(OpIndexError, match="index 4 is out of range"):
        F.embedding(tensor([[0, 4]]), w)
    with pytest.raises(OpIndexError, match="scatter_add: index 5 is out of range"):
        F.scatter_add(tensor([5]), F.ones(1), axis=0, size=3)


def test_cross_entropy_out_of_range_target_raises():
    logits = F.zeros(2, 3)

    def bad():
        return F.cross_entropy(logits, tensor([0, 3]))  # target 3 of 3 classes

    with pytest.raises(IndexError, match=r"index 3 is out of range: allowed \[0, 3\) or -100") as info:
        bad()
    assert f"test_errors.py:{line_of(bad, 'target 3 of 3')}" in str(info.value)
    with pytest.raises(IndexError, match="index -1 is out of range"):
        F.cross_entropy(logits, tensor([0, -1]))
    # ignore_index itself is fine
    assert np.isfinite(F.cross_entropy(logits, tensor([-100, 2])).item())
    # and the check survives tracing into the interpreter
    g = trace(lambda z, t: F.cross_entropy(z, t), TensorType((2, 3)), TensorType((2,), "int64"))
    assert any(n.op == "check_index" for n in g.nodes)
    with pytest.raises(IndexError, match="index 9 is out of range"):
        interpret(g, [np.zeros((2, 3), np.float32), np.array([9, 0])])


# ============================================================================ dtypes and shapes


def test_wrong_dtypes_are_clear_errors():
    f32, f64, i64 = F.ones(2), F.ones(2, dtype="float64"), F.ones(2, dtype="int64")
    with pytest.raises(DTypeError, match="add: operands must have one dtype, got float32 and float64"):
        bind("add", f32, f64)  # the primitive level does not promote; the frontend does
    assert (f32 + f64).dtype == "float64"
    with pytest.raises(DTypeError, match="exp: expects a floating-point tensor, got int64"):
        bind("exp", i64)
    with pytest.raises(DTypeError, match="where: condition must be bool"):
        bind("where", f32, f32, f32)
    with pytest.raises(OpError, match="gather: indices must be integers, got float32"):
        F.gather(f32, f32)
    with pytest.raises(OpError, match="cross_entropy: targets must be integers"):
        F.cross_entropy(F.zeros(2, 3), F.zeros(2))
    with pytest.raises(DTypeError, match="cannot reduce a bool"):
        bind("sum", tensor([True]), axes=(0,), keepdims=False)
    assert isinstance(DTypeError("x", "y"), TypeError)  # catchable as a TypeError too


def test_shape_errors_name_op_shapes_and_line():
    def bad_add():
        return F.ones(2, 3) + F.ones(4)  # broadcast

    with pytest.raises(ShapeError) as info:
        bad_add()
    msg = str(info.value)
    assert "add: cannot broadcast shapes (2, 3) and (4,)" in msg
    assert f"test_errors.py:{line_of(bad_add, '# broadcast')}" in msg
    with pytest.raises(ShapeError, match=r"concat: shapes \(2, 3\) and \(2, 4\) differ outside axis 0"):
        F.concat([F.ones(2, 3), F.ones(2, 4)])
    with pytest.raises(ShapeError, match=r"reshape: cannot reshape \(2, 3\)"):
        F.ones(2, 3).reshape(4, 2)
    with pytest.raises(ShapeError, match="batch dimensions"):
        F.ones(2, 3, 4) @ F.ones(3, 4, 5)
    with pytest.raises(ShapeError, match="layer_norm"):
        F.layer_norm(F.ones(2, 3), (4,))
    with pytest.raises(ShapeError, match="cross_entropy"):
        F.cross_entropy(F.ones(2, 3), tensor([0, 1, 2]))


def test_interpreter_checks_its_inputs():
    g = trace(lambda x: x * 2.0, TensorType((2,)))
    with pytest.raises(TypeError, match=r"input %x expects f32\[2\], got f64\[2\]"):
        interpret(g, [np.ones(2)])
    with pytest.raises(TypeError, match="takes 1 inputs"):
        interpret(g, [])
    with pytest.raises(TypeError, match="missing inputs %x"):
        interpret(g, {})
    np.testing.assert_array_equal(interpret(g, {"x": np.ones(2, np.float32)})[0], [2.0, 2.0])
    assert interpret(g, [np.ones(2, np.float32)], oracle=True)[0].dtype == np.float64


# ============================================================================ NaN and Inf

NAN, INF = math.nan, math.inf


def _both(fn, *arrays):
    """fn eagerly and through the interpreter (float32 and oracle); all must agree."""
    eager = fn(*[tensor(a) for a in arrays])
    g = trace(fn, *arrays)
    with np.errstate(all="ignore"):
        (interp,) = interpret(g, list(arrays))
        (oracle,) = interpret(g, list(arrays), oracle=True)
    np.testing.assert_array_equal(interp, eager.data)
    special = ~np.isfinite(eager.data)  # the oracle has the same NaN/Inf, finite values to float32 accuracy
    np.testing.assert_array_equal(oracle[special], eager.data[special])
    np.testing.assert_allclose(oracle[~special], eager.data[~special], rtol=1e-6, atol=1e-7)
    return eager.data


def test_elementwise_special_values_follow_ieee():
    x = np.array([NAN, INF, -INF, 0.0, -1.0, 2.0], dtype=np.float32)
    with np.errstate(all="ignore"):
        np.testing.assert_array_equal(_both(F.exp, x), np.exp(x))
        np.testing.assert_array_equal(_both(F.log, x), np.log(x))
        np.testing.assert_array_equal(_both(F.sqrt, x), np.sqrt(x))
        np.testing.assert_array_equal(_both(F.tanh, x), np.tanh(x))
        np.testing.assert_array_equal(_both(lambda t: t / 0.0, x), x / np.float32(0))
        np.testing.assert_array_equal(_both(lambda t: t * 0.0, x), x * np.float32(0))
    r = _both(F.relu, x)
    np.testing.assert_array_equal(r, [NAN, INF, 0.0, 0.0, 0.0, 2.0])
    np.testing.assert_array_equal(_both(lambda t: F.maximum(t, 1.0), x), [NAN, INF, 1.0, 1.0, 1.0, 2.0])
    np.testing.assert_array_equal(_both(lambda t: F.clamp(t, -1.0, 1.0), x), [NAN, 1.0, -1.0, 0.0, -1.0, 1.0])
    np.testing.assert_array_equal(_both(F.sigmoid, x)[1:3], [1.0, 0.0])
    assert np.isnan(_both(F.gelu, x)[0]) and np.isnan(_both(F.sigmoid, x)[0])


def test_reductions_propagate_nan_per_slice():
    x = np.array([[1.0, NAN, 2.0], [3.0, 4.0, 5.0], [INF, 1.0, 2.0]], dtype=np.float32)
    np.testing.assert_array_equal(_both(lambda t: F.sum(t, -1), x), [NAN, 12.0, INF])
    np.testing.assert_array_equal(_both(lambda t: F.max(t, -1), x), [NAN, 5.0, INF])
    np.testing.assert_array_equal(_both(lambda t: F.mean(t, -1), x)[:2], [NAN, 4.0])
    assert np.isnan(_both(F.sum, x))


def test_softmax_and_losses_with_nan_and_inf():
    x = np.array([[0.0, NAN, 1.0], [1.0, 2.0, 3.0], [-INF, -INF, -INF], [-INF, 0.0, 0.0]], dtype=np.float32)
    with np.errstate(all="ignore"):
        p = _both(F.softmax, x)
        ls = _both(F.log_softmax, x)
    assert np.isnan(p[0]).all() and np.isnan(ls[0]).all()
    e = np.exp([1.0, 2.0, 3.0])
    np.testing.assert_allclose(p[1], e / e.sum(), rtol=1e-6)
    assert np.isnan(p[2]).all()  # all -inf: 0/0, as in torch
    np.testing.assert_array_equal(p[3], [0.0, 0.5, 0.5])
    np.testing.assert_array_equal(ls[3], np.array([-INF, math.log(0.5), math.log(0.5)], dtype=np.float32))
    lse = _both(F.logsumexp, x)
    assert np.isnan(lse[0]) and lse[2] == -INF and lse[3] == np.float32(math.log(2.0))
    ce = F.cross_entropy(tensor(x[:2]), tensor([0, 2]), reduction="none").data
    assert np.isnan(ce[0]) and np.isfinite(ce[1])
    assert np.isnan(F.cross_entropy(tensor(x[:2]), tensor([0, 2])).item())


def test_gradients_are_not_clipped():
    g = grad(lambda t: F.sum(F.sqrt(t)))(tensor([0.0, 4.0]))
    np.testing.assert_array_equal(g.data, [INF, 0.25])
    g = grad(lambda t: F.sum(t * t))(tensor([INF, NAN, 1.0]))
    np.testing.assert_array_equal(g.data, [INF, NAN, 2.0])
    x = tensor([1e30, -1e30], requires_grad=True)
    (x * 1e10).sum().backward()
    np.testing.assert_array_equal(x.grad.data, [1e10, 1e10])
    x = tensor([NAN, 1.0], requires_grad=True)
    F.sum(F.relu(x)).backward()
    np.testing.assert_array_equal(x.grad.data, [1.0, 1.0])  # relu passes the gradient at NaN, as torch


def test_nan_in_an_attribute_survives_tracing():
    fn = lambda t: F.where(t > 0, t, NAN)  # noqa: E731
    x = np.array([1.0, -1.0], dtype=np.float32)
    out = _both(fn, x)
    np.testing.assert_array_equal(out, [1.0, NAN])
