"""Tokenizers, the corpus, batching, and checkpoints (atomic, checked, resumable)."""
import os
import subprocess
import sys

import numpy as np
import pytest

from neural_arch.compiler import Tensor
from neural_arch.models import GPT2, GPT2Config, nn, optim
from neural_arch.models import checkpoint
from neural_arch.models.data import BPETokenizer, CharTokenizer, TextDataset, stdlib_corpus, unigram_entropy

TEXT = "def f(x):\n    return x * 2  # double it\n" * 20


def test_char_tokenizer_round_trip_and_errors():
    tok = CharTokenizer.from_text(TEXT)
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT and ids.dtype == np.int64
    assert CharTokenizer.from_json(tok.to_json()).decode(ids) == TEXT
    with pytest.raises(ValueError, match="'Z' is not in the vocabulary"):
        tok.encode("Z")


def test_bpe_tokenizer_round_trip_and_compression():
    corpus = stdlib_corpus(60_000)
    tok = BPETokenizer.train(corpus, vocab_size=400)
    sample = corpus[1000:3000]
    ids = tok.encode(sample)
    assert tok.decode(ids) == sample
    assert len(ids) < 0.7 * len(sample)  # merges compress source code
    assert BPETokenizer.from_json(tok.to_json()).encode(sample).tolist() == ids.tolist()


def test_stdlib_corpus_is_deterministic_ascii_text():
    a, b = stdlib_corpus(50_000), stdlib_corpus(50_000)
    assert a == b and len(a) == 50_000 and a.isascii() and "def " in a


def test_batches_are_shifted_windows_seeded():
    tokens = np.arange(1000)
    ds = TextDataset(tokens, block_size=8, val_fraction=0.1)
    x, y = ds.batch("train", 4, np.random.default_rng(0))
    assert x.shape == (4, 8) and np.array_equal(y, x + 1)
    assert x.max() < 900
    xv, _ = ds.batch("val", 4, np.random.default_rng(0))
    assert xv.min() >= 900
    x2, _ = ds.batch("train", 4, np.random.default_rng(0))
    assert np.array_equal(x, x2)
    with pytest.raises(ValueError, match="fewer than block_size"):
        TextDataset(np.arange(20), block_size=10, val_fraction=0.5)


def test_dataset_arguments_and_splits_are_checked():
    # a negative val_fraction used to give an empty validation split without a word, block 0
    # empty windows; an empty split or an unknown name failed in NumPy ("high <= 0", KeyError)
    with pytest.raises(ValueError, match=r"TextDataset: val_fraction must lie in \[0, 1\), got -0.1"):
        TextDataset(np.arange(100), block_size=8, val_fraction=-0.1)
    with pytest.raises(ValueError, match="TextDataset: block_size must be at least 1, got 0"):
        TextDataset(np.arange(100), block_size=0)
    ds = TextDataset(np.arange(100), block_size=8, val_fraction=0.0)
    with pytest.raises(ValueError, match="TextDataset.batch: the val split is empty \\(val_fraction 0.0\\)"):
        ds.batch("val", 2, np.random.default_rng(0))
    with pytest.raises(ValueError, match="TextDataset.batch: split must be 'train' or 'val', got 'test'"):
        ds.batch("test", 2, np.random.default_rng(0))


def test_unigram_entropy():
    assert unigram_entropy(np.array([0, 1, 0, 1]), 2) == pytest.approx(np.log(2))
    assert unigram_entropy(np.zeros(10, np.int64), 3) == 0.0


CFG = GPT2Config(vocab_size=20, n_positions=8, n_embd=8, n_layer=1, n_head=2)


def _train(model, opt, steps, seed=0):
    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(steps):
        idx = rng.integers(0, 20, (2, 8))
        opt.zero_grad()
        _, loss = model(Tensor(idx), Tensor(np.roll(idx, -1, 1)))
        loss.backward()
        opt.step()
        losses.append(float(loss.item()))
    return losses


def test_resume_continues_with_identical_losses(tmp_path):
    nn.manual_seed(0)
    model = GPT2(CFG)
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    reference = _train(model, opt, 3, seed=0) + _train(model, opt, 3, seed=1)
    nn.manual_seed(0)
    model = GPT2(CFG)
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    first = _train(model, opt, 3, seed=0)
    path = str(tmp_path / "ckpt.safetensors")
    checkpoint.save(path, model, opt, step=3, config=CFG)
    nn.manual_seed(123)  # a different init: everything must come from the file
    model2 = GPT2(CFG)
    opt2 = optim.AdamW(model2.parameters(), lr=5.0)
    meta = checkpoint.load(path, model2, opt2)
    assert meta["step"] == 3 and meta["config"]["n_embd"] == 8 and opt2.lr == 1e-2
    assert first + _train(model2, opt2, 3, seed=1) == reference


def test_corrupt_and_mismatched_checkpoints_are_refused(tmp_path):
    model = GPT2(CFG)
    path = str(tmp_path / "c.safetensors")
    checkpoint.save(path, model, step=1)
    blob = open(path, "rb").read()
    bad = str(tmp_path / "bad.safetensors")
    with open(bad, "wb") as f:
        f.write(blob[: len(blob) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="bad.safetensors is corrupt"):
        checkpoint.load(bad, model)
    with open(bad, "wb") as f:
        f.write(b"\x00" * 100)
    with pytest.raises(checkpoint.CheckpointError, match="bad.safetensors"):
        checkpoint.load(bad, model)
    other = GPT2(GPT2Config(vocab_size=20, n_positions=8, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(checkpoint.CheckpointError, match=r"transformer\.wte\.weight: file float32\[20, 8\] vs model float32\[20, 16\]"):
        checkpoint.load(path, other)
    with pytest.raises(checkpoint.CheckpointError, match="no optimizer state"):
        checkpoint.load(path, model, optim.SGD(model.parameters(), lr=0.1))


def test_flipped_data_bit_dtype_and_optimizer_mismatches_are_refused(tmp_path):
    nn.manual_seed(0)
    model = GPT2(CFG)
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 1)
    path = str(tmp_path / "c.safetensors")
    checkpoint.save(path, model, opt, step=1)
    blob = bytearray(open(path, "rb").read())
    blob[-5] ^= 0x01  # one bit of the last tensor's data: still a valid safetensors file
    bad = str(tmp_path / "flipped.safetensors")
    with open(bad, "wb") as f:
        f.write(blob)
    with pytest.raises(checkpoint.CheckpointError, match="flipped.safetensors is corrupt: .*CRC-32"):
        checkpoint.load(bad, GPT2(CFG))
    # a well-formed file (its CRC-32 right) whose embedding is float64: the dtype is named
    import json
    from safetensors.numpy import save_file
    tensors, meta = checkpoint.read(path)
    tensors["model.transformer.wte.weight"] = tensors["model.transformer.wte.weight"].astype(np.float64)
    meta["crc32"] = checkpoint.tensors_crc32(tensors)
    meta["meta_crc32"] = checkpoint.metadata_crc32(meta)
    wide = str(tmp_path / "wide.safetensors")
    save_file(tensors, wide, metadata={"neural_arch": json.dumps(meta)})
    with pytest.raises(checkpoint.CheckpointError, match=r"wide.safetensors does not match the model: "
                                                         r"transformer\.wte\.weight: file float64\[20, 8\] vs "
                                                         r"model float32\[20, 8\]"):
        checkpoint.load(wide, GPT2(CFG))
    with pytest.raises(checkpoint.CheckpointError, match="optimizer is AdamW in the file, SGD here"):
        checkpoint.load(path, model, optim.SGD(model.parameters(), lr=0.1))


def test_changed_metadata_is_refused(tmp_path):
    """A step count or learning rate changed in the metadata (still valid JSON, the tensors
    untouched) is refused, as a flipped data bit is."""
    import json
    from safetensors.numpy import save_file
    nn.manual_seed(0)
    model = GPT2(CFG)
    opt = optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, opt, 1)
    path = str(tmp_path / "c.safetensors")
    checkpoint.save(path, model, opt, step=1)
    tensors, meta = checkpoint.read(path)
    for change in ({"step": 2}, {"optimizer": {**meta["optimizer"], "lr": 0.5}}):
        edited = str(tmp_path / "edited.safetensors")
        save_file(tensors, edited, metadata={"neural_arch": json.dumps({**meta, **change})})
        with pytest.raises(checkpoint.CheckpointError, match="edited.safetensors is corrupt: its metadata"):
            checkpoint.load(edited, GPT2(CFG), optim.AdamW(GPT2(CFG).parameters()))
    save_file(tensors, edited, metadata={"neural_arch": json.dumps(meta)})  # (unchanged: loads)
    assert checkpoint.load(edited, GPT2(CFG))["step"] == 1


def test_checkpoint_file_gets_the_umask_permissions_not_0600(tmp_path):
    path = str(tmp_path / "c.safetensors")
    old = os.umask(0o027)
    try:
        checkpoint.save(path, GPT2(CFG), step=1)
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o640


def test_a_save_killed_midway_leaves_the_old_checkpoint(tmp_path):
    model = GPT2(CFG)
    path = str(tmp_path / "ckpt.safetensors")
    checkpoint.save(path, model, step=7)
    # a child process saves a larger checkpoint over it and dies after writing the temporary
    # file but before the rename (it is killed inside fsync)
    code = f"""
import os, numpy as np
from neural_arch.models import checkpoint, nn
class Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(np.zeros((256, 1024), np.float32))
os.fsync = lambda fd: os.kill(os.getpid(), 9)
checkpoint.save({path!r}, Big(), step=8)
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    meta = checkpoint.load(path, model)
    assert meta["step"] == 7
    leftovers = [f for f in os.listdir(tmp_path) if f != "ckpt.safetensors"]
    assert all(f.startswith(".ckpt-") for f in leftovers)  # only a stray temp file, never the target


def test_numpy_step_and_lr_are_saved_and_another_sgds_state_is_refused(tmp_path):
    nn.manual_seed(0)
    model = GPT2(CFG)
    opt = optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    _train(model, opt, 2)
    path = str(tmp_path / "c.safetensors")
    opt.lr = np.float32(0.5)  # a schedule computed with NumPy
    checkpoint.save(path, model, opt, step=np.int64(2))  # a step counted by np.arange
    model2 = GPT2(CFG)
    meta = checkpoint.load(path, model2, optim.SGD(model2.parameters(), lr=0.1, momentum=0.9))
    assert meta["step"] == 2 and meta["optimizer"]["lr"] == 0.5
    # the file's momentum buffers have no place in an SGD without momentum: refused, not dropped
    plain = GPT2(CFG)
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"c.safetensors does not match the model: unexpected optimizer state "
                             r"optim\.transformer\.h\.0\.attn\.c_attn\.bias\.momentum_buffer, .*"
                             r"optim\.transformer\.wte\.weight\.momentum_buffer$"):
        checkpoint.load(path, plain, optim.SGD(plain.parameters(), lr=0.1))
