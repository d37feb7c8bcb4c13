"""Training GPT-2 for real: `narch train gpt2` at reduced size on the stdlib corpus (loss well
below the unigram baseline, checkpoint, plot, sample, --resume), the command's resume giving
exactly the uninterrupted run's losses, and the compiled training loop against the eager one
(same losses for the first steps) for each optimizer."""
import json
import re
import os

import numpy as np
import pytest

from neural_arch.compiler import Tensor, functional as F
from neural_arch.models import GPT2, GPT2Config, compile_train_step, nn, optim
from neural_arch.tools.cli import build_parser


def _args(tmp_path, *extra):
    return build_parser().parse_args(
        ["train", "gpt2", "--steps", "300", "--batch", "16", "--block", "32", "--n-embd", "64", "--n-layer", "2",
         "--n-head", "4", "--lr", "3e-3", "--max-chars", "300000", "--eval-every", "150", "--sample-tokens", "20",
         "--no-progress", "--out", str(tmp_path / "run"), *extra])


@pytest.mark.slow
def test_narch_train_gpt2_learns_below_the_unigram_baseline_and_resumes(tmp_path, capsys):
    from neural_arch.tools.train import run
    res = run(_args(tmp_path))
    out = capsys.readouterr().out
    # a few hundred steps on real text: clearly below what a context-free model can do
    assert res["val"] < res["baseline"] - 0.6, (res["val"], res["baseline"])
    train = res["history"]["train"]
    assert np.mean(train[-20:]) < np.mean(train[:5]) - 1.0
    for f in ("checkpoint.safetensors", "loss.png", "history.json"):
        assert os.path.getsize(tmp_path / "run" / f) > 0
    assert "unigram baseline" in out and "sample:" in out and "below the baseline" in out
    # the sample is longer than the model's context (32): generated in windows
    res_sample = run(_args(tmp_path / "s", "--steps", "5", "--sample-tokens", "70"))
    text = capsys.readouterr().out.split("sample:\n", 1)[1]
    assert res_sample["val"] > 0 and len(text.rstrip("\n")) >= len("def ") + 70
    # --resume continues from the saved step to a longer schedule
    res2 = run(_args(tmp_path, "--resume", "--steps", "320"))
    out2 = capsys.readouterr().out
    assert "resumed from" in out2 and "at step 300" in out2
    assert res2["history"]["step"][-1] == 320 and len(res2["history"]["step"]) == 320


# `narch train gpt2` at a size that runs in about a second
TINY = ["--batch", "4", "--block", "16", "--n-embd", "16", "--n-layer", "1", "--n-head", "2", "--max-chars", "20000",
        "--sample-tokens", "0", "--no-progress"]


def _narch_train(out, *flags):
    """`narch --debug train gpt2 ...` as from the command line (an error raises); the run's
    history.json (per-step training losses) and its checkpoint's tensors and metadata."""
    from neural_arch.models import checkpoint
    from neural_arch.tools.cli import main
    main(["--debug", "train", "gpt2", *TINY, "--out", str(out), *flags])
    with open(out / "history.json") as f:
        history = json.load(f)
    return history, *checkpoint.read(str(out / "checkpoint.safetensors"))


@pytest.mark.parametrize("backend", ["llvm", "interpreter"])
def test_narch_train_gpt2_resumed_run_has_the_uninterrupted_runs_losses_bitwise(tmp_path, capsys, backend):
    # dropout on, so the step's dropout counter matters too; 6 steps in one go, or 3 and then
    # --resume (from the checkpoint --stop-after writes) to the same schedule's end
    flags = ["--steps", "6", "--eval-every", "2", "--dropout", "0.1", "--time-limit", "0", "--backend", backend]
    whole, tensors, meta = _narch_train(tmp_path / "a", *flags)
    part, _, part_meta = _narch_train(tmp_path / "b", *flags, "--stop-after", "3")
    assert "stopped after step 3 of 6: --resume continues" in capsys.readouterr().out
    assert part["step"] == [1, 2, 3] and part_meta["step"] == 3 and part_meta["extra"]["dropout_seed"] == 3
    assert part["train"] == whole["train"][:3]
    resumed, tensors2, meta2 = _narch_train(tmp_path / "b", *flags, "--resume")
    assert "resumed from" in capsys.readouterr().out
    assert whole["step"] == resumed["step"] == [1, 2, 3, 4, 5, 6]
    assert resumed["train"] == whole["train"]  # exactly: the same floats
    assert len(set(whole["train"])) == 6
    # and the same weights and optimizer state, bit for bit
    assert sorted(tensors) == sorted(tensors2)
    for k in tensors:
        assert tensors[k].tobytes() == tensors2[k].tobytes(), k
    assert meta["step"] == meta2["step"] == 6 and meta2["extra"]["dropout_seed"] == 6


def test_narch_train_gpt2_time_limited_run_resumes_on_the_schedule_it_planned(tmp_path, capsys):
    # a limit no step fits: at the end of warmup (step 1 of 10) the schedule is shortened to
    # its minimum, warmup + 1 = 2 steps, and the run stops; --resume without a limit then
    # finishes THAT schedule, as a 2-step run does from the start
    planned, _, _ = _narch_train(tmp_path / "a", "--steps", "2", "--time-limit", "0")
    cut, _, meta = _narch_train(tmp_path / "b", "--steps", "10", "--time-limit", "1e-9")
    out = capsys.readouterr().out
    assert "the learning-rate schedule ends at step 2" in out and "time limit of 1e-09 s reached at step 1" in out
    assert cut["step"] == [1] and meta["extra"]["schedule_total"] == 2
    resumed, _, meta2 = _narch_train(tmp_path / "b", "--steps", "10", "--time-limit", "0", "--resume")
    assert resumed["step"] == planned["step"] == [1, 2] and meta2["step"] == 2
    assert resumed["train"] == planned["train"]


def test_narch_train_gpt2_time_limit_zero_means_no_limit(tmp_path, capsys):
    history, _, _ = _narch_train(tmp_path / "a", "--steps", "3", "--time-limit", "0", "--backend", "interpreter")
    assert history["step"] == [1, 2, 3]
    assert "time limit" not in capsys.readouterr().out


def test_narch_train_gpt2_data_file_without_the_letters_of_def(tmp_path, capsys):
    # the sample's prompt comes from the corpus: the validation split's first 8 characters
    rng = np.random.default_rng(0)
    alphabet = "abcghijk lmno\n"
    text = "".join(rng.choice(list(alphabet), 3000))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(text)
    _narch_train(tmp_path / "run", "--data", str(corpus), "--steps", "2", "--time-limit", "0",
                 "--sample-tokens", "12")
    sample = capsys.readouterr().out.split("sample:\n", 1)[1][:-1]  # (print's newline)
    prompt = text[len(text) - len(text) // 10:][:8]
    assert sample.startswith(prompt) and len(sample) == 8 + 12
    assert set(sample) <= set(alphabet)


OPTIMIZERS = {
    "sgd": lambda ps: optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda ps: optim.Adam(ps, lr=3e-3),
    "adamw": lambda ps: optim.AdamW(ps, lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1),
}


def _gpt2():
    nn.manual_seed(3)
    return GPT2(GPT2Config(vocab_size=23, n_positions=16, n_embd=16, n_layer=1, n_head=2, dropout=0.0))


def _loss(m, x, y):
    return F.cross_entropy(m(x).reshape((-1, 23)), y.reshape((-1,)))


@pytest.mark.parametrize("name,clip", [("sgd", 0.5), ("adam", None), ("adamw", None), ("adamw", 0.5)])
def test_compiled_gpt2_training_equals_eager_for_each_optimizer(name, clip):
    rng = np.random.default_rng(7)
    batches = [(rng.integers(0, 23, (4, 16)), rng.integers(0, 23, (4, 16))) for _ in range(4)]
    m1, m2 = _gpt2(), _gpt2()
    o1, o2 = OPTIMIZERS[name](m1.parameters()), OPTIMIZERS[name](m2.parameters())
    want = []
    for x, y in batches:
        o1.zero_grad()
        loss = _loss(m1, Tensor(x), Tensor(y))
        loss.backward()
        if clip is not None:
            optim.clip_grad_norm_(m1.parameters(), clip)
        o1.step()
        want.append(float(loss.item()))
    step = compile_train_step(m2, _loss, o2, *batches[0], clip_norm=clip)
    got = [step(x, y) for x, y in batches]
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    # Adam divides by sqrt(v): where a gradient is ~0 its float32 rounding noise moves the
    # update by up to lr; 1e-4 is 1 % of the largest total update (4 steps at lr 3e-3)
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        np.testing.assert_allclose(b.data, a.data, rtol=1e-3, atol=1e-4, err_msg=n)
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        s1, s2 = o1.state_for(p1), o2.state_for(p2)
        assert s1["step"] == s2["step"] == len(batches)
        for k in o1.state_names:
            np.testing.assert_allclose(s2[k].data, s1[k].data, rtol=1e-3, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("flag,value", [("--batch", "0"), ("--batch", "-2"), ("--block", "0")])
def test_narch_train_gpt2_refuses_a_batch_or_block_below_one(tmp_path, flag, value):
    # (they used to fail deep inside: "need at least one array to stack", "negative dimensions
    # are not allowed", a GPT2Config error about n_positions)
    from neural_arch.tools.train import run
    args = build_parser().parse_args(["train", "gpt2", *TINY, "--out", str(tmp_path / "run"), flag, value])
    with pytest.raises(ValueError, match=rf"^{flag} must be at least 1, got {value}$"):
        run(args)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("model", ["gpt2", "vit", "clip", "bert"])
def test_train_help_names_each_default_once(model, capsys):
    """Help texts that name their default were shown with argparse's too: "(default 16)
    (default: 16)"; options that do not name theirs still get it."""
    from neural_arch.tools.cli import main
    with pytest.raises(SystemExit):
        main(["train", model, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert not re.search(r"\(default[^)]*\) \(default", text), text
    if model == "gpt2":
        assert "--batch BATCH sequences per batch (default 16) --block" in text
    if model == "vit":  # (its help names no default: argparse's is added)
        assert "--batch BATCH images per batch (default: 64)" in text
    if model in ("vit", "clip", "bert"):  # every option with a value says it, 0 included
        options = re.findall(r"(--[a-z-]+) [A-Z_]+ ([^-]*?)(?= --|$)", text.split("options:")[1])
        assert options and all("default" in help for _, help in options), options
        assert "--seed SEED initialisation, split and batch seed (default: 0)" in text or model == "bert"
