"""JAX peers of ``narch bench train``'s training steps: the GPT-2 step and the MLP step.

Each is the same math as our step and as the PyTorch one the benchmark times -- forward,
mean cross-entropy, backward, AdamW (torch's form: bias corrections, decoupled weight decay
0.01, eps 1e-8) -- written out in ``jax.numpy`` and run as ONE ``jax.jit`` program whose
parameters and optimizer state are donated (XLA writes the new values over the old
buffers, as our step updates them in place).  The parameters start as copies of OUR
model's state dict (names, shapes and layouts as ours: GPT-2's Conv1D weights (in, out),
``nn.Linear``'s (out, in)) and the batch is the benchmark's, so the three frameworks'
losses agree step for step (tests/test_bench_train.py checks three steps).

Threads: XLA's CPU client sizes its intra-op thread pool from the ``NPROC`` environment
variable (else the cores the process may run on) when the backend starts;
``intra_op_parallelism_threads`` is not an XLA flag (XLA_FLAGS ignores it silently).
``configure(threads)`` sets NPROC (and the CPU platform) and must run before jax is first
used.  Float32 throughout: jax's default, x64 stays off.  XLA's CPU code flushes subnormals
to zero by default (``--xla_cpu_ftz=true``), as our compiled step does.
"""
from __future__ import annotations

import math
import os
import time

import numpy as np


def configure(threads: int) -> None:
    """Size XLA's CPU thread pool and pick the CPU backend; before jax's first use."""
    os.environ["NPROC"] = str(int(threads))
    os.environ.setdefault("JAX_PLATFORMS", "cpu")


def versions() -> dict:
    import jax
    import jaxlib
    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__}


# ----------------------------------------------------------------------------- AdamW


class AdamW:
    """torch.optim.AdamW's update (and ours), elementwise:

        p <- p * (1 - lr * wd)
        m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2
        p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)

    The step count t is part of the (donated) state.  The bias corrections 1 - b^t are
    computed as -expm1(t log b) with log b taken in float64: 1 - b2^t from a float32 b2^t
    keeps only ~4 correct digits at t = 1 (torch and ours compute them in float64)."""

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        self.lr, self.betas, self.eps, self.weight_decay = float(lr), tuple(betas), float(eps), float(weight_decay)

    def init(self, params: dict) -> dict:
        import jax.numpy as jnp
        return {"step": jnp.zeros((), jnp.int32),
                "exp_avg": {k: jnp.zeros_like(p) for k, p in params.items()},
                "exp_avg_sq": {k: jnp.zeros_like(p) for k, p in params.items()}}

    def update(self, params: dict, grads: dict, state: dict):
        import jax.numpy as jnp
        b1, b2 = self.betas
        step = state["step"] + 1
        t = step.astype(jnp.float32)
        bc1 = -jnp.expm1(t * np.float32(math.log(b1)))
        bc2 = -jnp.expm1(t * np.float32(math.log(b2)))
        lr_bc1 = self.lr / bc1
        sqrt_bc2 = jnp.sqrt(bc2)
        decay = np.float32(1.0 - self.lr * self.weight_decay)
        new_p, new_m, new_v = {}, {}, {}
        for k, p in params.items():
            g = grads[k]
            m = state["exp_avg"][k] * b1 + g * (1.0 - b1)
            v = state["exp_avg_sq"][k] * b2 + (g * g) * (1.0 - b2)
            new_p[k] = p * decay - lr_bc1 * m / (jnp.sqrt(v) / sqrt_bc2 + self.eps)
            new_m[k], new_v[k] = m, v
        return new_p, {"step": step, "exp_avg": new_m, "exp_avg_sq": new_v}


# ----------------------------------------------------------------------------- models


def cross_entropy(logits, target):
    """Mean over rows of logsumexp(logits) - logits[target]."""
    import jax
    import jax.numpy as jnp
    picked = jnp.take_along_axis(logits, target[:, None], axis=-1)[:, 0]
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - picked)


def _layer_norm(x, w, b, eps):
    import jax.numpy as jnp
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), -1, keepdims=True)
    return (x - mu) / jnp.sqrt(var + eps) * w + b


def gpt2_logits(p: dict, idx, n_head: int, eps: float = 1e-5):
    """GPT-2 (models/gpt2.py, Hugging Face's GPT2LMHeadModel): learned positions, pre-LN
    blocks, causal attention, tanh-GELU MLP, final LayerNorm, LM head tied to wte.
    ``p``: our state dict's names (``transformer.h.0.attn.c_attn.weight``, Conv1D (in, out))."""
    import jax
    import jax.numpy as jnp
    B, T = idx.shape
    wte = p["transformer.wte.weight"]
    E = wte.shape[1]
    D = E // n_head
    x = wte[idx] + p["transformer.wpe.weight"][:T]
    causal = jnp.tril(jnp.ones((T, T), bool))
    n_layer = len({k.split(".")[2] for k in p if k.startswith("transformer.h.")})
    for i in range(n_layer):
        h = f"transformer.h.{i}."
        a = _layer_norm(x, p[h + "ln_1.weight"], p[h + "ln_1.bias"], eps)
        qkv = a @ p[h + "attn.c_attn.weight"] + p[h + "attn.c_attn.bias"]
        q, k, v = (z.reshape(B, T, n_head, D).transpose(0, 2, 1, 3) for z in jnp.split(qkv, 3, axis=-1))
        s = (q @ k.transpose(0, 1, 3, 2)) * np.float32(1.0 / math.sqrt(D))
        att = jax.nn.softmax(jnp.where(causal, s, -jnp.inf), axis=-1)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, E)
        x = x + (y @ p[h + "attn.c_proj.weight"] + p[h + "attn.c_proj.bias"])
        m = _layer_norm(x, p[h + "ln_2.weight"], p[h + "ln_2.bias"], eps)
        m = jax.nn.gelu(m @ p[h + "mlp.c_fc.weight"] + p[h + "mlp.c_fc.bias"], approximate=True)
        x = x + (m @ p[h + "mlp.c_proj.weight"] + p[h + "mlp.c_proj.bias"])
    x = _layer_norm(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"], eps)
    return x @ wte.T


def gpt2_loss(n_head: int, eps: float = 1e-5):
    def loss(p, idx, target):
        logits = gpt2_logits(p, idx, n_head, eps)
        return cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
    return loss


def mlp_loss(n_linear: int):
    """nn.Sequential(Linear, ReLU, Linear, ReLU, ..., Linear) with our names (``0.weight``,
    ``2.weight``, ...; weights (out, in) as torch's)."""
    import jax.numpy as jnp

    def loss(p, x, target):
        for i in range(n_linear):
            x = x @ p[f"{2 * i}.weight"].T + p[f"{2 * i}.bias"]
            if i + 1 < n_linear:
                x = jnp.maximum(x, 0.0)
        return cross_entropy(x, target)
    return loss


def params_from_state_dict(state: dict) -> dict:
    """float32 copies of a state dict's arrays (each parameter once: GPT-2's tied
    ``lm_head.weight`` is ``transformer.wte.weight``)."""
    out = {}
    for k, v in state.items():
        if k == "lm_head.weight" and "transformer.wte.weight" in state:
            if not np.array_equal(v, state["transformer.wte.weight"]):
                raise ValueError("lm_head.weight is not tied to transformer.wte.weight")
            continue
        out[k] = np.array(v, np.float32, copy=True)
    return out


# ----------------------------------------------------------------------------- the step


class JaxTrainStep:
    """``step()`` runs one training step on the fixed batch and returns its loss (before the
    update, as ours and torch's), waiting for it.  Loss, gradients and update are one
    ``jax.jit`` program; parameters and AdamW state are donated.  ``compile_s``: the first
    call (trace + XLA compile + one step)."""

    def __init__(self, loss_fn, params: dict, batch: tuple, opt: AdamW | None = None):
        import jax
        import jax.numpy as jnp
        self.opt = opt or AdamW()
        self.params = {k: jnp.array(v, jnp.float32) for k, v in params.items()}
        self.state = self.opt.init(self.params)
        self.batch = tuple(jnp.array(np.asarray(b, np.int32) if np.issubdtype(np.asarray(b).dtype, np.integer)
                                     else np.asarray(b, np.float32)) for b in batch)
        opt_ = self.opt

        def step(params, state, *batch):
            loss, grads = jax.value_and_grad(loss_fn)(params, *batch)
            params, state = opt_.update(params, grads, state)
            return loss, params, state
        self._step = jax.jit(step, donate_argnums=(0, 1))
        self.compile_s = None

    def __call__(self) -> float:
        t = time.perf_counter()
        loss, self.params, self.state = self._step(self.params, self.state, *self.batch)
        loss = float(loss)  # waits for the step (every output of one execution is ready together)
        if self.compile_s is None:
            self.compile_s = time.perf_counter() - t
        return loss

    def numpy_params(self) -> dict:
        return {k: np.asarray(v) for k, v in self.params.items()}


def gpt2_step(state: dict, n_head: int, batch: tuple, ln_eps: float = 1e-5, **adamw) -> JaxTrainStep:
    """GPT-2's step from a state dict (ours or Hugging Face's names); ``adamw``: AdamW's
    lr, betas, eps, weight_decay."""
    return JaxTrainStep(gpt2_loss(n_head, ln_eps), params_from_state_dict(state), batch, AdamW(**adamw))


def mlp_step(state: dict, batch: tuple, **adamw) -> JaxTrainStep:
    """The step of an nn.Sequential of Linear layers with ReLU between, from its state dict."""
    params = params_from_state_dict(state)
    n_linear = len([k for k in params if k.endswith(".weight")])
    return JaxTrainStep(mlp_loss(n_linear), params, batch, AdamW(**adamw))
