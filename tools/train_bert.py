"""`narch train bert`: masked-language-model pretraining of a small character-level BERT,
compiled, on the stdlib corpus (or --data).

15% of the characters of each window are chosen for prediction; of those 80% become [MASK],
10% a random character and 10% stay as they are (BERT's recipe).  The loss is the cross
entropy on the chosen characters only; the model must beat the unigram baseline, the loss of
guessing each hidden character from its frequency alone, so it has to read the context on
both sides.  Shows a progress bar, evaluates on a held-out split, saves a checkpoint, a
loss-curve PNG and prints a few windows with their masked characters filled in.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from neural_arch.tools.loop import check_arguments, time_limit, warmup_steps

IGNORE = -100


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="a text file to train on (default: the Python standard library's sources)")
    p.add_argument("--max-chars", type=int, default=1_000_000, help="characters of corpus to use")
    p.add_argument("--steps", type=int, default=1200, help="training steps")
    p.add_argument("--time-limit", type=time_limit, default=100.0,
                   help="stop training after this many seconds, 0 for no limit")
    p.add_argument("--batch", type=int, default=32, help="windows per batch")
    p.add_argument("--block", type=int, default=32, help="characters per window")
    p.add_argument("--hidden", type=int, default=128, help="hidden size")
    p.add_argument("--layers", type=int, default=2, help="encoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--mask-prob", type=float, default=0.15, help="fraction of characters to predict")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warmup + cosine)")
    p.add_argument("--eval-every", type=int, default=200, help="steps between validation evaluations")
    p.add_argument("--out", default="runs/bert-mlm", help="directory for the checkpoint and plot")
    p.add_argument("--backend", choices=["llvm", "interpreter"], default="llvm",
                   help="compiled native code, or the NumPy interpreter")
    p.add_argument("--seed", type=int, default=0, help="initialisation, batch and masking seed")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")


def mask_tokens(ids: np.ndarray, rng: np.random.Generator, vocab_size: int, mask_id: int, prob: float = 0.15,
                n_random: int | None = None):
    """BERT's masking: choose ``prob`` of the positions (at least one per row); of those 80%
    become ``mask_id``, 10% a random token in [0, n_random), 10% stay.  Returns (inputs,
    labels) with labels = the original token at chosen positions and -100 elsewhere."""
    ids = np.asarray(ids, dtype=np.int64)
    n_random = vocab_size if n_random is None else n_random
    chosen = rng.random(ids.shape) < prob
    empty = np.flatnonzero(~chosen.any(axis=1))  # no row without a target (rare: 0.85**64 for 64 tokens)
    chosen[empty, rng.integers(0, ids.shape[1], len(empty))] = True
    labels = np.where(chosen, ids, IGNORE)
    r = rng.random(ids.shape)
    inputs = ids.copy()
    inputs[chosen & (r < 0.8)] = mask_id
    swap = chosen & (r >= 0.8) & (r < 0.9)
    inputs[swap] = rng.integers(0, n_random, int(swap.sum()))
    return inputs, labels


def train(max_chars: int = 1_000_000, steps: int = 1200, batch: int = 32, block: int = 32, hidden: int = 128,
          layers: int = 2, heads: int = 4, lr: float = 3e-3, mask_prob: float = 0.15, eval_every: int = 200,
          time_limit: float = 100.0, progress: bool = True, seed: int = 0, backend: str = "llvm",
          data: str | None = None, out: str | None = None, log=print) -> dict:
    """The training loop; returns baseline, final validation loss, history and the model."""
    from neural_arch.compiler import Tensor
    from neural_arch.compiler.tensor import no_grad
    from neural_arch.models import BERTConfig, BERTForMaskedLM, checkpoint, compile_train_step, nn, optim
    from neural_arch.models.data import CharTokenizer, TextDataset, stdlib_corpus, unigram_entropy

    if data:
        with open(data, encoding="utf-8", errors="replace") as f:
            text = f.read()[:max_chars]
        source = data
    else:
        text = stdlib_corpus(max_chars)
        source = "the Python standard library's sources"
    tok = CharTokenizer.from_text(text)
    mask_id = tok.vocab_size  # one extra id: [MASK]
    ds = TextDataset(tok.encode(text), block, val_fraction=0.1)
    baseline = unigram_entropy(ds.train_tokens, tok.vocab_size)
    cfg = BERTConfig(vocab_size=tok.vocab_size + 1, hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=heads, intermediate_size=4 * hidden, max_position_embeddings=block,
                     type_vocab_size=1, layer_norm_eps=1e-12, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0, pad_token_id=-1)
    nn.manual_seed(seed)
    model = BERTForMaskedLM(cfg)
    sched = optim.WarmupCosine(lr, warmup=warmup_steps(steps), total=steps, min_lr=lr / 10)
    opt = optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    log(f"corpus: {source}: {len(text):,} characters, vocabulary {tok.vocab_size} + [MASK]")
    log(f"model: BERT {layers} layers, {heads} heads, hidden {hidden}, windows of {block}: "
        f"{model.num_parameters():,} parameters; masking {mask_prob:.0%} (80% [MASK], 10% random, 10% kept)")
    log(f"unigram baseline (context-free guess of a masked character): {baseline:.3f} nats/char")

    def loss_fn(m, x, y):
        return m(x, labels=y)["loss"]

    rng = np.random.default_rng(seed)

    def next_batch(split, r):
        x, _ = ds.batch(split, batch, r)
        return mask_tokens(x, r, cfg.vocab_size, mask_id, mask_prob, n_random=tok.vocab_size)

    x0, y0 = next_batch("train", rng)
    t0 = time.perf_counter()
    step = compile_train_step(model, loss_fn, opt, x0, y0, clip_norm=1.0, backend=backend)
    log(f"compiled the training step ({len(step.graph.nodes)} IR nodes) in {time.perf_counter() - t0:.1f} s "
        f"[{backend}]")

    vrng = np.random.default_rng(1234)
    val_batches = [next_batch("val", vrng) for _ in range(4)]

    def val_loss():
        model.eval()
        with no_grad():
            v = [float(loss_fn(model, Tensor(x), Tensor(y)).item()) for x, y in val_batches]
        model.train()
        return float(np.mean(v))

    history = {"step": [], "train": [], "val_step": [], "val": []}
    from tqdm import tqdm
    bar = tqdm(range(steps), total=steps, disable=not progress, unit="step", dynamic_ncols=True)
    say = bar.write if progress else log
    begin = time.perf_counter()
    last = 0
    for i in bar:
        sched.apply(opt, i)
        x, y = (x0, y0) if i == 0 else next_batch("train", rng)
        loss = step(x, y)
        history["step"].append(i + 1)
        history["train"].append(loss)
        last = i + 1
        elapsed = time.perf_counter() - begin
        bar.set_postfix(loss=f"{loss:.3f}", chars_s=f"{(i + 1) * batch * block / max(elapsed, 1e-9):,.0f}")
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            v = val_loss()
            history["val_step"].append(i + 1)
            history["val"].append(v)
            say(f"step {i + 1}: masked-char loss train {loss:.3f}  val {v:.3f}  (unigram baseline {baseline:.3f})")
        if time_limit > 0 and elapsed > time_limit:
            say(f"time limit of {time_limit:.0f} s reached at step {i + 1}")
            break
    bar.close()
    train_seconds = time.perf_counter() - begin
    if not history["val_step"] or history["val_step"][-1] != last:
        history["val_step"].append(last)
        history["val"].append(val_loss())
    final = history["val"][-1]
    log(f"{last} steps in {train_seconds:.1f} s ({last * batch * block / train_seconds:,.0f} chars/s)")
    log(f"final validation masked-char loss {final:.3f} nats vs unigram baseline {baseline:.3f} "
        f"({'below' if final < baseline else 'NOT below'} the baseline)")
    acc = _show_fills(model, tok, val_batches[0], mask_id, log)
    log(f"masked characters guessed right on a validation batch: {acc:.1%}")
    if out:
        os.makedirs(out, exist_ok=True)
        ckpt = os.path.join(out, "checkpoint.safetensors")
        checkpoint.save(ckpt, model, opt, step=last, config=vars(cfg), extra={"history": history,
                                                                             "chars": tok.chars})
        png = os.path.join(out, "loss.png")
        _plot(history, baseline, png)
        with open(os.path.join(out, "history.json"), "w") as f:
            json.dump({"baseline": baseline, **history}, f)
        log(f"wrote {ckpt} and {png}")
    return {"baseline": baseline, "val": final, "passed": final < baseline, "history": history, "model": model,
            "accuracy": acc, "steps": last, "seconds": train_seconds}


def _show_fills(model, tok, val_batch, mask_id, log, rows: int = 3) -> float:
    """Print windows with the hidden characters as '_' and the model's guesses; return the
    accuracy over the whole batch's masked characters."""
    from neural_arch.compiler import Tensor
    from neural_arch.compiler.tensor import no_grad
    x, y = val_batch
    model.eval()
    with no_grad():
        pred = np.argmax(model(Tensor(x))["logits"].data, -1)
    model.train()
    chosen = y != IGNORE
    acc = float((pred[chosen] == y[chosen]).mean())
    pred = np.minimum(pred, tok.vocab_size - 1)  # [MASK] as a guess prints as the last character

    def show(ids):
        return tok.decode(ids).replace("\n", "⏎").replace("\t", "→")
    for r in range(min(rows, len(x))):
        orig = np.where(chosen[r], y[r], x[r])
        hidden = show(np.where(chosen[r], 0, orig))
        hidden = "".join("_" if c else h for c, h in zip(chosen[r], hidden))
        log(f"  text:   {show(orig)}")
        log(f"  masked: {hidden}")
        log(f"  filled: {show(np.where(chosen[r], pred[r], orig))}")
    return acc


def _plot(history, baseline, path):
    from neural_arch.tools.train import _plot as plot_losses
    plot_losses(history, baseline, path, ylabel="masked-character loss (nats)",
                title="neural_arch: character-level BERT, masked-LM pretraining")


def run(args) -> dict:
    check_arguments(args)
    return train(max_chars=args.max_chars, steps=args.steps, batch=args.batch, block=args.block, hidden=args.hidden,
                 layers=args.layers, heads=args.heads, lr=args.lr, mask_prob=args.mask_prob,
                 eval_every=args.eval_every, time_limit=args.time_limit, progress=not args.no_progress,
                 seed=args.seed, backend=args.backend, data=args.data, out=args.out)


def main(argv=None) -> int:
    from neural_arch.tools.cli import DefaultsHelpFormatter
    p = argparse.ArgumentParser(prog="narch train bert", description=__doc__.split("\n\n")[0],
                                formatter_class=DefaultsHelpFormatter)
    add_arguments(p)
    res = run(p.parse_args(argv))
    return 0 if res["val"] < res["baseline"] else 1
