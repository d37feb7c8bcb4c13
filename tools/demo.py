"""`narch demo`: trace, differentiate and run a small model, printing its IR.

A two-layer MLP learns to separate two interleaved spirals.  The loss function is traced
into the typed SSA IR, differentiated as a graph transform, and every training step runs
the gradient program (compiled with LLVM when the codegen is available, else through the
NumPy interpreter)."""
from __future__ import annotations

import math
import time

import numpy as np

from neural_arch.compiler import Tensor, functional as F, trace, value_and_grad


class MLP:
    """Just enough of a module: named parameters, and a __call__."""

    def __init__(self, d_in: int, d_hidden: int, d_out: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.params = {
            "fc1.weight": Tensor(rng.normal(0, 1 / math.sqrt(d_in), (d_hidden, d_in)), "float32"),
            "fc1.bias": Tensor(np.zeros(d_hidden), "float32"),
            "ln.weight": Tensor(np.ones(d_hidden), "float32"),
            "ln.bias": Tensor(np.zeros(d_hidden), "float32"),
            "fc2.weight": Tensor(rng.normal(0, 1 / math.sqrt(d_hidden), (d_out, d_hidden)), "float32"),
            "fc2.bias": Tensor(np.zeros(d_out), "float32"),
        }

    def forward(self, p: dict, x):
        h = F.linear(x, p["fc1.weight"], p["fc1.bias"])
        h = F.layer_norm(h, weight=p["ln.weight"], bias=p["ln.bias"])
        return F.linear(F.gelu(h), p["fc2.weight"], p["fc2.bias"])


def spirals(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = rng.uniform(0.25, 1.0, n) * 3 * math.pi
    label = rng.integers(0, 2, n)
    r = t / (3 * math.pi)
    angle = t + label * math.pi
    x = np.stack([r * np.cos(angle), r * np.sin(angle)], 1) + rng.normal(0, 0.02, (n, 2))
    return x.astype(np.float32), label.astype(np.int64)


def main(steps: int = 400, lr: float = 0.3, backend: str = "auto", quiet: bool = False) -> float:
    model = MLP(2, 32, 2)
    names = list(model.params)
    x, y = spirals(256)
    xt, yt = Tensor(x), Tensor(y)

    def loss_fn(*args):
        p = dict(zip(names, args[:len(names)]))
        logits = model.forward(p, args[len(names)])
        return F.cross_entropy(logits, args[len(names) + 1])

    def forward_fn(x):
        return model.forward(model.params, x)

    print("== the traced forward graph (parameters are named inputs) ==")
    print(trace(forward_fn, xt[:4], params=model.params))
    step_fn = value_and_grad(loss_fn, argnums=tuple(range(len(names))))
    example = [model.params[n] for n in names] + [xt, yt]
    grad_graph = trace(step_fn, *example)
    print(f"== the training step: forward + backward is one graph of {len(grad_graph.nodes)} nodes ==")
    if not quiet:
        print("\n".join(str(grad_graph).splitlines()[:12]) + "\n  ...\n")
    runner = step_fn
    used = "interpreter (NumPy)"
    if backend in ("auto", "llvm"):
        try:
            from neural_arch.compiler import compile as na_compile  # lands with the codegen
        except ImportError:
            if backend == "llvm":
                raise
        else:
            runner = na_compile(step_fn, *example)
            used = "LLVM"
    print(f"== training with {used} ==")
    start = time.perf_counter()
    loss = math.nan
    for step in range(steps + 1):
        loss, grads = runner(*[model.params[n] for n in names], xt, yt)
        loss = float(loss.item())
        for n, g in zip(names, grads):
            model.params[n] = Tensor(model.params[n].data - lr * g.data)
        if step % 50 == 0:
            print(f"step {step:4d}  loss {loss:.4f}")
    logits = forward_fn(xt)
    acc = float((np.argmax(logits.data, -1) == y).mean())
    print(f"accuracy {acc:.1%} after {steps} steps in {time.perf_counter() - start:.1f} s")
    return loss
