"""`narch train gpt2`: train a character-level GPT-2, compiled, on the stdlib corpus (or --data).

Shows a progress bar (loss, tokens/s, ETA), evaluates validation loss against the corpus's
unigram-entropy baseline, saves checkpoints and a loss-curve PNG, prints a sample, and can
--resume.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="a text file to train on (default: the Python standard library's sources)")
    p.add_argument("--max-chars", type=int, default=1_500_000, help="characters of corpus to use (default 1.5M)")
    p.add_argument("--steps", type=int, default=2000, help="training steps (default 2000)")
    p.add_argument("--time-limit", type=float, default=150.0,
                   help="stop training after this many seconds; the learning-rate schedule then runs by "
                        "time so it still completes (default 150)")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    p.add_argument("--block", type=int, default=64, help="context length (default 64)")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warmup + cosine)")
    p.add_argument("--eval-every", type=int, default=250, help="steps between validation evaluations")
    p.add_argument("--out", default="runs/gpt2-char", help="directory for checkpoints and plots")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.safetensors")
    p.add_argument("--backend", choices=["llvm", "interpreter"], default="llvm")
    p.add_argument("--sample-tokens", type=int, default=200, help="characters to generate at the end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")


def run(args) -> dict:
    from neural_arch.compiler import Tensor
    from neural_arch.compiler.tensor import no_grad
    from neural_arch.models import GPT2, GPT2Config, checkpoint, compile_train_step, nn, optim
    from neural_arch.models.data import CharTokenizer, TextDataset, stdlib_corpus, unigram_entropy

    if args.data:
        with open(args.data, encoding="utf-8", errors="replace") as f:
            text = f.read()[:args.max_chars]
        source = args.data
    else:
        text = stdlib_corpus(args.max_chars)
        source = "the Python standard library's sources"
    tok = CharTokenizer.from_text(text)
    data = TextDataset(tok.encode(text), args.block, val_fraction=0.1)
    baseline = unigram_entropy(data.train_tokens, tok.vocab_size)
    cfg = GPT2Config(vocab_size=tok.vocab_size, n_positions=args.block, n_embd=args.n_embd,
                     n_layer=args.n_layer, n_head=args.n_head, dropout=0.0)
    nn.manual_seed(args.seed)
    model = GPT2(cfg)
    sched = optim.WarmupCosine(args.lr, warmup=max(1, args.steps // 20), total=args.steps, min_lr=args.lr / 10)
    opt = optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.out, "checkpoint.safetensors")
    history = {"step": [], "train": [], "val_step": [], "val": []}
    start_step = 0
    if args.resume:
        meta = checkpoint.load(ckpt, model, opt)
        start_step = meta["step"]
        history = meta["extra"].get("history", history)
        print(f"resumed from {ckpt} at step {start_step}")
    print(f"corpus: {source}: {len(text):,} characters, vocabulary {tok.vocab_size}")
    print(f"model: GPT-2 {cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, context {cfg.n_positions}: "
          f"{model.num_parameters():,} parameters")
    print(f"unigram baseline (context-free): {baseline:.3f} nats/char")

    def loss_fn(m, x, y):
        return m(x, y)[1]

    rng = np.random.default_rng(args.seed + start_step)
    x0, y0 = data.batch("train", args.batch, rng)
    t0 = time.perf_counter()
    step = compile_train_step(model, loss_fn, opt, x0, y0, clip_norm=1.0, backend=args.backend)
    print(f"compiled the training step ({len(step.graph.nodes)} IR nodes) in {time.perf_counter() - t0:.1f} s "
          f"[{args.backend}]")

    def val_loss(n_batches=4):
        vrng = np.random.default_rng(1234)
        losses = []
        with no_grad():
            for _ in range(n_batches):
                x, y = data.batch("val", args.batch, vrng)
                losses.append(float(loss_fn(model, Tensor(x), Tensor(y)).item()))
        return float(np.mean(losses))

    from tqdm import tqdm
    bar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=args.no_progress,
               unit="step", dynamic_ncols=True)
    tokens_per_step = args.batch * args.block
    begin = time.perf_counter()
    last = start_step
    elapsed = 0.0
    for i in bar:
        # the schedule runs by steps, or by time when the time limit would end the run first
        # (so a slow machine still anneals the learning rate before it stops)
        by_time = int(args.steps * min(1.0, elapsed / args.time_limit)) if args.time_limit > 0 else 0
        sched.apply(opt, max(i, by_time))
        x, y = data.batch("train", args.batch, rng)
        loss = step(x, y)
        history["step"].append(i + 1)
        history["train"].append(loss)
        elapsed = time.perf_counter() - begin
        rate = (i + 1 - start_step) * tokens_per_step / max(elapsed, 1e-9)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps:
            v = val_loss()
            history["val_step"].append(i + 1)
            history["val"].append(v)
            msg = f"step {i + 1}: train {loss:.3f}  val {v:.3f}  (unigram baseline {baseline:.3f})  {rate:,.0f} tok/s"
            bar.write(msg) if not args.no_progress else print(msg)
            checkpoint.save(ckpt, model, opt, step=i + 1, config=vars(cfg), extra={"history": history})
        last = i + 1
        if elapsed > args.time_limit:
            bar.write(f"time limit of {args.time_limit:.0f} s reached at step {i + 1}")
            break
    bar.close()
    if not history["val_step"] or history["val_step"][-1] != last:
        history["val_step"].append(last)
        history["val"].append(val_loss())
    checkpoint.save(ckpt, model, opt, step=last, config=vars(cfg), extra={"history": history})
    final_val = history["val"][-1]
    print(f"final validation loss {final_val:.3f} nats/char vs unigram baseline {baseline:.3f} "
          f"({'below' if final_val < baseline else 'NOT below'} the baseline)")
    png = os.path.join(args.out, "loss.png")
    _plot(history, baseline, png)
    print(f"wrote {ckpt} and {png}")
    if args.sample_tokens > 0:
        ids = sample_text(model, tok.encode("def ")[None, :], args.sample_tokens, cfg.n_positions,
                          seed=args.seed, backend=args.backend)
        print("sample:\n" + tok.decode(ids[0]))
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump({"baseline": baseline, **history}, f)
    return {"baseline": baseline, "val": final_val, "history": history}


def sample_text(model, prompt, n: int, context: int, seed: int = 0, backend: str = "llvm"):
    """``n`` characters after ``prompt``, longer than the model's context: generate in
    windows, each prompted by the last half-context of what came before (the same window
    shapes every round, so the compiled decoder is reused)."""
    from neural_arch.models.generate import generate
    import numpy as np
    out = prompt
    step = max(1, context // 2)
    rnd = 0
    while out.shape[1] - prompt.shape[1] < n:
        window = out[:, -min(out.shape[1], context - step):]
        k = min(step, n - (out.shape[1] - prompt.shape[1]), context - window.shape[1])
        ids = generate(model, window, k, temperature=0.8, top_k=20, seed=seed + rnd, backend=backend)
        out = np.concatenate([out, ids[:, window.shape[1]:]], axis=1)
        rnd += 1
    return out


def _plot(history, baseline, path, ylabel="loss (nats/char)", title="neural_arch: character-level GPT-2"):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(history["step"], history["train"], label="train", alpha=0.6)
    ax.plot(history["val_step"], history["val"], "o-", label="validation")
    ax.axhline(baseline, color="gray", ls="--", label=f"unigram baseline {baseline:.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
