"""Per-primitive tests generated from the op specs.

For every primitive in the registry, with hypothesis-drawn inputs from its Spec:
  * every face is declared (meta-test), and the op list of issue 2 is complete;
  * eager float32 forward == the reference run in float64 (interpreter, oracle=True)
    within the spec's tolerances, with the dtype and shape the shape rule promises;
  * the traced one-op graph verifies and, interpreted, equals eager bit for bit;
  * gradients (where spec.grad): grad() and eager backward both match float64 central
    finite differences of the NumPy reference;
  * against torch (where installed) forward, and backward for differentiable ops.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from neural_arch.compiler import Tensor, grad, trace, verify
from neural_arch.compiler.ir import TensorType
from neural_arch.compiler.ops.registry import FUSION_KINDS, NONDIFF, PRIMITIVES, Case, NumpySampler, Spec
from neural_arch.compiler.ops.primitives import random_bits
from neural_arch.compiler.tensor import bind
from neural_arch.runtime.interpreter import interpret

from conftest import HAVE_TORCH, HypothesisSampler, assert_close, needs_torch, numeric_grad

REQUIRED_OPS = ("add sub mul div pow neg maximum minimum eq ne lt le gt ge where exp log sqrt rsqrt "
                "tanh erf sin cos abs sign cast sum max reshape transpose broadcast_to slice concat "
                "pad gather scatter_add matmul iota full constant rng_uniform").split()

OPS = sorted(PRIMITIVES)
GRAD_OPS = [n for n in OPS if PRIMITIVES[n].spec is not None and PRIMITIVES[n].spec.grad]


def widen(attrs: dict) -> dict:
    """Attributes for a float64 run: a float32 ``dtype`` attribute becomes float64."""
    return {k: ("float64" if k == "dtype" and v == "float32" else v) for k, v in attrs.items()}


def to64(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float64) if x.dtype == np.float32 else x


def draw_case(name, data) -> Case:
    return PRIMITIVES[name].spec.gen(HypothesisSampler(data))


def one_op(name, attrs):
    def fn(*xs):
        return bind(name, *xs, **attrs)
    fn.__name__ = name
    return fn


# ============================================================================ meta


def test_required_ops_are_declared():
    missing = [op for op in REQUIRED_OPS if op not in PRIMITIVES]
    assert not missing, f"primitives missing from the registry: {missing}"


@pytest.mark.parametrize("name", OPS)
def test_every_primitive_has_every_face(name):
    p = PRIMITIVES[name]
    assert p.name == name
    assert callable(p.shape_rule), f"{name}: no shape rule"
    assert callable(p.reference), f"{name}: no NumPy reference"
    assert p.vjp is NONDIFF or callable(p.vjp), f"{name}: VJP must be callable or NONDIFF"
    assert p.kind in FUSION_KINDS, f"{name}: fusion kind {p.kind!r}"
    assert isinstance(p.spec, Spec), f"{name}: no test spec"
    assert callable(p.spec.gen)
    assert 0 < p.spec.rtol < 1e-2 and 0 <= p.spec.atol < 1e-2
    # a spec generator draws a valid case from any sampler (here the NumPy one)
    for seed in range(3):
        case = p.spec.gen(NumpySampler(seed))
        assert isinstance(case, Case)
        p.shape_rule(*[TensorType(x.shape, x.dtype.name) for x in case.inputs], **case.attrs)


def test_nondifferentiable_ops_are_exactly_the_integer_valued_ones():
    nondiff = {n for n, p in PRIMITIVES.items() if p.vjp is NONDIFF}
    assert {"eq", "ne", "lt", "le", "gt", "ge", "iota", "full", "constant", "rng_uniform"} <= nondiff
    assert not nondiff & {"add", "mul", "matmul", "sum", "gather", "exp", "where"}


# ============================================================================ forward


@pytest.mark.parametrize("name", OPS)
@given(data=st.data())
def test_forward_matches_float64_reference(name, data):
    p = PRIMITIVES[name]
    case = draw_case(name, data)
    out = bind(name, *[Tensor(x) for x in case.inputs], **case.attrs)
    expect_type = p.shape_rule(*[TensorType(x.shape, x.dtype.name) for x in case.inputs], **case.attrs)
    assert out.type == expect_type
    assert out.data.dtype.name == expect_type.dtype and out.data.shape == expect_type.shape

    g = verify(trace(one_op(name, case.attrs), *case.inputs))
    (oracle,) = interpret(g, case.inputs, oracle=True)
    if expect_type.dtype == "float32":
        assert oracle.dtype == np.float64  # the oracle really ran in float64
    assert_close(out.data, oracle, p.spec.rtol, p.spec.atol, f"{name} eager vs float64 reference")


@pytest.mark.parametrize("name", OPS)
@given(data=st.data())
def test_traced_graph_interpreted_equals_eager(name, data):
    case = draw_case(name, data)
    out = bind(name, *[Tensor(x) for x in case.inputs], **case.attrs)
    g = verify(trace(one_op(name, case.attrs), *case.inputs))
    assert [n.op for n in g.nodes] == [name]
    assert g.output_types == (out.type,)
    (res,) = interpret(g, case.inputs)
    assert res.dtype == out.data.dtype
    np.testing.assert_array_equal(res, out.data)


# ============================================================================ gradients


@pytest.mark.parametrize("name", GRAD_OPS)
@given(data=st.data())
def test_gradients_match_finite_differences(name, data):
    p = PRIMITIVES[name]
    case = draw_case(name, data)
    attrs = widen(case.attrs)
    xs = [to64(x) for x in case.inputs]
    argnums = tuple(i for i, x in enumerate(xs) if x.dtype == np.float64)
    assert argnums, f"{name}: spec.grad is set but the case has no float input"
    out_t = p.shape_rule(*[TensorType(x.shape, x.dtype.name) for x in xs], **attrs)
    proj = np.random.default_rng(data.draw(st.integers(0, 2**16))).standard_normal(out_t.shape)

    def f_ref(*vals):
        return float(np.sum(proj * p.reference(*vals, out=out_t, **attrs).astype(np.float64)))

    numeric = numeric_grad(f_ref, xs, argnums)

    def loss(*ts):
        return (bind(name, *ts, **attrs) * Tensor(proj)).sum()

    traced = grad(loss, argnums)(*[Tensor(x) for x in xs])
    leaves = [Tensor(x, requires_grad=i in argnums) for i, x in enumerate(xs)]
    eager_loss = loss(*leaves)
    if out_t.dtype in ("float32", "float64"):
        eager_loss.backward()
    else:  # an integer/bool result carries no gradient: nothing to run backward on
        assert not eager_loss.requires_grad
    for k, i in enumerate(argnums):
        eager = leaves[i].grad
        eager = np.zeros(xs[i].shape) if eager is None else eager.data
        assert traced[k].shape == xs[i].shape and traced[k].dtype == "float64"
        assert_close(traced[k].data, numeric[k], p.spec.grad_rtol, p.spec.grad_atol,
                     f"{name}: grad() vs finite differences, input {i}")
        assert_close(eager, numeric[k], p.spec.grad_rtol, p.spec.grad_atol,
                     f"{name}: eager backward vs finite differences, input {i}")
        assert_close(eager, traced[k].data, 1e-12, 1e-12, f"{name}: eager vs traced gradient")


def test_zero_cotangent_gives_exact_zero_gradients():
    for name in GRAD_OPS:
        p = PRIMITIVES[name]
        case = p.spec.gen(NumpySampler(7))
        xs = [to64(x) for x in case.inputs]
        attrs = widen(case.attrs)
        leaves = [Tensor(x, requires_grad=x.dtype == np.float64) for x in xs]
        out = bind(name, *leaves, **attrs)
        if not out.requires_grad:  # e.g. cast to an integer dtype
            continue
        out.backward(np.zeros(out.shape, dtype=out.dtype))
        for t in leaves:
            if t.requires_grad and t.grad is not None:
                assert np.all(t.grad.data == 0), f"{name}: zero cotangent gave a nonzero gradient"


# ============================================================================ torch

if HAVE_TORCH:
    import torch

    _TD = {"float32": torch.float32, "float64": torch.float64, "int32": torch.int32,
           "int64": torch.int64, "bool": torch.bool}

    def _t_reduce(fn):
        def f(x, axes, keepdims=False):
            return fn(x, dim=tuple(axes), keepdim=keepdims) if axes else x.clone()
        return f

    def _t_slice(x, starts, stops, steps):
        return x[tuple(slice(a, b, c) for a, b, c in zip(starts, stops, steps))]

    def _t_pad(x, lo, hi, interior, value=0.0):
        if x.ndim and not any(interior):
            flat = [v for a, b in zip(reversed(lo), reversed(hi)) for v in (a, b)]
            return torch.nn.functional.pad(x, flat, value=value)
        shape = tuple(l + h + d + max(d - 1, 0) * i for d, l, h, i in zip(x.shape, lo, hi, interior))
        out = torch.full(shape, value, dtype=x.dtype)
        out[tuple(slice(l, l + (d - 1) * (i + 1) + 1 if d else l, i + 1)
                  for d, l, i in zip(x.shape, lo, interior))] = x
        return out

    def _t_gather(x, idx, axis):
        flat = torch.index_select(x, axis, idx.reshape(-1))
        return flat.reshape(x.shape[:axis] + idx.shape + x.shape[axis + 1:])

    def _t_scatter(idx, src, axis, size):
        n = idx.numel()
        s = src.reshape(src.shape[:axis] + (n,) + src.shape[axis + idx.ndim:])
        out = torch.zeros(src.shape[:axis] + (size,) + src.shape[axis + idx.ndim:], dtype=src.dtype)
        return out.index_add(axis, idx.reshape(-1), s)

    def _t_iota(shape, axis, dtype="int64"):
        r = torch.arange(shape[axis], dtype=_TD[dtype])
        return r.reshape([-1 if i == axis else 1 for i in range(len(shape))]).expand(*shape)

    def _t_attention(q, k, v, *bias, scale, causal):  # ours is (batch, length, heads, dim); torch's heads-first
        # q pre-scaled: torch 2.13 masks (-inf) before scaling, so a negative scale turns a
        # causal row's masked scores into +inf (NaN rows); softmax(q k^T * s) is the same.
        # The key bias and the causal mask as one additive mask (torch takes one or the other)
        L = q.shape[1]
        mask = torch.zeros((L, L), dtype=q.dtype)
        if causal:
            mask = mask.masked_fill(~torch.tril(torch.ones((L, L), dtype=torch.bool)), -math.inf)
        mask = mask[None, None] + (bias[0][:, None, None, :] if bias else 0.0)
        o = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q * scale, k, v)),
                                                             attn_mask=mask, scale=1.0)
        return o.transpose(1, 2)

    TORCH = {
        "attention": _t_attention,
        "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div, "pow": torch.pow,
        "neg": torch.neg, "maximum": torch.maximum, "minimum": torch.minimum,
        "eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge,
        "where": torch.where, "exp": torch.exp, "log": torch.log, "sqrt": torch.sqrt,
        "rsqrt": torch.rsqrt, "tanh": torch.tanh, "sigmoid": torch.sigmoid, "relu": torch.relu, "erf": torch.erf, "sin": torch.sin, "cos": torch.cos,
        "abs": torch.abs, "sign": torch.sign, "stop_gradient": lambda x: x.detach(),
        "cast": lambda x, dtype: x.to(_TD[dtype]),
        "sum": _t_reduce(torch.sum), "max": _t_reduce(torch.amax),
        "reshape": lambda x, shape: x.reshape(shape),
        "transpose": lambda x, perm: x.permute(*perm) if perm else x.clone(),
        "broadcast_to": lambda x, shape: torch.broadcast_to(x, shape),
        "slice": _t_slice, "pad": _t_pad, "concat": lambda *xs, axis: torch.cat(xs, dim=axis),
        "gather": _t_gather, "scatter_add": _t_scatter, "matmul": torch.matmul,
        "full": lambda shape, value, dtype="float32": torch.full(tuple(shape), value, dtype=_TD[dtype]),
        "iota": _t_iota,
        "constant": lambda value, shape, dtype="float32": torch.tensor(value, dtype=_TD[dtype]).reshape(shape),
    }
else:  # pragma: no cover
    TORCH = {}

# attention_grad takes attention's output as an input: it is held against torch through
# attention's backward (test_against_torch["attention"] differentiates through it)
NO_TORCH_COUNTERPART = {"rng_uniform", "check_index", "attention_grad"}


@needs_torch
def test_torch_table_covers_every_primitive_with_a_counterpart():
    assert set(OPS) - set(TORCH) <= NO_TORCH_COUNTERPART, sorted(set(OPS) - set(TORCH) - NO_TORCH_COUNTERPART)


@needs_torch
@pytest.mark.parametrize("name", sorted(TORCH))
@given(data=st.data())
def test_against_torch(name, data):
    p = PRIMITIVES[name]
    case = draw_case(name, data)
    attrs = widen(case.attrs)
    xs = [to64(x) for x in case.inputs]
    diff = p.spec.grad and p.vjp is not NONDIFF
    txs = [torch.tensor(x, requires_grad=diff and x.dtype == np.float64) for x in xs]
    tout = TORCH[name](*txs, **attrs)
    leaves = [Tensor(x, requires_grad=diff and x.dtype == np.float64) for x in xs]
    out = bind(name, *leaves, **attrs)
    assert tuple(tout.shape) == out.shape
    assert str(tout.dtype).removeprefix("torch.") == out.dtype
    assert_close(out.data, tout.detach().numpy(), 1e-10, 1e-12, f"{name} forward vs torch")
    if not diff or not out.requires_grad or not tout.requires_grad:
        return
    proj = np.random.default_rng(0).standard_normal(out.shape)
    (tout * torch.tensor(proj)).sum().backward()
    (out * Tensor(proj)).sum().backward()
    for x, t in zip(leaves, txs):
        if not x.requires_grad:
            continue
        tg = np.zeros(x.shape) if t.grad is None else t.grad.numpy()
        ours = np.zeros(x.shape) if x.grad is None else x.grad.data
        assert_close(ours, tg, 1e-9, 1e-11, f"{name} backward vs torch")


# ============================================================================ op-specific properties


def _splitmix_python(seed: int, stream: int, i: int) -> int:
    """An independent pure-Python splitmix64 (the counter-based generator's definition)."""
    m = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + stream * 0xD1B54A32D192ED03 + i + 0x9E3779B97F4A7C15) & m
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
    return z ^ (z >> 31)


def test_random_bits_match_an_independent_splitmix64():
    bits = random_bits(12345, 3, 50)
    assert [int(b) for b in bits] == [_splitmix_python(12345, 3, i) for i in range(50)]


def test_rng_uniform_is_deterministic_in_range_and_seed_dependent():
    seed = Tensor(np.array(7, dtype=np.int64))
    a = bind("rng_uniform", seed, shape=(4000,), stream=0, dtype="float32").data
    b = bind("rng_uniform", seed, shape=(4000,), stream=0, dtype="float32").data
    c = bind("rng_uniform", Tensor(np.array(8, dtype=np.int64)), shape=(4000,), stream=0, dtype="float32").data
    d = bind("rng_uniform", seed, shape=(4000,), stream=1, dtype="float32").data
    np.testing.assert_array_equal(a, b)
    assert a.min() >= 0.0 and a.max() < 1.0
    assert abs(a.mean() - 0.5) < 0.02 and abs(a.var() - 1 / 12) < 0.01
    assert (a != c).mean() > 0.99 and (a != d).mean() > 0.99
    expect = np.array([(_splitmix_python(7, 0, i) >> 40) / 2.0**24 for i in range(4000)])
    np.testing.assert_array_equal(a, expect.astype(np.float32))


def test_max_gradient_is_split_among_ties():
    x = Tensor(np.array([1.0, 3.0, 3.0, 2.0]), requires_grad=True)
    bind("max", x, axes=(0,), keepdims=False).backward()
    np.testing.assert_array_equal(x.grad.data, [0.0, 0.5, 0.5, 0.0])


def test_maximum_gradient_is_split_at_ties():
    a = Tensor(np.array([1.0, 2.0, 3.0]), requires_grad=True)
    b = Tensor(np.array([1.0, 5.0, 0.0]), requires_grad=True)
    (bind("maximum", a, b) * Tensor(np.array([1.0, 10.0, 100.0]))).sum().backward()
    np.testing.assert_array_equal(a.grad.data, [0.5, 0.0, 100.0])
    np.testing.assert_array_equal(b.grad.data, [0.5, 10.0, 0.0])


def test_cast_float_to_int_truncates_toward_zero():
    x = Tensor(np.array([-2.7, -0.5, 0.5, 2.7], dtype=np.float32))
    np.testing.assert_array_equal(bind("cast", x, dtype="int32").data, [-2, 0, 0, 2])


def test_scatter_add_accumulates_repeated_indices():
    idx = Tensor(np.array([0, 2, 0, 0]))
    src = Tensor(np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32))
    out = bind("scatter_add", idx, src, axis=1, size=3)
    np.testing.assert_array_equal(out.data, [[8.0, 0.0, 2.0]])


def test_pad_interior_and_slice_steps_are_inverse():
    x = np.arange(1, 4, dtype=np.float32)
    padded = bind("pad", Tensor(x), lo=(1,), hi=(2,), interior=(2,), value=-1.0).data
    np.testing.assert_array_equal(padded, [-1, 1, -1, -1, 2, -1, -1, 3, -1, -1])
    back = bind("slice", Tensor(padded), starts=(1,), stops=(8,), steps=(3,)).data
    np.testing.assert_array_equal(back, x)


def test_erf_reference_is_accurate():
    xs = np.linspace(-4, 4, 101)
    got = bind("erf", Tensor(xs)).data
    np.testing.assert_allclose(got, [math.erf(v) for v in xs], rtol=0, atol=1e-16)
