"""The training loop `narch train vit` and `narch train clip` share: a progress bar, the
learning-rate schedule applied per step, the loss history, an evaluation every
``eval_every`` steps, at the last step and when the time limit is reached."""
from __future__ import annotations

import argparse
import time
from typing import Callable


def time_limit(text: str) -> float:
    """argparse type of ``--time-limit`` (vit, clip, bert): seconds, 0 for no limit."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or positive, got {text}")
    return v


def check_arguments(args) -> None:
    """Refuse option values a run cannot use, every problem in one message (as `narch train
    gpt2` does): a batch of 0 trained on NaN losses, --steps 0 failed inside the schedule."""
    problems = []
    for name in ("steps", "batch", "block", "hidden", "layers", "heads", "vision_layers", "text_layers",
                 "projection_dim", "patch", "eval_every", "max_chars"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            problems.append(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    fraction = getattr(args, "test_fraction", None)
    if fraction is not None and not 0.0 < fraction < 1.0:
        problems.append(f"--test-fraction must lie in (0, 1), got {fraction}")
    mask_prob = getattr(args, "mask_prob", None)
    if mask_prob is not None and not 0.0 < mask_prob <= 1.0:
        problems.append(f"--mask-prob must lie in (0, 1], got {mask_prob}")
    dropout = getattr(args, "dropout", None)
    if dropout is not None and not 0.0 <= dropout < 1.0:
        problems.append(f"--dropout must lie in [0, 1), got {dropout}")
    if getattr(args, "seed", 0) < 0:
        problems.append(f"--seed must be 0 or positive, got {args.seed}")
    if problems:
        raise ValueError("; ".join(problems))


def warmup_steps(steps: int) -> int:
    """The warmup of a run's warmup + cosine schedule: 5% of the steps, at least 1, and
    short of ``steps`` (a one-step run has none)."""
    return min(max(1, steps // 20), steps - 1)


def train_loop(step: Callable, first_batch, next_batch: Callable, sched, opt, args, evaluate: Callable,
               metric: str, metric_label: str, postfix: Callable, log=print) -> tuple[dict, int, float]:
    """Run ``args.steps`` steps of ``step(*batch)`` (the first on ``first_batch``, the rest on
    ``next_batch()``), stopping early after ``args.time_limit`` seconds.  ``evaluate()`` returns
    the metric (a fraction) logged as ``metric_label``; ``postfix(steps_done, loss, elapsed)``
    the progress bar's extra fields.  Returns (history, steps run, training seconds); the
    history has "step", "loss", "eval_step" and ``metric``."""
    from tqdm import tqdm
    history = {"step": [], "loss": [], "eval_step": [], metric: []}
    bar = tqdm(range(args.steps), disable=args.no_progress, unit="step", dynamic_ncols=True)
    begin = time.perf_counter()
    last = 0
    batch = first_batch
    for i in bar:
        sched.apply(opt, i)
        if i:
            batch = next_batch()
        loss = step(*batch)
        history["step"].append(i + 1)
        history["loss"].append(loss)
        elapsed = time.perf_counter() - begin
        bar.set_postfix(loss=f"{loss:.3f}", **postfix(i + 1, loss, elapsed))
        last = i + 1
        done = args.time_limit > 0 and elapsed > args.time_limit
        if (i + 1) % args.eval_every == 0 or i + 1 == args.steps or done:
            value = evaluate()
            history["eval_step"].append(i + 1)
            history[metric].append(value)
            msg = f"step {i + 1}: loss {loss:.3f}  {metric_label} {value:.2%}  ({elapsed:.0f} s)"
            bar.write(msg) if not args.no_progress else log(msg)
        if done:
            bar.write(f"time limit of {args.time_limit:.0f} s reached at step {i + 1}")
            break
    bar.close()
    return history, last, time.perf_counter() - begin
