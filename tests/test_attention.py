"""The fused attention (primitives attention / attention_grad, codegen lowering.Attention):
compiled against the interpreter and the composite (scores, mask, softmax, product) it
replaces, on shapes with several causal row blocks and tasks, with q, k, v read in place
from one projection as GPT-2 does."""
from __future__ import annotations

import math

import numpy as np
import pytest

from neural_arch.compiler import functional as F, trace
from neural_arch.compiler.codegen import lowering
from neural_arch.compiler.ir import TensorType
from neural_arch.compiler.ops.registry import ShapeError
from neural_arch.compiler.trace import value_and_grad
from neural_arch.runtime.interpreter import interpret
from neural_arch.compiler.tensor import bind
from neural_arch.runtime.program import Program, clear_memory_cache


def composite(q, k, v, causal, scale):
    """What the fused op replaces, heads-first as models wrote it before."""
    q, k, v = (F.transpose(t, 0, 2, 1, 3) for t in (q, k, v))
    s = F.matmul(q, F.swapaxes(k, -1, -2)) * scale
    if causal:
        L = q.shape[2]
        s = F.where(F.ge(F.iota((L, L), 0), F.iota((L, L), 1)), s, -math.inf)
    return F.transpose(F.matmul(F.softmax(s, -1), v), 0, 2, 1, 3)


# L = 70 with 32-row causal blocks: three blocks, the last partial; D = 24 is no multiple of
# the GEMM's 16 columns; B * H = 6 items over two tasks
SHAPES = [(2, 70, 3, 24), (1, 5, 2, 3), (3, 33, 1, 8)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_gradients_match_the_composite(shape, causal):
    rng = np.random.default_rng(hash((shape, causal)) % 2**32)
    q, k, v, g = (rng.standard_normal(shape).astype(np.float32) for _ in range(4))
    scale = 1.0 / math.sqrt(shape[-1])
    T = TensorType(shape)

    def loss(fn):
        return lambda q, k, v, g: (fn(q, k, v) * g).sum()
    fused = value_and_grad(loss(lambda q, k, v: F.attention(q, k, v, causal=causal, scale=scale)), (0, 1, 2))
    comp = value_and_grad(loss(lambda q, k, v: composite(q, k, v, causal, scale)), (0, 1, 2))
    gf, gc = trace(fused, T, T, T, T), trace(comp, T, T, T, T)
    prog = Program(gf)
    ops = sorted(k.strategy for k in prog.kernels if k.strategy.startswith("attention"))
    assert ops == ["attention", "attention-grad"], [k.strategy for k in prog.kernels]
    got = prog(q, k, v, g)
    want = interpret(gc, [q, k, v, g])
    for name, a, b in zip(("loss", "dq", "dk", "dv"), got, want):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)
    np.testing.assert_allclose(got[1:], interpret(gf, [q, k, v, g])[1:], rtol=1e-4, atol=1e-5)


def test_qkv_read_in_place_from_one_projection():
    """GPT-2's pattern: q, k, v are slices of one (B, L, 3C) tensor reshaped to heads; the
    kernels read them through strides (no copies), the output feeds the projection as a
    reshape, and the backward writes (B, L, 3, H, D), which is dqkv reshaped."""
    B, L, H, D = 2, 40, 4, 16
    C = H * D
    rng = np.random.default_rng(3)
    x = rng.standard_normal((B, L, C)).astype(np.float32)
    w = (rng.standard_normal((C, 3 * C)) * 0.2).astype(np.float32)
    wo = (rng.standard_normal((C, C)) * 0.2).astype(np.float32)

    def block(attn):
        def f(x, w, wo):
            q, k, v = (t.reshape(B, L, H, D) for t in F.split(F.matmul(x, w), 3, axis=-1))
            return (F.matmul(attn(q, k, v).reshape(B, L, C), wo) ** 2).sum()
        return f
    fused = value_and_grad(block(lambda q, k, v: F.attention(q, k, v, causal=True)), (0, 1, 2))
    comp = value_and_grad(block(lambda q, k, v: composite(q, k, v, True, 1 / math.sqrt(D))), (0, 1, 2))
    types = [TensorType(a.shape) for a in (x, w, wo)]
    prog = Program(trace(fused, *types))
    att = [k for k in prog.kernels if k.strategy.startswith("attention")]
    assert len(att) == 2 and all(not k.buffers for k in att), att  # nothing materialised for them
    assert all(len(k.inputs) <= 3 for k in att), [k.inputs for k in att]  # qkv (+ o, dO): no copies
    got = prog(x, w, wo)
    want = interpret(trace(comp, *types), [x, w, wo])
    for name, a, b in zip(("loss", "dx", "dw", "dwo"), got, want):
        np.testing.assert_allclose(a, b, rtol=3e-4, atol=3e-4, err_msg=name)


def test_tiled_and_blocked_kernels_agree(monkeypatch):
    """Sequences up to ATTENTION_TILED_MAX run the tiled kernels (6-row tiles through the
    GEMM's micro-kernel); longer ones run blocks of query rows through the whole GEMM.  Both
    against each other, the blocked one with causal blocks of 8 rows (9 blocks for L = 70)
    and of all rows (the disk cache is off: its key does not hold the module constants)."""
    monkeypatch.setenv("NEURAL_ARCH_CACHE", "0")
    shape = (1, 70, 2, 20)
    rng = np.random.default_rng(5)
    ins = [rng.standard_normal(shape).astype(np.float32) for _ in range(5)]
    T = TensorType(shape)
    outs = []
    for tiled_max, rb in ((512, 32), (0, 8), (0, 128)):
        monkeypatch.setattr(lowering, "ATTENTION_TILED_MAX", tiled_max)
        monkeypatch.setattr(lowering, "ATTENTION_ROW_BLOCK", rb)
        clear_memory_cache()
        fwd = Program(trace(lambda q, k, v: F.attention(q, k, v, causal=True, scale=0.3), T, T, T))
        bwd = Program(trace(lambda q, k, v, o, g: bind("attention_grad", q, k, v, o, g, scale=0.3, causal=True),
                            T, T, T, T, T))
        outs.append((fwd(*ins[:3])[0], bwd(*ins)[0]))
    clear_memory_cache()
    ref = interpret(trace(lambda q, k, v, o, g: bind("attention_grad", q, k, v, o, g, scale=0.3, causal=True),
                          T, T, T, T, T), ins)[0]
    for fo, bo in outs:
        np.testing.assert_allclose(fo, outs[0][0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(bo, ref, rtol=1e-4, atol=1e-5)


def test_bad_shapes_are_refused_with_the_ops_name():
    T = TensorType
    with pytest.raises(ShapeError, match=r"attention: q, k and v must have one shape.*\(2, 5, 2, 4\).*\(2, 6, 2, 4\)"):
        trace(lambda q, k, v: F.attention(q, k, v), T((2, 5, 2, 4)), T((2, 6, 2, 4)), T((2, 6, 2, 4)))
    with pytest.raises(ShapeError, match=r"attention: expects \(batch, length, heads, head_dim\)"):
        trace(lambda q, k, v: F.attention(q, k, v), T((5, 4)), T((5, 4)), T((5, 4)))


def test_second_derivatives_are_refused_clearly():
    T = TensorType((1, 3, 1, 2))

    def inner(q, k, v):
        return F.attention(q, k, v, causal=True).sum()
    with pytest.raises(ShapeError, match="second derivatives through the fused attention"):
        trace(lambda q, k, v: value_and_grad(lambda q: value_and_grad(inner)(q, k, v)[1].sum())(q)[1], T, T, T)


def test_sdpa_without_a_mask_uses_the_fused_kernel_and_with_one_the_composite():
    shape = (2, 3, 9, 4)  # (B, H, L, D), torch's layout
    rng = np.random.default_rng(1)
    q, k, v = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    T = TensorType(shape)
    plain = Program(trace(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), T, T, T))
    # (the map writes the heads-first result the caller gets back)
    assert [k.strategy for k in plain.kernels] == ["attention", "map"]
    mask = np.tril(np.ones((9, 9), bool))
    masked = Program(trace(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, mask=mask), T, T, T))
    assert "attention" not in [k.strategy for k in masked.kernels]
    np.testing.assert_allclose(plain(q, k, v)[0], masked(q, k, v)[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_edge_shapes_and_float64(dtype):
    """One position, one head dim, head dims past the GEMM's panel width, and a sequence
    past ATTENTION_TILED_MAX (the blocked kernels), causal or not, against the interpreter."""
    rng = np.random.default_rng(11)
    tol = 1e-12 if dtype == "float64" else 1e-5
    for shape in [(1, 1, 1, 1), (3, 1, 2, 5), (1, 13, 1, 1), (2, 9, 3, 17), (1, 600, 1, 4)]:
        for causal in (False, True):
            T = TensorType(shape, dtype)
            ins = [rng.standard_normal(shape).astype(dtype) for _ in range(5)]
            fwd = trace(lambda q, k, v: F.attention(q, k, v, causal=causal, scale=0.4), T, T, T)
            bwd = trace(lambda q, k, v, o, g: bind("attention_grad", q, k, v, o, g, scale=0.4, causal=causal),
                        T, T, T, T, T)
            for g, x in ((fwd, ins[:3]), (bwd, ins)):
                np.testing.assert_allclose(Program(g)(*x)[0], interpret(g, x)[0], rtol=tol, atol=tol,
                                           err_msg=f"{shape} causal={causal}")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("L", [13, 64])
def test_a_nan_query_gives_the_same_nans_with_vector_or_scalar_row_passes(dtype, L, monkeypatch):
    """A NaN in one query row (causal): its probabilities are NaN at its keys and exactly 0
    at the masked ones, in the vector passes as in the scalar ones (they once left NaN in the
    masked lanes of a row's last vector, so which dK and dV were NaN depended on the lane
    count).  Against the interpreter: the same forward; in the backward every NaN of ours is
    one of the interpreter's (whose dense products also spread 0 * NaN over masked entries
    that the kernels skip) and every other value equal."""
    monkeypatch.setenv("NEURAL_ARCH_CACHE", "0")
    rng = np.random.default_rng(12)
    shape = (1, L, 2, 8)
    T = TensorType(shape, dtype)
    ins = [rng.standard_normal(shape).astype(dtype) for _ in range(5)]
    ins[0][0, 3, 1, 2] = np.nan
    fwd = trace(lambda q, k, v: F.attention(q, k, v, causal=True, scale=0.4), T, T, T)
    bwd = trace(lambda q, k, v, o, g: bind("attention_grad", q, k, v, o, g, scale=0.4, causal=True),
                T, T, T, T, T)
    runs = {}
    for vector in (True, False):
        monkeypatch.setattr(lowering, "ATTENTION_VECTOR_ROWS", vector)
        runs[vector] = [Program(g)(*x)[0] for g, x in ((fwd, ins[:3]), (bwd, ins))]
    for a, b in zip(runs[True], runs[False]):
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(np.nan_to_num(a), np.nan_to_num(b), rtol=1e-5, atol=1e-6)
    (got_f, got_b), want_f, want_b = runs[True], interpret(fwd, ins[:3])[0], interpret(bwd, ins)[0]
    np.testing.assert_array_equal(np.isnan(got_f), np.isnan(want_f))
    assert np.isnan(got_f[0, 3, 1]).all() and np.isfinite(np.delete(got_f, 3, axis=1)).all()
    assert not (np.isnan(got_b) & ~np.isnan(want_b)).any()
    assert np.isnan(got_b[0, 3, 0, 1]).all()  # dQ of the NaN query
    np.testing.assert_allclose(got_b[~np.isnan(want_b)], want_b[~np.isnan(want_b)], rtol=1e-5, atol=1e-5)


def test_narrow_gemm_panels_keep_the_row_passes_scalar(monkeypatch):
    """With a GEMM panel of 4 columns (a valid float32 blocking) the tiled kernels' rows are
    padded to 4, less than a vector of 8: the row passes must not run on vectors (they
    would leave their rows); against the interpreter."""
    from neural_arch.compiler.codegen import gemm
    monkeypatch.setenv("NEURAL_ARCH_CACHE", "0")
    monkeypatch.setitem(gemm.BLOCKING, "float32", gemm.GemmBlocking(vl=4, mr=6, nv=1, kc=256, mc=144, nc=2048))
    rng = np.random.default_rng(13)
    for L in (2, 3, 9):
        shape = (2, L, 2, 5)
        T = TensorType(shape)
        ins = [rng.standard_normal(shape).astype(np.float32) for _ in range(5)]
        for causal in (False, True):
            fwd = trace(lambda q, k, v: F.attention(q, k, v, causal=causal, scale=0.4), T, T, T)
            bwd = trace(lambda q, k, v, o, g: bind("attention_grad", q, k, v, o, g, scale=0.4, causal=causal),
                        T, T, T, T, T)
            for g, x in ((fwd, ins[:3]), (bwd, ins)):
                np.testing.assert_allclose(Program(g)(*x)[0], interpret(g, x)[0], rtol=1e-5, atol=1e-5,
                                           err_msg=f"L={L} causal={causal}")


@pytest.mark.parametrize("causal", [False, True])
def test_key_bias_forward_and_gradients_including_the_bias(causal):
    """A (batch, keys) bias added to the scores: padded keys (a large negative bias) and a
    learned bias, whose gradient (built from primitives, only when asked for) is checked
    too; against the composite with the bias broadcast over heads and queries."""
    B, L, H, D = 2, 20, 3, 8
    rng = np.random.default_rng(7)
    q, k, v, g = (rng.standard_normal((B, L, H, D)).astype(np.float32) for _ in range(4))
    bias = rng.standard_normal((B, L)).astype(np.float32)
    bias[0, 15:] = -1e9  # padding
    scale = 0.35
    T, TB = TensorType((B, L, H, D)), TensorType((B, L))

    def comp(q, k, v, bias):
        qh, kh, vh = (F.transpose(t, 0, 2, 1, 3) for t in (q, k, v))
        s = F.matmul(qh, F.swapaxes(kh, -1, -2)) * scale + bias.reshape(B, 1, 1, L)
        if causal:
            s = F.where(F.ge(F.iota((L, L), 0), F.iota((L, L), 1)), s, -math.inf)
        return F.transpose(F.matmul(F.softmax(s, -1), vh), 0, 2, 1, 3)

    def loss(fn):
        return lambda q, k, v, bias, g: (fn(q, k, v, bias) * g).sum()
    fused = value_and_grad(loss(lambda q, k, v, b: F.attention(q, k, v, causal=causal, scale=scale, key_bias=b)),
                           (0, 1, 2, 3))
    want = interpret(trace(value_and_grad(loss(comp), (0, 1, 2, 3)), T, T, T, TB, T), [q, k, v, bias, g])
    got = Program(trace(fused, T, T, T, TB, T))(q, k, v, bias, g)
    for name, a, b in zip(("loss", "dq", "dk", "dv", "dbias"), got, want):
        np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-4, err_msg=name)
    # the bias only as a mask (no gradient asked): the bias gradient's graph is not built
    fwd_only = value_and_grad(loss(lambda q, k, v, b: F.attention(q, k, v, causal=causal, scale=scale, key_bias=b)),
                              (0, 1, 2))
    prog = Program(trace(fwd_only, T, T, T, TB, T))
    assert sorted(k.strategy for k in prog.kernels if "matmul" in k.strategy) == [], \
        [k.strategy for k in prog.kernels]
    np.testing.assert_allclose(prog(q, k, v, bias, g)[1], want[1], rtol=2e-4, atol=2e-4)
