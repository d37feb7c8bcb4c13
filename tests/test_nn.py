"""nn modules and optimizers against PyTorch with identical weights, and Module semantics."""
import math

import numpy as np
import pytest

from neural_arch.compiler import Tensor, trace, tensor
from neural_arch.models import nn, optim

torch = pytest.importorskip("torch", reason="torch is the oracle for the nn/optim tests (test extra)")

RNG = np.random.default_rng(0)


def T(x):
    return torch.tensor(np.asarray(x.data if isinstance(x, Tensor) else x))


def close(a, b, tol=1e-5):
    a = np.asarray(a.data if isinstance(a, Tensor) else a)
    b = b.detach().numpy() if hasattr(b, "detach") else np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol)


def test_linear_hand_computed():
    lin = nn.Linear(2, 3)
    lin.weight.data = np.array([[1, 2], [3, 4], [5, 6]], np.float32)
    lin.bias.data = np.array([0.5, -1, 2], np.float32)
    y = lin(tensor([[1.0, -1.0]]))
    np.testing.assert_array_equal(y.data, [[-0.5, -2.0, 1.0]])


def test_linear_layernorm_forward_and_grads_match_torch():
    x = RNG.standard_normal((4, 6)).astype(np.float32)
    lin, ln = nn.Linear(6, 5), nn.LayerNorm(5)
    ln.weight.data = RNG.standard_normal(5).astype(np.float32)
    tl, tn = torch.nn.Linear(6, 5), torch.nn.LayerNorm(5)
    with torch.no_grad():
        tl.weight.copy_(T(lin.weight)), tl.bias.copy_(T(lin.bias)), tn.weight.copy_(T(ln.weight))
    y = ln(lin(Tensor(x)))
    ty = tn(tl(T(x)))
    close(y, ty)
    (y * y).sum().backward()
    (ty * ty).sum().backward()
    close(lin.weight.grad, tl.weight.grad, 1e-4)
    close(lin.bias.grad, tl.bias.grad, 1e-4)
    close(ln.weight.grad, tn.weight.grad, 1e-4)


def test_multihead_attention_matches_torch_with_masks():
    e, h, b, lq, lk = 8, 2, 2, 3, 5
    mha = nn.MultiHeadAttention(e, h)
    tm = torch.nn.MultiheadAttention(e, h, batch_first=True)
    with torch.no_grad():
        tm.in_proj_weight.copy_(torch.cat([T(mha.q_proj.weight), T(mha.k_proj.weight), T(mha.v_proj.weight)]))
        tm.in_proj_bias.copy_(torch.cat([T(mha.q_proj.bias), T(mha.k_proj.bias), T(mha.v_proj.bias)]))
        tm.out_proj.weight.copy_(T(mha.out_proj.weight)), tm.out_proj.bias.copy_(T(mha.out_proj.bias))
    q = RNG.standard_normal((b, lq, e)).astype(np.float32)
    kv = RNG.standard_normal((b, lk, e)).astype(np.float32)
    pad = np.zeros((b, lk), bool)
    pad[1, -2:] = True
    y = mha(Tensor(q), Tensor(kv), Tensor(kv), key_padding_mask=pad)
    ty, _ = tm(T(q), T(kv), T(kv), key_padding_mask=T(pad), need_weights=False)
    close(y, ty, 1e-5)
    x = RNG.standard_normal((b, 4, e)).astype(np.float32)
    causal = torch.triu(torch.ones(4, 4, dtype=torch.bool), 1)
    close(mha(Tensor(x), is_causal=True), tm(T(x), T(x), T(x), attn_mask=causal, need_weights=False)[0], 1e-5)


def _mha_and_sequence(e=8, h=2, b=2, n=6, seed=4):
    nn.manual_seed(seed)
    mha = nn.MultiHeadAttention(e, h)
    x = np.random.default_rng(seed).standard_normal((b, n, e)).astype(np.float32)
    return mha, x, mha(Tensor(x), is_causal=True).data  # the full causal MHA (tested against torch above)


def test_kv_cache_incremental_decoding_equals_full_causal_mha():
    mha, x, full = _mha_and_sequence()
    b, n, _ = x.shape
    cache = nn.KVCache.empty(b, 2, 8, 4)
    y = mha(Tensor(x[:, :2]), is_causal=True, kv_cache=cache)  # a 2-token prefill
    np.testing.assert_allclose(y.data, full[:, :2], rtol=1e-5, atol=1e-6)
    assert cache.position == 2
    for t in range(2, n):
        y = mha(Tensor(x[:, t:t + 1]), is_causal=True, kv_cache=cache)
        np.testing.assert_allclose(y.data[:, 0], full[:, t], rtol=1e-5, atol=1e-6)
        assert cache.position == t + 1
    # the cache holds exactly the projected keys/values of the whole sequence, zeros after it
    keys = mha.k_proj(Tensor(x)).data.reshape(b, n, 2, 4).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(cache.keys.data[:, :, :n], keys, rtol=1e-5, atol=1e-6)
    assert not cache.values.data[:, :, n:].any()
    # update returns the keys and values so far
    k_new = Tensor(np.ones((b, 2, 2, 4), np.float32))
    ks, vs = cache.update(k_new, k_new)
    assert ks.shape == vs.shape == (b, 2, n + 2, 4) and cache.position == n + 2
    np.testing.assert_array_equal(ks.data[:, :, n:], 1.0)


@pytest.mark.parametrize("backend, causal", [("llvm", True), ("interpreter", False)])
def test_kv_cache_compiled_decode_with_runtime_position(backend, causal):
    """One traced program (the position a runtime input, as GPT-2's generate compiles it)
    serves every position; stale values in the unwritten slots must not leak in."""
    from neural_arch.compiler import TensorType, compile
    mha, x, full = _mha_and_sequence()
    b, n, e = x.shape
    buf = TensorType((b, 2, 8, 4), "float32")

    def step(x_t, pos, kb, vb):
        cache = nn.KVCache(kb, vb, pos)
        return mha(x_t, is_causal=causal, kv_cache=cache), cache.keys, cache.values

    f = compile(step, TensorType((b, 1, e), "float32"), TensorType((), "int64"), buf, buf, backend=backend)
    junk = np.random.default_rng(9).standard_normal(buf.shape).astype(np.float32) * 100
    kb, vb = junk, junk.copy()
    for t in range(n):
        y, kb, vb = f(x[:, t:t + 1], np.int64(t), kb, vb)
        # one query at the last position: causal and "every key so far" agree
        np.testing.assert_allclose(y.data[:, 0], full[:, t], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(kb.data[:, :, n:], junk[:, :, n:])
    # a runtime position past the buffer is an error when the program runs, not dropped keys
    from neural_arch.compiler.ops.registry import OpIndexError
    for bad in (8, -1):
        with pytest.raises(OpIndexError, match=rf"check_index: index {bad} is out of range: allowed \[0, 8\)"):
            f(x[:, :1], np.int64(bad), kb, vb)


def test_kv_cache_errors():
    cache = nn.KVCache.empty(1, 2, 3, 4)
    k = Tensor(np.zeros((1, 2, 2, 4), np.float32))
    cache.update(k, k)
    with pytest.raises(ValueError, match="appending 2 positions at position 2 overflows max_len 3"):
        cache.update(k, k)
    assert cache.position == 2  # a refused update changes nothing
    with pytest.raises(ValueError, match=r"head_dim 4\), got \(1, 2, 1, 5\)"):
        cache.update(Tensor(np.zeros((1, 2, 1, 5), np.float32)), Tensor(np.zeros((1, 2, 1, 5), np.float32)))
    with pytest.raises(ValueError, match=r"batch 1, heads 2"):
        cache.update(Tensor(np.zeros((2, 2, 1, 4), np.float32)), Tensor(np.zeros((2, 2, 1, 4), np.float32)))
    with pytest.raises(TypeError, match="keys are float64, the cache holds float32"):
        cache.update(Tensor(np.zeros((1, 2, 1, 4))), Tensor(np.zeros((1, 2, 1, 4))))
    with pytest.raises(ValueError, match="differ in shape"):
        cache.update(Tensor(np.zeros((1, 2, 1, 4), np.float32)), Tensor(np.zeros((1, 2, 2, 4), np.float32)))
    with pytest.raises(ValueError, match="differ in shape or dtype"):
        nn.KVCache(np.zeros((1, 2, 3, 4), np.float32), np.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match=r"\(batch, heads, max_len, head_dim\)"):
        nn.KVCache(np.zeros((2, 3, 4), np.float32), np.zeros((2, 3, 4), np.float32))
    with pytest.raises(ValueError, match="position 4 outside"):
        nn.KVCache(np.zeros((1, 2, 3, 4), np.float32), np.zeros((1, 2, 3, 4), np.float32), 4)
    with pytest.raises(TypeError, match="position must be an int"):
        nn.KVCache(np.zeros((1, 2, 3, 4), np.float32), np.zeros((1, 2, 3, 4), np.float32), 1.5)
    mha = nn.MultiHeadAttention(8, 2)
    x = Tensor(np.zeros((1, 1, 8), np.float32))
    with pytest.raises(TypeError, match="kv_cache must be an nn.KVCache, got bool"):
        mha(x, kv_cache=True)
    with pytest.raises(ValueError, match="does not hold 2 heads of 4"):
        mha(x, kv_cache=nn.KVCache.empty(1, 4, 3, 2))


def test_transformer_block_pre_and_post_ln_match_torch():
    d, h = 8, 2
    x = RNG.standard_normal((2, 5, d)).astype(np.float32)
    for norm_first in (True, False):
        blk = nn.TransformerBlock(d, h, 16, norm_first=norm_first, activation="gelu")
        tb = torch.nn.TransformerEncoderLayer(d, h, 16, dropout=0.0, activation="gelu", batch_first=True,
                                              norm_first=norm_first)
        with torch.no_grad():
            a = blk.attn
            tb.self_attn.in_proj_weight.copy_(torch.cat([T(a.q_proj.weight), T(a.k_proj.weight), T(a.v_proj.weight)]))
            tb.self_attn.in_proj_bias.copy_(torch.cat([T(a.q_proj.bias), T(a.k_proj.bias), T(a.v_proj.bias)]))
            tb.self_attn.out_proj.weight.copy_(T(a.out_proj.weight)), tb.self_attn.out_proj.bias.copy_(T(a.out_proj.bias))
            for ours, theirs in ((blk.fc1, tb.linear1), (blk.fc2, tb.linear2), (blk.ln1, tb.norm1), (blk.ln2, tb.norm2)):
                theirs.weight.copy_(T(ours.weight)), theirs.bias.copy_(T(ours.bias))
        tb.eval()
        close(blk(Tensor(x)), tb(T(x)), 1e-5)


def test_conv_and_pools_match_torch():
    x = RNG.standard_normal((2, 3, 9, 8)).astype(np.float32)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
    tc = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
    with torch.no_grad():
        tc.weight.copy_(T(conv.weight)), tc.bias.copy_(T(conv.bias))
    xt = T(x).requires_grad_(True)
    xs = Tensor(x, requires_grad=True)
    y, ty = conv(xs), tc(xt)
    close(y, ty, 1e-5)
    (y * y).sum().backward()
    (ty * ty).sum().backward()
    close(conv.weight.grad, tc.weight.grad, 1e-4)
    close(xs.grad, xt.grad, 1e-4)
    close(nn.MaxPool2d(2)(Tensor(x)), torch.nn.functional.max_pool2d(T(x), 2))
    close(nn.AvgPool2d(3, 2, 1)(Tensor(x)), torch.nn.functional.avg_pool2d(T(x), 3, 2, 1, count_include_pad=True))


def test_module_registry_state_dict_and_strict_loading():
    model = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.LayerNorm(4))
    names = [n for n, _ in model.named_parameters()]
    assert names == ["0.weight", "0.bias", "2.weight", "2.bias"]
    sd = model.state_dict()
    other = nn.Sequential(nn.Linear(3, 4), nn.GELU(), nn.LayerNorm(4))
    other.load_state_dict(sd)
    np.testing.assert_array_equal(other[0].weight.data, model[0].weight.data)
    bad = dict(sd)
    bad["0.weight"] = np.zeros((5, 3), np.float32)
    with pytest.raises(ValueError, match=r"0\.weight: checkpoint \(5, 3\) vs model \(4, 3\)"):
        other.load_state_dict(bad)
    del bad["0.weight"]
    bad["extra"] = np.zeros(1)
    with pytest.raises(ValueError, match="missing keys: 0.weight.*unexpected keys: extra"):
        other.load_state_dict(bad)
    assert other.load_state_dict({"0.bias": sd["0.bias"]}, strict=False)["missing"] == ["0.weight", "2.weight", "2.bias"]


def test_train_eval_and_dropout():
    nn.manual_seed(1)
    drop = nn.Dropout(0.25)
    x = Tensor(np.ones((200, 50), np.float32))
    y = drop(x).data
    frac = (y == 0).mean()
    assert abs(frac - 0.25) < 0.02
    np.testing.assert_allclose(y[y != 0], 1 / 0.75)
    assert not np.array_equal(drop(x).data, y)  # a fresh seed per call
    drop.eval()
    np.testing.assert_array_equal(drop(x).data, x.data)
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))
    model.eval()
    assert not model[1].training and not model.training
    model.train()
    assert model[1].training


def test_modules_trace_with_named_param_inputs():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    g = trace(model, np.zeros((5, 3), np.float32))
    params = [i.name for i in g.inputs if i.kind == "param"]
    assert params == ["0.weight", "0.bias", "2.weight", "2.bias"]


def _run_opt(make_ours, make_theirs, steps=5):
    w0 = RNG.standard_normal((3, 4)).astype(np.float32)
    x = RNG.standard_normal((6, 3)).astype(np.float32)
    p = nn.Parameter(w0)
    tp = torch.nn.Parameter(T(w0))
    opt, topt = make_ours([p]), make_theirs([tp])
    for _ in range(steps):
        opt.zero_grad(), topt.zero_grad()
        ((Tensor(x) @ p).tanh() ** 2).sum().backward()
        ((T(x) @ tp).tanh() ** 2).sum().backward()
        opt.step(), topt.step()
    close(p, tp, 2e-5)
    return opt, topt, p, tp


@pytest.mark.parametrize("kw", [dict(momentum=0.0), dict(momentum=0.9), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.8, weight_decay=0.1)])
def test_sgd_matches_torch(kw):
    _run_opt(lambda ps: optim.SGD(ps, lr=0.1, **kw), lambda ps: torch.optim.SGD(ps, lr=0.1, **kw))


@pytest.mark.parametrize("cls", ["Adam", "AdamW"])
def test_adam_family_matches_torch(cls):
    kw = dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.05)
    opt, topt, p, tp = _run_opt(lambda ps: getattr(optim, cls)(ps, **kw), lambda ps: getattr(torch.optim, cls)(ps, **kw))
    st, tst = opt.state_for(p), topt.state[tp]
    assert st["step"] == int(tst["step"])
    close(st["exp_avg"], tst["exp_avg"], 2e-5)
    close(st["exp_avg_sq"], tst["exp_avg_sq"], 2e-5)


def test_lr_is_settable_between_steps():
    p = nn.Parameter(np.ones(2, np.float32))
    opt = optim.SGD([p], lr=1.0)
    p.grad = Tensor(np.ones(2, np.float32))
    opt.step()
    opt.lr = 0.5
    opt.step()
    np.testing.assert_allclose(p.data, [1 - 1.0 - 0.5] * 2)


def test_clip_grad_norm_matches_torch():
    g = [RNG.standard_normal(s).astype(np.float32) * 3 for s in [(3, 4), (5,)]]
    ps = [nn.Parameter(np.zeros(x.shape, np.float32)) for x in g]
    tps = [torch.nn.Parameter(torch.zeros(x.shape)) for x in g]
    for p, tp, x in zip(ps, tps, g):
        p.grad, tp.grad = Tensor(x), T(x)
    n = optim.clip_grad_norm_(ps, 1.0)
    tn = torch.nn.utils.clip_grad_norm_(tps, 1.0)
    assert math.isclose(n, float(tn), rel_tol=1e-5)
    for p, tp in zip(ps, tps):
        close(p.grad, tp.grad, 1e-6)
    clipped, norm = optim.clip_by_global_norm([Tensor(x) for x in g], 1.0)
    assert math.isclose(float(norm.item()), float(tn), rel_tol=1e-5)
    for c, tp in zip(clipped, tps):
        close(c, tp.grad, 1e-6)


def test_schedules():
    s = optim.WarmupCosine(1.0, warmup=10, total=110, min_lr=0.1)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(60) == pytest.approx(0.55) and s(110) == pytest.approx(0.1) and s(500) == pytest.approx(0.1)
    assert optim.StepLR(1.0, 10, 0.5)(25) == 0.25
    assert optim.ConstantLR(0.3)(1000) == 0.3


def test_clip_grad_norm_takes_any_iterable_of_parameters_like_torch():
    # torch.nn.utils.clip_grad_norm_ takes a generator (model.parameters() is one in torch) or
    # a single tensor; a generator used to be consumed by the norm, leaving the grads unclipped
    g = RNG.standard_normal((3, 4)).astype(np.float32) * 3
    tp = torch.nn.Parameter(torch.zeros(3, 4))
    tp.grad = T(g)
    tn = torch.nn.utils.clip_grad_norm_((q for q in [tp]), 1.0)
    p = nn.Parameter(np.zeros((3, 4), np.float32))
    p.grad = Tensor(g)
    n = optim.clip_grad_norm_((q for q in [p]), 1.0)
    assert math.isclose(n, float(tn), rel_tol=1e-5)
    close(p.grad, tp.grad, 1e-6)
    p.grad = Tensor(g)
    assert math.isclose(optim.clip_grad_norm_(p, 1.0), float(tn), rel_tol=1e-5)
    close(p.grad, tp.grad, 1e-6)


def test_optimizer_hyperparameters_are_checked_with_clear_errors():
    p = nn.Parameter(np.ones(2, np.float32))
    with pytest.raises(TypeError, match="SGD: lr must be a real number, got str '0.1'"):
        optim.SGD([p], lr="0.1")
    with pytest.raises(TypeError, match="Adam: lr must be a real number, got NoneType"):
        optim.Adam([p], lr=None)
    with pytest.raises(ValueError, match="AdamW: lr must be finite and >= 0, got nan"):
        optim.AdamW([p], lr=float("nan"))
    opt = optim.SGD([p], lr=0.1)
    with pytest.raises(TypeError, match="SGD: lr must be a real number, got str"):
        opt.lr = "0.5"  # set between steps, as schedules do: checked there too
    with pytest.raises(ValueError, match="SGD: lr must be finite and >= 0, got -1.0"):
        opt.lr = -1.0
    assert opt.lr == 0.1
    opt.lr = np.float32(0.25)  # a NumPy scalar (a schedule computed with NumPy) becomes a float
    assert type(opt.lr) is float and opt.lr == 0.25
    # as torch.optim checks them
    with pytest.raises(ValueError, match=r"Adam: betas\[0\] must lie in \[0, 1\), got 1.0"):
        optim.Adam([p], betas=(1.0, 0.999))
    with pytest.raises(ValueError, match=r"AdamW: betas\[1\] must lie in \[0, 1\), got -0.5"):
        optim.AdamW([p], betas=(0.9, -0.5))
    with pytest.raises(ValueError, match="Adam: eps must be >= 0, got -1e-08"):
        optim.Adam([p], eps=-1e-8)
    with pytest.raises(ValueError, match="SGD: momentum must be >= 0, got -0.9"):
        optim.SGD([p], momentum=-0.9)
    with pytest.raises(ValueError, match="SGD: weight_decay must be >= 0, got -0.1"):
        optim.SGD([p], weight_decay=-0.1)
    # a parameter listed twice would be updated twice per step (torch warns it will refuse)
    with pytest.raises(ValueError, match="SGD: parameter 1 is parameter 0 again"):
        optim.SGD([p, p], lr=0.1)


def test_attention_masks_of_other_dtypes_and_inputs_of_other_ranks_are_refused():
    # torch refuses integer masks; ours used to take a 0/1 int attn_mask as an additive mask
    # (adding 1 where the caller meant "attend"), a float key_padding_mask as truthy padding
    nn.manual_seed(0)
    mha = nn.MultiHeadAttention(8, 2)
    x = Tensor(RNG.standard_normal((2, 3, 8)).astype(np.float32))
    with pytest.raises(TypeError, match=r"MultiHeadAttention: attn_mask must be bool \(True = attend\) or "
                                        r"floating \(added\), got int64"):
        mha(x, attn_mask=np.tril(np.ones((3, 3), np.int64)))
    for dtype in (np.int64, np.float32):
        with pytest.raises(TypeError, match=r"MultiHeadAttention: key_padding_mask must be bool \(True at "
                                            rf"padding\), got {np.dtype(dtype).name}"):
            mha(x, key_padding_mask=np.zeros((2, 3), dtype))
        with pytest.raises(TypeError, match="key_padding_mask must be bool"):
            mha(x, key_padding_mask=np.zeros((2, 3), dtype), attn_mask=np.ones((3, 3), bool))
    with pytest.raises(ValueError, match=r"MultiHeadAttention: query must be \(batch, seq, embed\), got shape \(3, 8\)"):
        mha(Tensor(np.zeros((3, 8), np.float32)))
    with pytest.raises(ValueError, match=r"MultiHeadAttention: key must be \(batch, seq, embed\), got shape \(3, 8\)"):
        mha(x, Tensor(np.zeros((3, 8), np.float32)))
    with pytest.raises(ValueError, match=r"TransformerBlock: activation must be one of 'gelu', 'gelu_tanh', 'relu', "
                                         r"'silu', got 'gelu2'"):
        nn.TransformerBlock(8, 2, activation="gelu2")


def test_assigning_a_tensor_keeps_a_buffer_and_is_refused_for_a_parameter():
    # as torch: a tensor assigned to a buffer's name replaces the buffer (it used to drop out of
    # state_dict, so checkpoints silently lost it); over a parameter it is a TypeError (the
    # parameter used to vanish from parameters(), state_dict and the optimizer's view)
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("scale", np.ones(2, np.float32))

    m = M()
    m.scale = Tensor(np.full(2, 3.0, np.float32))
    assert list(m.state_dict()) == ["scale", "lin.weight", "lin.bias"]
    np.testing.assert_array_equal(m.state_dict()["scale"], [3.0, 3.0])
    other = M()
    other.load_state_dict(m.state_dict())
    np.testing.assert_array_equal(other.scale.data, [3.0, 3.0])
    with pytest.raises(TypeError, match=r"cannot assign Tensor as parameter 'weight' of Linear "
                                        r"\(nn\.Parameter or None expected\)"):
        m.lin.weight = Tensor(np.zeros((2, 2), np.float32))
    assert [n for n, _ in m.named_parameters()] == ["lin.weight", "lin.bias"]
    m.lin.bias = None  # (None removes it, as torch)
    assert [n for n, _ in m.named_parameters()] == ["lin.weight"]
    tm = torch.nn.Linear(2, 2)
    with pytest.raises(TypeError, match="cannot assign"):
        tm.weight = torch.zeros(2, 2)


@pytest.mark.parametrize("pool", ["MaxPool2d", "AvgPool2d"])
def test_pool_padding_past_half_the_kernel_is_refused_as_torch_does(pool):
    # windows wholly in the padding used to give -inf (max) or 0 (mean) where torch refuses
    x = np.zeros((1, 1, 5, 5), np.float32)
    with pytest.raises(RuntimeError, match="pad should be at most half"):
        getattr(torch.nn.functional, pool[:3].lower() + "_pool2d")(T(x), 2, padding=2)
    with pytest.raises(ValueError, match=rf"{pool}: padding \(2, 2\) must be at most half the kernel size \(2, 2\)"):
        getattr(nn, pool)(2, padding=2)
    close(getattr(nn, pool)(2, padding=1)(Tensor(x)), getattr(torch.nn, pool)(2, padding=1)(T(x)))
