"""BERT against Hugging Face's BertModel / BertForMaskedLM / BertForSequenceClassification
with the same random weights; compiled vs interpreter, forward and backward; a compiled
training run whose loss falls."""
import numpy as np
import pytest

from neural_arch.compiler import Tensor, compile
from neural_arch.compiler.autodiff import autodiff
from neural_arch.compiler.trace import trace_with_info
from neural_arch.models import (BERTConfig, BERTForMaskedLM, BERTForSequenceClassification, BERTModel,
                                compile_train_step, nn, optim)
from neural_arch.runtime.interpreter import interpret
from neural_arch.runtime.program import Program

torch = pytest.importorskip("torch", reason="torch is the oracle for BERT (test extra)")
transformers = pytest.importorskip("transformers", reason="transformers is the BERT reference (test extra)")

KW = dict(vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
          max_position_embeddings=24, type_vocab_size=2, layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
          attention_probs_dropout_prob=0.0)
CFG = BERTConfig(**KW, num_labels=3)
HF_CFG = dict(KW, num_labels=3)


def hf(cls):
    torch.manual_seed(0)
    m = cls(transformers.BertConfig(**HF_CFG))
    m.eval()
    return m


def loaded(ours_cls, theirs):
    ours = ours_cls(CFG)
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    return ours


def batch(b=3, t=10, seed=0):
    """ids, token types and a mask with padding (row 1 pads 4 tokens, row 2 pads 7)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, CFG.vocab_size, (b, t))
    types = rng.integers(0, 2, (b, t))
    mask = np.ones((b, t), np.int64)
    mask[1, t - 4:] = 0
    mask[2, 3:] = 0
    ids[mask == 0] = 0
    return ids, types, mask


def T(*xs):
    return [torch.tensor(x) for x in xs]


def test_state_dict_names_shapes_and_tying_match_hf():
    for theirs_cls, ours_cls in [(transformers.BertModel, BERTModel), (transformers.BertForMaskedLM, BERTForMaskedLM),
                                 (transformers.BertForSequenceClassification, BERTForSequenceClassification)]:
        theirs = {k: tuple(v.shape) for k, v in hf(theirs_cls).state_dict().items()}
        ours = ours_cls(CFG)
        assert {k: v.shape for k, v in ours.state_dict().items()} == theirs, theirs_cls.__name__
    mlm = BERTForMaskedLM(CFG)
    assert mlm.cls.predictions.decoder.weight is mlm.bert.embeddings.word_embeddings.weight
    assert mlm.cls.predictions.decoder.bias is mlm.cls.predictions.bias
    # the tied decoder weight and bias are one parameter each, as in torch
    assert len(mlm.parameters()) == len(list(hf(transformers.BertForMaskedLM).parameters()))


def test_hidden_states_and_pooler_match_hf_with_padding():
    theirs = hf(transformers.BertModel)
    ours = loaded(BERTModel, theirs)
    ids, types, mask = batch()
    want = theirs(*T(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    got = ours(Tensor(ids), Tensor(types), Tensor(mask))
    h, p = got["last_hidden_state"].data, got["pooler_output"].data
    np.testing.assert_allclose(h, want.last_hidden_state.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p, want.pooler_output.detach().numpy(), rtol=1e-5, atol=1e-5)
    # defaults: no token types (all 0), no mask (attend everywhere)
    want = theirs(torch.tensor(ids))
    got = ours(ids)
    np.testing.assert_allclose(got["last_hidden_state"].data, want.last_hidden_state.detach().numpy(),
                               rtol=1e-5, atol=1e-5)


def test_padding_does_not_change_the_real_tokens():
    nn.manual_seed(1)
    model = BERTModel(CFG)
    ids, types, mask = batch()
    full = model(ids, types, mask)["last_hidden_state"].data
    short = model(ids[1:2, :6], types[1:2, :6])["last_hidden_state"].data
    np.testing.assert_allclose(full[1:2, :6], short, rtol=1e-5, atol=1e-5)
    # what sits in the padded positions does not matter either
    ids2 = ids.copy()
    ids2[mask == 0] = 7
    other = model(ids2, types, mask)["last_hidden_state"].data
    np.testing.assert_allclose(other[mask == 1], full[mask == 1], rtol=1e-5, atol=1e-5)


def test_masked_lm_loss_and_gradients_match_hf():
    theirs = hf(transformers.BertForMaskedLM)
    ours = loaded(BERTForMaskedLM, theirs)
    ids, types, mask = batch()
    ids[0, 2] = ids[1, 5] = 0  # the pad id at attended positions: its row gets no gradient from the lookup
    labels = np.full(ids.shape, -100)
    pick = (np.random.default_rng(3).random(ids.shape) < 0.4) & (mask == 1)
    pick[0, 0] = True
    labels[pick] = np.random.default_rng(4).integers(0, CFG.vocab_size, pick.sum())
    want = theirs(*T(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types),
                  labels=torch.tensor(labels))
    got = ours(Tensor(ids), Tensor(types), Tensor(mask), labels=Tensor(labels))
    np.testing.assert_allclose(got["logits"].data, want.logits.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert abs(float(got["loss"].item()) - want.loss.item()) < 1e-5
    want.loss.backward()
    got["loss"].backward()
    named = dict(ours.named_parameters())
    checked = 0
    for name, p in theirs.named_parameters():
        np.testing.assert_allclose(named[name].grad.data, p.grad.numpy(), rtol=1e-3, atol=1e-6, err_msg=name)
        checked += 1
    assert checked == len(named)


def test_sequence_classification_logits_loss_and_gradients_match_hf():
    theirs = hf(transformers.BertForSequenceClassification)
    ours = loaded(BERTForSequenceClassification, theirs)
    ids, types, mask = batch()
    labels = np.array([2, 0, 1])
    want = theirs(*T(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types),
                  labels=torch.tensor(labels))
    got = ours(Tensor(ids), Tensor(types), Tensor(mask), labels=Tensor(labels))
    np.testing.assert_allclose(got["logits"].data, want.logits.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert abs(float(got["loss"].item()) - want.loss.item()) < 1e-6
    want.loss.backward()
    got["loss"].backward()
    named = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        np.testing.assert_allclose(named[name].grad.data, p.grad.numpy(), rtol=1e-3, atol=1e-6, err_msg=name)


def test_regression_head_matches_hf_mse():
    """num_labels == 1: HF's regression problem type, MSE against float labels."""
    torch.manual_seed(1)
    theirs = transformers.BertForSequenceClassification(transformers.BertConfig(**dict(HF_CFG, num_labels=1))).eval()
    ours = BERTForSequenceClassification(BERTConfig(**KW, num_labels=1))
    ours.load_state_dict({k: v.detach().numpy() for k, v in theirs.state_dict().items()})
    ids, types, mask = batch()
    y = np.array([0.5, -1.0, 2.0], np.float32)
    want = theirs(*T(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types), labels=torch.tensor(y))
    got = ours(ids, types, mask, labels=y)
    assert got["logits"].shape == (3, 1)
    assert abs(float(got["loss"].item()) - want.loss.item()) < 1e-5


def test_config_from_an_hf_config_json_keeps_the_label_count(tmp_path):
    """HF's config.json stores the labels as id2label, not num_labels: from_dict gave 2 labels
    for a 3-label checkpoint, which then did not load."""
    import json
    from safetensors.numpy import load_file
    theirs = hf(transformers.BertForSequenceClassification)
    theirs.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "num_labels" not in config and len(config["id2label"]) == 3
    cfg = BERTConfig.from_dict(config)
    assert cfg.num_labels == 3 and BERTConfig.from_dict({**config, "num_labels": 5}).num_labels == 5
    ours = BERTForSequenceClassification(cfg)
    ours.load_state_dict(load_file(str(tmp_path / "model.safetensors")))
    ids, types, mask = batch()
    want = theirs(*T(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)).logits
    np.testing.assert_allclose(ours(ids, types, mask)["logits"].data, want.detach().numpy(), rtol=1e-5, atol=1e-6)


def test_multi_label_classification_is_refused_rather_than_given_another_loss():
    """transformers trains float labels (or problem_type multi_label_classification) with
    binary cross-entropy; ours has no such loss and said nothing."""
    cfg = BERTConfig(vocab_size=30, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=16, num_labels=3)
    with pytest.raises(ValueError, match="problem_type 'multi_label_classification' is not supported"):
        BERTConfig.from_dict({"problem_type": "multi_label_classification", "num_labels": 3})
    assert BERTConfig.from_dict({"problem_type": "single_label_classification", "num_labels": 3}).num_labels == 3
    model = BERTForSequenceClassification(cfg)
    ids = np.array([[1, 2, 3, 4]])
    with pytest.raises(TypeError, match="labels must be integer classes for 3 labels"):
        model(ids, labels=np.array([[0.0, 1.0, 1.0]], np.float32))
    assert np.isfinite(model(ids, labels=np.array([2]))["loss"].item())


def test_mlm_masking_follows_80_10_10():
    from neural_arch.tools.train_bert import mask_tokens
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 50, (400, 64))
    inputs, labels = mask_tokens(ids, rng, vocab_size=51, mask_id=50, prob=0.15, n_random=50)
    chosen = labels != -100
    assert chosen.any(axis=1).all()  # every row has a target
    np.testing.assert_array_equal(labels[chosen], ids[chosen])
    assert (inputs[~chosen] == ids[~chosen]).all()
    assert abs(chosen.mean() - 0.15) < 0.01
    masked = (inputs == 50)[chosen].mean()
    kept = (inputs == ids)[chosen].mean()  # 10% kept + random draws that hit the same token (10% / 50)
    assert abs(masked - 0.8) < 0.02 and abs(kept - (0.1 + 0.1 / 50)) < 0.015
    assert (inputs[chosen & (inputs != 50)] < 50).all()  # random replacements are real tokens, never [MASK]


def test_loading_hf_checkpoint_layouts_and_clear_errors():
    theirs = hf(transformers.BertForMaskedLM)
    sd = {k: v.detach().numpy() for k, v in theirs.state_dict().items()}
    # saved checkpoints drop the tied decoder; old ones carry a position_ids buffer
    slim = {k: v for k, v in sd.items() if not k.startswith("cls.predictions.decoder.")}
    slim["bert.embeddings.position_ids"] = np.arange(CFG.max_position_embeddings)[None]
    ours = BERTForMaskedLM(CFG)
    ours.load_state_dict(slim)
    np.testing.assert_array_equal(ours.cls.predictions.decoder.weight.data, sd["bert.embeddings.word_embeddings.weight"])
    np.testing.assert_array_equal(ours.cls.predictions.decoder.bias.data, sd["cls.predictions.bias"])
    # the encoder of a task model loads into a BertModel (its head is unexpected, the pooler missing)
    base = BERTModel(CFG, add_pooling_layer=False)
    base.load_state_dict({k: v for k, v in sd.items() if k.startswith("bert.")})
    np.testing.assert_array_equal(base.encoder.layer[1].output.dense.weight.data,
                                  sd["bert.encoder.layer.1.output.dense.weight"])
    with pytest.raises(ValueError, match=r"unexpected keys: cls\.predictions\.bias"):
        base.load_state_dict(sd)
    # a transposed weight names the key and both shapes
    bad = dict(sd)
    bad["bert.encoder.layer.0.intermediate.dense.weight"] = sd["bert.encoder.layer.0.intermediate.dense.weight"].T
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.intermediate\.dense\.weight: "
                                         r"checkpoint \(32, 64\) vs model \(64, 32\)"):
        BERTForMaskedLM(CFG).load_state_dict(bad)


def test_checkpoint_files_written_by_hf_load(tmp_path):
    """save_pretrained's safetensors file (tied decoder omitted) loads with the safetensors library."""
    from safetensors.numpy import load_file
    theirs = hf(transformers.BertForMaskedLM)
    theirs.save_pretrained(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    assert "bert.embeddings.word_embeddings.weight" in state
    ours = BERTForMaskedLM(CFG)
    ours.load_state_dict(state)
    ids, types, mask = batch()
    want = theirs(*T(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types)).logits
    got = ours(ids, types, mask)["logits"].data
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-5, atol=1e-5)
    base = BERTModel(CFG, add_pooling_layer=False)  # the encoder of the same file, by its prefix
    report = base.load_state_dict(state, strict=False)
    assert report["missing"] == [] and set(report["unexpected"]) == {k for k in state if k.startswith("cls.")}
    np.testing.assert_array_equal(base.embeddings.word_embeddings.weight.data,
                                  state["bert.embeddings.word_embeddings.weight"])


def test_bad_inputs_are_refused():
    model = BERTModel(CFG)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 24"):
        model(np.zeros((1, 25), np.int64))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\), expected"):
        model(np.zeros((2, 5), np.int64), attention_mask=np.ones((2, 4), np.int64))
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq\)"):
        model(np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="not divisible"):
        BERTConfig(hidden_size=30, num_attention_heads=4)


def test_compiled_forward_equals_interpreter_and_hf():
    theirs = hf(transformers.BertModel)
    ours = loaded(BERTModel, theirs)
    ids, types, mask = batch()
    native = compile(ours.encode, ids, types, mask)
    interp = compile(ours.encode, ids, types, mask, backend="interpreter")
    (h, p), (hi, pi) = native(ids, types, mask), interp(ids, types, mask)
    np.testing.assert_allclose(h.data, hi.data, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.data, pi.data, rtol=1e-5, atol=1e-5)
    want = theirs(*T(ids), attention_mask=torch.tensor(mask), token_type_ids=torch.tensor(types))
    np.testing.assert_allclose(h.data, want.last_hidden_state.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p.data, want.pooler_output.detach().numpy(), rtol=1e-5, atol=1e-5)


def test_compiled_backward_equals_interpreter():
    """Gradients of the MLM loss w.r.t. every parameter: compiled program == interpreter."""
    nn.manual_seed(2)
    model = BERTForMaskedLM(CFG)
    ids, types, mask = batch()
    labels = np.where((mask == 1) & (np.arange(ids.shape[1]) % 3 == 0), ids, -100)

    def loss(ids, types, mask, labels):
        return model(ids, types, mask, labels=labels)["loss"]
    traced = trace_with_info(loss, ids, types, mask, labels, params=dict(model.named_parameters()))
    g = traced.graph
    wrt = [i.name for i in g.inputs if i.kind == "param"]
    assert len(wrt) == len(model.parameters())
    dg = autodiff(g, wrt, with_value=True)
    inputs = [ids, types, mask, labels] + [np.asarray(traced.bindings[i.name].data) for i in g.inputs[4:]]
    want = interpret(dg, inputs)
    got = Program(dg)(*[np.ascontiguousarray(a) for a in inputs])
    assert len(got) == 1 + len(wrt)
    for name, a, b in zip(["loss"] + wrt, got, want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6, err_msg=name)
    # and both equal eager backward
    out = model(Tensor(ids), Tensor(types), Tensor(mask), labels=Tensor(labels))
    out["loss"].backward()
    np.testing.assert_allclose(got[0], out["loss"].data, rtol=1e-5)
    word = model.bert.embeddings.word_embeddings.weight
    k = wrt.index(next(i.name for i in g.inputs if traced.bindings[i.name] is word))
    np.testing.assert_allclose(got[1 + k], word.grad.data, rtol=1e-4, atol=1e-6)


@pytest.mark.slow  # compiling the train step takes ~10-25 s on a cold cache
def test_compiled_training_run_loss_falls():
    """A tiny MLM on a fixed set of sequences with dropout: the compiled step memorises it."""
    nn.manual_seed(0)
    cfg = BERTConfig(**dict(KW, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1))
    model = BERTForMaskedLM(cfg)
    opt = optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    rng = np.random.default_rng(0)
    ids = rng.integers(5, cfg.vocab_size, (8, 12))
    ids[:, 1::2] = ids[:, 0::2] % 7 + 5  # every odd token is a function of the one before it
    labels = np.where(np.arange(12) % 2 == 1, ids, -100)
    inputs = np.where(labels != -100, 3, ids)  # 3 plays [MASK]
    mask = np.ones_like(ids)

    def loss_fn(m, x, mask, y):
        return m(x, None, mask, labels=y)["loss"]
    step = compile_train_step(model, loss_fn, opt, inputs, mask, labels, clip_norm=1.0)
    losses = [step(inputs, mask, labels) for _ in range(40)]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.5 * losses[0], losses
    model.eval()
    final = float(loss_fn(model, Tensor(inputs), Tensor(mask), Tensor(labels)).item())
    assert final < 0.5 * losses[0]


@pytest.mark.slow
def test_train_bert_core_loop_gets_below_unigram_baseline():
    """`narch train bert` at reduced size: the masked-character loss falls below the unigram
    baseline on held-out text."""
    from neural_arch.tools.train_bert import train
    res = train(max_chars=200_000, steps=250, batch=64, block=32, hidden=64, layers=2, heads=4, lr=2e-3,
                eval_every=125, time_limit=120, progress=False, log=lambda *a: None)
    h = res["history"]
    print(f"train_bert: {res['steps']} steps in {res['seconds']:.1f} s, val {h['val']} vs baseline "
          f"{res['baseline']:.3f}, masked accuracy {res['accuracy']:.1%}")
    assert np.mean(h["train"][-20:]) < np.mean(h["train"][:20])
    assert h["val"][-1] < h["val"][0]
    # seeds 0-2 end at 2.72-2.73 vs the baseline 3.14 (a post-LN BERT first sits on a plateau
    # near the unigram loss; batches of 32 leave it later and less reliably)
    assert res["passed"] and res["val"] < res["baseline"] - 0.25, res
