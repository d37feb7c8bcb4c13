"""Every layer of models/nn.py, from one table of cases, checked two ways:

(a) eager forward, input gradients and parameter gradients against torch with our weights
    (torch runs the same parameter values through ``torch.func.functional_call``, so every
    parameter's gradient is compared by name; the table asserts that the name maps cover
    both modules' parameters);
(b) the traced graph compiled with LLVM against the interpreter on that same graph: the
    forward, and the autodiff graph (loss, then the gradient w.r.t. every float input:
    arguments, the cotangent and every parameter).

The loss is ``sum(layer(x) * ct)`` with a fixed random cotangent ``ct``, so the gradients
are the layer's vector-Jacobian product for a generic direction.  Parameters are
re-randomised after construction (norm scales away from 1, biases away from 0, weights of
unit gain) so no gradient is trivially zero or one.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pytest

from neural_arch.compiler import Tensor, functional as F
from neural_arch.compiler.autodiff import autodiff
from neural_arch.compiler.ir import FLOAT_DTYPES
from neural_arch.compiler.trace import trace_with_info
from neural_arch.models import nn
from neural_arch.runtime.interpreter import interpret
from neural_arch.runtime.program import Program

torch = pytest.importorskip("torch", reason="torch is the oracle for the layer tests (test extra)")

RTOL = ATOL = 1e-5  # float32 against float32; every case passes at these, none is loosened


# ----------------------------------------------------------------------------- the table


@dataclass
class Case:
    id: str
    make: Callable[[], nn.Module]
    inputs: Callable[[np.random.Generator], list]  # numpy arrays; float ones get gradients
    torch_module: Callable[[], "torch.nn.Module"] | None
    # torch parameter name -> our parameter names, concatenated along axis 0 (None: same names)
    param_map: dict | None = None
    call: Callable = lambda m, *xs: m(*xs)
    torch_call: Callable = lambda tm, *xs: tm(*xs)  # tm: the torch module with our parameters
    seed: int = field(init=False)

    def __post_init__(self):
        self.seed = zlib.crc32(self.id.encode())


def _f32(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _pad_mask(b, lk):
    """(b, lk) True at padding: batch 0 unpadded, batch i > 0 with its last i keys padded."""
    m = np.zeros((b, lk), bool)
    for i in range(1, b):
        m[i, lk - i:] = True
    return m


def _triu(lq, lk, offset=0):
    """torch's bool attn_mask (True = may NOT attend): key j > query i + offset."""
    return torch.ones(lq, lk, dtype=torch.bool).triu(1 + offset)


def _float_pad(pad):
    """A bool key-padding mask as torch's float form (torch wants both masks of one kind)."""
    return torch.zeros(pad.shape).masked_fill(pad, -math.inf)


def _mha_map(separate=False):
    """torch MultiheadAttention's parameters from ours (its in-projection is q, k, v stacked)."""
    m = {"in_proj_bias": ("q_proj.bias", "k_proj.bias", "v_proj.bias"),
         "out_proj.weight": ("out_proj.weight",), "out_proj.bias": ("out_proj.bias",)}
    if separate:  # torch keeps separate projections when kdim/vdim differ from embed_dim
        m.update({f"{x}_proj_weight": (f"{x}_proj.weight",) for x in "qkv"})
    else:
        m["in_proj_weight"] = ("q_proj.weight", "k_proj.weight", "v_proj.weight")
    return m


_BLOCK_MAP = {f"self_attn.{k}": tuple(f"attn.{n}" for n in v) for k, v in _mha_map().items()}
_BLOCK_MAP.update({f"{t}.{w}": (f"{o}.{w}",) for t, o in (("linear1", "fc1"), ("linear2", "fc2"),
                                                          ("norm1", "ln1"), ("norm2", "ln2"))
                   for w in ("weight", "bias")})

P_DROP = 0.3


def _dropout_train_call(m, x, seed):
    with nn.dropout_seed(seed):
        return m(x)


def _dropout_train_torch(tm, x, seed):
    # the documented mask: inside dropout_seed the first site draws stream 1 of the seed
    keep = F.uniform(int(seed), tuple(x.shape), 1).data >= P_DROP
    return torch.where(torch.from_numpy(keep), x / (1 - P_DROP), 0.0)


def _mha(e=8, h=2, **kw):
    return lambda: torch.nn.MultiheadAttention(e, h, batch_first=True, **kw)


def _enc(norm_first, activation):
    return lambda: torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=activation,
                                                    batch_first=True, norm_first=norm_first)


CASES = [
    Case("linear", lambda: nn.Linear(6, 5), lambda r: [_f32(r, 3, 4, 6)], lambda: torch.nn.Linear(6, 5)),
    Case("linear_nobias", lambda: nn.Linear(6, 5, bias=False), lambda r: [_f32(r, 4, 6)],
         lambda: torch.nn.Linear(6, 5, bias=False)),
    # ids with repeats: the weight gradient accumulates rows
    Case("embedding", lambda: nn.Embedding(10, 4), lambda r: [np.array([[1, 3, 3, 0, 9], [3, 1, 7, 7, 7]])],
         lambda: torch.nn.Embedding(10, 4)),
    Case("layernorm", lambda: nn.LayerNorm(8), lambda r: [_f32(r, 3, 4, 8)], lambda: torch.nn.LayerNorm(8)),
    Case("layernorm_2d_shape", lambda: nn.LayerNorm((3, 4)), lambda r: [_f32(r, 2, 3, 4)],
         lambda: torch.nn.LayerNorm((3, 4))),
    Case("layernorm_no_affine", lambda: nn.LayerNorm(8, elementwise_affine=False), lambda r: [_f32(r, 3, 8)],
         lambda: torch.nn.LayerNorm(8, elementwise_affine=False)),
    Case("rmsnorm", lambda: nn.RMSNorm(8), lambda r: [_f32(r, 3, 4, 8)], lambda: torch.nn.RMSNorm(8, eps=1e-6)),
    Case("dropout_eval", lambda: nn.Dropout(P_DROP).eval(), lambda r: [_f32(r, 4, 6)],
         lambda: torch.nn.Dropout(P_DROP).eval()),
    Case("dropout_train", lambda: nn.Dropout(P_DROP), lambda r: [_f32(r, 16, 24), np.array(1234, np.int64)],
         None, call=_dropout_train_call, torch_call=_dropout_train_torch),
    Case("gelu", lambda: nn.GELU(), lambda r: [_f32(r, 4, 7)], lambda: torch.nn.GELU()),
    Case("gelu_tanh", lambda: nn.GELU("tanh"), lambda r: [_f32(r, 4, 7)], lambda: torch.nn.GELU("tanh")),
    Case("relu", lambda: nn.ReLU(), lambda r: [_f32(r, 4, 7)], lambda: torch.nn.ReLU()),
    Case("silu", lambda: nn.SiLU(), lambda r: [_f32(r, 4, 7)], lambda: torch.nn.SiLU()),
    Case("tanh", lambda: nn.Tanh(), lambda r: [_f32(r, 4, 7)], lambda: torch.nn.Tanh()),
    Case("flatten", lambda: nn.Flatten(), lambda r: [_f32(r, 2, 3, 4, 5)], lambda: torch.nn.Flatten()),
    Case("flatten_middle", lambda: nn.Flatten(1, 2), lambda r: [_f32(r, 2, 3, 4, 5)],
         lambda: torch.nn.Flatten(1, 2)),
    # --- attention.  Self-attention without attn_mask runs the fused kernel (causal, key padding
    # as a key bias); attn_mask, cross attention and kdim/vdim run the explicit softmax path.
    Case("mha_self_causal", lambda: nn.MultiHeadAttention(8, 2), lambda r: [_f32(r, 2, 5, 8)], _mha(),
         _mha_map(), call=lambda m, x: m(x, is_causal=True),
         torch_call=lambda tm, x: tm(x, x, x, attn_mask=_triu(5, 5), is_causal=True, need_weights=False)[0]),
    Case("mha_self_key_padding", lambda: nn.MultiHeadAttention(8, 2), lambda r: [_f32(r, 3, 5, 8), _pad_mask(3, 5)],
         _mha(), _mha_map(), call=lambda m, x, pad: m(x, key_padding_mask=pad),
         torch_call=lambda tm, x, pad: tm(x, x, x, key_padding_mask=pad, need_weights=False)[0]),
    Case("mha_self_causal_key_padding", lambda: nn.MultiHeadAttention(8, 2),
         lambda r: [_f32(r, 3, 5, 8), _pad_mask(3, 5)], _mha(), _mha_map(),
         call=lambda m, x, pad: m(x, key_padding_mask=pad, is_causal=True),
         torch_call=lambda tm, x, pad: tm(x, x, x, key_padding_mask=pad, attn_mask=_triu(5, 5),
                                          need_weights=False)[0]),
    # bool attn_mask (ours True = attend, torch True = masked): a random pattern, diagonal kept
    Case("mha_self_bool_attn_mask", lambda: nn.MultiHeadAttention(8, 2),
         lambda r: [_f32(r, 2, 5, 8), (r.random((5, 5)) > 0.4) | np.eye(5, dtype=bool)], _mha(), _mha_map(),
         call=lambda m, x, am: m(x, attn_mask=am),
         torch_call=lambda tm, x, am: tm(x, x, x, attn_mask=~am, need_weights=False)[0]),
    Case("mha_cross", lambda: nn.MultiHeadAttention(8, 2),
         lambda r: [_f32(r, 2, 3, 8), _f32(r, 2, 6, 8), _f32(r, 2, 6, 8)], _mha(), _mha_map(),
         torch_call=lambda tm, q, k, v: tm(q, k, v, need_weights=False)[0]),
    # query, key and value of one shape but distinct tensors: the fused kernel with separate k, v
    Case("mha_cross_same_length_causal", lambda: nn.MultiHeadAttention(8, 2),
         lambda r: [_f32(r, 2, 5, 8), _f32(r, 2, 5, 8), _f32(r, 2, 5, 8)], _mha(), _mha_map(),
         call=lambda m, q, k, v: m(q, k, v, is_causal=True),
         torch_call=lambda tm, q, k, v: tm(q, k, v, attn_mask=_triu(5, 5), need_weights=False)[0]),
    Case("mha_cross_key_padding", lambda: nn.MultiHeadAttention(8, 2),
         lambda r: [_f32(r, 3, 3, 8), _f32(r, 3, 6, 8), _f32(r, 3, 6, 8), _pad_mask(3, 6)], _mha(), _mha_map(),
         call=lambda m, q, k, v, pad: m(q, k, v, key_padding_mask=pad),
         torch_call=lambda tm, q, k, v, pad: tm(q, k, v, key_padding_mask=pad, need_weights=False)[0]),
    # causal with more keys than queries (a decode window): query i sees keys j <= i + (lk - lq)
    # a float attn_mask is added to the scores; with key padding the padded keys still get -inf
    Case("mha_cross_float_mask_key_padding", lambda: nn.MultiHeadAttention(8, 2),
         lambda r: [_f32(r, 3, 3, 8), _f32(r, 3, 6, 8), _f32(r, 3, 6, 8), _pad_mask(3, 6), _f32(r, 3, 6)],
         _mha(), _mha_map(),
         call=lambda m, q, k, v, pad, am: m(q, k, v, key_padding_mask=pad, attn_mask=am),
         torch_call=lambda tm, q, k, v, pad, am: tm(q, k, v, attn_mask=am, key_padding_mask=_float_pad(pad),
                                                    need_weights=False)[0]),
    Case("mha_cross_causal_offset", lambda: nn.MultiHeadAttention(8, 2),
         lambda r: [_f32(r, 2, 3, 8), _f32(r, 2, 5, 8)], _mha(), _mha_map(),
         call=lambda m, q, kv: m(q, kv, is_causal=True),
         torch_call=lambda tm, q, kv: tm(q, kv, kv, attn_mask=_triu(3, 5, 2), need_weights=False)[0]),
    Case("mha_cross_kdim_vdim", lambda: nn.MultiHeadAttention(8, 2, kdim=6, vdim=4),
         lambda r: [_f32(r, 2, 3, 8), _f32(r, 2, 5, 6), _f32(r, 2, 5, 4)], _mha(kdim=6, vdim=4),
         _mha_map(separate=True), torch_call=lambda tm, q, k, v: tm(q, k, v, need_weights=False)[0]),
    Case("block_pre_ln_causal", lambda: nn.TransformerBlock(8, 2, 16, norm_first=True, causal=True),
         lambda r: [_f32(r, 2, 5, 8)], _enc(True, "gelu"), _BLOCK_MAP,
         torch_call=lambda tm, x: tm(x, src_mask=_triu(5, 5), is_causal=True)),
    Case("block_post_ln_key_padding", lambda: nn.TransformerBlock(8, 2, 16, norm_first=False, activation="relu"),
         lambda r: [_f32(r, 3, 5, 8), _pad_mask(3, 5)], _enc(False, "relu"), _BLOCK_MAP,
         call=lambda m, x, pad: m(x, key_padding_mask=pad),
         torch_call=lambda tm, x, pad: tm(x, src_key_padding_mask=pad)),
    Case("block_pre_ln_silu_key_padding", lambda: nn.TransformerBlock(8, 2, 16, norm_first=True, activation="silu"),
         lambda r: [_f32(r, 3, 5, 8), _pad_mask(3, 5)],
         lambda: torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation=torch.nn.functional.silu,
                                                  batch_first=True, norm_first=True), _BLOCK_MAP,
         call=lambda m, x, pad: m(x, key_padding_mask=pad),
         torch_call=lambda tm, x, pad: tm(x, src_key_padding_mask=pad)),
    # --- convolution and pooling (odd sizes: the last partial window is dropped, as in torch)
    Case("conv_stride2_pad1", lambda: nn.Conv2d(3, 4, 3, stride=2, padding=1), lambda r: [_f32(r, 2, 3, 7, 6)],
         lambda: torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)),
    Case("conv_rect_nobias", lambda: nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 0), bias=False),
         lambda r: [_f32(r, 2, 2, 5, 7)], lambda: torch.nn.Conv2d(2, 3, (2, 3), stride=(1, 2), padding=(1, 0),
                                                                  bias=False)),
    Case("maxpool2", lambda: nn.MaxPool2d(2), lambda r: [_f32(r, 2, 3, 7, 6)], lambda: torch.nn.MaxPool2d(2)),
    Case("maxpool3_stride2_pad1", lambda: nn.MaxPool2d(3, 2, 1), lambda r: [_f32(r, 2, 3, 7, 6)],
         lambda: torch.nn.MaxPool2d(3, 2, 1)),
    Case("avgpool2", lambda: nn.AvgPool2d(2), lambda r: [_f32(r, 2, 3, 7, 6)], lambda: torch.nn.AvgPool2d(2)),
    # ours averages over the zero-padded window: torch's count_include_pad=True (its default)
    Case("avgpool3_stride2_pad1", lambda: nn.AvgPool2d(3, 2, 1), lambda r: [_f32(r, 2, 3, 7, 6)],
         lambda: torch.nn.AvgPool2d(3, 2, 1, count_include_pad=True)),
    Case("sequential_cnn",
         lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
                               nn.Linear(36, 5), nn.Tanh()),
         lambda r: [_f32(r, 2, 2, 6, 6)],
         lambda: torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
                                     torch.nn.Flatten(), torch.nn.Linear(36, 5), torch.nn.Tanh())),
]


# ----------------------------------------------------------------------------- harness


def _randomise(module, rng):
    """Weights of unit gain (std 1/sqrt(fan_in)), norm scales 1 + 0.1 N, biases 0.1 N."""
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            p.data = (rng.standard_normal(p.shape) / math.sqrt(math.prod(p.shape[1:]))).astype(np.float32)
        elif "norm" in type(_owner(module, name)).__name__.lower() and name.endswith("weight"):
            p.data = (1 + 0.1 * rng.standard_normal(p.shape)).astype(np.float32)
        else:
            p.data = (0.1 * rng.standard_normal(p.shape)).astype(np.float32)


def _owner(module, pname):
    for part in pname.split(".")[:-1]:
        module = getattr(module, part)
    return module


def _setup(case):
    """Our module (seeded, parameters randomised), the inputs and the cotangent."""
    rng = np.random.default_rng(case.seed)
    nn.manual_seed(case.seed)
    module = case.make()
    _randomise(module, rng)
    inputs = case.inputs(rng)
    y = case.call(module, *[Tensor(x) for x in inputs])
    ct = rng.standard_normal(y.shape).astype(np.float32)
    return module, inputs, ct


def _is_float(a):
    return np.asarray(a).dtype.kind == "f"


def _close(got, want, tol, what):
    got = np.asarray(got.data if isinstance(got, Tensor) else got)
    want = want.detach().numpy() if hasattr(want, "detach") else np.asarray(want)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    np.testing.assert_allclose(got, want, rtol=tol[0], atol=tol[1], err_msg=what)


def _torch_fn(case, module):
    """The torch reference as a function of torch inputs, and our-name -> torch leaf."""
    leaves = {n: torch.tensor(p.data, requires_grad=True) for n, p in module.named_parameters()}
    if case.torch_module is None:
        assert not leaves, f"{case.id}: a parameterised layer needs a torch module"
        return (lambda *xs: case.torch_call(None, *xs)), leaves
    tm = case.torch_module()
    tnames = [n for n, _ in tm.named_parameters()]
    pmap = case.param_map if case.param_map is not None else {n: (n,) for n in tnames}
    # every parameter of both modules is mapped: no gradient goes unchecked
    assert sorted(pmap) == sorted(tnames), (case.id, sorted(pmap), sorted(tnames))
    assert sorted(n for ns in pmap.values() for n in ns) == sorted(leaves), (case.id, pmap, sorted(leaves))
    tparams = {t: torch.cat([leaves[n] for n in ns]) if len(ns) > 1 else leaves[ns[0]] for t, ns in pmap.items()}

    with_ours = lambda *a, **k: torch.func.functional_call(tm, tparams, a, k)  # noqa: E731
    return (lambda *xs: case.torch_call(with_ours, *xs)), leaves


# ----------------------------------------------------------------------------- (a) eager vs torch


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_eager_forward_and_gradients_match_torch(case):
    module, inputs, ct = _setup(case)
    xs = [Tensor(x, requires_grad=_is_float(x)) for x in inputs]
    txs = [torch.tensor(x, requires_grad=_is_float(x)) for x in inputs]
    tfn, leaves = _torch_fn(case, module)

    y = case.call(module, *xs)
    ty = tfn(*txs)
    _close(y, ty, (RTOL, ATOL), f"{case.id}: forward")
    (y * Tensor(ct)).sum().backward()
    (ty * torch.from_numpy(ct)).sum().backward()

    for i, (x, tx) in enumerate(zip(xs, txs)):
        if tx.requires_grad:
            assert x.grad is not None, f"{case.id}: no gradient for input {i}"
            _close(x.grad, tx.grad, (RTOL, ATOL), f"{case.id}: d/d input {i}")
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{case.id}: no gradient for {name}"
        _close(p.grad, leaves[name].grad, (RTOL, ATOL), f"{case.id}: d/d {name}")


# ----------------------------------------------------------------------------- (b) compiled vs interpreter


def _llvm_vs_interpreter(graph, arrays, tol, what, names):
    want = interpret(graph, arrays)
    got = Program(graph)(*[np.require(a, requirements="C") for a in arrays])
    assert len(got) == len(want) == len(names), (what, len(got), len(want), names)
    for name, g, w in zip(names, got, want):
        _close(g, w, tol, f"{what}: {name}")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_compiled_forward_and_gradients_match_interpreter(case):
    module, inputs, ct = _setup(case)
    params = dict(module.named_parameters())

    def forward(*xs):
        return case.call(module, *xs)

    def loss(*xs_ct):
        *xs, c = xs_ct
        return (case.call(module, *xs) * c).sum()

    traced = trace_with_info(forward, *inputs, params=params)
    g = traced.graph
    arrays = [np.asarray(x) for x in inputs] + [np.asarray(traced.bindings[i.name].data)
                                                 for i in g.inputs[len(inputs):]]
    _llvm_vs_interpreter(g, arrays, (RTOL, ATOL), f"{case.id} forward", ["y"])

    traced = trace_with_info(loss, *inputs, ct, params=params)
    g = traced.graph
    wrt = [i.name for i in g.inputs if i.type.dtype in FLOAT_DTYPES]
    # every float argument, the cotangent and every parameter is differentiated
    assert len(wrt) == sum(map(_is_float, inputs)) + 1 + len(params), (case.id, wrt)
    dg = autodiff(g, wrt)
    arrays = [np.asarray(x) for x in inputs] + [ct] + [np.asarray(traced.bindings[i.name].data)
                                                      for i in g.inputs[len(inputs) + 1:]]
    _llvm_vs_interpreter(dg, arrays, (RTOL, ATOL), f"{case.id} backward", ["loss"] + wrt)


# ----------------------------------------------------------------------------- dropout's seed


def test_dropout_seed_is_a_runtime_input_of_the_compiled_program():
    """One compiled program: each seed's mask equals the interpreter's and eager's; another
    seed gives another mask; the dropped fraction is about p and kept values are x/(1-p)."""
    drop = nn.Dropout(P_DROP)
    x = np.random.default_rng(3).uniform(1, 2, (64, 64)).astype(np.float32)
    traced = trace_with_info(lambda x, seed: _dropout_train_call(drop, x, seed), x, np.array(0, np.int64))
    prog = Program(traced.graph)
    outs = []
    for seed in (1, 2):
        s = np.array(seed, np.int64)
        got = prog(x, s)[0]
        np.testing.assert_array_equal(got, interpret(traced.graph, [x, s])[0])
        np.testing.assert_array_equal(got, _dropout_train_call(drop, Tensor(x), Tensor(s)).data)
        dropped = got == 0
        assert abs(dropped.mean() - P_DROP) < 0.03, dropped.mean()
        np.testing.assert_allclose(got[~dropped], x[~dropped] / (1 - P_DROP), rtol=1e-6)
        outs.append(dropped)
    assert (outs[0] != outs[1]).mean() > 0.2  # the masks differ: the seed is not baked in
