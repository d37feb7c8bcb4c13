"""GPT-2 against Hugging Face's GPT2LMHeadModel with the same random weights."""
import numpy as np
import pytest

from neural_arch.compiler import Tensor
from neural_arch.models import GPT2, GPT2Config, nn

torch = pytest.importorskip("torch", reason="torch is the oracle for GPT-2 (test extra)")
transformers = pytest.importorskip("transformers", reason="transformers is the GPT-2 reference (test extra)")

CFG = GPT2Config(vocab_size=61, n_positions=24, n_embd=16, n_layer=2, n_head=4)


def hf_model():
    torch.manual_seed(0)
    hcfg = transformers.GPT2Config(vocab_size=CFG.vocab_size, n_positions=CFG.n_positions, n_embd=CFG.n_embd,
                                   n_layer=CFG.n_layer, n_head=CFG.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                   attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(hcfg)
    m.eval()
    return m


def test_state_dict_names_shapes_and_tying_match_hf():
    hf = hf_model()
    ours = GPT2(CFG)
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    mine = {k: v.shape for k, v in ours.state_dict().items()}
    assert mine == theirs
    assert ours.lm_head.weight is ours.transformer.wte.weight
    assert len(ours.parameters()) == len(theirs) - 1  # the tied head is one parameter


def test_logits_loss_and_gradients_match_hf():
    hf = hf_model()
    ours = GPT2(CFG)
    ours.load_state_dict({k: v.detach().numpy() for k, v in hf.state_dict().items()})
    rng = np.random.default_rng(0)
    idx = rng.integers(0, CFG.vocab_size, (2, 9))
    out = hf(torch.tensor(idx), labels=torch.tensor(idx))
    logits, loss = ours(Tensor(idx[:, :-1]), Tensor(idx[:, 1:]))
    np.testing.assert_allclose(ours(Tensor(idx)).data, out.logits.detach().numpy(), rtol=1e-4, atol=1e-4)
    assert abs(float(loss.item()) - float(out.loss.detach())) < 1e-4
    out.loss.backward()
    loss.backward()
    named = dict(ours.named_parameters())
    for name, p in hf.named_parameters():
        np.testing.assert_allclose(named[name].grad.data, p.grad.numpy(), rtol=1e-3, atol=2e-5, err_msg=name)


def test_loading_checkpoint_without_tied_head_and_strict_errors():
    hf = hf_model()
    sd = {k: v.detach().numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    ours = GPT2(CFG)
    ours.load_state_dict(sd)
    np.testing.assert_array_equal(ours.lm_head.weight.data, sd["transformer.wte.weight"])
    sd["transformer.h.0.attn.c_attn.weight"] = sd["transformer.h.0.attn.c_attn.weight"].T
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_attn\.weight: checkpoint \(48, 16\)"):
        ours.load_state_dict(sd)


def test_decode_step_with_cache_equals_full_forward():
    nn.manual_seed(3)
    model = GPT2(CFG)
    rng = np.random.default_rng(1)
    idx = rng.integers(0, CFG.vocab_size, (1, 7))
    full = model(Tensor(idx)).data
    caches = model.empty_caches(1)
    assert all(isinstance(c, nn.KVCache) and c.position == 0 for c in caches)
    logits = model.decode_step(Tensor(idx[:, :4]), caches)
    np.testing.assert_allclose(logits.data, full[:, :4], rtol=1e-4, atol=1e-5)
    for t in range(4, 7):
        logits = model.decode_step(Tensor(idx[:, t:t + 1]), caches)
        np.testing.assert_allclose(logits.data[:, 0], full[:, t], rtol=1e-4, atol=1e-5)
    assert [c.position for c in caches] == [7, 7]
    caches[1].position = 5
    with pytest.raises(ValueError, match="different positions"):
        model.decode_step(Tensor(idx[:, :1]), caches)
    with pytest.raises(TypeError, match="2 nn.KVCache"):
        model.decode_step(Tensor(idx[:, :1]), [(c.keys, c.values) for c in caches])


def test_two_decode_steps_in_one_compiled_program():
    """decode_step twice in one trace with a runtime position (two tokens per call): the
    layers' caches share the advanced position, and the second step's logits equal the full
    forward's at that position."""
    from neural_arch.compiler import TensorType, compile
    nn.manual_seed(3)
    model = GPT2(CFG)
    model.eval()
    idx = np.random.default_rng(2).integers(0, CFG.vocab_size, (1, 6))
    full = model(Tensor(idx)).data
    hd = CFG.n_embd // CFG.n_head
    ct = TensorType((1, CFG.n_head, CFG.n_positions, hd), "float32")

    def two(a, b, pos, *flat):
        caches = [nn.KVCache(flat[2 * i], flat[2 * i + 1], pos) for i in range(CFG.n_layer)]
        model.decode_step(a, caches)
        return (model.decode_step(b, caches),) + tuple(t for c in caches for t in (c.keys, c.values))

    tok = TensorType((1, 1), "int64")
    f = compile(two, tok, tok, TensorType((), "int64"), *[ct] * (2 * CFG.n_layer))
    bufs = [np.zeros(ct.shape, np.float32) for _ in range(2 * CFG.n_layer)]
    for t in range(0, 6, 2):
        logits, *bufs = f(idx[:, t:t + 1], idx[:, t + 1:t + 2], np.int64(t), *bufs)
        bufs = [b.data if hasattr(b, "data") else b for b in bufs]
        np.testing.assert_allclose(logits.data[:, 0], full[:, t + 1], rtol=1e-4, atol=1e-5)


def test_init_follows_hf_and_is_seeded():
    """Hugging Face's GPT-2 init: normal(0, initializer_range) for wte, wpe and every Conv1D,
    residual projections (attn.c_proj, mlp.c_proj) scaled by 1/sqrt(2 n_layer), zero biases,
    LayerNorm ones/zeros."""
    cfg = GPT2Config(vocab_size=500, n_positions=256, n_embd=64, n_layer=4, n_head=4, initializer_range=0.05)
    nn.manual_seed(7)
    sd = GPT2(cfg).state_dict()
    scaled = 0.05 / np.sqrt(2 * cfg.n_layer)
    want = {"transformer.wte.weight": 0.05, "transformer.wpe.weight": 0.05,
            "transformer.h.1.attn.c_attn.weight": 0.05, "transformer.h.2.mlp.c_fc.weight": 0.05,
            "transformer.h.0.attn.c_proj.weight": scaled, "transformer.h.3.mlp.c_proj.weight": scaled}
    for name, std in want.items():
        w = sd[name].astype(np.float64)
        # the sample std's relative standard error is 1/sqrt(2 N) (<= 1.1 % here): 5 % is > 4 sigma
        assert abs(w.std() / std - 1) < 0.05, (name, w.std(), std)
        assert abs(w.mean()) < 5 * std / np.sqrt(w.size), (name, w.mean())
    for name, v in sd.items():
        if name.endswith(".bias"):
            assert not v.any(), name
        if ".ln_" in name:
            np.testing.assert_array_equal(v, 1.0 if name.endswith(".weight") else 0.0, err_msg=name)
    nn.manual_seed(7)
    again = GPT2(cfg).state_dict()
    assert all(np.array_equal(sd[k], again[k]) for k in sd)
    nn.manual_seed(8)
    other = GPT2(cfg).state_dict()
    for k in want:
        assert not np.array_equal(sd[k], other[k]), k


def test_config_n_ctx_is_an_alias_of_n_positions():
    import dataclasses
    cfg = GPT2Config(vocab_size=61, n_ctx=24, n_embd=16, n_layer=2, n_head=4)
    assert cfg == CFG and cfg.n_positions == cfg.n_ctx == 24
    assert GPT2Config(n_positions=24, n_ctx=24).n_positions == 24
    assert GPT2Config().n_ctx == GPT2Config().n_positions == 1024  # HF's default
    assert dataclasses.replace(cfg, n_layer=1).n_positions == 24
    assert "n_ctx" not in dataclasses.asdict(cfg)
    with pytest.raises(ValueError, match="n_ctx 64 and n_positions 1024 disagree"):
        GPT2Config(n_positions=1024, n_ctx=64)
    with pytest.raises(ValueError, match=r"positive int, got 0"):
        GPT2Config(n_ctx=0)
    with pytest.raises(ValueError, match="exceeds n_positions 24"):
        GPT2(cfg)(Tensor(np.zeros((1, 25), np.int64)))


def test_sequence_longer_than_context_is_refused():
    with pytest.raises(ValueError, match="exceeds n_positions 24"):
        GPT2(CFG)(Tensor(np.zeros((1, 25), np.int64)))


def test_greedy_generation_with_cache_equals_without_token_for_token():
    from neural_arch.models.generate import generate
    nn.manual_seed(5)
    model = GPT2(CFG)
    prompt = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 5))
    slow = generate(model, prompt, 10, temperature=0, use_cache=False)
    fast = generate(model, prompt, 10, temperature=0, backend="llvm")
    interp = generate(model, prompt, 10, temperature=0, backend="interpreter")
    assert slow.shape == (2, 15)
    np.testing.assert_array_equal(fast, slow)
    np.testing.assert_array_equal(interp, slow)


def test_generate_method_equals_the_function_token_for_token():
    from neural_arch.models.generate import generate
    nn.manual_seed(5)
    model = GPT2(CFG)
    prompt = np.random.default_rng(2).integers(0, CFG.vocab_size, (2, 5))
    kw = dict(temperature=1.5, top_k=20, top_p=0.9, seed=11)
    by_method = model.generate(prompt, 10, **kw)
    np.testing.assert_array_equal(by_method, generate(model, prompt, 10, **kw))
    np.testing.assert_array_equal(by_method[:, :5], prompt)
    assert by_method.shape == (2, 15)
    assert not np.array_equal(by_method, model.generate(prompt, 10, temperature=0))  # it sampled
    np.testing.assert_array_equal(model.generate(Tensor(prompt), 4, seed=3, use_cache=False),
                                  generate(model, prompt, 4, seed=3, use_cache=False))


def test_sampling_filters():
    from neural_arch.models.generate import sample_next
    logits = np.array([[0.0, 5.0, 4.9, -1.0]])
    rng = np.random.default_rng(0)
    picks = {int(sample_next(logits, rng, 1.0, top_k=2)[0]) for _ in range(200)}
    assert picks == {1, 2}
    picks = {int(sample_next(logits, rng, 1.0, top_p=0.3)[0]) for _ in range(50)}
    assert picks == {1}
    assert int(sample_next(logits, rng, 0)[0]) == 1


def test_sampling_arguments_are_checked_and_top_p_zero_keeps_the_top_token():
    from neural_arch.models.generate import sample_next
    logits = np.array([[0.0, 5.0, 4.9, -1.0], [3.0, 0.0, 1.0, 2.0]])
    rng = np.random.default_rng(0)
    # top_p=0 keeps the most likely token (as transformers' TopPLogitsWarper keeps one): greedy
    for _ in range(20):
        np.testing.assert_array_equal(sample_next(logits, rng, 1.0, top_p=0.0), [1, 0])
    with pytest.raises(ValueError, match=r"sample_next: top_p must lie in \[0, 1\], got 1.5"):
        sample_next(logits, rng, 1.0, top_p=1.5)
    # a negative top_k used to keep all but the |top_k| smallest logits
    with pytest.raises(ValueError, match="sample_next: top_k must be an int >= 0 .*, got -1"):
        sample_next(logits, rng, 1.0, top_k=-1)
    # a negative temperature used to sample from the flipped distribution
    with pytest.raises(ValueError, match="sample_next: temperature must be >= 0 .*, got -1.0"):
        sample_next(logits, rng, -1.0)


def test_generate_refuses_bad_prompts_and_lengths():
    from neural_arch.models.generate import generate
    nn.manual_seed(5)
    model = GPT2(CFG)
    with pytest.raises(ValueError, match="generate: max_new_tokens must be >= 0, got -2"):
        generate(model, np.array([[1, 2]]), -2)
    with pytest.raises(ValueError, match=r"generate: the prompt must hold at least one token per row, got shape \(1, 0\)"):
        generate(model, np.zeros((1, 0), np.int64), 2)
    # float ids used to be truncated to integers (1.7 -> 1) without a word
    with pytest.raises(TypeError, match="generate: token ids must be integers, got float64"):
        generate(model, np.array([[1.7, 2.2]]), 2, temperature=0)
    with pytest.raises(TypeError, match="GPT2: token ids must be integers, got float64"):
        model(np.array([[1.5, 2.0]]))


def test_loading_a_gpt2model_checkpoint_without_the_transformer_prefix():
    # the hub's GPT-2 checkpoints (openai-community/gpt2's model.safetensors) are GPT2Model's:
    # "wte.weight", "h.0.attn.c_attn.weight", ..., "h.0.attn.bias" (the causal-mask buffer), no
    # "transformer." prefix and no lm_head; transformers' from_pretrained adds the prefix
    hf = hf_model()
    sd = {k: v.detach().numpy() for k, v in hf.transformer.state_dict().items()}
    assert "wte.weight" in sd and not any(k.startswith(("transformer.", "lm_head.")) for k in sd)
    sd["h.0.attn.bias"] = np.tril(np.ones((1, 1, CFG.n_positions, CFG.n_positions), np.float32))
    ours = GPT2.from_hf_state_dict(CFG, sd)
    idx = np.random.default_rng(1).integers(0, CFG.vocab_size, (2, 7))
    np.testing.assert_allclose(ours(Tensor(idx)).data, hf(torch.tensor(idx)).logits.detach().numpy(),
                               rtol=1e-4, atol=1e-4)
    # a name that is neither layout's is still refused by name
    sd["h.0.attn.c_attn.weightx"] = sd.pop("h.0.attn.c_attn.weight")
    with pytest.raises(ValueError, match=r"missing keys: transformer\.h\.0\.attn\.c_attn\.weight\. "
                                         r"unexpected keys: transformer\.h\.0\.attn\.c_attn\.weightx"):
        GPT2(CFG).load_state_dict(sd)
