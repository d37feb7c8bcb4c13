"""ViT against Hugging Face's ViTModel / ViTForImageClassification with the same random weights
(loaded from the checkpoint file HF writes), compiled against the interpreter, and training."""
import os
import re

import numpy as np
import pytest

from neural_arch.compiler import Tensor, compile
from neural_arch.compiler.autodiff import autodiff
from neural_arch.compiler.trace import trace_with_info
from neural_arch.models import ViTConfig, ViTForImageClassification, ViTModel, compile_train_step, nn, optim
from neural_arch.models.vit import patch_conv
from neural_arch.runtime.interpreter import interpret
from neural_arch.runtime.program import Program

torch = pytest.importorskip("torch", reason="torch is the oracle for ViT (test extra)")
transformers = pytest.importorskip("transformers", reason="transformers is the ViT reference (test extra)")

CFG = ViTConfig(image_size=8, patch_size=4, num_channels=2, num_classes=5, hidden_size=16, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=24)


def hf_config(**kw):
    return transformers.ViTConfig(image_size=CFG.image_size, patch_size=CFG.patch_size, num_channels=CFG.num_channels,
                                  num_labels=CFG.num_classes, hidden_size=CFG.hidden_size,
                                  num_hidden_layers=CFG.num_hidden_layers, num_attention_heads=CFG.num_attention_heads,
                                  intermediate_size=CFG.intermediate_size, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0, **kw)


def hf_model(cls, **kw):
    """An HF model with every parameter random (biases and LayerNorms too, so a swapped name
    cannot pass by coincidence)."""
    torch.manual_seed(0)
    m = cls(hf_config(**kw))
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    m.eval()
    return m


def checkpoint_of(hf, tmp_path):
    """The tensors of the checkpoint file HF writes (its canonical names, whatever names its
    modules use in memory)."""
    from safetensors.numpy import load_file
    hf.save_pretrained(tmp_path)
    return load_file(os.path.join(tmp_path, "model.safetensors"))


# transformers >= 5 keeps q/k/v/o and fc1/fc2 modules in memory and renames on save/load
_RENAMES = [(r"\blayers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
            (r"\blayers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
            (r"\blayers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
            (r"\blayers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
            (r"\blayers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
            (r"\blayers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
            (r"\blayers\.(\d+)\.", r"encoder.layer.\1.")]


def checkpoint_name(hf_name):
    for pat, rep in _RENAMES:
        new = re.sub(pat, rep, hf_name)
        if new != hf_name:
            return new
    return hf_name


def loaded(cls, hf, tmp_path, cfg=CFG):
    sd = checkpoint_of(hf, tmp_path)
    hf_named = dict(hf.named_parameters())
    assert {checkpoint_name(n) for n in hf_named} == set(sd)  # the name map below is complete and right
    for n, p in hf_named.items():
        np.testing.assert_array_equal(sd[checkpoint_name(n)], p.detach().numpy(), err_msg=n)
    ours = cls(cfg)
    ours.load_state_dict(sd)
    return ours


def pixels(b=3, seed=0):
    return np.random.default_rng(seed).standard_normal((b, CFG.num_channels, CFG.image_size, CFG.image_size)) \
        .astype(np.float32)


def test_state_dict_names_shapes_and_conv_layout_match_hf_checkpoints(tmp_path):
    for ours_cls, hf_cls, sub in ((ViTForImageClassification, transformers.ViTForImageClassification, "a"),
                                  (ViTModel, transformers.ViTModel, "b")):
        sd = checkpoint_of(hf_model(hf_cls), tmp_path / sub)
        mine = {k: v.shape for k, v in ours_cls(CFG).state_dict().items()}
        assert mine == {k: v.shape for k, v in sd.items()}
    names = set(ViTForImageClassification(CFG).state_dict())
    for n in ("vit.embeddings.cls_token", "vit.embeddings.position_embeddings",
              "vit.embeddings.patch_embeddings.projection.weight", "vit.encoder.layer.0.attention.attention.query.weight",
              "vit.encoder.layer.1.layernorm_before.weight", "vit.layernorm.weight", "classifier.weight"):
        assert n in names
    assert ViTModel(CFG).embeddings.patch_embeddings.projection.weight.shape == (16, 2, 4, 4)  # Conv2d OIHW


def test_logits_loss_and_gradients_match_hf(tmp_path):
    hf = hf_model(transformers.ViTForImageClassification)
    ours = loaded(ViTForImageClassification, hf, tmp_path)
    x, y = pixels(), np.array([0, 3, 4])
    out = hf(torch.tensor(x), labels=torch.tensor(y))
    logits, loss = ours(Tensor(x), Tensor(y))
    err = np.abs(logits.data - out.logits.detach().numpy()).max()
    assert err < 2e-5, err
    assert abs(float(loss.item()) - float(out.loss.detach())) < 2e-5
    out.loss.backward()
    loss.backward()
    named = dict(ours.named_parameters())
    assert len(named) == len(list(hf.parameters()))
    for name, p in hf.named_parameters():
        g = named[checkpoint_name(name)].grad.data
        np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)


def test_vit_model_hidden_states_and_pooler_match_hf(tmp_path):
    hf = hf_model(transformers.ViTModel)
    ours = loaded(ViTModel, hf, tmp_path)
    x = pixels(2, seed=1)
    want = hf(torch.tensor(x))
    got = ours(x)
    np.testing.assert_allclose(got["last_hidden_state"].data, want.last_hidden_state.detach().numpy(), rtol=1e-5,
                               atol=2e-5)
    np.testing.assert_allclose(got["pooler_output"].data, want.pooler_output.detach().numpy(), rtol=1e-5, atol=2e-5)
    assert ViTModel(CFG, add_pooling_layer=False)(x)["pooler_output"] is None


@pytest.mark.parametrize("act", ["gelu_new", "quick_gelu", "relu"])
def test_other_activations_match_hf(tmp_path, act):
    hf = hf_model(transformers.ViTForImageClassification, hidden_act=act)
    ours = loaded(ViTForImageClassification, hf, tmp_path, ViTConfig(**{**vars(CFG), "hidden_act": act}))
    x = pixels(2, seed=2)
    np.testing.assert_allclose(ours(x).data, hf(torch.tensor(x)).logits.detach().numpy(), rtol=1e-5, atol=2e-5)


def test_patch_embedding_equals_strided_conv2d():
    """The reshape + matmul patch embedding gives the im2col Conv2d's numbers and gradients;
    images the patches do not tile run the Conv2d itself (torch drops the remainder too)."""
    nn.manual_seed(3)
    conv = nn.Conv2d(3, 5, 4, stride=4)
    x = np.random.default_rng(4).standard_normal((2, 3, 8, 12)).astype(np.float32)
    xs = Tensor(x, requires_grad=True)
    y = patch_conv(conv, xs)
    ref = conv(Tensor(x)).reshape(2, 5, 6).transpose(0, 2, 1)
    np.testing.assert_allclose(y.data, ref.data, rtol=1e-5, atol=1e-6)
    (y * y).sum().backward()
    wg = conv.weight.grad.data
    conv.zero_grad()
    xr = Tensor(x, requires_grad=True)
    (conv(xr) ** 2).sum().backward()
    np.testing.assert_allclose(wg, conv.weight.grad.data, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(xs.grad.data, xr.grad.data, rtol=1e-4, atol=1e-5)
    odd = np.random.default_rng(5).standard_normal((1, 3, 9, 10)).astype(np.float32)
    tc = torch.nn.Conv2d(3, 5, 4, stride=4)
    with torch.no_grad():
        tc.weight.copy_(torch.tensor(conv.weight.data)), tc.bias.copy_(torch.tensor(conv.bias.data))
    want = tc(torch.tensor(odd)).flatten(2).transpose(1, 2).detach().numpy()
    np.testing.assert_allclose(patch_conv(conv, Tensor(odd)).data, want, rtol=1e-5, atol=1e-5)


def test_compiled_forward_equals_interpreter_and_eager():
    nn.manual_seed(4)
    model = ViTForImageClassification(CFG)
    model.eval()
    x = pixels(4, seed=3)
    native = compile(lambda px: model(px), x)
    interp = compile(lambda px: model(px), x, backend="interpreter")
    eager = model(x).data
    np.testing.assert_allclose(native(x).data, interp(x).data, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(native(x).data, eager, rtol=1e-5, atol=1e-5)


def test_compiled_backward_equals_interpreter():
    """Loss and the gradient of every parameter: the compiled program == the interpreter."""
    nn.manual_seed(5)
    model = ViTForImageClassification(CFG)
    x, y = pixels(4, seed=4), np.array([1, 0, 4, 2])

    def loss(px, labels):
        return model(px, labels)[1]
    traced = trace_with_info(loss, x, y, params=dict(model.named_parameters()))
    g = traced.graph
    wrt = [i.name for i in g.inputs if i.kind == "param"]
    assert len(wrt) == len(model.parameters())
    dg = autodiff(g, wrt, with_value=True)
    inputs = [x, y] + [np.asarray(traced.bindings[i.name].data) for i in g.inputs[2:]]
    want = interpret(dg, inputs)
    got = Program(dg)(*[np.ascontiguousarray(a) for a in inputs])
    for name, a, b in zip(["loss"] + wrt, got, want):
        # float32 sums cancel: absolute error relative to the gradient's own scale
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1e-2, float(np.abs(b).max())), err_msg=name)
    out = model(Tensor(x), Tensor(y))[1]
    out.backward()
    cls = model.vit.embeddings.cls_token
    k = wrt.index(next(i.name for i in g.inputs if traced.bindings[i.name] is cls))
    np.testing.assert_allclose(got[1 + k], cls.grad.data, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_compiled_train_step_equals_interpreted_and_learns():
    """A fixed batch: the compiled step and the interpreted step give the same losses (with
    dropout drawn from the step seed), and the loss falls."""
    cfg = ViTConfig(**{**vars(CFG), "hidden_dropout_prob": 0.1})
    x, y = pixels(8, seed=6), np.arange(8) % cfg.num_classes
    losses = {}
    for backend in ("llvm", "interpreter"):
        nn.manual_seed(6)
        model = ViTForImageClassification(cfg)
        opt = optim.AdamW(model.parameters(), lr=1e-2)
        step = compile_train_step(model, lambda m, a, b: m(a, b)[1], opt, x, y, clip_norm=1.0, backend=backend)
        losses[backend] = [step(x, y) for _ in range(15)]
    np.testing.assert_allclose(losses["llvm"], losses["interpreter"], rtol=2e-4, atol=2e-5)
    assert losses["llvm"][-1] < 0.5 * losses["llvm"][0], losses["llvm"]


def test_bad_inputs_and_configs_are_refused():
    model = ViTForImageClassification(CFG)
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 2, 8, 8\), got shape \(1, 2, 8, 9\)"):
        model(np.zeros((1, 2, 8, 9), np.float32))
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 2, 8, 8\), got shape \(1, 3, 8, 8\)"):
        model(np.zeros((1, 3, 8, 8), np.float32))
    with pytest.raises(ValueError, match="not divisible"):
        ViTConfig(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ValueError, match="unknown hidden_act 'swish2'"):
        ViTConfig(hidden_act="swish2")
    assert ViTConfig(hidden_size=32, num_attention_heads=4, mlp_ratio=3.0).intermediate_size == 96
    sd = model.state_dict()
    sd["vit.embeddings.patch_embeddings.projection.weight"] = np.zeros((16, 4, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"projection\.weight: checkpoint \(16, 4, 2, 2\) vs model \(16, 2, 4, 4\)"):
        model.load_state_dict(sd)


# ----------------------------------------------------------------------------- the demo's loop


@pytest.mark.slow
def test_digits_demo_loop_learns_at_reduced_size():
    """`narch train vit`'s training loop on the real digits, shortened: accuracy far above chance."""
    pytest.importorskip("sklearn", reason="the digits ship with scikit-learn (a main dependency)")
    import argparse
    from neural_arch.tools import train_vit
    p = argparse.ArgumentParser()
    train_vit.add_arguments(p)
    args = p.parse_args(["--steps", "800", "--hidden", "32", "--layers", "2", "--heads", "2", "--eval-every", "800",
                         "--lr", "5e-3",
                         "--no-progress", "--dropout", "0"])
    res = train_vit.train(args, log=lambda *_: None)
    assert res["history"]["loss"][-1] < 0.6 * res["history"]["loss"][0]
    assert res["accuracy"] > 0.8, res["accuracy"]  # chance is ~10%
    assert res["confusion"].sum() == 359 and np.trace(res["confusion"]) == round(res["accuracy"] * 359)


@pytest.mark.slow
def test_narch_train_vit_writes_confusion_matrix_and_checkpoint(tmp_path, capsys):
    """The command end to end (a few steps): the exit status says whether 95% was reached;
    --time-limit 0 means no limit (it used to stop after the first step)."""
    pytest.importorskip("sklearn", reason="the digits ship with scikit-learn (a main dependency)")
    from neural_arch.models import checkpoint
    from neural_arch.tools.cli import main
    out = tmp_path / "run"
    with pytest.raises(SystemExit):
        main(["train", "vit", "--time-limit", "-1", "--out", str(out)])
    assert "--time-limit: must be 0 (no limit) or positive, got -1" in capsys.readouterr().err
    code = main(["train", "vit", "--steps", "20", "--hidden", "32", "--layers", "2", "--heads", "2",
                 "--no-progress", "--time-limit", "0", "--out", str(out)])
    text = capsys.readouterr().out
    assert code == 1 and "target 95%: NOT reached" in text  # 20 steps are far too few
    assert (out / "confusion.png").stat().st_size > 10_000
    model = ViTForImageClassification(ViTConfig(image_size=8, patch_size=4, num_channels=1, num_classes=10,
                                                hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                mlp_ratio=2.0, layer_norm_eps=1e-6))
    meta = checkpoint.load(str(out / "vit.safetensors"), model)
    assert meta["step"] == 20 and len(meta["extra"]["history"]["loss"]) == 20


def test_narch_train_vit_refuses_unusable_options_and_runs_one_step(tmp_path, capsys):
    """--batch 0 trained on NaN losses, --test-fraction 1.5 ran, and --steps 1 (or 0) failed
    inside the schedule ("WarmupCosine: total (1) must exceed warmup (1)")."""
    pytest.importorskip("sklearn", reason="the digits ship with scikit-learn (a main dependency)")
    from neural_arch.tools.cli import main
    out = tmp_path / "run"
    assert main(["train", "vit", "--steps", "0", "--batch", "0", "--test-fraction", "1.5", "--dropout", "1",
                 "--out", str(out)]) == 1
    assert capsys.readouterr().err.strip() == (
        "narch train: ValueError: --steps must be at least 1, got 0; --batch must be at least 1, got 0; "
        "--test-fraction must lie in (0, 1), got 1.5; --dropout must lie in [0, 1), got 1.0")
    assert not out.exists()
    assert main(["train", "vit", "--steps", "1", "--hidden", "16", "--layers", "1", "--heads", "2",
                 "--no-progress", "--out", str(out)]) == 1
    assert "after 1 steps (target 95%: NOT reached)" in capsys.readouterr().out
    assert (out / "vit.safetensors").exists()


def test_from_pretrained_reads_hf_model_directories(tmp_path):
    """config.json + model.safetensors as save_pretrained writes them, for both heads."""
    hf = hf_model(transformers.ViTForImageClassification, hidden_act="gelu_new")
    hf.save_pretrained(tmp_path / "cls")
    ours = ViTForImageClassification.from_pretrained(str(tmp_path / "cls"))
    assert ours.config.num_classes == CFG.num_classes and ours.config.hidden_act == "gelu_new"
    assert ours.config.layer_norm_eps == 1e-12 and ours.config.intermediate_size == CFG.intermediate_size
    x = pixels(2, seed=7)
    np.testing.assert_allclose(ours(x).data, hf(torch.tensor(x)).logits.detach().numpy(), rtol=1e-5, atol=2e-5)
    base = hf_model(transformers.ViTModel)
    base.save_pretrained(tmp_path / "base")
    mine = ViTModel.from_pretrained(str(tmp_path / "base"))
    assert mine.pooler is not None
    np.testing.assert_allclose(mine(x)["pooler_output"].data, base(torch.tensor(x)).pooler_output.detach().numpy(),
                               rtol=1e-5, atol=2e-5)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ViTModel.from_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="only a tanh pooler"):
        ViTConfig.from_hf_config({"hidden_size": 16, "num_attention_heads": 4, "pooler_act": "relu"})
