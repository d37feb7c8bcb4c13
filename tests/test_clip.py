"""CLIP against Hugging Face's CLIPModel with the same random weights (loaded from the checkpoint
file HF writes), compiled against the interpreter, the contrastive loss, and training."""
import os

import numpy as np
import pytest

from neural_arch.compiler import Tensor, compile
from neural_arch.compiler.autodiff import autodiff
from neural_arch.compiler.trace import trace_with_info
from neural_arch.models import (CLIPConfig, CLIPModel, CLIPTextConfig, CLIPVisionConfig, clip_loss,
                                compile_train_step, nn, optim)
from neural_arch.runtime.interpreter import interpret
from neural_arch.runtime.program import Program

torch = pytest.importorskip("torch", reason="torch is the oracle for CLIP (test extra)")
transformers = pytest.importorskip("transformers", reason="transformers is the CLIP reference (test extra)")

EOS = 18
TEXT = dict(vocab_size=20, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
            max_position_embeddings=8, eos_token_id=EOS, bos_token_id=0, pad_token_id=1)
VISION = dict(image_size=8, patch_size=4, num_channels=2, hidden_size=12, intermediate_size=24, num_hidden_layers=2,
              num_attention_heads=3)


def configs(text=None, vision=None, projection_dim=10):
    text, vision = {**TEXT, **(text or {})}, {**VISION, **(vision or {})}
    ours = CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    theirs = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)
    return ours, theirs


def hf_model(hcfg):
    """Every parameter random (biases, LayerNorms and the logit scale too)."""
    torch.manual_seed(0)
    m = transformers.CLIPModel(hcfg)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        m.logit_scale.fill_(1.2)
    m.eval()
    return m


def checkpoint_of(hf, path):
    from safetensors.numpy import load_file
    hf.save_pretrained(path)
    return load_file(os.path.join(path, "model.safetensors"))


def loaded(cfg, hf, path):
    ours = CLIPModel(cfg)
    ours.load_state_dict(checkpoint_of(hf, path))
    return ours


def batch(b=3, seed=0, eos=EOS):
    """Token ids with the eos token at varying places (twice in one row: the first counts),
    a padding mask after it, and images."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(2, 17, (b, 7))
    mask = np.ones((b, 7), np.int64)
    for r, end in enumerate([4, 6, 2][:b]):
        ids[r, end] = eos
        mask[r, end + 1:] = 0
    if b > 2:
        ids[2, 5] = eos
    x = rng.standard_normal((b, VISION["num_channels"], 8, 8)).astype(np.float32)
    return ids, mask, x


def hf_outputs(hf, ids, mask, x):
    return hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(x), attention_mask=torch.tensor(mask),
              return_loss=True)


OUT_KEYS = ("image_embeds", "text_embeds", "logits_per_image", "logits_per_text", "loss")


def test_state_dict_names_and_shapes_match_hf_checkpoint(tmp_path):
    cfg, hcfg = configs()
    sd = checkpoint_of(hf_model(hcfg), tmp_path)
    assert {k: v.shape for k, v in CLIPModel(cfg).state_dict().items()} == {k: v.shape for k, v in sd.items()}
    names = set(sd)
    for n in ("text_model.encoder.layers.0.self_attn.q_proj.weight", "vision_model.embeddings.patch_embedding.weight",
              "vision_model.embeddings.class_embedding", "vision_model.pre_layrnorm.weight", "logit_scale",
              "visual_projection.weight", "text_projection.weight", "text_model.final_layer_norm.bias"):
        assert n in names
    assert "visual_projection.bias" not in names and "vision_model.embeddings.patch_embedding.bias" not in names


@pytest.mark.parametrize("eos,act", [(EOS, "quick_gelu"), (2, "gelu")])
def test_outputs_loss_and_gradients_match_hf(tmp_path, eos, act):
    """eos=18: pooled at the first eos token; eos=2 (the original OpenAI configs): at the largest id."""
    cfg, hcfg = configs(text=dict(eos_token_id=eos, hidden_act=act), vision=dict(hidden_act=act))
    hf = hf_model(hcfg)
    ours = loaded(cfg, hf, tmp_path)
    ids, mask, x = batch()
    if eos == 2:
        ids[:, 3] = 19  # the largest id marks the pooled position
    want = hf_outputs(hf, ids, mask, x)
    got = ours(Tensor(ids), Tensor(x), Tensor(mask), return_loss=True)
    for k in OUT_KEYS:
        err = np.abs(got[k].data - getattr(want, k).detach().numpy()).max()
        assert err < 5e-5, (k, err)
    want.loss.backward()
    got["loss"].backward()
    named = dict(ours.named_parameters())
    assert set(named) == {n for n, _ in hf.named_parameters()}
    for name, p in hf.named_parameters():
        np.testing.assert_allclose(named[name].grad.data, p.grad.numpy(), rtol=1e-4, atol=2e-5, err_msg=name)


def test_features_and_pooled_states_match_hf(tmp_path):
    cfg, hcfg = configs()
    hf = hf_model(hcfg)
    ours = loaded(cfg, hf, tmp_path)
    ids, mask, x = batch(seed=1)
    with torch.no_grad():
        tf = hf.get_text_features(torch.tensor(ids), torch.tensor(mask)).pooler_output.numpy()
        vf = hf.get_image_features(torch.tensor(x)).pooler_output.numpy()
        tout = hf.text_model(torch.tensor(ids))
    np.testing.assert_allclose(ours.get_text_features(ids, mask).data, tf, rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(ours.get_image_features(x).data, vf, rtol=1e-5, atol=2e-5)
    mine = ours.text_model(ids)  # no mask: causal attention alone (padding comes after the eos)
    np.testing.assert_allclose(mine["last_hidden_state"].data, tout.last_hidden_state.numpy(), rtol=1e-5, atol=2e-5)
    np.testing.assert_allclose(mine["pooler_output"].data, tout.pooler_output.numpy(), rtol=1e-5, atol=2e-5)


def test_left_padding_stays_finite_and_matches_hf(tmp_path):
    """Padding keys get the most negative finite float, as in HF: a left-padded position sees
    only padding and must not turn into NaN (which -inf would, poisoning every later position
    through its value vector); eager and compiled."""
    cfg, hcfg = configs()
    hf = hf_model(hcfg)
    ours = loaded(cfg, hf, tmp_path)
    ids = np.array([[1, 1, 5, 6, EOS, 7, 8], [3, 4, 5, 6, 7, EOS, 9], [1, 1, 1, 3, EOS, 2, 2]])
    mask = np.array([[0, 0, 1, 1, 1, 0, 0], [1] * 7, [0, 0, 0, 1, 1, 0, 0]])
    with torch.no_grad():
        want = hf.get_text_features(torch.tensor(ids), torch.tensor(mask)).pooler_output.numpy()
    got = ours.get_text_features(ids, mask).data
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-5)
    native = compile(lambda i, m: ours.get_text_features(i, m), ids, mask)
    np.testing.assert_allclose(native(ids, mask).data, want, rtol=1e-5, atol=2e-5)


def test_from_pretrained_reads_hf_model_directories_including_shards(tmp_path):
    cfg, hcfg = configs(text=dict(eos_token_id=2, hidden_act="gelu"))
    hf = hf_model(hcfg)
    hf.save_pretrained(tmp_path / "one")
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    ids, mask, x = batch(seed=8)
    ids[:, 3] = 19
    want = hf_outputs(hf, ids, mask, x)
    for sub in ("one", "sharded"):
        ours = CLIPModel.from_pretrained(str(tmp_path / sub))
        assert ours.config == cfg
        got = ours(ids, x, mask, return_loss=True)
        for k in OUT_KEYS:
            np.testing.assert_allclose(got[k].data, getattr(want, k).detach().numpy(), rtol=1e-5, atol=5e-5,
                                       err_msg=f"{sub}: {k}")


def test_clip_loss_is_the_symmetric_cross_entropy():
    logits = np.random.default_rng(2).standard_normal((5, 5)).astype(np.float32)
    t = torch.tensor(logits)
    target = torch.arange(5)
    want = (torch.nn.functional.cross_entropy(t, target) + torch.nn.functional.cross_entropy(t.T, target)) / 2
    assert abs(float(clip_loss(Tensor(logits)).item()) - float(want)) < 1e-6
    # a perfectly separated batch has (almost) no loss; swapping two texts costs a lot
    eye = np.eye(4, dtype=np.float32) * 30
    assert float(clip_loss(Tensor(eye)).item()) < 1e-10
    assert float(clip_loss(Tensor(eye[[1, 0, 2, 3]])).item()) > 10
    with pytest.raises(ValueError, match=r"square \(texts, images\) logit matrix, got \(2, 3\)"):
        clip_loss(Tensor(np.zeros((2, 3), np.float32)))


def test_checkpoints_with_position_id_buffers_load(tmp_path):
    cfg, hcfg = configs()
    sd = checkpoint_of(hf_model(hcfg), tmp_path)
    sd["text_model.embeddings.position_ids"] = np.arange(8)[None]
    sd["vision_model.embeddings.position_ids"] = np.arange(5)[None]
    ours = CLIPModel(cfg)
    ours.load_state_dict(sd)
    np.testing.assert_array_equal(ours.logit_scale.data, sd["logit_scale"])
    sd["text_projection.weight"] = sd["text_projection.weight"].T
    with pytest.raises(ValueError, match=r"text_projection\.weight: checkpoint \(16, 10\) vs model \(10, 16\)"):
        ours.load_state_dict(sd)


def _model(seed, **kw):
    cfg, _ = configs(**kw)
    nn.manual_seed(seed)
    return CLIPModel(cfg)


def test_compiled_forward_equals_interpreter_and_eager():
    model = _model(3)
    ids, mask, x = batch(seed=3)

    def fwd(i, px, m):
        o = model(i, px, m, return_loss=True)
        return tuple(o[k] for k in OUT_KEYS)
    native = compile(fwd, ids, x, mask)
    interp = compile(fwd, ids, x, mask, backend="interpreter")
    eager = fwd(Tensor(ids), Tensor(x), Tensor(mask))
    for k, a, b, c in zip(OUT_KEYS, native(ids, x, mask), interp(ids, x, mask), eager):
        np.testing.assert_allclose(a.data, b.data, rtol=1e-5, atol=1e-5, err_msg=k)
        np.testing.assert_allclose(a.data, c.data, rtol=1e-5, atol=1e-5, err_msg=k)


@pytest.mark.slow
def test_compiled_backward_equals_interpreter():
    """The contrastive loss and the gradient of every parameter (logit scale, class embedding,
    both towers, both projections): the compiled program == the interpreter == eager."""
    model = _model(4)
    ids, mask, x = batch(seed=4)

    def loss(i, px, m):
        return model(i, px, m, return_loss=True)["loss"]
    traced = trace_with_info(loss, ids, x, mask, params=dict(model.named_parameters()))
    g = traced.graph
    wrt = [i.name for i in g.inputs if i.kind == "param"]
    assert len(wrt) == len(model.parameters())
    dg = autodiff(g, wrt, with_value=True)
    inputs = [ids, x, mask] + [np.asarray(traced.bindings[i.name].data) for i in g.inputs[3:]]
    want = interpret(dg, inputs)
    got = Program(dg)(*[np.ascontiguousarray(a) for a in inputs])
    for name, a, b in zip(["loss"] + wrt, got, want):
        # float32 sums cancel: absolute error relative to the gradient's own scale
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * max(1e-2, float(np.abs(b).max())), err_msg=name)
    loss(Tensor(ids), Tensor(x), Tensor(mask)).backward()
    for p in (model.logit_scale, model.vision_model.embeddings.class_embedding, model.text_projection.weight):
        k = wrt.index(next(i.name for i in g.inputs if traced.bindings[i.name] is p))
        # (as above: how a float32 sum rounds depends on how LLVM compiles it, e.g. whether
        # a kernel's body is inlined into its only caller and its loop bounds known)
        np.testing.assert_allclose(got[1 + k], p.grad.data, rtol=1e-4,
                                   atol=1e-5 * max(1e-2, float(np.abs(p.grad.data).max())))


@pytest.mark.slow
def test_compiled_train_step_equals_interpreted_and_learns():
    ids, mask, x = batch(4, seed=5)
    ids[3, 1] = EOS
    losses = {}
    for backend in ("llvm", "interpreter"):
        model = _model(5)
        opt = optim.AdamW(model.parameters(), lr=1e-2)
        step = compile_train_step(model, lambda m, i, px: m(i, px, return_loss=True)["loss"], opt, ids, x,
                                  clip_norm=1.0, backend=backend)
        losses[backend] = [step(ids, x) for _ in range(15)]
    np.testing.assert_allclose(losses["llvm"], losses["interpreter"], rtol=2e-4, atol=2e-5)
    assert losses["llvm"][-1] < 0.5 * losses["llvm"][0], losses["llvm"]


def test_bad_inputs_and_configs_are_refused():
    model = _model(6)
    ids, mask, x = batch()
    with pytest.raises(ValueError, match="sequence length 9 exceeds max_position_embeddings 8"):
        model.get_text_features(np.zeros((1, 9), np.int64))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(3, 6\), expected \(3, 7\)"):
        model(ids, x, mask[:, :6])
    with pytest.raises(ValueError, match=r"pixel_values must be \(batch, 2, 8, 8\), got shape \(3, 1, 8, 8\)"):
        model(ids, x[:, :1])
    with pytest.raises(ValueError, match=r"square \(texts, images\) logit matrix, got \(3, 2\)"):
        model(ids, x[:2], return_loss=True)
    with pytest.raises(ValueError, match=r"unknown text_config fields \['hidden'\]"):
        CLIPConfig(text_config=dict(hidden=3))
    with pytest.raises(ValueError, match="not divisible"):
        CLIPVisionConfig(hidden_size=10, num_attention_heads=3)
    with pytest.raises(ValueError, match="unknown hidden_act"):
        CLIPTextConfig(hidden_act="gelu2")


# ----------------------------------------------------------------------------- the demo


def test_word_tokenizer():
    from neural_arch.tools.train_clip import WordTokenizer, all_captions
    tok = WordTokenizer.for_texts(all_captions())
    ids = tok.encode(["a handwritten seven", "seven"])
    assert ids.shape == (2, tok.length) and ids[0, 0] == tok.SOS
    assert ids[0, 4] == tok.eos == tok.vocab_size - 1 and ids[1, 2] == tok.eos and ids[1, 3] == tok.PAD
    assert tok.decode(ids[0]) == "a handwritten seven"
    with pytest.raises(ValueError, match=r"unknown words \['eleven'\]"):
        tok.encode(["a handwritten eleven"])


@pytest.mark.slow
def test_digits_demo_loop_learns_zero_shot_at_reduced_size():
    """`narch train clip`'s loop on the real digits, shortened: zero-shot accuracy from the
    text prompts alone far above chance (10%)."""
    pytest.importorskip("sklearn", reason="the digits ship with scikit-learn (a main dependency)")
    import argparse
    from neural_arch.tools import train_clip
    p = argparse.ArgumentParser()
    train_clip.add_arguments(p)
    args = p.parse_args(["--steps", "300", "--hidden", "32", "--vision-layers", "2", "--text-layers", "1",
                         "--heads", "2", "--eval-every", "300", "--lr", "3e-3", "--no-progress"])
    res = train_clip.train(args, log=lambda *_: None)
    assert res["history"]["loss"][-1] < 0.8 * res["history"]["loss"][0]
    assert res["zero_shot"] > 0.6, res["zero_shot"]


@pytest.mark.slow
def test_narch_train_clip_writes_similarity_plot_and_checkpoint(tmp_path, capsys):
    pytest.importorskip("sklearn", reason="the digits ship with scikit-learn (a main dependency)")
    from neural_arch.tools.cli import main
    out = tmp_path / "run"
    code = main(["train", "clip", "--steps", "20", "--hidden", "32", "--vision-layers", "2", "--text-layers", "1",
                 "--heads", "2", "--no-progress", "--out", str(out)])
    text = capsys.readouterr().out
    assert "zero-shot accuracy per caption template: 'a handwritten …'" in text
    acc = float(text.split("alone: ")[1].split("%")[0]) / 100
    assert code == (0 if acc >= 0.8 else 1)
    assert (out / "zero_shot.png").stat().st_size > 10_000 and (out / "clip.safetensors").stat().st_size > 10_000


def test_narch_train_clip_and_bert_refuse_unusable_options(capsys):
    """--eval-every 0 and --batch 0 were accepted (a division by zero, NaN losses); BERT's
    --mask-prob 0 chose one position per row whatever it said."""
    from neural_arch.tools.cli import main
    assert main(["train", "clip", "--eval-every", "0", "--batch", "0", "--projection-dim", "0"]) == 1
    assert capsys.readouterr().err.strip() == (
        "narch train: ValueError: --batch must be at least 1, got 0; --projection-dim must be at least 1, got 0; "
        "--eval-every must be at least 1, got 0")
    assert main(["train", "bert", "--mask-prob", "0", "--block", "0", "--seed", "-1"]) == 1
    assert capsys.readouterr().err.strip() == (
        "narch train: ValueError: --block must be at least 1, got 0; --mask-prob must lie in (0, 1], got 0.0; "
        "--seed must be 0 or positive, got -1")
