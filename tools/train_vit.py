"""`narch train vit`: a small Vision Transformer, compiled, on scikit-learn's handwritten digits.

The 1,797 8x8 digits of ``sklearn.datasets.load_digits`` are split (stratified) into train and
test sets; the ViT cuts each image into four 4x4 patches (4 tokens + [CLS]).  Training runs one
compiled program per step (forward, cross entropy, backward, clipping, AdamW) on batches
augmented with random one-pixel shifts, with a progress bar; the test set is scored by a
compiled forward.  Writes a confusion-matrix PNG and a checkpoint to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from neural_arch.tools.loop import check_arguments, time_limit, warmup_steps

NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--steps", type=int, default=1500, help="training steps")
    p.add_argument("--time-limit", type=time_limit, default=150.0,
                   help="stop training after this many seconds, 0 for no limit")
    p.add_argument("--batch", type=int, default=64, help="images per batch")
    p.add_argument("--patch", type=int, default=4, help="patch size (the images are 8x8)")
    p.add_argument("--hidden", type=int, default=64, help="hidden size")
    p.add_argument("--layers", type=int, default=4, help="encoder layers")
    p.add_argument("--heads", type=int, default=4, help="attention heads")
    p.add_argument("--mlp-ratio", type=float, default=2.0, help="MLP width / hidden size")
    p.add_argument("--dropout", type=float, default=0.1, help="hidden dropout")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate (AdamW, warmup + cosine)")
    p.add_argument("--weight-decay", type=float, default=0.05, help="AdamW's decoupled weight decay")
    p.add_argument("--test-fraction", type=float, default=0.2, help="held-out share of the digits")
    p.add_argument("--eval-every", type=int, default=500, help="steps between test-set evaluations")
    p.add_argument("--out", default="runs/vit-digits", help="directory for the checkpoint and plots")
    p.add_argument("--backend", choices=["llvm", "interpreter"], default="llvm",
                   help="compiled native code, or the NumPy interpreter")
    p.add_argument("--seed", type=int, default=0, help="initialisation, split and batch seed")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")


# ----------------------------------------------------------------------------- data


def digits_split(test_fraction: float = 0.2, seed: int = 0):
    """scikit-learn's digits as float32 (N, 1, 8, 8) images in [0, 1] and int64 labels, split
    per class into (x_train, y_train, x_test, y_test)."""
    from sklearn.datasets import load_digits
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    test = np.zeros(len(y), bool)
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        test[idx[:int(round(len(idx) * test_fraction))]] = True
    return x[~test], y[~test], x[test], y[test]


def shift_augment(x: np.ndarray, rng: np.random.Generator, max_shift: int = 1) -> np.ndarray:
    """Each image moved by a random (dy, dx) in [-max_shift, max_shift]^2, zero-filled."""
    n, c, h, w = x.shape
    p = max_shift
    padded = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)))
    dy = rng.integers(0, 2 * p + 1, n)
    dx = rng.integers(0, 2 * p + 1, n)
    rows = dy[:, None] + np.arange(h)[None]  # (n, h)
    cols = dx[:, None] + np.arange(w)[None]  # (n, w)
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def normalize(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return ((x - mean) / std).astype(np.float32)


# ----------------------------------------------------------------------------- model and training


def make_model(args, seed: int):
    from neural_arch.models import nn
    from neural_arch.models.vit import ViTConfig, ViTForImageClassification
    cfg = ViTConfig(image_size=8, patch_size=args.patch, num_channels=1, num_classes=10, hidden_size=args.hidden,
                    num_hidden_layers=args.layers, num_attention_heads=args.heads, mlp_ratio=args.mlp_ratio,
                    hidden_dropout_prob=args.dropout, layer_norm_eps=1e-6)
    nn.manual_seed(seed)
    return ViTForImageClassification(cfg)


class Evaluator:
    """Test-set predictions through one compiled forward of a fixed batch size (the last
    batch is padded); the model's current parameters are read at every call."""

    def __init__(self, model, x: np.ndarray, batch: int, backend: str):
        from neural_arch.compiler import compile
        self.model, self.x, self.batch = model, x, min(batch, len(x))
        model.eval()
        self.fn = compile(lambda px: model(px), x[:self.batch], backend=backend, name="vit_forward")
        model.train()

    def logits(self) -> np.ndarray:
        self.model.eval()
        out = []
        for i in range(0, len(self.x), self.batch):
            xb = self.x[i:i + self.batch]
            n = len(xb)
            if n < self.batch:
                xb = np.concatenate([xb, np.zeros((self.batch - n,) + xb.shape[1:], xb.dtype)])
            out.append(self.fn(xb).data[:n])
        self.model.train()
        return np.concatenate(out)


def train(args, data=None, log=print) -> dict:
    """Train on ``data`` (default: the digits split); returns the history, the final test
    accuracy, the confusion matrix and timings."""
    from neural_arch.models import compile_train_step, optim

    x_tr, y_tr, x_te, y_te = data if data is not None else digits_split(args.test_fraction, args.seed)
    mean, std = float(x_tr.mean()), float(x_tr.std())
    x_te_n = normalize(x_te, mean, std)
    model = make_model(args, args.seed)
    cfg = model.config
    log(f"data: {len(x_tr)} train / {len(x_te)} test digits (8x8); model: ViT {cfg.num_hidden_layers} layers, "
        f"{cfg.num_attention_heads} heads, hidden {cfg.hidden_size}, patch {cfg.patch_size} "
        f"({cfg.num_patches} patches + CLS): {model.num_parameters():,} parameters")
    opt = optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=args.weight_decay)
    sched = optim.WarmupCosine(args.lr, warmup=warmup_steps(args.steps), total=args.steps, min_lr=args.lr / 50)

    def loss_fn(m, x, y):
        return m(x, y)[1]

    rng = np.random.default_rng(args.seed + 1)
    n_tr = len(x_tr)
    batch = min(args.batch, n_tr)

    def next_batch(order_pos=[0], order=[None]):
        if order[0] is None or order_pos[0] + batch > n_tr:
            order[0], order_pos[0] = rng.permutation(n_tr), 0
        idx = order[0][order_pos[0]:order_pos[0] + batch]
        order_pos[0] += batch
        return normalize(shift_augment(x_tr[idx], rng), mean, std), y_tr[idx]

    t0 = time.perf_counter()
    xb, yb = next_batch()
    step = compile_train_step(model, loss_fn, opt, xb, yb, clip_norm=1.0, backend=args.backend)
    ev = Evaluator(model, x_te_n, 512, args.backend)
    compile_s = time.perf_counter() - t0
    log(f"compiled the training step ({len(step.graph.nodes)} IR nodes) and the test forward in {compile_s:.1f} s "
        f"[{args.backend}]")

    def accuracy():
        pred = ev.logits().argmax(-1)
        return float((pred == y_te).mean()), pred

    from neural_arch.tools.loop import train_loop
    history, last, train_s = train_loop(
        step, (xb, yb), next_batch, sched, opt, args, lambda: accuracy()[0], "test_acc", "test accuracy",
        lambda done, loss, elapsed: {"img_s": f"{done * batch / max(elapsed, 1e-9):,.0f}"}, log)
    acc, pred = accuracy()
    conf = np.zeros((10, 10), np.int64)
    np.add.at(conf, (y_te, pred), 1)
    return {"model": model, "history": history, "accuracy": acc, "confusion": conf, "steps": last,
            "compile_seconds": compile_s, "train_seconds": train_s, "normalization": (mean, std),
            "chance": float(np.bincount(y_te).max() / len(y_te))}


def run(args) -> dict:
    from neural_arch.models import checkpoint
    check_arguments(args)
    start = time.perf_counter()
    res = train(args)
    total = time.perf_counter() - start
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "confusion.png")
    plot_confusion(res["confusion"], res["accuracy"], png)
    ckpt = os.path.join(args.out, "vit.safetensors")
    cfg = res["model"].config
    checkpoint.save(ckpt, res["model"], None, step=res["steps"], config=vars(cfg),
                    extra={"history": res["history"], "normalization": list(res["normalization"])})
    res["passed"] = res["accuracy"] >= 0.95
    print(f"test accuracy {res['accuracy']:.2%} after {res['steps']} steps "
          f"(target 95%: {'reached' if res['passed'] else 'NOT reached'}); compile {res['compile_seconds']:.1f} s, "
          f"training {res['train_seconds']:.1f} s, total {total:.1f} s")
    print(f"wrote {png} and {ckpt}")
    res["total_seconds"] = total
    return res


def plot_confusion(conf: np.ndarray, acc: float, path: str, title: str = "ViT on the digits") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.imshow(conf, cmap="Blues")
    for i in range(conf.shape[0]):
        for j in range(conf.shape[1]):
            if conf[i, j]:
                ax.text(j, i, str(conf[i, j]), ha="center", va="center",
                        color="white" if conf[i, j] > conf.max() / 2 else "black", fontsize=8)
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"neural_arch: {title}, test accuracy {acc:.1%}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
