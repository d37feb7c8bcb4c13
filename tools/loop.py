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
