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
    p.add_argument("--steps", type=int, default=2000,
                   help="training steps: the learning-rate schedule's length (default 2000)")
    p.add_argument("--time-limit", type=float, default=150.0,
                   help="stop training after this many seconds, 0 for no limit (default 150). When the "
                        "steps would not fit, the schedule is shortened once, at the end of warmup, to the "
                        "steps that do, so the run still anneals")
    p.add_argument("--stop-after", type=int, metavar="STEP",
                   help="stop after this step (saving a checkpoint) without shortening the schedule; "
                        "--resume continues: a run split into sessions")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch (default 16)")
    p.add_argument("--block", type=int, default=64, help="context length (default 64)")
    p.add_argument("--n-embd", type=int, default=128)
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--n-head", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.0, help="dropout probability while training (default 0)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warmup + cosine)")
    p.add_argument("--eval-every", type=int, default=250,
                   help="steps between validation evaluations and checkpoints (default 250)")
    p.add_argument("--out", default="runs/gpt2-char", help="directory for checkpoints and plots")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint.safetensors (give the same options as the first run)")
    p.add_argument("--backend", choices=["llvm", "interpreter"], default="llvm")
    p.add_argument("--sample-tokens", type=int, default=200, help="characters to generate at the end")
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch seed (default 0)")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")


def _check_arguments(args) -> None:
    problems = []
    if args.steps < 1:
        problems.append(f"--steps must be at least 1, got {args.steps}")
    if args.stop_after is not None and args.stop_after < 1:
        problems.append(f"--stop-after must be at least 1, got {args.stop_after}")
    if args.time_limit < 0:
        problems.append(f"--time-limit must be 0 (no limit) or positive, got {args.time_limit}")
    if not 0.0 <= args.dropout < 1.0:
        problems.append(f"--dropout must lie in [0, 1), got {args.dropout}")
    for flag, value in (("--batch", args.batch), ("--block", args.block)):
        if value < 1:
            problems.append(f"{flag} must be at least 1, got {value}")
    if args.eval_every < 1:
        problems.append(f"--eval-every must be at least 1, got {args.eval_every}")
    if args.seed < 0:
        problems.append(f"--seed must be 0 or positive, got {args.seed}")
    if problems:
        raise ValueError("; ".join(problems))


def train_batch(data, batch_size: int, seed: int, step: int):
    """The training batch of step ``step`` (0-based): a pure function of the seed and the step,
    so a resumed run draws the batches an uninterrupted one would."""
    return data.batch("train", batch_size, np.random.default_rng((seed, step)))


def run(args) -> dict:
    from neural_arch.compiler import Tensor
    from neural_arch.compiler.tensor import no_grad
    from neural_arch.models import GPT2, GPT2Config, checkpoint, compile_train_step, nn, optim
    from neural_arch.models.data import CharTokenizer, TextDataset, stdlib_corpus, unigram_entropy

    _check_arguments(args)
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
                     n_layer=args.n_layer, n_head=args.n_head, dropout=args.dropout)
    nn.manual_seed(args.seed)
    model = GPT2(cfg)
    # warmup + cosine over `total` steps; `total` is --steps unless the time limit shortens it
    # (decided once, at the end of warmup, and saved in the checkpoint: see `plan` below)
    warmup = min(max(1, args.steps // 20), args.steps - 1)

    def schedule(total):
        return optim.WarmupCosine(args.lr, warmup=warmup, total=total, min_lr=args.lr / 10)

    opt = optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.out, "checkpoint.safetensors")
    history = {"step": [], "train": [], "val_step": [], "val": []}
    start_step = 0
    # the schedule's length once fixed: --steps without a time limit; with one, None until
    # the end of warmup, when the speed measured so far decides it
    plan = args.steps if args.time_limit == 0 else None
    dropout_seed = 0  # the compiled step's dropout counter (TrainStep.seed)
    if args.resume:
        meta = checkpoint.load(ckpt, model, opt)
        start_step = meta["step"]
        extra = meta["extra"]
        history = extra.get("history", history)
        # (a checkpoint from before these were saved: the values an uninterrupted run has)
        dropout_seed = int(extra.get("dropout_seed", start_step))
        if extra.get("steps") == args.steps and extra.get("schedule_total") is not None:
            plan = int(extra["schedule_total"])  # the same run: its schedule exactly as planned
        print(f"resumed from {ckpt} at step {start_step}")
    print(f"corpus: {source}: {len(text):,} characters, vocabulary {tok.vocab_size}")
    print(f"model: GPT-2 {cfg.n_layer} layers, {cfg.n_head} heads, n_embd {cfg.n_embd}, context {cfg.n_positions}: "
          f"{model.num_parameters():,} parameters")
    print(f"unigram baseline (context-free): {baseline:.3f} nats/char")

    def loss_fn(m, x, y):
        return m(x, y)[1]

    x0, y0 = train_batch(data, args.batch, args.seed, start_step)
    t0 = time.perf_counter()
    step = compile_train_step(model, loss_fn, opt, x0, y0, clip_norm=1.0, backend=args.backend)
    step.seed = dropout_seed
    print(f"compiled the training step ({len(step.graph.nodes)} IR nodes) in {time.perf_counter() - t0:.1f} s "
          f"[{args.backend}]")

    def val_loss(n_batches=4):
        vrng = np.random.default_rng(1234)
        losses = []
        model.eval()  # (no dropout)
        try:
            with no_grad():
                for _ in range(n_batches):
                    x, y = data.batch("val", args.batch, vrng)
                    losses.append(float(loss_fn(model, Tensor(x), Tensor(y)).item()))
        finally:
            model.train()
        return float(np.mean(losses))

    def save(at_step):
        checkpoint.save(ckpt, model, opt, step=at_step, config=vars(cfg),
                        extra={"history": history, "steps": args.steps, "schedule_total": plan,
                               "dropout_seed": step.seed})

    def end_step():  # the step the run ends after, as planned so far
        end = args.steps if plan is None else plan
        return end if args.stop_after is None else min(end, args.stop_after)

    from tqdm import tqdm
    bar = tqdm(total=end_step(), initial=start_step, disable=args.no_progress, unit="step", dynamic_ncols=True)
    tokens_per_step = args.batch * args.block
    begin = time.perf_counter()
    last = start_step
    sched = schedule(args.steps if plan is None else plan)
    i = start_step
    while i < end_step():
        sched.apply(opt, i)
        x, y = train_batch(data, args.batch, args.seed, i)
        loss = step(x, y)
        history["step"].append(i + 1)
        history["train"].append(loss)
        elapsed = time.perf_counter() - begin
        rate = (i + 1 - start_step) * tokens_per_step / max(elapsed, 1e-9)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{rate:,.0f}")
        if plan is None and i + 1 >= warmup:
            # the time limit's plan, made once: as many steps as fit at the speed measured so
            # far (with 5 % to spare for the evaluations), never fewer than warmup + 1
            fit = i + 1 + int(0.95 * (args.time_limit - elapsed) * (i + 1 - start_step) / max(elapsed, 1e-9))
            plan = min(args.steps, max(warmup + 1, i + 1, fit))
            sched = schedule(plan)
            if plan < args.steps:
                msg = (f"{args.steps} steps would not fit the {args.time_limit:g} s time limit at "
                       f"{elapsed / (i + 1 - start_step) * 1000:.0f} ms/step: the learning-rate schedule "
                       f"ends at step {plan}")
                bar.write(msg) if not args.no_progress else print(msg)
            bar.total = end_step()
            bar.refresh()
        last = i + 1
        if (i + 1) % args.eval_every == 0 or i + 1 == end_step():
            v = val_loss()
            history["val_step"].append(i + 1)
            history["val"].append(v)
            msg = f"step {i + 1}: train {loss:.3f}  val {v:.3f}  (unigram baseline {baseline:.3f})  {rate:,.0f} tok/s"
            bar.write(msg) if not args.no_progress else print(msg)
            save(i + 1)
        if args.time_limit > 0 and elapsed > args.time_limit and i + 1 < end_step():
            msg = f"time limit of {args.time_limit:g} s reached at step {i + 1}"
            bar.write(msg) if not args.no_progress else print(msg)
            break
        i += 1
    bar.close()
    if last < (args.steps if plan is None else plan):
        print(f"stopped after step {last} of {args.steps if plan is None else plan}: --resume continues")
    if not history["val_step"] or history["val_step"][-1] != last:
        history["val_step"].append(last)
        history["val"].append(val_loss())
    save(last)
    final_val = history["val"][-1]
    print(f"final validation loss {final_val:.3f} nats/char vs unigram baseline {baseline:.3f} "
          f"({'below' if final_val < baseline else 'NOT below'} the baseline)")
    png = os.path.join(args.out, "loss.png")
    _plot(history, baseline, png)
    print(f"wrote {ckpt} and {png}")
    if args.sample_tokens > 0:
        # the stdlib corpus is Python: "def "; any other corpus: its validation split's first
        # characters (so every prompt character is in the vocabulary)
        prompt = "def " if not args.data else tok.decode(data.val_tokens[:8])
        ids = sample_text(model, tok.encode(prompt)[None, :], args.sample_tokens, cfg.n_positions,
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
