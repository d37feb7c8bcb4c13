"""Optimizers, gradient clipping and learning-rate schedules.

Each optimizer's update is written ONCE, with tensor ops (``update(param, grad, state, lr,
step)``): eagerly, ``opt.step()`` runs it on ``.grad``; compiled, the training-step builder
traces the same function into the program, so both paths apply the identical rule.
"""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

from neural_arch.compiler import functional as F
from neural_arch.compiler.tensor import Tensor, bump_data_generation, no_grad

from .arena import StateArena


class StateDict(dict):
    """A dict that counts its changes in the tensors' data generation
    (``compiler.tensor.data_generation``): ``Optimizer.state`` and each parameter's state are
    these, so a compiled training step, which updates the state arrays in place, sees in one
    comparison per step whether any of them was replaced (a loaded checkpoint, a user's
    assignment) and only then looks at them again."""

    __slots__ = ()

    def __setitem__(self, key, value):
        bump_data_generation()
        dict.__setitem__(self, key, value)

    def __delitem__(self, key):
        bump_data_generation()
        dict.__delitem__(self, key)

    def __ior__(self, other):
        bump_data_generation()
        return dict.__ior__(self, other)

    def update(self, *args, **kwargs):
        bump_data_generation()
        dict.update(self, *args, **kwargs)

    def setdefault(self, key, default=None):
        bump_data_generation()
        return dict.setdefault(self, key, default)

    def pop(self, *args):
        bump_data_generation()
        return dict.pop(self, *args)

    def popitem(self):
        bump_data_generation()
        return dict.popitem(self)

    def clear(self):
        bump_data_generation()
        dict.clear(self)


class Optimizer:
    state_names: tuple[str, ...] = ()

    def __init__(self, params: Iterable, lr: float):
        self.params = list(params)
        if not self.params:
            raise ValueError(f"{type(self).__name__}: got an empty parameter list")
        first = {}
        for i, p in enumerate(self.params):  # (listed twice, it would be updated twice per step)
            if first.setdefault(id(p), i) != i:
                raise ValueError(f"{type(self).__name__}: parameter {i} is parameter {first[id(p)]} again")
        self.lr = lr
        self.step_count = 0
        # the parameters' and their state's slots in one buffer (models/arena.py)
        self._arena = StateArena(self.params, self.state_names)
        # per-parameter state: {"exp_avg": Tensor, ..., "step": int}
        self.state: dict[int, dict] = StateDict({id(p): self.init_state(p) for p in self.params})

    @property
    def lr(self) -> float:
        return self._lr

    @lr.setter
    def lr(self, value) -> None:
        """Checked whenever it is set (schedules set it between steps); a NumPy scalar becomes a
        float (the checkpoint's JSON metadata holds it)."""
        name = type(self).__name__
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            shown = f" {value!r}" if isinstance(value, str) else ""
            raise TypeError(f"{name}: lr must be a real number, got {type(value).__name__}{shown}")
        value = float(value)
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"{name}: lr must be finite and >= 0, got {value}")
        self._lr = value

    def _check_nonnegative(self, **values) -> None:
        for key, v in values.items():
            if not v >= 0:
                raise ValueError(f"{type(self).__name__}: {key} must be >= 0, got {v}")

    def init_state(self, p) -> dict:
        """Zeros for each state name (views of their slots in the arena: untouched memory) and step 0."""
        arena = self.__dict__.get("_arena")
        return StateDict({**{name: Tensor(arena.fresh(p, name) if arena is not None else np.zeros(p.shape, p.dtype))
                             for name in self.state_names}, "step": 0})

    def state_for(self, p) -> dict:
        return self.state[id(p)]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def update(self, p, g, state: dict, lr, step):
        """Return (new_param, {state_name: new_value}); written with tensor ops."""
        raise NotImplementedError

    def step(self) -> None:
        """Apply one update to every parameter that has a gradient (eager mode)."""
        self.step_count += 1
        with no_grad():
            for p in self.params:
                if p.grad is None:
                    continue
                st = self.state[id(p)]
                st["step"] += 1
                new_p, new_state = self.update(Tensor(p.data), p.grad, st, self.lr, st["step"])
                p.data = new_p.data
                for k, v in new_state.items():
                    st[k] = Tensor(v.data)


class SGD(Optimizer):
    """SGD with momentum (torch's dampening-free form), Nesterov, and L2 weight decay."""

    def __init__(self, params, lr: float = 1e-2, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        self._check_nonnegative(momentum=momentum, weight_decay=weight_decay)
        if nesterov and momentum <= 0:
            raise ValueError("SGD: nesterov needs momentum > 0")
        self.momentum, self.nesterov, self.weight_decay = momentum, nesterov, weight_decay
        self.state_names = ("momentum_buffer",) if momentum else ()
        super().__init__(params, lr)

    def update(self, p, g, state, lr, step):
        if isinstance(lr, Tensor):  # (traced: the float64 runtime input, rounded as a Python float is)
            lr = F.cast(lr, p.dtype)
        if self.weight_decay:
            g = g + p * self.weight_decay
        new_state = {}
        if self.momentum:
            # the buffer starts at zero, so step 1 gives buf = g exactly as torch's first step
            buf = state["momentum_buffer"] * self.momentum + g
            new_state["momentum_buffer"] = buf
            g = g + buf * self.momentum if self.nesterov else buf
        return p - g * lr, new_state


class Adam(Optimizer):
    """Adam (Kingma & Ba) with bias correction; ``weight_decay`` is L2 added to the gradient."""

    state_names = ("exp_avg", "exp_avg_sq")
    decoupled = False

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0):
        self.betas, self.eps, self.weight_decay = tuple(betas), eps, weight_decay
        if len(self.betas) != 2:
            raise ValueError(f"{type(self).__name__}: betas must be a pair (beta1, beta2), got {betas!r}")
        for i, b in enumerate(self.betas):  # (beta 1 would divide by 1 - beta^t = 0)
            if not 0.0 <= b < 1.0:
                raise ValueError(f"{type(self).__name__}: betas[{i}] must lie in [0, 1), got {b}")
        self._check_nonnegative(eps=eps, weight_decay=weight_decay)
        super().__init__(params, lr)

    def _factors(self, lr, step, dtype):
        """The step's scalar factors, the same for every parameter of a dtype: the decoupled
        weight decay's ``1 - lr wd`` (None without one), ``1 / sqrt(1 - beta2^t)`` and
        ``lr / (1 - beta1^t)``.  Traced (``step`` a tensor: a runtime input), they are built
        once per step and dtype and shared by every parameter's update (76 parameters of a
        6-layer GPT-2 traced the same 15 scalar nodes each)."""
        b1, b2 = self.betas
        if not isinstance(step, Tensor):
            bc1, bc2 = 1.0 - b1 ** step, 1.0 - b2 ** step
            decay = 1.0 - lr * self.weight_decay if self.weight_decay and self.decoupled else None
            return decay, 1.0 / math.sqrt(bc2), lr / bc1
        memo = getattr(self, "_traced_factors", None)  # (lr, step, {dtype: factors}) of this trace
        if memo is None or memo[0] is not lr or memo[1] is not step:
            memo = self._traced_factors = (lr, step, {})
        if dtype not in memo[2]:
            # the textbook 1 - beta^step in float64, as the eager branch computes it in
            # Python (in float32, 1 - beta2^1 would keep only ~4 correct digits), and the
            # scalar factors rounded to the parameter's dtype once, as eagerly
            lrd = F.cast(lr, "float64") if isinstance(lr, Tensor) else lr
            decay = None
            if self.weight_decay and self.decoupled:
                decay = 1.0 - lrd * self.weight_decay
                decay = F.cast(decay, dtype) if isinstance(decay, Tensor) else decay
            stepd = F.cast(step, "float64")
            bc1 = 1.0 - F.pow(b1, stepd)
            bc2 = 1.0 - F.pow(b2, stepd)
            memo[2][dtype] = (decay, F.cast(1.0 / F.sqrt(bc2), dtype), F.cast(lrd / bc1, dtype))
        return memo[2][dtype]

    def update(self, p, g, state, lr, step):
        b1, b2 = self.betas
        if self.weight_decay and not self.decoupled:
            g = g + p * self.weight_decay
        decay, inv_sqrt_bc2, lr_bc1 = self._factors(lr, step, p.dtype)
        if decay is not None:
            p = p * decay
        m = state["exp_avg"] * b1 + g * (1.0 - b1)
        v = state["exp_avg_sq"] * b2 + (g * g) * (1.0 - b2)
        # sqrt(v) / sqrt(bc2) as a product with the scalar's reciprocal: one division per
        # element instead of two (the divider bounds the update: 65K elements on one thread
        # 43 -> 28 us); it differs from the quotient in the last bit at most
        denom = F.sqrt(v) * inv_sqrt_bc2 + self.eps
        new_p = p - (m / denom) * lr_bc1
        return new_p, {"exp_avg": m, "exp_avg_sq": v}


class AdamW(Adam):
    """Adam with decoupled weight decay (Loshchilov & Hutter): p -= lr * wd * p before the step."""

    decoupled = True

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01):
        super().__init__(params, lr, betas, eps, weight_decay)


def clip_grad_norm_(params, max_norm: float) -> float:
    """Scale all gradients so their global L2 norm is at most max_norm; returns the norm
    before clipping (eager).  ``params``: any iterable of parameters (a generator is read once),
    or one parameter, as torch's."""
    params = [params] if isinstance(params, Tensor) else list(params)
    grads = [p.grad.data for p in params if p.grad is not None]
    total = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for p in params:
            if p.grad is not None:
                p.grad = Tensor((p.grad.data * scale).astype(p.grad.dtype))
    return total


def clip_by_global_norm(grads: list, max_norm: float):
    """The same clipping with tensor ops (traceable): returns (clipped grads, norm)."""
    total = F.sqrt(sum((F.sum(g * g) for g in grads[1:]), F.sum(grads[0] * grads[0])))
    scale = F.minimum(max_norm / (total + 1e-6), 1.0)
    # (gradients of several dtypes: the norm is in the widest, each is scaled in its own)
    return [g * (scale if scale.dtype == g.dtype else F.cast(scale, g.dtype)) for g in grads], total


# ----------------------------------------------------------------------------- schedules


class LRSchedule:
    """Maps a step number to a learning rate; ``sched.apply(opt, step)`` sets opt.lr."""

    def __call__(self, step: int) -> float:
        raise NotImplementedError

    def apply(self, opt: Optimizer, step: int) -> float:
        opt.lr = self(step)
        return opt.lr


class ConstantLR(LRSchedule):
    def __init__(self, lr: float):
        self.lr = lr

    def __call__(self, step):
        return self.lr


class StepLR(LRSchedule):
    """lr * gamma ** (step // step_size)."""

    def __init__(self, lr: float, step_size: int, gamma: float = 0.1):
        self.lr, self.step_size, self.gamma = lr, step_size, gamma

    def __call__(self, step):
        return self.lr * self.gamma ** (step // self.step_size)


class WarmupCosine(LRSchedule):
    """Linear warmup over ``warmup`` steps (step i gives lr * (i + 1) / warmup: lr / warmup at
    step 0, lr at step warmup - 1), then cosine decay to ``min_lr`` at ``total`` steps (and
    min_lr after)."""

    def __init__(self, lr: float, warmup: int, total: int, min_lr: float = 0.0):
        if total <= warmup:
            raise ValueError(f"WarmupCosine: total ({total}) must exceed warmup ({warmup})")
        self.lr, self.warmup, self.total, self.min_lr = lr, warmup, total, min_lr

    def __call__(self, step):
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / (self.total - self.warmup))
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * t))
